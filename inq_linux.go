package spoe

import (
	"syscall"
	"unsafe"
)

// unreadInSocket returns the bytes the socket has received and not yet
// given to the reader (TIOCINQ).
func (rd *frameReader) unreadInSocket() int {
	if rd.rc == nil {
		return 0
	}
	n := 0
	_ = rd.rc.Control(func(fd uintptr) {
		var v int32
		_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&v)))
		if errno == 0 && v > 0 {
			n = int(v)
		}
	})
	return n
}
