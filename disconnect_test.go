package spoe

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseGoldenDisconnects(t *testing.T) {
	tests := []struct {
		version, name string
		status        Status
		message       string
	}{
		{"2.6.12", "haproxy-disconnect-status0.bin", StatusNormal, "normal"},
		{"2.6.12", "haproxy-disconnect-status2.bin", StatusTimeout, "a timeout occurred"},
		{"3.5-dev5", "haproxy-disconnect-status8.bin", StatusUnsupportedVersion, "unsupported version"},
	}
	for _, tt := range tests {
		f := goldenFrame(t, tt.version, tt.name)
		d, err := parseDisconnect(f.payload)
		require.NoError(t, err)
		assert.Equal(t, tt.status, d.status)
		assert.Equal(t, tt.message, d.message)
		assert.Equal(t, tt.message, tt.status.String(), "our message text is HAProxy's")
	}
}

// TestAgentDisconnectGolden checks the frame of SPOP.md §5.5.
func TestAgentDisconnectGolden(t *testing.T) {
	want := unhex(t, "00 00 00 22 66 00 00 00 01 00 00 0B")
	want = append(want, "status-code"...)
	want = append(want, 0x03, 0x00, 0x07)
	want = append(want, "message"...)
	want = append(want, 0x08, 0x03)
	want = append(want, "bye"...)
	assert.Equal(t, want, appendDisconnect(nil, frameAgentDisconnect, StatusNormal, "bye"))
}

func TestAgentDisconnectMessageCapped(t *testing.T) {
	b := appendDisconnect(nil, frameAgentDisconnect, StatusInvalidFrame, strings.Repeat("m", 300))
	f, err := parseFrame(b[lengthSize:])
	require.NoError(t, err)
	d, err := parseDisconnect(f.payload)
	require.NoError(t, err)
	assert.Len(t, d.message, 255, "HAProxy 2.6 refuses a longer message")
}

func TestParseDisconnectErrors(t *testing.T) {
	_, err := parseDisconnect(helloPayload("status-code", "four"))
	assert.Error(t, err)
	_, err = parseDisconnect(helloPayload("message", int64(1)))
	assert.Error(t, err)
	_, err = parseDisconnect(helloPayload("status-code", int64(-1)))
	assert.Error(t, err)
	_, err = parseDisconnect(unhex(t, "0B 73 74"))
	assert.Error(t, err)
	// A UINT32 status-code holding more than 32 bits is refused, not cut
	// to its low bits (2^32+2 read as 2, "a timeout occurred").
	_, err = parseDisconnect(appendTypedInt(appendName(nil, "status-code"), TypeUint32, 1<<32+2))
	assert.ErrorIs(t, err, errIntOverflow)
	_, err = parseDisconnect(appendTypedInt(appendName(nil, "status-code"), TypeUint64, 1<<32+2))
	assert.Error(t, err, "a status above 32 bits in a 64-bit type")
	d, err := parseDisconnect(helloPayload("x", true, "status-code", uint64(42)))
	require.NoError(t, err, "unknown keys skipped, any integer type")
	assert.Equal(t, Status(42), d.status)
}

func TestStatusStrings(t *testing.T) {
	assert.Equal(t, "invalid frame received", StatusInvalidFrame.String())
	assert.Equal(t, "fragmentation not supported", StatusFragmentationNotSupported.String())
	assert.Equal(t, "resource allocation error", StatusResourceAllocation.String())
	assert.Equal(t, "an unknown error occurred", StatusUnknown.String())
	assert.Equal(t, "status 42", Status(42).String())
	for s := StatusNormal; s <= StatusResourceAllocation; s++ {
		assert.NotEmpty(t, s.String())
	}
}
