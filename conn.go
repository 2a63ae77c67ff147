package spoe

// One SPOP connection. Its goroutines share three roles:
//
//   - the loop role reads frames, handles each NOTIFY inline (in the
//     reading goroutine) and gathers the ACKs of one read in c.out, written
//     with one write before the next blocking read;
//   - when an inline handler runs for long, a timer rescues the connection:
//     the timer's goroutine takes the loop role over (with fresh buffers and
//     the ACKs gathered so far, which it writes at once), and the slow
//     handler's goroutine, once done, delivers its own ACK and exits. When
//     handlers have lately been slow on the whole (Agent.slowHandlers),
//     frames are not run inline at all but each given a goroutine at once;
//   - writes go through write(), which lets one goroutine write at a time
//     and gathers what others bring meanwhile into its next write.
//
// An idle connection holds no buffer: the read buffer is taken from a pool
// once data is there to read, and given back when all of it is consumed.

import (
	"context"
	"encoding/binary"
	"io"
	"math"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pkg/errors"
	"github.com/sirupsen/logrus"
)

// inlineBudget is the period of the rescue timer: a handler found running
// inline at two firings in a row is rescued. Go's timers are coarse (about
// a millisecond when the process is idle), so in practice a handler is
// rescued after 1 to 4 ms.
var inlineBudget = 50 * time.Microsecond

// dispatchThreshold: when the moving average of handler durations exceeds
// it, frames go to goroutines of their own at once (their cost is small
// beside such handlers) instead of waiting behind one another.
const dispatchThreshold = 50 * time.Microsecond

// lingerTimeout bounds how long a closing connection waits for HAProxy to
// close after the agent's last frame (a close with unread data would reset
// the connection and could lose that frame).
const lingerTimeout = time.Second

// maxHelloFrame bounds frames before the handshake: a HAPROXY-HELLO is
// about 130 bytes.
const maxHelloFrame = 16 << 10

// Ends of a connection that are not errors to report.
var (
	errLostRole    = errors.New("spoe: loop role taken over")        // this goroutine just exits
	errHealthcheck = errors.New("spoe: health check answered")       // quiet end
	errDraining    = errors.New("spoe: agent shutting down")         // drain, then DISCONNECT 0
	errPeerClosed  = errors.New("spoe: HAProxy sent DISCONNECT")     // already answered
	errWriteClosed = errors.New("spoe: connection closed for write") // the frames are still the caller's
)

// writeError is a write that failed: logged where it happened.
type writeError struct{ err error }

