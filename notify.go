package spoe

import (
	"context"
	"fmt"
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

// Request is one NOTIFY frame being handled. The frame is checked whole
// before the handler is called, so that reading it lazily cannot fail, and
// the places of its first 16 messages are noted: iterating over them does
// not walk the frame again. Later messages are found by stepping over the
// one before, and MessageIterator.Arg steps over the arguments before the
// one it returns.
type Request struct {
	cfg      *config // set by serveNotify: the simple API's limits
	parent   context.Context
	ctx      *requestContext
	cancel   context.CancelFunc
	engineID string
	streamID uint64
	frameID  uint64
	payload  []byte
	nmsgs    int
	nargs    int                       // of every message together
	index    [indexedMessages]msgIndex // where the first messages are
	sealed   bool
	names    *internTable                // interned names for the simple API
	outer    *Request                    // for a Router's routed Request: the whole NOTIFY's
	sub      *Request                    // the Request a Router hands its routes, reused
	routing  []byte                      // the name of the message a Router is handling, if any
	mstats   [statMessages]*messageStats // the counters of its first names (see counted)
	nstats   int
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
	for q := r.outer; q != nil; q = q.outer { // a routed Request is sealed with its NOTIFY's
		if q.sealed {
			panic("spoe: Request used after its handler returned")
		}
	}
}

// root returns the Request of the whole NOTIFY.
func (r *Request) root() *Request {
	for r.outer != nil {
		r = r.outer
	}
	return r
}

// routed returns the Request of one message of r, the one it is on, for a
// Router's route: it shares r's context and ids.
func (r *Request) routed(it *MessageIterator) *Request {
	s := r.sub
	if s == nil {
		s = new(Request)
		r.sub = s
	}
	*s = Request{
		parent: r.parent, engineID: r.engineID, streamID: r.streamID, frameID: r.frameID,
		payload: r.payload, nmsgs: 1, nargs: int(r.payload[it.cur.args-1]), outer: r, sub: s.sub, cfg: r.cfg,
	}
	s.index[0] = it.cur
	return s
}

// indexMessages checks a NOTIFY's LIST-OF-MESSAGES whole, counts its
// messages and notes where the first ones are.
func (r *Request) indexMessages(payload []byte) error {
	r.payload, r.nmsgs, r.nargs = payload, 0, 0
	if uint64(len(payload)) > 1<<32-1 {
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
		r.nargs += int(payload[m.args-1])
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

// Context returns the request's context. It carries the request's ids
// (RequestInfoFromContext) and is cancelled:
//
//   - when the handler returns;
//   - when the agent is closed (Close, or Run when its shutdown timeout
//     expires); Shutdown lets running handlers finish with it live;
//   - when the ACK can no longer leave: without the async capability, when
//     the frame's connection closes (HAProxy gave up or went away); with
//     it, when its HAProxy engine goes away: 10 seconds after the engine's
//     last connection closed with none joining meanwhile, or at once when
//     Shutdown has closed every connection.
//
// A Router's route gets the context of the whole NOTIFY.
func (r *Request) Context() context.Context {
	r.check()
	if r.outer != nil {
		return r.outer.Context()
	}
	if r.ctx == nil {
		c := &requestContext{info: RequestInfo{EngineID: r.engineID, StreamID: r.streamID, FrameID: r.frameID}}
		c.Context, r.cancel = context.WithCancel(r.parent)
		r.ctx = c
	}
	return r.ctx
}

// RequestInfo identifies a NOTIFY frame, for logs.
type RequestInfo struct {
	EngineID string // the engine-id of HAProxy's HELLO (see Request.EngineID)
	StreamID uint64
	FrameID  uint64
}

// RequestInfoFromContext returns the ids of the NOTIFY whose handler
// received ctx (Request.Context, a ContextMessageHandler's ctx, or a
// context derived from them).
func RequestInfoFromContext(ctx context.Context) (RequestInfo, bool) {
	c, ok := ctx.Value(requestInfoKey{}).(*requestContext)
	if !ok {
		return RequestInfo{}, false
	}
	return c.info, true
}

type requestInfoKey struct{}

// requestContext is a Request's context: a cancelable one with the ids.
type requestContext struct {
	context.Context
	info RequestInfo
}

func (c *requestContext) Value(key interface{}) interface{} {
	if key == (requestInfoKey{}) {
		return c
	}
	return c.Context.Value(key)
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
// variable, so that HAProxy's rules see the failure at once; an action left
// out of the ACK adds the error variable to the others.
func serveNotify(cfg *config, st *stats, w *ActionWriter, r *Request) {
	r.cfg = cfg
	w.limit -= cfg.errorVarRoom // so that the error variable always fits
	err := callHandler(cfg.handler, w, r)
	w.limit += cfg.errorVarRoom
	if r.cancel != nil {
		r.cancel()
		r.ctx, r.cancel = nil, nil
	}
	if err != nil {
		w.discardActions()
		w.err, w.refused = nil, 0
		var pe *panicError
		var le *decodeLimitError
		isPanic := errors.As(err, &pe)
		st.messages.failed(r, isPanic)
		if errors.As(err, &le) {
			st.notifyRefused.Add(1)
			name := r.firstMessageName()
			if ok, held := cfg.logs.allow("limit " + name); ok {
				logHeld(cfg, held, fmt.Sprintf("NOTIFYs of message %q refused for their size", name))
				requestLog(cfg, r).WithError(err).Warnf("spoe: NOTIFY of message %q refused: answered with the error variable", name)
			}
		} else if isPanic {
			st.handlerPanics.Add(1)
			// One stack per logInterval: a panic storm must not flood the log.
			if ok, held := cfg.logs.allow("panic"); ok {
				logHeld(cfg, held, "handler panics")
				requestLog(cfg, r).WithField("stack", string(pe.stack)).Errorf("%v", err)
			}
		} else {
			st.handlerErrors.Add(1)
			name := r.firstMessageName()
			if ok, held := cfg.logs.allow("error " + name); ok {
				logHeld(cfg, held, fmt.Sprintf("handler errors on message %q", name))
				requestLog(cfg, r).WithError(err).Errorf("spoe: handler failed on message %q", name)
			}
		}
		if name := cfg.errorVar; name != "" {
			_ = w.SetBool(VarScopeTransaction, name, true)
		}
	}
	if w.err != nil {
		st.actionsRefused.Add(uint64(w.refused))
		name := r.firstMessageName()
		if ok, held := cfg.logs.allow("refused " + name); ok {
			logHeld(cfg, held, fmt.Sprintf("ACKs with actions left out on message %q", name))
			requestLog(cfg, r).WithField("refused", w.refused).WithError(w.err).
				Errorf("spoe: actions left out of the ACK of message %q", name)
		}
		if name := cfg.errorVar; name != "" {
			_ = w.SetBool(VarScopeTransaction, name, true) // fits: room was kept
		}
	}
}
