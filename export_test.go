package spoe

// Test-only knobs for the tests of package spoe_test.

// KeepPipelining makes a answer "pipelining" to HAProxy 3.1+ too, which
// the library does not by default (see agentCaps): the end-to-end
// reproducer of HAProxy's stall uses it.
func KeepPipelining(a *Agent) { a.keepPipelining = true }
