package spoe

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/errors"
)

// frameWriter is a connection's write side. Whole frames only: each call
// brings a run of them (the ACKs of one batch, an ACK from a handler that
// ran in a goroutine of its own, an AGENT-HELLO or AGENT-DISCONNECT). One
// goroutine writes at a time; the frames others bring meanwhile are
// gathered and leave together in its next write, so that a burst costs one
// write, not one per frame.
//
// The frames gathered while a write blocks (a peer that does not read)
// are bounded: beyond maxPending bytes for the connection, or the agent's
// backlog budget for the frames pending and being written from pending in
// all connections, a goroutine that brings more waits until the write
// under way takes them or ends (written, or failed at its WriteTimeout).
// A handler's goroutine so holds its slot, and the reading goroutine stops
// reading: the peer is held back by TCP. The waiters only wait while a
// write of their own connection is under way: when none is, they write
// themselves, so that one big ACK never waits forever, and frames written
// so are their caller's (an in-flight ACK, or the reading role's gathered
// ones), not the backlog's.
//
// Ownership: any goroutine may call write and closeWrite. mu guards
// writing, closed and pending; dlAt belongs to the goroutine that set
// writing; nc, timeout, stats, maxPending and budget are set before the
// connection is served.
type frameWriter struct {
	nc         net.Conn
	timeout    time.Duration
	stats      *stats
	maxPending int            // MaxACKBacklog
	budget     *backlogBudget // the agent's: MaxACKBacklogTotal
	window     *ackWindow     // pipelining with HAProxy 3.1+ only; the writing goroutine's

	mu      sync.Mutex
	cond    sync.Cond // signalled when writing ends
	writing bool      // a goroutine is writing
	closed  bool      // no frame is accepted any more
	pending []byte    // frames brought while writing
	dlAt    time.Time // the write deadline set last
}

// errWriteClosed: write did not take the frames, the connection being
// closed for writing: they are still the caller's.
var errWriteClosed = errors.New("spoe: connection closed for write")

// writeError is a write that failed. lost holds the frames that were not
// written, the caller's and those gathered from others, to be handed over
// (async) or dropped by the connection.
type writeError struct {
	err  error
	lost []byte
}

