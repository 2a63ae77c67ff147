package spoe

import (
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The outcome of one bad input.
type outcome int

const (
	disconnects   outcome = iota // AGENT-DISCONNECT with a status, then a close
	goesOn                       // ignored or handled: the connection keeps working
	closesQuietly                // closed without a frame (the peer left)
)

// TestBadInputHurtsOnlyItsConnection is the table of hostile or broken input, over a real socket.
// Each row checks its outcome and that another connection of the same
// agent is unaffected. The README's robustness table comes from it.
func TestBadInputHurtsOnlyItsConnection(t *testing.T) {
	notify := func(sid uint64) []byte {
		payload, _ := appendMessages(nil, []ClientMessage{ipRep(net.IP{1, 2, 3, 4})})
		return rawFrame(frameNotify, flagFin, sid, 1, payload)
	}
	hello := func(kvs ...interface{}) []byte {
		return rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(kvs...))
	}
	length := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
	tests := []struct {
		name       string
		handshake  bool   // a HELLO first
		send       []byte // then these bytes
		outcome    outcome
		status     Status // for disconnects
		peerCloses bool   // the peer closes its side after sending
	}{
		{"zero length", false, length(0), disconnects, StatusInvalidFrame, false},
		{"frame above 16 KiB before the handshake", false, append(length(16<<10+1), 1), disconnects, StatusFrameTooBig, false},
		{"length above max-frame-size, refused before its payload", true, append(length(16381), 3), disconnects, StatusFrameTooBig, false},
		{"4 GiB length", true, length(0xFFFFFFFF), disconnects, StatusFrameTooBig, false},
		{"truncated header, then the peer leaves", true, []byte{0, 0}, closesQuietly, 0, true},
		{"an HTTP request instead of SPOP", false, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), disconnects, StatusFrameTooBig, false},
		{"garbage frame of an unknown type (SPOP: ignored)", true, append(length(40), []byte(strings.Repeat("\xa5\x17", 20))...), goesOn, 0, false},
		{"NOTIFY of garbage", true, rawFrame(frameNotify, flagFin, 3, 1, []byte(strings.Repeat("\xa5\x17", 20))), disconnects, StatusInvalidFrame, false},
		{"11-byte varint stream-id", true, append(length(17), unhex(t, "03 00 00 00 01 FF FF FF FF FF FF FF FF FF FF 00 00")...), disconnects, StatusInvalidFrame, false},
		{"string length past the frame", true, rawFrame(frameNotify, flagFin, 1, 1, unhex(t, "01 6D 01 01 61 08 10 61")), disconnects, StatusInvalidFrame, false},
		{"nb-args larger than present", true, rawFrame(frameNotify, flagFin, 1, 1, unhex(t, "01 6D 03 01 61 04 01")), disconnects, StatusInvalidFrame, false},
		{"unknown type byte", true, rawFrame(frameNotify, flagFin, 1, 1, unhex(t, "01 6D 01 01 61 0C")), disconnects, StatusInvalidFrame, false},
		{"NOTIFY before HELLO", false, notify(1), disconnects, StatusInvalidFrame, false},
		{"second HELLO", true, hello("supported-versions", "2.0", "max-frame-size", uint32(16380)), disconnects, StatusInvalidFrame, false},
		{"HELLO without version", false, hello("max-frame-size", uint32(16380)), disconnects, StatusNoVersion, false},
		{"HELLO without max-frame-size", false, hello("supported-versions", "2.0"), disconnects, StatusNoFrameSize, false},
		{"HELLO version 1.0", false, hello("supported-versions", "1.0", "max-frame-size", uint32(16380)), disconnects, StatusUnsupportedVersion, false},
		{"HELLO version 3.0", false, hello("supported-versions", "3.0", "max-frame-size", uint32(16380)), disconnects, StatusUnsupportedVersion, false},
		{"HELLO version abc", false, hello("supported-versions", "abc", "max-frame-size", uint32(16380)), disconnects, StatusUnsupportedVersion, false},
		{"HELLO max-frame-size 255", false, hello("supported-versions", "2.0", "max-frame-size", uint32(255)), disconnects, StatusBadFrameSize, false},
		{"HELLO with non-zero ids", false, rawFrame(frameHAProxyHello, flagFin, 1, 0, helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380))), disconnects, StatusInvalidFrame, false},
		{"HELLO without FIN", false, rawFrame(frameHAProxyHello, 0, 0, 0, helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380))), disconnects, StatusFragmentationNotSupported, false},
		{"UNSET with no NOTIFY", true, rawFrame(frameUnset, flagFin, 1, 1, []byte("x")), goesOn, 0, false},
		{"ABORT of a fragmented NOTIFY", true, append(rawFrame(frameNotify, 0, 9, 1, []byte{1, 'm'}), rawFrame(frameUnset, flagFin|flagAbort, 9, 1, nil)...), goesOn, 0, false},
		{"NOTIFY interlaced with a fragmented one", true, append(rawFrame(frameNotify, 0, 1, 1, []byte{1, 'm'}), notify(2)...), disconnects, StatusInterlacedFrames, false},
		{"duplicate ids in flight", true, append(notify(5), notify(5)...), goesOn, 0, false},
		{"an agent frame type from the peer", true, rawFrame(frameAck, flagFin, 1, 1, nil), disconnects, StatusInvalidFrame, false},
		{"an unknown frame type", true, rawFrame(frameType(42), flagFin, 1, 1, []byte("xyz")), goesOn, 0, false},
		{"DISCONNECT with a bad status type", true, rawFrame(frameHAProxyDisconnect, flagFin, 0, 0, helloPayload("status-code", "x")), disconnects, StatusInvalidFrame, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := New(seedHandler)
			addr := startAgent(t, a)
			other := dialAgent(t, addr, ClientConfig{})
			p := dialRaw(t, addr)
			if tt.handshake {
				p.hello("pipelining", "e", 16380)
			}
			p.send(tt.send)
			switch tt.outcome {
			case goesOn:
				p.send(notify(7))
				for {
					f := p.next()
					require.Equal(t, frameAck, f.typ, "the connection goes on")
					if f.streamID == 7 {
						break
					}
				}
			case disconnects:
				p.expectDisconnect(tt.status)
			case closesQuietly:
				p.expectClosed()
			}
			_, err := other.Notify(notifyCtx(t), ipRep(net.IP{1, 1, 1, 1}))
			assert.NoError(t, err, "another connection is unaffected")
		})
	}
}

