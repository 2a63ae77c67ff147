package spoe

import (
	"bytes"
	"encoding/hex"
	"math"
	"math/rand"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	require.NoError(t, err)
	return b
}

// Vectors printed by a port of HAProxy's encode_varint (SPOP.md §2), at
// every length boundary.
var varintVectors = []struct {
	value uint64
	bytes string
}{
	{0, "00"},
	{1, "01"},
	{239, "EF"},
	{240, "F0 00"},
	{241, "F1 00"},
	{256, "F0 01"},
	{2287, "FF 7F"},
	{2288, "F0 80 00"},
	{16380, "FC F0 06"},
	{264431, "FF FF 7F"},
	{264432, "F0 80 80 00"},
	{33818863, "FF FF FF 7F"},
	{33818864, "F0 80 80 80 00"},
	{1<<32 - 1, "FF F0 FE FE 7E"},
	{1<<63 - 1, "FF F0 FE FE FE FE FE FE FE 06"},
	{1<<64 - 1, "FF F0 FE FE FE FE FE FE FE 0E"},
	{1<<64 - 2, "FE F0 FE FE FE FE FE FE FE 0E"},
}

func TestVarintVectors(t *testing.T) {
	for _, v := range varintVectors {
		want := unhex(t, v.bytes)
		got := appendVarint(nil, v.value)
		assert.Equal(t, want, got, "encode %d", v.value)
		assert.Equal(t, len(want), varintLen(v.value), "varintLen(%d)", v.value)
		n, off, err := readVarint(want, 0)
		require.NoError(t, err, "decode % X", want)
		assert.Equal(t, v.value, n, "decode % X", want)
		assert.Equal(t, len(want), off)
	}
}

// TestVarintLengthBoundaries checks varintLen against SPOP.md's table of
// the smallest value of each length.
func TestVarintLengthBoundaries(t *testing.T) {
	firsts := []uint64{0, 240, 2288, 264432, 33818864, 4328786160, 554084600048,
		70922828777712, 9078122083518704, 1161999626690365680}
	for i, first := range firsts {
		assert.Equal(t, i+1, varintLen(first), "first of length %d", i+1)
		assert.Len(t, appendVarint(nil, first), i+1)
		if first > 0 {
			assert.Equal(t, i, varintLen(first-1), "last of length %d", i)
		}
	}
	assert.Equal(t, 10, varintLen(math.MaxUint64))
}

func TestVarintRoundTrip(t *testing.T) {
	check := func(x uint64) {
		b := appendVarint(nil, x)
		got, off, err := readVarint(b, 0)
		if err != nil || got != x || off != len(b) || len(b) != varintLen(x) {
			t.Fatalf("varint %d: % X decoded to %d, %d bytes, %v", x, b, got, off, err)
		}
	}
	for x := uint64(0); x < 1<<22; x++ {
		check(x)
	}
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 200000; i++ {
		check(r.Uint64() >> uint(r.Intn(64)))
	}
}

// TestVarintWholeByte pins the decoder's defining quirk: the high bit of a
// continuation byte is added, not masked.
func TestVarintWholeByte(t *testing.T) {
	n, _, err := readVarint([]byte{0xF0, 0x80, 0x00}, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(2288), n)
}

func TestVarintErrors(t *testing.T) {
	tests := []struct {
		name  string
		bytes string
		err   error
	}{
		{"empty", "", errTruncated},
		{"first byte only", "F0", errTruncated},
		{"continuation cut", "F0 80", errTruncated},
		{"nine bytes cut", "FF F0 FE FE FE FE FE FE FE", errTruncated},
		{"eleven bytes", "FF FF FF FF FF FF FF FF FF FF 00", errVarintTooLong},
		{"ten continuation bytes", "FF 80 80 80 80 80 80 80 80 80", errVarintTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := readVarint(unhex(t, tt.bytes), 0)
			assert.ErrorIs(t, err, tt.err)
		})
	}
	_, _, err := readVarint([]byte{1}, 5)
	assert.ErrorIs(t, err, errTruncated, "offset past the end")
}

func TestVarintNoAlloc(t *testing.T) {
	buf := make([]byte, 0, 16)
	src := unhex(t, "FF F0 FE FE FE FE FE FE FE 0E")
	var sink uint64
	allocs := testing.AllocsPerRun(1000, func() {
		buf = appendVarint(buf[:0], math.MaxUint64)
		v, _, _ := readVarint(src, 0)
		sink += v
	})
	assert.Zero(t, allocs)
}

