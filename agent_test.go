package spoe

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSeedHandlerRoundTrip(t *testing.T) {
	addr := startAgent(t, New(seedHandler))
	c := dialAgent(t, addr, ClientConfig{})
	actions, err := c.Notify(notifyCtx(t), ipRep(net.IP{10, 0, 0, 3}))
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "reputation", Scope: VarScopeSession, Value: "0.75"}}, actions)
}

func TestHandshakeNegotiation(t *testing.T) {
	a := &Agent{MaxFrameSize: 4096}
	addr := startAgent(t, a)

	p := dialRaw(t, addr)
	h := p.hello("pipelining,async", "e1", 16380)
	assert.True(t, h["version"].EqualString("2.0"))
	assert.Equal(t, TypeUint32, h["max-frame-size"].Type())
	n, _ := h["max-frame-size"].Uint()
	assert.Equal(t, uint64(4096), n, "the agent's limit when lower than HAProxy's")
	assert.True(t, h["capabilities"].EqualString("pipelining,async,fragmentation"))

	p = dialRaw(t, addr)
	h = p.hello("", "", 1000)
	n, _ = h["max-frame-size"].Uint()
	assert.Equal(t, uint64(1000), n, "HAProxy's when lower")
	assert.True(t, h["capabilities"].EqualString("fragmentation"), "nothing HAProxy did not offer, but fragmentation")

	c := dialAgent(t, addr, ClientConfig{NoPipelining: true})
	assert.Equal(t, "fragmentation", c.Capabilities())
	_, err := c.Notify(notifyCtx(t), ipRep(net.IP{1, 2, 3, 4}))
	assert.NoError(t, err, "sync connection")
}

func TestFastPathHandler(t *testing.T) {
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		for msgs := r.Messages(); msgs.Next(); {
			if !msgs.NameIs("heavy") {
				continue
			}
			host, _ := msgs.Arg("host")
			b, _ := host.Bytes()
			_ = w.SetStringBytes(VarScopeTransaction, "host", b)
			_ = w.SetInt(VarScopeSession, "score", 100)
			_ = w.SetBool(VarScopeTransaction, "ok", true)
			_ = w.UnsetVar(VarScopeRequest, "old")
		}
		assert.NotEmpty(t, r.EngineID())
		assert.Equal(t, uint64(1), r.FrameID())
		return nil
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "heavy", Args: []Arg{{"host", "h1.example.com"}, {"n", int64(1)}}})
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "host", Scope: VarScopeTransaction, Value: "h1.example.com"},
		ActionSetVar{Name: "score", Scope: VarScopeSession, Value: int64(100)},
		ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true},
		ActionUnsetVar{Name: "old", Scope: VarScopeRequest},
	}, actions)
}

// TestHandlerFailures: an error or a panic answers at once with the error
// variable alone, is logged and counted.
func TestHandlerFailures(t *testing.T) {
	logger, hook := test.NewNullLogger()
	a := &Agent{Logger: logger, VarPrefix: "p", Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		_ = w.SetBool(VarScopeTransaction, "partial", true)
		msgs := r.Messages()
		msgs.Next()
		switch {
		case msgs.NameIs("fail"):
			return errors.New("lookup failed")
		case msgs.NameIs("panic"):
			panic("boom")
		case msgs.NameIs("badname"):
			return w.SetBool(VarScopeTransaction, "bad-name", true)
		}
		return nil
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	ctx := notifyCtx(t)
	errVar := []Action{ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}}

	actions, err := c.Notify(ctx, ClientMessage{Name: "fail"})
	require.NoError(t, err)
	assert.Equal(t, errVar, actions)
	actions, err = c.Notify(ctx, ClientMessage{Name: "panic"})
	require.NoError(t, err)
	assert.Equal(t, errVar, actions)
	actions, err = c.Notify(ctx, ClientMessage{Name: "ok"})
	require.NoError(t, err, "the connection goes on after a panic")
	assert.Equal(t, []Action{ActionSetVar{Name: "partial", Scope: VarScopeTransaction, Value: true}}, actions)
	// A refused action: the handler returned its error, so the frame failed.
	actions, err = c.Notify(ctx, ClientMessage{Name: "badname"})
	require.NoError(t, err)
	assert.Equal(t, errVar, actions)

	st := a.Stats()
	assert.Equal(t, uint64(2), st.HandlerErrors)
	assert.Equal(t, uint64(1), st.HandlerPanics)
	var sawStack, sawError bool
	for _, e := range hook.AllEntries() {
		if e.Level == logrus.ErrorLevel && strings.Contains(e.Message, "boom") {
			sawStack = strings.Contains(e.Data["stack"].(string), "agent_test.go")
		}
		if e.Level == logrus.ErrorLevel && e.Data[logrus.ErrorKey] != nil && strings.Contains(e.Data[logrus.ErrorKey].(error).Error(), "lookup failed") {
			sawError = true
		}
	}
	assert.True(t, sawStack, "panic logged with its stack")
	assert.True(t, sawError, "error logged")
}

