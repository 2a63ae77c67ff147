package spoe

// HAProxy's binary header block, the value of the req.hdrs_bin and
// res.hdrs_bin fetches (sent as BINARY): each header is its name then its
// value, each a varint length and the bytes; the block ends with an empty
// name and an empty value. HAProxy sends names in lower case, keeps
// duplicates and their order, and empty values.

import (
	"net/http"

	"github.com/pkg/errors"
)

// ErrHeaderBlock reports a malformed header block: truncated, or without
// its end marker.
var ErrHeaderBlock = errors.New("spoe: malformed binary header block")

// HeaderIterator walks a binary header block without copying or allocating:
//
//	v, _ := msgs.Arg("headers")
//	block, _ := v.Bytes()
//	for h := spoe.Headers(block); h.Next(); {
//		if h.NameIs("user-agent") { ... h.Value() ... }
//	}
//
// Its views are valid as long as the block is.
type HeaderIterator struct {
	rest        []byte
	name, value []byte
	err         error
}

// Headers returns an iterator over the headers of a req.hdrs_bin or
// res.hdrs_bin block.
func Headers(block []byte) HeaderIterator {
	return HeaderIterator{rest: block}
}

// Next moves to the next header and reports whether there is one. At the
// end of the block, or on a malformed one, it returns false; Err tells
// which.
func (h *HeaderIterator) Next() bool {
	if h.rest == nil || h.err != nil {
		return false
	}
	name, off, err := readBytes(h.rest, 0)
	if err == nil {
		var value []byte
		if value, off, err = readBytes(h.rest, off); err == nil {
			if len(name) == 0 {
				if len(value) != 0 {
					h.err = errors.Wrap(ErrHeaderBlock, "empty header name")
				}
				h.rest = nil // the end marker
				return false
			}
			h.name, h.value, h.rest = name, value, h.rest[off:]
			return true
		}
	}
	h.err = ErrHeaderBlock // truncated: no end marker
	return false
}

// Err returns the error that stopped the iteration, nil at the end marker.
func (h *HeaderIterator) Err() error { return h.err }

// Name returns the header's name, as HAProxy sent it (lower case).
func (h *HeaderIterator) Name() []byte { return h.name }

// NameIs reports whether the header's name is name, ignoring ASCII case.
func (h *HeaderIterator) NameIs(name string) bool {
	if len(h.name) != len(name) {
		return false
	}
	for i := 0; i < len(name); i++ {
		if lowerASCII(h.name[i]) != lowerASCII(name[i]) {
			return false
		}
	}
	return true
}

// Value returns the header's value.
func (h *HeaderIterator) Value() []byte { return h.value }

func lowerASCII(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// ParseHeaders decodes a req.hdrs_bin or res.hdrs_bin block into an
// http.Header (canonical keys, values in order), copying what it keeps.
func ParseHeaders(block []byte) (http.Header, error) {
	hdr := make(http.Header)
	h := Headers(block)
	for h.Next() {
		k := http.CanonicalHeaderKey(string(h.name))
		hdr[k] = append(hdr[k], string(h.value))
	}
	return hdr, h.Err()
}