func (e *writeError) Error() string { return "spoe: write: " + e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// Read deadline kinds.
const (
	deadlineNone = iota
	deadlineIdle
	deadlineFrame
)

// Bits of conn.state.
const (
	stateInline   = 1 // a handler runs inline and may be rescued
	stateRescuing = 2 // a rescuer is taking the loop role over
	stateSeq      = 4 // one step of the sequence number
)

// latencySampling: one handler call in latencySampling is timed (reading
// the clock costs as much as a small handler), and counted that many times.
const latencySampling = 8

type conn struct {
	agent *Agent
	nc    net.Conn
	rc    syscall.RawConn // nil: plain blocking reads
	refs  atomic.Int32    // the loop role and each detached handler

	// Set by the handshake, read-only after.
	maxFrame int
	caps     capabilities
	// HAProxy's announced max-frame-size, and the bytes of an oversized
	// NOTIFY still to skip (see oversized).
	haproxyMaxFrame uint64
	skip            int
	muxEngine       bool // HAProxy 3.1+ (see goodbye)
	engineID        string
	handshaken      bool
	helloSent       bool

	// Guarded by lifeMu: set by the handshake, read by closeSocket.
	lifeMu sync.Mutex
	closed bool
	engine *engine            // async connections only
	ctx    context.Context    // parent of request contexts
	cancel context.CancelFunc //

	// Owned by the goroutine holding the loop role.
	in       *buffer // read buffer, nil when idle
	r, w     int     // unread bytes: in.b[r:w]
	readFn   func(fd uintptr) bool
	readN    int
	readErr  error
	frag     reassembly
	ex       *exchange
	out      *buffer // ACKs gathered for the next write
	frames   uint64  // frames read
	dlKind   int
	dlAt     time.Time
	dlFrames uint64 // frames read when the frame deadline was set
	calls    uint64 // handler calls, for sampling their latency

	// state is seq<<2 | stateRescuing | stateInline, seq counting inline
	// handler calls and rescues: a handler's goroutine learns from it,
	// whatever happened meanwhile, whether the loop role is still its own,
	// and the rescue timer whether the same handler is still running.
	state atomic.Uint64
	// The rescue timer fires every inlineBudget while the loop handles
	// frames, and is stopped before the loop blocks. lastSeen is the state
	// its previous firing saw.
	timer      *time.Timer
	timerArmed atomic.Bool
	lastSeen   atomic.Uint64

	// Handlers running on this connection.
	inflight atomic.Int32
	waitMu   sync.Mutex
	waitCond sync.Cond
	waiters  atomic.Int32
	dead     atomic.Bool // closed: waiters give up

	// Write side, guarded by wmu.
	wmu     sync.Mutex
	wcond   sync.Cond
	writing bool
	wclosed bool // no frame is accepted any more
	pending []byte
	wdlAt   time.Time

	dlMu     sync.Mutex // orders read-deadline changes with startDrain
	drainReq atomic.Bool
	once     sync.Once
}

// exchange is what one NOTIFY needs while its handler runs: pooled.
type exchange struct {
	req   Request
	w     ActionWriter
	ack   []byte
	frame []byte // the payload, copied, for a handler dispatched at once
}

var exchangePool = sync.Pool{New: func() interface{} { return new(exchange) }}

func getExchange() *exchange { return exchangePool.Get().(*exchange) }

func putExchange(ex *exchange) {
	if poisonViews {
		return // a fresh one each time, so that a kept view stays sealed
	}
	ex.req = Request{names: ex.req.names}
	if cap(ex.ack) > 64<<10 {
		ex.ack = nil
	}
	if cap(ex.frame) > 64<<10 {
		ex.frame = nil
	}
	exchangePool.Put(ex)
}

func newConn(a *Agent, nc net.Conn) *conn {
	c := &conn{agent: a, nc: nc, maxFrame: maxHelloFrame}
	c.refs.Store(1)
	c.waitCond.L = &c.waitMu
	c.wcond.L = &c.wmu
	c.initRawRead()
	return c
}

// serve runs the connection from its handshake to its end.
func (c *conn) serve() {
	defer c.agent.goroutines.Done()
	c.dlMu.Lock()
	c.setDeadlineLocked(deadlineFrame, c.agent.readTimeout())
	c.dlMu.Unlock()
	err := c.handshake()
	if err == nil {
		err = c.loop()
	}
	c.end(err)
}

// handshake reads the HAPROXY-HELLO and answers it.
func (c *conn) handshake() error {
	f, err := c.nextFrame()
	if err != nil {
		return err
	}
	switch {
	case f.typ != frameHAProxyHello:
		return errNotHello
	case !f.fin():
		return errFragmented
	case f.streamID != 0 || f.frameID != 0:
		return errBadIDs
	}
	h, err := parseHAProxyHello(f.payload)
	if err != nil {
		return err
	}
	a := c.agent
	a.stats.framesIn[frameStat(f.typ)].Add(1)
	c.maxFrame = helloFrameSize(h, a.maxFrameSize())
	c.haproxyMaxFrame = h.maxFrameSize
	c.muxEngine = muxEngine(h.caps)
	c.caps = agentCaps(h.caps, a.keepPipelining) // HAProxy 3.1+: see agentCaps
	c.engineID = h.engineID
	hello := appendAgentHello(c.outBuf(), c.maxFrame, c.caps)
	c.out.b = hello[:0]
	if err := c.write(hello, false); err != nil {
		return err
	}
	c.helloSent = true
	if h.healthcheck {
		a.stats.healthchecks.Add(1)
		return errHealthcheck
	}
	c.lifeMu.Lock()
	defer c.lifeMu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	c.ctx, c.cancel = context.WithCancel(a.base)
	if c.caps&capAsync != 0 && h.engineID != "" {
		// Only now that the AGENT-HELLO is out: the engine may write held
		// ACKs on this connection as soon as it joins.
		a.engines.join(h.engineID, c)
	}
	c.handshaken = true
	return nil
}

// requestContext is the parent of the contexts of this connection's
// requests: with async, the engine's, as their ACKs may leave on another
// of its connections.
func (c *conn) requestContext() context.Context {
	if c.engine != nil {
		return c.engine.ctx
	}
	return c.ctx
}

// loop handles frames until the connection ends or the role moves on.
func (c *conn) loop() error {
	for {
		f, err := c.nextFrame()
		if err != nil {
			return err
		}
		if err := c.onFrame(&f); err != nil {
			return err
		}
	}
}

// onFrame handles one frame after the handshake. A non-nil error ends the
// connection (errPeerClosed after HAProxy's DISCONNECT) or, errLostRole,
// this goroutine's part in it.
func (c *conn) onFrame(f *frame) error {
	c.agent.stats.framesIn[frameStat(f.typ)].Add(1)
	switch f.typ {
	case frameNotify:
		return c.onNotify(f)
	case frameUnset:
		return c.onUnset(f)
	case frameHAProxyDisconnect:
		return c.onDisconnect(f)
	case frameHAProxyHello:
		return errSecondHello
	case frameAgentHello, frameAgentDisconnect, frameAck:
		return errAgentFrame
	}
	return nil // SPOP says to ignore frame types it does not know
}

func (c *conn) onNotify(f *frame) error {
	if c.frag.active {
		return errInterlaced
	}
	if !f.fin() {
		if c.caps&capFragmentation == 0 {
			return errFragmented
		}
		if f.abort() {
			return nil
		}
		c.frag.start(f)
		return c.checkReassembly()
	}
	if f.abort() {
		return nil
	}
	return c.handle(f.streamID, f.frameID, f.payload)
}

func (c *conn) onUnset(f *frame) error {
	if !c.frag.matches(f) {
		if c.frag.active && !c.frag.stray(f) {
			return errInterlaced
		}
		return nil // nothing to continue or abort, or of an aborted NOTIFY: ignored
	}
	if f.abort() {
		c.frag.end()
		return nil
	}
	c.frag.buf = append(c.frag.buf, f.payload...)
	if err := c.checkReassembly(); err != nil || !c.frag.active {
		return err // aborted: the rest of it is ignored
	}
	if !f.fin() {
		return nil
	}
	if err := c.handle(c.frag.streamID, c.frag.frameID, c.frag.buf); err != nil {
		return err
	}
	c.frag.end()
	return nil
}

// maxReassembled bounds a NOTIFY joined from fragments.
const maxReassembled = 1 << 20

// checkReassembly answers a NOTIFY that grew too big with an aborting ACK
// (HAProxy then fails that event) and ends its transfer there: HAProxy 2.6
// sends no fragment with ABORT after it, and the next NOTIFY would else be
// taken for an interlaced frame. Its fragments still on their way are
// ignored (reassembly.stray).
func (c *conn) checkReassembly() error {
	if len(c.frag.buf) <= maxReassembled {
		return nil
	}
	c.agent.stats.notifyTooBig.Add(1)
	c.agent.logger().WithField("stream_id", c.frag.streamID).WithField("frame_id", c.frag.frameID).
		Warnf("spoe: fragmented NOTIFY above %d bytes: aborted", maxReassembled)
	b, start := appendFrameHeader(c.outBuf(), frameAck, flagFin|flagAbort, c.frag.streamID, c.frag.frameID)
	finishFrame(b, start)
	c.out.b = b
	c.frag.abort()
	return nil
}

// onDisconnect answers HAProxy's DISCONNECT with its own status.
func (c *conn) onDisconnect(f *frame) error {
	d, err := parseDisconnect(f.payload)
	if err != nil {
		return err
	}
	c.agent.stats.countDisconnect(d.status, true)
	entry := c.log().WithField("status", uint32(d.status)).WithField("message", d.message)
	if d.status == StatusNormal || d.status == StatusTimeout {
		entry.Debug("spoe: HAProxy closed the connection")
	} else {
		entry.Warn("spoe: HAProxy closed the connection on an error")
	}
	// HAProxy reads nothing but the AGENT-DISCONNECT from now on: with
	// async, the ACKs gathered go to another connection of the engine.
	if c.engine != nil {
		c.rerouteOut()
	} else {
		_ = c.flush()
	}
	c.disconnect(d.status, d.status.String())
	return errPeerClosed
}

// handle validates one whole NOTIFY and runs the handler on it: inline,
// under the rescue timer, or at once in a goroutine of its own when
// handlers are slow.
func (c *conn) handle(streamID, frameID uint64, payload []byte) error {
	ex := c.ex
	if ex == nil {
		ex = getExchange()
		c.ex = ex
	}
	if err := ex.req.indexMessages(payload); err != nil {
		return err
	}
	if err := c.acquire(); err != nil {
		return err
	}
	a := c.agent
	ex.req.parent, ex.req.streamID, ex.req.frameID = c.requestContext(), streamID, frameID
	ex.req.ctx, ex.req.cancel, ex.req.sealed, ex.req.engineID = nil, nil, false, c.engineID
	ex.w.reset(ex.ack[:0], streamID, frameID, c.maxFrame, a.prefixLen())
	sampled := c.calls%latencySampling == 0
	c.calls++

	if a.slowHandlers() {
		// The frame's bytes go with it: the read buffer moves on.
		ex.frame = append(ex.frame[:0], payload...)
		ex.req.payload = ex.frame // the index is offsets: still right
		c.ex = nil
		c.refs.Add(1)
		a.goroutines.Add(1)
		go c.dispatched(ex, sampled)
		return nil
	}

	if c.timer == nil {
		c.timer = time.AfterFunc(math.MaxInt64, c.rescue)
	}
	if !c.timerArmed.Load() {
		c.timerArmed.Store(true)
		c.timer.Reset(inlineBudget)
	}
	in := c.in
	// From here on, until the CompareAndSwap below succeeds, a rescue may
	// own the loop's fields: touch none of them.
	inline := (c.state.Load() + stateSeq) | stateInline
	c.state.Store(inline)
	ack := c.run(ex, sampled)
	if poisonViews {
		poison(payload)
	}
	if !c.state.CompareAndSwap(inline, inline&^stateInline) {
		// Rescued: the loop role went on without us. Once the rescuer is
		// done with our read buffer, deliver our own ACK.
		for c.state.Load()&stateRescuing != 0 {
			runtime.Gosched()
		}
		c.deliver(ack)
		putExchange(ex)
		if in != nil {
			putBuffer(in)
		}
		c.doneHandler()
		c.unref()
		return errLostRole
	}
	c.outBuf()
	c.out.b = append(c.out.b, ack...)
	if poisonViews {
		c.ex = nil
	}
	c.doneHandler()
	return nil
}

// run calls the handler and returns the finished ACK.
func (c *conn) run(ex *exchange, sampled bool) []byte {
	a := c.agent
	var start time.Duration
	if sampled {
		start = monotime()
	}
	a.serveNotify(&ex.w, &ex.req)
	if sampled {
		d := monotime() - start
		a.stats.observeHandler(d, latencySampling)
		a.observeHandlerTime(d)
	}
	ack := ex.w.finish()
	ex.ack = ack[:0]
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
	putExchange(ex)
	c.doneHandler()
	c.unref()
}

// disarm stops the rescue timer before the loop blocks or ends.
func (c *conn) disarm() {
	if c.timerArmed.Load() {
		c.timerArmed.Store(false)
		c.timer.Stop()
	}
}

// rearm sets the rescue timer off again, unless the loop disarmed it
// meanwhile: disarm clears timerArmed before it stops the timer, so
// whichever comes last wins.
func (c *conn) rearm() {
	c.timer.Reset(inlineBudget)
	if !c.timerArmed.Load() {
		c.timer.Stop()
	}
}

// rescue runs in the timer's goroutine every inlineBudget while the loop
// handles frames. When it finds inline the handler it already found inline
// at its previous firing, that handler has run for at least inlineBudget:
// it takes the loop role over. No clock is read.
func (c *conn) rescue() {
	c.agent.stats.timerFirings.Add(1)
	if !c.timerArmed.Load() {
		return // the loop went back to reading
	}
	s := c.state.Load()
	if s&(stateInline|stateRescuing) != stateInline || c.lastSeen.Swap(s) != s ||
		!c.state.CompareAndSwap(s, s|stateRescuing) {
		c.rearm()
		return
	}
	a := c.agent
	a.goroutines.Add(1)
	defer a.goroutines.Done()
	c.refs.Add(1)
	a.stats.rescues.Add(1)
	// The slow handler keeps the read buffer its frame is in, and the
	// reassembly buffer if its frame was joined from fragments.
	if c.w > c.r {
		nb := getBuffer(c.w - c.r)
		c.w = copy(nb.b, c.in.b[c.r:c.w])
		c.r = 0
		c.in = nb
	} else {
		c.in, c.r, c.w = nil, 0, 0
	}
	c.frag = c.frag.detached()
	c.ex = nil
	c.timerArmed.Store(false) // armed again by the next inline handler
	c.state.Store(s&^(stateInline|stateRescuing) + stateSeq)
	// The ACKs gathered before the slow frame must not wait for it.
	err := c.flush()
	if err == nil {
		err = c.loop()
	}
	c.end(err)
}

// deliver sends the ACK of a handler that ran out of the loop: on its own
// connection, or with async on any live one of its engine.
func (c *conn) deliver(ack []byte) {
	if err := c.write(ack, false); err != errWriteClosed {
		return // written, or handed over with what failed with it
	}
	c.reroute(append([]byte(nil), ack...))
}

// reroute gives the ACK frames among frames, which cannot leave on this
// connection, to its engine (async), or drops them.
func (c *conn) reroute(frames []byte) {
	acks := ackFrames(frames)
	if len(acks) == 0 {
		return
	}
	if c.engine != nil && c.engine.send(acks) {
		return // counted by the engine
	}
	c.agent.stats.acksDropped.Add(uint64(countFrames(acks)))
}

// rerouteOut reroutes the ACKs gathered for a peer that will not read them.
func (c *conn) rerouteOut() {
	if c.out != nil && len(c.out.b) > 0 {
		c.reroute(c.out.b)
		c.out.b = c.out.b[:0]
	}
}

// acquire takes a handler slot of the connection and of the agent, waiting
// for them, with the timer stopped and the gathered ACKs written, if need
// be.
func (c *conn) acquire() error {
	a := c.agent
	if c.inflight.Load() >= a.maxInFlightPerConn() {
		c.disarm()
		if err := c.flush(); err != nil {
			return err
		}
		if !c.waitInflightBelow(a.maxInFlightPerConn()) {
			return net.ErrClosed
		}
	}
	if !a.tryAcquireSlot() {
		c.disarm()
		if err := c.flush(); err != nil {
			return err
		}
		if !a.acquireSlot() {
			return net.ErrClosed
		}
	}
	c.inflight.Add(1)
	return nil
}

// doneHandler releases the slots acquire took.
func (c *conn) doneHandler() {
	c.agent.releaseSlot()
	c.inflight.Add(-1)
	if c.waiters.Load() > 0 {
		c.waitMu.Lock()
		c.waitCond.Broadcast()
		c.waitMu.Unlock()
	}
}

// waitInflightBelow waits until fewer than limit handlers run on the
// connection. It reports false if the connection was closed meanwhile.
func (c *conn) waitInflightBelow(limit int32) bool {
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	c.waiters.Add(1)
	defer c.waiters.Add(-1)
	for c.inflight.Load() >= limit {
		if c.dead.Load() {
			return false
		}
		c.waitCond.Wait()
	}
	return true
}

// nextFrame returns the next whole frame, reading as needed. Before it
// blocks, it writes the ACKs gathered so far and gives idle buffers back.
func (c *conn) nextFrame() (frame, error) {
	for {
		if c.skip > 0 {
			c.skipping() // an oversized NOTIFY: see oversized
		}
		if n := c.w - c.r; c.skip == 0 && n >= lengthSize {
			length := binary.BigEndian.Uint32(c.in.b[c.r:])
			if err := checkLength(length, c.maxFrame); err != nil {
				skip, err := c.oversized(length, err)
				if err != nil {
					return frame{}, err
				}
				if skip {
					continue
				}
				// Else read on: its header is not all there yet.
			} else {
				total := lengthSize + int(length)
				if n >= total {
					b := c.in.b[c.r+lengthSize : c.r+total : c.r+total]
					c.r += total
					c.frames++
					return parseFrame(b)
				}
				c.reserve(total)
			}
		}
		c.disarm()
		if err := c.flush(); err != nil {
			return frame{}, err
		}
		if c.r == c.w {
			c.idle()
		}
		if err := c.fill(); err != nil {
			return frame{}, err
		}
	}
}

// idle gives back every buffer the connection holds between frames.
func (c *conn) idle() {
	if c.in != nil {
		putBuffer(c.in)
		c.in, c.r, c.w = nil, 0, 0
	}
	if c.out != nil {
		putBuffer(c.out)
		c.out = nil
	}
	if c.ex != nil {
		putExchange(c.ex)
		c.ex = nil
	}
}

// reserve makes room in the read buffer for more of a frame of total bytes
// that starts at c.r. The buffer grows with the bytes that arrive, not with
// what the length prefix claims: a peer must send a big frame to make the
// agent hold one.
func (c *conn) reserve(total int) {
	if len(c.in.b)-c.r >= total {
		return
	}
	if c.r > 0 && (len(c.in.b) >= total || c.w-c.r < len(c.in.b)/2) {
		c.w = copy(c.in.b, c.in.b[c.r:c.w])
		c.r = 0
		if len(c.in.b) >= total || c.w < len(c.in.b) {
			return
		}
	}
	size := 2 * len(c.in.b)
	if size > total {
		size = total
	}
	nb := getBuffer(size)
	c.w = copy(nb.b, c.in.b[c.r:c.w])
	c.r = 0
	putBuffer(c.in)
	c.in = nb
}

// fill reads more bytes into the read buffer.
func (c *conn) fill() error {
	if c.in != nil && c.w == len(c.in.b) {
		// Full with less than a length prefix at its end.
		c.w = copy(c.in.b, c.in.b[c.r:c.w])
		c.r = 0
	}
	if err := c.armReadDeadline(); err != nil {
		return err
	}
	n, err := c.read()
	c.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.EOF
	}
	return err
}

