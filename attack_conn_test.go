package spoe

// Attack tests of issue 11 for what conn.go does (cases 1, 2 and 5): the
// reassembly of fragmented NOTIFYs bounded in time and in all, the ACK
// backlog of a peer that does not read bounded, and a Shutdown that ends
// under a streaming peer. Each logs what it measures. CI sizes;
// SPOE_ATTACK_FULL=1 runs the issue's.

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pollHeap polls the live heap until it is at most limit or the deadline
// passes, and returns the last measure.
func pollHeap(limit uint64, deadline time.Time) uint64 {
	for {
		h := liveHeap()
		if h <= limit || time.Now().After(deadline) {
			return h
		}
		time.Sleep(100 * time.Millisecond) // pace of the measure, not a synchronisation
	}
}

// TestAttackUnfinishedFragments (case 1): connections each start a
// fragmented NOTIFY and send fragments up to ~1,000,000 bytes, never the
// last one. Every frame is whole, so no per-frame ReadTimeout fires. The
// agent holds at most MaxReassemblyBytes (default 16 MiB) for them all,
// aborting a NOTIFY that would take more, and gives up the others at
// their deadline (ReadTimeout from the first fragment, here 1 s): each is
// answered with an aborting ACK and its connection goes on.
//
// CI: 20 connections; SPOE_ATTACK_FULL=1: 200 (SPOE_ATTACK_FRAG_CONNS).
func TestAttackUnfinishedFragments(t *testing.T) {
	n := attackSize(t, "SPOE_ATTACK_FRAG_CONNS", 20, 200)
	const total, chunk = 1000000, 16000
	a := New(seedHandler)
	a.Logger = discardLogger()
	a.ReadTimeout = time.Second
	addr := startAgent(t, a)
	base := liveHeap()
	sampled := heapSampler(20 * time.Millisecond)
	fragment := make([]byte, chunk)
	for i := range fragment {
		fragment[i] = 'x'
	}
	// One message "m" with one BINARY argument "a" of ~1 MB, split.
	head := aMessage(nil, "m")[:2]
	head = append(head, 1)
	head = astr(head, "a")
	head = avarint(append(head, 9), total)
	peers := make([]*attacker, n)
	var wg sync.WaitGroup
	for i := range peers {
		p := attack(t, addr)
		peers[i] = p
		_, err := p.handshake("pipelining", "frag", 16380)
		require.NoError(t, err)
		wg.Add(1)
		go func(p *attacker, sid uint64) {
			defer wg.Done()
			if p.send(aFrame(aNotify, 0, sid, 1, head)) != nil {
				return
			}
			for sent := 0; sent+chunk < total; sent += chunk {
				if p.send(aFrame(aUnset, 0, sid, 1, fragment)) != nil {
					return // the agent gave up on us
				}
			}
		}(p, uint64(i+1))
	}
	wg.Wait()
	sent := time.Now()
	held := liveHeap()
	// What each connection then gets: an aborting ACK, or the end.
	// While they are held: the budget, and each connection's read buffer.
	heldLimit := base + DefaultMaxReassemblyBytes + uint64(n)*(64<<10) + (8 << 20)
	var aborted, closed, open atomic.Int32
	var rg sync.WaitGroup
	for _, p := range peers {
		rg.Add(1)
		go func(p *attacker) {
			defer rg.Done()
			f, err := p.readWithin(3 * a.ReadTimeout)
			switch {
			case err != nil && isTimeout(err):
				open.Add(1)
			case err != nil:
				closed.Add(1)
			case f.typ == aAck && f.flags&aAbort != 0:
				aborted.Add(1)
			case f.typ == aAgentDisc:
				closed.Add(1)
			default:
				open.Add(1)
			}
		}(p)
	}
	rg.Wait()
	live := pollHeap(base+uint64(n)*(64<<10)+(8<<20), sent.Add(3*a.ReadTimeout))
	peak := sampled()
	t.Logf("%d unfinished fragmented NOTIFYs of ~%d bytes: live heap %s before, %s once sent, %s %v later (%+.1f MiB, %.0f KiB per connection); sampled peak heap %s; peak RSS %s; %d aborted, %d closed, %d still open",
		n, total, mib(base), mib(held), mib(live), time.Since(sent).Round(time.Millisecond),
		float64(int64(live)-int64(base))/(1<<20), float64(int64(live)-int64(base))/1024/float64(n), mib(peak), mib(peakRSS()),
		aborted.Load(), closed.Load(), open.Load())
	assert.Equal(t, int32(n), aborted.Load(), "every unfinished NOTIFY answered with an aborting ACK within the deadline")
	assert.LessOrEqual(t, held, heldLimit, "reassemblies bounded in all by MaxReassemblyBytes")
	assert.LessOrEqual(t, live, base+uint64(n)*(64<<10)+(8<<20), "their buffers let go")
	st := a.Stats()
	assert.Equal(t, uint64(n), st.NotifyTooBig+st.NotifyTimeouts, "each counted once: %d over the budget, %d timed out", st.NotifyTooBig, st.NotifyTimeouts)
	assert.Positive(t, st.NotifyTimeouts, "some waited for their deadline")
	if n*total > DefaultMaxReassemblyBytes {
		assert.Positive(t, st.NotifyTooBig, "some were over the budget")
	}
	// The connections go on: a whole NOTIFY is answered as usual.
	for i, p := range peers {
		sid := uint64(n + i + 1)
		require.NoError(t, p.send(aFrame(aNotify, aFin, sid, 1, aMessage(nil, "m"))))
		f, err := p.read()
		require.NoError(t, err)
		assert.Equal(t, byte(aAck), f.typ)
		assert.Equal(t, sid, f.sid)
		assert.Zero(t, f.flags&aAbort, "not aborted")
	}
	assert.Zero(t, a.reassemblies.used.Load(), "the budget all given back")
}

