package spoe

// This file holds SPOP's three encodings: varints, typed data and names.
// Decoders take the whole buffer and an offset and return the value, the
// offset just past it, and an error; they never panic and never trust a
// length before checking it against what is left. Encoders append to a
// []byte.
//
// # Varint
//
// SPOP uses HAProxy's own variable-length integer (include/haproxy/intops.h,
// encode_varint), which is not LEB128. A value x is encoded as follows:
//
//	x < 240:  one byte, x.
//	otherwise: the byte 0xF0 | (x & 0x0F), then x = (x - 240) >> 4;
//	           while x >= 128: the byte 0x80 | (x & 0x7F), then x = (x - 128) >> 7;
//	           then the byte x.
//
// The decoder adds every byte whole, high bit included, each shifted 7 bits
// more than the previous (the first continuation byte by 4), and stops at the
// first continuation byte below 128: F0 80 00 is 2288, not 240. A uint64
// never needs more than 10 bytes; longer encodings are rejected.
//
// # Typed data
//
// A typed value is one byte, the type in the low nibble and flags in the high
// nibble, followed by its data: nothing for NULL; nothing for BOOL, whose
// value is flag bit 0; a varint for the four integer types (negative ones as
// 64-bit two's complement); 4 or 16 bytes for IPv4 and IPv6; a varint length
// and the bytes for STRING and BINARY. Types 10 to 15 are reserved. An
// INT32 or UINT32 whose varint holds a value its 32 bits cannot (an INT32
// is sign-extended to 64 bits) is refused, never cut to its low bits.
//
// # Names
//
// Message names, argument names, KV keys and variable names carry no type
// byte: a varint length, then the bytes.

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/pkg/errors"
)

// Decoding errors. All of them mean that the peer sent a malformed frame;
// the connection answers them with StatusInvalidFrame.
var (
	errTruncated     = errors.New("spoe: truncated data")
	errVarintTooLong = errors.New("spoe: varint longer than 10 bytes")
	errUnknownType   = errors.New("spoe: unknown data type")
	errIntOverflow   = errors.New("spoe: integer out of the range of its 32-bit type")
)

// maxVarintLen is the longest varint a uint64 needs.
const maxVarintLen = 10

// appendVarint appends the SPOP varint encoding of x to b.
func appendVarint(b []byte, x uint64) []byte {
	if x < 240 {
		return append(b, byte(x))
	}
	b = append(b, byte(x)|0xF0)
	x = (x - 240) >> 4
	for x >= 128 {
		b = append(b, byte(x)|0x80)
		x = (x - 128) >> 7
	}
	return append(b, byte(x))
}

// readVarint decodes the varint at b[off:].
func readVarint(b []byte, off int) (uint64, int, error) {
	if off >= len(b) {
		return 0, off, errTruncated
	}
	v := uint64(b[off])
	off++
	if v < 240 {
		return v, off, nil
	}
	shift := uint(4)
	for i := 1; i < maxVarintLen; i++ {
		if off >= len(b) {
			return 0, off, errTruncated
		}
		c := b[off]
		off++
		v += uint64(c) << shift
		if c < 128 {
			return v, off, nil
		}
		shift += 7
	}
	return 0, off, errVarintTooLong
}

// readBytes decodes a varint length and returns that many bytes of b,
// without copying.
func readBytes(b []byte, off int) ([]byte, int, error) {
	n, off, err := readVarint(b, off)
	if err != nil {
		return nil, off, err
	}
	if n > uint64(len(b)-off) {
		return nil, off, errTruncated
	}
	end := off + int(n)
	return b[off:end:end], end, nil
}

// appendName appends a name: a varint length and the bytes, no type.
func appendName(b []byte, name string) []byte {
	b = appendVarint(b, uint64(len(name)))
	return append(b, name...)
}

// Type is the type of an SPOP typed value.
type Type uint8

// The SPOP data types. HAProxy sends every integer sample as TypeInt64.
const (
	TypeNull   Type = 0
	TypeBool   Type = 1
	TypeInt32  Type = 2
	TypeUint32 Type = 3
	TypeInt64  Type = 4
	TypeUint64 Type = 5
	TypeIPv4   Type = 6
	TypeIPv6   Type = 7
	TypeString Type = 8
	TypeBinary Type = 9
)

// Masks of the type byte.
const (
	typeMask     = 0x0F
	flagMask     = 0xF0
	boolTrueFlag = 0x10
)

var typeNames = [...]string{"null", "bool", "int32", "uint32", "int64", "uint64", "ipv4", "ipv6", "string", "binary"}

