//go:build unix

package spoe

import (
	"syscall"
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

// read reads into the buffer, taking one if the reader has none.
func (rd *frameReader) read() (int, error) {
	if rd.rc == nil {
		return rd.plainRead()
	}
	rd.readN, rd.readErr = 0, nil
	if err := rd.rc.Read(rd.readFn); err != nil {
		return 0, err
	}
	return rd.readN, rd.readErr
}

// rawRead is the syscall.RawConn read callback. It returns false, holding
// no buffer, when the socket has nothing to read yet.
func (rd *frameReader) rawRead(fd uintptr) bool {
	buf := rd.in
	if buf == nil {
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