// TestRefusedActionsReported: actions HAProxy would drop are left out,
// logged and counted; the others still go, with the error variable set so
// that HAProxy's rules can tell.
func TestRefusedActionsReported(t *testing.T) {
	logger, hook := test.NewNullLogger()
	a := New(func([]Message) ([]Action, error) {
		return []Action{
			ActionSetVar{Name: "ip-score", Scope: VarScopeSession, Value: 1},
			ActionSetVar{Name: "nan", Scope: VarScopeSession, Value: struct{}{}},
			ActionSetVar{Name: "good", Scope: VarScopeSession, Value: 2},
		}, nil
	})
	a.Logger = logger
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "good", Scope: VarScopeSession, Value: int64(2)},
		ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true},
	}, actions)
	assert.Equal(t, uint64(2), a.Stats().ActionsRefused)
	var logged bool
	for _, e := range hook.AllEntries() {
		if e.Level == logrus.ErrorLevel && errors.Is(e.Data[logrus.ErrorKey].(error), ErrVarName) {
			logged = true
		}
	}
	assert.True(t, logged)
}

func TestErrorVarSettings(t *testing.T) {
	fail := HandlerFunc(func(*ActionWriter, *Request) error { return errors.New("x") })
	c := dialAgent(t, startAgent(t, &Agent{Handler: fail, ErrorVar: "spoe_failed"}), ClientConfig{})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "spoe_failed", Scope: VarScopeTransaction, Value: true}}, actions)

	c = dialAgent(t, startAgent(t, &Agent{Handler: fail, ErrorVar: "-"}), ClientConfig{})
	actions, err = c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	assert.Empty(t, actions, "turned off: an empty ACK, still at once")
}

// TestPipelinedConcurrency: frames of one connection are handled
// concurrently: every handler waits until all are running.
func TestPipelinedConcurrency(t *testing.T) {
	const n = 20
	var running sync.WaitGroup
	running.Add(n)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		running.Done()
		running.Wait()
		return w.SetInt(VarScopeTransaction, "sid", int64(r.StreamID()))
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	ctx := notifyCtx(t)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			actions, err := c.Notify(ctx, ClientMessage{Name: "m"})
			assert.NoError(t, err)
			assert.Len(t, actions, 1)
		}()
	}
	wg.Wait()
	st := a.Stats()
	assert.Equal(t, int64(1), int64(st.ConnsTotal))
	assert.GreaterOrEqual(t, st.Rescues, uint64(n-1), "every blocked handler was rescued")
}

// TestACKsMatchTheirFrames: under pipelining with handlers of varied
// speed, each ACK carries its own frame's ids and values.
func TestACKsMatchTheirFrames(t *testing.T) {
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		msgs := r.Messages()
		msgs.Next()
		v, _ := msgs.Arg("n")
		n, _ := v.Int()
		if n%7 == 0 {
			time.Sleep(time.Duration(n%5) * time.Millisecond) // a slow lookup
		}
		return w.SetInt(VarScopeTransaction, "n", n)
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	ctx := notifyCtx(t)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				n := int64(g*1000 + i)
				actions, err := c.Notify(ctx, ClientMessage{Name: "m", Args: []Arg{{"n", n}}})
				if !assert.NoError(t, err) {
					return
				}
				assert.Equal(t, []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: n}}, actions)
			}
		}(g)
	}
	wg.Wait()
}

