package spoe

import (
	"syscall"
	"unsafe"
)

// unreadInSocket returns the bytes the socket has received and not yet
// given to the reader (TIOCINQ).
func (rd *frameReader) unreadInSocket() int { return rd.socketQueue(syscall.TIOCINQ) }

// sentAndAcked reports whether the peer's TCP acknowledged every byte
// written to the socket (TIOCOUTQ is zero): closing then cannot lose them.
func (rd *frameReader) sentAndAcked() bool {
	return rd.rc != nil && rd.socketQueueOK(syscall.TIOCOUTQ) == 0
}

// socketQueue returns the length of one of the socket's queues, 0 when
// it cannot be known.
func (rd *frameReader) socketQueue(req uintptr) int {
	if n := rd.socketQueueOK(req); n > 0 {
		return n
	}
	return 0
}

// socketQueueOK is socketQueue, -1 when it cannot be known.
func (rd *frameReader) socketQueueOK(req uintptr) int {
	if rd.rc == nil { // not a socket of its own (TLS, a pipe)
		return -1
	}
	n := -1
	_ = rd.rc.Control(func(fd uintptr) {
		var v int32
		_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(&v)))
		if errno == 0 {
			n = int(v)
		}
	})
	return n
}
