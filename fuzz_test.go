package spoe

// Native fuzz targets for every decoder that network input reaches: the
// varint, typed data, KV lists, the frame header, HELLO, NOTIFY (both APIs),
// DISCONNECT, the ACK decoder of the client, fragment reassembly and a whole
// connection. Each target checks that the decoder does not panic, that what
// it allocates is bounded by its input, and, where the format allows, that
// decoding, encoding and decoding again gives the same value.
//
// Seed corpora come from the golden HAProxy frames of testdata/spop, plus
// hand-made edge cases; crashers found by `go test -fuzz` stay under
// testdata/fuzz/<Target> as regression inputs. `.ci/fuzz` runs every target
// for a bounded time.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"
)

// ---------------------------------------------------------------------------
// Allocation bounds
//
// A decoder of peer input must not allocate more than a small constant plus
// k times the input, k a small number: otherwise a few bytes from the
// network could make the agent allocate much more (a length or count
// trusted before it was checked). The bounds below are what each decoder
// needs by construction, with about a 2x margin; the zero-copy decoders
// must allocate nothing at all.

const (
	// parseHAProxyHello copies the engine-id (at most its own bytes) and,
	// for each supported-versions, the list (its bytes) and the []string of
	// strings.Split: 16 bytes per item, an item being at least a comma.
	// That is at most 17 bytes per input byte plus size-class rounding.
	helloAllocPerByte = 40
	helloAllocFixed   = 1024
	// parseDisconnect copies each message: at most its own bytes, rounded
	// up to a size class (a 1-byte message takes a 16-byte tiny block and
	// costs at least 10 input bytes with its key).
	disconnectAllocPerByte = 4
	disconnectAllocFixed   = 512
	// decodeActions, per action of at least 4 input bytes (unset-var with
	// an empty name) or 5 (set-var of NULL): the boxed action (24 or 48
	// bytes), its value (a copy of the data and its box) and the growth of
	// the []Action (16 bytes per slot, doubled, and the copies on the way:
	// about 64 bytes per action). About 25 bytes per input byte at worst.
	// An error adds a fixed cost: pkg/errors' message and call stack.
	ackAllocPerByte = 48
	ackAllocFixed   = 4096
	// decodeMessages, per message of at least 2 input bytes (empty name,
	// no argument): its Message (24 bytes) and its map (a 48-byte header
	// and, once it holds an argument, groups of 8 slots of 32 bytes, sized
	// from NB-ARGS, each argument costing at least 2 input bytes); per
	// argument, the boxed copy of its value; and the interned names (a
	// string and a slot in a map that doubles as it grows, at most 256 of
	// them). About 90 bytes per input byte at worst (measured: see
	// TestFuzzAllocBoundsHold).
	messagesAllocPerByte = 192
	messagesAllocFixed   = 4096
)

// fuzzing reports whether the test binary runs a fuzzing engine (-fuzz),
// rather than the seed corpus as plain tests.
func fuzzing() bool {
	fuzzingOnce.Do(func() {
		fl := flag.Lookup("test.fuzz")
		isFuzzing = fl != nil && fl.Value.String() != ""
	})
	return isFuzzing
}

var (
	fuzzingOnce sync.Once
	isFuzzing   bool
)

