package spoe

import (
	"context"
	"fmt"
	"math"
	"net"
	"runtime/debug"

	"github.com/pkg/errors"
)

// A Handler answers the NOTIFY frames HAProxy sends: it reads the messages
// of r and writes actions to w. It is the zero-copy path; MessageHandler is
// the simple one, built on it.
//
// r, w and every view they give (names, values, iterators) are valid only
// until ServeSPOE returns. Builds with the race detector poison them after,
// so that a handler that keeps one fails loudly in tests: r, w and the
// iterators panic, the frame's bytes are overwritten, and reading them from
// another goroutine is a reported race. Copy what must outlive the call.
//
// ServeSPOE is called concurrently for the frames of different connections,
// and for those of one connection when an earlier one is slow.
//
// When ServeSPOE returns an error or panics, the actions it wrote are
// dropped, the agent answers with the error variable set (see
// Agent.ErrorVar), and logs and counts the error. It must not call
// runtime.Goexit (t.FailNow in a test does): the goroutine it would end may
// be the one reading its connection.
type Handler interface {
	ServeSPOE(w *ActionWriter, r *Request) error
}

// HandlerFunc adapts a function to the Handler interface.
type HandlerFunc func(w *ActionWriter, r *Request) error

// ServeSPOE calls f(w, r).
func (f HandlerFunc) ServeSPOE(w *ActionWriter, r *Request) error { return f(w, r) }

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

// IP returns the argument name if it is an address (IPV4 or IPV6).
func (m Message) IP(name string) (net.IP, bool) {
	ip, ok := m.Args[name].(net.IP)
	return ip, ok
}

// String returns the argument name if it is a STRING.
func (m Message) String(name string) (string, bool) {
	s, ok := m.Args[name].(string)
	return s, ok
}

// Bytes returns the argument name if it is a BINARY (req.body,
// req.hdrs_bin...).
func (m Message) Bytes(name string) ([]byte, bool) {
	b, ok := m.Args[name].([]byte)
	return b, ok
}