// String returns the type's lower-case name, as SPOP's documentation spells it.
func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return "reserved"
}

// Value is one typed value of a NOTIFY frame, as decoded: its bytes are a
// view of the frame and are valid only while the handler that received it
// runs. The accessors report whether the value has the asked-for type and
// never allocate.
type Value struct {
	typ  Type
	num  uint64 // integers; 1 or 0 for BOOL
	data []byte // STRING, BINARY, IPV4 (4 bytes), IPV6 (16 bytes)
}

// Type returns the value's SPOP type.
func (v Value) Type() Type { return v.typ }

// IsNull reports whether the value is NULL, which HAProxy sends for a fetch
// that failed or found nothing (a missing header, for instance).
func (v Value) IsNull() bool { return v.typ == TypeNull }

// Bool returns the value of a BOOL.
func (v Value) Bool() (value, ok bool) { return v.num != 0, v.typ == TypeBool }

// Int returns the value of any of the four integer types as an int64.
// A UINT32 or UINT64 above math.MaxInt64 is not representable and reports
// false; use Uint for those.
func (v Value) Int() (int64, bool) {
	switch v.typ {
	case TypeInt32:
		return int64(int32(v.num)), true
	case TypeUint32:
		return int64(uint32(v.num)), true
	case TypeInt64:
		return int64(v.num), true
	case TypeUint64:
		return int64(v.num), int64(v.num) >= 0
	}
	return 0, false
}

// Uint returns the value of any of the four integer types as a uint64.
// A negative INT32 or INT64 reports false.
func (v Value) Uint() (uint64, bool) {
	switch v.typ {
	case TypeInt32:
		return uint64(int32(v.num)), int32(v.num) >= 0
	case TypeUint32:
		return uint64(uint32(v.num)), true
	case TypeInt64:
		return v.num, int64(v.num) >= 0
	case TypeUint64:
		return v.num, true
	}
	return 0, false
}

// Addr returns the address of an IPV4 or IPV6 value.
func (v Value) Addr() (netip.Addr, bool) {
	switch v.typ {
	case TypeIPv4:
		return netip.AddrFrom4([4]byte(v.data)), true
	case TypeIPv6:
		return netip.AddrFrom16([16]byte(v.data)), true
	}
	return netip.Addr{}, false
}

// Bytes returns the bytes of a STRING or BINARY value. They are a view of
// the frame, valid only until the handler returns: copy them to keep them.
func (v Value) Bytes() ([]byte, bool) {
	return v.data, v.typ == TypeString || v.typ == TypeBinary
}

// EqualString reports whether the value is a STRING or BINARY holding
// exactly s, without allocating.
func (v Value) EqualString(s string) bool {
	return (v.typ == TypeString || v.typ == TypeBinary) && string(v.data) == s
}

// Interface returns the value as the Go value the simple API uses (see
// Message), copying what the frame holds.
func (v Value) Interface() interface{} {
	switch v.typ {
	case TypeBool:
		return v.num != 0
	case TypeInt32:
		return int32(v.num)
	case TypeUint32:
		return uint32(v.num)
	case TypeInt64:
		return int64(v.num)
	case TypeUint64:
		return v.num
	case TypeIPv4, TypeIPv6:
		return net.IP(append([]byte(nil), v.data...))
	case TypeString:
		return string(v.data)
	case TypeBinary:
		return append([]byte{}, v.data...)
	}
	return nil
}

// readValue decodes the typed value at b[off:].
func readValue(b []byte, off int) (Value, int, error) {
	if off >= len(b) {
		return Value{}, off, errTruncated
	}
	tb := b[off]
	off++
	v := Value{typ: Type(tb & typeMask)}
	switch v.typ {
	case TypeNull:
	case TypeBool:
		// HAProxy reads true only from a flag nibble of exactly 1.
		if tb&flagMask == boolTrueFlag {
			v.num = 1
		}
	case TypeInt32, TypeUint32, TypeInt64, TypeUint64:
		n, next, err := readVarint(b, off)
		if err != nil {
			return Value{}, next, err
		}
		if !fits(v.typ, n) {
			return Value{}, next, errIntOverflow
		}
		v.num, off = n, next
	case TypeIPv4, TypeIPv6:
		n := 4
		if v.typ == TypeIPv6 {
			n = 16
		}
		if len(b)-off < n {
			return Value{}, off, errTruncated
		}
		v.data = b[off : off+n : off+n]
		off += n
	case TypeString, TypeBinary:
		data, next, err := readBytes(b, off)
		if err != nil {
			return Value{}, next, err
		}
		v.data, off = data, next
	default:
		return Value{}, off, errUnknownType
	}
	return v, off, nil
}