// allocated returns the heap bytes f allocates. Other goroutines'
// allocations can only add to what is measured, so a measure above limit is
// taken again, and the least of five is returned.
func allocated(limit uint64, f func()) uint64 {
	least := uint64(math.MaxUint64)
	for i := 0; i < 5 && least > limit; i++ {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	return least
}

// allocSampling: while fuzzing, one call of checkAlloc in allocSampling
// measures (reading the heap statistics stops the world, and costs more
// than most decoders); the others just run f. Without -fuzz, on the seeds
// and the kept crashers, every call measures.
const allocSampling = 16

var allocCalls atomic.Uint64

// checkAlloc fails t if f allocates more than fixed + perByte*n bytes.
func checkAlloc(t *testing.T, what string, n int, fixed, perByte uint64, f func()) {
	t.Helper()
	if fuzzing() && allocCalls.Add(1)%allocSampling != 0 {
		f()
		return
	}
	limit := fixed + perByte*uint64(n)
	if got := allocated(limit, f); got > limit {
		t.Fatalf("%s allocated %d bytes for %d input bytes: more than %d + %d per byte = %d",
			what, got, n, fixed, perByte, limit)
	}
}

// check, checkEq and checkBytes are the assertions of the decoder targets'
// hot paths: testify's each walk the stack (t.Helper), which costs more
// than the decoders under test and slows fuzzing tenfold.
func check(t *testing.T, cond bool, format string, args ...interface{}) {
	if !cond {
		t.Helper()
		t.Fatalf(format, args...)
	}
}

func checkEq[T comparable](t *testing.T, got, want T, what string) {
	if got != want {
		t.Helper()
		t.Fatalf("%s: got %v, want %v", what, got, want)
	}
}

func checkBytes(t *testing.T, got, want []byte, what string) {
	if !bytes.Equal(got, want) {
		t.Helper()
		t.Fatalf("%s: got %x, want %x", what, got, want)
	}
}

// ---------------------------------------------------------------------------
// Seeds

// goldenBody is one golden frame after its length prefix.
type goldenBody struct {
	name string // version/file
	wire []byte // with the length prefix
	f    frame
}

// goldenBodies returns every golden frame of testdata/spop.
func goldenBodies(tb testing.TB) []goldenBody {
	tb.Helper()
	var out []goldenBody
	for _, version := range goldenVersions {
		entries, err := os.ReadDir(filepath.Join("testdata", "spop", version))
		require.NoError(tb, err)
		for _, e := range entries {
			if !strings.HasSuffix(e.Name(), ".bin") {
				continue
			}
			wire := golden(tb, version, e.Name())
			f, err := parseFrame(wire[lengthSize:])
			require.NoError(tb, err, e.Name())
			out = append(out, goldenBody{name: version + "/" + e.Name(), wire: wire, f: f})
		}
	}
	require.NotEmpty(tb, out)
	return out
}

// goldenPayloads returns the payloads of the golden frames of type typ.
func goldenPayloads(tb testing.TB, typ frameType) [][]byte {
	var out [][]byte
	for _, g := range goldenBodies(tb) {
		if g.f.typ == typ {
			out = append(out, g.f.payload)
		}
	}
	require.NotEmpty(tb, out)
	return out
}

// goldenValues returns the raw bytes of every typed value of the golden
// NOTIFY frames.
func goldenValues(tb testing.TB) [][]byte {
	var out [][]byte
	for _, p := range goldenPayloads(tb, frameNotify) {
		for off := 0; off < len(p); {
			_, next, err := readBytes(p, off)
			require.NoError(tb, err)
			nargs := int(p[next])
			off = next + 1
			for i := 0; i < nargs; i++ {
				off, err = skipName(p, off)
				require.NoError(tb, err)
				end, err := skipValue(p, off)
				require.NoError(tb, err)
				out = append(out, p[off:end])
				off = end
			}
		}
	}
	return out
}

// goldenActions returns actions setting every golden "echo" value, in each
// scope, and unsetting one.
func goldenActions(tb testing.TB) []Action {
	var actions []Action
	for i, raw := range goldenValues(tb) {
		v, _, err := readValue(raw, 0)
		require.NoError(tb, err)
		actions = append(actions, ActionSetVar{Name: "v" + strconv.Itoa(i), Scope: VarScope(i % 5), Value: v.Interface()})
	}
	return append(actions, ActionUnsetVar{Name: "gone", Scope: VarScopeTransaction})
}

// ---------------------------------------------------------------------------
// Encoders used to re-encode what was decoded

// sameValue reports whether two decoded values are the same typed value.
func sameValue(a, b Value) bool {
	return a.typ == b.typ && a.num == b.num && bytes.Equal(a.data, b.data)
}

// appendGoValue encodes a Go value as the simple API gives it
// (Value.Interface) back as the typed value it came from: appendAnyValue,
// but for the two values it refuses or re-types by design, a UINT64 above
// math.MaxInt64 and an IPV6 that is IPv4-mapped, written as received.
func appendGoValue(b []byte, v interface{}) []byte {
	switch v := v.(type) {
	case uint64:
		return appendTypedInt(b, TypeUint64, v)
	case net.IP:
		if len(v) == net.IPv6len {
			return append(append(b, byte(TypeIPv6)), v...)
		}
	}
	b, err := appendAnyValue(b, v)
	if err != nil {
		panic(fmt.Sprintf("appendGoValue(%T): %v", v, err))
	}
	return b
}

// appendRawActions encodes actions as a LIST-OF-ACTIONS without the
// ActionWriter's checks of names and scopes, so that whatever
// decodeActions returns can be encoded again.
func appendRawActions(b []byte, actions []Action) []byte {
	for _, a := range actions {
		switch a := a.(type) {
		case ActionSetVar:
			b = append(b, actionSetVar, 3, byte(a.Scope))
			b = appendName(b, a.Name)
			b = appendGoValue(b, a.Value)
		case ActionUnsetVar:
			b = append(b, actionUnsetVar, 2, byte(a.Scope))
			b = appendName(b, a.Name)
		default:
			panic(fmt.Sprintf("action %T", a))
		}
	}
	return b
}

// ---------------------------------------------------------------------------
// FuzzVarint

func FuzzVarint(f *testing.F) {
	for _, v := range varintVectors {
		f.Add(unhex(f, v.bytes), v.value)
	}
	for _, g := range goldenBodies(f) {
		f.Add(g.wire[lengthSize+5:], uint64(len(g.wire))) // the ids, then the payload
	}
	f.Add([]byte{}, uint64(0))
	f.Add([]byte{0xF0}, uint64(math.MaxUint64))
	f.Add([]byte{0xF0, 0x80}, uint64(1)<<63)
	f.Add(bytes.Repeat([]byte{0xFF}, 11), uint64(math.MaxInt64))
	f.Add(append(bytes.Repeat([]byte{0xFF}, 9), 0x7F), uint64(0)) // 10 bytes that wrap around
	f.Fuzz(func(t *testing.T, b []byte, x uint64) {
		// Encode -> decode: every uint64 comes back, in varintLen bytes.
		enc := appendVarint(nil, x)
		check(t, len(enc) == varintLen(x), "len(enc) = %d, want %d", len(enc), varintLen(x))
		check(t, len(enc) <= maxVarintLen, "len(enc) = %v, above maxVarintLen = %v", len(enc), maxVarintLen)
		got, n, err := readVarint(enc, 0)
		check(t, err == nil, "unexpected error: %v", err)
		checkEq(t, got, x, "decoded")
		checkEq(t, n, len(enc), "end offset")
		end, err := skipVarint(enc, 0)
		check(t, err == nil, "unexpected error: %v", err)
		checkEq(t, end, len(enc), "skipVarint end")

		// Decode -> encode -> decode, at the first offsets of b.
		for off := 0; off <= len(b) && off < 3; off++ {
			v, end, err := readVarint(b, off)
			skipEnd, skipErr := skipVarint(b, off)
			if err != nil {
				check(t, err == errTruncated || err == errVarintTooLong, "error %v", err)
				checkEq(t, skipErr, err, "skipVarint error")
				continue
			}
			check(t, skipErr == nil, "unexpected error: %v", skipErr)
			checkEq(t, skipEnd, end, "skipVarint end")
			check(t, end > off, "end = %v, not above off = %v", end, off)
			check(t, end-off <= maxVarintLen, "end-off = %v, above maxVarintLen = %v", end-off, maxVarintLen)
			re := appendVarint(nil, v)
			v2, n2, err := readVarint(re, 0)
			check(t, err == nil, "unexpected error: %v", err)
			checkEq(t, v2, v, "re-decoded")
			checkEq(t, n2, len(re), "re-decoded end")
			// The encoding is a bijection below 10 bytes: only a 10-byte
			// varint can exceed 64 bits and wrap, as plain uint64
			// arithmetic does (SPOP.md §2).
			if end-off < maxVarintLen {
				checkBytes(t, re, b[off:end], "canonical encoding")
			}
		}
		checkAlloc(t, "readVarint", len(b), 0, 0, func() {
			_, _, _ = readVarint(b, 0)
			_, _ = skipVarint(b, 0)
			_, _, _ = readBytes(b, 0)
		})
	})
}

// ---------------------------------------------------------------------------
// FuzzTypedValue

func FuzzTypedValue(f *testing.F) {
	for _, v := range goldenValues(f) {
		f.Add(v)
	}
	for typ := 0; typ < 16; typ++ {
		f.Add([]byte{byte(typ)})
		f.Add([]byte{byte(typ) | 0xF0, 0xFF, 0xFF})
	}
	f.Add([]byte{0x31})                                            // BOOL with flags 3: false
	f.Add([]byte{0x18, 0x02, 'h', 'i'})                            // STRING with a flag
	f.Add([]byte{0x08, 0xF0, 0x80})                                // length varint truncated
	f.Add([]byte{0x09, 0x05, 'a'})                                 // length past the end
	f.Add(append([]byte{0x04}, bytes.Repeat([]byte{0xFF}, 10)...)) // 11-byte varint
	f.Add([]byte{0x07, 1, 2, 3})                                   // IPV6 truncated
	f.Fuzz(func(t *testing.T, b []byte) {
		v, end, err := readValue(b, 0)
		skipEnd, skipErr := skipValue(b, 0)
		checkAlloc(t, "readValue", len(b), 0, 0, func() {
			_, _, _ = readValue(b, 0)
			_, _ = skipValue(b, 0)
		})
		if err != nil {
			check(t, err == errTruncated || err == errVarintTooLong || err == errUnknownType || err == errIntOverflow, "error %v", err)
			checkEq(t, skipErr, err, "skipValue error")
			if err == errIntOverflow {
				// Only a 32-bit type whose varint holds more than 32 bits.
				typ := Type(b[0] & typeMask)
				n, _, verr := readVarint(b, 1)
				check(t, verr == nil, "errIntOverflow on a bad varint: %v", verr)
				check(t, typ == TypeUint32 && n >= 1<<32 ||
					typ == TypeInt32 && (int64(n) < math.MinInt32 || int64(n) > math.MaxInt32), "%v %d refused", typ, n)
			}
			return
		}
		check(t, skipErr == nil, "unexpected error: %v", skipErr)
		checkEq(t, skipEnd, end, "skipValue end")
		check(t, int(v.typ) < len(typeNames), "type %d", v.typ)
		checkEq(t, v.typ, Type(b[0]&typeMask), "type")

		// What the value holds, by type.
		switch v.typ {
		case TypeNull:
			check(t, v.IsNull(), "v.IsNull()")
		case TypeBool:
			got, ok := v.Bool()
			check(t, ok, "accessor of its own type")
			checkEq(t, got, b[0]&flagMask == boolTrueFlag, "BOOL: true only from a flag nibble of exactly 1")
		case TypeIPv4, TypeIPv6:
			a, ok := v.Addr()
			check(t, ok, "accessor of its own type")
			checkBytes(t, a.AsSlice(), b[1:end], "address")
		case TypeString, TypeBinary:
			data, ok := v.Bytes()
			check(t, ok, "accessor of its own type")
			checkBytes(t, data, b[end-len(data):end], "bytes")
			check(t, v.EqualString(string(data)), "v.EqualString(string(data))")
		default: // integers
			switch v.typ {
			case TypeUint32:
				check(t, v.num <= math.MaxUint32, "UINT32 %d taken", v.num)
			case TypeInt32:
				check(t, int64(v.num) >= math.MinInt32 && int64(v.num) <= math.MaxInt32, "INT32 %d taken", int64(v.num))
			}
			i, iok := v.Int()
			u, uok := v.Uint()
			check(t, iok || uok, "an integer reads as int64 or uint64")
			if iok && uok {
				checkEq(t, u, uint64(i), "Uint and Int")
			}
		}
		_ = v.Type().String()

		// Decode -> encode -> decode.
		enc := appendValue(nil, v)
		v2, n2, err := readValue(enc, 0)
		check(t, err == nil, "unexpected error: %v", err)
		checkEq(t, n2, len(enc), "re-decoded end")
		check(t, sameValue(v, v2), "%#v re-encoded as %x reads %#v", v, enc, v2)
		// appendValue writes the canonical encoding: the input's, but for
		// the flag nibble (cleared, but BOOL's true) and a 10-byte varint
		// that wrapped around.
		canonical := b[0]&flagMask == 0 || v.typ == TypeBool && b[0]&flagMask == boolTrueFlag
		isInt := v.typ >= TypeInt32 && v.typ <= TypeUint64
		if canonical && !(isInt && end-1 == maxVarintLen) {
			checkBytes(t, enc, b[:end], "canonical encoding")
		}

		// Decode -> Go value (the simple API's) -> encode -> decode.
		iv := v.Interface()
		enc2, err := appendAnyValue(nil, iv)
		if v.typ == TypeUint64 && v.num > math.MaxInt64 {
			require.ErrorIs(t, err, ErrVarValue, "a UINT64 above math.MaxInt64 cannot be sent")
			return
		}
		check(t, err == nil, "unexpected error: %v", err)
		v3, _, err := readValue(enc2, 0)
		check(t, err == nil, "unexpected error: %v", err)
		got := v3.Interface()
		if ip, ok := iv.(net.IP); ok {
			check(t, ip.Equal(got.(net.IP)), "%v came back as %v", ip, got)
		} else {
			check(t, reflect.DeepEqual(iv, got), "%#v came back as %#v", iv, got)
		}
	})
}

// ---------------------------------------------------------------------------
// FuzzKVList

// readKVList decodes a KV list up to its end or its first error.
func readKVList(b []byte) ([]kv, error) {
	var kvs []kv
	for off := 0; off < len(b); {
		e, next, err := readKV(b, off)
		if err != nil {
			return kvs, err
		}
		if next <= off {
			panic("readKV did not advance")
		}
		kvs = append(kvs, e)
		off = next
	}
	return kvs, nil
}

func appendKVList(b []byte, kvs []kv) []byte {
	for _, e := range kvs {
		b = appendName(b, string(e.key))
		b = appendValue(b, e.value)
	}
	return b
}

func FuzzKVList(f *testing.F) {
	for _, typ := range []frameType{frameHAProxyHello, frameHAProxyDisconnect} {
		for _, p := range goldenPayloads(f, typ) {
			f.Add(p)
		}
	}
	hello := appendHello(nil, frameAgentHello, 16380, capPipelining|capAsync|capFragmentation, "")
	f.Add(hello[lengthSize+7:])
	f.Add([]byte{})
	f.Add([]byte{0x00, 0x00})            // empty key, NULL
	f.Add([]byte{0x03, 'k', 'e', 'y'})   // no value
	f.Add([]byte{0x05, 'k', 'e', 'y'})   // key past the end
	f.Add([]byte{0x01, 'k', 0x0A, 0x00}) // reserved type
	f.Fuzz(func(t *testing.T, b []byte) {
		kvs, err := readKVList(b)
		checkAlloc(t, "readKV", len(b), 0, 0, func() {
			for off := 0; off < len(b); {
				_, next, err := readKV(b, off)
				if err != nil {
					break
				}
				off = next
			}
		})
		if err != nil {
			check(t, err == errTruncated || err == errVarintTooLong || err == errUnknownType || err == errIntOverflow, "error %v", err)
		}
		// Decode -> encode -> decode: the same keys and values in order,
		// and the encoding is then a fixed point.
		enc := appendKVList(nil, kvs)
		kvs2, err := readKVList(enc)
		check(t, err == nil, "unexpected error: %v", err)
		check(t, len(kvs2) == len(kvs), "len(kvs2) = %d, want %d", len(kvs2), len(kvs))
		for i := range kvs {
			checkBytes(t, kvs2[i].key, kvs[i].key, "key")
			check(t, sameValue(kvs[i].value, kvs2[i].value), "entry %d", i)
		}
		checkBytes(t, appendKVList(nil, kvs2), enc, "fixed point")
	})
}

// ---------------------------------------------------------------------------
// FuzzFrameHeader

func FuzzFrameHeader(f *testing.F) {
	for _, g := range goldenBodies(f) {
		f.Add(g.wire)
	}
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0, 0, 0, 7, 3, 0, 0, 0, 1, 0})                                          // truncated body
	f.Add([]byte{0xFF, 0xFF, 0xFF, 0xFF, 3})                                             // 4 GiB length
	f.Add([]byte{0, 0, 0x3F, 0xFC, 3, 0, 0, 0, 1, 0, 0})                                 // 16380, but 7 bytes
	f.Add(append([]byte{0, 0, 0, 25, 3, 0, 0, 0, 1}, bytes.Repeat([]byte{0xFF}, 20)...)) // 11-byte ids
	f.Fuzz(func(t *testing.T, b []byte) {
		const maxFrame = 16380
		if len(b) >= lengthSize {
			n := binary.BigEndian.Uint32(b)
			err := checkLength(n, maxFrame)
			check(t, (n >= minFrameLength && n <= maxFrame) == (err == nil), "checkLength(%d): %v", n, err)
			// The frame reader checks LENGTH against the limit first: it
			// holds no more than its pooled buffer and the frame.
			var fr frame
			var rerr error
			checkAlloc(t, "frameReader", int(min(n, maxFrame)), minBufferSize+512, 2, func() {
				var rd frameReader
				rd.init(bytes.NewReader(b), maxFrame)
				fr, rerr = rd.next()
			})
			switch {
			case err != nil:
				checkEq(t, rerr, err, "frameReader error")
			case len(b)-lengthSize < int(n):
				check(t, rerr != nil, "a truncated frame read")
			default:
				want, perr := parseFrame(b[lengthSize : lengthSize+int(n)])
				checkEq(t, rerr, perr, "frameReader error")
				if perr == nil {
					checkBytes(t, fr.payload, want.payload, "frame read")
				}
			}
		}

		body := b
		if len(b) >= lengthSize {
			body = b[lengthSize:]
		}
		var fr frame
		var err error
		checkAlloc(t, "parseFrame", len(body), 0, 0, func() { fr, err = parseFrame(body) })
		if err != nil {
			check(t, err == errFrameTooSmall || err == errTruncated || err == errVarintTooLong, "error %v", err)
			return
		}
		check(t, len(body) >= minFrameLength, "a frame of %d bytes", len(body))
		_ = fr.typ.String()
		check(t, frameStat(fr.typ) < numFrameStats, "frameStat(fr.typ) = %v, not below numFrameStats = %v", frameStat(fr.typ), numFrameStats)
		checkEq(t, fr.fin(), fr.flags&flagFin != 0, "fin")
		checkEq(t, fr.abort(), fr.flags&flagAbort != 0, "abort")

		// Decode -> encode -> decode.
		enc, start := appendFrameHeader(nil, fr.typ, fr.flags, fr.streamID, fr.frameID)
		enc = append(enc, fr.payload...)
		finishFrame(enc, start)
		checkEq(t, binary.BigEndian.Uint32(enc), uint32(len(enc)-lengthSize), "LENGTH")
		fr2, err := parseFrame(enc[lengthSize:])
		check(t, err == nil, "unexpected error: %v", err)
		check(t, fr.typ == fr2.typ && fr.flags == fr2.flags && fr.streamID == fr2.streamID && fr.frameID == fr2.frameID &&
			bytes.Equal(fr.payload, fr2.payload), "%+v re-decoded as %+v", fr, fr2)
		// Byte for byte, unless an id took 10 bytes (which may wrap).
		_, sidEnd, _ := readVarint(body, 5)
		_, fidEnd, _ := readVarint(body, sidEnd)
		if sidEnd-5 < maxVarintLen && fidEnd-sidEnd < maxVarintLen {
			checkBytes(t, enc[lengthSize:], body, "canonical header")
		}
	})
}

