package spoe

// The agent-wide buffer budget (MaxBufferBytes, bufferBudget in frame.go):
// its rules, then peers that announce a big max-frame-size and leave a
// frame of it unfinished, over real sockets with the attack client.

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestBufferBudget: the budget's rules, one by one.
func TestBufferBudget(t *testing.T) {
	b := &bufferBudget{max: 100}
	require.True(t, b.tryTake(60))
	require.False(t, b.tryTake(50), "over the bound")

	// A waiter is woken when bytes are given back, and no newcomer passes
	// it meanwhile.
	got := make(chan error, 1)
	go func() { got <- b.take(50, nil, time.Time{}) }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the taker waiting")
	require.False(t, b.tryTake(10), "a newcomer does not pass a waiter")
	b.release(60)
	require.NoError(t, <-got)
	require.EqualValues(t, 50, b.used.Load())

	// Waiters are served in order: the big one first, even when a small
	// one behind it would fit.
	order := make(chan int, 2)
	go func() { require.NoError(t, b.take(90, nil, time.Time{})); order <- 90 }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the big taker waiting")
	go func() { require.NoError(t, b.take(20, nil, time.Time{})); order <- 20 }()
	waitFor(t, func() bool { return b.waiting.Load() == 2 }, "the small taker waiting")
	b.release(50)
	require.Equal(t, 90, <-order)
	require.EqualValues(t, 1, b.waiting.Load(), "the small one does not fit beside it")
	b.release(80)
	require.Equal(t, 20, <-order)
	require.EqualValues(t, 30, b.used.Load())
	b.release(20)

	// A waiter gives up, holding nothing, when stopped or at its deadline.
	stop := make(chan struct{})
	go func() { got <- b.take(95, stop, time.Time{}) }()
	// (10 held)
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the taker waiting")
	close(stop)
	require.ErrorIs(t, <-got, errDraining)
	require.ErrorIs(t, b.take(95, nil, time.Now().Add(10*time.Millisecond)), os.ErrDeadlineExceeded)
	require.Zero(t, b.waiting.Load())
	require.EqualValues(t, 10, b.used.Load())

	// A request above the bound is served once nothing else is held.
	go func() { got <- b.take(500, nil, time.Time{}) }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the huge taker waiting")
	b.release(10)
	require.NoError(t, <-got)
	b.release(500)

	// Decodings: one is let over the bound while no other holds bytes;
	// another waits for it to end.
	require.True(t, b.tryTake(100))
	b.takeDecode(30)
	require.EqualValues(t, 130, b.used.Load(), "the first decoding over the bound")
	done := make(chan struct{})
	go func() { b.takeDecode(40); close(done) }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the second decoding waiting")
	b.releaseDecode(30)
	<-done
	require.EqualValues(t, 140, b.used.Load(), "the second one, alone, over the bound")
	b.releaseDecode(40)
	b.release(100)
	require.Zero(t, b.used.Load())
	require.Zero(t, b.decodes.Load())

	// A nil budget (the Client's reader) takes anything.
	var none *bufferBudget
	require.True(t, none.tryTake(1<<30))
	require.NoError(t, none.take(1<<30, nil, time.Time{}))
	none.release(1 << 30)
}

// unfinishedFrame is the start of a NOTIFY of length bytes (LENGTH
// included in neither), fill bytes of its body, the rest never sent.
func unfinishedFrame(length, fill int) []byte {
	b := make([]byte, 4, 64)
	binary.BigEndian.PutUint32(b, uint32(length))
	b = append(b, aNotify, 0, 0, 0, aFin, 1, 1)
	return append(b, make([]byte, fill)...)
}