// armReadDeadline sets the read deadline for what the next read waits for:
// the rest of a frame (fixed once the frame began, so that a peer sending a
// byte at a time cannot stretch it) or, after the handshake, the next frame.
func (c *conn) armReadDeadline() error {
	if c.drainReq.Load() {
		return errDraining
	}
	a := c.agent
	kind, d := deadlineFrame, a.readTimeout()
	if c.handshaken && c.r == c.w {
		kind, d = deadlineIdle, a.IdleTimeout
		if d <= 0 {
			kind = deadlineNone
		}
	}
	switch {
	case kind == deadlineFrame && c.dlKind == deadlineFrame && c.dlFrames == c.frames:
		return nil // the frame's deadline runs from its first byte
	case kind == deadlineNone && c.dlKind == deadlineNone:
		return nil
	case kind == c.dlKind && time.Until(c.dlAt) > d-d/8:
		// Refreshed lazily: an idle deadline fires between 7/8 and 8/8 of
		// d after the last frame, a frame's between 7/8 and 8/8 of d after
		// its first byte.
		c.dlFrames = c.frames
		return nil
	}
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	if c.drainReq.Load() {
		return errDraining
	}
	c.setDeadlineLocked(kind, d)
	return nil
}

func (c *conn) setDeadlineLocked(kind int, d time.Duration) {
	var at time.Time
	if kind != deadlineNone {
		at = time.Now().Add(d)
	}
	c.dlKind, c.dlAt, c.dlFrames = kind, at, c.frames
	_ = c.nc.SetReadDeadline(at)
}

