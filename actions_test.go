package spoe

import (
	"math"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newTestWriter returns a writer building the ACK of (sid, fid).
func newTestWriter(sid, fid uint64, maxFrame int) *ActionWriter {
	w := &ActionWriter{}
	w.reset(nil, sid, fid, maxFrame, 0)
	return w
}

// TestACKGolden checks the ACK of SPOP.md §5.4: set txn.<pfx>.score = 42.
func TestACKGolden(t *testing.T) {
	w := newTestWriter(2, 1, 16380)
	require.NoError(t, w.SetVar(VarScopeTransaction, "score", uint32(42)))
	want := unhex(t, "00 00 00 12 67 00 00 00 01 02 01 01 03 02 05")
	want = append(want, "score"...)
	want = append(want, 0x03, 0x2A)
	assert.Equal(t, want, w.finish())
}

// TestEmptyACKGolden: no actions is one NOOP action byte (type 0), not an
// empty payload, which HAProxy 3.1.0 never applies (see actionNoop).
func TestEmptyACKGolden(t *testing.T) {
	w := newTestWriter(5, 1, 16380)
	assert.Equal(t, unhex(t, "00 00 00 08 67 00 00 00 01 05 01 00"), w.finish())
}

func TestSetVarValues(t *testing.T) {
	ip6 := net.ParseIP("2001:db8::1")
	tests := []struct {
		name  string
		value interface{}
		bytes string // the typed value
	}{
		{"nil unsets", nil, "00"},
		{"true", true, "11"},
		{"false", false, "01"},
		{"int", int(-2), "04 FE F0 FE FE FE FE FE FE FE 0E"},
		{"int8", int8(-1), "04 FF F0 FE FE FE FE FE FE FE 0E"},
		{"int16", int16(300), "04 FC 03"},
		{"int32 sign-extended", int32(-5), "02 FB F0 FE FE FE FE FE FE FE 0E"},
		{"int64", int64(42), "04 2A"},
		{"uint8", uint8(255), "03 FF 00"},
		{"uint16", uint16(240), "03 F0 00"},
		{"uint32", uint32(4294967295), "03 FF F0 FE FE 7E"},
		{"uint", uint(7), "05 07"},
		{"uint64 max int64", uint64(math.MaxInt64), "05 FF F0 FE FE FE FE FE FE FE 06"},
		{"string", "hi", "08 02 68 69"},
		{"empty string", "", "08 00"},
		{"[]byte is binary", []byte{0, 1}, "09 02 00 01"},
		{"float64", 42.5, "08 04 34 32 2E 35"},
		{"float64 integral", float64(100), "08 03 31 30 30"},
		{"float64 negative", -0.25, "08 05 2D 30 2E 32 35"},
		{"float64 large, no exponent", 1e21, "08 16 31 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30"},
		{"float32 shortest", float32(0.1), "08 03 30 2E 31"},
		{"net.IP v4 (16-byte form)", net.IPv4(10, 0, 0, 1), "06 0A 00 00 01"},
		{"net.IP v4 (4-byte form)", net.IP{10, 0, 0, 1}, "06 0A 00 00 01"},
		{"net.IP v6", ip6, "07 20 01 0D B8 00 00 00 00 00 00 00 00 00 00 00 01"},
		{"netip.Addr v4", netip.MustParseAddr("192.0.2.1"), "06 C0 00 02 01"},
		{"netip.Addr v6", netip.MustParseAddr("::1"), "07 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWriter(1, 1, 16380)
			require.NoError(t, w.SetVar(VarScopeSession, "v", tt.value))
			want := append([]byte{1, 3, byte(VarScopeSession), 1, 'v'}, unhex(t, tt.bytes)...)
			assert.Equal(t, want, w.buf[w.actions:])
		})
	}
}