// ---------------------------------------------------------------------------
// FuzzHello

func FuzzHello(f *testing.F) {
	for _, p := range goldenPayloads(f, frameHAProxyHello) {
		f.Add(p)
	}
	f.Add(helloPayload("supported-versions", " 1.0, 2.00 ,3.0", "max-frame-size", uint32(256),
		"capabilities", " async ,pipelining,fragmentation,foo", "engine-id", "e", "healthcheck", false))
	f.Add(helloPayload("supported-versions", "2.0", "max-frame-size", int64(-1)))
	f.Add(helloPayload("supported-versions", "2.0", "max-frame-size", uint32(255)))
	f.Add(helloPayload("supported-versions", "2.", "max-frame-size", uint32(16380)))
	f.Add(helloPayload("supported-versions", []byte("2.0"), "max-frame-size", uint32(16380)))
	f.Add(helloPayload("supported-versions", strings.Repeat(",", 200)+"2.0", "max-frame-size", uint32(16380)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var h haproxyHello
		var err error
		checkAlloc(t, "parseHAProxyHello", len(b), helloAllocFixed, helloAllocPerByte, func() {
			h, err = parseHAProxyHello(b)
		})
		if err != nil {
			var pe *protocolError
			if !errors.As(err, &pe) {
				require.True(t, err == errTruncated || err == errVarintTooLong || err == errUnknownType || err == errIntOverflow, "error %v", err)
			}
			require.NotEqual(t, StatusNormal, statusOf(err))
			return
		}
		require.GreaterOrEqual(t, h.maxFrameSize, uint64(MinFrameSize))
		require.Zero(t, h.caps&^(capPipelining|capAsync|capFragmentation))
		require.Equal(t, h.caps, parseCapabilities([]byte(h.caps.String())))

		// Decode -> encode -> decode.
		enc := helloPayload("supported-versions", "2.0", "capabilities", h.caps.String(),
			"engine-id", h.engineID, "healthcheck", h.healthcheck)
		enc = appendName(enc, "max-frame-size")
		enc = appendTypedInt(enc, TypeUint64, h.maxFrameSize)
		h2, err := parseHAProxyHello(enc)
		require.NoError(t, err)
		require.Equal(t, h, h2)

		// The agent's answer: the frame size it negotiates, read back as
		// HAProxy reads an AGENT-HELLO.
		for _, limit := range []int{MinFrameSize, 16380, DefaultMaxFrameSize} {
			size := negotiateFrameSize(h.maxFrameSize, limit)
			require.Equal(t, int(min(h.maxFrameSize, uint64(limit))), size)
			ans := appendHello(nil, frameAgentHello, size, h.caps, "")
			fr, err := parseFrame(ans[lengthSize:])
			require.NoError(t, err)
			require.Equal(t, frameAgentHello, fr.typ)
			require.Equal(t, flagFin, fr.flags)
			kvs, err := readKVList(fr.payload)
			require.NoError(t, err)
			require.Len(t, kvs, 3)
			require.True(t, kvs[0].value.EqualString("2.0"))
			n, _ := kvs[1].value.Uint()
			require.Equal(t, uint64(size), n)
			s, _ := stringValue(kvs[2].value)
			require.Equal(t, h.caps, parseCapabilities(s))
		}
	})
}