// startDrain asks the connection to end once its running handlers are done
// (Shutdown): a reader blocked on an idle connection wakes at once.
func (c *conn) startDrain() {
	c.dlMu.Lock()
	c.drainReq.Store(true)
	_ = c.nc.SetReadDeadline(time.Unix(1, 0))
	c.dlMu.Unlock()
}

// drain handles the frames HAProxy sent before it could learn of the
// shutdown: those already in the read buffer and in the socket's. A frame
// that is not whole by then is left.
func (c *conn) drain() error {
	for {
		if err := c.loopBuffered(); err != nil {
			return err
		}
		if c.in == nil {
			c.in, c.r, c.w = getBuffer(0), 0, 0
		} else if c.r > 0 {
			c.w = copy(c.in.b, c.in.b[c.r:c.w])
			c.r = 0
		}
		if c.w == len(c.in.b) {
			return nil
		}
		n := c.readNow(c.in.b[c.w:])
		if n <= 0 {
			return nil
		}
		c.w += n
	}
}

// loopBuffered handles the whole frames already in the read buffer.
func (c *conn) loopBuffered() error {
	for c.w-c.r >= lengthSize {
		length := binary.BigEndian.Uint32(c.in.b[c.r:])
		if checkLength(length, c.maxFrame) != nil || c.w-c.r < lengthSize+int(length) {
			return nil
		}
		f, err := c.nextFrame() // whole in the buffer: no read
		if err != nil {
			return err
		}
		if err := c.onFrame(&f); err != nil {
			return err
		}
	}
	return nil
}

