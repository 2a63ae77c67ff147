package spoe

// Helpers shared by the package's tests, internal (package spoe) and
// external (package spoe_test, through export_test.go):
//
//   - serveAgent serves an Agent on a loopback listener until the test (or
//     its stop) ends, then checks that Serve returned ErrAgentClosed; it is
//     the only place tests start an agent. startAgent and startAgentAsIs are
//     its two common forms; the end-to-end harness wraps it as
//     agentUnderTest.
//   - waitWithin polls a condition until a deadline (waitFor: 10 s); it is
//     the only way the tests wait for something another goroutine does.
//   - rawPeer speaks SPOP frame by frame (dialRaw, rawFrame, notifyNamed);
//     dialAgent connects the package's Client; gate and seedHandler are the
//     handlers most tests use.

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// serveOptions says how serveAgent serves an agent; the zero value serves
// it as is. Its fields are exported for the external tests
// (ServeOptionsForTest).
type serveOptions struct {
	// KeepPipelining makes the agent answer "pipelining" to HAProxy 3.1+
	// too (see startAgent).
	KeepPipelining bool
	// Wrap, if set, wraps the loopback listener the agent serves.
	Wrap func(net.Listener) net.Listener
	// Logs is where the agent logs, at debug level, if it has no Logger;
	// nil discards its logs.
	Logs io.Writer
	// Graceful ends the agent with Shutdown (Close after 5 s) rather than
	// Close.
	Graceful bool
}

// serveAgent serves a on a loopback listener and returns its address and
// stop, which ends the agent and checks that Serve returned
// ErrAgentClosed. stop runs when the test ends, if not called before; a
// second call does nothing.
func serveAgent(t testing.TB, a *Agent, o serveOptions) (addr string, stop func()) {
	t.Helper()
	if a.Logger == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		if o.Logs != nil {
			l.SetOutput(o.Logs)
		}
		l.SetLevel(logrus.DebugLevel)
		a.Logger = l
	}
	if o.KeepPipelining {
		a.keepPipelining = true
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var served net.Listener = l
	if o.Wrap != nil {
		served = o.Wrap(l)
	}
	done := make(chan error, 1)
	go func() { done <- a.Serve(served) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			if o.Graceful {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if err := a.Shutdown(ctx); err != nil {
					t.Errorf("agent Shutdown: %v", err)
					_ = a.Close()
				}
			} else {
				_ = a.Close()
			}
			select {
			case err := <-done:
				assert.ErrorIs(t, err, ErrAgentClosed, "Serve's return")
			case <-time.After(5 * time.Second):
				t.Error("Serve did not return after the agent ended")
			}
		})
	}
	t.Cleanup(stop)
	return l.Addr().String(), stop
}

// startAgent serves a on a loopback listener and returns its address. The
// agent is closed, and Serve's return checked, when the test ends.
//
// The Client offers what HAProxy 3.1+ offers, to which a fresh agent does
// not answer "pipelining" by default (conn.pipelining); these tests are
// about how the agent handles pipelined frames, so it keeps it here, with
// no cap on the ACKs. The default is tested by TestNoPipeliningToHAProxy3,
// TestPipeliningLearnt and end to end.
func startAgent(t testing.TB, a *Agent) string {
	t.Helper()
	addr, _ := serveAgent(t, a, serveOptions{KeepPipelining: true})
	return addr
}

// startAgentAsIs is startAgent without keepPipelining set.
func startAgentAsIs(t testing.TB, a *Agent) string {
	t.Helper()
	addr, _ := serveAgent(t, a, serveOptions{})
	return addr
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	waitWithin(t, 10*time.Second, cond, what)
}

// waitWithin polls cond with a short, growing interval until it holds, and
// fails the test if it still does not after timeout.
func waitWithin(t testing.TB, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	interval := time.Millisecond
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", timeout, what)
		}
		// Polling interval, not synchronisation: the loop only goes on
		// once cond holds.
		time.Sleep(interval)
		if interval < 10*time.Millisecond {
			interval *= 2
		}
	}
}

// dialAgent connects a Client with cfg.
func dialAgent(t testing.TB, addr string, cfg ClientConfig) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "tcp", addr, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// notifyCtx bounds a test's requests: generous, as CI machines are shared.
func notifyCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// rawPeer speaks SPOP frame by frame, for what the Client will not send.
type rawPeer struct {
	t  testing.TB
	nc net.Conn
}

func dialRaw(t testing.TB, addr string) *rawPeer {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return &rawPeer{t: t, nc: nc}
}

func rawFrame(typ frameType, flags uint32, sid, fid uint64, payload []byte) []byte {
	b, start := appendFrameHeader(nil, typ, flags, sid, fid)
	b = append(b, payload...)
	finishFrame(b, start)
	return b
}