// Int returns the argument name if it is an integer of any of the four
// SPOP types that fits an int64 (HAProxy sends integers as INT64).
func (m Message) Int(name string) (int64, bool) {
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

// Bool returns the argument name if it is a BOOL.
func (m Message) Bool(name string) (value, ok bool) {
	value, ok = m.Args[name].(bool)
	return value, ok
}

// MessageHandler is the simple API: it receives every message of a NOTIFY
// frame and returns the actions to send back. It is a Handler.
type MessageHandler func(messages []Message) ([]Action, error)

// ServeSPOE decodes r's messages, calls h and writes its actions to w.
// An action the writer refuses is logged and counted by the agent; the
// others are still sent.
func (h MessageHandler) ServeSPOE(w *ActionWriter, r *Request) error {
	actions, err := h(r.decodeMessages())
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

// Request is one NOTIFY frame being handled. The frame is checked whole
// before the handler is called, and the places of its messages noted, so
// that reading them lazily can neither fail nor walk the frame twice.
type Request struct {
	parent   context.Context
	ctx      context.Context
	cancel   context.CancelFunc
	engineID string
	streamID uint64
	frameID  uint64
	payload  []byte
	nmsgs    int
	index    [indexedMessages]msgIndex // where the first messages are
	sealed   bool
	names    map[string]string // interned names for the simple API
	routed   MessageIterator   // the message a Router route is given
}

// indexedMessages is how many messages a Request locates up front; later
// ones (HAProxy sends one per spoe-message of an event or group, rarely
// more than a few) are found by stepping over their predecessors.
const indexedMessages = 16

// msgIndex locates one message in a payload: its name runs from name to
// args-1, where its NB-ARGS byte is; its arguments from args to end.
type msgIndex struct {
	name, args, end uint32
}

func (r *Request) check() {
	if r.sealed {
		panic("spoe: Request used after its handler returned")
	}
}

// indexMessages checks a NOTIFY's LIST-OF-MESSAGES whole, counts its
// messages and notes where the first ones are.
func (r *Request) indexMessages(payload []byte) error {
	r.payload, r.nmsgs = payload, 0
	if len(payload) > 1<<32-1 {
		return errTruncated // no frame is this big; offsets are uint32
	}
	for off := 0; off < len(payload); {
		m, end, err := scanMessage(payload, off)
		if err != nil {
			return err
		}
		if r.nmsgs < indexedMessages {
			r.index[r.nmsgs] = m
		}
		r.nmsgs++
		off = end
	}
	return nil
}

// scanMessage locates the message at payload[off:], checking it whole.
func scanMessage(payload []byte, off int) (msgIndex, int, error) {
	var m msgIndex
	name, off, err := readBytes(payload, off)
	if err != nil {
		return m, off, err
	}
	m.name = uint32(off - len(name))
	if off >= len(payload) {
		return m, off, errTruncated
	}
	nargs := int(payload[off])
	off++
	m.args = uint32(off)
	for i := 0; i < nargs; i++ {
		if off, err = skipName(payload, off); err != nil {
			return m, off, err
		}
		if off, err = skipValue(payload, off); err != nil {
			return m, off, err
		}
	}
	m.end = uint32(off)
	return m, off, nil
}

// skipName steps over a name: a varint length and that many bytes.
func skipName(b []byte, off int) (int, error) {
	_, off, err := readBytes(b, off)
	return off, err
}

// Context returns the request's context. It is cancelled when the handler
// returns, when the connection that must carry the ACK is gone (the frame's
// own connection or, with the async capability, the last connection of its
// HAProxy engine) and when the agent is closed.
func (r *Request) Context() context.Context {
	r.check()
	if r.ctx == nil {
		r.ctx, r.cancel = context.WithCancel(r.parent)
	}
	return r.ctx
}

// EngineID returns the engine-id HAProxy sent in its HELLO: one per HAProxy
// process and SPOE filter (per thread on 2.6). It is empty when HAProxy sent
// none.
func (r *Request) EngineID() string { r.check(); return r.engineID }

// StreamID returns the frame's stream-id.
func (r *Request) StreamID() uint64 { r.check(); return r.streamID }

// FrameID returns the frame's frame-id.
func (r *Request) FrameID() uint64 { r.check(); return r.frameID }

// NumMessages returns the number of messages in the frame.
func (r *Request) NumMessages() int { r.check(); return r.nmsgs }

// Messages returns an iterator over the frame's messages, in the order of
// HAProxy's configuration.
func (r *Request) Messages() MessageIterator {
	r.check()
	return MessageIterator{r: r}
}

// Message returns the first message with that name.
func (r *Request) Message(name string) (MessageIterator, bool) {
	it := r.Messages()
	for it.Next() {
		if it.NameIs(name) {
			return it, true
		}
	}
	return MessageIterator{}, false
}

// decodeMessages builds the simple API's messages, with copied values.
func (r *Request) decodeMessages() []Message {
	r.check()
	msgs := make([]Message, 0, r.nmsgs)
	for it := r.Messages(); it.Next(); {
		msgs = append(msgs, r.decodeMessage(&it))
	}
	return msgs
}

// decodeMessage builds the simple API's message it is positioned on.
func (r *Request) decodeMessage(it *MessageIterator) Message {
	m := Message{Name: r.intern(it.name()), Args: make(map[string]interface{}, it.NumArgs())}
	for args := it.Args(); args.Next(); {
		if _, dup := m.Args[string(args.name)]; !dup {
			m.Args[r.intern(args.name)] = args.value.Interface()
		}
	}
	return m
}

// Interning bounds: names repeat on every request, so the simple API keeps
// the short ones it has seen rather than allocate them again.
const (
	maxInterned    = 256
	maxInternedLen = 64
)

// intern returns b as a string, from the names seen before when it can.
func (r *Request) intern(b []byte) string {
	if s, ok := r.names[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(b) <= maxInternedLen && len(r.names) < maxInterned {
		if r.names == nil {
			r.names = make(map[string]string)
		}
		r.names[s] = s
	}
	return s
}

// MessageIterator walks the messages of a NOTIFY frame:
//
//	for msgs := r.Messages(); msgs.Next(); {
//		if msgs.NameIs("ip-rep") { ... msgs.Args() ... }
//	}
//
// It and its views are valid only while the handler runs.
type MessageIterator struct {
	r   *Request
	i   int // messages passed, the current one included
	cur msgIndex
}

// Next moves to the next message and reports whether there is one.
func (it *MessageIterator) Next() bool {
	r := it.r
	if r == nil {
		return false
	}
	r.check()
	if it.i >= r.nmsgs {
		return false
	}
	if it.i < indexedMessages {
		it.cur = r.index[it.i]
	} else {
		m, _, err := scanMessage(r.payload, int(it.cur.end))
		if err != nil {
			it.i = r.nmsgs
			return false
		}
		it.cur = m
	}
	it.i++
	return true
}

func (it *MessageIterator) name() []byte {
	it.r.check()
	return it.r.payload[it.cur.name : it.cur.args-1 : it.cur.args-1]
}

// Name returns the message's name as a new string.
func (it *MessageIterator) Name() string { return string(it.name()) }

// NameBytes returns the message's name as a view of the frame.
func (it *MessageIterator) NameBytes() []byte { return it.name() }

// NameIs reports whether the message is called name, without allocating.
func (it *MessageIterator) NameIs(name string) bool { return string(it.name()) == name }

// NumArgs returns the number of the message's arguments.
func (it *MessageIterator) NumArgs() int {
	it.r.check()
	return int(it.r.payload[it.cur.args-1])
}

// Args returns an iterator over the message's arguments, in order,
// unnamed and duplicate ones included.
func (it *MessageIterator) Args() ArgIterator {
	return ArgIterator{r: it.r, rest: it.r.payload[it.cur.args:it.cur.end:it.cur.end], left: it.NumArgs()}
}

// Arg returns the value of the message's first argument with that name.
func (it *MessageIterator) Arg(name string) (Value, bool) {
	it.r.check()
	p := it.r.payload[:it.cur.end]
	off := int(it.cur.args)
	for i := it.NumArgs(); i > 0; i-- {
		n, next, err := readBytes(p, off)
		if err != nil {
			break
		}
		if string(n) == name {
			v, _, err := readValue(p, next)
			return v, err == nil
		}
		if off, err = skipValue(p, next); err != nil {
			break
		}
	}
	return Value{}, false
}

// ArgIterator walks the arguments of one message. Its views are valid only
// while the handler runs.
type ArgIterator struct {
	r     *Request
	rest  []byte
	left  int
	name  []byte
	value Value
}

// Next moves to the next argument and reports whether there is one.
func (a *ArgIterator) Next() bool {
	if a.r != nil {
		a.r.check()
	}
	if a.left <= 0 {
		return false
	}
	a.left--
	name, off, err := readBytes(a.rest, 0)
	if err != nil {
		a.left = 0
		return false
	}
	v, off, err := readValue(a.rest, off)
	if err != nil {
		a.left = 0
		return false
	}
	a.name, a.value, a.rest = name, v, a.rest[off:]
	return true
}

// Name returns the argument's name as a new string; "" for an unnamed one.
func (a *ArgIterator) Name() string { return string(a.name) }

// NameBytes returns the argument's name as a view of the frame.
func (a *ArgIterator) NameBytes() []byte { return a.name }

// NameIs reports whether the argument is called name, without allocating.
func (a *ArgIterator) NameIs(name string) bool { return string(a.name) == name }

// Value returns the argument's value.
func (a *ArgIterator) Value() Value { return a.value }

// reassembly gathers the fragments of one NOTIFY (HAProxy 2.6 and 3.0 send
// them to an agent that announced "fragmentation"): a NOTIFY without FIN,
// then UNSET frames with the same ids, the last one with FIN. An UNSET with
// ABORT ends it without an ACK.
type reassembly struct {
	active   bool
	streamID uint64
	frameID  uint64
	buf      []byte

	// The NOTIFY last answered with an aborting ACK (too big): HAProxy 2.6
	// fails that event and forgets it without sending a fragment with
	// ABORT, but fragments of it already on their way still come; they
	// are ignored, even amid another NOTIFY's.
	aborted                bool
	abortedSID, abortedFID uint64
}

func (ra *reassembly) start(f *frame) {
	ra.active = true
	ra.streamID, ra.frameID = f.streamID, f.frameID
	ra.buf = append(ra.buf[:0], f.payload...)
}

func (ra *reassembly) matches(f *frame) bool {
	return ra.active && f.streamID == ra.streamID && f.frameID == ra.frameID
}

// end forgets the NOTIFY and lets go of a buffer grown past the usual size.
func (ra *reassembly) end() {
	ra.active = false
	if cap(ra.buf) > 64<<10 {
		ra.buf = nil
	} else {
		ra.buf = ra.buf[:0]
	}
}

// abort ends the NOTIFY, answered with an aborting ACK: its later
// fragments are strays.
func (ra *reassembly) abort() {
	ra.aborted, ra.abortedSID, ra.abortedFID = true, ra.streamID, ra.frameID
	ra.end()
}

// stray reports whether f is a fragment of the NOTIFY last aborted.
func (ra *reassembly) stray(f *frame) bool {
	return ra.aborted && f.streamID == ra.abortedSID && f.frameID == ra.abortedFID
}

// detached is the state a rescuer starts from: no NOTIFY under way (its
// buffer stays with the slow handler), the aborted one still known.
func (ra *reassembly) detached() reassembly {
	return reassembly{aborted: ra.aborted, abortedSID: ra.abortedSID, abortedFID: ra.abortedFID}
}

// panicError is a recovered handler panic, with its stack.
type panicError struct {
	value interface{}
	stack []byte
}

func (e *panicError) Error() string { return fmt.Sprintf("spoe: handler panic: %v", e.value) }

// callHandler runs the handler on r, recovering a panic into an error.
func callHandler(h Handler, w *ActionWriter, r *Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &panicError{value: p, stack: debug.Stack()}
		}
	}()
	return h.ServeSPOE(w, r)
}

// serveNotify handles one whole NOTIFY: it calls the handler and completes
// w's ACK. A handler error or panic replaces the actions with the error
// variable, so that HAProxy's rules see the failure at once.
func (a *Agent) serveNotify(w *ActionWriter, r *Request) {
	err := callHandler(a.handler(), w, r)
	if r.cancel != nil {
		r.cancel()
		r.ctx, r.cancel = nil, nil
	}
	if err != nil {
		w.discardActions()
		w.err, w.refused = nil, 0
		var pe *panicError
		if errors.As(err, &pe) {
			a.stats.handlerPanics.Add(1)
			a.logger().WithField("stream_id", r.streamID).WithField("frame_id", r.frameID).
				WithField("stack", string(pe.stack)).Errorf("%v", err)
		} else {
			a.stats.handlerErrors.Add(1)
			a.logger().WithField("stream_id", r.streamID).WithField("frame_id", r.frameID).
				WithError(err).Error("spoe: handler failed")
		}
		if name := a.errorVar(); name != "" {
			_ = w.SetBool(VarScopeTransaction, name, true)
		}
	}
	if w.err != nil {
		a.stats.actionsRefused.Add(uint64(w.refused))
		a.logger().WithField("stream_id", r.streamID).WithField("frame_id", r.frameID).
			WithField("refused", w.refused).WithError(w.err).Error("spoe: actions left out of the ACK")
	}
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
