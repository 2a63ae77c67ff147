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

// lingerTimeout bounds how long a closing connection waits for HAProxy to
// close after the agent's last frame (a close with unread data would reset
// the connection and could lose that frame).
const lingerTimeout = time.Second

// lingerMaxBytes: a closing connection that discarded that much while it
// lingers stops waiting for the peer to close as soon as the peer
// acknowledged every byte the agent sent (on Linux): HAProxy stops sending
// at the agent's last frame, with at most some 20 NOTIFYs of
// max-frame-size in flight by then; a peer that sends more is not
// listening.
const lingerMaxBytes = 1 << 20

// maxHelloFrame bounds frames before the handshake: a HAPROXY-HELLO is
// about 130 bytes.
const maxHelloFrame = 16 << 10

// Ends of a connection that are not errors to report.
var (
	errHealthcheck = errors.New("spoe: health check answered")   // quiet end
	errPeerClosed  = errors.New("spoe: HAProxy sent DISCONNECT") // already answered
)

// conn is one SPOP connection from HAProxy, from its handshake to its end:
// this file is its life cycle. Its parts own their state, each in its own
// file, and say there who may touch it:
//
//   - rd, the frame reader (reader.go), and the fields marked "reading
//     role" below belong to the goroutine holding the connection's reading
//     role: the one serve started, until a rescue moves it (sched.go);
//   - wr, the frame writer (writer.go): any goroutine, through write;
//   - slots and watch, the handler slots and rescue state (sched.go);
//   - the fields under lifeMu: any goroutine, with lifeMu held.
type conn struct {
	agent *Agent     // for its life cycle: goroutines, engines, tracking
	cfg   *config    // the Agent's configuration, resolved at Serve
	stats *stats     // the agent's counters
	sched *scheduler // the agent's scheduling policy and slots
	nc    net.Conn
	refs  atomic.Int32 // the reading role and each handler running out of it

	rd    frameReader
	wr    frameWriter
	slots limiter // MaxInFlightPerConn
	watch inlineWatch

	// Set by the handshake in the reading role, read-only after (handlers
	// started after it read them).
	maxFrame        int
	haproxyMaxFrame uint64 // HAProxy's own, announced in its HELLO (see oversized)
	muxEngine       bool   // HAProxy 3.1+ (see conn.pipelining, goodbye)
	caps            capabilities
	engineID        string
	handshaken      bool
	helloSent       bool

	// The reading role's.
	frag    reassembly
	ex      *exchange   // the exchange of the next inline handler
	out     *buffer     // ACKs gathered for the next write
	outPaid int         // bytes of the budget held for out
	calls   uint64      // handler calls, for sampling their latency
	recent  recentStats // the counters of the message names seen last

	lifeMu sync.Mutex
	closed bool
	live   bool               // counted in Agent.answers.live (conn.pipelining)
	engine *engine            // async connections only
	ctx    context.Context    // parent of request contexts
	cancel context.CancelFunc //

	once     sync.Once // closeSocket's
	connSlot bool      // it holds one of the Agent's MaxConns slots
}

func newConn(a *Agent, cfg *config, nc net.Conn) *conn {
	c := &conn{agent: a, cfg: cfg, stats: &a.stats, sched: &a.sched, nc: nc, maxFrame: maxHelloFrame}
	c.refs.Store(1)
	c.rd.init(nc, maxHelloFrame)
	c.rd.budget = &a.buffers
	c.wr.init(nc, cfg.writeTimeout, &a.stats, cfg.maxBacklog, &a.backlog)
	c.slots.init(cfg.maxPerConn)
	return c
}

// serve runs the connection from its handshake to its end.
func (c *conn) serve() {
	defer c.agent.goroutines.Done()
	c.rd.stopMu.Lock()
	c.rd.setDeadlineLocked(deadlineFrame, c.cfg.readTimeout)
	c.rd.stopMu.Unlock()
	err := c.handshake()
	if err == nil {
		err = c.loop()
	}
	c.end(err)
}

