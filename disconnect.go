package spoe

import (
	"fmt"
	"time"

	"github.com/pkg/errors"
)

// Status is the status code of a DISCONNECT frame. Codes 0 to 13 and 99 are
// HAProxy's; an agent may use others of its own.
type Status uint32

// The status codes HAProxy defines.
const (
	StatusNormal                    Status = 0  // normal close
	StatusIO                        Status = 1  // I/O error
	StatusTimeout                   Status = 2  // a timeout occurred
	StatusFrameTooBig               Status = 3  // frame is too big
	StatusInvalidFrame              Status = 4  // invalid frame received
	StatusNoVersion                 Status = 5  // version value not found
	StatusNoFrameSize               Status = 6  // max-frame-size value not found
	StatusNoCapabilities            Status = 7  // capabilities value not found
	StatusUnsupportedVersion        Status = 8  // unsupported version
	StatusBadFrameSize              Status = 9  // max-frame-size too big or too small
	StatusFragmentationNotSupported Status = 10 // fragmentation not supported
	StatusInterlacedFrames          Status = 11 // invalid interlaced frames
	StatusFrameIDNotFound           Status = 12 // frame-id not found
	StatusResourceAllocation        Status = 13 // resource allocation error
	StatusUnknown                   Status = 99 // an unknown error occurred
)

var statusMessages = [...]string{
	StatusNormal:                    "normal",
	StatusIO:                        "I/O error",
	StatusTimeout:                   "a timeout occurred",
	StatusFrameTooBig:               "frame is too big",
	StatusInvalidFrame:              "invalid frame received",
	StatusNoVersion:                 "version value not found",
	StatusNoFrameSize:               "max-frame-size value not found",
	StatusNoCapabilities:            "capabilities value not found",
	StatusUnsupportedVersion:        "unsupported version",
	StatusBadFrameSize:              "max-frame-size too big or too small",
	StatusFragmentationNotSupported: "fragmentation not supported",
	StatusInterlacedFrames:          "invalid interlaced frames",
	StatusFrameIDNotFound:           "frame-id not found",
	StatusResourceAllocation:        "resource allocation error",
}

// String returns HAProxy's message for the status, the text that travels in
// the DISCONNECT frame's "message".
func (s Status) String() string {
	if int(s) < len(statusMessages) {
		return statusMessages[s]
	}
	if s == StatusUnknown {
		return "an unknown error occurred"
	}
	return fmt.Sprintf("status %d", uint32(s))
}

// protocolError is a protocol violation by the peer, with the status the
// agent answers it with.
type protocolError struct {
	status Status
	msg    string
}

func (e *protocolError) Error() string { return "spoe: " + e.msg }

// Protocol errors found in frames, each with its AGENT-DISCONNECT status.
var (
	errFrameTooSmall      = &protocolError{StatusInvalidFrame, "frame shorter than its header"}
	errFrameTooBig        = &protocolError{StatusFrameTooBig, "frame longer than max-frame-size"}
	errNotHello           = &protocolError{StatusInvalidFrame, "first frame is not a HAPROXY-HELLO"}
	errSecondHello        = &protocolError{StatusInvalidFrame, "HAPROXY-HELLO after the handshake"}
	errBadIDs             = &protocolError{StatusInvalidFrame, "stream-id or frame-id not 0 in a connection frame"}
	errAgentFrame         = &protocolError{StatusInvalidFrame, "agent frame type received from HAProxy"}
	errNoVersion          = &protocolError{StatusNoVersion, "HAPROXY-HELLO without supported-versions"}
	errUnsupportedVersion = &protocolError{StatusUnsupportedVersion, "HAProxy supports no SPOP version 2.0"}
	errNoFrameSize        = &protocolError{StatusNoFrameSize, "HAPROXY-HELLO without max-frame-size"}
	errBadFrameSize       = &protocolError{StatusBadFrameSize, "max-frame-size below 256"}
	errBadKVType          = &protocolError{StatusInvalidFrame, "HELLO or DISCONNECT value of the wrong type"}
	errLongEngineID       = &protocolError{StatusInvalidFrame, "engine-id longer than 128 bytes"}
	errFragmented         = &protocolError{StatusFragmentationNotSupported, "fragmented frame, fragmentation not announced"}
	errInterlaced         = &protocolError{StatusInterlacedFrames, "frame interlaced with a fragmented NOTIFY"}
)