func (p *rawPeer) send(b []byte) {
	p.t.Helper()
	_, err := p.nc.Write(b)
	require.NoError(p.t, err)
}

// hello sends a HAPROXY-HELLO and returns the AGENT-HELLO's keys.
func (p *rawPeer) hello(caps, engineID string, maxFrame uint32) map[string]Value {
	p.t.Helper()
	kvs := []interface{}{"supported-versions", "2.0", "max-frame-size", maxFrame, "capabilities", caps}
	if engineID != "" {
		kvs = append(kvs, "engine-id", engineID)
	}
	p.send(rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(kvs...)))
	f := p.next()
	require.Equal(p.t, frameAgentHello, f.typ)
	m := map[string]Value{}
	for off := 0; off < len(f.payload); {
		e, next, err := readKV(f.payload, off)
		require.NoError(p.t, err)
		m[string(e.key)] = e.value
		off = next
	}
	return m
}

// next reads one frame from the agent.
func (p *rawPeer) next() frame {
	p.t.Helper()
	f, err := p.tryNext()
	require.NoError(p.t, err)
	return f
}

func (p *rawPeer) tryNext() (frame, error) {
	_ = p.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := readFrame(p.nc, nil, 1<<20)
	if err != nil {
		return frame{}, err
	}
	return parseFrame(b)
}

// expectDisconnect reads an AGENT-DISCONNECT with that status, then the
// connection's end.
func (p *rawPeer) expectDisconnect(want Status) {
	p.t.Helper()
	f := p.next()
	require.Equal(p.t, frameAgentDisconnect, f.typ, "expected AGENT-DISCONNECT")
	assert.Equal(p.t, flagFin, f.flags)
	d, err := parseDisconnect(f.payload)
	require.NoError(p.t, err)
	assert.Equal(p.t, want, d.status, "status (message %q)", d.message)
	p.expectClosed()
}

// expectClosed closes the peer's side, as HAProxy does after the agent's
// last frame, and reads until the agent closes the connection too.
func (p *rawPeer) expectClosed() {
	p.t.Helper()
	_ = p.nc.(*net.TCPConn).CloseWrite()
	_ = p.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, p.nc)
	if err != nil && !isNormalEnd(err) {
		p.t.Fatalf("expected the agent to close, got %v", err)
	}
	assert.Zero(p.t, n, "no frame after the end")
}

func ipRep(ip net.IP) ClientMessage {
	return ClientMessage{Name: "ip-rep", Args: []Arg{{"ip", ip}}}
}

// seedHandler is the design card's handler with a fixed reputation.
func seedHandler(messages []Message) ([]Action, error) {
	reputation := 0.0
	for _, msg := range messages {
		if msg.Name != "ip-rep" {
			continue
		}
		ip, ok := msg.Args["ip"].(net.IP)
		if !ok {
			return nil, errors.New("expected ip in message")
		}
		reputation = float64(ip[len(ip)-1]) / 4
	}
	return []Action{ActionSetVar{Name: "reputation", Scope: VarScopeSession, Value: reputation}}, nil
}

// gate is a Handler that blocks on messages named "slow" until release is
// closed, signalling started as each does, and answers every frame with
// txn.sid set to its stream-id.
type gate struct {
	started chan struct{}
	release chan struct{}
}

func newGate() *gate {
	return &gate{started: make(chan struct{}, 16), release: make(chan struct{})}
}

func (g *gate) ServeSPOE(w *ActionWriter, r *Request) error {
	if msgs := r.Messages(); msgs.Next() && msgs.NameIs("slow") {
		g.started <- struct{}{}
		<-g.release
	}
	return w.SetInt(VarScopeTransaction, "sid", int64(r.StreamID()))
}

// notifyNamed is a NOTIFY frame of one message without arguments.
func notifyNamed(name string, sid, fid uint64) []byte {
	payload, _ := appendMessages(nil, []ClientMessage{{Name: name}})
	return rawFrame(frameNotify, flagFin, sid, fid, payload)
}

// gatedAgent serves (startAgent) an agent whose Handler is a new gate.
func gatedAgent(t testing.TB) (*Agent, *gate, string) {
	t.Helper()
	g := newGate()
	a := &Agent{Handler: g}
	return a, g, startAgent(t, a)
}

// dialEngine opens a raw connection to the agent at addr and does the
// handshake as a HAProxy offering caps, with that engine-id and a
// max-frame-size of 16380.
func dialEngine(t testing.TB, addr, caps, engineID string) *rawPeer {
	t.Helper()
	p := dialRaw(t, addr)
	p.hello(caps, engineID, 16380)
	return p
}