// FuzzCapabilities feeds the capability and version lists of a HELLO.
func FuzzCapabilities(f *testing.F) {
	f.Add([]byte("pipelining,async"))
	f.Add([]byte(""))
	f.Add([]byte(" pipelining , async,fragmentation,,x y"))
	f.Add([]byte("2.0"))
	f.Add([]byte("1.0, 2.000 ,3"))
	f.Fuzz(func(t *testing.T, s []byte) {
		var c capabilities
		checkAlloc(t, "parseCapabilities", len(s), 0, 0, func() { c = parseCapabilities(s) })
		checkEq(t, c&^(capPipelining|capAsync|capFragmentation), 0, "unknown capabilities")
		checkEq(t, parseCapabilities([]byte(c.String())), c, "capabilities round trip")
		// Adding a known capability to the list adds it to the set.
		checkEq(t, parseCapabilities(append(append([]byte(nil), s...), ",async"...)), c|capAsync, "async added")
		var v20 bool
		checkAlloc(t, "supportsVersion20", len(s), helloAllocFixed, helloAllocPerByte, func() { v20 = supportsVersion20(s) })
		// A list that holds 2.0 still does with another item; one that
		// does not, still does not with an unsupported one.
		checkEq(t, supportsVersion20(append(append([]byte(nil), s...), ",1.0"...)), v20, "1.0 added")
		check(t, supportsVersion20(append(append([]byte(nil), s...), ",2.0"...)), "2.0 added")
	})
}

// ---------------------------------------------------------------------------
// FuzzNotify

// decodedArg and decodedMessage are a NOTIFY as the iterators read it.
type decodedArg struct {
	name  string
	value Value
}

type decodedMessage struct {
	name string
	args []decodedArg
}

// iterateMessages reads every message of r with the iterators.
func iterateMessages(t *testing.T, r *Request) []decodedMessage {
	var out []decodedMessage
	for it := r.Messages(); it.Next(); {
		m := decodedMessage{name: it.Name()}
		require.Equal(t, m.name, string(it.NameBytes()))
		require.True(t, it.NameIs(m.name))
		for args := it.Args(); args.Next(); {
			require.Equal(t, args.Name(), string(args.NameBytes()))
			m.args = append(m.args, decodedArg{name: args.Name(), value: args.Value()})
		}
		require.Len(t, m.args, it.NumArgs(), "every argument of a checked frame reads")
		// Arg finds the first argument of a name.
		for i, a := range m.args {
			v, ok := it.Arg(a.name)
			require.True(t, ok)
			first := i
			for j := range m.args[:i] {
				if m.args[j].name == a.name {
					first = j
					break
				}
			}
			require.True(t, sameValue(m.args[first].value, v), "Arg(%q)", a.name)
		}
		out = append(out, m)
	}
	return out
}

// appendDecodedMessages encodes messages with the client's encoder.
func appendDecodedMessages(t *testing.T, msgs []decodedMessage) []byte {
	cms := make([]ClientMessage, len(msgs))
	for i, m := range msgs {
		cms[i].Name = m.name
		for _, a := range m.args {
			cms[i].Args = append(cms[i].Args, Arg{Name: a.name, Value: a.value})
		}
	}
	b, err := appendMessages(nil, cms)
	require.NoError(t, err)
	return b
}

func FuzzNotify(f *testing.F) {
	for _, p := range goldenPayloads(f, frameNotify) {
		f.Add(p)
	}
	for _, m := range []ClientMessage{ipRepMessage, heavyMessage} {
		p, err := appendMessages(nil, []ClientMessage{m, m})
		require.NoError(f, err)
		f.Add(p)
	}
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0x00, 0x00}, 40))                                      // 40 empty messages: past the index
	f.Add(append([]byte{0x01, 'm', 0xFF}, bytes.Repeat([]byte{0x00, 0x00}, 255)...)) // 255 args
	f.Add([]byte{0x01, 'm', 0x02, 0x01, 'a', 0x00, 0x01, 'a', 0x11})                 // a duplicated name
	f.Add([]byte{0x01, 'm', 0x03, 0x01, 'a', 0x04, 0x01})                            // NB-ARGS above what is there
	f.Fuzz(func(t *testing.T, b []byte) {
		r := &Request{}
		var err error
		checkAlloc(t, "indexMessages", len(b), 0, 0, func() { err = r.indexMessages(b) })
		if err != nil {
			require.True(t, err == errTruncated || err == errVarintTooLong || err == errUnknownType || err == errIntOverflow, "error %v", err)
			return
		}
		msgs := iterateMessages(t, r)
		require.Len(t, msgs, r.NumMessages(), "every message of a checked frame reads")
		checkAlloc(t, "the iterators", len(b), 0, 0, func() {
			for it := r.Messages(); it.Next(); {
				_ = it.NameIs("x")
				_, _ = it.Arg("x")
				for args := it.Args(); args.Next(); {
					_ = args.NameIs("x")
				}
			}
		})
		for i, m := range msgs {
			it, ok := r.Message(m.name)
			require.True(t, ok)
			first := i
			for j := range msgs[:i] {
				if msgs[j].name == m.name {
					first = j
					break
				}
			}
			require.Equal(t, len(msgs[first].args), it.NumArgs(), "Message(%q) finds the first", m.name)
		}

		// The simple API: the same messages, the first argument of each
		// name, as Go values.
		var simple []Message
		checkAlloc(t, "decodeMessages", len(b), messagesAllocFixed, messagesAllocPerByte, func() {
			simple = (&Request{payload: r.payload, nmsgs: r.nmsgs, nargs: r.nargs, index: r.index}).decodeMessages()
		})
		require.Len(t, simple, len(msgs))
		for i, m := range msgs {
			require.Equal(t, m.name, simple[i].Name)
			want := map[string]interface{}{}
			for _, a := range m.args {
				if _, dup := want[a.name]; !dup {
					want[a.name] = a.value.Interface()
				}
			}
			require.Equal(t, want, simple[i].Args)
		}

		// Decode -> encode (the client's encoder) -> decode: the same
		// names, types and values in order; the encoding is then a fixed
		// point.
		enc := appendDecodedMessages(t, msgs)
		r2 := &Request{}
		require.NoError(t, r2.indexMessages(enc))
		msgs2 := iterateMessages(t, r2)
		require.Len(t, msgs2, len(msgs))
		for i := range msgs {
			require.Equal(t, msgs[i].name, msgs2[i].name)
			require.Len(t, msgs2[i].args, len(msgs[i].args))
			for j, a := range msgs[i].args {
				require.Equal(t, a.name, msgs2[i].args[j].name)
				require.True(t, sameValue(a.value, msgs2[i].args[j].value), "message %d arg %d", i, j)
			}
		}
		require.Equal(t, enc, appendDecodedMessages(t, msgs2))
	})
}

// ---------------------------------------------------------------------------
// FuzzDisconnect

func FuzzDisconnect(f *testing.F) {
	for _, p := range goldenPayloads(f, frameHAProxyDisconnect) {
		f.Add(p)
	}
	f.Add(helloPayload("status-code", uint32(1<<32-1), "message", []byte("binary")))
	f.Add(helloPayload("status-code", uint64(1<<32), "message", "too big"))
	f.Add(helloPayload("status-code", int64(-1)))
	f.Add(helloPayload("message", strings.Repeat("m", 300)))
	f.Add(helloPayload("status-code", "0"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var d disconnect
		var err error
		checkAlloc(t, "parseDisconnect", len(b), disconnectAllocFixed, disconnectAllocPerByte, func() {
			d, err = parseDisconnect(b)
		})
		if err != nil {
			require.True(t, err == errBadKVType || err == errTruncated || err == errVarintTooLong || err == errUnknownType || err == errIntOverflow, "error %v", err)
			return
		}
		_ = d.status.String()
		require.Less(t, statusStat(d.status), numStatusStats)

		// Decode -> encode -> decode.
		enc := appendName(nil, "status-code")
		enc = appendTypedInt(enc, TypeUint32, uint64(d.status))
		enc = appendName(enc, "message")
		enc = appendTypedBytes(enc, TypeString, d.message)
		d2, err := parseDisconnect(enc)
		require.NoError(t, err)
		require.Equal(t, d, d2)

		// The agent's own DISCONNECT with that status and message, as
		// HAProxy reads it: the message cut to what HAProxy 2.6 accepts.
		ans := appendDisconnect(nil, frameAgentDisconnect, d.status, d.message)
		fr, err := parseFrame(ans[lengthSize:])
		require.NoError(t, err)
		require.Equal(t, frameAgentDisconnect, fr.typ)
		d3, err := parseDisconnect(fr.payload)
		require.NoError(t, err)
		require.Equal(t, d.status, d3.status)
		want := d.message
		if len(want) > maxDisconnectMessage {
			want = want[:maxDisconnectMessage]
		}
		require.Equal(t, want, d3.message)
	})
}

