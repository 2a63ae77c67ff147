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
// arguments decoded to Go values and returns actions;
// ContextMessageHandler is the same with a context first (cancelled when
// HAProxy gives up or the agent closes, carrying the request's ids: see
// Request.Context and RequestInfoFromContext). Handler is the zero-copy path
// under them: a Request whose messages and typed arguments are read lazily
// from the frame, and an ActionWriter that appends actions straight into
// the ACK. All are served by the same engine, and a Router sends each
// message to the Handler registered for its name.
//
// # Protocol
//
// The agent speaks SPOP 2.0 as HAProxy 2.6 to 3.x do. It announces
// "pipelining" and "async" when HAProxy 2.6 to 3.0 offer them, but
// "pipelining" to the 3.1+ multiplexer, whose connections can stall for
// good when pipelined answers fill its buffer, only once it learnt that
// its answers are small, and then keeps the last 20 ACKs it wrote on such
// a connection below that buffer (see conn.pipelining, ackWindow, and the
// README's "Known HAProxy issues"); and "fragmentation", with which HAProxy
// 2.6 and 3.0 may split a big NOTIFY in several frames that the agent
// joins. It answers health checks ("option spop-check"),
// HAProxy's DISCONNECT, and protocol errors with the status code SPOP
// defines for them.
//
// Frames of one connection are handled in the goroutine that read them
// while handlers are quick. When handlers have lately been slow (more than
// one call in 16 over 50 µs), each frame gets a goroutine of its own at
// once; a rare slow call among quick ones is left to finish in its
// goroutine after 1 to 4 ms while another goroutine goes on reading. Pipelined frames are so handled
// concurrently. ACKs ready together leave in one write. With "async", an
// ACK whose connection closed leaves on another connection of the same
// HAProxy engine (engine-id), never on another engine's.
//
// # Where a frame goes
//
// For readers of the code: a NOTIFY's way through the package, file by
// file, and the goroutine that runs each step.
//
//	spoe.go     Serve resolves the Agent's fields once (config) and    Serve's
//	            starts a goroutine per connection
//	conn.go     serve: the handshake (hello.go), then loop: next       the connection's
//	            frame, dispatch by type (UNSET: reassembly.go,         reading goroutine
//	            DISCONNECT: disconnect.go), end
//	reader.go   frameReader: pooled buffer, LENGTH checked first       reading goroutine
//	            (a NOTIFY above it from 3.1.0: oversize.go), header
//	            parsed (frame.go), read deadlines
//	sched.go    handle: slots taken (limiter), handler run inline      reading goroutine, or
//	            or dispatched; the rescue of a slow inline handler     one per frame
//	notify.go   the Request indexed, the Handler called (a panic       the handler's
//	            recovered); for the simple API, decode.go builds
//	            the messages; stats_messages.go counts per name
//	actions.go  ActionWriter appends the actions into the ACK          the handler's
//	writer.go   the ACKs of one read leave in one write before the     the first writer; the
//	            next blocking read; concurrent writes are combined     others' join its next
//	engine.go   async: an ACK whose connection is gone goes to         the engine's pump
//	            another connection of its engine
//
// The Client (client.go) reads with the same frameReader and builds its
// frames with the same builders. Around the engine: config.go (the
// Agent's defaults), run.go and listen.go (Run, and the addresses Listen
// takes), router.go, bind.go (arguments into a struct), headers.go
// (hdrs_bin), stats.go and health.go (Stats, probes), ratelog.go (failure
// logs at a bounded rate).
//
// # Errors seen by HAProxy
//
// SPOP has no error status per frame. When a handler returns an error or
// panics, the agent answers at once with the variable txn.<prefix>.error
// (Agent.ErrorVar) set to true, and logs and counts the error. An action
// HAProxy would drop silently (a bad name, a value SPOP cannot carry, an
// ACK over max-frame-size) is left out, logged and counted, and the same
// variable is set beside the actions that went, so that a rule can fail
// closed; room for it is kept in every ACK.
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

	// MaxConns limits the connections served at once, idle ones included
	// (HAProxy 3.1+ opens one per event it processes at once and keeps them
	// in its pool; 2.6 and 3.0 a few per thread and engine). Beyond it, new
	// connections wait in the listen backlog until one ends. Zero means
	// DefaultMaxConns; a negative value means no limit.
	MaxConns int

	// MaxBufferBytes limits the bytes held at once, in all connections, by
	// read buffers (32 KiB for HAProxy's default frames, held only while a
	// frame is read or handled), gathered ACKs, copies of frames for
	// handlers in goroutines of their own and the simple API's decoded
	// messages. At the bound nothing is refused: a connection with bytes to
	// read waits before reading them (TCP holds HAProxy back), within the
	// frame's ReadTimeout; a frame runs inline rather than be copied; a
	// decoding waits for another. Zero means DefaultMaxBufferBytes.
	MaxBufferBytes int

	// MaxInFlight limits the NOTIFY frames being handled at once in the
	// whole agent; when it is reached, connections stop reading until a
	// handler returns. Zero means DefaultMaxInFlight.
	MaxInFlight int

	// MaxInFlightPerConn limits the NOTIFY frames being handled at once on
	// one connection (HAProxy pipelines at most 20 by default). Zero means
	// DefaultMaxInFlightPerConn.
	MaxInFlightPerConn int

	// MaxNotifyMessages and MaxNotifyArgs bound what one NOTIFY may cost
	// the simple API (MessageHandler) once decoded: a Message with its map
	// is some 75 bytes, an argument some 80 beyond its value, so that a
	// NOTIFY of 1 MiB of empty messages would decode to 37 MiB; within the
	// defaults, the decoded messages cost at most the frame's bytes and
	// some 0.35 MiB (counted in MaxBufferBytes while the handler runs). A
	// NOTIFY with more messages, or more arguments in all, is not decoded
	// nor handed to the handler: it is answered at once with the error
	// variable (see ErrorVar), as a failing handler is, counted in
	// Stats.NotifyRefused and logged (rate-limited). HAProxy sends one
	// message per spoe-message of the event or group, each with the
	// arguments its configuration lists (255 at most). The zero-copy Handler
	// reads the frame in place and is not bound by them. Zero means
	// DefaultMaxNotifyMessages and DefaultMaxNotifyArgs.
	MaxNotifyMessages int
	MaxNotifyArgs     int

	// MaxEngines limits the HAProxy engines (engine-ids of connections
	// that negotiated async, HAProxy 2.6 and 3.0) the agent keeps track
	// of, connected or lingering with ACKs still due. A connection whose
	// engine-id would be one too many is served without async: HAProxy
	// then expects its ACKs on that connection only, as with pipelining,
	// and nothing is refused. HAProxy 2.6 has one engine per SPOE filter
	// and thread, new at each reload. Zero means DefaultMaxEngines.
	MaxEngines int

	// MaxReassemblyBytes limits the bytes that the fragmented NOTIFYs
	// being joined hold together in the agent (HAProxy 2.6 and 3.0 split a
	// NOTIFY bigger than max-frame-size in fragments; one is at most 1 MiB
	// and must be whole within ReadTimeout of its first fragment). A
	// fragment that would take more is not kept: its NOTIFY is answered
	// with an aborting ACK, HAProxy fails that event (error 4) and the
	// connection goes on, as with a NOTIFY above 1 MiB. Zero means
	// DefaultMaxReassemblyBytes.
	MaxReassemblyBytes int

	// ReadTimeout bounds the time from accepting a connection to a complete
	// HAPROXY-HELLO, and from the first byte of a frame to its last. On
	// expiry after the handshake the agent sends AGENT-DISCONNECT "a timeout
	// occurred" and closes; during the handshake it just closes. Zero means
	// DefaultReadTimeout.
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

	// MaxACKBacklog limits the bytes of ACKs waiting on one connection
	// while a write to it blocks (HAProxy, or a peer, not reading), and
	// MaxACKBacklogTotal those of every connection together, waiting or
	// being written after a wait. When either is reached, handlers that
	// finish on that connection wait to hand their ACK over, keeping their
	// slots (MaxInFlightPerConn), and the connection stops reading: TCP
	// holds the peer back until it reads, or WriteTimeout closes the
	// connection. A connection takes one run of ACKs (the ACKs of one
	// read, or one handler's) whatever its size when none wait, so it
	// holds at most max(MaxACKBacklog, one run), and as much again being
	// written. HAProxy reads its ACKs as they come: neither bound delays
	// it. Zero means DefaultMaxACKBacklog and DefaultMaxACKBacklogTotal.
	MaxACKBacklog      int
	MaxACKBacklogTotal int

	// ErrorVar is the name of the transaction variable the agent sets to
	// true (txn.<prefix>.<ErrorVar>) in place of the handler's actions when
	// the handler fails, and beside them when an action was left out of the
	// ACK (invalid name or value, or too big for the negotiated
	// max-frame-size: the room this variable takes is kept free in every
	// ACK, so it always fits). Zero means DefaultErrorVar, which is the
	// name to give HAProxy's own "option set-on-error" too, so that one
	// variable tells every failure: "-" turns it off.
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

	engines      engines
	buffers      bufferBudget     // MaxBufferBytes
	reassemblies reassemblyBudget // MaxReassemblyBytes
	backlog      backlogBudget    // MaxACKBacklogTotal
	stats        stats
	logs         logLimiter // rate of the handler failure logs

	sched scheduler // handler slots and scheduling policy (sched.go)

	answers answerSizes // what decides pipelining with HAProxy 3.1+ (hello.go)

	// keepPipelining answers "pipelining" to HAProxy 3.1+ always, with no
	// cap on the ACKs (see conn.pipelining); set by tests only, which show
	// HAProxy's stall with it. noPipelining never answers it (tests only:
	// what the pipelining rule saves).
	keepPipelining bool
	noPipelining   bool
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
		a.sched.slots.init(a.maxInFlight())
		a.reassemblies.max = int64(a.maxReassemblyBytes())
		a.backlog.max = int64(a.maxACKBacklogTotal())
		a.buffers.max = int64(a.maxBufferBytes())
		if n := a.maxConns(); n > 0 {
			a.connSlots = make(chan struct{}, n)
		}
	})
}

