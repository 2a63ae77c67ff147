package spoe

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blockingAgent returns an agent whose handler blocks until release is
// closed, and the number of handlers running at once, now and at most.
func blockingAgent(a *Agent, release <-chan struct{}) (running, peak *atomic.Int64) {
	running, peak = new(atomic.Int64), new(atomic.Int64)
	a.Handler = HandlerFunc(func(w *ActionWriter, r *Request) error {
		n := running.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-release
		running.Add(-1)
		return w.SetInt(VarScopeTransaction, "sid", int64(r.StreamID()))
	})
	return running, peak
}

// noFrameWithin reports that nothing arrives from the agent for d: the
// absence of an answer, checked over a window.
func noFrameWithin(t *testing.T, p *rawPeer, d time.Duration) {
	t.Helper()
	_ = p.nc.SetReadDeadline(time.Now().Add(d))
	var b [1]byte
	_, err := p.nc.Read(b[:])
	require.True(t, isTimeout(err), "expected nothing from the agent, got %v", err)
}

func TestMaxInFlightPerConn(t *testing.T) {
	release := make(chan struct{})
	a := &Agent{MaxInFlightPerConn: 4}
	running, peak := blockingAgent(a, release)
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	payload, _ := appendMessages(nil, []ClientMessage{{Name: "m"}})
	var batch []byte
	for sid := uint64(1); sid <= 10; sid++ {
		batch = append(batch, rawFrame(frameNotify, flagFin, sid, 1, payload)...)
	}
	p.send(batch)
	waitFor(t, func() bool { return running.Load() == 4 }, "4 handlers running")
	noFrameWithin(t, p, 200*time.Millisecond)
	assert.Equal(t, int64(4), running.Load(), "the connection stopped reading at its limit")
	close(release)
	for i := 0; i < 10; i++ {
		assert.Equal(t, frameAck, p.next().typ)
	}
	assert.Equal(t, int64(4), peak.Load())
}

func TestMaxInFlightPerAgent(t *testing.T) {
	release := make(chan struct{})
	a := &Agent{MaxInFlight: 5}
	running, peak := blockingAgent(a, release)
	addr := startAgent(t, a)
	payload, _ := appendMessages(nil, []ClientMessage{{Name: "m"}})
	var peers []*rawPeer
	for c := 0; c < 3; c++ {
		p := dialEngine(t, addr, "pipelining", "e")
		var batch []byte
		for sid := uint64(1); sid <= 4; sid++ {
			batch = append(batch, rawFrame(frameNotify, flagFin, sid, 1, payload)...)
		}
		p.send(batch)
		peers = append(peers, p)
	}
	waitFor(t, func() bool { return running.Load() == 5 }, "5 handlers running")
	noFrameWithin(t, peers[0], 200*time.Millisecond)
	assert.Equal(t, int64(5), running.Load(), "no handler past the agent's limit")
	assert.Equal(t, int64(5), a.Stats().InFlight)
	close(release)
	for _, p := range peers {
		for i := 0; i < 4; i++ {
			assert.Equal(t, frameAck, p.next().typ)
		}
	}
	assert.Equal(t, int64(5), peak.Load())
}

func TestMaxConns(t *testing.T) {
	a := &Agent{MaxConns: 2}
	addr := startAgent(t, a)
	first := dialEngine(t, addr, "pipelining", "e")
	dialEngine(t, addr, "pipelining", "e") // the second connection: the agent is full
	third := dialRaw(t, addr)              // waits in the listen backlog
	third.send(rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(
		"supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "")))
	noFrameWithin(t, third, 200*time.Millisecond)
	assert.Equal(t, int64(2), a.Stats().ConnsOpen)
	first.nc.Close()
	assert.Equal(t, frameAgentHello, third.next().typ, "accepted once a connection ended")
	assert.Equal(t, int64(2), a.Stats().ConnsOpen)
}

// TestFloodAtBlockedHandlers: many connections flood NOTIFYs at handlers
// that block. Goroutines stay under connections + MaxInFlight and memory
// stays bounded: the connections stop reading, TCP pushes back.
func TestFloodAtBlockedHandlers(t *testing.T) {
	const conns, maxInFlight = 50, 100
	release := make(chan struct{})
	a := &Agent{MaxInFlight: maxInFlight}
	running, peak := blockingAgent(a, release)
	addr := startAgent(t, a)
	payload, _ := appendMessages(nil, []ClientMessage{heavyMessage})
	var batch []byte
	for sid := uint64(1); sid <= 200; sid++ {
		batch = append(batch, rawFrame(frameNotify, flagFin, sid, 1, payload)...)
	}
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	baseGoroutines := runtime.NumGoroutine()

	var wg sync.WaitGroup
	peers := make([]*rawPeer, conns)
	for i := range peers {
		peers[i] = dialRaw(t, addr)
		peers[i].hello("pipelining", "e", 16380)
		wg.Add(1)
		go func(p *rawPeer) { // floods until TCP pushes back, then gives up
			defer wg.Done()
			_ = p.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
			for i := 0; i < 50; i++ {
				if _, err := p.nc.Write(batch); err != nil {
					return
				}
			}
		}(peers[i])
	}
	waitFor(t, func() bool { return running.Load() == maxInFlight }, "the agent's limit reached")
	wg.Wait() // every flooder blocked and gave up: the agent reads no more
	goroutines := runtime.NumGoroutine() - baseGoroutines
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d connections flooding, %d handlers blocked: +%d goroutines, heap +%d KiB", conns, maxInFlight, goroutines, heap/1024)
	assert.Equal(t, int64(maxInFlight), peak.Load(), "never more handlers than MaxInFlight")
	// One loop per connection, the handlers that outlived their budget,
	// and a few timer goroutines.
	assert.LessOrEqual(t, goroutines, conns+maxInFlight+10)
	// Each connection holds at most its read buffer and a frame being
	// handled; far from the 50 x 50 x 200 frames sent.
	assert.Less(t, heap, int64(conns*256<<10), "heap growth")
	close(release)
}

// TestLateHandlerNeverWritesElsewhere: a handler that returns after its
// connection died drops its ACK; it does not reach a newer connection,
// even one that got the same file descriptor.
func TestLateHandlerNeverWritesElsewhere(t *testing.T) {
	a, g, addr := gatedAgent(t)
	old := dialEngine(t, addr, "pipelining", "engine")
	old.send(notifyNamed("slow", 1, 1))
	<-g.started
	old.nc.Close()
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "the old connection closed")

	fresh := dialEngine(t, addr, "pipelining", "engine")
	close(g.release)
	waitFor(t, func() bool { return a.Stats().ACKsDropped == 1 }, "the late ACK dropped")
	fresh.send(notifyNamed("quick", 2, 1))
	f := fresh.next()
	assert.Equal(t, uint64(2), f.streamID, "the first frame on the new connection is its own ACK")
}