// budgetAttack connects n peers that announce a max-frame-size of 2 MiB
// (the agent answers MaxFrameSize, 1 MiB) and send the start of a frame
// of 1 MiB, never its end: each needs a 2 MiB buffer, so that the budget
// is spent by a few of them and the others wait for it. It returns once
// every frame start is sent and the budget spent. SPOE_ATTACK_BUDGET_FILL
// sets how much of each frame is sent (32 bytes).
func budgetAttack(t *testing.T, a *Agent, addr string, n int) []*attacker {
	fill := attackSize(t, "SPOE_ATTACK_BUDGET_FILL", 32, 32)
	peers := make([]*attacker, n)
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range peers {
		p, err := tryAttack(addr)
		require.NoError(t, err)
		peers[i] = p
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := p.handshake("pipelining", "budget", 2<<20)
			if err == nil && f.typ != aAgentHello {
				err = os.ErrInvalid
			}
			errs <- err
		}()
		if i%64 == 63 {
			wg.Wait() // the listen backlog
		}
	}
	wg.Wait()
	// Every peer handshaken first: a HELLO, too, waits for the budget.
	start := unfinishedFrame(DefaultMaxFrameSize, fill) // one for all: the client's memory is measured too
	for _, p := range peers {
		wg.Add(1)
		go func(p *attacker) {
			defer wg.Done()
			errs <- p.send(start)
		}(p)
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, p := range peers {
			p.close()
		}
	})
	for range 2 * len(peers) {
		require.NoError(t, <-errs)
	}
	holders := int(a.buffers.max / (2 << 20))
	if holders > n {
		holders = n
	}
	// At most holders readers hold a frame's buffer; the others wait, with
	// their first buffer (32 KiB) or none.
	waitFor(t, func() bool {
		return int(a.buffers.waiting.Load()) >= n-holders
	}, "the budget spent")
	return peers
}

// TestAttackBufferBudget: peers hold unfinished frames of 1 MiB. The
// buffers they make the agent hold stay within MaxBufferBytes (the
// others wait, with 4 bytes read or their first 32 KiB buffer); a well-behaved connection that comes
// meanwhile waits for the budget, and is served as soon as it is given
// back: here, when the peers close.
//
// CI: 8 peers, MaxBufferBytes 4 MiB; SPOE_ATTACK_FULL=1: 4,000 peers
// (SPOE_ATTACK_BUDGET_CONNS) and the default settings.
func TestAttackBufferBudget(t *testing.T) {
	n := attackSize(t, "SPOE_ATTACK_BUDGET_CONNS", 8, 4000)
	a := New(seedHandler)
	a.Logger = discardLogger()
	a.ReadTimeout = time.Minute // the peers end the wait, not the deadline
	if !attackFull() {
		a.MaxBufferBytes = 4 << 20
	}
	addr := startAgent(t, a)
	base := liveHeap()
	sampled := heapSampler(20 * time.Millisecond)
	start := time.Now()
	peers := budgetAttack(t, a, addr, n)
	held := liveHeap()
	used, waiting := a.buffers.used.Load(), a.buffers.waiting.Load()
	st := a.Stats()
	assert.Equal(t, used, st.BufferBytes, "in Stats")
	assert.EqualValues(t, waiting, st.BufferWaiting, "in Stats")

	good := attack(t, addr)
	require.NoError(t, good.send(aHello("pipelining", "good", 16380)))
	waitFor(t, func() bool { return a.buffers.waiting.Load() > waiting }, "the well-behaved connection waiting")
	for _, p := range peers {
		p.close()
	}
	f, err := good.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAgentHello), f.typ)
	require.NoError(t, good.send(aFrame(aNotify, aFin, 9, 1, aMessage(nil, "ip-rep", "ip", "x"))))
	f, err = good.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAck), f.typ)
	require.Equal(t, uint64(9), f.sid)
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 1 && a.buffers.used.Load() == 0 }, "the budget all given back")
	peak := sampled()

	grown := int64(held) - int64(base)
	t.Logf("%d peers holding a frame of 1 MiB unfinished, MaxBufferBytes %s: %s of buffers held, %d readers waiting; live heap %s -> %s (%+.1f MiB, %.1f KiB a peer); sampled peak heap %s; peak RSS %s; well-behaved connection served %v after the start",
		n, mib(uint64(a.buffers.max)), mib(uint64(used)), waiting, mib(base), mib(held), float64(grown)/(1<<20),
		float64(grown)/1024/float64(n), mib(peak), mib(peakRSS()), time.Since(start).Round(time.Millisecond))
	assert.LessOrEqual(t, used, a.buffers.max, "within MaxBufferBytes")
	assert.GreaterOrEqual(t, int(waiting), n-int(a.buffers.max/(2<<20)), "the others wait")
	// What a connection costs besides its buffers (connCostBound), on
	// both sides of the socket here.
	assert.Less(t, grown, a.buffers.max+int64(n)*2*connCostBound+8<<20, "live heap within the memory model")
}

// connCostBound bounds what an open connection costs the agent besides
// its buffers: its goroutine's stack, its conn and socket (measured
// ~12 KiB; README, "Memory model").
const connCostBound = 16 << 10