// TestCoalescedWrites: ACKs of frames read together leave in one write.
func TestCoalescedWrites(t *testing.T) {
	a := New(seedHandler)
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	before := a.Stats()
	payload, err := appendMessages(nil, []ClientMessage{ipRep(net.IP{1, 1, 1, 1})})
	require.NoError(t, err)
	var batch []byte
	for sid := uint64(1); sid <= 50; sid++ {
		batch = append(batch, rawFrame(frameNotify, flagFin, sid, 1, payload)...)
	}
	p.send(batch)
	seen := map[uint64]bool{}
	for len(seen) < 50 {
		f := p.next()
		require.Equal(t, frameAck, f.typ)
		seen[f.streamID] = true
	}
	after := a.Stats()
	w, rescues := after.Writes-before.Writes, after.Rescues-before.Rescues
	t.Logf("50 ACKs in %d writes, %d handlers rescued", w, rescues)
	// A handler that outlasts the inline budget (a loaded machine, the
	// race detector) is rescued: its ACK leaves alone, and the reader's
	// run of ACKs is cut there.
	assert.Less(t, w, 10+2*rescues, "ACKs of one read share a write")
}

func TestHealthCheck(t *testing.T) {
	a := New(seedHandler)
	addr := startAgent(t, a)
	for _, version := range goldenVersions {
		p := dialRaw(t, addr)
		p.send(golden(t, version, "haproxy-hello-healthcheck.bin"))
		f := p.next()
		require.Equal(t, frameAgentHello, f.typ)
		assert.Equal(t, flagFin, f.flags, "3.x demands flags exactly FIN")
		assert.Zero(t, f.streamID)
		assert.Zero(t, f.frameID)
		// The protocol's minimum, which every version's check accepts
		// whatever its tune.bufsize (see helloFrameSize).
		var n uint64
		for off := 0; off < len(f.payload); {
			e, next, err := readKV(f.payload, off)
			require.NoError(t, err)
			if string(e.key) == "max-frame-size" {
				n, _ = e.value.Uint()
			}
			off = next
		}
		assert.Equal(t, uint64(MinFrameSize), n)
		p.expectClosed()
	}
	assert.Equal(t, uint64(2), a.Stats().Healthchecks)
	assert.Zero(t, a.Stats().ProtocolErrors)
}

// TestGoldenSession replays real HAProxy frames: HELLO, NOTIFYs, DISCONNECT.
func TestGoldenSession(t *testing.T) {
	for _, version := range goldenVersions {
		t.Run(version, func(t *testing.T) {
			var got []string
			var mu sync.Mutex
			a := New(func(messages []Message) ([]Action, error) {
				mu.Lock()
				defer mu.Unlock()
				for _, m := range messages {
					got = append(got, m.Name)
				}
				return nil, nil
			})
			p := dialRaw(t, startAgent(t, a))
			p.send(golden(t, version, "haproxy-hello.bin"))
			require.Equal(t, frameAgentHello, p.next().typ)
			for _, name := range []string{"notify-ip-rep.bin", "notify-echo.bin", "notify-m_one-3msgs.bin"} {
				b := golden(t, version, name)
				f, err := parseFrame(b[lengthSize:])
				require.NoError(t, err)
				p.send(b)
				ack := p.next()
				assert.Equal(t, frameAck, ack.typ)
				assert.Equal(t, flagFin, ack.flags)
				assert.Equal(t, f.streamID, ack.streamID, "stream-id echoed")
				assert.Equal(t, f.frameID, ack.frameID, "frame-id echoed")
				// No actions: one NOOP action byte, not an empty payload
				// (HAProxy 3.1.0 ignores an empty ACK; see actionNoop).
				assert.Equal(t, []byte{actionNoop}, ack.payload)
			}
			assert.Equal(t, []string{"ip-rep", "echo", "m_one", "m_two", "m_three"}, got)
			disc := "haproxy-disconnect-status0.bin"
			want := StatusNormal
			if version != "2.6.12" {
				disc, want = "haproxy-disconnect-status8.bin", StatusUnsupportedVersion
			}
			p.send(golden(t, version, disc))
			p.expectDisconnect(want) // echoes HAProxy's status
		})
	}
}