// abort closes the connection at once (Close).
func (c *conn) abort() {
	c.drainReq.Store(true)
	c.closeSocket()
}

// outBuf returns the output buffer's bytes, taking a buffer if needed.
func (c *conn) outBuf() []byte {
	if c.out == nil {
		c.out = getBuffer(0)
		c.out.b = c.out.b[:0]
	}
	return c.out.b
}

// flush writes the gathered ACKs.
func (c *conn) flush() error {
	if c.out == nil || len(c.out.b) == 0 {
		return nil
	}
	err := c.write(c.out.b, false)
	if err == errWriteClosed {
		c.reroute(c.out.b)
	}
	c.out.b = c.out.b[:0]
	return err
}

// write sends whole frames. One goroutine writes at a time; frames brought
// while it writes are gathered into its next write. With last, they are
// the connection's last: nothing is accepted after them.
//
// It returns errWriteClosed when it did not take the frames (the
// connection was closed for writing before): they are still the caller's.
// Any other error means the connection failed while the frames were being
// written; what was not written went to writeFailed, to be rerouted.
func (c *conn) write(frames []byte, last bool) error {
	c.wmu.Lock()
	if c.wclosed {
		c.wmu.Unlock()
		return errWriteClosed
	}
	if last {
		c.wclosed = true
	}
	if c.writing {
		c.pending = append(c.pending, frames...)
		c.wmu.Unlock()
		return nil
	}
	c.writing = true
	c.wmu.Unlock()

	batch, owned := frames, false // owned: batch is a former c.pending
	for {
		n, err := c.writeOut(batch)
		c.wmu.Lock()
		if err != nil {
			c.wclosed = true
			lost := append(append([]byte(nil), unwritten(batch, n)...), c.pending...)
			c.pending = nil
			c.writing = false
			c.wcond.Broadcast()
			c.wmu.Unlock()
			c.writeFailed(err, lost)
			return &writeError{err}
		}
		if len(c.pending) == 0 {
			if owned && cap(batch) <= 64<<10 {
				c.pending = batch[:0] // kept for the next burst
			}
			c.writing = false
			c.wcond.Broadcast()
			c.wmu.Unlock()
			return nil
		}
		next := c.pending
		c.pending = nil
		if owned {
			c.pending = batch[:0]
		}
		batch, owned = next, true
		c.wmu.Unlock()
	}
}

