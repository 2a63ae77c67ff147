package spoe

import (
	"bytes"
	"context"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRescueIgnoresRescuingState: a timer firing that finds a rescue under
// way never starts a second one (two goroutines would run the loop).
func TestRescueIgnoresRescuingState(t *testing.T) {
	a := &Agent{}
	c := testConn(a, nil)
	c.watch.timer = time.AfterFunc(time.Hour, func() {})
	defer c.watch.timer.Stop()
	c.watch.armed.Store(true)
	s := uint64(7*stateSeq) | stateInline | stateRescuing
	c.watch.state.Store(s)
	c.watch.lastSeen.Store(s)
	c.rescue()
	assert.Equal(t, s, c.watch.state.Load(), "state untouched")
	assert.Zero(t, a.stats.rescues.Load())
}

// TestTimerStopsWithTheConnection: a connection that ends in the middle of
// a batch leaves no rescue timer firing behind.
func TestTimerStopsWithTheConnection(t *testing.T) {
	a := New(seedHandler)
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	var c *conn
	a.mu.Lock()
	for c = range a.conns {
	}
	a.mu.Unlock()
	require.NotNil(t, c)
	payload, _ := appendMessages(nil, []ClientMessage{ipRep(net.IP{1, 2, 3, 4})})
	bad := []byte{0, 0, 0, 3, 1, 2, 3} // too short a frame, right behind a NOTIFY
	p.send(append(rawFrame(frameNotify, flagFin, 1, 1, payload), bad...))
	assert.Equal(t, frameAck, p.next().typ)
	p.expectDisconnect(StatusInvalidFrame)
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "closed")
	waitFor(t, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.conns) == 0
	}, "forgotten")
	require.NotNil(t, c.watch.timer, "the NOTIFY ran inline, under the timer")
	assert.False(t, c.watch.armed.Load())
	// A timer left running would be pending (it re-arms every 50 µs):
	// Stop would find it so.
	assert.False(t, c.watch.timer.Stop(), "the timer is stopped")
}

// TestReadTimeoutBusyConnection: a connection whose every read ends in the
// middle of a frame is busy, not slow: ReadTimeout runs per frame.
func TestReadTimeoutBusyConnection(t *testing.T) {
	a := &Agent{ReadTimeout: 150 * time.Millisecond, Handler: fastHandler}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	payload, _ := appendMessages(nil, []ClientMessage{heavyMessage})
	frame := rawFrame(frameNotify, flagFin, 1, 1, payload)
	half := len(frame) / 2
	var acks atomic.Int64
	stopped := make(chan error, 1)
	go func() {
		for {
			f, err := p.tryNext()
			if err != nil || f.typ != frameAck {
				stopped <- err
				return
			}
			acks.Add(1)
		}
	}()
	// Three frames and a half every 5 ms for 4 ReadTimeouts: each read ends
	// inside a frame, and each frame completes within 5 ms.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	chunk := append(append(append([]byte{}, frame[half:]...), bytes.Repeat(frame, 2)...), frame[:half]...)
	p.send(frame[:half])
	sent := 0
	for end := time.Now().Add(4 * a.ReadTimeout); time.Now().Before(end); sent += 3 {
		<-tick.C
		p.send(chunk)
	}
	p.send(frame[half:])
	sent++
	waitFor(t, func() bool { return acks.Load() == int64(sent) || len(stopped) > 0 }, "every ACK")
	require.Empty(t, stopped, "the connection was closed")
	assert.Zero(t, a.Stats().DisconnectsOut[StatusTimeout])
}

// scriptedConn is a net.Conn for the write side: its writes wait for
// release, then write `accept` bytes and fail, or (accept < 0) succeed.
type scriptedConn struct {
	release chan struct{}
	accept  int
	mu      sync.Mutex
	got     []byte
	writes  int
}

func (s *scriptedConn) Write(b []byte) (int, error) {
	if s.release != nil {
		<-s.release
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	if s.accept < 0 {
		s.got = append(s.got, b...)
		return len(b), nil
	}
	n := s.accept
	if n > len(b) {
		n = len(b)
	}
	s.got = append(s.got, b[:n]...)
	return n, net.ErrClosed
}

func (s *scriptedConn) received() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.got...)
}