func (a *Agent) baseContext() context.Context { a.init(); return a.base }

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
	l = &closeOnce{Listener: l} // Serve and Shutdown may both close it
	if !a.trackListener(&l, true) {
		l.Close()
		return ErrAgentClosed
	}
	defer a.trackListener(&l, false)
	defer l.Close()
	cfg := a.config()
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
		c := newConn(a, cfg, nc)
		c.connSlot = a.connSlots != nil
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

// Shutdown stops the agent gracefully. At once, it closes the listeners
// and stops reading on every connection: whatever a peer sends from then
// on is not handled. Each connection then handles the frames HAProxy sent
// before it could learn of the shutdown, bounded: those whole in the
// agent's read buffer, and, on Linux, those whole within the bytes the
// socket had received by the call (elsewhere on unix, within 64 KiB of
// them; over TLS and on other systems, none). It lets the handlers running on it
// finish and writes their ACKs, then sends AGENT-DISCONNECT with status 0
// "normal" after them, waits for HAProxy to close (at most 1 s, and 1 MiB
// of what the peer still sends, discarded), and closes. The NOTIFYs left
// unhandled get no ACK: HAProxy sees them fail as the connection closes.
//
// It returns nil once every connection is closed and every handler has
// returned, or ctx.Err() if ctx ends first; Close then ends what is left.
// A peer that does not read its ACKs can hold a connection up to
// WriteTimeout. Serve returns ErrAgentClosed at once.
func (a *Agent) Shutdown(ctx context.Context) error {
	conns, lerr := a.closeListeners()
	for _, c := range conns {
		c.rd.stop() // each ends once its running handlers are done
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
	// Sockets first: a handler that returns as its context is cancelled
	// finds its connection closed, and its ACK is dropped as documented.
	for _, c := range conns {
		c.abort()
	}
	a.cancel()
	a.sched.slots.close()
	return err
}