// TestAttackIdleAfterFragments (case 1, related): connections each send a
// complete 50 KB fragmented NOTIFY, read its ACK, then stay idle. An idle
// connection must hold no reassembly buffer: about what the same NOTIFY
// sent whole costs (~1.7 KiB a connection), not 57 KiB.
//
// CI: 200 connections; SPOE_ATTACK_FULL=1: 2,000 (SPOE_ATTACK_IDLE_CONNS).
func TestAttackIdleAfterFragments(t *testing.T) {
	n := attackSize(t, "SPOE_ATTACK_IDLE_CONNS", 200, 2000)
	a := New(seedHandler)
	a.Logger = discardLogger()
	addr := startAgent(t, a)
	value := make([]byte, 50000)
	for i := range value {
		value[i] = 'v'
	}
	payload := aMessage(nil, "m", "a", string(value))
	const chunk = 16000
	measure := func(fragmented bool) float64 {
		base := liveHeap()
		peers := make([]*attacker, n)
		for i := range peers {
			p := attack(t, addr)
			peers[i] = p
			_, err := p.handshake("pipelining", "idle", 65536)
			require.NoError(t, err)
			if fragmented {
				var b []byte
				for off := 0; off < len(payload); off += chunk {
					end, flags, typ := off+chunk, uint32(0), byte(aUnset)
					if end >= len(payload) {
						end, flags = len(payload), aFin
					}
					if off == 0 {
						typ = aNotify
					}
					b = append(b, aFrame(typ, flags, 1, 1, payload[off:end])...)
				}
				require.NoError(t, p.send(b))
			} else {
				require.NoError(t, p.send(aFrame(aNotify, aFin, 1, 1, payload)))
			}
			f, err := p.read()
			require.NoError(t, err)
			require.Equal(t, byte(aAck), f.typ)
		}
		live := liveHeap()
		perConn := float64(int64(live)-int64(base)) / float64(n)
		t.Logf("%d idle connections after a %d-byte NOTIFY (fragmented: %v): live heap %s -> %s, %.0f bytes per connection; peak RSS %s",
			n, len(payload), fragmented, mib(base), mib(live), perConn, mib(peakRSS()))
		for _, p := range peers {
			p.close()
		}
		waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "closed")
		return perConn
	}
	whole := measure(false)
	fragmented := measure(true)
	// The reassembly buffer of a 50 KB NOTIFY is 64 KiB: a margin of 16
	// KiB (the race detector's pools keep less) still tells it.
	assert.Less(t, fragmented, whole+16<<10, "an idle connection keeps no reassembly buffer")
}

// TestAttackACKBacklog (case 2): connections pipeline NOTIFYs to a 1 ms
// handler (so frames are dispatched to goroutines) that answers a 200-byte
// variable, and never read their ACKs (the kernel's socket buffers, some
// MiB a connection on loopback, take the first ones). The agent holds at
// most MaxACKBacklog of ACKs per connection (plus one run) and
// MaxACKBacklogTotal in all, and stops reading those connections
// (back-pressure) rather than buffer.
//
// CI: 4 connections for 3 s; SPOE_ATTACK_FULL=1: 16 for 10 s
// (SPOE_ATTACK_BACKLOG_CONNS, SPOE_ATTACK_BACKLOG_SECONDS).
func TestAttackACKBacklog(t *testing.T) {
	t.Run("per connection", func(t *testing.T) { testACKBacklog(t, 0) })
	// A total below what the connections would hold each: the agent's
	// bound is the one reached.
	t.Run("per agent", func(t *testing.T) { testACKBacklog(t, 64<<10) })
}

