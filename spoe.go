// Package spoe is a library for writing HAProxy SPOE agents: programs that
// HAProxy's SPOE filter asks about each request over SPOP (the Stream
// Processing Offload Protocol) and that answer with variables HAProxy's
// rules then use to block, route, rate-limit or tag traffic.
//
// An agent is a handler and a listener:
//
//	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
//		for _, msg := range messages {
//			if msg.Name != "ip-rep" {
//				continue
//			}
//			ip, _ := msg.Args["ip"].(net.IP)
//			return []spoe.Action{
//				spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: score(ip)},
//			}, nil
//		}
//		return nil, nil
//	})
//	log.Fatal(agent.ListenAndServe(":9000"))
//
// HAProxy then reads sess.<var-prefix>.score in its rules.
//
// # Two ways to handle
//
// MessageHandler, the function above, receives every message with its
// arguments decoded to Go values and returns actions. Handler is the
// zero-copy path under it: a Request whose messages and typed arguments are
// read lazily from the frame, and an ActionWriter that appends actions
// straight into the ACK. Both are served by the same engine.
//
// # Protocol
//
// The agent speaks SPOP 2.0 as HAProxy 2.6 to 3.x do. It announces
// "pipelining" and "async" when HAProxy 2.6 to 3.0 offer them, but not
// "pipelining" to the 3.1+ multiplexer, whose connections can stall for
// good when pipelined answers fill its buffer (see agentCaps, and the
// README's "Known HAProxy issues"); and "fragmentation", with which HAProxy
// 2.6 and 3.0 may split a big NOTIFY in several frames that the agent
// joins. It answers health checks ("option spop-check"),
// HAProxy's DISCONNECT, and protocol errors with the status code SPOP
// defines for them.
//
// Frames of one connection are handled in the goroutine that read them
// while handlers are quick. When handlers have lately been slow (over 50 µs
// on average), each frame gets a goroutine of its own at once; a rare slow
// call among quick ones is left to finish in its goroutine after 1 to 4 ms
// while another goroutine goes on reading. Pipelined frames are so handled
// concurrently. ACKs ready together leave in one write. With "async", an ACK whose connection closed leaves on
// another connection of the same HAProxy engine (engine-id), never on
// another engine's.
//
// # Errors seen by HAProxy
//
// SPOP has no error status per frame. When a handler returns an error or
// panics, the agent answers at once with the variable txn.<prefix>.error
// (Agent.ErrorVar) set to true, and logs and counts the error. A variable
// that HAProxy would drop silently (a bad name, a value SPOP cannot carry,
// an ACK over max-frame-size) is left out, logged and counted.
package spoe

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/errors"
	"github.com/sirupsen/logrus"
)

// ErrAgentClosed is returned by Serve and ListenAndServe after Shutdown or
// Close.
var ErrAgentClosed = errors.New("spoe: Agent closed")

// Defaults of the Agent's zero-valued fields.
const (
	DefaultMaxFrameSize       = 1 << 20
	DefaultMaxInFlight        = 1024
	DefaultMaxInFlightPerConn = 64
	DefaultReadTimeout        = 10 * time.Second
	DefaultWriteTimeout       = 10 * time.Second
	DefaultErrorVar           = "error"
)

