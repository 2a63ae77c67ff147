package spoe

// What tests need of the package's internals, kept out of its code.

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// readFrame reads exactly one whole frame from r and returns the bytes
// after its length prefix, reading nothing of the next one: the blocking
// reader of the tests' fake peers, which read frames one at a time from
// connections they also read by other means. The agent and the Client
// read with frameReader.
func readFrame(r io.Reader, buf []byte, maxFrameSize int) ([]byte, error) {
	var hdr [lengthSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if err := checkLength(n, maxFrameSize); err != nil {
		return nil, err
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}

// varintLen returns how many bytes appendVarint writes for x.
func varintLen(x uint64) int {
	if x < 240 {
		return 1
	}
	n := 2
	x = (x - 240) >> 4
	for x >= 128 {
		x = (x - 128) >> 7
		n++
	}
	return n
}

// testConn returns a connection of a, not served, over nc.
func testConn(a *Agent, nc net.Conn) *conn {
	a.init()
	return newConn(a, a.config(), nc)
}

// KeepPipelining makes a answer "pipelining" to HAProxy 3.1+ always, and
// write ACKs of any size on such connections, which the library does not
// by default (see conn.pipelining): the end-to-end reproducer of
// HAProxy's stall, and unit tests whose Client looks like 3.1+, use it.
func KeepPipelining(a *Agent) { a.keepPipelining = true }

// NoPipelining makes a never answer "pipelining" to HAProxy 3.1+, as the
// library did before it learnt its answers' size: the baseline of the
// cost measurement.
func NoPipelining(a *Agent) { a.noPipelining = true }

// count is how many engines the agent holds, lingering ones included.
func (r *engines) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.m)
}

// lookup returns the number of live connections of the engine id.
func (r *engines) lookup(id string) int {
	r.mu.Lock()
	e := r.m[id]
	r.mu.Unlock()
	if e == nil {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// has reports whether the engine id is registered, lingering or not.
func (r *engines) has(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[id] != nil
}

// isWriting reports whether c has a write under way.
func (c *conn) isWriting() bool {
	c.wr.mu.Lock()
	defer c.wr.mu.Unlock()
	return c.wr.writing
}

// The shared test helpers (helpers_test.go), for the external tests.

// ServeOptionsForTest says how ServeAgentForTest serves an agent.
type ServeOptionsForTest = serveOptions

// ServeAgentForTest is serveAgent: it serves a on a loopback listener
// until the test ends and returns its address and stop.
func ServeAgentForTest(t testing.TB, a *Agent, o ServeOptionsForTest) (addr string, stop func()) {
	t.Helper()
	return serveAgent(t, a, o)
}

// WaitWithinForTest is waitWithin: it polls cond until it holds, failing
// the test after timeout.
func WaitWithinForTest(t testing.TB, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	waitWithin(t, timeout, cond, what)
}
