package spoe

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pkg/errors"
)

// frameReader reads the frames of one connection: the agent's (conn.go)
// and the client's (client.go). It reads into a pooled buffer, as much as
// the socket holds, and returns each whole frame as a view of that buffer.
// A frame's LENGTH is checked against the negotiated max-frame-size before
// any of its body is awaited; a frame that does not fit the buffer gets
// one of its size at once (so that a reader never waits for the budget
// twice for one frame). With nothing unread, the buffer
// is given back before the next blocking read; on unix the read takes one
// only once the socket is readable (rawread_unix.go), so an idle
// connection holds no read buffer.
//
// Every buffer the agent's reader holds is counted in the agent's buffer
// budget (budget; nil for the client's): one of minBufferSize to read a
// frame's start, then, once a LENGTH says the frame will not fit, the
// whole frame's buffer at once (grow). When the budget is spent, the
// reader waits before it reads on (see bufferBudget): a reader that has
// nothing to read waits in the poller, holding nothing; one with bytes of
// a frame waits within the frame's read deadline. Bytes read before the
// reader could take a buffer wait in head.
//
// Ownership: every field but stopMu, stopped and stopCh belongs to the goroutine
// that holds the connection's reading role: for the agent, the one running
// conn.loop (see sched.go for how the role may move); for the client, its
// readLoop. stop may be called from any goroutine.
type frameReader struct {
	src io.Reader
	nc  net.Conn        // src when it is a connection: for read deadlines
	rc  syscall.RawConn // nil: plain blocking reads

	in       *buffer // nil when idle
	r, w     int     // unread bytes: in.b[r:w]
	maxFrame int     // LENGTH bound
	frames   uint64  // frames returned
	skip     int     // bytes of a frame being skipped still to come
	need     int     // bytes of the frame at r, when more than the buffer holds from r

	budget *bufferBudget // the agent's; nil: no bound
	head   [lengthSize]byte
	headN  int // bytes in head: read before a buffer could be taken

	// The raw read callback and its results (rawread_unix.go).
	readFn  func(fd uintptr) bool
	readN   int
	readErr error

	// The read deadline: what it is for, when it fires, and the frame
	// count when it was set.
	dlKind       int
	dlAt         time.Time
	dlFrames     uint64
	frameTimeout time.Duration // the last armDeadline's, for waits

	stopMu  sync.Mutex // orders deadline changes with stop
	stopped atomic.Bool
	stopCh  chan struct{} // closed by stop; made by the first wait for the budget
	// stopUnread: the bytes the socket held, unread, when stop was
	// called, written before stopped is set; then what is left of them
	// to drain, the reading role's.
	stopUnread int
}

// Read deadline kinds.
const (
	deadlineNone  = iota
	deadlineIdle  // waiting for the next frame
	deadlineFrame // waiting for the rest of a frame (or for the HELLO)

	deadlineUnknown = -1 // the socket's deadline is not known: set it
)

// errDraining: the reader was stopped (Agent.Shutdown).
var errDraining = errors.New("spoe: agent shutting down")

// init prepares rd to read frames of at most maxFrame bytes from src.
func (rd *frameReader) init(src io.Reader, maxFrame int) {
	rd.src, rd.maxFrame = src, maxFrame
	rd.nc, _ = src.(net.Conn)
	rd.initRawRead()
}

// empty reports whether no byte is left unread.
func (rd *frameReader) empty() bool { return rd.r == rd.w && rd.headN == 0 }

// buffered decodes into f the next frame if it is whole in the buffer
// (ok). Its LENGTH is checked first: a bad one is an error whatever
// follows. When the frame is not whole yet, room is made for it.
func (rd *frameReader) buffered(f *frame) (ok bool, err error) {
	if rd.skip > 0 {
		d := rd.w - rd.r
		if d > rd.skip {
			d = rd.skip
		}
		rd.r += d
		rd.skip -= d
		if rd.skip > 0 {
			return false, nil
		}
	}
	n := rd.w - rd.r
	if n < lengthSize {
		return false, nil
	}
	length := binary.BigEndian.Uint32(rd.in.b[rd.r:])
	if err := checkLength(length, rd.maxFrame); err != nil {
		return false, err
	}
	total := lengthSize + int(length)
	if n < total {
		if len(rd.in.b)-rd.r < total {
			rd.need = total // fill makes room for it
		}
		return false, nil
	}
	b := rd.in.b[rd.r+lengthSize : rd.r+total : rd.r+total]
	rd.r += total
	rd.frames++
	if err = f.parse(b); err != nil {
		return false, err
	}
	return true, nil
}

