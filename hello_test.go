package spoe

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseGoldenHellos(t *testing.T) {
	tests := []struct {
		version, name string
		caps          capabilities
		engineID      string
		healthcheck   bool
	}{
		{"2.6.12", "haproxy-hello.bin", capPipelining | capAsync, "fd8efb6b-f040-467f-a827-f1eecdc3803a", false},
		{"2.6.12", "haproxy-hello-healthcheck.bin", 0, "", true},
		{"3.5-dev5", "haproxy-hello.bin", capPipelining, "6b2f9cd5-3bac-445d-b443-dd68c17680e2", false},
		{"3.5-dev5", "haproxy-hello-healthcheck.bin", 0, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.version+"/"+tt.name, func(t *testing.T) {
			f := goldenFrame(t, tt.version, tt.name)
			h, err := parseHAProxyHello(f.payload)
			require.NoError(t, err)
			assert.Equal(t, uint64(16380), h.maxFrameSize)
			assert.Equal(t, tt.caps, h.caps)
			assert.Equal(t, tt.engineID, h.engineID)
			assert.Equal(t, tt.healthcheck, h.healthcheck)
		})
	}
}

// helloPayload builds a HAPROXY-HELLO payload from key/value pairs.
func helloPayload(kvs ...interface{}) []byte {
	var b []byte
	for i := 0; i < len(kvs); i += 2 {
		b = appendName(b, kvs[i].(string))
		var err error
		if b, err = appendAnyValue(b, kvs[i+1]); err != nil {
			panic(err)
		}
	}
	return b
}

func TestParseHelloErrors(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
		status  Status
	}{
		{"no version", helloPayload("max-frame-size", uint32(16380)), StatusNoVersion},
		{"version 1.0", helloPayload("supported-versions", "1.0", "max-frame-size", uint32(16380)), StatusUnsupportedVersion},
		{"version 3.0", helloPayload("supported-versions", "3.0", "max-frame-size", uint32(16380)), StatusUnsupportedVersion},
		{"version abc", helloPayload("supported-versions", "abc", "max-frame-size", uint32(16380)), StatusUnsupportedVersion},
		{"version 2.x", helloPayload("supported-versions", "2.x", "max-frame-size", uint32(16380)), StatusUnsupportedVersion},
		{"version not a string", helloPayload("supported-versions", int64(2), "max-frame-size", uint32(16380)), StatusInvalidFrame},
		{"no max-frame-size", helloPayload("supported-versions", "2.0"), StatusNoFrameSize},
		{"max-frame-size 255", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(255)), StatusBadFrameSize},
		{"max-frame-size 0", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(0)), StatusBadFrameSize},
		{"max-frame-size negative", helloPayload("supported-versions", "2.0", "max-frame-size", int64(-1)), StatusInvalidFrame},
		{"max-frame-size a string", helloPayload("supported-versions", "2.0", "max-frame-size", "16380"), StatusInvalidFrame},
		{"capabilities not a string", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", true), StatusInvalidFrame},
		{"engine-id not a string", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380), "engine-id", int64(1)), StatusInvalidFrame},
		{"engine-id of 129 bytes", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380), "engine-id", strings.Repeat("e", 129)), StatusInvalidFrame},
		{"healthcheck not a bool", helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380), "healthcheck", "yes"), StatusInvalidFrame},
		{"truncated", helloPayload("supported-versions", "2.0")[:10], StatusInvalidFrame},
		// A UINT32 holding 2^32+1000 is refused, not read as 1000.
		{"max-frame-size uint32 above 32 bits", appendTypedInt(appendName(helloPayload("supported-versions", "2.0"),
			"max-frame-size"), TypeUint32, 1<<32+1000), StatusInvalidFrame},
		{"max-frame-size int32 above 32 bits", appendTypedInt(appendName(helloPayload("supported-versions", "2.0"),
			"max-frame-size"), TypeInt32, 1<<32+16380), StatusInvalidFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseHAProxyHello(tt.payload)
			require.Error(t, err)
			assert.Equal(t, tt.status, statusOf(err), "%v", err)
		})
	}
}