// TestShutdownWhileWaitingForBudget: Shutdown ends readers waiting for
// the budget, and those holding it for a frame not finished, at once.
func TestShutdownWhileWaitingForBudget(t *testing.T) {
	a := New(seedHandler)
	a.Logger = discardLogger()
	a.ReadTimeout = time.Minute
	a.MaxBufferBytes = 4 << 20
	addr := startAgent(t, a)
	budgetAttack(t, a, addr, 6)
	require.Positive(t, a.buffers.waiting.Load())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	require.NoError(t, a.Shutdown(ctx))
	took := time.Since(start)
	t.Logf("Shutdown with %d readers holding or waiting for the budget: %v", 6, took.Round(time.Millisecond))
	assert.Less(t, took, 3*lingerTimeout, "at most the linger after the last frame")
	assert.Zero(t, a.buffers.used.Load())
	assert.Zero(t, a.buffers.waiting.Load())
}

// TestTinyBufferBudgetServesAll: with a budget of one buffer for the whole
// agent, pipelining connections to a slow handler (frames that would be
// dispatched, copied, and decoded by the simple API) are all answered,
// right, and the budget is all given back: at the bound the agent waits
// or does without, it refuses nothing.
func TestTinyBufferBudgetServesAll(t *testing.T) {
	const conns, frames = 4, 40
	a := New(func(m []Message) ([]Action, error) {
		time.Sleep(100 * time.Microsecond) // slow: frames go to goroutines of their own
		v, _ := m[0].ArgInt("n")
		return []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: v}}, nil
	})
	a.Logger = discardLogger()
	a.MaxBufferBytes = 1 // one buffer at a time: a request is served when nothing is held
	addr := startAgent(t, a)
	var wg sync.WaitGroup
	for c := 0; c < conns; c++ {
		p := attack(t, addr)
		_, err := p.handshake("pipelining", "tiny", 16380)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var batch []byte
			for i := 1; i <= frames; i++ {
				msg := astr(nil, "m")
				msg = append(msg, 1)
				msg = aKVInt(msg, "n", 4, uint64(i)) // INT64
				batch = append(batch, aFrame(aNotify, aFin, uint64(i), 1, msg)...)
			}
			assert.NoError(t, p.send(batch))
			seen := map[uint64]bool{}
			for len(seen) < frames {
				f, err := p.read()
				if !assert.NoError(t, err) {
					return
				}
				assert.Equal(t, byte(aAck), f.typ)
				// set-var(1) nb-args(3) scope txn(2) name "n" INT64 sid
				assert.Equal(t, avarint([]byte{1, 3, 2, 1, 'n', 4}, f.sid), f.payload, "the ACK of NOTIFY %d", f.sid)
				seen[f.sid] = true
			}
		}()
	}
	wg.Wait()
	waitFor(t, func() bool { return a.buffers.used.Load() == 0 }, "the budget all given back")
	assert.Zero(t, a.buffers.decodes.Load())
	assert.Zero(t, a.Stats().HandlerErrors)
}

// TestPlainReaderWaitsForBudget: a reader without raw socket access (TLS,
// a pipe) holds no buffer while it waits for a frame: it reads the
// LENGTH, then waits for the budget, woken when bytes are given back, or
// ended by stop.
func TestPlainReaderWaitsForBudget(t *testing.T) {
	b := &bufferBudget{max: minBufferSize}
	require.True(t, b.tryTake(minBufferSize)) // spent
	frame := appendFrame(nil, frameNotify, flagFin, 7, 1, []byte("payload"))

	read := func() (*frameReader, net.Conn, chan error) {
		client, server := net.Pipe()
		t.Cleanup(func() { client.Close(); server.Close() })
		rd := &frameReader{}
		rd.init(server, 1024)
		rd.budget, rd.frameTimeout = b, time.Minute
		done := make(chan error, 1)
		go func() {
			f, err := rd.next()
			if err == nil && (f.streamID != 7 || string(f.payload) != "payload") {
				err = os.ErrInvalid
			}
			done <- err
		}()
		return rd, client, done
	}
	_, client, done := read()
	go func() { _, _ = client.Write(frame) }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the reader waiting with its LENGTH read")
	b.release(minBufferSize)
	require.NoError(t, <-done, "woken when the budget is given back")

	// The first reader holds the budget now, with the frame it returned.
	rd, client, done := read()
	go func() { _, _ = client.Write(frame) }()
	waitFor(t, func() bool { return b.waiting.Load() == 1 }, "the second reader waiting")
	rd.stop()
	require.ErrorIs(t, <-done, errDraining, "ended by stop")
	assert.Zero(t, b.waiting.Load())
	assert.EqualValues(t, minBufferSize, b.used.Load(), "the stopped reader holds nothing")
}
