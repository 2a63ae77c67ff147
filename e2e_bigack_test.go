package spoe_test

// Big answers under load, on every HAProxy: 40 concurrent HTTP clients, a
// backend "server ... maxconn 2", and ACKs that set one string variable of
// 1 byte up to what max-frame-size allows. HAProxy 3.1+ stalls a pipelining
// connection for good when one read fills its demux buffer (see
// pipelinedACKCap and conn.pipelining in hello.go, and README "Known
// HAProxy issues"); the agent therefore answers "pipelining" to it only
// once it learnt that its answers are small, and caps them on such
// connections. TestE2EBigAnswersStallWithPipelining keeps the reproducer
// of HAProxy's bug: the same load with "pipelining" always answered and
// no cap (spoe.KeepPipelining).

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// bigAnswerLoad is one run of the load.
type bigAnswerLoad struct {
	size       int // bytes of the variable; -1: the largest that fits
	clients    int
	duration   time.Duration
	pipelining bool // the agent answers "pipelining" to 3.1+ too (spoe.KeepPipelining)
	noMaxconn  bool // the agents' server line without "maxconn 2"
	// smallFor: the answers are of 1 byte for that long after the agent
	// starts, of size after.
	smallFor time.Duration
	// bigEvery, if set: one answer in bigEvery is of size, the others of
	// 1 byte (the agent learns from small ones first, as with smallFor).
	bigEvery int64
}

// slowAnswer: a request that took that long is counted slow. A stalled
// connection makes its events wait for the harness's "timeout processing"
// (3s); under the race detector, on a busy machine, the whole test process
// was seen to pause for a second.
const slowAnswer = 2 * time.Second

// bigAnswerResult counts the requests of a run.
type bigAnswerResult struct {
	ok, failed, transport int64
	bigOK                 int64 // of ok, those of size (not 1 byte)
	capped                int64 // answered with the agent's error variable only
	slow                  int64 // answered after slowAnswer or more
	firstFailure          string
	pipelined, hellos     int // AGENT-HELLOs with "pipelining", and in all
}

// spopVarintLen is the length of v encoded as an SPOP varint.
func spopVarintLen(v uint64) int {
	if v < 240 {
		return 1
	}
	n := 2
	for v = (v - 240) >> 4; v >= 128; v = (v - 128) >> 7 {
		n++
	}
	return n
}

// largestString is the longest string value that one set-var of txn.<name>
// can carry in an ACK of (streamID, frameID) when the agent's frames are
// kept to maxFrameSize-1 bytes, as the library keeps them, with room kept
// free for the set-var of the error variable (txn.<prefix>.error), which
// the library adds when it must leave an action out.
func largestString(maxFrameSize int, streamID, frameID uint64, name string) int {
	head := 1 + 4 + spopVarintLen(streamID) + spopVarintLen(frameID) // type, flags, ids
	action := 3 + spopVarintLen(uint64(len(name))) + len(name) + 1   // type, nb-args, scope, name, value type
	errorVar := 3 + 1 + len("error") + 1                             // the same for the BOOL txn.<prefix>.error
	room := maxFrameSize - 1 - head - action - errorVar
	n := room - spopVarintLen(uint64(room))
	for n+spopVarintLen(uint64(n)) > room {
		n--
	}
	return n
}

