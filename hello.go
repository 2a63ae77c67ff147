package spoe

import (
	"strings"
)

// capabilities is a set of SPOP capabilities.
type capabilities uint8

const (
	// capPipelining: several NOTIFYs in flight on a connection, ACKs in any
	// order on that same connection.
	capPipelining capabilities = 1 << iota
	// capAsync: an ACK may come back on any connection of the same engine-id
	// (HAProxy 2.6 to 3.0).
	capAsync
	// capFragmentation: the receiver accepts fragmented frames. It is
	// asymmetric: the agent announces it to receive fragmented NOTIFYs;
	// HAProxy never announces it and the agent never fragments.
	capFragmentation
)

var capNames = [...]struct {
	c    capabilities
	name string
}{
	{capPipelining, "pipelining"},
	{capAsync, "async"},
	{capFragmentation, "fragmentation"},
}

// parseCapabilities reads a comma-separated capability list the way HAProxy
// does: leading spaces skipped, a token ends at a comma, a space or the end,
// case matters, unknown tokens are ignored.
func parseCapabilities(s []byte) capabilities {
	var c capabilities
	for len(s) > 0 {
		for len(s) > 0 && s[0] == ' ' {
			s = s[1:]
		}
		end := 0
		for end < len(s) && s[end] != ',' && s[end] != ' ' {
			end++
		}
		tok := s[:end]
		for _, cn := range capNames {
			if string(tok) == cn.name {
				c |= cn.c
			}
		}
		// Skip the rest of the item, up to and past the next comma.
		for end < len(s) && s[end] != ',' {
			end++
		}
		if end < len(s) {
			end++
		}
		s = s[end:]
	}
	return c
}

// String returns the capabilities as SPOP's comma-separated list.
func (c capabilities) String() string {
	var b strings.Builder
	for _, cn := range capNames {
		if c&cn.c != 0 {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(cn.name)
		}
	}
	return b.String()
}

// haproxyHello is what a HAPROXY-HELLO says.
type haproxyHello struct {
	maxFrameSize uint64
	caps         capabilities
	engineID     string
	healthcheck  bool
}

// parseHAProxyHello reads a HAPROXY-HELLO payload: supported-versions must
// list 2.0, max-frame-size must be there and at least 256; capabilities,
// engine-id and healthcheck are optional; unknown keys are skipped.
func parseHAProxyHello(payload []byte) (haproxyHello, error) {
	var h haproxyHello
	var haveVersion, haveFrameSize, v20 bool
	for off := 0; off < len(payload); {
		e, next, err := readKV(payload, off)
		if err != nil {
			return haproxyHello{}, err
		}
		off = next
		switch string(e.key) {
		case "supported-versions":
			s, ok := stringValue(e.value)
			if !ok {
				return haproxyHello{}, errBadKVType
			}
			haveVersion = true
			v20 = supportsVersion20(s)
		case "max-frame-size":
			n, ok := e.value.Uint()
			if !ok {
				return haproxyHello{}, errBadKVType
			}
			haveFrameSize = true
			h.maxFrameSize = n
		case "capabilities":
			s, ok := stringValue(e.value)
			if !ok {
				return haproxyHello{}, errBadKVType
			}
			h.caps = parseCapabilities(s)
		case "engine-id":
			s, ok := stringValue(e.value)
			if !ok {
				return haproxyHello{}, errBadKVType
			}
			if len(s) > maxEngineID {
				return haproxyHello{}, errLongEngineID
			}
			h.engineID = string(s)
		case "healthcheck":
			b, ok := e.value.Bool()
			if !ok {
				return haproxyHello{}, errBadKVType
			}
			h.healthcheck = b
		}
	}
	switch {
	case !haveVersion:
		return haproxyHello{}, errNoVersion
	case !v20:
		return haproxyHello{}, errUnsupportedVersion
	case !haveFrameSize:
		return haproxyHello{}, errNoFrameSize
	case h.maxFrameSize < MinFrameSize:
		return haproxyHello{}, errBadFrameSize
	}
	return h, nil
}

// stringValue returns the bytes of a STRING value.
func stringValue(v Value) ([]byte, bool) {
	return v.data, v.typ == TypeString
}

// supportsVersion20 reports whether a comma-separated version list implies
// 2.0: it holds 2.<minor>, as a version implies the earlier minors of its
// major (doc/SPOE.txt, "supported-versions": "When a major version is
// announced by HAProxy, it means it also support all previous minor
// versions"), so "2.0,2.1" and "2.1" do. Spaces are ignored and the minor
// may have extra zeros ("2.00"), as HAProxy's own parser allows.
func supportsVersion20(list []byte) bool {
	for _, item := range strings.Split(string(list), ",") {
		item = strings.TrimSpace(item)
		major, minor, ok := strings.Cut(item, ".")
		if !ok || major != "2" || minor == "" || strings.Trim(minor, "0123456789") != "" {
			continue
		}
		return true
	}
	return false
}

