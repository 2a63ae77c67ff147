package spoe

// Handler scheduling: where a NOTIFY's handler runs, and how many run at
// once. The whole policy is in this file:
//
//   - Slots. A handler runs only with a slot of its connection
//     (MaxInFlightPerConn) and one of the agent (MaxInFlight), two
//     limiters. The reading goroutine takes both before it runs the
//     handler, and when they are all taken writes the ACKs it gathered and
//     waits; the handler's goroutine gives them back when it is done.
//   - Inline. While handlers are quick, each runs in the goroutine that read
//     its frame: no goroutine switch, no copy of the frame, and its ACK
//     joins those written together before the next blocking read.
//   - Dispatch. When handlers have lately been slow (more than one in 16
//     of the recent sampled calls took over dispatchThreshold: a moving
//     share, slowShare), each frame is copied and given a goroutine of its own at once, so that frames do
//     not wait behind one another. The copy is counted in the agent's
//     buffer budget (MaxBufferBytes) until the handler is done; when the
//     budget is spent, the frame runs inline instead.
//   - Rescue. An inline handler that runs long holds up the frames read
//     after it: a timer then hands the reading role to a goroutine of its
//     own and leaves the handler to finish where it runs (see inlineWatch),
//     if the budget has room for the reader's new buffer; else the handler
//     goes on inline, and the connection waits for it.

import (
	"math"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/errors"
)

const (
	// inlineBudget is the period of the rescue timer: a handler found
	// running inline at two firings in a row, or at the first firing after
	// the timer was armed for it, is rescued. Go's timers are coarse
	// (about a millisecond when the process is idle), so in practice a
	// handler is rescued after 1 to 4 ms.
	inlineBudget = 50 * time.Microsecond

	// dispatchThreshold: a handler call that takes longer is slow. When
	// more than slowShareDispatch of the recent sampled calls were slow,
	// frames go to goroutines of their own at once (their cost is small
	// beside such handlers) instead of running inline; a rare slow call
	// among quick ones (a cache miss) runs inline and is rescued, so that
	// the quick ones do not all pay for a goroutine.
	dispatchThreshold = 50 * time.Microsecond

	// slowShareDispatch is that share, in 1/65536ths (6.25%); the share
	// is a moving average of the sampled calls, each weighing 1/64.
	slowShareDispatch = 1 << 16 / 16

	// latencySampling: one handler call in latencySampling of each
	// connection is timed (reading the clock costs as much as a small
	// handler), and counted that many times in Stats.
	latencySampling = 8
)

// errLostRole ends a goroutine's part in a connection: its inline handler
// was rescued, and the reading role went on in another goroutine.
var errLostRole = errors.New("spoe: reading role taken over")

// scheduler is the agent-wide part of the policy. Any goroutine may use it.
type scheduler struct {
	slots limiter // MaxInFlight

	// slowShare is the moving share of the sampled handler calls that
	// took longer than dispatchThreshold, in 1/65536ths.
	slowShare atomic.Int64
}

// slow reports whether handlers have lately been slow often enough that a
// frame should not wait behind them: see dispatchThreshold.
func (s *scheduler) slow() bool {
	return s.slowShare.Load() > slowShareDispatch
}

// observe feeds the moving share of slow handler calls with a sampled
// call of duration d.
func (s *scheduler) observe(d time.Duration) {
	var x int64
	if d > dispatchThreshold {
		x = 1 << 16
	}
	share := s.slowShare.Load()
	s.slowShare.Store(share + (x-share)/64)
}

// limiter is a counting semaphore: at most max slots taken at once. Any
// goroutine may call its methods; mu and cond serve waiters only, so that
// taking and giving back a free slot is one atomic operation each.
type limiter struct {
	max     int64
	n       atomic.Int64 // slots taken
	waiters atomic.Int32
	closed  atomic.Bool // waiters give up
	mu      sync.Mutex
	cond    sync.Cond
}

func (l *limiter) init(max int64) {
	l.max = max
	l.cond.L = &l.mu
}

// inUse returns the number of slots taken.
func (l *limiter) inUse() int64 { return l.n.Load() }