// Agent serves SPOP connections from HAProxy. Its exported fields are its
// configuration; set them before Serve and do not change them after. The
// zero value of each field works.
type Agent struct {
	// Handler answers NOTIFY frames. New sets it from a MessageHandler.
	// A nil Handler answers every NOTIFY with an empty ACK.
	Handler Handler

	// MaxFrameSize caps the max-frame-size the agent answers in its HELLO;
	// the agent answers HAProxy's own value when it is lower. HAProxy
	// offers tune.bufsize-4 (16380 by default); a lower value makes HAProxy
	// 2.6 and 3.0 fragment bigger NOTIFYs and 3.1+ fail the events that do
	// not fit. Zero means DefaultMaxFrameSize; values below 256 mean 256.
	MaxFrameSize int

	// MaxConns limits the connections served at once. When it is reached
	// the agent stops accepting until a connection ends, and new ones wait
	// in the listen backlog. Zero means no limit.
	MaxConns int

	// MaxInFlight limits the NOTIFY frames being handled at once in the
	// whole agent; when it is reached, connections stop reading until a
	// handler returns. Zero means DefaultMaxInFlight.
	MaxInFlight int

	// MaxInFlightPerConn limits the NOTIFY frames being handled at once on
	// one connection (HAProxy pipelines at most 20 by default). Zero means
	// DefaultMaxInFlightPerConn.
	MaxInFlightPerConn int

	// ReadTimeout bounds the time from accepting a connection to a complete
	// HAPROXY-HELLO, and from the first byte of a frame to its last. On
	// expiry the agent sends AGENT-DISCONNECT "a timeout occurred" and
	// closes. Zero means DefaultReadTimeout.
	ReadTimeout time.Duration

	// IdleTimeout bounds the time a connection may wait for its next frame
	// after the handshake; on expiry it is closed the same way. Zero means
	// no limit: HAProxy ends idle connections itself (2.6 after its
	// "timeout idle", 3.x by pooling them).
	IdleTimeout time.Duration

	// WriteTimeout bounds the time one write may block when HAProxy does not
	// read; the connection is closed on expiry. Zero means
	// DefaultWriteTimeout.
	WriteTimeout time.Duration

	// ErrorVar is the name of the transaction variable the agent sets to
	// true (txn.<prefix>.<ErrorVar>) in place of the handler's actions when
	// the handler fails. Zero means DefaultErrorVar, which is the name to
	// give HAProxy's own "option set-on-error" too, so that one variable
	// tells every failure: "-" turns it off.
	ErrorVar string

	// VarPrefix is HAProxy's var-prefix for this agent ("option
	// var-prefix", by default the spoe-agent's name). It is only used to
	// check that <scope>.<prefix>.<name> fits HAProxy's 63 bytes; when
	// empty, names are checked against the shortest prefix.
	VarPrefix string

	// Logger receives the agent's logs. Nil means logrus.StandardLogger().
	// Normal ends of connections (EOF, reset, HAProxy's DISCONNECT) are
	// logged at debug level, never as errors.
	Logger logrus.FieldLogger

	initOnce sync.Once
	base     context.Context // cancelled by Close
	cancel   context.CancelFunc

	mu         sync.Mutex
	listeners  map[*net.Listener]struct{}
	conns      map[*conn]struct{}
	shutdown   atomic.Bool
	done       chan struct{} // closed by Shutdown and Close
	drained    chan struct{} // closed when shutting down and no conn is left
	connSlots  chan struct{} // MaxConns semaphore; nil when unlimited
	goroutines sync.WaitGroup

	engines engines
	stats   stats

	inflight atomic.Int64 // handler calls running
	slotMu   sync.Mutex
	slotCond *sync.Cond
	waiters  atomic.Int32

	// handlerTime is a moving average of the sampled handler durations, in
	// nanoseconds: when handlers are slow, frames go to goroutines of their
	// own at once rather than run inline.
	handlerTime atomic.Int64

	// keepPipelining answers "pipelining" to HAProxy 3.1+ too (see
	// agentCaps); set by tests only, which show HAProxy's stall with it.
	keepPipelining bool
}

// New returns an Agent that answers NOTIFY frames with handler.
func New(handler MessageHandler) *Agent {
	return &Agent{Handler: handler}
}

func (a *Agent) init() {
	a.initOnce.Do(func() {
		a.base, a.cancel = context.WithCancel(context.Background())
		a.listeners = make(map[*net.Listener]struct{})
		a.conns = make(map[*conn]struct{})
		a.done = make(chan struct{})
		a.drained = make(chan struct{})
		a.engines.agent = a
		a.slotCond = sync.NewCond(&a.slotMu)
		if a.MaxConns > 0 {
			a.connSlots = make(chan struct{}, a.MaxConns)
		}
	})
}

func (a *Agent) baseContext() context.Context { a.init(); return a.base }

func (a *Agent) handler() Handler {
	if a.Handler == nil {
		return emptyHandler{}
	}
	return a.Handler
}

type emptyHandler struct{}

func (emptyHandler) ServeSPOE(*ActionWriter, *Request) error { return nil }