// peek returns the LENGTH of the frame at the head of the buffer and up to
// max bytes of it after the LENGTH, as far as they were read. The buffer
// holds at least the LENGTH (buffered checked it).
func (rd *frameReader) peek(max int) (length uint32, head []byte) {
	length = binary.BigEndian.Uint32(rd.in.b[rd.r:])
	end := rd.w
	if end-(rd.r+lengthSize) > max {
		end = rd.r + lengthSize + max
	}
	return length, rd.in.b[rd.r+lengthSize : end]
}

// skipFrame drops the frame of total bytes at the head of the buffer, as
// its bytes come, without holding it: buffered goes on after it.
func (rd *frameReader) skipFrame(total int) {
	rd.skip = total
	rd.frames++
}

// next returns the next frame, reading as needed, without deadlines: the
// client's way. The frame is a view of the buffer, valid until the next
// call.
func (rd *frameReader) next() (frame, error) {
	var f frame
	for {
		if ok, err := rd.buffered(&f); ok || err != nil {
			return f, err
		}
		if err := rd.fill(); err != nil {
			return frame{}, err
		}
	}
}

// grow makes room in the buffer for the frame of rd.need bytes that
// starts at rd.r: the bytes before it are dropped, and, if the buffer is
// still too small, the whole frame's buffer is taken at once. With wait,
// the budget is waited for within the read deadline; without, the buffer
// stays as it is when the budget is spent.
func (rd *frameReader) grow(wait bool) error {
	total := rd.need
	if total == 0 || len(rd.in.b)-rd.r >= total {
		rd.need = 0
		return nil
	}
	if len(rd.in.b) >= total {
		rd.w = copy(rd.in.b, rd.in.b[rd.r:rd.w])
		rd.r, rd.need = 0, 0
		return nil
	}
	more := bufferSize(total) - len(rd.in.b)
	if wait {
		if err := rd.budget.take(more, rd.stopChan(), rd.waitDeadline()); err != nil {
			return err
		}
	} else if !rd.budget.tryTake(more) {
		return nil
	}
	nb := getBuffer(total)
	rd.w = copy(nb.b, rd.in.b[rd.r:rd.w])
	rd.r, rd.need = 0, 0
	putBuffer(rd.in) // its bytes are the new buffer's now: counted in more
	rd.in = nb
	return nil
}

// takeBuffer gives the reader a buffer of minBufferSize, already counted
// in the budget, holding the bytes of head.
func (rd *frameReader) takeBuffer() {
	rd.in = getBuffer(0)
	rd.r, rd.w = 0, copy(rd.in.b, rd.head[:rd.headN])
	rd.headN = 0
}

// waitHead waits for the budget to take a buffer for the bytes read into
// head, within the frame's read deadline, and returns their count. On
// failure they stay in head for the next read.
//
// When head holds a whole LENGTH within bounds, the buffer is the whole
// frame's, taken at once.
func (rd *frameReader) waitHead() (int, error) {
	size := minBufferSize
	if rd.headN == lengthSize {
		if length := binary.BigEndian.Uint32(rd.head[:]); checkLength(length, rd.maxFrame) == nil {
			size = bufferSize(lengthSize + int(length))
		}
	}
	at := rd.waitDeadline()
	if err := rd.budget.take(size, rd.stopChan(), at); err != nil {
		return 0, err
	}
	if !at.IsZero() && rd.nc != nil {
		// The frame's deadline runs from its first byte, the wait
		// included: it is not armed afresh for the rest of the frame.
		if err := rd.capDeadline(at); err != nil {
			rd.budget.release(size)
			return 0, err
		}
	}
	n := rd.headN
	rd.in = getBuffer(size)
	rd.r, rd.w = 0, copy(rd.in.b, rd.head[:n])
	rd.headN = 0
	rd.w = 0 // counted by fill
	return n, nil
}