// skipValue steps over the typed value at b[off:] without building it.
func skipValue(b []byte, off int) (int, error) {
	if off >= len(b) {
		return off, errTruncated
	}
	t := Type(b[off] & typeMask)
	off++
	switch t {
	case TypeNull, TypeBool:
		return off, nil
	case TypeInt32, TypeUint32:
		n, next, err := readVarint(b, off)
		if err == nil && !fits(t, n) {
			err = errIntOverflow
		}
		return next, err
	case TypeInt64, TypeUint64:
		return skipVarint(b, off)
	case TypeIPv4, TypeIPv6:
		n := 4
		if t == TypeIPv6 {
			n = 16
		}
		if len(b)-off < n {
			return off, errTruncated
		}
		return off + n, nil
	case TypeString, TypeBinary:
		_, off, err := readBytes(b, off)
		return off, err
	}
	return off, errUnknownType
}

// fits reports whether the varint n is a value of the integer type t: an
// INT32 is a sign-extended int32, a UINT32 a uint32.
func fits(t Type, n uint64) bool {
	switch t {
	case TypeInt32:
		return int64(n) >= -1<<31 && int64(n) < 1<<31
	case TypeUint32:
		return n < 1<<32
	}
	return true
}

// skipVarint steps over the varint at b[off:].
func skipVarint(b []byte, off int) (int, error) {
	if off >= len(b) {
		return off, errTruncated
	}
	if b[off] < 240 {
		return off + 1, nil
	}
	for i := 1; i < maxVarintLen; i++ {
		if off+i >= len(b) {
			return off + i, errTruncated
		}
		if b[off+i] < 128 {
			return off + i + 1, nil
		}
	}
	return off + maxVarintLen, errVarintTooLong
}

// appendValue appends v in its canonical encoding: flags clear except the
// BOOL flag, integers as varints.
func appendValue(b []byte, v Value) []byte {
	switch v.typ {
	case TypeBool:
		if v.num != 0 {
			return append(b, byte(TypeBool)|boolTrueFlag)
		}
		return append(b, byte(TypeBool))
	case TypeInt32, TypeUint32, TypeInt64, TypeUint64:
		return appendVarint(append(b, byte(v.typ)), v.num)
	case TypeIPv4, TypeIPv6:
		return append(append(b, byte(v.typ)), v.data...)
	case TypeString, TypeBinary:
		b = appendVarint(append(b, byte(v.typ)), uint64(len(v.data)))
		return append(b, v.data...)
	}
	return append(b, byte(TypeNull))
}

// appendTypedInt appends an integer of type t (one of the four integer
// types). Negative values travel as their 64-bit two's complement, so an
// int32 is sign-extended, as HAProxy expects.
func appendTypedInt(b []byte, t Type, x uint64) []byte {
	return appendVarint(append(b, byte(t)), x)
}

// appendTypedBytes appends a STRING or BINARY value.
func appendTypedBytes[T string | []byte](b []byte, t Type, s T) []byte {
	b = appendVarint(append(b, byte(t)), uint64(len(s)))
	return append(b, s...)
}

// appendTypedAddr appends an IPV4 value for an IPv4 address and an IPV6
// value for any other valid address (IPv4-mapped ones included).
func appendTypedAddr(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		a4 := a.As4()
		return append(append(b, byte(TypeIPv4)), a4[:]...)
	}
	a16 := a.As16()
	return append(append(b, byte(TypeIPv6)), a16[:]...)
}

// appendTypedBool appends a BOOL value.
func appendTypedBool(b []byte, x bool) []byte {
	if x {
		return append(b, byte(TypeBool)|boolTrueFlag)
	}
	return append(b, byte(TypeBool))
}

// kv is one entry of a KV list (HELLO and DISCONNECT payloads).
type kv struct {
	key   []byte
	value Value
}

// readKV decodes the KV-list entry at b[off:].
func readKV(b []byte, off int) (kv, int, error) {
	key, off, err := readBytes(b, off)
	if err != nil {
		return kv{}, off, err
	}
	v, off, err := readValue(b, off)
	if err != nil {
		return kv{}, off, err
	}
	return kv{key: key, value: v}, off, nil
}

// putUint32 writes x big-endian at b[0:4].
func putUint32(b []byte, x uint32) { binary.BigEndian.PutUint32(b, x) }