// ---------------------------------------------------------------------------
// FuzzACK

// normalizeAction is an action as the agent sends it: an IPv4-mapped IPV6
// goes as IPV4 (appendAnyValue's net.IP rule).
func normalizeAction(a Action) Action {
	if s, ok := a.(ActionSetVar); ok {
		if ip, ok := s.Value.(net.IP); ok {
			if ip4 := ip.To4(); ip4 != nil {
				s.Value = ip4
			}
		}
		return s
	}
	return a
}

func FuzzACK(f *testing.F) {
	f.Add(appendRawActions(nil, goldenActions(f)))
	for _, a := range goldenActions(f) {
		f.Add(appendRawActions(nil, []Action{a}))
	}
	f.Add([]byte{})
	f.Add([]byte{actionSetVar, 3})                                                                              // truncated head
	f.Add([]byte{actionSetVar, 2, 1, 1, 'x', 0})                                                                // set-var with 2 args
	f.Add([]byte{actionUnsetVar, 2, 9, 0})                                                                      // unknown scope, empty name
	f.Add([]byte{actionSetVar, 3, 1, 1, 'x', 0x05, 0xFF, 0xF0, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0x0E}) // UINT64 max
	f.Add([]byte{7, 3, 1, 1, 'x', 0})                                                                           // unknown action
	f.Fuzz(func(t *testing.T, b []byte) {
		var actions []Action
		var err error
		checkAlloc(t, "decodeActions", len(b), ackAllocFixed, ackAllocPerByte, func() {
			actions, err = decodeActions(b)
		})
		// Decode -> encode -> decode, the actions decoded before an error
		// included.
		enc := appendRawActions(nil, actions)
		actions2, err2 := decodeActions(enc)
		require.NoError(t, err2)
		require.Equal(t, actions, actions2)
		if err != nil {
			return
		}
		require.Equal(t, enc, appendRawActions(nil, actions2), "a fixed point")

		// Through the agent's ActionWriter: what it accepts comes back as
		// written; what it refuses is refused for a documented reason.
		var w ActionWriter
		w.reset(nil, 1, 2, DefaultMaxFrameSize, 0)
		var accepted []Action
		for _, a := range actions {
			if err := a.writeTo(&w); err != nil {
				require.True(t, errors.Is(err, ErrVarName) || errors.Is(err, ErrVarScope) || errors.Is(err, ErrVarValue),
					"refused %#v: %v", a, err)
				continue
			}
			accepted = append(accepted, normalizeAction(a))
		}
		ack := w.finish()
		require.Equal(t, uint32(len(ack)-lengthSize), binary.BigEndian.Uint32(ack))
		fr, err := parseFrame(ack[lengthSize:])
		require.NoError(t, err)
		require.Equal(t, frameAck, fr.typ)
		require.Equal(t, flagFin, fr.flags)
		require.Equal(t, uint64(1), fr.streamID)
		require.Equal(t, uint64(2), fr.frameID)
		written, err := decodeActions(fr.payload)
		require.NoError(t, err)
		require.Equal(t, accepted, written)
	})
}

// ---------------------------------------------------------------------------
// Connection-level targets: a real Agent on a loopback listener, one
// connection per input, bounded by deadlines.

// fuzzDeadline bounds one exchange: a connection that is neither answered
// nor closed by then is a hang.
const fuzzDeadline = 5 * time.Second

// fuzzAgent serves a on a loopback listener for the whole fuzz target, with
// a quiet logger that keeps nothing (the test logger keeps every entry, too
// many for a fuzzing run), and a client connection that must keep working
// whatever the fuzz inputs do to their own connections.
func fuzzAgent(f *testing.F, a *Agent) (string, *Client) {
	logger := logrus.New()
	logger.SetOutput(io.Discard)
	logger.SetLevel(logrus.DebugLevel)
	a.Logger = logger
	addr := startAgent(f, a)
	client := dialAgent(f, addr, ClientConfig{})
	// A first round trip: the agent has counted the client's handshake
	// before the first input's stats are taken.
	_, err := client.Notify(notifyCtx(f), ClientMessage{Name: "ping"})
	require.NoError(f, err)
	return addr, client
}

// fuzzExchange connects to addr, writes send (from another goroutine, so that
// neither side can block the other), closes its write side and reads all
// the agent sends until it closes. It fails t if that takes longer than
// fuzzDeadline.
func fuzzExchange(t *testing.T, addr string, send []byte) []byte {
	nc, err := net.DialTimeout("tcp", addr, fuzzDeadline)
	require.NoError(t, err)
	tc := nc.(*net.TCPConn)
	defer func() {
		_ = tc.SetLinger(0) // no TIME_WAIT left by each of many connections
		tc.Close()
	}()
	require.NoError(t, nc.SetDeadline(time.Now().Add(fuzzDeadline)))
	written := make(chan struct{})
	go func() {
		defer close(written)
		// The agent may close before reading everything: write errors
		// are its business.
		_, _ = nc.Write(send)
		_ = tc.CloseWrite()
	}()
	got, err := io.ReadAll(nc)
	<-written
	if err != nil && !isNormalEnd(err) {
		t.Fatalf("the agent neither finished nor closed the connection within %v: %v (read %d bytes)", fuzzDeadline, err, len(got))
	}
	return got
}

// splitFrames cuts what the agent sent into frames, failing t on a partial
// or malformed one.
func splitFrames(t *testing.T, b []byte) []frame {
	var out []frame
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), lengthSize, "partial frame at the end: %x", b)
		n := binary.BigEndian.Uint32(b)
		require.GreaterOrEqual(t, n, uint32(minFrameLength))
		require.GreaterOrEqual(t, uint64(len(b)-lengthSize), uint64(n), "partial frame at the end")
		fr, err := parseFrame(b[lengthSize : lengthSize+n])
		require.NoError(t, err)
		out = append(out, fr)
		b = b[lengthSize+n:]
	}
	return out
}

// settle waits until the agent holds only the fuzz client's connection and
// no handler runs, so that the next input's stats start clean.
func settle(t *testing.T, a *Agent, client *Client) {
	_, err := client.Notify(notifyCtx(t), ClientMessage{Name: "ping"})
	require.NoError(t, err, "another connection still works")
	waitFor(t, func() bool {
		st := a.Stats()
		return st.ConnsOpen == 1 && st.InFlight == 0
	}, "the fuzzed connection ends and its handlers return")
}

// ---------------------------------------------------------------------------
// FuzzReassembly
//
// The input is a program of fragment frames sent on one connection after a
// HELLO, followed by HAProxy's DISCONNECT. A model written from SPOP.md §7
// and §12 says what the agent must do with each frame, and the agent's
// answers are compared with it: the handler sees exactly the reassembled
// payloads; each gets its ACK; an aborted NOTIFY gets none; a NOTIFY joined
// past maxReassembled gets an aborting ACK and no handler call; a NOTIFY
// or an UNSET of other ids amid fragments, or an invalid payload, ends the
// connection with its status; a frame of unknown type is ignored, even amid
// fragments; otherwise the agent echoes the DISCONNECT, and nothing
// follows.
//
// Each operation is one control byte c, then, for those carrying data, a
// length byte and that many bytes (or the rest):
//
//	c&7 == 0  NOTIFY without FIN (ABORT too if c&0x10): starts a NOTIFY
//	c&7 == 1  UNSET without FIN, with data
//	c&7 == 2  UNSET with FIN, with data
//	c&7 == 3  UNSET with ABORT (and FIN if c&0x10)
//	c&7 == 4  NOTIFY with FIN, with data
//	c&7 == 5  a frame of unknown type 42
//	c&7 == 6  UNSET frames of 16000 zero bytes, past maxReassembled
//	c&7 == 7  NOTIFY with FIN and ABORT, with data
//
// A NOTIFY's stream-id is 2 if c&0x08, else 1; its frame-id 2 if c&0x20,
// else 1. An UNSET carries the ids of the NOTIFY being joined (1, 1 if
// none), its stream-id plus 5 if c&0x08, its frame-id plus 1 if c&0x20.
//
// The connection does the reassembly (conn.onNotify, onUnset), so the
// target drives a real agent over loopback rather than a copy of it.

