//go:build unix

package spoe

import (
	"syscall"
)

// initRawRead prepares reads that take a buffer only once data is there:
// through syscall.RawConn, the read callback runs when the socket is
// readable, so a connection waiting for its next frame holds no buffer.
func (c *conn) initRawRead() {
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	c.rc = rc
	c.readFn = c.rawRead
}

// read reads into the read buffer, taking one if the connection has none.
func (c *conn) read() (int, error) {
	if c.rc == nil {
		return c.plainRead()
	}
	c.readN, c.readErr = 0, nil
	if err := c.rc.Read(c.readFn); err != nil {
		return 0, err
	}
	return c.readN, c.readErr
}

// rawRead is the syscall.RawConn read callback. It returns false, holding
// no buffer, when the socket has nothing to read yet.
func (c *conn) rawRead(fd uintptr) bool {
	buf := c.in
	if buf == nil {
		buf = getBuffer(0)
	}
	for {
		n, err := syscall.Read(int(fd), buf.b[c.w:])
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			if c.in == nil {
				putBuffer(buf)
			}
			return false
		}
		c.in = buf
		if n < 0 {
			n = 0
		}
		c.readN, c.readErr = n, err
		return true
	}
}

// readNow reads what the socket already holds into b, without waiting (the
// read deadline may have passed: Shutdown sets it so).
func (c *conn) readNow(b []byte) int {
	if c.rc == nil {
		return 0
	}
	n := 0
	_ = c.rc.Control(func(fd uintptr) {
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