func TestFragmentedNotify(t *testing.T) {
	var got atomic.Value
	a := &Agent{MaxFrameSize: 256, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		msgs := r.Messages()
		msgs.Next()
		v, _ := msgs.Arg("big")
		b, _ := v.Bytes()
		got.Store(string(b))
		return w.SetInt(VarScopeTransaction, "len", int64(len(b)))
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{FragmentSize: 100})
	require.Equal(t, 256, c.MaxFrameSize())
	big := strings.Repeat("0123456789", 100)
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m", Args: []Arg{{"big", big}, {"after", true}}})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "len", Scope: VarScopeTransaction, Value: int64(1000)}}, actions)
	assert.Equal(t, big, got.Load())
	assert.Greater(t, a.Stats().FramesIn.Unset, uint64(5))
}

func TestFragmentAbort(t *testing.T) {
	calls := 0
	a := New(func([]Message) ([]Action, error) { calls++; return nil, nil })
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	p.send(rawFrame(frameNotify, 0, 9, 1, []byte{1, 'm', 1, 1, 'a', 8, 20, 'x'}))
	p.send(rawFrame(frameUnset, flagFin|flagAbort, 9, 1, nil))
	p.send(notifyNamed("n", 10, 1))
	f := p.next()
	assert.Equal(t, uint64(10), f.streamID, "no ACK for the aborted NOTIFY")
	assert.Equal(t, 1, calls)
}

func TestFragmentsWithoutCapability(t *testing.T) {
	// The agent always announces fragmentation; a NOTIFY without FIN is
	// only an error on a connection that did not negotiate it, which the
	// agent never produces. Here the frame without FIN is a fragment: its
	// continuation then finishes it.
	a := New(func(msgs []Message) ([]Action, error) {
		return []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: msgs[0].Args["a"]}}, nil
	})
	p := dialRaw(t, startAgent(t, a))
	p.hello("", "", 16380)
	full, _ := appendMessages(nil, []ClientMessage{{Name: "m", Args: []Arg{{"a", "split here"}}}})
	p.send(rawFrame(frameNotify, 0, 3, 1, full[:8]))
	p.send(rawFrame(frameUnset, flagFin, 3, 1, full[8:]))
	f := p.next()
	actions, err := decodeActions(f.payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: "split here"}}, actions)
}

// TestAsyncACKOnSibling: with async, the ACK of a frame whose connection
// closed leaves on another connection of the same engine, never on another
// engine's.
func TestAsyncACKOnSibling(t *testing.T) {
	a, g, addr := gatedAgent(t)
	origin := dialEngine(t, addr, "pipelining,async", "engine-A")
	sibling := dialEngine(t, addr, "pipelining,async", "engine-A")
	stranger := dialEngine(t, addr, "pipelining,async", "engine-B")
	// A connection joins its engine just after its AGENT-HELLO is out.
	waitFor(t, func() bool { return a.engines.lookup("engine-A") == 2 }, "both joined engine-A")

	origin.send(notifyNamed("slow", 77, 3))
	<-g.started
	origin.nc.Close()
	waitFor(t, func() bool { return a.engines.lookup("engine-A") == 1 }, "origin left its engine")
	close(g.release)
	f := sibling.next()
	assert.Equal(t, frameAck, f.typ)
	assert.Equal(t, uint64(77), f.streamID)
	assert.Equal(t, uint64(3), f.frameID)
	waitFor(t, func() bool { return a.Stats().ACKsRerouted == 1 }, "the ACK counted as rerouted")

	stranger.send(notifyNamed("quick", 5, 1))
	f = stranger.next()
	assert.Equal(t, uint64(5), f.streamID, "the other engine saw nothing of engine-A's ACK")
}