// negotiateFrameSize returns the max-frame-size the agent answers: HAProxy's,
// lowered to the agent's limit, never below 256.
func negotiateFrameSize(haproxy uint64, agentLimit int) int {
	n := uint64(agentLimit)
	if haproxy < n {
		n = haproxy
	}
	if n < MinFrameSize {
		n = MinFrameSize
	}
	return int(n)
}

// agentCaps returns the capabilities the agent answers to a HAProxy that
// offered offered: "pipelining" and "async" when offered, "fragmentation"
// always; but not "pipelining" when HAProxy offered it without "async",
// as only the 3.1+ multiplexer does (2.6 to 3.0 offer both by default),
// unless keepPipelining.
//
// HAProxy 3.1+ stalls a connection for good when one read fills its demux
// buffer (mux_spop.c: spop_recv sets SPOP_CF_DEM_DFULL when a read takes
// all the room of the buffer, tune.bufsize bytes; SPOP_CF_DEM_BLOCK_ANY
// includes it, so spop_process never demuxes again, and only a demux
// clears it). With pipelining, up to 20 streams share a connection
// (spop_init: streams_limit = 20), and their ACKs can pile up unread in
// HAProxy's socket whatever the agent does: it cannot see HAProxy's reads.
// Without it, spop_conn_handle_hello sets streams_limit = 1: HAProxy sends
// the next NOTIFY only once the stream of the previous one is done, that
// is once its ACK was demuxed, so at most one ACK is ever unread, and an
// ACK is kept one byte under max-frame-size (ActionWriter.reset), itself
// at most tune.bufsize - 4: no read can fill the buffer. HAProxy opens
// more connections instead (as many as concurrent streams, within the
// server's maxconn, which counts streams anyway).
func agentCaps(offered capabilities, keepPipelining bool) capabilities {
	caps := offered&(capPipelining|capAsync) | capFragmentation
	if muxEngine(offered) && !keepPipelining {
		caps &^= capPipelining
	}
	return caps
}

// muxEngine reports whether a HAProxy that offered offered runs the 3.1+
// multiplexer (mux_spop.c): it offers "pipelining" but never "async",
// which 2.6 to 3.0 offer by default.
func muxEngine(offered capabilities) bool {
	return offered&capPipelining != 0 && offered&capAsync == 0
}

// helloFrameSize returns the max-frame-size the agent answers to h: the
// negotiated one (negotiateFrameSize), but the protocol's minimum to a
// health check. HAProxy 3.x's check (tcpcheck.c, tcpcheck_spop_expect_
// agenthello) announces 16380 whatever tune.bufsize is and fails an answer
// above tune.bufsize - 4, so that with "tune.bufsize 8192" the negotiated
// answer would put a working agent DOWN; 256 (SPOP_MIN_FRAME_SIZE) is
// accepted by every version, and a health check sends no other frame.
func helloFrameSize(h haproxyHello, agentLimit int) int {
	if h.healthcheck {
		return MinFrameSize
	}
	return negotiateFrameSize(h.maxFrameSize, agentLimit)
}

// appendHello appends a whole HELLO frame of type typ: the agent's
// (version) or HAProxy's (supported-versions, and engine-id when not
// empty), both offering SPOP 2.0. capabilities is always present, even
// empty: HAProxy 3.x's health check fails without it.
func appendHello(b []byte, typ frameType, maxFrameSize int, caps capabilities, engineID string) []byte {
	b, start := appendFrameHeader(b, typ, flagFin, 0, 0)
	if typ == frameHAProxyHello {
		b = appendName(b, "supported-versions")
	} else {
		b = appendName(b, "version")
	}
	b = appendTypedBytes(b, TypeString, "2.0")
	b = appendName(b, "max-frame-size")
	b = appendTypedInt(b, TypeUint32, uint64(maxFrameSize))
	b = appendName(b, "capabilities")
	b = appendTypedBytes(b, TypeString, caps.String())
	if engineID != "" {
		b = appendName(b, "engine-id")
		b = appendTypedBytes(b, TypeString, engineID)
	}
	finishFrame(b, start)
	return b
}

// agentHello is what an AGENT-HELLO says: the Client's side of the
// handshake. Zero values stand for keys not sent.
type agentHello struct {
	version      []byte // nil if absent
	maxFrameSize uint64
	hasFrameSize bool
	caps         capabilities
}

// parseAgentHello reads an AGENT-HELLO payload. Unknown keys are skipped;
// the caller checks the values against what it offered.
func parseAgentHello(payload []byte) (agentHello, error) {
	var h agentHello
	for off := 0; off < len(payload); {
		e, next, err := readKV(payload, off)
		if err != nil {
			return agentHello{}, err
		}
		off = next
		switch string(e.key) {
		case "version":
			s, ok := stringValue(e.value)
			if !ok {
				return agentHello{}, errBadKVType
			}
			h.version = s
		case "max-frame-size":
			n, ok := e.value.Uint()
			if !ok {
				return agentHello{}, errBadKVType
			}
			h.maxFrameSize, h.hasFrameSize = n, true
		case "capabilities":
			s, _ := stringValue(e.value)
			h.caps = parseCapabilities(s)
		}
	}
	return h, nil
}
