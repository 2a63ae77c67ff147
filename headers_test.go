package spoe

import (
	"net/http"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestGoldenHeaderBlocks(t *testing.T) {
	for version, port := range map[string]string{"2.6.12": "18126", "3.2.26": "18132"} {
		block, err := os.ReadFile("testdata/hdrs_bin/" + version + ".bin")
		require.NoError(t, err)
		hdr, err := ParseHeaders(block)
		require.NoError(t, err, version)
		assert.Equal(t, http.Header{
			"Host":       {"127.0.0.1:" + port},
			"User-Agent": {"Mozilla/5.0 test"},
			"Accept":     {"*/*"},
			"X-Empty":    {""},
			"X-Dup":      {"one", "two"},
			"Cookie":     {"a=1; b=2"},
		}, hdr, version)

		var names []string
		for h := Headers(block); h.Next(); {
			names = append(names, string(h.Name()))
		}
		assert.Equal(t, []string{"host", "user-agent", "accept", "x-empty", "x-dup", "x-dup", "cookie"}, names)
	}
}

func TestHeaderIteratorNameIs(t *testing.T) {
	block, err := os.ReadFile("testdata/hdrs_bin/2.6.12.bin")
	require.NoError(t, err)
	var ua string
	for h := Headers(block); h.Next(); {
		if h.NameIs("User-Agent") {
			ua = string(h.Value())
		}
		assert.False(t, h.NameIs("user-agen"))
	}
	assert.Equal(t, "Mozilla/5.0 test", ua)
}

func TestMalformedHeaderBlocks(t *testing.T) {
	tests := map[string]string{
		"no end marker":              "01 61 01 62",
		"half an end marker":         "01 61 01 62 00",
		"value length past the end":  "01 61 05 62 00 00",
		"name length past the end":   "09 61",
		"empty name with a value":    "00 01 62",
		"eleven-byte varint length":  "FF FF FF FF FF FF FF FF FF FF 00",
		"empty block (not even end)": "",
	}
	for name, bytes := range tests {
		block := unhex(t, bytes)
		if block == nil {
			block = []byte{}
		}
		_, err := ParseHeaders(block)
		assert.ErrorIs(t, err, ErrHeaderBlock, name)
	}
	hdr, err := ParseHeaders(nil)
	require.NoError(t, err, "a NULL fetch: no headers")
	assert.Empty(t, hdr)
	hdr, err = ParseHeaders(unhex(t, "00 00"))
	require.NoError(t, err)
	assert.Empty(t, hdr)
}

func TestHeaderIteratorNoAlloc(t *testing.T) {
	block, err := os.ReadFile("testdata/hdrs_bin/3.2.26.bin")
	require.NoError(t, err)
	n := 0
	allocs := testing.AllocsPerRun(1000, func() {
		for h := Headers(block); h.Next(); {
			if h.NameIs("cookie") {
				n += len(h.Value())
			}
		}
	})
	assert.Zero(t, allocs)
}

// FuzzHeaders: any block decodes without panic; what decodes re-encodes to
// a block that decodes to the same headers.
func FuzzHeaders(f *testing.F) {
	for _, v := range []string{"2.6.12", "3.2.26"} {
		b, err := os.ReadFile("testdata/hdrs_bin/" + v + ".bin")
		require.NoError(f, err)
		f.Add(b)
	}
	f.Add([]byte{0, 0})
	f.Add([]byte{1, 'a', 0})
	f.Fuzz(func(t *testing.T, block []byte) {
		type pair struct{ name, value string }
		var got []pair
		h := Headers(block)
		for h.Next() {
			got = append(got, pair{string(h.Name()), string(h.Value())})
		}
		if h.Err() != nil {
			return
		}
		var enc []byte
		for _, p := range got {
			enc = appendName(appendName(enc, p.name), p.value)
		}
		if block != nil {
			enc = append(enc, 0, 0)
		}
		var again []pair
		h = Headers(enc)
		for h.Next() {
			again = append(again, pair{string(h.Name()), string(h.Value())})
		}
		require.NoError(t, h.Err())
		require.Equal(t, got, again)
	})
}