// TestNoRerouteWithoutAsync: without async the ACK of a dead connection is
// dropped, not sent on another connection.
func TestNoRerouteWithoutAsync(t *testing.T) {
	a, g, addr := gatedAgent(t)
	origin := dialEngine(t, addr, "pipelining", "engine-A")
	sibling := dialEngine(t, addr, "pipelining", "engine-A")
	origin.send(notifyNamed("slow", 77, 3))
	<-g.started
	origin.nc.Close()
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 1 }, "origin closed")
	close(g.release)
	waitFor(t, func() bool { return a.Stats().ACKsDropped == 1 }, "the ACK dropped")
	sibling.send(notifyNamed("quick", 5, 1))
	assert.Equal(t, uint64(5), sibling.next().streamID, "first frame on the sibling is its own ACK")
}

// TestContextCancelledOnDrop: a handler's context ends when its connection
// drops.
func TestContextCancelledOnDrop(t *testing.T) {
	done := make(chan error, 1)
	started := make(chan struct{})
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		ctx := r.Context()
		close(started)
		<-ctx.Done()
		done <- ctx.Err()
		return nil
	})}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	p.send(notifyNamed("m", 1, 1))
	<-started
	p.nc.Close()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.Canceled)
	case <-time.After(10 * time.Second):
		t.Fatal("context not cancelled")
	}
}

func TestShutdownGraceful(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		msgs := r.Messages()
		msgs.Next()
		if msgs.NameIs("slow") {
			started <- struct{}{}
			<-release
		}
		return w.SetBool(VarScopeTransaction, "done", true)
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	a.Logger, _ = test.NewNullLogger()
	served := make(chan error, 1)
	go func() { served <- a.Serve(l) }()

	busy := dialRaw(t, l.Addr().String())
	busy.hello("pipelining", "e", 16380)
	idle := dialRaw(t, l.Addr().String())
	idle.hello("pipelining", "e", 16380)
	busy.send(notifyNamed("slow", 1, 1))
	<-started

	shut := make(chan error, 1)
	go func() { shut <- a.Shutdown(context.Background()) }()
	select {
	case err := <-served:
		assert.ErrorIs(t, err, ErrAgentClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	idle.expectDisconnect(StatusNormal)
	select {
	case <-shut:
		t.Fatal("Shutdown returned with a handler running")
	default:
	}
	close(release)
	f := busy.next()
	require.Equal(t, frameAck, f.typ, "the running handler's ACK goes out")
	actions, err := decodeActions(f.payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "done", Scope: VarScopeTransaction, Value: true}}, actions)
	busy.expectDisconnect(StatusNormal)
	select {
	case err := <-shut:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return")
	}
	_, err = net.DialTimeout("tcp", l.Addr().String(), time.Second)
	assert.Error(t, err, "listener closed")
	assert.ErrorIs(t, a.ListenAndServe("127.0.0.1:0"), ErrAgentClosed)
}

func TestShutdownDeadline(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{}, 1)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		started <- struct{}{}
		<-release
		return nil
	})}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	p.send(notifyNamed("m", 1, 1))
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, a.Shutdown(ctx), context.DeadlineExceeded)
	require.NoError(t, a.Close())
	p.expectClosed()
}

func TestReadTimeout(t *testing.T) {
	a := &Agent{ReadTimeout: 100 * time.Millisecond}
	addr := startAgent(t, a)
	// No HELLO at all: closed without a frame (HAProxy 3.x takes any first
	// frame but AGENT-HELLO as invalid).
	p := dialRaw(t, addr)
	start := time.Now()
	_ = p.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, p.nc)
	assert.True(t, err == nil || isNormalEnd(err), "%v", err)
	assert.Zero(t, n)
	assert.GreaterOrEqual(t, time.Since(start), 80*time.Millisecond)
	// Half a frame after the handshake.
	p = dialRaw(t, addr)
	p.hello("pipelining", "e", 16380)
	p.send([]byte{0, 0, 0, 20, 3})
	p.expectDisconnect(StatusTimeout)
}