// handshake reads the HAPROXY-HELLO and answers it.
func (c *conn) handshake() error {
	var f frame
	if err := c.nextFrame(&f); err != nil {
		return err
	}
	switch {
	case f.typ != frameHAProxyHello:
		return errNotHello
	case !f.fin():
		return errFragmented
	case f.streamID != 0 || f.frameID != 0:
		return errBadIDs
	}
	h, err := parseHAProxyHello(f.payload)
	if err != nil {
		return err
	}
	c.stats.framesIn[frameStat(f.typ)].Add(1)
	c.maxFrame = helloFrameSize(h, c.cfg.maxFrameSize)
	c.rd.maxFrame = c.maxFrame
	c.haproxyMaxFrame = h.maxFrameSize
	c.muxEngine = muxEngine(h.caps)
	pipeline := c.cfg.keepPipelining
	if c.muxEngine && !pipeline && !c.cfg.noPipelining {
		if pipeline = c.pipelining(h); pipeline {
			c.wr.window = c.newACKWindow(h.maxFrameSize)
		}
	}
	c.caps = agentCaps(h.caps, pipeline)
	if c.caps&capAsync != 0 && !c.agent.engines.admit(h.engineID) {
		c.caps &^= capAsync // MaxEngines reached
	}
	c.engineID = h.engineID
	if err := c.write(appendHello(nil, frameAgentHello, c.maxFrame, c.caps, ""), false); err != nil {
		return err
	}
	c.helloSent = true
	if h.healthcheck {
		c.stats.healthchecks.Add(1)
		return errHealthcheck
	}
	c.lifeMu.Lock()
	defer c.lifeMu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	c.ctx, c.cancel = context.WithCancel(c.agent.base)
	if c.caps&capAsync != 0 && h.engineID != "" {
		// Only now that the AGENT-HELLO is out: the engine may write held
		// ACKs on this connection as soon as it joins.
		c.agent.engines.join(h.engineID, c)
	}
	c.handshaken = true
	return nil
}

// requestContext is the parent of the contexts of this connection's
// requests: with async, the engine's, as their ACKs may leave on another
// of its connections.
func (c *conn) requestContext() context.Context {
	if c.engine != nil {
		return c.engine.context()
	}
	return c.ctx
}

// loop handles frames until the connection ends or the role moves on.
func (c *conn) loop() error {
	var f frame
	for {
		if err := c.nextFrame(&f); err != nil {
			return err
		}
		if err := c.onFrame(&f); err != nil {
			return err
		}
	}
}

// nextFrame decodes into f the next whole frame, reading as needed.
// Before it blocks, it stops the rescue timer, writes the ACKs gathered so
// far and, with nothing unread, gives idle buffers back.
func (c *conn) nextFrame(f *frame) error {
	for {
		ok, err := c.rd.buffered(f)
		if err != nil && errors.Is(err, errFrameTooBig) {
			var skip bool
			if skip, err = c.oversized(err); skip {
				continue
			}
		}
		if ok || err != nil {
			return err
		}
		c.disarm()
		if err := c.flush(); err != nil {
			return err
		}
		idle := c.rd.empty()
		if idle {
			c.idle()
		}
		if err := c.rd.armDeadline(idle && c.handshaken, c.cfg.readTimeout, c.cfg.idleTimeout); err != nil {
			return err
		}
		if c.frag.pending() {
			if err := c.rd.capDeadline(c.frag.deadline); err != nil {
				return err
			}
		}
		if err := c.rd.fill(); err != nil {
			if isTimeout(err) && !c.rd.stopped.Load() && c.reassemblyExpired() {
				// Only the unfinished NOTIFY is given up: the
				// connection goes on, its next read with a deadline
				// of its own.
				c.rd.resetDeadline()
				continue
			}
			return err
		}
	}
}