func TestSetVarRefusals(t *testing.T) {
	tests := []struct {
		name  string
		scope VarScope
		vname string
		value interface{}
		err   error
	}{
		{"empty name", VarScopeTransaction, "", 1, ErrVarName},
		{"dash", VarScopeTransaction, "ip-score", 1, ErrVarName},
		{"space", VarScopeTransaction, "a b", 1, ErrVarName},
		{"non-ascii", VarScopeTransaction, "scoré", 1, ErrVarName},
		{"too long for txn", VarScopeTransaction, strings.Repeat("a", 58), 1, ErrVarName},
		{"too long for sess", VarScopeSession, strings.Repeat("a", 57), 1, ErrVarName},
		{"bad scope", VarScope(5), "x", 1, ErrVarScope},
		{"uint64 above MaxInt64", VarScopeTransaction, "x", uint64(math.MaxInt64) + 1, ErrVarValue},
		{"uint above MaxInt64", VarScopeTransaction, "x", uint(math.MaxUint64), ErrVarValue},
		{"NaN", VarScopeTransaction, "x", math.NaN(), ErrVarValue},
		{"+Inf", VarScopeTransaction, "x", math.Inf(1), ErrVarValue},
		{"float32 -Inf", VarScopeTransaction, "x", float32(math.Inf(-1)), ErrVarValue},
		{"struct", VarScopeTransaction, "x", struct{}{}, ErrVarValue},
		{"pointer", VarScopeTransaction, "x", new(int), ErrVarValue},
		{"short net.IP", VarScopeTransaction, "x", net.IP{1, 2}, ErrVarValue},
		{"nil net.IP", VarScopeTransaction, "x", net.IP(nil), ErrVarValue},
		{"zero netip.Addr", VarScopeTransaction, "x", netip.Addr{}, ErrVarValue},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWriter(1, 1, 16380)
			before := len(w.buf)
			err := w.SetVar(tt.scope, tt.vname, tt.value)
			assert.ErrorIs(t, err, tt.err)
			assert.Equal(t, before, len(w.buf), "nothing written")
			assert.ErrorIs(t, w.Err(), tt.err)
			assert.Equal(t, 1, w.refused)
		})
	}
}

// TestVarNameLengths pins HAProxy's limit: <scope>.<prefix>.<name> of at
// most 63 bytes; with prefix "p", 57 name chars work in txn (SPOP.md §9.3).
func TestVarNameLengths(t *testing.T) {
	assert.NoError(t, checkVarName(VarScopeTransaction, strings.Repeat("a", 57), 1))
	assert.Error(t, checkVarName(VarScopeTransaction, strings.Repeat("a", 58), 1))
	assert.NoError(t, checkVarName(VarScopeResponse, strings.Repeat("a", 57), 0), "unknown prefix counts as 1")
	assert.NoError(t, checkVarName(VarScopeProcess, strings.Repeat("a", 56), 1))
	assert.Error(t, checkVarName(VarScopeProcess, strings.Repeat("a", 57), 1))
	assert.Error(t, checkVarName(VarScopeTransaction, strings.Repeat("a", 50), len("myspoeagent")))
	assert.NoError(t, checkVarName(VarScopeTransaction, "A.b_9", 1))
}

// TestVarNameCheckedOnce: a name accepted once is not checked again, but
// only for the same scope and var-prefix: the same string is still refused
// where it is too long.
func TestVarNameCheckedOnce(t *testing.T) {
	name := strings.Repeat("a", 57) // fits txn.<p>.name, not proc.<p>.name
	w := newTestWriter(1, 1, 16380)
	w.prefixLen = 1
	require.NoError(t, w.SetInt(VarScopeTransaction, name, 1))
	require.NoError(t, w.SetInt(VarScopeTransaction, name, 2))
	assert.ErrorIs(t, w.SetInt(VarScopeProcess, name, 3), ErrVarName)
	require.NoError(t, w.SetInt(VarScopeTransaction, name, 4))
	w.prefixLen = 2
	assert.ErrorIs(t, w.SetInt(VarScopeTransaction, name, 5), ErrVarName, "a longer var-prefix")
	assert.ErrorIs(t, w.SetInt(VarScopeTransaction, "", 6), ErrVarName)
	assert.Equal(t, 3, w.refused)
}

