package spoe

// A frame on the wire:
//
//	LENGTH:u32be  TYPE:u8  FLAGS:u32be  STREAM-ID:varint  FRAME-ID:varint  PAYLOAD
//
// LENGTH counts everything after itself and is bounded by the max-frame-size
// the two peers agreed on in the handshake.

import (
	"encoding/binary"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// frameType is the TYPE byte of a frame.
type frameType uint8

const (
	frameUnset             frameType = 0 // continuation fragment of a NOTIFY
	frameHAProxyHello      frameType = 1
	frameHAProxyDisconnect frameType = 2
	frameNotify            frameType = 3
	frameAgentHello        frameType = 101
	frameAgentDisconnect   frameType = 102
	frameAck               frameType = 103
)

func (t frameType) String() string {
	switch t {
	case frameUnset:
		return "UNSET"
	case frameHAProxyHello:
		return "HAPROXY-HELLO"
	case frameHAProxyDisconnect:
		return "HAPROXY-DISCONNECT"
	case frameNotify:
		return "NOTIFY"
	case frameAgentHello:
		return "AGENT-HELLO"
	case frameAgentDisconnect:
		return "AGENT-DISCONNECT"
	case frameAck:
		return "ACK"
	}
	return "UNKNOWN"
}

// Frame flags. Only FIN and ABORT are defined; the others are reserved.
const (
	flagFin   uint32 = 0x00000001
	flagAbort uint32 = 0x00000002
)

const (
	// lengthSize is the size of the LENGTH prefix.
	lengthSize = 4
	// minFrameLength is the smallest LENGTH: type, flags and two 1-byte ids.
	minFrameLength = 1 + 4 + 1 + 1
	// maxFrameHeader bounds a frame's header after its LENGTH: type,
	// flags and the two ids' varints.
	maxFrameHeader = 1 + 4 + 10 + 10
	// MinFrameSize is the smallest max-frame-size SPOP allows.
	MinFrameSize = 256
)

// frame is one decoded frame. Its payload is a view of the buffer it was
// parsed from.
type frame struct {
	typ      frameType
	flags    uint32
	streamID uint64
	frameID  uint64
	payload  []byte
}

func (f *frame) fin() bool   { return f.flags&flagFin != 0 }
func (f *frame) abort() bool { return f.flags&flagAbort != 0 }

// checkLength bounds a frame's LENGTH before anything of its body is read.
func checkLength(n uint32, maxFrameSize int) error {
	if n < minFrameLength {
		return errFrameTooSmall
	}
	if uint64(n) > uint64(maxFrameSize) {
		return errFrameTooBig
	}
	return nil
}

// parseFrame decodes a frame's header from b, which holds the LENGTH bytes
// that follow the length prefix.
func parseFrame(b []byte) (frame, error) {
	var f frame
	err := f.parse(b)
	return f, err
}

// parse is parseFrame into f (the reader's frame: no copy of a frame on the
// way); f is left unspecified on an error.
func (f *frame) parse(b []byte) error {
	if len(b) < minFrameLength {
		return errFrameTooSmall
	}
	f.typ, f.flags = frameType(b[0]), binary.BigEndian.Uint32(b[1:5])
	var err error
	off := 5
	if f.streamID, off, err = readVarint(b, off); err != nil {
		return err
	}
	if f.frameID, off, err = readVarint(b, off); err != nil {
		return err
	}
	f.payload = b[off:]
	return nil
}

// appendFrameHeader starts a frame in b: a length placeholder, type, flags
// and ids. It returns the extended buffer and the frame's start offset, to be
// given to finishFrame once the payload is appended.
func appendFrameHeader(b []byte, t frameType, flags uint32, streamID, frameID uint64) ([]byte, int) {
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(t), byte(flags>>24), byte(flags>>16), byte(flags>>8), byte(flags))
	b = appendVarint(b, streamID)
	b = appendVarint(b, frameID)
	return b, start
}

// appendFrame appends a whole frame with that payload.
func appendFrame(b []byte, t frameType, flags uint32, streamID, frameID uint64, payload []byte) []byte {
	b, start := appendFrameHeader(b, t, flags, streamID, frameID)
	b = append(b, payload...)
	finishFrame(b, start)
	return b
}

// finishFrame writes the LENGTH of the frame that starts at b[start:] and
// runs to the end of b.
func finishFrame(b []byte, start int) {
	putUint32(b[start:], uint32(len(b)-start-lengthSize))
}

// splitFrame is the one walker over runs of whole frames: it splits the
// first frame (length prefix included) off b. ok is false when b does not
// start with a whole frame.
func splitFrame(b []byte) (f, rest []byte, ok bool) {
	if len(b) < lengthSize {
		return nil, b, false
	}
	n := lengthSize + int(binary.BigEndian.Uint32(b))
	if len(b) < n {
		return nil, b, false
	}
	return b[:n], b[n:], true
}