// typedVectors are typed values in both directions: decoding the bytes
// gives the value, encoding the value gives the bytes.
var typedVectors = []struct {
	name  string
	bytes string
	value interface{} // as Value.Interface returns it
}{
	{"null", "00", nil},
	{"bool true", "11", true},
	{"bool false", "01", false},
	{"int32 -5", "02 FB F0 FE FE FE FE FE FE FE 0E", int32(-5)},
	{"int32 max", "02 FF F0 FE FE 3E", int32(math.MaxInt32)},
	{"uint32", "03 FC F0 06", uint32(16380)},
	{"int64 0", "04 00", int64(0)},
	{"int64 -1", "04 FF F0 FE FE FE FE FE FE FE 0E", int64(-1)},
	{"int64 min", "04 F0 F1 FE FE FE FE FE FE FE 06", int64(math.MinInt64)},
	{"uint64", "05 EF", uint64(239)},
	{"ipv4", "06 C0 00 02 01", net.IP{192, 0, 2, 1}},
	{"ipv6", "07 20 01 0D B8 00 00 00 00 00 00 00 00 00 00 00 01", net.ParseIP("2001:db8::1")},
	{"string", "08 05 68 65 6C 6C 6F", "hello"},
	{"empty string", "08 00", ""},
	{"binary", "09 04 00 FF 10 E0", []byte{0x00, 0xFF, 0x10, 0xE0}},
	{"empty binary", "09 00", []byte{}},
}

func TestTypedValues(t *testing.T) {
	for _, tt := range typedVectors {
		t.Run(tt.name, func(t *testing.T) {
			b := unhex(t, tt.bytes)
			v, off, err := readValue(b, 0)
			require.NoError(t, err)
			assert.Equal(t, len(b), off)
			got := v.Interface()
			assert.Equal(t, tt.value, got, "decoded")
			assert.Equal(t, b, appendValue(nil, v), "re-encoded from Value")
			enc, err := appendAnyValue(nil, got)
			require.NoError(t, err)
			assert.Equal(t, b, enc, "encoded from the Go value")
		})
	}
}

func TestValueAccessors(t *testing.T) {
	val := func(s string) Value {
		v, _, err := readValue(unhex(t, s), 0)
		require.NoError(t, err)
		return v
	}
	i, ok := val("02 FB F0 FE FE FE FE FE FE FE 0E").Int()
	assert.True(t, ok)
	assert.Equal(t, int64(-5), i, "int32 is sign-extended")
	_, ok = val("02 FB F0 FE FE FE FE FE FE FE 0E").Uint()
	assert.False(t, ok, "negative int32 as uint")
	u, ok := val("05 FF F0 FE FE FE FE FE FE FE 0E").Uint()
	assert.True(t, ok)
	assert.Equal(t, uint64(math.MaxUint64), u)
	_, ok = val("05 FF F0 FE FE FE FE FE FE FE 0E").Int()
	assert.False(t, ok, "uint64 above MaxInt64 as int")
	i, ok = val("03 FF F0 FE FE 7E").Int()
	assert.True(t, ok)
	assert.Equal(t, int64(math.MaxUint32), i, "uint32 is not sign-extended")
	a, ok := val("06 7F 00 00 01").Addr()
	assert.True(t, ok)
	assert.Equal(t, netip.MustParseAddr("127.0.0.1"), a)
	a, ok = val("07 20 01 0D B8 00 00 00 00 00 00 00 00 00 00 00 01").Addr()
	assert.True(t, ok)
	assert.Equal(t, netip.MustParseAddr("2001:db8::1"), a)
	s, ok := val("08 02 68 69").Bytes()
	assert.True(t, ok)
	assert.Equal(t, []byte("hi"), s)
	assert.True(t, val("08 02 68 69").EqualString("hi"))
	assert.False(t, val("08 02 68 69").EqualString("ho"))
	b, ok := val("11").Bool()
	assert.True(t, ok && b)
	// HAProxy reads true only from a flag nibble of exactly 1.
	b, ok = val("31").Bool()
	assert.True(t, ok)
	assert.False(t, b, "0x31 is false")
	assert.True(t, val("00").IsNull())
	_, ok = val("00").Int()
	assert.False(t, ok)
	_, ok = val("04 01").Bytes()
	assert.False(t, ok)
	_, ok = val("04 01").Addr()
	assert.False(t, ok)
	_, ok = val("08 00").Bool()
	assert.False(t, ok)
	assert.Equal(t, "string", TypeString.String())
	assert.Equal(t, "reserved", Type(12).String())
}

func TestTypedValueErrors(t *testing.T) {
	tests := []struct {
		name  string
		bytes string
		err   error
	}{
		{"empty", "", errTruncated},
		{"reserved type 10", "0A", errUnknownType},
		{"reserved type 15 with flags", "FF", errUnknownType},
		{"int64 without varint", "04", errTruncated},
		{"int64 eleven-byte varint", "04 FF FF FF FF FF FF FF FF FF FF 00", errVarintTooLong},
		{"ipv4 cut", "06 7F 00 00", errTruncated},
		{"ipv6 cut", "07 20 01 0D B8", errTruncated},
		{"string length past the end", "08 05 68 69", errTruncated},
		{"string length varint cut", "08 F0", errTruncated},
		{"binary 4 GiB length", "09 FF F0 FE FE 7E 00", errTruncated},
		// 2^32+1000 (varint F8 AF FF FE 7E): refused, not read as 1000.
		{"uint32 holding 2^32+1000", "03 F8 AF FF FE 7E", errIntOverflow},
		{"uint32 holding 2^32", "03 F0 F1 FE FE 7E", errIntOverflow},
		{"int32 holding 2^31", "02 F0 F1 FE FE 3E", errIntOverflow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := readValue(unhex(t, tt.bytes), 0)
			assert.ErrorIs(t, err, tt.err)
			_, err = skipValue(unhex(t, tt.bytes), 0)
			assert.ErrorIs(t, err, tt.err, "skipValue agrees with readValue")
		})
	}
}