// tryAcquire takes a slot if one is free.
func (l *limiter) tryAcquire() bool {
	for {
		n := l.n.Load()
		if n >= l.max {
			return false
		}
		if l.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// acquire takes a slot, waiting for one. It reports false if the limiter
// was closed meanwhile.
func (l *limiter) acquire() bool {
	for !l.tryAcquire() {
		if !l.waitBelow(l.max) {
			return false
		}
	}
	return true
}

// waitBelow waits until fewer than n slots are taken. It reports false if
// the limiter was closed meanwhile.
func (l *limiter) waitBelow(n int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.waiters.Add(1)
	defer l.waiters.Add(-1)
	for l.n.Load() >= n {
		if l.closed.Load() {
			return false
		}
		l.cond.Wait()
	}
	return true
}

// release gives a slot back. A waiter registers before it checks the
// count, and release checks for waiters after it lowered the count: one of
// the two sees the other.
func (l *limiter) release() {
	l.n.Add(-1)
	if l.waiters.Load() > 0 {
		l.wake()
	}
}

// wake wakes the waiters to check the count again.
func (l *limiter) wake() {
	l.mu.Lock()
	l.cond.Broadcast()
	l.mu.Unlock()
}

// close wakes every waiter, and makes them give up from then on.
func (l *limiter) close() {
	l.mu.Lock()
	l.closed.Store(true)
	l.cond.Broadcast()
	l.mu.Unlock()
}

// exchange is what one NOTIFY needs while its handler runs: pooled.
type exchange struct {
	req   Request
	w     ActionWriter
	ack   []byte
	frame []byte // the payload, copied, for a dispatched handler
	paid  int    // bytes of the budget held for frame
}

var exchangePool = sync.Pool{New: func() interface{} { return new(exchange) }}

func putExchange(ex *exchange) {
	if poisonViews {
		return // a fresh one each time, so that a kept view stays sealed
	}
	ex.req = Request{names: ex.req.names, sub: ex.req.sub}
	if cap(ex.ack) > 64<<10 {
		ex.ack = nil
	}
	if cap(ex.frame) > 64<<10 {
		ex.frame = nil
	}
	exchangePool.Put(ex)
}

// inlineWatch is a connection's rescue state. The rescue moves the reading
// role, and these invariants, here and nowhere else, make it safe:
//
//  1. The reading role owns the frame reader (c.rd) and the fields marked
//     so on conn (c.frag, c.ex, c.out, c.calls). One goroutine holds it.
//  2. Before an inline handler runs, the reading goroutine stores state
//     seq|stateInline (a new seq), and from then on touches none of the
//     role's fields until it clears stateInline by CompareAndSwap.
//  3. The timer's goroutine (rescue) may take the role only by
//     CompareAndSwap from seq|stateInline to seq|stateInline|stateRescuing,
//     and only when its previous firing, or the arming of the timer, saw
//     the same seq: the same handler has run for at least inlineBudget. A
//     firing that finds stateRescuing set does nothing: there is never a
//     second rescuer.
//  4. The rescuer leaves the read buffer (and the reassembly buffer and
//     exchange) that the handler's frame is in to the handler's goroutine,
//     and goes on with the unread bytes in a fresh buffer; then it stores
//     seq+1 with both bits clear: from then on the role is its own.
//  5. The handler's goroutine, when its CompareAndSwap fails, was
//     rescued: it waits (runtime.Gosched; the rescuer only copies the
//     unread bytes) until stateRescuing is clear, delivers its ACK through
//     the writer, gives its buffers back, and returns errLostRole.
//  6. The role and each handler running out of it hold a reference
//     (c.refs); the last to drop it frees the connection (conn.unref).
//  7. The timer is armed by the first inline handler after a blocking read
//     and disarmed before the next blocking read, so an idle connection
//     has no timer firing.
type inlineWatch struct {
	// state is seq<<2 | stateRescuing | stateInline, seq counting inline
	// handler calls and rescues.
	state    atomic.Uint64
	timer    *time.Timer   // the reading role's
	armMu    sync.Mutex    // orders arming, disarming and re-arming the timer
	armed    atomic.Bool   // changed under armMu
	lastSeen atomic.Uint64 // the state the previous firing saw

	// detachCost is what the rescue of the handler running inline takes
	// from the budget (frameReader.detach), stored before its state.
	detachCost atomic.Int64
}

// Bits of inlineWatch.state.
const (
	stateInline   = 1 // a handler runs inline and may be rescued
	stateRescuing = 2 // a rescuer is taking the reading role over
	stateSeq      = 4 // one step of the sequence number
)

// handle runs the handler on one whole NOTIFY: inline under the rescue
// timer, or dispatched to a goroutine of its own when handlers are slow.
// It runs in the reading role.
func (c *conn) handle(streamID, frameID uint64, payload []byte) error {
	ex := c.ex
	if ex == nil {
		ex = exchangePool.Get().(*exchange)
		c.ex = ex
	}
	if err := ex.req.indexMessages(payload); err != nil {
		return err
	}
	if err := c.acquire(); err != nil {
		return err
	}
	slow := c.sched.slow()
	if slow {
		// Counted at once: its ACK may leave before the next flush.
		c.stats.messages.count(&ex.req, nil)
	} else {
		c.stats.messages.count(&ex.req, &c.recent)
	}
	ex.req.parent, ex.req.streamID, ex.req.frameID = c.requestContext(), streamID, frameID
	ex.req.ctx, ex.req.cancel, ex.req.sealed, ex.req.engineID = nil, nil, false, c.engineID
	ex.w.reset(ex.ack[:0], streamID, frameID, c.maxFrame, c.cfg.prefixLen)
	sampled := c.calls%latencySampling == 0
	c.calls++

	if slow && c.copyFrame(ex, payload) {
		// The frame's bytes go with it: the read buffer moves on.
		ex.req.payload = ex.frame // the index is offsets: still right
		c.ex = nil
		c.refs.Add(1)
		c.agent.goroutines.Add(1)
		go c.dispatched(ex, sampled)
		return nil
	}

	w := &c.watch
	if w.timer == nil {
		w.timer = time.AfterFunc(math.MaxInt64, c.rescue)
	}
	inline := (w.state.Load() + stateSeq) | stateInline
	if !w.armed.Load() {
		// Arming counts as the timer's first sight of this handler: if
		// it still runs at the first firing, it is rescued then.
		w.lastSeen.Store(inline)
		w.armMu.Lock()
		w.armed.Store(true)
		w.timer.Reset(inlineBudget)
		w.armMu.Unlock()
	}
	in := c.rd.in
	w.detachCost.Store(int64(c.rd.detachCost()))
	// Invariant 2: from here until the CompareAndSwap succeeds, touch no
	// field of the reading role.
	w.state.Store(inline)
	ack := c.run(ex, sampled)
	if poisonViews {
		poison(payload)
	}
	if !w.state.CompareAndSwap(inline, inline&^stateInline) {
		// Invariant 5: rescued.
		for w.state.Load()&stateRescuing != 0 {
			runtime.Gosched()
		}
		c.deliver(ack)
		putExchange(ex)
		if in != nil {
			c.agent.buffers.release(len(in.b))
			putBuffer(in)
		}
		c.release()
		c.unref()
		return errLostRole
	}
	c.gather(ack)
	if poisonViews {
		c.ex = nil
	}
	c.release()
	return nil
}

// copyFrame copies a dispatched frame's payload into ex.frame if the
// budget has room for the copy, and reports whether it did.
// A pooled exchange's copy buffer is kept when it is not more than twice
// the size the frame needs, so that a small frame is not counted at the
// size of a big one before it.
func (c *conn) copyFrame(ex *exchange, payload []byte) bool {
	n, cost := len(payload), cap(ex.frame)
	fresh := cost < n || cost > 2*allocSize(n)
	if fresh {
		cost = allocSize(n)
	}
	if !c.agent.buffers.tryTake(cost) {
		return false
	}
	if fresh {
		ex.frame = make([]byte, n)
	}
	ex.frame = append(ex.frame[:0], payload...)
	ex.paid = cost
	return true
}

// run calls the handler and returns the finished ACK.
func (c *conn) run(ex *exchange, sampled bool) []byte {
	var start time.Duration
	if sampled {
		start = monotime()
	}
	serveNotify(c.cfg, c.stats, &ex.w, &ex.req)
	if sampled {
		d := monotime() - start
		c.stats.observeHandler(d, latencySampling, &ex.req)
		c.sched.observe(d)
	}
	ack := ex.w.finish()
	ex.ack = ack[:0]
	c.agent.answers.observe(len(ack))
	ex.req.sealed, ex.w.sealed = poisonViews, poisonViews
	return ack
}

// dispatched runs a handler in a goroutine of its own and delivers its ACK.
func (c *conn) dispatched(ex *exchange, sampled bool) {
	defer c.agent.goroutines.Done()
	ack := c.run(ex, sampled)
	if poisonViews {
		poison(ex.frame)
	}
	c.deliver(ack)
	c.agent.buffers.release(ex.paid)
	ex.paid = 0
	putExchange(ex)
	c.release()
	c.unref()
}

// acquire takes a handler slot of the connection and of the agent, waiting
// for them, with the timer stopped and the gathered ACKs written, if need
// be. It runs in the reading role.
func (c *conn) acquire() error {
	if !c.slots.tryAcquire() {
		c.disarm()
		if err := c.flush(); err != nil {
			return err
		}
		if !c.slots.acquire() {
			return net.ErrClosed
		}
	}
	if !c.sched.slots.tryAcquire() {
		c.disarm()
		if err := c.flush(); err != nil {
			c.slots.release()
			return err
		}
		if !c.sched.slots.acquire() {
			c.slots.release()
			return net.ErrClosed
		}
	}
	return nil
}

// release gives back the slots acquire took.
func (c *conn) release() {
	c.sched.slots.release()
	c.slots.release()
}

// disarm stops the rescue timer before the reading role blocks or ends.
func (c *conn) disarm() {
	w := &c.watch
	if w.armed.Load() {
		w.armMu.Lock()
		w.armed.Store(false)
		w.timer.Stop()
		w.armMu.Unlock()
	}
}

// rearm sets the rescue timer off again, unless the reading role disarmed
// it meanwhile (under armMu, so that a disarm and a new arming between
// its check and its Reset cannot leave the timer stopped while armed).
func (c *conn) rearm() {
	w := &c.watch
	w.armMu.Lock()
	if w.armed.Load() {
		w.timer.Reset(inlineBudget)
	}
	w.armMu.Unlock()
}

// rescue runs in the timer's goroutine every inlineBudget while inline
// handlers run, and takes the reading role over from a handler it finds
// running at two sights in a row (invariants 3 and 4). No clock is read.
func (c *conn) rescue() {
	w := &c.watch
	if !w.armed.Load() {
		return // the reading role went back to reading
	}
	s := w.state.Load()
	if s&(stateInline|stateRescuing) != stateInline || w.lastSeen.Swap(s) != s {
		c.rearm()
		return
	}
	// The reader's new buffer is paid for before the role is taken: when
	// the budget is spent, the handler goes on inline.
	paid := int(w.detachCost.Load())
	if !c.agent.buffers.tryTake(paid) {
		c.rearm()
		return
	}
	if !w.state.CompareAndSwap(s, s|stateRescuing) {
		c.agent.buffers.release(paid)
		c.rearm()
		return
	}
	c.agent.goroutines.Add(1)
	defer c.agent.goroutines.Done()
	c.refs.Add(1)
	c.stats.rescues.Add(1)
	c.rd.detach(paid)
	c.frag = c.frag.detached()
	c.ex = nil
	w.armMu.Lock()
	w.armed.Store(false) // armed again by the next inline handler
	w.armMu.Unlock()
	// The rescued handler's request is counted before its ACK can leave.
	c.recent.flush()
	w.state.Store(s&^(stateInline|stateRescuing) + stateSeq)
	// The ACKs gathered before the slow frame must not wait for it.
	err := c.flush()
	if err == nil {
		err = c.loop()
	}
	c.end(err)
}