func TestTypedSetters(t *testing.T) {
	w := newTestWriter(1, 1, 16380)
	require.NoError(t, w.SetInt(VarScopeSession, "i", -1))
	require.NoError(t, w.SetUint(VarScopeSession, "u", 2))
	require.NoError(t, w.SetBool(VarScopeTransaction, "b", true))
	require.NoError(t, w.SetString(VarScopeRequest, "s", "x"))
	require.NoError(t, w.SetStringBytes(VarScopeResponse, "sb", []byte("y")))
	require.NoError(t, w.SetBinary(VarScopeProcess, "bin", []byte{0}))
	require.NoError(t, w.SetAddr(VarScopeTransaction, "a", netip.MustParseAddr("10.0.0.1")))
	require.NoError(t, w.UnsetVar(VarScopeTransaction, "gone"))
	assert.ErrorIs(t, w.SetUint(VarScopeSession, "u", math.MaxUint64), ErrVarValue)
	assert.ErrorIs(t, w.SetAddr(VarScopeSession, "a", netip.Addr{}), ErrVarValue)
	assert.ErrorIs(t, w.SetInt(VarScopeSession, "bad-name", 1), ErrVarName)
	actions, err := decodeActions(w.buf[w.actions:])
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "i", Scope: VarScopeSession, Value: int64(-1)},
		ActionSetVar{Name: "u", Scope: VarScopeSession, Value: uint64(2)},
		ActionSetVar{Name: "b", Scope: VarScopeTransaction, Value: true},
		ActionSetVar{Name: "s", Scope: VarScopeRequest, Value: "x"},
		ActionSetVar{Name: "sb", Scope: VarScopeResponse, Value: "y"},
		ActionSetVar{Name: "bin", Scope: VarScopeProcess, Value: []byte{0}},
		ActionSetVar{Name: "a", Scope: VarScopeTransaction, Value: net.IP{10, 0, 0, 1}},
		ActionUnsetVar{Name: "gone", Scope: VarScopeTransaction},
	}, actions)
	assert.Equal(t, 3, w.refused)
}

// TestACKSizeLimit: an action that would push the ACK past
// max-frame-size - 1 is refused whole; earlier ones stay.
func TestACKSizeLimit(t *testing.T) {
	w := newTestWriter(1, 1, 256)
	require.NoError(t, w.SetString(VarScopeTransaction, "a", strings.Repeat("x", 200)))
	err := w.SetString(VarScopeTransaction, "b", strings.Repeat("x", 100))
	assert.ErrorIs(t, err, ErrACKTooBig)
	ack := w.finish()
	assert.LessOrEqual(t, len(ack)-lengthSize, 255)
	f, err := parseFrame(ack[lengthSize:])
	require.NoError(t, err)
	actions, err := decodeActions(f.payload)
	require.NoError(t, err)
	require.Len(t, actions, 1)
	assert.Equal(t, "a", actions[0].(ActionSetVar).Name)

	// Exactly at the limit: LENGTH = max-frame-size - 1 is allowed.
	w = newTestWriter(1, 1, 256)
	head := len(w.buf) - w.start - lengthSize // 7
	// action: 1+1+1 + name(1+1) + 08 + len varint(2) + data
	data := 255 - head - 5 - 1 - 2
	require.NoError(t, w.SetString(VarScopeTransaction, "a", strings.Repeat("x", data)))
	assert.Equal(t, 255, len(w.finish())-lengthSize)
	assert.ErrorIs(t, w.SetBool(VarScopeTransaction, "b", true), ErrACKTooBig)
}

func TestActionTypes(t *testing.T) {
	w := newTestWriter(1, 1, 16380)
	require.NoError(t, ActionSetVar{Name: "x", Scope: VarScopeSession, Value: 1}.writeTo(w))
	require.NoError(t, ActionUnsetVar{Name: "x", Scope: VarScopeSession}.writeTo(w))
	assert.Equal(t, []byte{1, 3, 1, 1, 'x', 4, 1, 2, 2, 1, 1, 'x'}, w.buf[w.actions:])
	assert.Equal(t, "txn", VarScopeTransaction.String())
	assert.Equal(t, "scope(9)", VarScope(9).String())
}

func TestSealedWriterPanics(t *testing.T) {
	w := newTestWriter(1, 1, 16380)
	w.sealed = true
	assert.PanicsWithValue(t, "spoe: ActionWriter used after its handler returned", func() {
		_ = w.SetBool(VarScopeSession, "x", true)
	})
}

func TestSettersNoAlloc(t *testing.T) {
	w := newTestWriter(1, 1, 16380)
	host := []byte("h00000001.example.com")
	allocs := testing.AllocsPerRun(1000, func() {
		w.reset(w.buf[:0], 12345, 1, 16380, 0)
		_ = w.SetInt(VarScopeSession, "score", 100)
		_ = w.SetStringBytes(VarScopeTransaction, "host", host)
		_ = w.SetBool(VarScopeTransaction, "ok", true)
		_ = w.SetAddr(VarScopeTransaction, "ip", netip.AddrFrom4([4]byte{10, 0, 0, 1}))
		_ = w.finish()
	})
	assert.Zero(t, allocs)
}