func (e *writeError) Error() string { return "spoe: write: " + e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// testHookBacklogWait, when set by a test, is called with the writer's
// mutex held each time a goroutine waits for room.
var testHookBacklogWait atomic.Pointer[func()]

// backlogBudget counts the bytes pending in every writer of the agent.
type backlogBudget struct {
	max  int64
	used atomic.Int64
}

func (fw *frameWriter) init(nc net.Conn, timeout time.Duration, st *stats, maxPending int, budget *backlogBudget) {
	fw.nc, fw.timeout, fw.stats = nc, timeout, st
	fw.maxPending, fw.budget = maxPending, budget
	fw.cond.L = &fw.mu
}

// full reports whether n more pending bytes would exceed the bounds, with
// mu held: the connection's (a run is taken whatever its size when
// nothing is pending) or the agent's (pending and being written).
func (fw *frameWriter) full(n int) bool {
	if len(fw.pending) > 0 && len(fw.pending)+n > fw.maxPending {
		return true
	}
	return fw.budget != nil && fw.budget.used.Load()+int64(n) > fw.budget.max
}

// release gives back to the agent's budget n bytes written or dropped.
func (fw *frameWriter) release(n int) {
	if fw.budget != nil && n > 0 {
		fw.budget.used.Add(-int64(n))
	}
}

// addPending appends frames to those pending, with mu held.
func (fw *frameWriter) addPending(frames []byte) {
	fw.pending = append(fw.pending, frames...)
	if fw.budget != nil {
		fw.budget.used.Add(int64(len(frames)))
	}
}

// takePending hands the pending frames to the writer, with mu held, and
// wakes the goroutines waiting for room. They stay counted in the agent's
// budget until written.
func (fw *frameWriter) takePending() []byte {
	p := fw.pending
	fw.pending = nil
	fw.cond.Broadcast()
	return p
}

// write sends whole frames, or gathers them into the write under way.
// With last, they are the connection's last: nothing is accepted after
// them. It returns errWriteClosed when it did not take the frames, a
// *writeError when the connection failed while they were being written
// (the write side is then closed), else nil.
func (fw *frameWriter) write(frames []byte, last bool) error {
	fw.mu.Lock()
	for fw.writing && !fw.closed && fw.full(len(frames)) {
		if hook := testHookBacklogWait.Load(); hook != nil {
			(*hook)()
		}
		fw.cond.Wait() // back-pressure: see frameWriter
	}
	if fw.closed {
		fw.mu.Unlock()
		return errWriteClosed
	}
	if last {
		fw.closed = true
	}
	if fw.writing {
		fw.addPending(frames)
		fw.mu.Unlock()
		return nil
	}
	fw.writing = true
	fw.mu.Unlock()

	batch, owned := frames, false // owned: batch is a former fw.pending
	for {
		out := batch // what is written: batch, or the window's copy of it
		if fw.window != nil {
			out = fw.window.admit(batch)
		}
		n, err := fw.writeOut(out)
		fw.mu.Lock()
		if owned {
			fw.release(len(batch))
		}
		if err != nil {
			fw.closed = true
			fw.release(len(fw.pending))
			lost := append(append([]byte(nil), unwritten(out, n)...), fw.takePending()...)
			fw.writing = false
			fw.cond.Broadcast()
			fw.mu.Unlock()
			return &writeError{err: err, lost: lost}
		}
		if len(fw.pending) == 0 {
			if owned && cap(batch) <= 64<<10 {
				fw.pending = batch[:0] // kept for the next burst
			}
			fw.writing = false
			fw.cond.Broadcast()
			fw.mu.Unlock()
			return nil
		}
		next := fw.takePending()
		if owned {
			fw.pending = batch[:0]
		}
		batch, owned = next, true
		fw.mu.Unlock()
	}
}

// writeOut performs one write, with a write deadline refreshed lazily.
func (fw *frameWriter) writeOut(b []byte) (int, error) {
	d := fw.timeout
	if time.Until(fw.dlAt) < d-d/8 {
		fw.dlAt = time.Now().Add(d)
		_ = fw.nc.SetWriteDeadline(fw.dlAt)
	}
	// Counted before the write, so that whoever reads a frame sees it
	// counted; what the write did not complete is taken back.
	fw.stats.countFramesOut(b, 1)
	n, err := fw.nc.Write(b)
	if err == nil {
		fw.stats.writes.Add(1)
	} else {
		fw.stats.countFramesOut(unwritten(b, n), -1)
	}
	return n, err
}

// closeWrite waits for the write under way and accepts no more.
func (fw *frameWriter) closeWrite() {
	fw.mu.Lock()
	for fw.writing {
		fw.cond.Wait()
	}
	fw.closed = true
	fw.mu.Unlock()
}

// waitIdle waits for the write under way, if any.
func (fw *frameWriter) waitIdle() {
	fw.mu.Lock()
	for fw.writing {
		fw.cond.Wait()
	}
	fw.mu.Unlock()
}

// close accepts no more frames, without waiting.
func (fw *frameWriter) close() {
	fw.mu.Lock()
	fw.closed = true
	fw.cond.Broadcast()
	fw.mu.Unlock()
}

// The connection's side of writing: the ACKs the reading role gathers
// (c.out, the reading role's) leave in one write before it blocks; an ACK
// that cannot leave on its connection is handed to its engine (async) or
// dropped, and counted.

// outBuf returns the gathered ACKs' buffer, taking one if needed: a
// pooled one counted in the agent's budget, or, when the budget is spent,
// a small one of its own (ACKs are then written rather than gathered).
// It never grows: see gather and outRoom.
func (c *conn) outBuf() []byte {
	if c.out == nil {
		if c.agent.buffers.tryTake(minBufferSize) {
			c.out, c.outPaid = getBuffer(0), minBufferSize
			c.out.b = c.out.b[:0]
		} else {
			c.out, c.outPaid = &buffer{b: make([]byte, 0, smallOut)}, 0
		}
	}
	return c.out.b
}

// smallOut is the size of the gathered ACKs' buffer taken when the
// budget is spent: room for the agent's own frames (maxDisconnectFrame).
const smallOut = 512

// outRoom returns the gathered ACKs' buffer with room for n more bytes,
// writing what it holds first if need be.
func (c *conn) outRoom(n int) []byte {
	if b := c.outBuf(); len(b)+n > cap(b) && len(b) > 0 {
		c.disarm()
		_ = c.flush() // a failure ends the connection: see write
	}
	return c.out.b
}

// putOut gives the gathered ACKs' buffer back.
func (c *conn) putOut() {
	if c.out != nil {
		c.agent.buffers.release(c.outPaid)
		putBuffer(c.out)
		c.out, c.outPaid = nil, 0
	}
}

// gather adds frames to those written before the next blocking read: into
// the gathered ACKs' buffer while they fit in it; else they and those
// gathered before are written at once (and wait, if the peer does not
// read: see frameWriter). Frames that will be the last before the next
// blocking read (nothing is left unread) and that find none gathered are
// written at once, with no copy.
func (c *conn) gather(frames []byte) {
	if (c.out == nil || len(c.out.b) == 0) && c.rd.empty() {
		c.disarm()
		_ = c.writeOut(frames) // a failure ends the connection: see write
		return
	}
	b := c.outRoom(len(frames))
	if len(b)+len(frames) > cap(b) {
		c.disarm()
		_ = c.writeOut(frames)
		return
	}
	c.out.b = append(b, frames...)
}

// writeOut writes frames of the reading role's, as flush does, with the
// requests counted before their ACKs leave (see recentStats).
func (c *conn) writeOut(frames []byte) error {
	c.recent.flush()
	err := c.write(frames, false)
	if err != nil && errors.Is(err, errWriteClosed) {
		c.reroute(frames)
	}
	return err
}

// flush writes the gathered frames. With none, it still counts the
// requests seen (see recentStats): it runs before each blocking read.
func (c *conn) flush() error {
	if c.out == nil || len(c.out.b) == 0 {
		c.recent.flush()
		return nil
	}
	err := c.writeOut(c.out.b)
	c.out.b = c.out.b[:0]
	return err
}

// write hands whole frames to the writer (see frameWriter.write). A write
// that fails ends the connection: the frames it did not write are rerouted.
func (c *conn) write(frames []byte, last bool) error {
	err := c.wr.write(frames, last)
	if err != nil {
		c.writeFailed(err)
	}
	return err
}

// writeFailed ends the connection after a write that failed (a
// *writeError; errWriteClosed is left to the caller).
func (c *conn) writeFailed(err error) {
	if we := (*writeError)(nil); errors.As(err, &we) {
		if !isNormalEnd(we.err) {
			c.log().WithError(we.err).Warn("spoe: write failed, closing the connection")
		}
		c.reroute(we.lost)
		c.closeSocket()
	}
}

// deliver sends the ACK of a handler that ran out of the reading role: on
// its own connection, or with async on any live one of its engine.
func (c *conn) deliver(ack []byte) {
	if err := c.write(ack, false); !errors.Is(err, errWriteClosed) {
		return // written, or rerouted with what failed with it
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
	c.stats.acksDropped.Add(uint64(countFrames(acks)))
}

// rerouteOut reroutes the ACKs gathered for a peer that will not read them.
func (c *conn) rerouteOut() {
	if c.out != nil && len(c.out.b) > 0 {
		c.reroute(c.out.b)
		c.out.b = c.out.b[:0]
	}
}

// ackWindow keeps what HAProxy 3.1+ may have unread on a connection the
// agent pipelines with below its demux buffer (see pipelinedACKCap for why
// that buffer must never fill). HAProxy reads the agent's bytes in the
// order they were written, and every ACK it has not demuxed is the answer
// of a stream still open, of which a pipelining connection has at most
// muxStreamsLimit: so the ACKs HAProxy may have unread are among the last
// muxStreamsLimit written. The window holds their sizes; an ACK that would
// make them exceed limit is replaced, as it is written, by an ACK of the
// same ids that sets only the error variable (HAProxy's rules see it, as
// for an action refused for max-frame-size), and refused is called. Only
// the writing goroutine uses it.
type ackWindow struct {
	limit   int // the bytes the last muxStreamsLimit ACKs may hold together
	sizes   [muxStreamsLimit]int
	next    int // the oldest of sizes, replaced next
	sum     int // of sizes
	errVar  string
	refused func()
	out     []byte // the batch rebuilt when an ACK is replaced
}

// admit returns batch, whole frames, as it may be written: itself, or a
// copy in which the ACKs that do not fit the window are replaced.
func (w *ackWindow) admit(batch []byte) []byte {
	rebuilt := false
	off := 0
	for f, rest, ok := splitFrame(batch); ok; f, rest, ok = splitFrame(rest) {
		isACK := len(f) > lengthSize && frameType(f[lengthSize]) == frameAck
		switch {
		case !isACK || w.fits(len(f)):
			if isACK {
				w.add(len(f))
			}
			if rebuilt {
				w.out = append(w.out, f...)
			}
		default:
			if !rebuilt {
				rebuilt = true
				w.out = append(w.out[:0], batch[:off]...)
			}
			start := len(w.out)
			w.out = w.errorACK(w.out, f)
			w.add(len(w.out) - start)
			if w.refused != nil {
				w.refused()
			}
		}
		off += len(f)
	}
	if !rebuilt {
		return batch
	}
	return w.out
}

// fits reports whether an ACK of n bytes may follow the last ones.
func (w *ackWindow) fits(n int) bool {
	return w.sum-w.sizes[w.next]+n <= w.limit
}

func (w *ackWindow) add(n int) {
	w.sum += n - w.sizes[w.next]
	w.sizes[w.next] = n
	w.next = (w.next + 1) % len(w.sizes)
}

// errorACK appends to b the ACK that replaces ack: the same stream-id and
// frame-id, setting only the error variable (a NOOP if there is none).
func (w *ackWindow) errorACK(b, ack []byte) []byte {
	fr, err := parseFrame(ack[lengthSize:])
	if err != nil { // not built by the agent: cannot happen
		return b
	}
	b, start := appendFrameHeader(b, frameAck, flagFin, fr.streamID, fr.frameID)
	if w.errVar == "" {
		b = append(b, actionNoop)
	} else {
		b = append(b, actionSetVar, 3, byte(VarScopeTransaction))
		b = appendName(b, w.errVar)
		b = appendTypedBool(b, true)
	}
	finishFrame(b, start)
	return b
}