func TestParseHelloAccepts(t *testing.T) {
	// Keys in any order, unknown keys skipped, any integer type for the
	// size, optional keys absent, version lists and spellings HAProxy's
	// parser takes.
	for _, p := range [][]byte{
		helloPayload("max-frame-size", uint64(300), "x-unknown", []byte{1}, "supported-versions", "2.0"),
		helloPayload("supported-versions", " 2.0", "max-frame-size", int64(300)),
		helloPayload("supported-versions", "1.0, 2.00", "max-frame-size", uint32(300)),
		helloPayload("supported-versions", "2.0", "max-frame-size", uint32(300), "capabilities", "", "healthcheck", false),
	} {
		h, err := parseHAProxyHello(p)
		require.NoError(t, err)
		assert.Equal(t, uint64(300), h.maxFrameSize)
		assert.Empty(t, h.engineID)
		assert.Zero(t, h.caps)
	}
}

func TestParseCapabilities(t *testing.T) {
	tests := map[string]capabilities{
		"":                               0,
		"pipelining":                     capPipelining,
		"pipelining,async":               capPipelining | capAsync,
		"  async , pipelining":           capPipelining | capAsync,
		"fragmentation":                  capFragmentation,
		"Pipelining":                     0, // case matters
		"pipeliningx,asyncx":             0, // a token ends at a comma or space
		"pipelining extra,async":         capPipelining | capAsync,
		"unknown,async,,":                capAsync,
		"pipelining,async,fragmentation": capPipelining | capAsync | capFragmentation,
	}
	for s, want := range tests {
		assert.Equal(t, want, parseCapabilities([]byte(s)), "%q", s)
	}
	assert.Equal(t, "pipelining,async,fragmentation", (capPipelining | capAsync | capFragmentation).String())
	assert.Equal(t, "", capabilities(0).String())
}

func TestNegotiateFrameSize(t *testing.T) {
	assert.Equal(t, 16380, negotiateFrameSize(16380, DefaultMaxFrameSize), "HAProxy's value when lower")
	assert.Equal(t, 1000, negotiateFrameSize(16380, 1000), "the agent's limit when lower")
	assert.Equal(t, DefaultMaxFrameSize, negotiateFrameSize(1<<40, DefaultMaxFrameSize), "a huge offer is capped")
	assert.Equal(t, 256, negotiateFrameSize(16380, 10), "never below 256")
}

// TestAgentHelloGolden checks the AGENT-HELLO byte for byte against the
// frame of SPOP.md §5.2, which HAProxy 2.6 and 3.x accepted.
func TestAgentHelloGolden(t *testing.T) {
	want := unhex(t, "00 00 00 46 65 00 00 00 01 00 00")
	want = append(want, 7)
	want = append(want, "version"...)
	want = append(want, 8, 3)
	want = append(want, "2.0"...)
	want = append(want, 14)
	want = append(want, "max-frame-size"...)
	want = append(want, 3, 0xFC, 0xF0, 0x06, 12)
	want = append(want, "capabilities"...)
	want = append(want, 8, 16)
	want = append(want, "pipelining,async"...)
	assert.Equal(t, want, appendHello(nil, frameAgentHello, 16380, capPipelining|capAsync, ""))

	// Empty capabilities are still sent: HAProxy 3.x's health check needs
	// the key.
	b := appendHello(nil, frameAgentHello, 16380, 0, "")
	f, err := parseFrame(b[lengthSize:])
	require.NoError(t, err)
	assert.Equal(t, frameAgentHello, f.typ)
	assert.Equal(t, flagFin, f.flags)
	var keys []string
	for off := 0; off < len(f.payload); {
		e, next, err := readKV(f.payload, off)
		require.NoError(t, err)
		keys = append(keys, string(e.key))
		off = next
	}
	assert.Equal(t, []string{"version", "max-frame-size", "capabilities"}, keys)
}