func TestIdleTimeout(t *testing.T) {
	a := &Agent{IdleTimeout: 100 * time.Millisecond}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	start := time.Now()
	p.expectDisconnect(StatusTimeout)
	assert.GreaterOrEqual(t, time.Since(start), 80*time.Millisecond)
}

func TestUnixSocket(t *testing.T) {
	path := t.TempDir() + "/agent.sock"
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	a := New(seedHandler)
	a.Logger, _ = test.NewNullLogger()
	served := make(chan error, 1)
	go func() { served <- a.Serve(l) }()
	ctx := notifyCtx(t)
	c, err := Dial(ctx, "unix", path, ClientConfig{})
	require.NoError(t, err)
	actions, err := c.Notify(ctx, ipRep(net.IP{10, 0, 0, 4}))
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "reputation", Scope: VarScopeSession, Value: "1"}}, actions)
	require.NoError(t, c.Close())
	require.NoError(t, a.Shutdown(ctx))
	assert.ErrorIs(t, <-served, ErrAgentClosed)
}

func TestClientClose(t *testing.T) {
	a := New(seedHandler)
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	require.NoError(t, c.Close())
	_, err := c.Notify(notifyCtx(t), ipRep(net.IP{1, 1, 1, 1}))
	assert.ErrorIs(t, err, ErrClientClosed)
	waitFor(t, func() bool { return a.Stats().DisconnectsIn[StatusNormal] == 1 }, "DISCONNECT counted")
	waitFor(t, func() bool { return a.Stats().DisconnectsOut[StatusNormal] == 1 }, "AGENT-DISCONNECT counted")
}

// TestAsyncEngineLingers: with async, an ACK whose connection closed while
// no other connection of its engine was alive waits for the next one
// HAProxy opens with that engine-id.
func TestAsyncEngineLingers(t *testing.T) {
	a, g, addr := gatedAgent(t)
	origin := dialEngine(t, addr, "pipelining,async", "engine-L")
	origin.send(notifyNamed("slow", 41, 2))
	<-g.started
	origin.nc.Close()
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "origin closed")
	close(g.release)
	waitFor(t, func() bool { return a.Stats().InFlight == 0 }, "the handler returned")
	assert.Zero(t, a.Stats().ACKsDropped, "held by the lingering engine")

	next := dialEngine(t, addr, "pipelining,async", "engine-L")
	f := next.next()
	assert.Equal(t, frameAck, f.typ)
	assert.Equal(t, uint64(41), f.streamID)
	assert.Equal(t, uint64(2), f.frameID)
	waitFor(t, func() bool { return a.Stats().ACKsRerouted == 1 }, "the ACK counted as rerouted")

	other := dialEngine(t, addr, "pipelining,async", "engine-M")
	other.send(notifyNamed("quick", 5, 1))
	assert.Equal(t, uint64(5), other.next().streamID, "the other engine saw nothing of engine-L's ACK")
	assert.Zero(t, a.Stats().HandlerPanics)
}

// TestAsyncEngineExpires: a lingering engine no connection joins goes away,
// dropping (and counting) what it held.
func TestAsyncEngineExpires(t *testing.T) {
	defer func(d time.Duration) { engineLinger = d }(engineLinger)
	engineLinger = 50 * time.Millisecond
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		started <- struct{}{}
		<-release
		return nil
	})}
	origin := dialRaw(t, startAgent(t, a))
	origin.hello("pipelining,async", "engine-X", 16380)
	origin.send(notifyNamed("slow", 1, 1))
	<-started
	origin.nc.Close()
	waitFor(t, func() bool { return a.engines.lookup("engine-X") == 0 && !a.engines.has("engine-X") }, "the engine expired")
	close(release)
	waitFor(t, func() bool { return a.Stats().ACKsDropped == 1 }, "the ACK dropped")
}

