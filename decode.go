package spoe

import (
	"context"
	"fmt"
	"math"
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
// The slab is allocated at its first use, with room for every byte of the
// NOTIFY (slabCap), so that it never grows: a value handed out stays where
// it is.
type valueDecoder struct {
	slab    []byte
	slabCap int
	boxes   []valueBox
}

// bytes copies b to box or to the slab and returns a pointer to the copy.
func (d *valueDecoder) bytes(box *valueBox, b []byte) unsafe.Pointer {
	if len(b) <= len(box.small) {
		copy(box.small[:], b)
		return unsafe.Pointer(&box.small[0])
	}
	if d.slab == nil {
		d.slab = make([]byte, 0, d.slabCap)
	}
	off := len(d.slab)
	d.slab = append(d.slab, b...)
	return unsafe.Pointer(&d.slab[off])
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

// decodeMessages builds the simple API's messages, with copied values, in
// one walk of the frame: one box per argument at most (r.nargs), a slab of
// at most the frame's size for the bytes that do not fit a box. A NOTIFY of
// one message (what HAProxy sends for most events) takes its []Message and
// its boxes from one allocation.
func (r *Request) decodeMessages() []Message {
	r.check()
	d := valueDecoder{slabCap: len(r.payload)}
	var msgs []Message
	switch {
	case r.nmsgs == 1 && r.nargs <= 2:
		one := new(oneMessage2)
		msgs, d.boxes = one.msg[:], one.boxes[:r.nargs]
	case r.nmsgs == 1 && r.nargs <= 8:
		one := new(oneMessage8)
		msgs, d.boxes = one.msg[:], one.boxes[:r.nargs]
	default:
		msgs = make([]Message, r.nmsgs)
		if r.nargs > 0 {
			d.boxes = make([]valueBox, r.nargs)
		}
	}
	i, pos := 0, 0
	for it := r.Messages(); it.Next(); i++ {
		msgs[i] = r.decodeMessage(&it, &d, pos)
		pos += 1 + it.NumArgs()
	}
	return msgs
}

// oneMessage2 and oneMessage8 are the message and boxes of a NOTIFY of one
// message, in one allocation.
type oneMessage2 struct {
	msg   [1]Message
	boxes [2]valueBox
}

type oneMessage8 struct {
	msg   [1]Message
	boxes [8]valueBox
}

// decodeMessage builds the simple API's message it is positioned on. pos is
// its name's place among the names of the NOTIFY, for intern.
func (r *Request) decodeMessage(it *MessageIterator, d *valueDecoder, pos int) Message {
	args := make(map[string]interface{}, it.NumArgs())
	m := Message{Name: r.intern(it.name(), pos), Args: args}
	i := 0
	for a := it.Args(); a.Next(); i++ {
		name := r.intern(a.name, pos+1+i)
		n := len(args)
		args[name] = d.value(a.value)
		if len(args) == n {
			// A name seen before: the first one is kept.
			first, _ := it.Arg(name)
			args[name] = first.Interface()
		}
	}
	return m
}

// Message is one SPOE message of a NOTIFY frame, in the simple API: its name
// (the spoe-message section's) and its arguments by name, decoded to Go
// values that the handler may keep:
//
//	NULL    nil          INT32   int32        IPV4    net.IP (4 bytes)
//	BOOL    bool         UINT32  uint32       IPV6    net.IP (16 bytes)
//	STRING  string       INT64   int64        BINARY  []byte
//	                     UINT64  uint64
//
// HAProxy sends every integer sample as INT64. An unnamed argument ("args
// src" in spoe.conf) is under the key ""; when several arguments share a
// name, the first one is kept. Request's iterators see them all, in order.
type Message struct {
	Name string
	Args map[string]interface{}
}

// ArgIP returns the argument name if it is an address (IPV4 or IPV6).
func (m Message) ArgIP(name string) (net.IP, bool) {
	ip, ok := m.Args[name].(net.IP)
	return ip, ok
}

// ArgString returns the argument name if it is a STRING.
func (m Message) ArgString(name string) (string, bool) {
	s, ok := m.Args[name].(string)
	return s, ok
}

// ArgBytes returns the argument name if it is a BINARY (req.body,
// req.hdrs_bin...).
func (m Message) ArgBytes(name string) ([]byte, bool) {
	b, ok := m.Args[name].([]byte)
	return b, ok
}

// ArgInt returns the argument name if it is an integer of any of the four
// SPOP types that fits an int64 (HAProxy sends integers as INT64).
func (m Message) ArgInt(name string) (int64, bool) {
	switch v := m.Args[name].(type) {
	case int64:
		return v, true
	case int32:
		return int64(v), true
	case uint32:
		return int64(v), true
	case uint64:
		return int64(v), v <= math.MaxInt64
	}
	return 0, false
}

// ArgBool returns the argument name if it is a BOOL.
func (m Message) ArgBool(name string) (value, ok bool) {
	value, ok = m.Args[name].(bool)
	return value, ok
}

// MessageHandler is the simple API: it receives every message of a NOTIFY
// frame and returns the actions to send back. It is a Handler.
//
// The messages, their names and their argument values are the handler's
// to keep: they are built for each NOTIFY and never reused.
type MessageHandler func(messages []Message) ([]Action, error)

// ServeSPOE decodes r's messages, calls h and writes its actions to w.
// An action the writer refuses is logged and counted by the agent; the
// others are still sent, and the error variable tells HAProxy (see
// Agent.ErrorVar). A NOTIFY with more messages or arguments than the
// agent's MaxNotifyMessages and MaxNotifyArgs is not decoded: h is not
// called, and the agent answers with its error variable. What the decoded
// messages cost is counted in the agent's MaxBufferBytes until h returns.
func (h MessageHandler) ServeSPOE(w *ActionWriter, r *Request) error {
	cost, err := r.checkDecodeCost()
	if err != nil {
		return err
	}
	b := r.budget()
	b.takeDecode(cost)
	defer b.releaseDecode(cost)
	actions, err := h(r.decodeMessages())
	return writeActions(w, actions, err)
}

// ContextMessageHandler is the simple API with a context: ctx is
// r.Context() (see Request.Context for when it is cancelled), and
// RequestInfoFromContext(ctx) gives the engine, stream and frame ids for
// logs. It is a Handler; the messages are the handler's to keep, as with
// MessageHandler.
type ContextMessageHandler func(ctx context.Context, messages []Message) ([]Action, error)

// ServeSPOE decodes r's messages, calls h with r's context and writes its
// actions to w, as MessageHandler does.
func (h ContextMessageHandler) ServeSPOE(w *ActionWriter, r *Request) error {
	cost, err := r.checkDecodeCost()
	if err != nil {
		return err
	}
	b := r.budget()
	b.takeDecode(cost)
	defer b.releaseDecode(cost)
	actions, err := h(r.Context(), r.decodeMessages())
	return writeActions(w, actions, err)
}

func writeActions(w *ActionWriter, actions []Action, err error) error {
	if err != nil {
		return err
	}
	for _, a := range actions {
		if a == nil {
			continue
		}
		_ = a.writeTo(w) // refusals are recorded in w and reported by the agent
	}
	return nil
}

// decodeLimitError is a NOTIFY the simple API does not decode: it has more
// messages, or arguments in all, than the agent allows.
type decodeLimitError struct {
	what         string // "messages" or "arguments"
	count, limit int
}

func (e *decodeLimitError) Error() string {
	return fmt.Sprintf("spoe: NOTIFY of %d %s or more, above the simple API's %d: not decoded", e.count, e.what, e.limit)
}

// What the simple API's decoding costs beyond the bytes of the values: a
// Message with its map, an argument's map slot and box (measured: some 75
// and 80 bytes), with a margin.
const (
	decodedMessageCost = 96
	decodedArgCost     = 96
)

// budget returns the agent's buffer budget, nil for a Request not served
// by an Agent.
func (r *Request) budget() *bufferBudget {
	if r.cfg == nil {
		return nil
	}
	return r.cfg.buffers
}

// checkDecodeCost bounds what decoding r for the simple API may cost: its
// messages and arguments are counted, without decoding, against the
// agent's limits. It returns the cost: at most the payload's bytes and
// what its messages and arguments take.
func (r *Request) checkDecodeCost() (int, error) {
	r.check()
	maxMsgs, maxArgs := DefaultMaxNotifyMessages, DefaultMaxNotifyArgs
	if r.cfg != nil { // nil for a Request not served by an Agent
		maxMsgs, maxArgs = r.cfg.maxNotifyMessages, r.cfg.maxNotifyArgs
	}
	if r.nmsgs > maxMsgs {
		return 0, &decodeLimitError{"messages", r.nmsgs, maxMsgs}
	}
	if r.nargs > maxArgs {
		return 0, &decodeLimitError{"arguments", r.nargs, maxArgs}
	}
	return r.nmsgs*decodedMessageCost + r.nargs*decodedArgCost + len(r.payload), nil
}

// Interning bounds: names repeat on every request, so the simple API keeps
// the short ones it has seen rather than allocate them again.
const (
	maxInterned    = 256
	maxInternedLen = 64
	recentNames    = 16
)

// internTable holds the names the simple API has built strings for, and
// the names of the last NOTIFY by position: HAProxy sends the same
// messages with the same arguments each time, so they are found by one
// comparison, without hashing.
type internTable struct {
	byName map[string]string
	recent [recentNames]string
}

// intern returns b as a string, from the names seen before when it can.
// pos is b's place among the names of the NOTIFY.
func (r *Request) intern(b []byte, pos int) string {
	for r.outer != nil {
		r = r.outer
	}
	t := r.names
	if t == nil {
		t = new(internTable)
		r.names = t
	}
	if pos < recentNames && t.recent[pos] == string(b) {
		return t.recent[pos]
	}
	s, ok := t.byName[string(b)]
	if !ok {
		s = string(b)
		if len(b) <= maxInternedLen && len(t.byName) < maxInterned {
			if t.byName == nil {
				t.byName = make(map[string]string)
			}
			t.byName[s] = s
		}
	}
	if pos < recentNames && len(b) <= maxInternedLen {
		t.recent[pos] = s
	}
	return s
}
