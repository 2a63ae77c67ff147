package spoe

import (
	"math"
	"strings"
	"sync/atomic"
	"time"
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
// always; but to the 3.1+ multiplexer, which offers "pipelining" without
// "async" (2.6 to 3.0 offer both by default), "pipelining" only if
// pipeline (see conn.pipelining for when the agent pipelines with it).
func agentCaps(offered capabilities, pipeline bool) capabilities {
	caps := offered&(capPipelining|capAsync) | capFragmentation
	if muxEngine(offered) && !pipeline {
		caps &^= capPipelining
	}
	return caps
}

// muxStreamsLimit is how many streams HAProxy 3.1+ runs at once on a
// connection whose agent answered "pipelining" (mux_spop.c, spop_init:
// streams_limit = 20); without it, spop_conn_handle_hello sets 1.
const muxStreamsLimit = 20

// learnACKs is how many ACKs the agent must have built, none of them
// above a connection's pipelinedACKCap, before it answers "pipelining" to
// that 3.1+ HAProxy: as many as one pipelining connection can hold unread.
// The window (ackWindow) keeps HAProxy safe whatever the count; the count
// makes it rarer that an agent whose answers are often big pipelines on
// the word of a few small ones and then has big answers replaced (an
// agent with one answer in ten above the cap passes 20 small ones in a row
// 12% of the time, 43% of the time for 8).
const learnACKs = muxStreamsLimit

// helloHoldMax bounds how long a HAPROXY-HELLO from 3.1+ waits, while the
// agent has not learnt its answers' size yet and another 3.1+ connection
// is open to learn it on (see conn.pipelining). The events HAProxy queued
// on that connection wait with it, and fail if their "timeout processing"
// strikes first: HAProxy's SPOE documentation shows 10 ms. A connection
// whose HELLO waited in vain does not pipeline. A variable only for tests.
var helloHoldMax = 5 * time.Millisecond

// helloHoldPoll is how often a held HELLO looks at what was learnt.
const helloHoldPoll = 200 * time.Microsecond

// maxDisconnectFrame is the longest AGENT-DISCONNECT the agent writes,
// its LENGTH included (appendDisconnect keeps the message to 255 bytes).
var maxDisconnectFrame = len(appendDisconnect(nil, frameAgentDisconnect,
	Status(math.MaxUint32), strings.Repeat("x", maxDisconnectMessage)))

// pipelinedWindow returns the bytes the last muxStreamsLimit ACK frames
// (their 4-byte LENGTHs included) written on a connection the agent
// pipelines with a HAProxy 3.1+ that announced max-frame-size
// haproxyMaxFrame may hold together (see ackWindow), and pipelinedACKCap
// S, its muxStreamsLimit-th part: the size of an answer the agent calls
// small. With the window kept, HAProxy's demux buffer never stalls.
//
// HAProxy 3.1+ stalls a connection for good when one read fills its demux
// buffer (mux_spop.c: spop_recv reads at most max = b_room(dbuf) and sets
// SPOP_CF_DEM_DFULL when it got all of it; SPOP_CF_DEM_BLOCK_ANY, 0x7E0,
// includes DFULL, 0x40, despite its comment, and spop_process demuxes,
// which alone clears DFULL, only without any of them). The demux buffer
// holds tune.bufsize bytes, at least max-frame-size + 4 (HAProxy announces
// tune.bufsize - 4, or a smaller "max-frame-size" of the spoe-agent, which
// flt_spoe.c keeps at most tune.bufsize - 4). A read fills it only if the
// bytes HAProxy has not demuxed (in the buffer and in its socket) reach
// tune.bufsize. Those are the agent's frames in the order it wrote them,
// and every ACK among them is the answer of a stream still open: a stream
// gives its place back (spop_strm_close: nb_streams--) only once its ACK
// was demuxed (in spop_conn_handle_ack, or in the SPOE applet's shutdown
// or detach after it), and a pipelining connection has at most
// muxStreamsLimit open (spop_stconn_new refuses more). HAProxy reads the
// agent's frames in order, so the ACKs it has not demuxed are at most the
// last 20 written, and the agent's last frame, an AGENT-DISCONNECT, may
// follow them: with the last 20 ACKs holding at most the window,
// max-frame-size + 3 - maxDisconnectFrame, all of it is less than
// tune.bufsize, and no read can fill the buffer. For the default
// tune.bufsize of 16384 the window is 16,088 bytes and S 804 bytes.
//
// The bound assumes that streams end through their ACK: one HAProxy ended
// without it ("timeout processing", an aborted client) frees its place
// while its ACK may still come, and the agent cannot see that. Without
// pipelining the same holds of one ACK per stream.
func pipelinedWindow(haproxyMaxFrame uint64) int {
	if haproxyMaxFrame > math.MaxInt32 {
		haproxyMaxFrame = math.MaxInt32
	}
	if room := int(haproxyMaxFrame) + lengthSize - 1 - maxDisconnectFrame; room > 0 {
		return room
	}
	return 0
}

func pipelinedACKCap(haproxyMaxFrame uint64) int {
	return pipelinedWindow(haproxyMaxFrame) / muxStreamsLimit
}

// newACKWindow returns the window of a connection the agent pipelines
// with a HAProxy 3.1+ that announced max-frame-size haproxyMaxFrame.
func (c *conn) newACKWindow(haproxyMaxFrame uint64) *ackWindow {
	return &ackWindow{
		limit:  pipelinedWindow(haproxyMaxFrame),
		errVar: c.cfg.errorVar,
		refused: func() {
			c.agent.answers.capped.Store(true)
			c.stats.actionsRefused.Add(1)
			if ok, held := c.cfg.logs.allow("window"); ok {
				logHeld(c.cfg, held, "ACKs replaced by the error variable")
				c.log().Warn("spoe: an ACK replaced by the error variable: with the ACKs written just before it, it could have stalled HAProxy 3.1+ (see the README, Known HAProxy issues)")
			}
		},
	}
}

// answerSizes is what the agent learnt of its answers' size, on every
// connection (Agent.answers): it decides whether a 3.1+ HAProxy gets
// "pipelining" (see conn.pipelining).
type answerSizes struct {
	built  atomic.Uint32 // ACKs built by the handler, counted up to learnACKs
	max    atomic.Int64  // the largest of them, LENGTH included
	capped atomic.Bool   // an ackWindow replaced an ACK
	live   atomic.Int32  // 3.1+ connections past their HELLO's verdict or waiting for it, not closed
}

// observe records one ACK the handler's answer made, n bytes long.
func (s *answerSizes) observe(n int) {
	if s.built.Load() < learnACKs {
		s.built.Add(1)
	}
	for {
		m := s.max.Load()
		if int64(n) <= m || s.max.CompareAndSwap(m, int64(n)) {
			break
		}
	}
}

// verdict says whether a connection whose ACKs would be capped at
// capBytes may pipeline, minCap being the least cap an ACK with the error
// variable fits in; learnt is false while the answers seen so far do not
// decide it yet.
func (s *answerSizes) verdict(capBytes, minCap int) (pipeline, learnt bool) {
	if s.capped.Load() || capBytes < minCap || s.max.Load() > int64(capBytes) {
		return false, true
	}
	if s.built.Load() < learnACKs {
		return false, false
	}
	return true, true
}

// pipelining decides, at the handshake with a HAProxy 3.1+ (h), whether
// the agent answers "pipelining".
//
// The agent pipelines once it has built learnACKs ACKs, none of them above
// pipelinedACKCap, and no ACK was replaced by its ackWindow since: until then (a fresh
// agent) it answers as to a connection whose answers may be big, without
// "pipelining". At the agent's start HAProxy opens many connections at
// once, and it keeps and reuses them: answered so, they would carry the
// load without pipelining for good. So the first 3.1+ connection answers
// at once, and learns; while another one is open (past its HELLO or at
// it), a HELLO waits for the verdict, at most helloHoldMax. A health check
// never waits.
//
// On a pipelining connection the connection's ackWindow keeps HAProxy
// safe: a big answer goes out whole when the ACKs written just before it
// leave room (an occasional big answer among small ones), and is replaced
// by the error variable otherwise (HAProxy's rules see it, as for an
// action refused for max-frame-size); an answer above the cap, or a
// replacement, stops "pipelining" for the connections opened afterwards.
// HAProxy keeps those already open, and prefers them (backend.c,
// be_reuse_connection takes a connection with room for streams before an
// idle one): after answers grew above the cap for good, only about one big
// answer in muxStreamsLimit gets through on them while the load lasts.
func (c *conn) pipelining(h haproxyHello) bool {
	if h.healthcheck {
		return false
	}
	capBytes := pipelinedACKCap(h.maxFrameSize)
	minCap := lengthSize + maxFrameHeader + 1 + c.cfg.errorVarRoom
	s := &c.agent.answers
	others := int32(-1)
	c.lifeMu.Lock()
	if !c.closed {
		c.live = true
		others = s.live.Add(1) - 1
	}
	c.lifeMu.Unlock()
	pipeline, learnt := s.verdict(capBytes, minCap)
	if !learnt && others > 0 {
		deadline := time.Now().Add(helloHoldMax)
		for !learnt && time.Now().Before(deadline) && c.agent.base.Err() == nil {
			time.Sleep(helloHoldPoll)
			pipeline, learnt = s.verdict(capBytes, minCap)
		}
	}
	return pipeline
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