// statusOf returns the status to answer err with: its own for a protocol
// error, StatusInvalidFrame for a decoding error.
func statusOf(err error) Status {
	var pe *protocolError
	if errors.As(err, &pe) {
		return pe.status
	}
	return StatusInvalidFrame
}

// disconnect is the content of a DISCONNECT frame.
type disconnect struct {
	status  Status
	message string
}

// parseDisconnect reads a HAPROXY-DISCONNECT payload. Unknown keys are
// skipped; a missing status-code reads as StatusNormal.
func parseDisconnect(payload []byte) (disconnect, error) {
	var d disconnect
	for off := 0; off < len(payload); {
		e, next, err := readKV(payload, off)
		if err != nil {
			return disconnect{}, err
		}
		off = next
		switch string(e.key) {
		case "status-code":
			n, ok := e.value.Uint()
			if !ok || n > 1<<32-1 {
				return disconnect{}, errBadKVType
			}
			d.status = Status(n)
		case "message":
			s, ok := e.value.Bytes()
			if !ok {
				return disconnect{}, errBadKVType
			}
			d.message = string(s)
		}
	}
	return d, nil
}

// maxDisconnectMessage is the longest message HAProxy 2.6 accepts in an
// AGENT-DISCONNECT: it treats a longer one as an invalid frame.
const maxDisconnectMessage = 255

// appendDisconnect appends a whole DISCONNECT frame of type typ: the
// agent's or HAProxy's.
func appendDisconnect(b []byte, typ frameType, s Status, message string) []byte {
	if len(message) > maxDisconnectMessage {
		message = message[:maxDisconnectMessage]
	}
	b, start := appendFrameHeader(b, typ, flagFin, 0, 0)
	b = appendName(b, "status-code")
	b = appendTypedInt(b, TypeUint32, uint64(s))
	b = appendName(b, "message")
	b = appendTypedBytes(b, TypeString, message)
	finishFrame(b, start)
	return b
}

// shutdownGrace is how long the agent lets HAProxy 3.1+ take in the last
// ACKs of a connection it shuts down before its AGENT-DISCONNECT follows
// (see goodbye).
const shutdownGrace = 100 * time.Millisecond

// goodbye sends the AGENT-DISCONNECT of a shutdown, after what is queued.
// HAProxy 3.1.0's multiplexer lets the connection error that an
// AGENT-DISCONNECT raises override ACKs it demuxed in the same read but had
// not handed to their streams yet (spop_conn_handle_disconnect; fixed in
// 3.2-dev): those events then fail (256+1). So to the multiplexer the
// AGENT-DISCONNECT goes shutdownGrace after the last ACKs, in a read of its
// own.
func (c *conn) goodbye() {
	if c.muxEngine {
		c.wr.waitIdle()
		time.Sleep(shutdownGrace)
	}
	c.disconnect(StatusNormal, StatusNormal.String())
}

// onDisconnect answers HAProxy's DISCONNECT with its own status.
func (c *conn) onDisconnect(f *frame) error {
	d, err := parseDisconnect(f.payload)
	if err != nil {
		return err
	}
	c.stats.countDisconnect(d.status, true)
	entry := c.log().WithField("status", uint32(d.status)).WithField("message", d.message)
	if d.status == StatusNormal || d.status == StatusTimeout {
		entry.Debug("spoe: HAProxy closed the connection")
	} else {
		entry.Warn("spoe: HAProxy closed the connection on an error")
	}
	// HAProxy reads nothing but the AGENT-DISCONNECT from now on: with
	// async, the ACKs gathered go to another connection of the engine,
	// once this one takes no more frames (the AGENT-DISCONNECT closes it
	// for writing), so that the engine cannot choose it.
	var held []byte
	if c.engine != nil && c.out != nil && len(c.out.b) > 0 {
		held = append(held, c.out.b...)
		c.out.b = c.out.b[:0]
	} else {
		_ = c.flush()
	}
	c.disconnect(d.status, d.status.String())
	if held != nil {
		c.reroute(held)
	}
	return errPeerClosed
}