// idle gives back the buffers the reading role holds between frames (the
// read buffer is given back by the reader itself).
func (c *conn) idle() {
	c.putOut()
	if c.ex != nil {
		putExchange(c.ex)
		c.ex = nil
	}
}

// onFrame handles one frame after the handshake, by type. A non-nil error
// ends the connection (errPeerClosed after HAProxy's DISCONNECT) or, with
// errLostRole, this goroutine's part in it.
func (c *conn) onFrame(f *frame) error {
	c.stats.framesIn[frameStat(f.typ)].Add(1)
	switch f.typ {
	case frameNotify:
		return c.onNotify(f)
	case frameUnset:
		return c.onUnset(f)
	case frameHAProxyDisconnect:
		return c.onDisconnect(f)
	case frameHAProxyHello:
		return errSecondHello
	case frameAgentHello, frameAgentDisconnect, frameAck:
		return errAgentFrame
	}
	return nil // SPOP says to ignore frame types it does not know
}

func (c *conn) onNotify(f *frame) error {
	if c.frag.pending() {
		return errInterlaced
	}
	if !f.fin() {
		if c.caps&capFragmentation == 0 {
			return errFragmented
		}
		if f.abort() {
			return nil
		}
		c.startReassembly(f)
		return nil
	}
	if f.abort() {
		return nil
	}
	return c.handle(f.streamID, f.frameID, f.payload)
}

// drain handles the frames HAProxy sent before it could learn of the
// shutdown: those already in the read buffer, and at most the bytes the
// socket held when the reader was stopped, however much the peer sends
// since. A frame that is not whole by then is left.
func (c *conn) drain() error {
	for {
		var f frame
		for {
			ok, err := c.rd.buffered(&f)
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			if err := c.onFrame(&f); err != nil {
				return err
			}
		}
		// The budget is the reading role's: a rescue during the drain
		// hands over what is left of it.
		if c.rd.stopUnread <= 0 {
			return nil
		}
		n := c.rd.fillNow(c.rd.stopUnread)
		if n == 0 {
			return nil
		}
		c.rd.stopUnread -= n
	}
}

// disconnect sends AGENT-DISCONNECT after everything already queued, as
// the connection's last frame, with the requests whose ACKs go with it
// counted first (see recentStats).
func (c *conn) disconnect(s Status, msg string) {
	c.recent.flush()
	if err := c.write(appendDisconnect(c.outRoom(maxDisconnectFrame), frameAgentDisconnect, s, msg), true); err == nil {
		c.stats.countDisconnect(s, false)
	}
	c.out.b = c.out.b[:0]
}

// ending is how a connection's reading role ended, from the error its loop
// returned.
type ending uint8

const (
	endLostRole    ending = iota // its inline handler was rescued: nothing to do
	endWriteFailed               // handled where the write failed
	endPeerGone                  // EOF, reset: HAProxy is gone
	endDraining                  // Agent.Shutdown
	endQuiet                     // health check answered, HAProxy's DISCONNECT answered
	endTimeout                   // ReadTimeout or IdleTimeout
	endProtocol                  // a protocol error: answered with its status
)

func (c *conn) ending(err error) ending {
	var we *writeError
	switch {
	case errors.Is(err, errLostRole):
		return endLostRole
	case errors.As(err, &we) || errors.Is(err, errWriteClosed):
		return endWriteFailed
	case isNormalEnd(err):
		return endPeerGone
	case errors.Is(err, errDraining) || c.rd.stopped.Load() && isTimeout(err):
		return endDraining
	case errors.Is(err, errHealthcheck) || errors.Is(err, errPeerClosed):
		return endQuiet
	case isTimeout(err):
		return endTimeout
	}
	return endProtocol
}