func (a *Agent) maxFrameSize() int {
	switch {
	case a.MaxFrameSize <= 0:
		return DefaultMaxFrameSize
	case a.MaxFrameSize < MinFrameSize:
		return MinFrameSize
	case a.MaxFrameSize > 1<<31-1:
		return 1<<31 - 1
	}
	return a.MaxFrameSize
}

func (a *Agent) maxInFlight() int64 {
	if a.MaxInFlight <= 0 {
		return DefaultMaxInFlight
	}
	return int64(a.MaxInFlight)
}

func (a *Agent) maxInFlightPerConn() int32 {
	if a.MaxInFlightPerConn <= 0 {
		return DefaultMaxInFlightPerConn
	}
	if a.MaxInFlightPerConn > 1<<30 {
		return 1 << 30
	}
	return int32(a.MaxInFlightPerConn)
}

func (a *Agent) readTimeout() time.Duration {
	if a.ReadTimeout <= 0 {
		return DefaultReadTimeout
	}
	return a.ReadTimeout
}

func (a *Agent) writeTimeout() time.Duration {
	if a.WriteTimeout <= 0 {
		return DefaultWriteTimeout
	}
	return a.WriteTimeout
}

func (a *Agent) errorVar() string {
	switch a.ErrorVar {
	case "":
		return DefaultErrorVar
	case "-":
		return ""
	}
	return a.ErrorVar
}

func (a *Agent) logger() logrus.FieldLogger {
	if a.Logger == nil {
		return logrus.StandardLogger()
	}
	return a.Logger
}

// ListenAndServe listens on the TCP address addr and serves SPOP on it. It
// always returns a non-nil error: ErrAgentClosed after Shutdown or Close.
func (a *Agent) ListenAndServe(addr string) error {
	a.init()
	if a.shutdown.Load() {
		return ErrAgentClosed
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return errors.Wrap(err, "spoe: listen")
	}
	return a.Serve(l)
}

// Serve accepts connections on l (TCP or unix socket) and serves each in
// its own goroutine. It takes l over and closes it when it returns. It
// always returns a non-nil error: ErrAgentClosed after Shutdown or Close.
func (a *Agent) Serve(l net.Listener) error {
	a.init()
	if !a.trackListener(&l, true) {
		l.Close()
		return ErrAgentClosed
	}
	defer a.trackListener(&l, false)
	defer l.Close()
	var backoff time.Duration
	for {
		if a.connSlots != nil {
			select {
			case a.connSlots <- struct{}{}:
			case <-a.done:
				return ErrAgentClosed
			}
		}
		nc, err := l.Accept()
		if err != nil {
			if a.connSlots != nil {
				<-a.connSlots
			}
			if a.shutdown.Load() {
				return ErrAgentClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				backoff = nextBackoff(backoff)
				a.logger().WithError(err).Warnf("spoe: accept error, retrying in %v", backoff)
				select {
				case <-time.After(backoff):
				case <-a.done:
					return ErrAgentClosed
				}
				continue
			}
			return errors.Wrap(err, "spoe: accept")
		}
		backoff = 0
		c := newConn(a, nc)
		if !a.trackConn(c, true) {
			nc.Close()
			if a.connSlots != nil {
				<-a.connSlots
			}
			return ErrAgentClosed
		}
		a.goroutines.Add(1)
		go c.serve()
	}
}

func isTemporary(err error) bool {
	t, ok := err.(interface{ Temporary() bool })
	return ok && t.Temporary()
}

func nextBackoff(d time.Duration) time.Duration {
	if d == 0 {
		return 5 * time.Millisecond
	}
	if d *= 2; d > time.Second {
		d = time.Second
	}
	return d
}

func (a *Agent) trackListener(l *net.Listener, add bool) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if add {
		if a.shutdown.Load() {
			return false
		}
		a.listeners[l] = struct{}{}
	} else {
		delete(a.listeners, l)
	}
	return true
}

// trackConn adds c to the agent's connections, or forgets it once its
// loop and every handler that ran on it are done.
func (a *Agent) trackConn(c *conn, add bool) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if add {
		if a.shutdown.Load() {
			return false
		}
		a.conns[c] = struct{}{}
		a.stats.connsOpen.Add(1)
		a.stats.connsTotal.Add(1)
		return true
	}
	delete(a.conns, c)
	if a.shutdown.Load() && len(a.conns) == 0 {
		a.closeDrained()
	}
	return true
}