type fragOp struct {
	typ      frameType
	flags    uint32
	sid, fid uint64
	data     []byte
	filler   bool
}

func parseFragOps(b []byte) []fragOp {
	var ops []fragOp
	cur := [2]uint64{1, 1}
	fillers := 0
	data := func() []byte {
		if len(b) == 0 {
			return nil
		}
		n := min(int(b[0]), len(b)-1)
		d := b[1 : 1+n]
		b = b[1+n:]
		return d
	}
	for len(b) > 0 && len(ops) < 64 {
		c := b[0]
		b = b[1:]
		sid, fid := uint64(1), uint64(1)
		if c&0x08 != 0 {
			sid = 2
		}
		if c&0x20 != 0 {
			fid = 2
		}
		usid, ufid := cur[0], cur[1]
		if c&0x08 != 0 {
			usid += 5
		}
		if c&0x20 != 0 {
			ufid++
		}
		switch c & 7 {
		case 0:
			op := fragOp{typ: frameNotify, sid: sid, fid: fid, data: data()}
			if c&0x10 != 0 {
				op.flags = flagAbort
			} else {
				cur = [2]uint64{sid, fid}
			}
			ops = append(ops, op)
		case 1:
			ops = append(ops, fragOp{typ: frameUnset, sid: usid, fid: ufid, data: data()})
		case 2:
			ops = append(ops, fragOp{typ: frameUnset, flags: flagFin, sid: usid, fid: ufid, data: data()})
		case 3:
			op := fragOp{typ: frameUnset, flags: flagAbort, sid: usid, fid: ufid}
			if c&0x10 != 0 {
				op.flags |= flagFin
			}
			ops = append(ops, op)
		case 4:
			ops = append(ops, fragOp{typ: frameNotify, flags: flagFin, sid: sid, fid: fid, data: data()})
		case 5:
			ops = append(ops, fragOp{typ: frameType(42), flags: flagFin, sid: sid, fid: fid, data: data()})
		case 6:
			if fillers < 2 { // each sends a megabyte
				fillers++
				ops = append(ops, fragOp{typ: frameUnset, sid: usid, fid: ufid, filler: true})
			}
		case 7:
			ops = append(ops, fragOp{typ: frameNotify, flags: flagFin | flagAbort, sid: sid, fid: fid, data: data()})
		}
	}
	return ops
}

// fillerFrames is how many 16000-byte UNSET frames a filler sends: enough
// to pass maxReassembled from an empty NOTIFY.
const fillerChunk = 16000

var fillerFrames = maxReassembled/fillerChunk + 1

// fragModel is what the agent must do with a program, from SPOP.md §7.
type fragModel struct {
	active     bool
	sid, fid   uint64
	buf        []byte
	aborted    bool   // a NOTIFY was answered with an aborting ACK:
	asid, afid uint64 // its later fragments are ignored

	payloads [][]byte // handler calls, in order
	acks     []ackKey // ACKs, in order
	status   Status   // the AGENT-DISCONNECT status
	failed   bool     // ended by a protocol error: later frames unread
}

type ackKey struct {
	sid, fid uint64
	abort    bool
}

// validNotify reports whether a payload is a well-formed LIST-OF-MESSAGES
// (FuzzNotify checks the decoder that says so).
func validNotify(p []byte) bool { return (&Request{}).indexMessages(p) == nil }

func (m *fragModel) fail(s Status) { m.failed, m.status = true, s }

// handle is a whole NOTIFY: a handler call and its ACK, or an invalid
// frame.
func (m *fragModel) handle(sid, fid uint64, p []byte) {
	if !validNotify(p) {
		m.fail(StatusInvalidFrame)
		return
	}
	m.payloads = append(m.payloads, bytes.Clone(p))
	m.acks = append(m.acks, ackKey{sid, fid, false})
}

// add joins data to the NOTIFY; past maxReassembled it is answered with an
// aborting ACK and its transfer ends (HAProxy 2.6 sends no ABORT after
// it); its later fragments are ignored, even amid another NOTIFY.
func (m *fragModel) add(data []byte) {
	m.buf = append(m.buf, data...)
	if len(m.buf) > maxReassembled {
		m.acks = append(m.acks, ackKey{m.sid, m.fid, true})
		m.active, m.buf = false, nil
		m.aborted, m.asid, m.afid = true, m.sid, m.fid
	}
}

func (m *fragModel) frame(typ frameType, flags uint32, sid, fid uint64, data []byte) {
	if m.failed {
		return
	}
	fin, abort := flags&flagFin != 0, flags&flagAbort != 0
	switch typ {
	case frameNotify:
		switch {
		case m.active: // fragments go back to back
			m.fail(StatusInterlacedFrames)
		case abort: // HAProxy gave up on it: nothing to answer
		case fin:
			m.handle(sid, fid, data)
		default:
			m.active, m.sid, m.fid, m.buf = true, sid, fid, nil
			m.add(data)
		}
	case frameUnset:
		matches := m.active && sid == m.sid && fid == m.fid
		switch {
		case !matches && m.aborted && sid == m.asid && fid == m.afid: // of the aborted one: ignored
		case !m.active: // nothing to continue: ignored
		case !matches:
			m.fail(StatusInterlacedFrames)
		case abort:
			m.active = false
		default:
			m.add(data)
			if fin && m.active {
				m.active = false
				m.handle(m.sid, m.fid, m.buf)
			}
		}
	}
}

// fragRecorder is the reassembly target's handler: it keeps a copy of each
// payload it is given.
type fragRecorder struct {
	mu       sync.Mutex
	payloads [][]byte
}

func (h *fragRecorder) ServeSPOE(_ *ActionWriter, r *Request) error {
	if r.EngineID() != "" {
		return nil // the fuzz client's ping, not the fuzzed connection
	}
	h.mu.Lock()
	h.payloads = append(h.payloads, bytes.Clone(r.payload))
	h.mu.Unlock()
	slowHandler(r)
	return nil
}

// slowHandlerTime is how long a handler takes on a frame whose first
// message is called "slow": longer than the inline budget, so that the
// connection's reading moves to another goroutine while it runs (a rescue).
const slowHandlerTime = 300 * time.Microsecond

func slowHandler(r *Request) {
	if it := r.Messages(); it.Next() && it.NameIs("slow") {
		time.Sleep(slowHandlerTime) // a slow lookup
	}
}

func (h *fragRecorder) take() [][]byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.payloads
	h.payloads = nil
	return p
}

// fragProgram builds a program sending payload p cut at the given points:
// the first piece in a NOTIFY without FIN (stream-id 2 if sid2), pieces of
// at most 255 bytes in UNSETs, the last one with FIN.
func fragProgram(sid2 bool, p []byte, cuts ...int) []byte {
	var chunks [][]byte
	prev := 0
	for _, cut := range append(cuts, len(p)) {
		piece := p[prev:cut]
		for len(piece) > 255 {
			chunks = append(chunks, piece[:255])
			piece = piece[255:]
		}
		chunks = append(chunks, piece)
		prev = cut
	}
	if len(chunks) == 1 {
		chunks = append(chunks, nil)
	}
	var out []byte
	for i, ch := range chunks {
		op := byte(1)
		switch {
		case i == 0 && sid2:
			op = 0x08
		case i == 0:
			op = 0
		case i == len(chunks)-1:
			op = 2
		}
		out = append(out, op, byte(len(ch)))
		out = append(out, ch...)
	}
	return out
}