func runBigAnswers(t *testing.T, hp haproxyBinary, load bigAnswerLoad) bigAnswerResult {
	t.Helper()
	payload := make([]byte, 16384)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}
	start := time.Now()
	var answers atomic.Int64
	a := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		n := load.size
		if n < 0 {
			n = largestString(16380, r.StreamID(), r.FrameID(), "big")
		}
		if time.Since(start) < load.smallFor || load.bigEvery > 0 && answers.Add(1)%load.bigEvery != 0 {
			n = 1
		}
		return w.SetString(txn, "big", string(payload[:n]))
	})}
	if load.pipelining {
		spoe.KeepPipelining(a)
	}
	agent := startAgentUnderTest(t, a)
	if load.smallFor > 0 || load.bigEvery > 0 {
		// The agent learns that its answers are small before HAProxy
		// starts: at a cold start, whether HAProxy's first connections
		// wait long enough for it is a matter of timing (see
		// conn.pipelining); here every 3.1+ connection pipelines.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := spoe.Dial(ctx, "tcp", agent.addr, spoe.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 32; i++ {
			if _, err := c.Notify(ctx, spoe.ClientMessage{Name: "big"}); err != nil {
				t.Fatal(err)
			}
		}
		c.Close()
		cancel()
	}
	serverOptions := "maxconn 2"
	if load.noMaxconn {
		serverOptions = ""
	}
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages big",
		SpoeSections: `
spoe-message big
    args src
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-big-len %[var(txn.e2e.big),length] if { var(txn.e2e.big) -m found }\n" +
			"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }\n" +
			"http-after-response set-header x-agent-error %[var(txn.e2e.error)] if { var(txn.e2e.error) -m found }",
		ServerOptions: serverOptions,
	})

	var res bigAnswerResult
	var mu sync.Mutex
	deadline := time.Now().Add(load.duration)
	var wg sync.WaitGroup
	for i := 0; i < load.clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newClient(t, true)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				r, err := tryGet(c, h.url+"/big")
				if time.Since(t0) >= slowAnswer {
					atomic.AddInt64(&res.slow, 1)
				}
				bigLen := ""
				if err == nil {
					bigLen = r.header.Get("X-Big-Len")
				}
				switch {
				case err != nil:
					atomic.AddInt64(&res.transport, 1)
				case r.header.Get("X-Spoe-Error") == "" && bigLen != "" &&
					(load.size < 0 || bigLen == strconv.Itoa(load.size) || (load.smallFor > 0 || load.bigEvery > 0) && bigLen == "1"):
					atomic.AddInt64(&res.ok, 1)
					if bigLen != "1" {
						atomic.AddInt64(&res.bigOK, 1)
					}
				case r.header.Get("X-Spoe-Error") == "" && bigLen == "" && r.header.Get("X-Agent-Error") != "":
					atomic.AddInt64(&res.capped, 1)
				default:
					atomic.AddInt64(&res.failed, 1)
					mu.Lock()
					if res.firstFailure == "" {
						res.firstFailure = fmt.Sprintf("status %d, x-spoe-error %q, x-big-len %q",
							r.status, r.header.Get("X-Spoe-Error"), r.header.Get("X-Big-Len"))
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	s := agent.Stats()
	for _, hello := range agent.tap.agentHellos() {
		res.hellos++
		if strings.Contains(hello.capabilities, "pipelining") {
			res.pipelined++
		}
	}
	small := ""
	if load.smallFor > 0 {
		small = fmt.Sprintf(" (1 byte for the first %v)", load.smallFor)
	}
	t.Logf("HAProxy %s, %d-byte answers%s, %d clients for %v, pipelining kept %v: %d ok (%d big), %d failed, %d with the agent's error variable only, %d transport errors, %d slower than 2s; agent: %d ACKs in %d writes, %d of %d AGENT-HELLOs with pipelining",
		hp.version, load.size, small, load.clients, load.duration, load.pipelining, res.ok, res.bigOK, res.failed, res.capped, res.transport, res.slow,
		s.FramesOut.ACK, s.Writes, res.pipelined, res.hellos)
	return res
}

// TestE2EBigAnswers: answers from 1 byte to the largest one max-frame-size
// allows, 40 clients at once, every request answered by the agent on every
// HAProxy.
func TestE2EBigAnswers(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		for _, size := range []int{1, 1000, 4000, 8000, 12000, -1} {
			name := strconv.Itoa(size)
			if size < 0 {
				name = "max"
			}
			t.Run(name, func(t *testing.T) {
				res := runBigAnswers(t, hp, bigAnswerLoad{size: size, clients: 40, duration: 1500 * time.Millisecond})
				if res.failed != 0 || res.capped != 0 || res.transport != 0 || res.ok == 0 {
					t.Errorf("%d ok, %d failed (first: %s), %d with the error variable only, %d transport errors; want every request answered",
						res.ok, res.failed, res.firstFailure, res.capped, res.transport)
				}
			})
		}
	})
}

// TestE2EBigAnswersStallWithPipelining reproduces HAProxy 3.1+'s bug: when
// the agent answers "pipelining", 12,000-byte answers to 40 clients stall
// the agent connections (every later request fails after "timeout
// processing"). HAProxy 2.6 and 3.0 are not affected (and offer "async",
// so the agent answers "pipelining" to them anyway). Should a HAProxy
// version fix the bug, this test fails for it: the agent can then pipeline
// with it again.
func TestE2EBigAnswersStallWithPipelining(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		res := runBigAnswers(t, hp, bigAnswerLoad{size: 12000, clients: 40, duration: 1500 * time.Millisecond, pipelining: true})
		if hp.is26() {
			if res.failed != 0 || res.transport != 0 || res.ok == 0 {
				t.Errorf("%d ok, %d failed (first: %s), %d transport errors; want every request answered on the applet engine",
					res.ok, res.failed, res.firstFailure, res.transport)
			}
			return
		}
		if res.failed == 0 {
			t.Errorf("%d requests, none failed: HAProxy %s no longer stalls with pipelining", res.ok, hp.version)
		}
	})
}

// TestE2EBigAnswersAfterSmall: answers of 1 byte for a while, then big
// ones, 40 clients at once. On 3.1+ the agent pipelines once it learnt
// that its answers are small (conn.pipelining; here from a Client before
// HAProxy starts), then the big answers meet
// pipelining connections: there they are refused for the cap (HAProxy's
// rules see the agent's error variable), never written whole, so no
// connection stalls and no request waits for "timeout processing" (none
// takes slowAnswer).
func TestE2EBigAnswersAfterSmall(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		for _, size := range []int{12000, -1} {
			for _, noMaxconn := range []bool{false, true} {
				name := strconv.Itoa(size)
				if size < 0 {
					name = "max"
				}
				if noMaxconn {
					name += "/no-maxconn"
				}
				t.Run(name, func(t *testing.T) {
					res := runBigAnswers(t, hp, bigAnswerLoad{size: size, clients: 40, duration: 3 * time.Second,
						smallFor: 1500 * time.Millisecond, noMaxconn: noMaxconn})
					if res.failed != 0 || res.transport != 0 || res.slow != 0 || res.ok == 0 {
						t.Errorf("%d ok, %d failed (first: %s), %d transport errors, %d slower than 2s; want every request answered without waiting for timeout processing",
							res.ok, res.failed, res.firstFailure, res.transport, res.slow)
					}
					if !hp.is26() && (res.pipelined == 0 || res.capped == 0) {
						t.Errorf("%d of %d AGENT-HELLOs with pipelining, %d answers refused for the cap: want the big answers to meet pipelining connections",
							res.pipelined, res.hellos, res.capped)
					}
				})
			}
		}
	})
}

// TestE2EOccasionalBigAnswers: 4,000-byte answers, one in 50, among 1-byte
// ones, 40 clients at once, once the agent pipelines with 3.1+: the window
// of the last ACKs (ackWindow) lets a big answer through whole unless
// three others came just before it on its connection, so nearly all of
// them reach HAProxy, and nothing stalls.
func TestE2EOccasionalBigAnswers(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		res := runBigAnswers(t, hp, bigAnswerLoad{size: 4000, clients: 40, duration: 3 * time.Second, bigEvery: 50})
		if res.failed != 0 || res.transport != 0 || res.slow != 0 || res.bigOK == 0 {
			t.Errorf("%d ok (%d big), %d failed (first: %s), %d transport errors, %d slower than 2s; want every request answered",
				res.ok, res.bigOK, res.failed, res.firstFailure, res.transport, res.slow)
		}
		// With one big answer in 50, three more among the 19 ACKs before
		// one on its connection come less than once in a hundred.
		if res.capped*20 > res.bigOK {
			t.Errorf("%d big answers whole, %d replaced by the error variable: want nearly all whole", res.bigOK, res.capped)
		}
		if !hp.is26() && res.pipelined == 0 {
			t.Errorf("no AGENT-HELLO with pipelining (%d in all)", res.hellos)
		}
	})
}