// writeOut performs one write, with a write deadline refreshed lazily.
func (c *conn) writeOut(b []byte) (int, error) {
	d := c.agent.writeTimeout()
	if time.Until(c.wdlAt) < d-d/8 {
		c.wdlAt = time.Now().Add(d)
		_ = c.nc.SetWriteDeadline(c.wdlAt)
	}
	// Counted before the write, so that whoever reads a frame sees it
	// counted; what the write did not complete is taken back.
	c.agent.stats.countFramesOut(b, 1)
	n, err := c.nc.Write(b)
	if err == nil {
		c.agent.stats.writes.Add(1)
	} else {
		c.agent.stats.countFramesOut(unwritten(b, n), -1)
	}
	return n, err
}

// writeFailed ends the connection after a write error. The ACKs that were
// not written go to the engine (async) or are dropped.
func (c *conn) writeFailed(err error, lost []byte) {
	if !isNormalEnd(err) {
		c.log().WithError(err).Warn("spoe: write failed, closing the connection")
	}
	c.reroute(lost)
	c.closeSocket()
}

// closeWrite waits for the write under way and accepts no more.
func (c *conn) closeWrite() {
	c.wmu.Lock()
	for c.writing {
		c.wcond.Wait()
	}
	c.wclosed = true
	c.wmu.Unlock()
}