func testACKBacklog(t *testing.T, total int) {
	n := attackSize(t, "SPOE_ATTACK_BACKLOG_CONNS", 4, 16)
	secs := attackSize(t, "SPOE_ATTACK_BACKLOG_SECONDS", 3, 10)
	answer := string(make([]byte, 200))
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		time.Sleep(time.Millisecond) // a slow handler, the 1 ms
		return w.SetString(VarScopeTransaction, "answer", answer)
	}), Logger: discardLogger()}
	a.Logger = discardLogger()
	a.WriteTimeout = time.Hour // what is measured is the backlog, not its reset
	a.MaxACKBacklogTotal = total
	addr := startAgent(t, a)
	base := liveHeap()
	sampled := heapSampler(20 * time.Millisecond)
	// The most ACK bytes held pending, sampled.
	var backlog atomic.Int64
	stopSampling := make(chan struct{})
	sampling := make(chan struct{})
	go func() {
		defer close(sampling)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
			if b := a.backlog.used.Load(); b > backlog.Load() {
				backlog.Store(b)
			}
		}
	}()
	notify := aFrame(aNotify, aFin, 1, 1, aMessage(nil, "m", "a", "0123456789"))
	batch := make([]byte, 0, 64*len(notify))
	for i := 0; i < 64; i++ {
		batch = append(batch, notify...)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sentBytes atomic.Int64
	for i := 0; i < n; i++ {
		p := attack(t, addr)
		_, err := p.handshake("pipelining", "flood", 16380)
		require.NoError(t, err)
		wg.Add(1)
		go func(p *attacker) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = p.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				k, _ := p.nc.Write(batch)
				sentBytes.Add(int64(k))
			}
		}(p)
	}
	var samples []uint64
	var handled []uint64
	start := time.Now()
	for time.Since(start) < time.Duration(secs)*time.Second {
		time.Sleep(time.Second) // the pace of the samples
		samples = append(samples, liveHeap())
		handled = append(handled, a.Stats().FramesIn.Notify)
	}
	close(stop)
	wg.Wait()
	close(stopSampling)
	<-sampling
	peak := sampled()
	live := samples[len(samples)-1]
	grown := float64(int64(live)-int64(base)) / (1 << 20)
	t.Logf("%d connections pipelining and never reading, %v: %d MiB of NOTIFYs sent, handled by the second %v; live heap per second %v; %s -> %s (%+.1f MiB, %.1f MiB/s); most ACK bytes pending %d; sampled peak heap %s; peak RSS %s",
		n, time.Since(start).Round(time.Millisecond), sentBytes.Load()>>20, handled,
		mibs(samples), mib(base), mib(live), grown, grown/time.Since(start).Seconds(), backlog.Load(), mib(peak), mib(peakRSS()))
	// Pending and being written from pending: MaxACKBacklog and one run
	// of ACKs (one ACK here: the handlers are dispatched) a connection,
	// twice; or the total, strictly.
	limit := int64(n) * 2 * (DefaultMaxACKBacklog + 1024)
	if total > 0 {
		limit = int64(total)
	}
	assert.LessOrEqual(t, backlog.Load(), limit, "ACK backlog bounded")
	// What the connections hold: their backlog, being written or pending
	// (2 × MaxACKBacklog), and their handlers waiting to hand an ACK
	// over (MaxInFlightPerConn, with a goroutine and an exchange each).
	assert.Less(t, live-base, uint64(n)*(2*DefaultMaxACKBacklog+DefaultMaxInFlightPerConn*(16<<10))+(4<<20), "memory bounded")
}

func mibs(s []uint64) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = mib(v)
	}
	return out
}