// TestHelloMaxFrameSizeAboveLimit: a HELLO offering more than the agent
// accepts is answered with the agent's limit; negotiation, not an error.
func TestHelloMaxFrameSizeAboveLimit(t *testing.T) {
	p := dialRaw(t, startAgent(t, &Agent{MaxFrameSize: 65536}))
	h := p.hello("pipelining", "e", 1<<31)
	n, _ := h["max-frame-size"].Uint()
	assert.Equal(t, uint64(65536), n)
}

// TestDuplicateIDsBothAnswered: two NOTIFYs with the same ids in flight are
// both handled and answered (HAProxy drops the ACK it no longer expects).
func TestDuplicateIDsBothAnswered(t *testing.T) {
	p := dialRaw(t, startAgent(t, New(seedHandler)))
	p.hello("pipelining", "e", 16380)
	payload, _ := appendMessages(nil, []ClientMessage{ipRep(net.IP{1, 2, 3, 4})})
	f := rawFrame(frameNotify, flagFin, 5, 1, payload)
	p.send(append(append([]byte{}, f...), f...))
	for i := 0; i < 2; i++ {
		ack := p.next()
		assert.Equal(t, frameAck, ack.typ)
		assert.Equal(t, uint64(5), ack.streamID)
	}
}

// TestSlowPeerCannotOutlastReadTimeout: a peer sending one byte at a time cannot hold a connection
// open past ReadTimeout: the frame's deadline runs from its first byte.
func TestSlowPeerCannotOutlastReadTimeout(t *testing.T) {
	a := &Agent{ReadTimeout: 500 * time.Millisecond}
	p := dialRaw(t, startAgent(t, a))
	p.hello("pipelining", "e", 16380)
	payload, _ := appendMessages(nil, []ClientMessage{ipRep(net.IP{1, 2, 3, 4})})
	frame := rawFrame(frameNotify, flagFin, 1, 1, payload)
	start := time.Now()
	tick := time.NewTicker(50 * time.Millisecond) // 20 bytes a second
	defer tick.Stop()
	for _, b := range frame[:len(frame)-1] {
		<-tick.C
		if _, err := p.nc.Write([]byte{b}); err != nil {
			break // closed by the agent
		}
	}
	p.expectDisconnect(StatusTimeout)
	elapsed := time.Since(start)
	assert.Less(t, elapsed, 3*time.Second)
	assert.GreaterOrEqual(t, elapsed, 400*time.Millisecond)
}