func (s *scriptedConn) Read([]byte) (int, error)         { return 0, net.ErrClosed }
func (s *scriptedConn) Close() error                     { return nil }
func (s *scriptedConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (s *scriptedConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (s *scriptedConn) SetDeadline(time.Time) error      { return nil }
func (s *scriptedConn) SetReadDeadline(time.Time) error  { return nil }
func (s *scriptedConn) SetWriteDeadline(time.Time) error { return nil }

// TestFailedWriteHandsOver: when a combined write fails, the frames it had
// not written, its own and those other goroutines queued behind it, go to
// the engine once each; only ACKs, never an AGENT-DISCONNECT; and a caller
// whose frames were taken does not reroute them again.
func TestFailedWriteHandsOver(t *testing.T) {
	a := &Agent{}
	a.Logger, _ = test.NewNullLogger()
	defer a.Close()
	failing := &scriptedConn{release: make(chan struct{}), accept: 5}
	sibling := &scriptedConn{accept: -1}
	c := testConn(a, failing)
	c.caps = capAsync
	c2 := testConn(a, sibling)
	c2.caps = capAsync
	a.engines.join("e", c)
	a.engines.join("e", c2)

	first := make(chan error, 1)
	go func() { first <- c.write(ackFrame(1), false) }()
	waitFor(t, c.isWriting, "the first write under way")
	require.NoError(t, c.write(ackFrame(2), false), "queued behind it")
	require.NoError(t, c.write(appendDisconnect(nil, frameAgentDisconnect, StatusNormal, ""), true), "queued as the last frame")
	close(failing.release)

	var we *writeError
	require.ErrorAs(t, <-first, &we, "taken, then failed")
	assert.ErrorIs(t, c.write(ackFrame(3), false), errWriteClosed, "nothing is taken after a failure")
	waitFor(t, func() bool { return countFrames(sibling.received()) == 2 }, "both ACKs on the sibling")
	got := sibling.received()
	assert.Equal(t, append(ackFrame(1), ackFrame(2)...), got, "the ACKs once each, no AGENT-DISCONNECT")
	assert.Equal(t, ackFrame(1)[:5], failing.received(), "the first 5 bytes did go")
}

func ackFrame(sid uint64) []byte { return rawFrame(frameAck, flagFin, sid, 1, nil) }

// TestNoACKAfterOwnDisconnect: once the agent answered HAProxy's
// DISCONNECT, a handler finishing on that connection does not write there:
// its ACK goes to a sibling of the engine.
func TestNoACKAfterOwnDisconnect(t *testing.T) {
	a, g, addr := gatedAgent(t)
	origin := dialEngine(t, addr, "pipelining,async", "engine-D")
	sibling := dialEngine(t, addr, "pipelining,async", "engine-D")
	origin.send(notifyNamed("slow", 9, 1))
	<-g.started
	waitFor(t, func() bool { return a.Stats().Rescues == 1 }, "the handler left to run on its own")
	origin.send(rawFrame(frameHAProxyDisconnect, flagFin, 0, 0, helloPayload("status-code", uint32(0), "message", "normal")))
	f := origin.next()
	require.Equal(t, frameAgentDisconnect, f.typ)
	close(g.release)
	ack := sibling.next()
	assert.Equal(t, frameAck, ack.typ)
	assert.Equal(t, uint64(9), ack.streamID)
	origin.expectClosed() // and nothing after the AGENT-DISCONNECT
}

// TestClaimedLengthBounded: peers that announce big frames and send
// little make the agent hold at most MaxBufferBytes for them all: a reader
// takes a whole frame's buffer once its LENGTH is read, and those that find
// the budget spent wait without a buffer.
func TestClaimedLengthBounded(t *testing.T) {
	const conns = 50
	a := New(seedHandler)
	a.MaxBufferBytes = 8 << 20 // 8 frames of 1 MiB
	addr := startAgent(t, a)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	peers := make([]*rawPeer, conns)
	for i := range peers {
		peers[i] = dialRaw(t, addr)
		peers[i].hello("pipelining", "e", 1<<20) // before the budget is spent: a HELLO waits too
	}
	for _, p := range peers {
		p.send(append([]byte{0, 0x0F, 0xFF, 0xF0}, bytes.Repeat([]byte{3}, 100)...)) // a 1 MiB frame begins
	}
	// At most 4 readers hold a frame's buffer; the others wait, with
	// their first buffer (32 KiB) or none.
	// At most 8 readers hold a frame's buffer (1 MiB); the others wait,
	// with their first buffer (32 KiB) or none.
	waitFor(t, func() bool { return a.buffers.waiting.Load() >= conns-8 }, "the frames waiting for the budget")
	assert.LessOrEqual(t, a.buffers.used.Load(), int64(a.MaxBufferBytes))
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d connections each announcing a 1 MiB frame: heap +%d KiB", conns, grown/1024)
	assert.Less(t, grown, int64(a.MaxBufferBytes+conns*64<<10), "within MaxBufferBytes")
}

// TestServeReturnsAtShutdownWhenFull: with MaxConns reached, Serve returns
// at once on Shutdown, not when a connection frees a slot.
func TestServeReturnsAtShutdownWhenFull(t *testing.T) {
	release := make(chan struct{})
	a := &Agent{MaxConns: 1}
	running, _ := blockingAgent(a, release)
	a.Logger, _ = test.NewNullLogger()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	a.keepPipelining = true // the Client offers what 3.1+ does (see startAgent)
	go func() { served <- a.Serve(l) }()
	p := dialRaw(t, l.Addr().String())
	p.hello("pipelining", "e", 16380)
	p.send(notifyNamed("m", 1, 1))
	waitFor(t, func() bool { return running.Load() == 1 }, "the handler running")

	shut := make(chan error, 1)
	go func() { shut <- a.Shutdown(context.Background()) }()
	select {
	case err := <-served:
		assert.ErrorIs(t, err, ErrAgentClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	close(release)
	assert.Equal(t, frameAck, p.next().typ)
	p.expectDisconnect(StatusNormal)
	require.NoError(t, <-shut)
}

// TestSlowShare: one slow call in a hundred keeps handlers inline (it is
// rescued); one in ten sends frames to goroutines of their own.
func TestSlowShare(t *testing.T) {
	for _, tc := range []struct {
		every int
		slow  bool
	}{{100, false}, {20, false}, {10, true}, {2, true}} {
		var s scheduler
		for i := 1; i <= 2000; i++ {
			d := time.Microsecond
			if i%tc.every == 0 {
				d = 20 * time.Millisecond
			}
			s.observe(d)
		}
		assert.Equal(t, tc.slow, s.slow(), "one slow call in %d", tc.every)
	}
}

// TestSlowHandlersDispatched: once handlers are known to be slow, frames
// are given goroutines of their own at once: they run together without
// waiting to be rescued one by one.
func TestSlowHandlersDispatched(t *testing.T) {
	const n = 10
	var running sync.WaitGroup
	running.Add(n)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		running.Done()
		running.Wait()
		return w.SetInt(VarScopeTransaction, "sid", int64(r.StreamID()))
	})}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	a.sched.slowShare.Store(1 << 16) // as if the last calls were all slow
	payload, _ := appendMessages(nil, []ClientMessage{{Name: "m"}})
	var batch []byte
	for sid := uint64(1); sid <= n; sid++ {
		batch = append(batch, rawFrame(frameNotify, flagFin, sid, 1, payload)...)
	}
	p.send(batch)
	seen := map[uint64]bool{}
	for len(seen) < n {
		f := p.next()
		require.Equal(t, frameAck, f.typ)
		seen[f.streamID] = true
	}
	assert.Zero(t, a.Stats().Rescues, "none waited to be rescued")
}

// TestQuickHandlersInline: quick handlers keep running where their frame
// was read; the share of slow calls that decides stays low.
func TestQuickHandlersInline(t *testing.T) {
	a := &Agent{Handler: fastHandler}
	p := newLoadPeer(t, a, ipRepMessage, 32)
	for i := 0; i < 100; i++ {
		require.NoError(t, p.roundTripN(32))
	}
	assert.False(t, a.sched.slow())
	// A quick handler descheduled across two timer firings (a loaded
	// machine, the race detector) is rescued, harmlessly: rare, not never.
	assert.Less(t, a.Stats().Rescues, uint64(32), "of 3,200 requests")
}

// TestNoACKAfterHAProxyDisconnect: HAProxy reads nothing but the
// AGENT-DISCONNECT after its own DISCONNECT. With async, the ACKs gathered
// when it arrives go to the engine, which must not write them on the
// connection that got the DISCONNECT (it did, when that connection still
// accepted frames while the engine chose one, and counted them rerouted).
// Here the engine has no other connection: nothing may be rerouted, and
// the connection ends with the AGENT-DISCONNECT.
func TestNoACKAfterHAProxyDisconnect(t *testing.T) {
	for i := 0; i < 50; i++ {
		a := New(seedHandler)
		p := dialRaw(t, startAgent(t, a))
		p.hello("pipelining,async", "engine-N", 16380)
		var burst []byte
		for fid := uint64(1); fid <= 8; fid++ {
			burst = append(burst, notifyNamed("ip-rep", fid, fid)...)
		}
		burst = append(burst, rawFrame(frameHAProxyDisconnect, flagFin, 0, 0, helloPayload("status-code", uint32(0), "message", "normal"))...)
		p.send(burst)
		for f := p.next(); f.typ != frameAgentDisconnect; f = p.next() {
			require.Equal(t, frameAck, f.typ)
		}
		p.nc.Close()
		require.Zero(t, a.Stats().ACKsRerouted, "round %d: ACKs written on the connection HAProxy disconnected", i)
	}
}