// TestOversizedNotifyFailsOneEvent: HAProxy 3.1.0 may send a NOTIFY above
// the max-frame-size the agent answered (not above its own). The agent
// answers it like a failed handler (the error variable) and skips it; the
// connection goes on. Above HAProxy's own size it is still a protocol
// error.
func TestOversizedNotifyFailsOneEvent(t *testing.T) {
	a := New(seedHandler)
	a.MaxFrameSize = 256
	p := dialRaw(t, startAgent(t, a))
	h := p.hello("pipelining", "", 16380)
	n, _ := h["max-frame-size"].Uint()
	require.Equal(t, uint64(256), n)

	big, err := appendMessages(nil, []ClientMessage{{Name: "ip-rep", Args: []Arg{
		{Name: "ip", Value: net.IP{10, 0, 0, 1}}, {Name: "pad", Value: strings.Repeat("x", 3000)}}}})
	require.NoError(t, err)
	p.send(rawFrame(frameNotify, flagFin, 3, 1, big))
	ack := p.next()
	require.Equal(t, frameAck, ack.typ)
	assert.Equal(t, uint64(3), ack.streamID)
	actions, err := decodeActions(ack.payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: DefaultErrorVar, Scope: VarScopeTransaction, Value: true}}, actions)

	small, err := appendMessages(nil, []ClientMessage{ipRep(net.IP{10, 0, 0, 3})})
	require.NoError(t, err)
	p.send(rawFrame(frameNotify, flagFin, 5, 1, small))
	ack = p.next()
	require.Equal(t, frameAck, ack.typ)
	assert.Equal(t, uint64(5), ack.streamID)
	actions, err = decodeActions(ack.payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "reputation", Scope: VarScopeSession, Value: "0.75"}}, actions)
	assert.Equal(t, uint64(1), a.Stats().NotifyTooBig)

	// Above HAProxy's own max-frame-size: the connection ends.
	p.send(rawFrame(frameNotify, flagFin, 7, 1, make([]byte, 16381)))
	p.expectDisconnect(StatusFrameTooBig)
}

// TestFragmentAbortedThenNext: what HAProxy 2.6 does after the agent's
// aborting ACK for a NOTIFY grown past maxReassembled: it fails the event
// and sends nothing more of it, not even an ABORT fragment; fragments of it
// already on their way still come, possibly amid the next NOTIFY's. The
// next NOTIFYs must be answered, the strays ignored.
func TestFragmentAbortedThenNext(t *testing.T) {
	a := New(seedHandler)
	a.MaxFrameSize = 16380
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining,async", "e1", 16380)

	chunk := make([]byte, 16000)
	p.send(rawFrame(frameNotify, 0, 1, 1, chunk))
	for i := 0; i < maxReassembled/len(chunk)+1; i++ {
		p.send(rawFrame(frameUnset, 0, 1, 1, chunk))
	}
	ack := p.next()
	require.Equal(t, frameAck, ack.typ)
	require.True(t, ack.abort(), "aborting ACK")
	assert.Equal(t, uint64(1), ack.streamID)

	small, err := appendMessages(nil, []ClientMessage{ipRep(net.IP{10, 0, 0, 3})})
	require.NoError(t, err)
	// The next NOTIFY, whole: answered.
	p.send(rawFrame(frameNotify, flagFin, 2, 1, small))
	ack = p.next()
	require.Equal(t, frameAck, ack.typ)
	assert.Equal(t, uint64(2), ack.streamID)
	assert.False(t, ack.abort())
	// Another in fragments, with a stray of the aborted one amid them.
	p.send(rawFrame(frameNotify, 0, 3, 1, small[:4]))
	p.send(rawFrame(frameUnset, 0, 1, 1, chunk))
	p.send(rawFrame(frameUnset, flagFin, 3, 1, small[4:]))
	ack = p.next()
	require.Equal(t, frameAck, ack.typ)
	assert.Equal(t, uint64(3), ack.streamID)
	actions, err := decodeActions(ack.payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "reputation", Scope: VarScopeSession, Value: "0.75"}}, actions)
	assert.Zero(t, a.Stats().ProtocolErrors)
}
