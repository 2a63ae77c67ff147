//go:build spoeperf

package spoe_test

// What the mitigation of HAProxy 3.1+'s stall on big answers costs (issue
// 8; conn.pipelining in hello.go, README "Known HAProxy issues"): the
// agent answers "pipelining" to the 3.1+ multiplexer only once it learnt
// that its answers are small. TestE2EPipeliningCost measures it through
// real HAProxy: variant A never pipelines (spoe.NoPipelining, the previous
// mitigation), variant B always does (spoe.KeepPipelining), variant C is
// the default.
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
	name    string // "A", "B" or "C"
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

// Pipelining of a perfVariant's agent.
const (
	perfNever   = iota // spoe.NoPipelining
	perfAlways         // spoe.KeepPipelining
	perfDefault        // the library's rule
)

// startPerfVariant serves an agent whose handler sets either one int
// variable (size 0) or one string of size bytes, behind its own HAProxy.
func startPerfVariant(t *testing.T, hp haproxyBinary, name string, pipelining int, size int, serverOptions string, nclients int) *perfVariant {
	t.Helper()
	value := strings.Repeat("x", size)
	a := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		if size == 0 {
			return w.SetInt(txn, "v", 42)
		}
		return w.SetString(txn, "v", value)
	})}
	switch pipelining {
	case perfNever:
		spoe.NoPipelining(a)
	case perfAlways:
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
	pipelined := 0
	hellos := v.agent.tap.agentHellos()
	for _, h := range hellos {
		if strings.Contains(h.capabilities, "pipelining") {
			pipelined++
		}
	}
	out := fmt.Sprintf("%s req/s median %7.0f [%6.0f–%6.0f]  p50 %7s  p99 %8s  ok %7d  errors %d (set-on-error/no var) + %d transport  conns open %d, accepted %d, pipelining %d",
		v.name, medianFloat(v.rps), lo, hi,
		percentile(v.latencies, 0.50).Round(time.Microsecond), percentile(v.latencies, 0.99).Round(time.Microsecond),
		v.ok, v.spoeErr, v.transport, s.ConnsOpen, s.ConnsTotal, pipelined)
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
// latency of three agents (A: never pipelining, spoe.NoPipelining; B:
// always, spoe.KeepPipelining; C: the default rule), 40 concurrent
// keep-alive HTTP clients, answers of one int variable and of one
// 4,000-byte string, the agents' server line with "maxconn 2" and without
// maxconn. Each agent and its HAProxy start cold, then take a one-second
// warm-up. Rounds of A, B and C rotate (A B C, B C A, C A B, ...), so
// that other load on the machine falls on all alike.
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
					vs := []*perfVariant{
						startPerfVariant(t, hp, "A (no pipelining)", perfNever, size, server, clients),
						startPerfVariant(t, hp, "B (pipelining)   ", perfAlways, size, server, clients),
						startPerfVariant(t, hp, "C (default rule) ", perfDefault, size, server, clients),
					}
					for _, v := range vs {
						v.round(time.Second, wantLen, false)
					}
					// Each variant goes first, second and third in a
					// third of the turns, so that a drift of the
					// machine's load falls on all alike.
					for i := 0; i < rounds; i++ {
						for j := range vs {
							vs[(i+j)%len(vs)].round(roundLen, wantLen, true)
						}
					}
					a, b, c := vs[0], vs[1], vs[2]
					head := fmt.Sprintf("HAProxy %s, %s answer, server line %q, %d clients, %d rounds of %v each:",
						hp.version, answer, server, clients, rounds, roundLen)
					lines := []string{head, "  " + a.summary(), "  " + b.summary(), "  " + c.summary()}
					for _, x := range []*perfVariant{a, c} {
						lines = append(lines, fmt.Sprintf("  %c vs B: requests/s %+.1f%%, p50 %+.1f%%, p99 %+.1f%%; per turn, requests/s %s",
							x.name[0], 100*(medianFloat(x.rps)-medianFloat(b.rps))/medianFloat(b.rps),
							pctChange(percentile(x.latencies, .5), percentile(b.latencies, .5)),
							pctChange(percentile(x.latencies, .99), percentile(b.latencies, .99)),
							ratioSummary(x.rps, b.rps)))
					}
					for _, l := range lines {
						t.Log(l)
					}
					for _, v := range vs {
						var r []string
						for _, x := range v.rps {
							r = append(r, fmt.Sprintf("%.0f", x))
						}
						t.Logf("  rounds %c: %s", v.name[0], strings.Join(r, " "))
					}
					table = append(table, lines...)
				})
			}
		}
	}
	t.Log("summary:\n" + strings.Join(table, "\n"))
}

// ratioSummary is the median, least and greatest of x[i]/b[i]: the rounds
// of one turn ran back to back, so their ratio is less sensitive to the
// machine's other load than the medians.
func ratioSummary(x, b []float64) string {
	var ratios []float64
	for i := range x {
		if i < len(b) && b[i] > 0 {
			ratios = append(ratios, x[i]/b[i])
		}
	}
	if len(ratios) == 0 {
		return "-"
	}
	sorted := append([]float64(nil), ratios...)
	sort.Float64s(sorted)
	return fmt.Sprintf("median ratio %.3f [%.3f–%.3f]", medianFloat(ratios), sorted[0], sorted[len(sorted)-1])
}

// pctChange is how much a differs from b, in percent of b.
func pctChange(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a-b) / float64(b)
}
