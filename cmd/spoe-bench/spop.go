package main

// The SPOP codec of spoe-bench. It is written apart from the library's
// encoder and decoder on purpose: the answers an agent built on the library
// sends are checked by code that shares nothing with it, so that a bug in
// the library's codec cannot hide behind the same bug in the checker.

import (
	"encoding/binary"
	"errors"
)

// Frame types (HAProxy's and the agent's).
const (
	frameHAProxyHello      = 1
	frameHAProxyDisconnect = 2
	frameNotify            = 3
	frameAgentHello        = 101
	frameAgentDisconnect   = 102
	frameAck               = 103
)

// Frame flags.
const (
	flagFin   = 1
	flagAbort = 2
)

// Types of typed data (low nibble of the type byte).
const (
	tNull   = 0
	tBool   = 1
	tInt32  = 2
	tUint32 = 3
	tInt64  = 4
	tUint64 = 5
	tIPv4   = 6
	tIPv6   = 7
	tString = 8
	tBinary = 9
)

// Action types and variable scopes of an ACK.
const (
	actSetVar   = 1
	actUnsetVar = 2

	scopeProcess = 0
	scopeSession = 1
	scopeTxn     = 2
	scopeReq     = 3
	scopeRes     = 4
)

var errShort = errors.New("truncated")

// putVarint appends x in SPOP's variable-length integer encoding: values
// below 240 take one byte; above, the first byte carries 0xF0 and the low
// four bits, and each following byte seven more bits, high bit set while
// more follow.
func putVarint(b []byte, x uint64) []byte {
	if x < 0xF0 {
		return append(b, byte(x))
	}
	b = append(b, 0xF0|byte(x&0x0F))
	x = (x - 0xF0) >> 4
	for x >= 0x80 {
		b = append(b, 0x80|byte(x&0x7F))
		x = (x - 0x80) >> 7
	}
	return append(b, byte(x))
}

// getVarint reads a varint at the start of b. It returns the value and the
// bytes it took, or n <= 0 when b ends before the varint does or the varint
// is longer than 10 bytes.
func getVarint(b []byte) (x uint64, n int) {
	if len(b) == 0 {
		return 0, 0
	}
	x = uint64(b[0])
	if x < 0xF0 {
		return x, 1
	}
	shift := uint(4)
	for i := 1; i < len(b) && i < 10; i++ {
		// The whole byte is added, continuation bit included: the encoder
		// subtracted 0x80 for it.
		x += uint64(b[i]) << shift
		if b[i] < 0x80 {
			return x, i + 1
		}
		shift += 7
	}
	return 0, -1
}

// putBytes appends a length-prefixed name or string (no type byte).
func putBytes(b []byte, s string) []byte {
	b = putVarint(b, uint64(len(s)))
	return append(b, s...)
}

// getBytes reads a length-prefixed name or string.
func getBytes(b []byte) ([]byte, int) {
	l, n := getVarint(b)
	if n <= 0 || l > uint64(len(b)-n) {
		return nil, -1
	}
	return b[n : n+int(l)], n + int(l)
}

// typed is one decoded typed value.
type typed struct {
	typ   byte   // type (low nibble)
	flags byte   // flags (high nibble, shifted down)
	num   uint64 // integers
	raw   []byte // strings, binaries, addresses
}

func (v *typed) isInt() bool { return v.typ >= tInt32 && v.typ <= tUint64 }

// getTyped reads a typed value at the start of b into v and returns the
// bytes it took, or n <= 0 when it is malformed.
func getTyped(b []byte, v *typed) int {
	if len(b) == 0 {
		return -1
	}
	*v = typed{typ: b[0] & 0x0F, flags: b[0] >> 4}
	rest := b[1:]
	switch v.typ {
	case tNull, tBool:
		return 1
	case tInt32, tUint32, tInt64, tUint64:
		x, n := getVarint(rest)
		if n <= 0 {
			return -1
		}
		v.num = x
		return 1 + n
	case tIPv4, tIPv6:
		size := 4
		if v.typ == tIPv6 {
			size = 16
		}
		if len(rest) < size {
			return -1
		}
		v.raw = rest[:size]
		return 1 + size
	case tString, tBinary:
		s, n := getBytes(rest)
		if n <= 0 {
			return -1
		}
		v.raw = s
		return 1 + n
	}
	return -1
}

// startFrame appends a frame header with a length to be filled in by
// endFrame, and returns where the frame starts.
func startFrame(b []byte, typ byte, flags uint32, sid, fid uint64) ([]byte, int) {
	start := len(b)
	b = append(b, 0, 0, 0, 0, typ)
	b = binary.BigEndian.AppendUint32(b, flags)
	b = putVarint(b, sid)
	b = putVarint(b, fid)
	return b, start
}

// endFrame writes the length of the frame that starts at start.
func endFrame(b []byte, start int) {
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
}

// frame is one decoded frame; payload points into the read buffer.
type frame struct {
	typ      byte
	flags    uint32
	sid, fid uint64
	payload  []byte
}

// nextFrame decodes the frame at the start of b. It returns the bytes the
// frame takes with its length, or 0 when b holds only part of it, or an
// error when the frame is malformed or longer than max.
func nextFrame(b []byte, max int, f *frame) (int, error) {
	if len(b) < 4 {
		return 0, nil
	}
	l := binary.BigEndian.Uint32(b)
	if l > uint32(max) {
		return 0, errors.New("frame longer than max-frame-size")
	}
	if len(b) < 4+int(l) {
		return 0, nil
	}
	body := b[4 : 4+l]
	if len(body) < 7 {
		return 0, errors.New("frame shorter than its header")
	}
	f.typ = body[0]
	f.flags = binary.BigEndian.Uint32(body[1:])
	p := body[5:]
	var n int
	if f.sid, n = getVarint(p); n <= 0 {
		return 0, errors.New("bad stream-id")
	}
	p = p[n:]
	if f.fid, n = getVarint(p); n <= 0 {
		return 0, errors.New("bad frame-id")
	}
	f.payload = p[n:]
	return 4 + int(l), nil
}

// kvList decodes a KV-LIST (HELLO, DISCONNECT) into fn, called per key.
func kvList(p []byte, fn func(key string, v *typed) error) error {
	var v typed
	for len(p) > 0 {
		k, n := getBytes(p)
		if n <= 0 {
			return errShort
		}
		p = p[n:]
		if n = getTyped(p, &v); n <= 0 {
			return errShort
		}
		p = p[n:]
		if err := fn(string(k), &v); err != nil {
			return err
		}
	}
	return nil
}
