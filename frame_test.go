package spoe

import (
	"bytes"
	"encoding/binary"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The HAProxy versions whose frames are kept in testdata/spop.
var goldenVersions = []string{"2.6.12", "3.5-dev5"}

// golden returns a frame captured from real HAProxy, length prefix included.
func golden(t testing.TB, version, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "spop", version, name))
	require.NoError(t, err)
	return b
}

// goldenFrame parses a golden frame, checking its length prefix.
func goldenFrame(t testing.TB, version, name string) frame {
	t.Helper()
	b := golden(t, version, name)
	require.GreaterOrEqual(t, len(b), lengthSize)
	require.Equal(t, uint32(len(b)-lengthSize), binary.BigEndian.Uint32(b), "length prefix of %s", name)
	require.NoError(t, checkLength(uint32(len(b)-lengthSize), 16380))
	f, err := parseFrame(b[lengthSize:])
	require.NoError(t, err)
	return f
}

func TestGoldenFrameHeaders(t *testing.T) {
	tests := []struct {
		version, name string
		typ           frameType
		sid, fid      uint64
	}{
		{"2.6.12", "haproxy-hello.bin", frameHAProxyHello, 0, 0},
		{"2.6.12", "haproxy-hello-healthcheck.bin", frameHAProxyHello, 0, 0},
		{"2.6.12", "haproxy-disconnect-status0.bin", frameHAProxyDisconnect, 0, 0},
		{"2.6.12", "haproxy-disconnect-status2.bin", frameHAProxyDisconnect, 0, 0},
		{"2.6.12", "notify-ip-rep.bin", frameNotify, 0, 1},
		{"2.6.12", "notify-echo.bin", frameNotify, 0, 2},
		{"2.6.12", "notify-m_one-3msgs.bin", frameNotify, 2, 2},
		{"2.6.12", "notify-provoke.bin", frameNotify, 3, 2},
		{"3.5-dev5", "haproxy-hello.bin", frameHAProxyHello, 0, 0},
		{"3.5-dev5", "haproxy-hello-healthcheck.bin", frameHAProxyHello, 0, 0},
		{"3.5-dev5", "haproxy-disconnect-status8.bin", frameHAProxyDisconnect, 0, 0},
		{"3.5-dev5", "notify-ip-rep.bin", frameNotify, 1, 1},
		{"3.5-dev5", "notify-echo.bin", frameNotify, 1, 1},
		{"3.5-dev5", "notify-m_one-3msgs.bin", frameNotify, 5, 1},
		{"3.5-dev5", "notify-provoke.bin", frameNotify, 5, 1},
	}
	for _, tt := range tests {
		t.Run(tt.version+"/"+tt.name, func(t *testing.T) {
			f := goldenFrame(t, tt.version, tt.name)
			assert.Equal(t, tt.typ, f.typ)
			assert.Equal(t, flagFin, f.flags, "HAProxy sets FIN alone")
			assert.True(t, f.fin())
			assert.False(t, f.abort())
			assert.Equal(t, tt.sid, f.streamID)
			assert.Equal(t, tt.fid, f.frameID)
		})
	}
}

func TestFrameHeaderRoundTrip(t *testing.T) {
	for _, ids := range [][2]uint64{{0, 0}, {1, 1}, {239, 240}, {1<<32 - 1, 2}, {math.MaxUint64, math.MaxUint64}} {
		b, start := appendFrameHeader([]byte("prefix"), frameAck, flagFin|flagAbort, ids[0], ids[1])
		b = append(b, "payload"...)
		finishFrame(b, start)
		assert.Equal(t, []byte("prefix"), b[:start], "bytes before the frame untouched")
		n := binary.BigEndian.Uint32(b[start:])
		assert.Equal(t, len(b)-start-lengthSize, int(n))
		f, err := parseFrame(b[start+lengthSize:])
		require.NoError(t, err)
		assert.Equal(t, frameAck, f.typ)
		assert.Equal(t, flagFin|flagAbort, f.flags)
		assert.Equal(t, ids[0], f.streamID)
		assert.Equal(t, ids[1], f.frameID)
		assert.Equal(t, "payload", string(f.payload))
	}
}