// TestAttackShutdownStreaming (case 5): two connections stream NOTIFYs and
// read their ACKs; Shutdown must stop taking new NOTIFYs promptly, let
// the running handlers finish, tell HAProxy with AGENT-DISCONNECT, and
// return once those are done, whatever the peers keep sending.
func TestAttackShutdownStreaming(t *testing.T) {
	a := New(seedHandler)
	a.Logger = discardLogger()
	addr := startAgent(t, a)
	notify := aFrame(aNotify, aFin, 1, 1, aMessage(nil, "ip-rep", "ip", "x"))
	batch := make([]byte, 0, 20*len(notify))
	for i := 0; i < 20; i++ {
		batch = append(batch, notify...)
	}
	var acks, disconnects, late atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		p := attack(t, addr)
		_, err := p.handshake("pipelining", "stream", 16380)
		require.NoError(t, err)
		wg.Add(2)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if p.send(batch) != nil {
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			closed := false
			for {
				f, err := p.read()
				if err != nil {
					return
				}
				switch f.typ {
				case aAck:
					acks.Add(1)
					if closed {
						late.Add(1)
					}
				case aAgentDisc:
					disconnects.Add(1)
					closed = true
				}
			}
		}()
	}
	waitFor(t, func() bool { return acks.Load() > 1000 }, "streaming")
	before := acks.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err := a.Shutdown(ctx)
	took := time.Since(start)
	after := acks.Load() - before
	close(stop)
	_ = a.Close()
	wg.Wait()
	t.Logf("Shutdown under 2 streaming peers: returned %v after %v; %d ACKs after it was called; %d AGENT-DISCONNECTs", err, took.Round(time.Millisecond), after, disconnects.Load())
	assert.NoError(t, err, "Shutdown returned before its deadline")
	assert.Less(t, took, time.Second, "Shutdown ends within what the running handlers need")
	assert.Equal(t, int64(2), disconnects.Load(), "AGENT-DISCONNECT on each connection")
	assert.Zero(t, late.Load(), "no ACK after AGENT-DISCONNECT")
	assert.Zero(t, a.backlog.used.Load())
}

// TestShutdownStreamingWithRunningHandler: one connection's handler is
// running when Shutdown is called while another connection streams
// NOTIFYs. The streaming one gets its AGENT-DISCONNECT at once; Shutdown
// returns once the running handler is done, after its ACK and then an
// AGENT-DISCONNECT went out on its connection.
func TestShutdownStreamingWithRunningHandler(t *testing.T) {
	started, release := make(chan struct{}), make(chan struct{})
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		if _, ok := r.Message("slow"); ok {
			close(started)
			<-release
			return w.SetInt(VarScopeTransaction, "slow", 1)
		}
		return nil
	}), Logger: discardLogger()}
	addr := startAgent(t, a)

	slow := attack(t, addr)
	_, err := slow.handshake("pipelining", "slow", 16380)
	require.NoError(t, err)
	require.NoError(t, slow.send(aFrame(aNotify, aFin, 7, 1, aMessage(nil, "slow"))))
	<-started

	stream := attack(t, addr)
	_, err = stream.handshake("pipelining", "stream", 16380)
	require.NoError(t, err)
	notify := aFrame(aNotify, aFin, 1, 1, aMessage(nil, "fast"))
	batch := make([]byte, 0, 20*len(notify))
	for i := 0; i < 20; i++ {
		batch = append(batch, notify...)
	}
	stop := make(chan struct{})
	var sending sync.WaitGroup
	sending.Add(1)
	go func() {
		defer sending.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if stream.send(batch) != nil {
				return
			}
		}
	}()
	defer func() { close(stop); stream.close(); sending.Wait() }()
	// Streaming, answered.
	for i := 0; i < 100; i++ {
		f, err := stream.read()
		require.NoError(t, err)
		require.Equal(t, byte(aAck), f.typ)
	}

	shut := make(chan error, 1)
	go func() { shut <- a.Shutdown(context.Background()) }()
	// The streaming connection: its AGENT-DISCONNECT comes while the slow
	// handler still runs.
	for {
		f, err := stream.read()
		require.NoError(t, err, "AGENT-DISCONNECT before the end: %v", err)
		if f.typ == aAgentDisc {
			assert.EqualValues(t, 0, f.kv()["status-code"], "status normal")
			break
		}
		require.Equal(t, byte(aAck), f.typ)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) with a handler running", err)
	default:
	}
	close(release)
	select {
	case err := <-shut:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return once the handler was done")
	}
	f, err := slow.read()
	require.NoError(t, err)
	assert.Equal(t, byte(aAck), f.typ, "the running handler's ACK delivered")
	assert.Equal(t, uint64(7), f.sid)
	f, err = slow.read()
	require.NoError(t, err)
	assert.Equal(t, byte(aAgentDisc), f.typ, "then AGENT-DISCONNECT")
}

// readWithin is read with a deadline of d.
func (p *attacker) readWithin(d time.Duration) (aFrameRead, error) {
	p.deadline = time.Now().Add(d)
	defer func() { p.deadline = time.Time{} }()
	return p.read()
}