// disconnect sends AGENT-DISCONNECT after everything already queued, as
// the connection's last frame.
func (c *conn) disconnect(s Status, msg string) {
	if err := c.write(appendAgentDisconnect(c.outBuf(), s, msg), true); err == nil {
		c.agent.stats.countDisconnect(s, false)
	}
	c.out.b = c.out.b[:0]
}

// end closes the connection after its loop returned err.
func (c *conn) end(err error) {
	if err == errLostRole {
		return
	}
	c.disarm()
	a := c.agent
	var we *writeError
	switch {
	case errors.As(err, &we) || err == errWriteClosed:
		// A write failed (HAProxy reset the connection): logged and
		// handled by writeFailed; what was gathered since was rerouted.
		c.rerouteOut()
	case isNormalEnd(err):
		// HAProxy is gone: what was gathered for it goes to the engine.
		c.rerouteOut()
		c.log().WithError(err).Debug("spoe: connection closed by HAProxy")
	case err == errDraining || c.drainReq.Load() && isTimeout(err):
		// Shutdown: handle what HAProxy already sent, let the running
		// handlers finish and their ACKs out, then say goodbye.
		switch derr := c.drain(); derr {
		case nil, errPeerClosed:
		case errLostRole:
			return // a handler was rescued: its rescuer goes on draining
		default:
			c.log().WithError(derr).Debug("spoe: while draining")
		}
		_ = c.flush()
		c.waitInflightBelow(1)
		if c.helloSent {
			c.goodbye()
		}
		c.linger()
	case err == errHealthcheck || err == errPeerClosed:
		c.linger()
	case isTimeout(err):
		_ = c.flush()
		c.log().Info("spoe: read timeout, closing the connection")
		if c.helloSent {
			c.disconnect(StatusTimeout, StatusTimeout.String())
			c.linger()
		}
	default:
		_ = c.flush()
		s := statusOf(err)
		a.stats.protocolErrors.Add(1)
		c.log().WithError(err).WithField("status", uint32(s)).Warn("spoe: protocol error, closing the connection")
		c.disconnect(s, s.String())
		c.linger()
	}
	c.closeSocket()
	c.unref()
}

