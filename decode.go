package spoe

import (
	"net"
	"unsafe"
)

// The simple API's messages are the handler's to keep, so they cannot live
// in pooled memory; but allocating each value apart costs more than the
// rest of a request. decodeMessages allocates per NOTIFY instead: one
// []Message, one map per message, one byte slab holding every STRING,
// BINARY and address, and one array of boxes holding the values that an
// interface{} refers to. Nothing in them is ever written again once the
// handler has them, so a value kept after the handler returned is safe.

// valueBox holds one decoded value that an interface{} points to: a string
// (p, n), a []byte or net.IP (p, n, c), or an integer stored at &n. Its
// first word is a pointer, as in a string or slice header, so that the
// garbage collector sees the slab a string or slice points into. Bytes
// that fit (an address, a short string) are kept in small, in the box.
type valueBox struct {
	p     unsafe.Pointer
	n, c  int
	small [16]byte
}

// eface is the layout of an interface{}: its dynamic type, and a pointer
// to its value (for types not shaped like a pointer, which these are not).
type eface struct {
	typ, data unsafe.Pointer
}

func typeWord(x interface{}) unsafe.Pointer { return (*eface)(unsafe.Pointer(&x)).typ }

// The dynamic types of the values the simple API hands out.
var (
	efaceString = typeWord("")
	efaceBytes  = typeWord([]byte(nil))
	efaceIP     = typeWord(net.IP(nil))
	efaceInt32  = typeWord(int32(0))
	efaceUint32 = typeWord(uint32(0))
	efaceInt64  = typeWord(int64(0))
	efaceUint64 = typeWord(uint64(0))
)

// boxed returns the interface{} of dynamic type typ whose value is at p.
func boxed(typ unsafe.Pointer, p unsafe.Pointer) (x interface{}) {
	e := (*eface)(unsafe.Pointer(&x))
	e.typ, e.data = typ, p
	return x
}

// valueDecoder hands out the values of one NOTIFY from its slab and boxes.
type valueDecoder struct {
	slab  []byte
	boxes []valueBox
}

// bytes copies b to box or to the slab and returns a pointer to the copy.
func (d *valueDecoder) bytes(box *valueBox, b []byte) unsafe.Pointer {
	if len(b) <= len(box.small) {
		copy(box.small[:], b)
		return unsafe.Pointer(&box.small[0])
	}
	off := len(d.slab)
	d.slab = append(d.slab, b...)
	return unsafe.Pointer(&d.slab[off])
}

// needs reports whether v takes a box, and how many bytes of the slab.
func needs(v Value) (box bool, slab int) {
	switch v.typ {
	case TypeInt32, TypeUint32, TypeInt64, TypeUint64:
		return true, 0
	case TypeIPv4, TypeIPv6, TypeString, TypeBinary:
		if len(v.data) == 0 {
			return false, 0
		}
		if len(v.data) <= len(valueBox{}.small) {
			return true, 0
		}
		return true, len(v.data)
	}
	return false, 0
}

func (d *valueDecoder) box() *valueBox {
	b := &d.boxes[0]
	d.boxes = d.boxes[1:]
	return b
}

// value returns v as Value.Interface does, without allocating.
func (d *valueDecoder) value(v Value) interface{} {
	switch v.typ {
	case TypeBool:
		return v.num != 0 // boxing a bool does not allocate
	case TypeInt32, TypeUint32, TypeInt64, TypeUint64:
		b := d.box()
		p := unsafe.Pointer(&b.n)
		switch v.typ {
		case TypeInt32:
			*(*int32)(p) = int32(v.num)
			return boxed(efaceInt32, p)
		case TypeUint32:
			*(*uint32)(p) = uint32(v.num)
			return boxed(efaceUint32, p)
		case TypeInt64:
			*(*int64)(p) = int64(v.num)
			return boxed(efaceInt64, p)
		default:
			*(*uint64)(p) = v.num
			return boxed(efaceUint64, p)
		}
	case TypeIPv4, TypeIPv6, TypeString, TypeBinary:
		if len(v.data) == 0 {
			return v.Interface() // "" or []byte{}: no allocation either
		}
		b := d.box()
		b.p, b.n, b.c = d.bytes(b, v.data), len(v.data), len(v.data)
		switch v.typ {
		case TypeString:
			return boxed(efaceString, unsafe.Pointer(b))
		case TypeBinary:
			return boxed(efaceBytes, unsafe.Pointer(b))
		default:
			return boxed(efaceIP, unsafe.Pointer(b))
		}
	}
	return nil
}

// decodeMessages builds the simple API's messages, with copied values. It
// reads every argument first, so as to size the boxes and the slab
// exactly, then fills one map per message.
func (r *Request) decodeMessages() []Message {
	r.check()
	var stack [32]pendingArg
	args := stack[:0]
	var nboxes, nbytes int
	for it := r.Messages(); it.Next(); {
		for a := it.Args(); a.Next(); {
			args = append(args, pendingArg{a.name, a.value})
			box, slab := needs(a.value)
			if box {
				nboxes++
			}
			nbytes += slab
		}
	}
	var d valueDecoder
	if nboxes > 0 {
		d.boxes = make([]valueBox, nboxes)
	}
	if nbytes > 0 {
		d.slab = make([]byte, 0, nbytes)
	}
	msgs := make([]Message, r.nmsgs)
	i, pos := 0, 0
	for it := r.Messages(); it.Next(); i++ {
		n := it.NumArgs()
		msgs[i] = r.decodeMessage(&it, args[:n], &d, pos)
		args = args[n:]
		pos += 1 + n
	}
	return msgs
}

// pendingArg is one argument waiting to go into its message's map.
type pendingArg struct {
	name  []byte
	value Value
}

// decodeMessage builds the simple API's message it is positioned on, of
// arguments args. pos is its name's place among the names of the NOTIFY,
// for intern.
func (r *Request) decodeMessage(it *MessageIterator, args []pendingArg, d *valueDecoder, pos int) Message {
	m := Message{Name: r.intern(it.name(), pos), Args: make(map[string]interface{}, len(args))}
	// Of duplicate names the first is kept: stored last, in reverse
	// order, so that each argument costs one map assignment.
	for i := len(args) - 1; i >= 0; i-- {
		m.Args[r.intern(args[i].name, pos+1+i)] = d.value(args[i].value)
	}
	return m
}