// countFrames returns the number of whole frames at the start of b, a run
// of frames the agent built.
func countFrames(b []byte) int {
	n := 0
	for _, rest, ok := splitFrame(b); ok; _, rest, ok = splitFrame(rest) {
		n++
	}
	return n
}

// ackFrames returns the ACK frames of b, a run of whole frames the agent
// built, leaving out the others (an AGENT-DISCONNECT must not go to another
// connection).
func ackFrames(b []byte) []byte {
	var acks []byte
	for f, rest, ok := splitFrame(b); ok; f, rest, ok = splitFrame(rest) {
		if len(f) > lengthSize && frameType(f[lengthSize]) == frameAck {
			acks = append(acks, f...)
		}
	}
	return acks
}

// unwritten returns the frames of b from the first one not wholly among
// its first n bytes.
func unwritten(b []byte, n int) []byte {
	done := 0
	for f, rest, ok := splitFrame(b); ok && done+len(f) <= n; f, rest, ok = splitFrame(rest) {
		done += len(f)
	}
	return b[done:]
}

// buffer is a pooled byte buffer for reading frames and gathering ACKs.
// Buffers come in size classes, powers of two from minBufferSize, so that a
// connection reading small frames never holds a big buffer.
type buffer struct {
	b []byte
}

const (
	minBufferShift = 15 // 32 KiB: a default 16 KiB frame and its neighbours
	minBufferSize  = 1 << minBufferShift
	bufferClasses  = 17 // up to 2 GiB; bigger ones are not pooled
)

var bufferPools [bufferClasses]sync.Pool