func FuzzReassembly(f *testing.F) {
	rec := &fragRecorder{}
	a := &Agent{Handler: rec, ReadTimeout: fuzzDeadline}
	addr, client := fuzzAgent(f, a)

	for _, p := range goldenPayloads(f, frameNotify) {
		f.Add(fragProgram(false, p, len(p)/2))
		f.Add(fragProgram(true, p, 1, 2, len(p)-1))
	}
	echo := golden(f, "3.5-dev5", "notify-echo.bin")[lengthSize+7:]
	f.Add(fragProgram(false, echo, 100, 200, 300, 400, 500))
	ipRep, _ := appendMessages(nil, []ClientMessage{ipRepMessage})
	f.Add(append(fragProgram(false, ipRep, 3), 4, byte(len(ipRep)))) // then a NOTIFY with FIN, cut short
	f.Add([]byte{0, 2, 1, 'm', 3})                                   // NOTIFY, UNSET ABORT
	f.Add([]byte{0, 2, 1, 'm', 0x13})                                // NOTIFY, UNSET FIN|ABORT
	f.Add([]byte{0, 2, 1, 'm', 4, 0})                                // NOTIFY interlaced
	f.Add([]byte{0, 2, 1, 'm', 0x0A, 1, 0})                          // UNSET of other ids
	f.Add([]byte{0, 2, 1, 'm', 5, 0, 2, 0})                          // an unknown frame amid fragments
	f.Add([]byte{2, 0, 1, 0, 3, 4, 0})                               // UNSETs with no NOTIFY
	f.Add([]byte{0x10, 2, 1, 'm', 4, 0})                             // NOTIFY without FIN but ABORT
	f.Add([]byte{7, 2, 1, 'm', 4, 0})                                // NOTIFY FIN|ABORT
	f.Add([]byte{4})                                                 // an empty NOTIFY
	slow, _ := appendMessages(nil, []ClientMessage{{Name: "slow"}})
	f.Add(append(append(fragProgram(false, slow, 2), 4, byte(len(slow))), slow...)) // a rescue, then a NOTIFY
	f.Add(append(append([]byte{4, byte(len(slow))}, slow...), fragProgram(true, ipRep, 4)...))

	f.Fuzz(func(t *testing.T, b []byte) {
		ops := parseFragOps(b)
		if len(ops) == 0 {
			return
		}
		var m fragModel
		send := rawFrame(frameHAProxyHello, flagFin, 0, 0,
			helloPayload("supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "pipelining"))
		for _, op := range ops {
			if op.filler {
				zeros := make([]byte, fillerChunk)
				for i := 0; i < fillerFrames; i++ {
					send = append(send, rawFrame(op.typ, op.flags, op.sid, op.fid, zeros)...)
					m.frame(op.typ, op.flags, op.sid, op.fid, zeros)
				}
				continue
			}
			send = append(send, rawFrame(op.typ, op.flags, op.sid, op.fid, op.data)...)
			m.frame(op.typ, op.flags, op.sid, op.fid, op.data)
		}
		send = append(send, rawFrame(frameHAProxyDisconnect, flagFin, 0, 0,
			helloPayload("status-code", uint32(StatusNormal), "message", "normal"))...)
		if !m.failed {
			m.status = StatusNormal // echoed
		}

		before := a.Stats()
		frames := splitFrames(t, fuzzExchange(t, addr, send))
		settle(t, a, client)
		calls := rec.take() // once every handler returned
		after := a.Stats()

		// Exactly the reassembled payloads reached the handler, each once.
		// The order is not the frames' when handlers run in goroutines of
		// their own (rescued, or dispatched at once while handlers are
		// slow), which pipelining allows.
		require.Equal(t, len(m.payloads), len(calls), "handler calls")
		sortBytes(calls)
		want := append([][]byte(nil), m.payloads...)
		sortBytes(want)
		for i := range calls {
			require.True(t, bytes.Equal(want[i], calls[i]), "payloads handled: %x, want %x", calls, want)
		}

		require.NotEmpty(t, frames)
		require.Equal(t, frameAgentHello, frames[0].typ)
		last := frames[len(frames)-1]
		require.Equal(t, frameAgentDisconnect, last.typ, "the connection ends with AGENT-DISCONNECT, and nothing after")
		d, err := parseDisconnect(last.payload)
		require.NoError(t, err)
		require.Equal(t, m.status, d.status, "AGENT-DISCONNECT status (%s)", d.message)

		// Each ACK answers a NOTIFY, once. One may be missing only if its
		// handler, run out of the loop, returned after the AGENT-DISCONNECT
		// (HAProxy reads nothing else after its own DISCONNECT): it is
		// then counted as dropped.
		var acks []ackKey
		for _, fr := range frames[1 : len(frames)-1] {
			require.Equal(t, frameAck, fr.typ)
			require.True(t, fr.fin())
			if fr.abort() {
				require.Empty(t, fr.payload, "an aborting ACK carries no action")
			} else {
				require.Equal(t, []byte{actionNoop}, fr.payload, "the handler writes no action: one NOOP byte")
			}
			acks = append(acks, ackKey{fr.streamID, fr.frameID, fr.abort()})
		}
		require.Empty(t, missingACKs(acks, m.acks), "ACKs for no NOTIFY (want %v)", m.acks)
		missing := missingACKs(m.acks, acks)
		require.Equal(t, uint64(len(missing)), after.ACKsDropped-before.ACKsDropped, "missing ACKs %v are dropped ones", missing)
		for _, k := range missing {
			require.False(t, k.abort, "an aborting ACK is written by the loop itself")
		}
		// The agent's counters agree with what it sent and received.
		require.Equal(t, uint64(len(acks)+1), after.FramesOut.ACK-before.FramesOut.ACK, "FramesOut.ACK counts every ACK sent (and the client's ping)")
		var tooBig uint64
		for _, k := range m.acks {
			if k.abort {
				tooBig++
			}
		}
		require.Equal(t, tooBig, after.NotifyTooBig-before.NotifyTooBig)
		require.Equal(t, uint64(1), after.ConnsTotal-before.ConnsTotal)
	})
}

// sortBytes sorts byte slices by content.
func sortBytes(b [][]byte) {
	sort.Slice(b, func(i, j int) bool { return bytes.Compare(b[i], b[j]) < 0 })
}

// missingACKs returns the ACKs of want that got lacks, as multisets.
func missingACKs(want, got []ackKey) []ackKey {
	count := map[ackKey]int{}
	for _, k := range got {
		count[k]++
	}
	var missing []ackKey
	for _, k := range want {
		if count[k] > 0 {
			count[k]--
			continue
		}
		missing = append(missing, k)
	}
	return missing
}

// ---------------------------------------------------------------------------
// FuzzConnection
//
// The input's first byte picks what precedes the rest of it on a new
// connection: nothing (mode 0), a golden HAProxy 2.6 HELLO (1), a golden
// 3.5 HELLO (2), or a HELLO negotiating the smallest frame size, 256 bytes,
// with async (3), each with an engine-id of its own. The rest is sent as it
// is. The agent must not panic, must
// close the connection once the input ends (within fuzzDeadline), and all
// it sends must be valid SPOP: whole frames, an AGENT-HELLO first (when a
// valid HELLO was sent), then ACKs that fit the negotiated frame size and
// decode, and an AGENT-DISCONNECT last if any; another connection must
// still work after, and the agent's counters agree with what it sent.

// echoHandler answers each message by echoing its arguments as variables,
// with both APIs at work: "fail" makes it return an error, "panic" panic,
// "slow" take longer than the inline budget.
// It counts in lost the frames whose simple-API decoding lost messages.
func echoHandler(lost *atomic.Int64) HandlerFunc {
	return func(w *ActionWriter, r *Request) error {
		if len(r.decodeMessages()) != r.NumMessages() {
			lost.Add(1)
		}
		return echoEachArg(w, r)
	}
}

func echoEachArg(w *ActionWriter, r *Request) error {
	i := 0
	for it := r.Messages(); it.Next(); {
		switch {
		case it.NameIs("fail"):
			return errors.New("fuzz: handler failed")
		case it.NameIs("panic"):
			panic("fuzz: handler panicked")
		case it.NameIs("slow"):
			slowHandler(r)
		}
		for args := it.Args(); args.Next(); i++ {
			_ = w.SetVar(VarScopeTransaction, "a"+strconv.Itoa(i), args.Value())
		}
	}
	return nil
}

func FuzzConnection(f *testing.F) {
	var lost atomic.Int64
	a := &Agent{Handler: echoHandler(&lost), ReadTimeout: fuzzDeadline}
	addr, client := fuzzAgent(f, a)
	hellos := [4][]byte{
		1: golden(f, "2.6.12", "haproxy-hello.bin"),
		2: golden(f, "3.5-dev5", "haproxy-hello.bin"),
		3: rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload("supported-versions", "2.0",
			"max-frame-size", uint32(MinFrameSize), "capabilities", "pipelining,async",
			"engine-id", "00000000-0000-4000-8000-000000000000")),
	}
	// Each HELLO ends with a 36-byte engine-id, made unique to each input:
	// with async, the ACK of a connection that closed before its handler
	// returned waits for the next connection of its engine, and must not
	// reach the next input's.
	const engineIDLen = 36
	for _, h := range hellos[1:] {
		require.True(f, bytes.HasSuffix(h[:len(h)-engineIDLen], append(appendName(nil, "engine-id"), byte(TypeString), engineIDLen)))
	}
	var inputs uint64

	bodies := goldenBodies(f)
	byName := map[string][]byte{}
	var all []byte
	for _, g := range bodies {
		byName[g.name] = g.wire
		if g.f.typ == frameNotify {
			all = append(all, g.wire...)
		}
	}
	for _, g := range bodies {
		f.Add(append([]byte{0}, g.wire...))
	}
	for mode := byte(1); mode <= 3; mode++ {
		f.Add(append([]byte{mode}, all...))
		f.Add(append(append([]byte{mode}, all...), byName["2.6.12/haproxy-disconnect-status0.bin"]...))
	}
	f.Add(append([]byte{0}, append(byName["2.6.12/haproxy-hello-healthcheck.bin"], all...)...))
	fail, _ := appendMessages(nil, []ClientMessage{{Name: "fail"}})
	panics, _ := appendMessages(nil, []ClientMessage{{Name: "panic"}})
	f.Add(append(append([]byte{1}, rawFrame(frameNotify, flagFin, 1, 1, fail)...), rawFrame(frameNotify, flagFin, 2, 1, panics)...))
	slow, _ := appendMessages(nil, []ClientMessage{{Name: "slow", Args: []Arg{{"a", int64(1)}}}})
	var slows []byte
	for sid := uint64(1); sid <= 4; sid++ {
		slows = append(slows, rawFrame(frameNotify, flagFin, sid, 1, slow)...)
	}
	f.Add(append([]byte{2}, slows...))
	// testdata/fuzz/FuzzConnection/slow-notifies-then-disconnect: the same
	// on a 2.6 HELLO, then HAProxy's DISCONNECT.
	f.Add(append(append([]byte{3}, slows...), rawFrame(frameNotify, 0, 9, 1, slow[:3])...)) // then fragments
	big, _ := appendMessages(nil, []ClientMessage{{Name: "m", Args: []Arg{{"s", strings.Repeat("x", 240)}, {"t", "y"}}}})
	f.Add(append([]byte{3}, rawFrame(frameNotify, flagFin, 1, 1, big)...)) // an ACK too big for 256 bytes
	f.Add(append([]byte{1}, append(rawFrame(frameNotify, 0, 1, 1, big[:100]), rawFrame(frameUnset, flagFin, 1, 1, big[100:])...)...))
	f.Add([]byte{0, 0, 0x10, 0, 0, 3})          // 1 MiB announced, 1 byte sent
	f.Add([]byte{1, 0xFF, 0xFF, 0xFF, 0xFF, 3}) // 4 GiB announced
	f.Add([]byte{2, 0, 0, 0, 7, 42, 0, 0, 0, 0, 0, 0})

	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		mode := b[0] & 3
		send := append(append([]byte(nil), hellos[mode]...), b[1:]...)
		if mode != 0 {
			inputs++
			copy(send[len(hellos[mode])-engineIDLen:], fmt.Sprintf("fuzz0000-0000-4000-8000-%012x", inputs))
		}
		before := a.Stats()
		frames := splitFrames(t, fuzzExchange(t, addr, send))
		settle(t, a, client)
		after := a.Stats()

		maxFrame := uint64(DefaultMaxFrameSize)
		var acks, hellosOut, discs uint64
		for i, fr := range frames {
			switch fr.typ {
			case frameAgentHello:
				require.Zero(t, i, "AGENT-HELLO comes first")
				require.Equal(t, flagFin, fr.flags)
				require.Zero(t, fr.streamID)
				require.Zero(t, fr.frameID)
				kvs, err := readKVList(fr.payload)
				require.NoError(t, err)
				for _, e := range kvs {
					if string(e.key) == "max-frame-size" {
						maxFrame, _ = e.value.Uint()
					}
				}
				require.GreaterOrEqual(t, maxFrame, uint64(MinFrameSize))
				hellosOut++
			case frameAck:
				require.Greater(t, i, 0, "an ACK after the AGENT-HELLO")
				require.Equal(t, frameAgentHello, frames[0].typ)
				require.True(t, fr.fin())
				_, err := decodeActions(fr.payload)
				require.NoError(t, err, "the agent's ACK decodes")
				acks++
			case frameAgentDisconnect:
				require.Equal(t, len(frames)-1, i, "AGENT-DISCONNECT comes last")
				require.Equal(t, flagFin, fr.flags)
				d, err := parseDisconnect(fr.payload)
				require.NoError(t, err)
				require.LessOrEqual(t, len(d.message), maxDisconnectMessage)
				discs++
			default:
				t.Fatalf("the agent sent a %s frame", fr.typ)
			}
		}
		// Every frame fits the frame size (one byte shorter for an ACK,
		// for HAProxy 3.5).
		for _, fr := range frames {
			n := uint64(5 + varintLen(fr.streamID) + varintLen(fr.frameID) + len(fr.payload))
			if fr.typ == frameAck {
				require.Less(t, n, maxFrame, "ACK of %d bytes for max-frame-size %d", n, maxFrame)
			}
			require.LessOrEqual(t, n, maxFrame)
		}
		if mode != 0 {
			require.NotEmpty(t, frames)
			require.Equal(t, frameAgentHello, frames[0].typ, "a valid HELLO is answered")
		}

		require.Equal(t, uint64(1), after.ConnsTotal-before.ConnsTotal)
		require.Equal(t, hellosOut, after.FramesOut.AgentHello-before.FramesOut.AgentHello)
		require.Equal(t, discs, after.FramesOut.AgentDisconnect-before.FramesOut.AgentDisconnect)
		require.Equal(t, acks+1, after.FramesOut.ACK-before.FramesOut.ACK, "ACKs sent (and the client's ping)")
		require.LessOrEqual(t, after.ProtocolErrors-before.ProtocolErrors, uint64(1))
		require.LessOrEqual(t, after.Healthchecks-before.Healthchecks, uint64(1))
		require.Zero(t, lost.Load(), "decodeMessages gave every message")
	})
}