func TestSupportsVersion20(t *testing.T) {
	for s, want := range map[string]bool{
		"2.0": true, " 2.0 ": true, "2.00": true, "1.0,2.0": true,
		// A later minor implies the earlier ones, 2.0 among them.
		"2.0,2.1": true, "2.1": true, " 2.1 , 3.0": true, "2.10": true,
		"2": false, "2.": false, "2.0.1": false, "2.x": false, "2.1a": false, "20": false, "": false, "abc": false,
		"1.0,3.0": false, "3.0": false,
	} {
		assert.Equal(t, want, supportsVersion20([]byte(s)), "%q", s)
	}
}

// TestNoPipeliningToHAProxy3: HAProxy 3.1+ offers "pipelining" without
// "async"; a fresh agent answers without "pipelining" (HAProxy then runs
// one stream per connection, which keeps it out of its demux-buffer
// stall), and keeps what 2.6 to 3.0 offer (both).
func TestNoPipeliningToHAProxy3(t *testing.T) {
	for _, tt := range []struct {
		offered, want string
		keep          bool
	}{
		{"pipelining", "fragmentation", false},
		{"pipelining", "pipelining,fragmentation", true},
		{"pipelining,async", "pipelining,async,fragmentation", false},
		{"async", "async,fragmentation", false},
		{"", "fragmentation", false},
	} {
		addr := startAgentAsIs(t, &Agent{keepPipelining: tt.keep})
		h := dialRaw(t, addr).hello(tt.offered, "e1", 16380)
		if !h["capabilities"].EqualString(tt.want) {
			t.Errorf("HAProxy offers %q (keep %v): agent answers %v, want %q", tt.offered, tt.keep, h["capabilities"], tt.want)
		}
	}
}

// TestPipelinedACKCap: S keeps 20 ACKs and the longest AGENT-DISCONNECT
// under the least tune.bufsize that announces a max-frame-size, and is the
// largest that does.
func TestPipelinedACKCap(t *testing.T) {
	assert.Equal(t, 804, pipelinedACKCap(16380), "HAProxy's default tune.bufsize 16384")
	longest := appendDisconnect(nil, frameAgentDisconnect, Status(math.MaxUint32), strings.Repeat("x", 1000))
	assert.Equal(t, len(longest), maxDisconnectFrame)
	for _, mfs := range []uint64{256, 1000, 4092, 8188, 16380, 65532, 1 << 20} {
		s := pipelinedACKCap(mfs)
		if s == 0 {
			continue // too small to pipeline: checked below
		}
		bufsize := int(mfs) + lengthSize
		assert.Less(t, muxStreamsLimit*s+maxDisconnectFrame, bufsize, "max-frame-size %d", mfs)
		assert.GreaterOrEqual(t, muxStreamsLimit*(s+1)+maxDisconnectFrame, bufsize, "max-frame-size %d: S is not the largest", mfs)
	}
	assert.Equal(t, 0, pipelinedACKCap(256), "too small to pipeline")
	assert.Positive(t, pipelinedACKCap(math.MaxUint64))
}

// TestAnswerSizesVerdict: pipelining once learnACKs ACKs were built, all
// at most the cap (S passes, S+1 does not), none replaced by an ackWindow,
// and the cap large enough for an ACK with the error variable.
func TestAnswerSizesVerdict(t *testing.T) {
	const capB, minCap = 804, 40
	check := func(s *answerSizes, capB int, wantPipeline, wantLearnt bool, what string) {
		t.Helper()
		p, l := s.verdict(capB, minCap)
		assert.Equal(t, wantPipeline, p, "%s: pipeline", what)
		assert.Equal(t, wantLearnt, l, "%s: learnt", what)
	}
	var s answerSizes
	check(&s, capB, false, false, "fresh agent")
	for i := 0; i < learnACKs-1; i++ {
		s.observe(capB)
	}
	check(&s, capB, false, false, "one ACK short of learnACKs")
	s.observe(30)
	check(&s, capB, true, true, "learnACKs ACKs of at most S")
	check(&s, capB-1, false, true, "a HAProxy whose S is below the largest ACK")
	check(&s, minCap-1, false, true, "a cap too small for the error variable")
	s.observe(capB + 1)
	check(&s, capB, false, true, "one ACK of S+1")

	var big answerSizes
	big.observe(capB + 1)
	check(&big, capB, false, true, "a first ACK above S decides at once")

	var refused answerSizes
	for i := 0; i < learnACKs; i++ {
		refused.observe(30)
	}
	check(&refused, capB, true, true, "small answers")
	refused.capped.Store(true) // what an ackWindow does when it replaces an ACK
	check(&refused, capB, false, true, "an ACK replaced by a window")
}