// TestInt32Boundaries: the 32-bit types take exactly their range, their
// varints checked by readValue and skipValue alike.
func TestInt32Boundaries(t *testing.T) {
	tests := []struct {
		typ Type
		n   uint64
		ok  bool
	}{
		{TypeUint32, 0, true},
		{TypeUint32, math.MaxUint32, true},
		{TypeUint32, math.MaxUint32 + 1, false},
		{TypeUint32, 1<<32 + 1000, false},
		{TypeUint32, math.MaxUint64, false},
		{TypeInt32, math.MaxInt32, true},
		{TypeInt32, math.MaxInt32 + 1, false},
		{TypeInt32, uint64(1<<64 - 1<<31), true}, // -2^31
		{TypeInt32, uint64(1<<64 - 1<<31 - 1), false},
		{TypeInt32, math.MaxUint32, false}, // not sign-extended
		{TypeInt64, math.MaxUint64, true},
		{TypeUint64, 1<<32 + 1000, true},
	}
	for _, tt := range tests {
		b := appendTypedInt(nil, tt.typ, tt.n)
		v, off, err := readValue(b, 0)
		next, serr := skipValue(b, 0)
		if tt.ok {
			require.NoError(t, err, "%v %d", tt.typ, tt.n)
			require.NoError(t, serr)
			assert.Equal(t, len(b), off)
			assert.Equal(t, len(b), next)
			assert.Equal(t, tt.n, v.num)
		} else {
			assert.ErrorIs(t, err, errIntOverflow, "%v %d", tt.typ, tt.n)
			assert.ErrorIs(t, serr, errIntOverflow, "%v %d", tt.typ, tt.n)
		}
	}
}

func TestReadBytesIsAView(t *testing.T) {
	b := unhex(t, "03 61 62 63 64")
	s, off, err := readBytes(b, 0)
	require.NoError(t, err)
	assert.Equal(t, 4, off)
	assert.Equal(t, "abc", string(s))
	assert.Equal(t, 3, cap(s), "a view cannot be appended into its neighbour")
	b[1] = 'X'
	assert.Equal(t, "Xbc", string(s), "no copy")
}

func TestKVList(t *testing.T) {
	var b []byte
	b = appendName(b, "status-code")
	b = appendTypedInt(b, TypeUint32, 4)
	b = appendName(b, "message")
	b = appendTypedBytes(b, TypeString, "x")
	e, off, err := readKV(b, 0)
	require.NoError(t, err)
	assert.Equal(t, "status-code", string(e.key))
	n, _ := e.value.Uint()
	assert.Equal(t, uint64(4), n)
	e, off, err = readKV(b, off)
	require.NoError(t, err)
	assert.Equal(t, len(b), off)
	assert.True(t, e.value.EqualString("x"))
	_, _, err = readKV(b[:len(b)-1], 0+len(b)-len("message")-4)
	assert.Error(t, err)
}

func BenchmarkVarint(b *testing.B) {
	for _, size := range []struct {
		name string
		v    uint64
	}{{"1byte", 100}, {"3bytes", 16380}, {"10bytes", math.MaxUint64}} {
		enc := appendVarint(nil, size.v)
		b.Run("append/"+size.name, func(b *testing.B) {
			buf := make([]byte, 0, 16)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				buf = appendVarint(buf[:0], size.v)
			}
		})
		b.Run("read/"+size.name, func(b *testing.B) {
			b.ReportAllocs()
			var sink uint64
			for i := 0; i < b.N; i++ {
				v, _, _ := readVarint(enc, 0)
				sink += v
			}
			_ = sink
		})
	}
}

func TestAppendTypedAddr(t *testing.T) {
	assert.Equal(t, unhex(t, "06 0A 00 00 01"), appendTypedAddr(nil, netip.MustParseAddr("10.0.0.1")))
	assert.Equal(t, unhex(t, "07 00 00 00 00 00 00 00 00 00 00 FF FF 0A 00 00 01"),
		appendTypedAddr(nil, netip.MustParseAddr("::ffff:10.0.0.1")), "4in6 stays IPv6")
	assert.True(t, bytes.HasPrefix(appendTypedAddr(nil, netip.MustParseAddr("fe80::1%eth0")), []byte{7, 0xFE, 0x80}))
}
