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
// []Message, one map per message, one array of boxes holding the values
// that an interface{} refers to, and, when a STRING or BINARY does not fit
// its box, one copy of the payload that such values are views of. Nothing
// in them is ever written again once the handler has them, so a value kept
// after the handler returned is safe.

// valueBox holds one decoded value that an interface{} points to: a string
// (p, n), a []byte or net.IP (p, n, c), or an integer stored at &n. Its
// first word is a pointer, as in a string or slice header, so that the
// garbage collector sees the copy a string or slice points into. Bytes
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

// valueDecoder hands out the values of one NOTIFY from its boxes and, for
// the bytes that do not fit a box, from one copy of the whole payload
// (clone), made at the first such value: every later one is a view of it,
// without a copy of its own. Nothing is written to the copy after that, so
// a value handed out stays as it is.
type valueDecoder struct {
	payload []byte
	clone   []byte
	boxes   []valueBox
}

// bytes returns a pointer to a copy of payload[start:end], in box or in
// the payload's copy.
func (d *valueDecoder) bytes(box *valueBox, start, end int) unsafe.Pointer {
	if end-start <= len(box.small) {
		copy(box.small[:], d.payload[start:end])
		return unsafe.Pointer(&box.small[0])
	}
	if d.clone == nil {
		d.clone = append([]byte(nil), d.payload...) // not zeroed first, as make would
	}
	return unsafe.Pointer(&d.clone[start])
}

func (d *valueDecoder) box() *valueBox {
	b := &d.boxes[0]
	d.boxes = d.boxes[1:]
	return b
}

// integer returns n as an interface{} of the Go type of t, an integer
// type, boxed in the decoder's memory.
func (d *valueDecoder) integer(t Type, n uint64) interface{} {
	b := d.box()
	p := unsafe.Pointer(&b.n)
	switch t {
	case TypeInt32:
		*(*int32)(p) = int32(n)
		return boxed(efaceInt32, p)
	case TypeUint32:
		*(*uint32)(p) = uint32(n)
		return boxed(efaceUint32, p)
	case TypeInt64:
		*(*int64)(p) = int64(n)
		return boxed(efaceInt64, p)
	default:
		*(*uint64)(p) = n
		return boxed(efaceUint64, p)
	}
}

// data returns payload[start:end] as an interface{} of the Go type of t
// (STRING, BINARY or an address), copied.
func (d *valueDecoder) data(t Type, start, end int) interface{} {
	if start == end {
		if t == TypeString {
			return ""
		}
		return []byte{} // an empty BINARY: no allocation either
	}
	b := d.box()
	b.p, b.n, b.c = d.bytes(b, start, end), end-start, end-start
	switch t {
	case TypeString:
		return boxed(efaceString, unsafe.Pointer(b))
	case TypeBinary:
		return boxed(efaceBytes, unsafe.Pointer(b))
	default:
		return boxed(efaceIP, unsafe.Pointer(b))
	}
}

// decodeMessages builds the simple API's messages, with copied values, in
// one walk of the frame: one box per argument at most (r.nargs), one copy
// of the payload for the bytes that do not fit a box. A NOTIFY of one
// message (what HAProxy sends for most events) takes its []Message and
// its boxes from one allocation.
func (r *Request) decodeMessages() []Message {
	r.check()
	d := valueDecoder{payload: r.payload}
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
		nargs := it.NumArgs()
		args := make(map[string]interface{}, nargs)
		msgs[i] = Message{Name: r.intern(it.name(), pos), Args: args}
		r.decodeArgs(&it, args, &d, pos+1)
		pos += 1 + nargs
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

// decodeArgs decodes the arguments of the message it is on into args. pos
// is the first one's place among the names of the NOTIFY, for intern.
// It reads the bytes itself rather than through an ArgIterator (a third
// of the simple API's cost went there), and stops where the iterator
// would, at the first malformed argument.
func (r *Request) decodeArgs(it *MessageIterator, args map[string]interface{}, d *valueDecoder, pos int) {
	p := r.payload[:it.cur.end]
	off := int(it.cur.args)
	for i, n := 0, it.NumArgs(); i < n; i++ {
		name, next, err := readBytes(p, off)
		if err != nil || next >= len(p) {
			return
		}
		tb := p[next]
		off = next + 1
		var x interface{}
		switch t := Type(tb & typeMask); t {
		case TypeNull:
		case TypeBool:
			x = tb&flagMask == boolTrueFlag // boxing a bool does not allocate
		case TypeInt32, TypeUint32, TypeInt64, TypeUint64:
			v, next, err := readVarint(p, off)
			if err != nil || !fits(t, v) {
				return
			}
			x, off = d.integer(t, v), next
		case TypeIPv4, TypeIPv6:
			end := off + 4
			if t == TypeIPv6 {
				end = off + 16
			}
			if end > len(p) {
				return
			}
			x, off = d.data(t, off, end), end
		case TypeString, TypeBinary:
			v, next, err := readBytes(p, off)
			if err != nil {
				return
			}
			x, off = d.data(t, next-len(v), next), next
		default:
			return
		}
		key := r.intern(name, pos+i)
		before := len(args)
		args[key] = x
		if len(args) == before {
			// A name seen before: the first one is kept.
			first, _ := it.Arg(key)
			args[key] = first.Interface()
		}
	}
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