// linger waits, briefly, for HAProxy to close after the agent's last frame,
// discarding what it still sends, so that closing with unread data does not
// reset the connection before HAProxy read that frame.
func (c *conn) linger() {
	c.closeWrite()
	_ = c.nc.SetReadDeadline(time.Now().Add(lingerTimeout))
	var buf [512]byte
	discarded := 0
	for {
		n, err := c.nc.Read(buf[:])
		discarded += n
		if err != nil {
			break
		}
	}
	if discarded > 0 {
		c.log().WithField("bytes", discarded).Debug("spoe: discarded what HAProxy sent after the agent's last frame")
	}
}

// closeSocket closes the socket and leaves the engine: the end of the
// connection for everyone but the handlers still running on it.
func (c *conn) closeSocket() {
	c.once.Do(func() {
		c.wmu.Lock()
		c.wclosed = true
		c.wmu.Unlock()
		c.nc.Close()
		c.agent.connClosed()
		c.lifeMu.Lock()
		c.closed = true
		e, cancel := c.engine, c.cancel
		c.lifeMu.Unlock()
		if e != nil {
			e.leave(c)
		}
		if cancel != nil {
			cancel()
		}
		c.dead.Store(true)
		c.waitMu.Lock()
		c.waitCond.Broadcast()
		c.waitMu.Unlock()
	})
}

// unref drops one reference; the last one forgets the connection.
func (c *conn) unref() {
	if c.refs.Add(-1) != 0 {
		return
	}
	c.closeSocket()
	if c.in != nil {
		putBuffer(c.in)
		c.in = nil
	}
	if c.out != nil {
		putBuffer(c.out)
		c.out = nil
	}
	if c.ex != nil {
		putExchange(c.ex)
		c.ex = nil
	}
	if c.timer != nil {
		c.timerArmed.Store(false)
		c.timer.Stop()
	}
	c.agent.trackConn(c, false)
}

func (c *conn) log() logrus.FieldLogger {
	return c.agent.logger().WithField("remote", c.nc.RemoteAddr().String())
}

// plainRead reads with net.Conn.Read, for connections without raw access.
func (c *conn) plainRead() (int, error) {
	if c.in == nil {
		c.in, c.r, c.w = getBuffer(0), 0, 0
	}
	return c.nc.Read(c.in.b[c.w:])
}

// isNormalEnd reports a connection end that is no error: EOF, reset, or
// the socket closed by the agent itself.
func isNormalEnd(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed)
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