func BenchmarkEncodeACK(b *testing.B) {
	host := []byte("h00000001.example.com")
	b.Run("fast", func(b *testing.B) {
		w := newTestWriter(1, 1, 16380)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			w.reset(w.buf[:0], uint64(i), 1, 16380, 0)
			_ = w.SetInt(VarScopeSession, "score", 100)
			_ = w.SetStringBytes(VarScopeTransaction, "host", host)
			_ = w.SetBool(VarScopeTransaction, "ok", true)
			_ = w.finish()
		}
	})
	b.Run("simple", func(b *testing.B) {
		w := newTestWriter(1, 1, 16380)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			w.reset(w.buf[:0], uint64(i), 1, 16380, 0)
			actions := []Action{
				ActionSetVar{Name: "score", Scope: VarScopeSession, Value: 100},
				ActionSetVar{Name: "host", Scope: VarScopeTransaction, Value: string(host)},
				ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true},
			}
			for _, a := range actions {
				_ = a.writeTo(w)
			}
			_ = w.finish()
		}
	})
}

// TestACKWindow: on a connection pipelining with HAProxy 3.1+, the ACKs
// written go out as they are while the last muxStreamsLimit of them hold
// at most the window; one that would exceed it is replaced by an ACK of
// the same ids that sets only the error variable, wherever it is in a run.
func TestACKWindow(t *testing.T) {
	ack := func(sid uint64, n int) []byte { // an ACK frame of n bytes in all
		var w ActionWriter
		w.reset(nil, sid, 1, 16380, 0)
		v := 0
		for {
			w.reset(w.buf[:0], sid, 1, 16380, 0)
			require.NoError(t, w.SetString(VarScopeTransaction, "v", strings.Repeat("x", v)))
			if b := w.finish(); len(b) >= n {
				require.Equal(t, n, len(b), "an ACK of exactly %d bytes", n)
				return append([]byte(nil), b...)
			}
			v++
		}
	}
	limit := pipelinedWindow(16380)
	require.Equal(t, 16088, limit, "the window of HAProxy's default tune.bufsize")
	require.Equal(t, 804, pipelinedACKCap(16380))
	refused := 0
	w := &ackWindow{limit: limit, errVar: "error", refused: func() { refused++ }}

	// 19 small ACKs and one that fills the window exactly: all written.
	var run []byte
	for sid := uint64(1); sid <= 19; sid++ {
		run = append(run, ack(sid, 100)...)
	}
	big := ack(20, limit-19*100)
	run = append(run, big...)
	assert.Equal(t, run, w.admit(run), "a run that fits is written as it is")
	assert.Zero(t, refused)

	// The next ACK replaces the oldest small one in the window: one byte
	// more than it would exceed the window: replaced, in the middle of a
	// run; a smaller one after it fits.
	next := append(append(append([]byte(nil), ack(21, 101)...), ack(22, 30)...), notifyNamed("x", 1, 1)...)
	out := w.admit(next)
	assert.Equal(t, 1, refused)
	var got []frame
	for f, rest, ok := splitFrame(out); ok; f, rest, ok = splitFrame(rest) {
		fr, err := parseFrame(f[lengthSize:])
		require.NoError(t, err)
		got = append(got, fr)
	}
	require.Len(t, got, 3, "every frame kept, in order")
	assert.Equal(t, frameAck, got[0].typ)
	assert.Equal(t, uint64(21), got[0].streamID)
	assert.Equal(t, uint64(1), got[0].frameID)
	actions, err := decodeActions(got[0].payload)
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}}, actions, "the error variable alone")
	assert.Equal(t, uint64(22), got[1].streamID)
	assert.Equal(t, ack(22, 30), out[len(out)-len(next)+len(ack(21, 101)):][:30], "the ACK after it as it was")
	assert.Equal(t, frameNotify, got[2].typ, "frames other than ACKs pass and count nothing")

	// Another big one while the first is among the last 20: replaced.
	big2 := ack(30, limit-19*100)
	assert.NotEqual(t, big2, w.admit(big2))
	assert.Equal(t, 2, refused)
	// 19 small ones later, the window holds them and one older, small
	// ACK: a big one fits again.
	for sid := uint64(31); sid < 31+19; sid++ {
		assert.Equal(t, ack(sid, 100), w.admit(ack(sid, 100)))
	}
	big3 := ack(50, limit-19*100)
	assert.Equal(t, big3, w.admit(big3))
	assert.Equal(t, 2, refused)

	// Without an error variable, the replacement has no action.
	w = &ackWindow{limit: 1000}
	out = w.admit(ack(60, 1001))
	fr, err := parseFrame(out[lengthSize:])
	require.NoError(t, err)
	assert.Equal(t, []byte{actionNoop}, fr.payload)
}