// bufferClass returns the smallest class holding n bytes.
func bufferClass(n int) int {
	if n <= minBufferSize {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// getBuffer returns a buffer of at least n bytes (at least minBufferSize),
// with len(b) == cap(b).
func getBuffer(n int) *buffer {
	c := bufferClass(n)
	if c >= bufferClasses {
		return &buffer{b: make([]byte, n)}
	}
	if v := bufferPools[c].Get(); v != nil {
		buf := v.(*buffer)
		buf.b = buf.b[:cap(buf.b)]
		return buf
	}
	return &buffer{b: make([]byte, minBufferSize<<c)}
}

// bufferSize returns the size of the buffer getBuffer(n) returns.
func bufferSize(n int) int {
	if c := bufferClass(n); c < bufferClasses {
		return minBufferSize << c
	}
	return n
}

// allocSize bounds what make([]byte, n) takes: Go rounds a small object up
// to its size class (at most the next power of two), a large one to pages.
func allocSize(n int) int {
	if n <= 32<<10 {
		s := 8
		for s < n {
			s <<= 1
		}
		return s
	}
	return (n + 8<<10 - 1) &^ (8<<10 - 1)
}

// putBuffer gives a buffer back to its pool; one of another size than the
// pool's (grown by append) is left to the collector.
func putBuffer(buf *buffer) {
	n := cap(buf.b)
	if n < minBufferSize {
		return
	}
	c := bits.Len(uint(n)) - 1 - minBufferShift
	if c >= bufferClasses || n != minBufferSize<<c {
		return
	}
	buf.b = buf.b[:cap(buf.b)]
	if poisonViews {
		poison(buf.b)
	}
	bufferPools[c].Put(buf)
}

// bufferBudget is the agent-wide count of the bytes that buffers hold for
// frames (Agent.MaxBufferBytes): the read buffers connections take, the
// gathered-ACK buffers, the copies of frames handed to dispatched
// handlers, and what the simple API's decoded messages cost. Taking and
// giving back bytes is one atomic operation each while nobody waits.
//
// Who may wait, and why no wait can last for ever:
//
//   - A reader that has bytes of a frame and needs a buffer for them waits
//     (take), within its read deadline, holding at most its current buffer:
//     once it knows a frame's LENGTH it asks for the whole frame's buffer
//     at once, never for part of it. A reader with nothing to read waits in
//     the poller, holding nothing.
//   - The simple API's decoding waits (takeDecode) holding its frame; it
//     waits only while another decoding holds bytes, which its handler gives
//     back when it returns; with none held it takes what it needs beyond the
//     bound (at most one NOTIFY's decoding is so over it at a time).
//   - Everything else only tries (tryTake) and, when the budget is spent,
//     does without: a frame is handled inline instead of being copied, ACKs
//     are written instead of gathered, a slow inline handler is not rescued.
//
// So every waiter waits for holders that need nothing from the budget to
// give their bytes back: handlers running (their time, then at most
// WriteTimeout to deliver their ACK), readers within their read deadline.
//
// Waiters are served in order, and a newcomer does not pass them (tryTake
// fails while anyone waits), so that a big request is not starved by small
// ones.
type bufferBudget struct {
	max     int64
	used    atomic.Int64
	waiting atomic.Int32 // goroutines in queue

	decodes atomic.Int64 // bytes held by decodings

	mu    sync.Mutex
	queue []*budgetWaiter
}

// budgetWaiter is one goroutine waiting for n bytes.
type budgetWaiter struct {
	n       int64
	decode  bool
	granted bool          // under bufferBudget.mu
	ready   chan struct{} // closed when granted
}

// tryTake takes n bytes if they are free and nobody waits. A nil budget
// takes anything, and nothing is always taken.
func (b *bufferBudget) tryTake(n int) bool {
	if b == nil || n == 0 {
		return true
	}
	for b.waiting.Load() == 0 {
		u := b.used.Load()
		if u+int64(n) > b.max && u > 0 {
			return false
		}
		if b.used.CompareAndSwap(u, u+int64(n)) {
			return true
		}
	}
	return false
}

// release gives n bytes back and serves the waiters they let through.
func (b *bufferBudget) release(n int) {
	if b == nil || n == 0 {
		return
	}
	b.used.Add(-int64(n))
	if b.waiting.Load() > 0 {
		b.mu.Lock()
		b.grant()
		b.mu.Unlock()
	}
}

// fits reports whether n more bytes are within the bound, with mu held. A
// request bigger than the bound is served when nothing else is held.
func (b *bufferBudget) fits(n int64) bool {
	u := b.used.Load()
	return u+n <= b.max || u == 0
}

// grant serves the waiters in order while their requests fit, with mu
// held; and, while no decoding holds bytes, the first decoding waiting
// whatever the bound (see bufferBudget).
func (b *bufferBudget) grant() {
	for len(b.queue) > 0 && b.fits(b.queue[0].n) {
		b.grantLocked(0)
	}
	if b.decodes.Load() > 0 {
		return
	}
	for i, w := range b.queue {
		if w.decode {
			b.grantLocked(i)
			return
		}
	}
}

// grantLocked gives the waiter at queue[i] its bytes, with mu held.
func (b *bufferBudget) grantLocked(i int) {
	w := b.queue[i]
	b.used.Add(w.n)
	if w.decode {
		b.decodes.Add(w.n)
	}
	w.granted = true
	close(w.ready)
	b.dequeue(i)
}

// dequeue takes the i-th waiter out of the queue, with mu held.
func (b *bufferBudget) dequeue(i int) {
	b.queue = append(b.queue[:i], b.queue[i+1:]...)
	b.waiting.Add(-1)
}

// take takes n bytes, waiting for them until stop is closed or the
// deadline (none if zero) passes: then it returns errDraining or
// os.ErrDeadlineExceeded, holding nothing.
func (b *bufferBudget) take(n int, stop <-chan struct{}, deadline time.Time) error {
	if b.tryTake(n) {
		return nil
	}
	w := b.enqueue(int64(n), false)
	if w == nil {
		return nil
	}
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		timeout = t.C
	}
	var err error
	select {
	case <-w.ready:
		return nil
	case <-stop:
		err = errDraining
	case <-timeout:
		err = os.ErrDeadlineExceeded
	}
	b.mu.Lock()
	if w.granted {
		b.mu.Unlock()
		b.release(n)
		return err
	}
	for i, q := range b.queue {
		if q == w {
			b.dequeue(i)
			break
		}
	}
	b.grant() // those behind it may fit now
	b.mu.Unlock()
	return err
}

// enqueue takes n bytes at once if they fit and nobody waits (nil), or
// queues a waiter for them.
func (b *bufferBudget) enqueue(n int64, decode bool) *budgetWaiter {
	b.mu.Lock()
	defer b.mu.Unlock()
	// Counted as waiting before the bound is read, so that a release
	// either is seen here or sees the waiter (see release).
	b.waiting.Add(1)
	if len(b.queue) == 0 && b.fits(n) || decode && b.decodes.Load() == 0 {
		b.waiting.Add(-1)
		b.used.Add(n)
		if decode {
			b.decodes.Add(n)
		}
		return nil
	}
	w := &budgetWaiter{n: n, decode: decode, ready: make(chan struct{})}
	b.queue = append(b.queue, w)
	return w
}

// takeDecode takes n bytes for a decoding, waiting for them while another
// decoding holds bytes (see bufferBudget). A nil budget takes anything.
func (b *bufferBudget) takeDecode(n int) {
	if b == nil {
		return
	}
	if b.tryTake(n) {
		b.decodes.Add(int64(n))
		return
	}
	if w := b.enqueue(int64(n), true); w != nil {
		<-w.ready
	}
}

// releaseDecode gives back the bytes of a decoding.
func (b *bufferBudget) releaseDecode(n int) {
	if b == nil {
		return
	}
	b.decodes.Add(-int64(n))
	b.release(n)
}