// stopChan returns the channel stop closes.
func (rd *frameReader) stopChan() <-chan struct{} {
	rd.stopMu.Lock()
	defer rd.stopMu.Unlock()
	if rd.stopCh == nil {
		rd.stopCh = make(chan struct{})
		if rd.stopped.Load() {
			close(rd.stopCh)
		}
	}
	return rd.stopCh
}

// waitDeadline returns when a wait for the budget gives up: at the read
// deadline, and at the latest frameTimeout after the bytes that wait came
// (a frame's deadline runs from its first byte).
func (rd *frameReader) waitDeadline() time.Time {
	at := time.Now().Add(rd.frameTimeout)
	if rd.frameTimeout <= 0 {
		at = time.Time{}
	}
	if rd.dlKind != deadlineNone && rd.dlKind != deadlineUnknown && (at.IsZero() || rd.dlAt.Before(at)) {
		at = rd.dlAt
	}
	return at
}

// fill reads more bytes, blocking until some come. With nothing unread,
// it gives the buffer back first: frames returned before are invalid.
func (rd *frameReader) fill() error {
	switch {
	case rd.r == rd.w:
		rd.release()
	case rd.need > 0:
		if err := rd.grow(true); err != nil {
			return err
		}
	case rd.w == len(rd.in.b):
		// Full with less than a length prefix at its end.
		rd.w = copy(rd.in.b, rd.in.b[rd.r:rd.w])
		rd.r = 0
	}
	var n int
	var err error
	if rd.in == nil && rd.headN > 0 {
		n, err = rd.waitHead()
	} else {
		n, err = rd.read()
	}
	rd.w += n
	if n > 0 {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.EOF
		if rd.w > rd.r {
			err = io.ErrUnexpectedEOF // in the middle of a frame
		}
	}
	return err
}

// fillNow reads what the socket already holds, at most max bytes,
// without waiting (the read deadline may have passed: stop sets it so).
// It returns the bytes read.
func (rd *frameReader) fillNow(max int) int {
	if rd.in == nil {
		if !rd.budget.tryTake(minBufferSize) {
			return 0
		}
		rd.takeBuffer()
	} else if rd.need > 0 {
		_ = rd.grow(false)
	}
	if rd.r > 0 {
		rd.w = copy(rd.in.b, rd.in.b[rd.r:rd.w])
		rd.r = 0
	}
	end := len(rd.in.b)
	if end-rd.w > max {
		end = rd.w + max
	}
	if rd.w == end {
		return 0
	}
	n := rd.readNow(rd.in.b[rd.w:end])
	rd.w += n
	return n
}

// plainRead reads with the source's Read, for sources without raw access
// (TLS). The agent's reader holds no buffer while it waits for a frame: it
// reads the frame's first bytes into head, then takes its buffer (waiting
// for the budget within the read deadline).
func (rd *frameReader) plainRead() (int, error) {
	if rd.in == nil {
		if rd.budget == nil {
			rd.in, rd.r, rd.w = getBuffer(0), 0, 0
		} else {
			if rd.headN == 0 {
				n, err := rd.src.Read(rd.head[:])
				if n <= 0 {
					return 0, err
				}
				rd.headN = n // an error with them comes again at the next read
			}
			return rd.waitHead()
		}
	}
	return rd.src.Read(rd.in.b[rd.w:])
}

// release gives the buffer back, dropping what is unread in it.
func (rd *frameReader) release() {
	if rd.in != nil {
		rd.budget.release(len(rd.in.b))
		putBuffer(rd.in)
		rd.in, rd.r, rd.w, rd.need = nil, 0, 0, 0
	}
}

// detachCost returns what detach may take from the budget: a buffer the
// size of the current one.
func (rd *frameReader) detachCost() int {
	if rd.in == nil {
		return 0
	}
	return len(rd.in.b)
}

