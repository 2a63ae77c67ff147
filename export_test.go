package spoe

// What tests need of the package's internals, kept out of its code.

import (
	"encoding/binary"
	"io"
	"net"
)

// readFrame reads exactly one whole frame from r and returns the bytes
// after its length prefix, reading nothing of the next one: the blocking
// reader of the tests' fake peers, which read frames one at a time from
// connections they also read by other means. The agent and the Client
// read with frameReader.
func readFrame(r io.Reader, buf []byte, maxFrameSize int) ([]byte, error) {
	var hdr [lengthSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if err := checkLength(n, maxFrameSize); err != nil {
		return nil, err
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}

// varintLen returns how many bytes appendVarint writes for x.
func varintLen(x uint64) int {
	if x < 240 {
		return 1
	}
	n := 2
	x = (x - 240) >> 4
	for x >= 128 {
		x = (x - 128) >> 7
		n++
	}
	return n
}

// testConn returns a connection of a, not served, over nc.
func testConn(a *Agent, nc net.Conn) *conn {
	a.init()
	return newConn(a, a.config(), nc)
}

// KeepPipelining makes a answer "pipelining" to HAProxy 3.1+ too, which
// the library does not by default (see agentCaps): the end-to-end
// reproducer of HAProxy's stall, and unit tests whose Client looks like
// 3.1+, use it.
func KeepPipelining(a *Agent) { a.keepPipelining = true }