// connClosed accounts for a closed socket: it no longer counts as open nor
// against MaxConns, even while handlers that ran on it finish.
func (a *Agent) connClosed() {
	a.stats.connsOpen.Add(-1)
	if a.connSlots != nil {
		<-a.connSlots
	}
}

func (a *Agent) closeDrained() {
	select {
	case <-a.drained:
	default:
		close(a.drained)
	}
}

// closeListeners closes every listener and marks the agent as shutting
// down. It returns the connections to end.
func (a *Agent) closeListeners() ([]*conn, error) {
	a.init()
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.shutdown.Swap(true) {
		close(a.done)
	}
	var err error
	for l := range a.listeners {
		if cerr := (*l).Close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	conns := make([]*conn, 0, len(a.conns))
	for c := range a.conns {
		conns = append(conns, c)
	}
	if len(a.conns) == 0 {
		a.closeDrained()
	}
	return conns, err
}

// Shutdown stops the agent gracefully: it closes the listeners, lets the
// handlers that are running finish and their ACKs go out, then sends
// AGENT-DISCONNECT "normal" on every connection and closes it. Frames that
// HAProxy sent but the agent had not read yet are not handled: HAProxy
// sees them fail as the connection closes.
//
// It returns nil once every connection is closed, or ctx.Err() if ctx ends
// first; Close then ends what is left. Serve returns ErrAgentClosed at once.
func (a *Agent) Shutdown(ctx context.Context) error {
	conns, lerr := a.closeListeners()
	for _, c := range conns {
		c.startDrain()
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-a.drained:
			a.engines.endAll() // lingering ones: no connection can join now
			a.goroutines.Wait()
		case <-ctx.Done():
		}
		close(done)
	}()
	select {
	case <-done:
		if err := ctx.Err(); err != nil {
			return err
		}
		return lerr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops the agent at once: it closes the listeners and every
// connection and cancels the contexts of the running handlers, whose ACKs
// are then dropped. Serve returns ErrAgentClosed.
func (a *Agent) Close() error {
	conns, err := a.closeListeners()
	a.cancel()
	for _, c := range conns {
		c.abort()
	}
	a.slotMu.Lock()
	a.slotCond.Broadcast()
	a.slotMu.Unlock()
	return err
}

// tryAcquireSlot takes one of the agent's MaxInFlight handler slots if
// one is free.
func (a *Agent) tryAcquireSlot() bool {
	limit := a.maxInFlight()
	for {
		n := a.inflight.Load()
		if n >= limit {
			return false
		}
		if a.inflight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// acquireSlot takes one of the agent's MaxInFlight handler slots, waiting
// for one if needed. It reports false if the agent was closed meanwhile.
func (a *Agent) acquireSlot() bool {
	limit := a.maxInFlight()
	for {
		if a.tryAcquireSlot() {
			return true
		}
		a.slotMu.Lock()
		a.waiters.Add(1)
		for a.inflight.Load() >= limit && a.base.Err() == nil {
			a.slotCond.Wait()
		}
		a.waiters.Add(-1)
		a.slotMu.Unlock()
		if a.base.Err() != nil {
			return false
		}
	}
}

// releaseSlot gives a handler slot back.
func (a *Agent) releaseSlot() {
	a.inflight.Add(-1)
	if a.waiters.Load() > 0 {
		a.slotMu.Lock()
		a.slotCond.Broadcast()
		a.slotMu.Unlock()
	}
}

// prefixLen is the var-prefix length used to check variable names.
func (a *Agent) prefixLen() int { return len(a.VarPrefix) }

// slowHandlers reports whether handlers have lately been slow enough that
// a frame should not wait behind them: see dispatchThreshold.
func (a *Agent) slowHandlers() bool {
	return time.Duration(a.handlerTime.Load()) > dispatchThreshold
}

// observeHandlerTime feeds the moving average of handler durations (one
// sample in latencySampling; a weight of 1/8 each).
func (a *Agent) observeHandlerTime(d time.Duration) {
	avg := a.handlerTime.Load()
	a.handlerTime.Store(avg + (int64(d)-avg)/8)
}
