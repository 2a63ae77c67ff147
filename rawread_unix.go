//go:build unix

package spoe

import (
	"syscall"

	"github.com/pkg/errors"
)

// initRawRead prepares reads that take a buffer only once data is there:
// through syscall.RawConn, the read callback runs when the socket is
// readable, so a reader waiting for its next frame holds no buffer.
func (rd *frameReader) initRawRead() {
	sc, ok := rd.src.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	rd.rc = rc
	rd.readFn = rd.rawRead
}

// read reads into the buffer, taking one if the reader has none. When the
// budget is spent, the first bytes go to head and the reader then waits
// for the budget (waitHead).
func (rd *frameReader) read() (int, error) {
	if rd.rc == nil {
		return rd.plainRead()
	}
	rd.readN, rd.readErr = 0, nil
	if err := rd.rc.Read(rd.readFn); err != nil {
		return 0, err
	}
	if rd.readErr == errNoBuffer {
		return rd.waitHead()
	}
	return rd.readN, rd.readErr
}

// errNoBuffer: rawRead read into head, the budget being spent.
var errNoBuffer = errors.New("spoe: no buffer")

// rawRead is the syscall.RawConn read callback. It returns false, holding
// no buffer, when the socket has nothing to read yet.
func (rd *frameReader) rawRead(fd uintptr) bool {
	buf := rd.in
	if buf == nil {
		if !rd.budget.tryTake(minBufferSize) {
			return rd.rawReadHead(fd)
		}
		buf = getBuffer(0)
	}
	for {
		n, err := syscall.Read(int(fd), buf.b[rd.w:])
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			if rd.in == nil {
				putBuffer(buf)
				rd.budget.release(minBufferSize)
			}
			return false
		}
		rd.in = buf
		if n < 0 {
			n = 0
		}
		rd.readN, rd.readErr = n, err
		return true
	}
}

// rawReadHead is rawRead without a buffer: it reads the first bytes into
// head, so that the reader waits for the budget only once bytes came.
func (rd *frameReader) rawReadHead(fd uintptr) bool {
	for {
		n, err := syscall.Read(int(fd), rd.head[:])
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		switch {
		case n > 0:
			rd.headN, rd.readErr = n, errNoBuffer
		case err != nil:
			rd.readErr = err
		}
		return true
	}
}

// readNow reads what the socket already holds into b, without waiting.
func (rd *frameReader) readNow(b []byte) int {
	if rd.rc == nil {
		return 0
	}
	n := 0
	_ = rd.rc.Control(func(fd uintptr) {
		for {
			m, err := syscall.Read(int(fd), b)
			if err == syscall.EINTR {
				continue
			}
			if err == nil && m > 0 {
				n = m
			}
			return
		}
	})
	return n
}