func TestParseFrameErrors(t *testing.T) {
	tests := []struct {
		name  string
		bytes string
		err   error
	}{
		{"empty", "", errFrameTooSmall},
		{"six bytes", "03 00 00 00 01 00", errFrameTooSmall},
		{"stream-id cut", "03 00 00 00 01 F0 80", errTruncated},
		{"frame-id missing", "03 00 00 00 01 F0 80 00", errTruncated},
		{"eleven-byte stream-id", "03 00 00 00 01 FF FF FF FF FF FF FF FF FF FF 00 00", errVarintTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseFrame(unhex(t, tt.bytes))
			assert.ErrorIs(t, err, tt.err)
		})
	}
	f, err := parseFrame(unhex(t, "03 00 00 00 01 00 00"))
	require.NoError(t, err, "the smallest frame: 7 bytes, empty payload")
	assert.Empty(t, f.payload)
}

func TestCheckLength(t *testing.T) {
	assert.ErrorIs(t, checkLength(0, 16380), errFrameTooSmall)
	assert.ErrorIs(t, checkLength(6, 16380), errFrameTooSmall)
	assert.NoError(t, checkLength(7, 16380))
	assert.NoError(t, checkLength(16380, 16380))
	assert.ErrorIs(t, checkLength(16381, 16380), errFrameTooBig)
	assert.ErrorIs(t, checkLength(math.MaxUint32, 16380), errFrameTooBig)
	assert.Equal(t, StatusFrameTooBig, statusOf(errFrameTooBig))
	assert.Equal(t, StatusInvalidFrame, statusOf(errFrameTooSmall))
	assert.Equal(t, StatusInvalidFrame, statusOf(errTruncated))
}

// failingReader fails the test if more than allowed bytes are read.
type failingReader struct {
	t       *testing.T
	r       io.Reader
	allowed int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if len(p) > f.allowed {
		p = p[:f.allowed]
	}
	if len(p) == 0 {
		f.t.Fatal("read past the length prefix of an oversized frame")
	}
	n, err := f.r.Read(p)
	f.allowed -= n
	return n, err
}

func TestReadFrameRefusesBeforeReading(t *testing.T) {
	for _, n := range []uint32{16381, math.MaxUint32} {
		var hdr [4]byte
		binary.BigEndian.PutUint32(hdr[:], n)
		r := &failingReader{t: t, r: io.MultiReader(bytes.NewReader(hdr[:]), neverEnding('x')), allowed: 4}
		var rd frameReader
		rd.init(r, 16380)
		_, err := rd.next()
		assert.ErrorIs(t, err, errFrameTooBig)
	}
}

type neverEnding byte

func (b neverEnding) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}

func TestReadFrame(t *testing.T) {
	b := golden(t, "2.6.12", "notify-echo.bin")
	read := func(b []byte) (frame, error) {
		var rd frameReader
		rd.init(bytes.NewReader(b), 16380)
		return rd.next()
	}
	got, err := read(b)
	require.NoError(t, err)
	want, err := parseFrame(b[lengthSize:])
	require.NoError(t, err)
	assert.Equal(t, want, got)
	_, err = read(b[:100])
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, err = read(b[:2])
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, err = read(nil)
	assert.ErrorIs(t, err, io.EOF)

	// Frames one after the other, in one read, and then the end.
	var rd frameReader
	rd.init(bytes.NewReader(append(append([]byte(nil), b...), b...)), 16380)
	for i := 0; i < 2; i++ {
		got, err := rd.next()
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	_, err = rd.next()
	assert.ErrorIs(t, err, io.EOF)
	assert.True(t, rd.empty())
}

func TestBufferClasses(t *testing.T) {
	assert.Equal(t, 0, bufferClass(0))
	assert.Equal(t, 0, bufferClass(minBufferSize))
	assert.Equal(t, 1, bufferClass(minBufferSize+1))
	assert.Equal(t, 1, bufferClass(2*minBufferSize))
	assert.Equal(t, 6, bufferClass(1<<20+4))
	for _, n := range []int{0, 100, 16384, 32768, 32769, 1<<20 + 4} {
		b := getBuffer(n)
		assert.GreaterOrEqual(t, len(b.b), n)
		assert.Equal(t, len(b.b), cap(b.b))
		putBuffer(b)
	}
}

func TestFrameTypeNames(t *testing.T) {
	assert.Equal(t, "NOTIFY", frameNotify.String())
	assert.Equal(t, "ACK", frameAck.String())
	assert.Equal(t, "UNKNOWN", frameType(50).String())
	_ = net.IPv4len
}