// end closes the connection after its loop returned err.
func (c *conn) end(err error) {
	how := c.ending(err)
	if how == endLostRole {
		return
	}
	c.disarm()
	c.recent.flush()
	switch how {
	case endWriteFailed:
		// Logged and handled by write; what was gathered since goes to
		// the engine.
		c.rerouteOut()
	case endPeerGone:
		c.rerouteOut()
		c.log().WithError(err).Debug("spoe: connection closed by HAProxy")
	case endDraining:
		// Shutdown: handle what HAProxy already sent, let the running
		// handlers finish and their ACKs out, then say goodbye.
		if c.handshaken { // before it, no NOTIFY may be handled
			derr := c.drain()
			if errors.Is(derr, errLostRole) {
				return // a handler was rescued: its rescuer goes on draining
			}
			if derr != nil && !errors.Is(derr, errPeerClosed) {
				c.log().WithError(derr).Debug("spoe: while draining")
			}
			c.disarm() // inline handlers of the drain armed it again
		}
		_ = c.flush()
		c.slots.waitBelow(1)
		if c.helloSent {
			c.goodbye()
		}
		c.linger()
	case endQuiet:
		c.linger()
	case endTimeout:
		_ = c.flush()
		c.log().Info("spoe: read timeout, closing the connection")
		if c.helloSent {
			c.disconnect(StatusTimeout, StatusTimeout.String())
			c.linger()
		}
	case endProtocol:
		_ = c.flush()
		s := statusOf(err)
		c.stats.protocolErrors.Add(1)
		c.log().WithError(err).WithField("status", uint32(s)).Warn("spoe: protocol error, closing the connection")
		c.disconnect(s, s.String())
		c.linger()
	}
	c.endReassembly()
	c.closeSocket()
	c.unref()
}

// linger waits, briefly, for HAProxy to close after the agent's last frame,
// discarding what it still sends (see lingerTimeout and lingerMaxBytes),
// so that closing with unread data does not reset the connection before
// HAProxy read that frame.
func (c *conn) linger() {
	c.wr.closeWrite()
	_ = c.nc.SetReadDeadline(time.Now().Add(lingerTimeout))
	var buf [4096]byte
	discarded := 0
	for {
		n, err := c.nc.Read(buf[:])
		discarded += n
		if err != nil || discarded >= lingerMaxBytes && c.rd.sentAndAcked() {
			break
		}
	}
	if discarded > 0 {
		c.log().WithField("bytes", discarded).Debug("spoe: discarded what HAProxy sent after the agent's last frame")
	}
}

// abort closes the connection at once (Close).
func (c *conn) abort() {
	c.rd.stop()
	c.closeSocket()
}

// closeSocket closes the socket and leaves the engine: the end of the
// connection for everyone but the handlers still running on it.
func (c *conn) closeSocket() {
	c.once.Do(func() {
		c.wr.close()
		c.nc.Close()
		c.agent.connClosed(c.connSlot)
		c.lifeMu.Lock()
		c.closed = true
		e, cancel := c.engine, c.cancel
		live := c.live
		c.lifeMu.Unlock()
		if live {
			c.agent.answers.live.Add(-1)
		}
		if e != nil {
			e.leave(c)
		}
		if cancel != nil {
			cancel()
		}
		c.slots.close()
	})
}

// connClosed accounts for a closed socket: it no longer counts as open nor
// against MaxConns (slot: it took one), even while handlers that ran on it
// finish.
func (a *Agent) connClosed(slot bool) {
	a.stats.connsOpen.Add(-1)
	if slot {
		<-a.connSlots
	}
}

// unref drops one reference; the last one forgets the connection.
func (c *conn) unref() {
	if c.refs.Add(-1) != 0 {
		return
	}
	c.closeSocket()
	c.rd.release()
	c.idle()
	if c.watch.timer != nil {
		c.disarm()
	}
	c.agent.trackConn(c, false)
}

func (c *conn) log() logrus.FieldLogger {
	return c.cfg.logger.WithField("remote", c.nc.RemoteAddr().String())
}