// TestFuzzAllocBoundsHold measures the allocating decoders on the inputs
// that cost them most per byte, to show the margins of the bounds above.
func TestFuzzAllocBoundsHold(t *testing.T) {
	if testing.Short() || fuzzing() {
		t.Skip("measurement")
	}
	type input struct {
		name string
		b    []byte
	}
	names := func(n int) []byte {
		var b []byte
		for i := 0; i < n; i++ {
			b = appendName(b, strconv.Itoa(i))
			b = append(b, 0)
		}
		return b
	}
	var argNames []byte
	for i := 0; i < 255; i++ {
		argNames = appendName(argNames, strconv.Itoa(i))
		argNames = append(argNames, 0x00)
	}
	notify := []input{
		{"empty messages", bytes.Repeat([]byte{0x00, 0x00}, 500)},
		{"one-arg messages", bytes.Repeat([]byte{0x00, 0x01, 0x00, 0x00}, 500)},
		{"distinct names", names(300)},
		{"255 args", append([]byte{0x01, 'm', 0xFF}, bytes.Repeat([]byte{0x00, 0x00}, 255)...)},
		{"255 named args", append([]byte{0x01, 'm', 0xFF}, argNames...)},
		{"ints", append([]byte{0x01, 'm', 0xFF}, bytes.Repeat([]byte{0x00, 0x04, 0xF0, 0x10}, 255)...)},
		{"ips", append([]byte{0x01, 'm', 0xFF}, bytes.Repeat([]byte{0x00, 0x06, 1, 2, 3, 4}, 255)...)},
	}
	var report []string
	for _, in := range notify {
		r := &Request{}
		require.NoError(t, r.indexMessages(in.b), in.name)
		limit := uint64(messagesAllocFixed + messagesAllocPerByte*len(in.b))
		n := allocated(limit, func() {
			(&Request{payload: r.payload, nmsgs: r.nmsgs, nargs: r.nargs, index: r.index}).decodeMessages()
		})
		report = append(report, fmt.Sprintf("decodeMessages %-16s %6d bytes in, %7d allocated: %5.1f per byte", in.name, len(in.b), n, float64(n)/float64(len(in.b))))
		require.LessOrEqual(t, n, limit, in.name)
	}
	acks := []input{
		{"unset-vars", bytes.Repeat([]byte{actionUnsetVar, 2, 1, 0}, 1000)},
		{"set-var NULL", bytes.Repeat([]byte{actionSetVar, 3, 1, 0, 0}, 1000)},
		{"set-var ipv4", bytes.Repeat([]byte{actionSetVar, 3, 1, 0, 6, 1, 2, 3, 4}, 1000)},
		{"set-var int", bytes.Repeat([]byte{actionSetVar, 3, 1, 0, 4, 0xF0, 0x10}, 1000)},
		{"set-var 1-byte string", bytes.Repeat([]byte{actionSetVar, 3, 1, 1, 'n', 8, 1, 'x'}, 1000)},
	}
	for _, in := range acks {
		limit := uint64(ackAllocFixed + ackAllocPerByte*len(in.b))
		n := allocated(limit, func() { _, _ = decodeActions(in.b) })
		report = append(report, fmt.Sprintf("decodeActions  %-22s %6d bytes in, %7d allocated: %5.1f per byte", in.name, len(in.b), n, float64(n)/float64(len(in.b))))
		require.LessOrEqual(t, n, limit, in.name)
	}
	sort.Strings(report)
	for _, l := range report {
		t.Log(l)
	}
}