// TestPipeliningLearnt, with a Client offering what 3.1+ offers: a fresh
// agent does not pipeline; a HELLO that comes while the first connection
// learns waits for the verdict and pipelines; there big answers go whole
// while the window of the last ACKs has room, and the next is replaced by
// the error variable; the connections opened after an answer above the cap
// do not pipeline.
func TestPipeliningLearnt(t *testing.T) {
	defer func(d time.Duration) { helloHoldMax = d }(helloHoldMax)
	helloHoldMax = 10 * time.Second // the race detector on a busy machine
	big := strings.Repeat("x", 2000)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		if m := r.Messages(); m.Next() && m.NameIs("big") {
			return w.SetString(VarScopeTransaction, "v", big)
		}
		return w.SetInt(VarScopeTransaction, "v", 1)
	})}
	addr := startAgentAsIs(t, a)
	c1 := dialAgent(t, addr, ClientConfig{})
	assert.Equal(t, "fragmentation", c1.Capabilities(), "a fresh agent")

	p2 := dialRaw(t, addr)
	p2.send(rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(
		"supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "pipelining")))
	waitFor(t, func() bool { return a.stats.framesIn[frameStat(frameHAProxyHello)].Load() == 2 }, "the second HELLO read")
	for i := 0; i < learnACKs; i++ {
		_, err := c1.Notify(notifyCtx(t), ClientMessage{Name: "small"})
		require.NoError(t, err)
	}
	f := p2.next()
	require.Equal(t, frameAgentHello, f.typ)
	h, err := parseAgentHello(f.payload)
	require.NoError(t, err)
	assert.Equal(t, "pipelining,fragmentation", h.caps.String(), "the HELLO held while the agent learnt")

	whole := 0
	for sid := uint64(1); ; sid++ {
		p2.send(notifyNamed("big", sid, 1))
		f = p2.next()
		require.Equal(t, frameAck, f.typ)
		require.Equal(t, sid, f.streamID)
		acts, err := decodeActions(f.payload)
		require.NoError(t, err)
		require.Len(t, acts, 1, "%v", acts)
		if acts[0] == (ActionSetVar{Name: DefaultErrorVar, Scope: VarScopeTransaction, Value: true}) {
			break
		}
		require.Equal(t, big, acts[0].(ActionSetVar).Value)
		whole++
	}
	ackLen := len(rawFrame(frameAck, flagFin, 1, 1, appendTestSetString("v", big)))
	assert.Equal(t, pipelinedWindow(16380)/ackLen, whole, "big ACKs of %d bytes written whole until the window is full", ackLen)
	assert.Equal(t, uint64(1), a.Stats().ActionsRefused)

	c3 := dialAgent(t, addr, ClientConfig{})
	assert.Equal(t, "fragmentation", c3.Capabilities(), "after an answer above the cap")
	acts, err := c3.Notify(notifyCtx(t), ClientMessage{Name: "big"})
	require.NoError(t, err)
	require.Len(t, acts, 1)
	assert.Equal(t, big, acts[0].(ActionSetVar).Value, "without pipelining, the big answer goes whole")
}

// appendTestSetString is the payload of an ACK setting txn.name to value.
func appendTestSetString(name, value string) []byte {
	var w ActionWriter
	w.reset(nil, 1, 1, 1<<20, 0)
	_ = w.SetString(VarScopeTransaction, name, value)
	_, rest, _ := splitFrame(w.finish())
	_ = rest
	f, _ := parseFrame(w.buf[lengthSize:])
	return f.payload
}
