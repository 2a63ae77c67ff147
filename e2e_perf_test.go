//go:build spoeperf

package spoe_test

// What the mitigation of HAProxy 3.1+'s stall on big answers costs (issue
// 8; agentCaps in hello.go, README "Known HAProxy issues"): the agent does
// not answer "pipelining" to the 3.1+ multiplexer. TestE2EPipeliningCost
// measures it through real HAProxy: variant A is the default (no
// pipelining), variant B answers "pipelining" (spoe.KeepPipelining).
//
// It is a measurement, not a pass/fail test: it is built only with the
// spoeperf tag (the test suite never runs it), asserts nothing and logs a
// table. Run it with
//
//	CI=true go test -tags spoeperf -run TestE2EPipeliningCost -v -count=1 .
//
// SPOE_PERF_ROUNDS (default 8) and SPOE_PERF_ROUND (default 3s) change the
// number and length of the rounds of each variant.

import (
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// perfVariant is one agent and its HAProxy, loaded in turns with the other
// variant.
type perfVariant struct {
	name    string // "A" or "B"
	agent   *agentUnderTest
	h       *haproxyInstance
	clients []*http.Client

	rps       []float64       // requests/s of each round
	latencies []time.Duration // of every answered request
	ok        int64
	spoeErr   int64 // set-on-error seen by the frontend's rule, or no variable
	transport int64
	firstErr  string
}

func perfEnvInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func perfEnvDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// startPerfVariant serves an agent whose handler sets either one int
// variable (size 0) or one string of size bytes, behind its own HAProxy.
func startPerfVariant(t *testing.T, hp haproxyBinary, name string, pipelining bool, size int, serverOptions string, nclients int) *perfVariant {
	t.Helper()
	value := strings.Repeat("x", size)
	a := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		if size == 0 {
			return w.SetInt(txn, "v", 42)
		}
		return w.SetString(txn, "v", value)
	})}
	if pipelining {
		spoe.KeepPipelining(a)
	}
	agent := startAgentUnderTest(t, a)
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages perf",
		SpoeSections: `
spoe-message perf
    args src
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-v-len %[var(txn.e2e.v),length] if { var(txn.e2e.v) -m found }\n" +
			"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
		ServerOptions: serverOptions,
	})
	v := &perfVariant{name: name, agent: agent, h: h}
	for i := 0; i < nclients; i++ {
		v.clients = append(v.clients, newClient(t, true))
	}
	return v
}

// round loads v with its clients for d and records what it saw; record
// false makes it a warm-up.
func (v *perfVariant) round(d time.Duration, wantLen string, record bool) {
	var ok, spoeErr, transport int64
	var mu sync.Mutex
	var lat []time.Duration
	var firstErr string
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for _, c := range v.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			own := make([]time.Duration, 0, 4096)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				r, err := tryGet(c, v.h.url+"/perf")
				el := time.Since(t0)
				switch {
				case err != nil:
					atomic.AddInt64(&transport, 1)
					mu.Lock()
					if firstErr == "" {
						firstErr = err.Error()
					}
					mu.Unlock()
				case r.header.Get("X-Spoe-Error") == "" && r.header.Get("X-V-Len") == wantLen:
					atomic.AddInt64(&ok, 1)
					own = append(own, el)
				default:
					atomic.AddInt64(&spoeErr, 1)
					mu.Lock()
					if firstErr == "" {
						firstErr = fmt.Sprintf("status %d, x-spoe-error %q, x-v-len %q",
							r.status, r.header.Get("X-Spoe-Error"), r.header.Get("X-V-Len"))
					}
					mu.Unlock()
				}
			}
			mu.Lock()
			lat = append(lat, own...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if !record {
		return
	}
	v.rps = append(v.rps, float64(ok)/elapsed.Seconds())
	v.latencies = append(v.latencies, lat...)
	v.ok += ok
	v.spoeErr += spoeErr
	v.transport += transport
	if v.firstErr == "" {
		v.firstErr = firstErr
	}
}

func medianFloat(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p * float64(len(s)-1))
	return s[i]
}

func (v *perfVariant) summary() string {
	lo, hi := 0.0, 0.0
	for i, x := range v.rps {
		if i == 0 || x < lo {
			lo = x
		}
		if i == 0 || x > hi {
			hi = x
		}
	}
	s := v.agent.Stats()
	hellos := v.agent.tap.agentHellos()
	caps := ""
	if len(hellos) > 0 {
		caps = hellos[0].capabilities
	}
	out := fmt.Sprintf("%s req/s median %7.0f [%6.0f–%6.0f]  p50 %7s  p99 %8s  ok %7d  errors %d (set-on-error/no var) + %d transport  conns open %d, accepted %d  caps %q",
		v.name, medianFloat(v.rps), lo, hi,
		percentile(v.latencies, 0.50).Round(time.Microsecond), percentile(v.latencies, 0.99).Round(time.Microsecond),
		v.ok, v.spoeErr, v.transport, s.ConnsOpen, s.ConnsTotal, caps)
	if v.firstErr != "" {
		out += "  first error: " + v.firstErr
	}
	return out
}

// perfHAProxies returns HAProxy 3.2 and the 3.1+ binaries SPOE_HAPROXY
// lists: the versions whose multiplexer the mitigation concerns.
func perfHAProxies(t *testing.T) []haproxyBinary {
	var bins []haproxyBinary
	for _, w := range haproxyVersions {
		if w.name == "3.2" {
			bins = append(bins, requireHAProxy(t, w))
		}
	}
	for _, path := range extraHAProxyPaths() {
		l := lookupExtraHAProxy(path)
		if l.problem != "" {
			t.Fatalf("SPOE_HAPROXY: %s", l.problem)
		}
		if !l.bin.is26() {
			bins = append(bins, l.bin)
		}
	}
	return bins
}

// TestE2EPipeliningCost measures, through real HAProxy 3.1+, requests/s and
// latency with and without pipelining (A: the default, no pipelining; B:
// spoe.KeepPipelining), 40 concurrent keep-alive HTTP clients, answers of
// one int variable and of one 4,000-byte string, the agents' server line
// with "maxconn 2" and without maxconn. Rounds of A and B alternate (A B,
// B A, ...), so that other load on the machine falls on both.
func TestE2EPipeliningCost(t *testing.T) {
	rounds := perfEnvInt("SPOE_PERF_ROUNDS", 8)
	roundLen := perfEnvDuration("SPOE_PERF_ROUND", 3*time.Second)
	const clients = 40
	var table []string
	for _, hp := range perfHAProxies(t) {
		for _, size := range []int{0, 4000} {
			for _, server := range []string{"maxconn 2", ""} {
				answer := "int"
				wantLen := "2" // length of "42"
				if size > 0 {
					answer = fmt.Sprintf("%d-byte string", size)
					wantLen = strconv.Itoa(size)
				}
				serverName := server
				if serverName == "" {
					serverName = "no maxconn"
				}
				name := fmt.Sprintf("%s/%s/%s", hp.version, strings.ReplaceAll(answer, " ", "-"), strings.ReplaceAll(serverName, " ", "-"))
				t.Run(name, func(t *testing.T) {
					a := startPerfVariant(t, hp, "A (no pipelining)", false, size, server, clients)
					b := startPerfVariant(t, hp, "B (pipelining)   ", true, size, server, clients)
					a.round(time.Second, wantLen, false)
					b.round(time.Second, wantLen, false)
					// A B, B A, A B...: each variant goes first in half
					// of the pairs, so a drift of the machine's load
					// falls on both alike.
					for i := 0; i < rounds; i++ {
						first, second := a, b
						if i%2 == 1 {
							first, second = b, a
						}
						first.round(roundLen, wantLen, true)
						second.round(roundLen, wantLen, true)
					}
					delta := 100 * (medianFloat(a.rps) - medianFloat(b.rps)) / medianFloat(b.rps)
					head := fmt.Sprintf("HAProxy %s, %s answer, server line %q, %d clients, %d rounds of %v each:",
						hp.version, answer, server, clients, rounds, roundLen)
					lines := []string{head, "  " + a.summary(), "  " + b.summary(),
						fmt.Sprintf("  A vs B: requests/s %+.1f%%, p50 %+.1f%%, p99 %+.1f%%", delta,
							pctChange(percentile(a.latencies, .5), percentile(b.latencies, .5)),
							pctChange(percentile(a.latencies, .99), percentile(b.latencies, .99)))}
					for _, l := range lines {
						t.Log(l)
					}
					var ra, rb []string
					for i := range a.rps {
						ra = append(ra, fmt.Sprintf("%.0f", a.rps[i]))
						rb = append(rb, fmt.Sprintf("%.0f", b.rps[i]))
					}
					t.Logf("  rounds A: %s", strings.Join(ra, " "))
					t.Logf("  rounds B: %s", strings.Join(rb, " "))
					// Each pair of rounds ran back to back: the ratio of
					// a pair is less sensitive to the machine's other load
					// than the medians.
					var ratios []float64
					for i := range a.rps {
						if b.rps[i] > 0 {
							ratios = append(ratios, a.rps[i]/b.rps[i])
						}
					}
					if len(ratios) > 0 {
						sorted := append([]float64(nil), ratios...)
						sort.Float64s(sorted)
						l := fmt.Sprintf("  A/B requests/s per pair of rounds: median %.3f [%.3f–%.3f]",
							medianFloat(ratios), sorted[0], sorted[len(sorted)-1])
						t.Log(l)
						lines = append(lines, l)
					}
					table = append(table, lines...)
				})
			}
		}
	}
	t.Log("summary:\n" + strings.Join(table, "\n"))
}

// pctChange is how much a differs from b, in percent of b.
func pctChange(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a-b) / float64(b)
}
