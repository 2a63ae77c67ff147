package spoe_test

// End-to-end checks of what differs between HAProxy versions (issue 8):
// each runs on every HAProxy of the matrix (forEachHAProxy).

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// TestE2EEmptyAnswer: a handler that sets nothing. HAProxy 3.1.0 never
// hands an ACK with an empty payload to its SPOE applet (the event then
// waits for "timeout processing" and fails); the agent sends one NOOP
// action byte instead, which every version takes for "no actions". The
// answer must reach HAProxy at once: well before "timeout processing" (3s).
func TestE2EEmptyAnswer(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		agent := startAgent(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
			return nil
		})})
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages empty",
			SpoeSections: `
spoe-message empty
    args src
    event on-frontend-http-request
`,
			Frontend: "http-request set-var(txn.e2e.before) str(kept)\n" +
				"http-after-response set-header x-before %[var(txn.e2e.before)] if { var(txn.e2e.before) -m found }\n" +
				"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
		})
		c := newClient(t, true)
		for i := 0; i < 5; i++ {
			start := time.Now()
			r := get(t, c, h.url+"/empty")
			took := time.Since(start)
			expectNoHeader(t, r, "x-spoe-error")
			expectHeader(t, r, "x-before", "kept")
			if took > 2*time.Second { // "timeout processing" is 3s; a loaded machine may take 1s
				t.Errorf("request %d took %v: the empty answer did not reach HAProxy at once", i, took)
			}
		}
		s := agent.Stats()
		t.Logf("HAProxy %s: 5 requests on %d agent connections", hp.version, s.ConnsTotal)
		if s.FramesOut.ACK != 5 {
			t.Errorf("agent wrote %d ACKs, want 5", s.FramesOut.ACK)
		}
	})
}

// TestE2EFragmentAbortThenNext: on the applet engine (2.6 to 3.0), a
// request body over the agent's reassembly cap (1 MiB) arrives as a NOTIFY
// in fragments, which the agent aborts (ACK with ABORT). When HAProxy gets
// the ABORT before its last fragment, it fails that event and sends no
// more of it, not even a fragment with ABORT; the next request on the same
// agent connection must then pass (it used to be taken for an interlaced
// frame, and the connection ended with status 11). Here HAProxy may also
// have sent every fragment already; TestFragmentAbortedThenNext plays the
// other case exactly. 3.1+ never fragments: nothing to check there.
func TestE2EFragmentAbortThenNext(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		if !hp.is26() {
			t.Logf("HAProxy %s never fragments NOTIFYs", hp.version)
			return
		}
		// 16380-byte frames: the body comes in about 70 fragments, and the
		// agent aborts it with many still to come. (With frames of the
		// default 1 MiB, its ABORT would come after the FIN fragment,
		// which HAProxy applies as an ACK without actions.)
		agent := startAgent(t, &spoe.Agent{MaxFrameSize: 16380, Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
			m, _ := r.Message("body")
			v, _ := m.Arg("b")
			b, _ := v.Bytes()
			return w.SetInt(txn, "body_len", int64(len(b)))
		})})
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages body",
			SpoeSections: `
spoe-message body
    args b=req.body
    event on-frontend-http-request
`,
			Frontend: "option http-buffer-request\n" +
				"http-after-response set-header x-body-len %[var(txn.e2e.body_len)] if { var(txn.e2e.body_len) -m found }\n" +
				"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
			Global: "tune.bufsize 2097152",
		})
		c := newClient(t, true)
		post := func(n int) response {
			t.Helper()
			req, err := http.NewRequest(http.MethodPost, h.url+"/body", bytes.NewReader(bytes.Repeat([]byte("x"), n)))
			if err != nil {
				t.Fatal(err)
			}
			res, err := c.Do(req)
			if err != nil {
				t.Fatalf("POST %d bytes: %v", n, err)
			}
			defer res.Body.Close()
			body, _ := io.ReadAll(res.Body)
			return response{status: res.StatusCode, header: res.Header, body: string(body)}
		}
		small := post(10)
		expectHeader(t, small, "x-body-len", "10")
		connsBefore := agent.Stats().ConnsTotal

		// HAProxy may apply the ABORT as an ACK without actions when it
		// had sent the last fragment already (so no x-spoe-error): either
		// way the handler never sees the body.
		big := post(1100 << 10)
		expectNoHeader(t, big, "x-body-len")
		for i := 0; i < 3; i++ {
			next := post(20)
			expectHeader(t, next, "x-body-len", "20")
			expectNoHeader(t, next, "x-spoe-error")
		}
		s := agent.Stats()
		t.Logf("HAProxy %s: big request x-spoe-error %q; NOTIFY %d, UNSET %d, too big %d; connections %d before, %d after",
			hp.version, big.header.Get("X-Spoe-Error"), s.FramesIn.Notify, s.FramesIn.Unset, s.NotifyTooBig, connsBefore, s.ConnsTotal)
		if s.NotifyTooBig != 1 || s.FramesIn.Unset == 0 {
			t.Errorf("agent: %d NOTIFYs too big, %d UNSET frames; want 1 aborted NOTIFY in fragments", s.NotifyTooBig, s.FramesIn.Unset)
		}
		if n := s.DisconnectsOut[spoe.StatusInterlacedFrames]; n != 0 {
			t.Errorf("agent sent %d AGENT-DISCONNECT 11 (interlaced frames)", n)
		}
		if s.ConnsTotal != connsBefore {
			t.Logf("HAProxy opened %d more agent connections", s.ConnsTotal-connsBefore)
		}
	})
}

// TestE2EACKsBeforeShutdown: ACKs the agent writes just before its
// AGENT-DISCONNECT (Shutdown while handlers run) must reach HAProxy.
// HAProxy 3.1.0 lets a connection error override ACKs already received
// (fixed in 3.2-dev): this checks that on every version the events whose
// handlers were running when Shutdown began get their variables.
func TestE2EACKsBeforeShutdown(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		started := make(chan struct{}, 16)
		a := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
			started <- struct{}{}
			timer := time.NewTimer(300 * time.Millisecond) // the handler's own work
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-r.Context().Done():
			}
			return w.SetString(txn, "done", "yes")
		})}
		agent := startAgent(t, a)
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages slow",
			SpoeSections: `
spoe-message slow
    args src
    event on-frontend-http-request
`,
			Frontend: "http-after-response set-header x-done %[var(txn.e2e.done)] if { var(txn.e2e.done) -m found }\n" +
				"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
		})
		const n = 4
		results := make(chan response, n)
		for i := 0; i < n; i++ {
			go func() {
				r, err := tryGet(newClient(t, false), h.url+"/slow")
				if err != nil {
					t.Errorf("GET: %v", err)
				}
				results <- r
			}()
		}
		for i := 0; i < n; i++ {
			select {
			case <-started:
			case <-time.After(5 * time.Second):
				t.Fatalf("only %d of %d handlers started", i, n)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := agent.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		for i := 0; i < n; i++ {
			r := <-results
			expectHeader(t, r, "x-done", "yes")
			expectNoHeader(t, r, "x-spoe-error")
		}
		s := agent.Stats()
		t.Logf("HAProxy %s: %d ACKs on %d connections, AGENT-DISCONNECT %v", hp.version, s.FramesOut.ACK, s.ConnsTotal, s.DisconnectsOut)
	})
}