// detach leaves the buffer, and the frames returned from it, to whoever
// took rd.in before (and gives it back with putBuffer and the budget's
// release): the reader goes on with the unread bytes in a buffer of its
// own, of at most paid bytes, taken from the budget by the caller (what
// it does not use is given back).
func (rd *frameReader) detach(paid int) {
	if rd.w > rd.r {
		nb := getBuffer(rd.w - rd.r)
		rd.w = copy(nb.b, rd.in.b[rd.r:rd.w])
		rd.r = 0
		rd.in = nb
		paid -= len(nb.b)
	} else {
		rd.in, rd.r, rd.w = nil, 0, 0
	}
	rd.budget.release(paid)
}

// armDeadline sets the read deadline for what the next read waits for: the
// rest of a frame, or the next frame when idle is set (no deadline if
// idleTimeout is zero). A frame's deadline is fixed once the frame began,
// so that a peer sending a byte at a time cannot stretch it. It returns
// errDraining once stop was called.
func (rd *frameReader) armDeadline(idle bool, frameTimeout, idleTimeout time.Duration) error {
	if rd.stopped.Load() {
		return errDraining
	}
	rd.frameTimeout = frameTimeout
	kind, d := deadlineFrame, frameTimeout
	if idle {
		kind, d = deadlineIdle, idleTimeout
		if d <= 0 {
			kind = deadlineNone
		}
	}
	switch {
	case kind == deadlineFrame && rd.dlKind == deadlineFrame && rd.dlFrames == rd.frames:
		return nil // the frame's deadline runs from its first byte
	case kind == deadlineNone && rd.dlKind == deadlineNone:
		return nil
	case kind == rd.dlKind && time.Until(rd.dlAt) > d-d/8:
		// Refreshed lazily: an idle deadline fires between 7/8 and 8/8 of
		// d after the last frame, a frame's between 7/8 and 8/8 of d after
		// its first byte.
		rd.dlFrames = rd.frames
		return nil
	}
	rd.stopMu.Lock()
	defer rd.stopMu.Unlock()
	if rd.stopped.Load() {
		return errDraining
	}
	rd.setDeadlineLocked(kind, d)
	return nil
}

// capDeadline brings the read deadline forward to at when it is later or
// unset: a fragmented NOTIFY's deadline (reassembly.go) bounds the reads
// that wait for its fragments. It returns errDraining once stop was
// called.
func (rd *frameReader) capDeadline(at time.Time) error {
	if rd.dlKind != deadlineNone && rd.dlKind != deadlineUnknown && !rd.dlAt.After(at) {
		return nil
	}
	rd.stopMu.Lock()
	defer rd.stopMu.Unlock()
	if rd.stopped.Load() {
		return errDraining
	}
	rd.dlKind, rd.dlAt, rd.dlFrames = deadlineFrame, at, rd.frames
	if rd.nc != nil {
		_ = rd.nc.SetReadDeadline(at)
	}
	return nil
}

// resetDeadline makes the next armDeadline set the socket's deadline
// afresh, whatever it is for.
func (rd *frameReader) resetDeadline() { rd.dlKind, rd.dlAt = deadlineUnknown, time.Time{} }

// setDeadlineLocked sets the deadline, with stopMu held.
func (rd *frameReader) setDeadlineLocked(kind int, d time.Duration) {
	var at time.Time
	if kind != deadlineNone {
		at = time.Now().Add(d)
	}
	rd.dlKind, rd.dlAt, rd.dlFrames = kind, at, rd.frames
	_ = rd.nc.SetReadDeadline(at)
}

// stop makes the reader's blocked read return at once, and every later
// armDeadline return errDraining. Any goroutine may call it.
func (rd *frameReader) stop() {
	rd.stopMu.Lock()
	if !rd.stopped.Load() {
		rd.stopUnread = rd.unreadInSocket()
	}
	if !rd.stopped.Load() && rd.stopCh != nil {
		close(rd.stopCh)
	}
	rd.stopped.Store(true)
	if rd.nc != nil {
		_ = rd.nc.SetReadDeadline(time.Unix(1, 0))
	}
	rd.stopMu.Unlock()
}

// isNormalEnd reports a connection end that is no error: EOF, reset, or
// the socket closed by the agent itself.
func isNormalEnd(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed)
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
