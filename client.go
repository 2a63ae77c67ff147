package spoe

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/pkg/errors"
)

// ClientConfig configures a Client's HELLO. Its zero value offers what
// HAProxy 3.x offers: max-frame-size 16380 and "pipelining".
type ClientConfig struct {
	// MaxFrameSize is the max-frame-size offered; zero means 16380,
	// HAProxy's default.
	MaxFrameSize int
	// NoPipelining leaves "pipelining" out of the HELLO: the client then
	// sends one NOTIFY at a time, as HAProxy does on a sync connection. A
	// Notify whose context ends while its NOTIFY is out returns at once,
	// but the next NOTIFY waits for that one's ACK all the same.
	NoPipelining bool
	// Async adds "async" to the HELLO, as HAProxy 2.6 does.
	Async bool
	// EngineID is the engine-id sent; empty means a random UUID.
	EngineID string
	// FragmentSize, when positive and the agent announced
	// "fragmentation", splits every NOTIFY payload longer than it into
	// fragments of at most that many bytes (a NOTIFY then UNSET frames), as
	// HAProxy 2.6 does. It is for testing agents.
	FragmentSize int
}

// ClientMessage is a message a Client sends: a name and arguments in order.
type ClientMessage struct {
	Name string
	Args []Arg
}

// Arg is a named argument of a ClientMessage. Its Value follows the rules
// of ActionSetVar.Value (HAProxy itself sends integers as int64).
type Arg struct {
	Name  string
	Value interface{}
}

// DisconnectError is how a Client reports the agent's AGENT-DISCONNECT.
type DisconnectError struct {
	Status  Status
	Message string
}

// Error says which status and message the agent disconnected with.
func (e *DisconnectError) Error() string {
	return fmt.Sprintf("spoe: agent disconnected: status %d (%s): %q", uint32(e.Status), e.Status, e.Message)
}

// ErrAborted is returned by Client.Notify when the agent answered with an
// aborting ACK.
var ErrAborted = errors.New("spoe: agent aborted the NOTIFY")

// ErrClientClosed is returned by Client.Notify after Close or once the
// connection is lost.
var ErrClientClosed = errors.New("spoe: client closed")

// Client is HAProxy's side of SPOP: it connects to an agent, says HELLO
// and sends NOTIFY frames, with several in flight when pipelining was
// negotiated. It lets tests and tools talk to an agent without HAProxy;
// it is safe for concurrent use.
type Client struct {
	nc       net.Conn
	rd       frameReader // the handshake's, then readLoop's
	cfg      ClientConfig
	maxFrame int
	caps     capabilities
	engineID string
	sync     chan struct{} // one NOTIFY at a time without pipelining

	wmu sync.Mutex
	buf []byte

	mu      sync.Mutex
	nextSID uint64
	pending map[uint64]*clientCall
	err     error // why the client stopped
	closing bool  // Close was called: the agent's DISCONNECT is expected
	done    chan struct{}
}

type clientCall struct {
	ack       chan struct{}
	payload   []byte
	aborted   bool
	abandoned bool // given up on, keeping the turn (no pipelining): guarded by Client.mu
}

// Dial connects to the agent at address and completes the handshake.
func Dial(ctx context.Context, network, address string, cfg ClientConfig) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, errors.Wrap(err, "spoe: dial")
	}
	c, err := NewClient(ctx, nc, cfg)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// NewClient completes the handshake over nc and returns a client using it.
func NewClient(ctx context.Context, nc net.Conn, cfg ClientConfig) (*Client, error) {
	c := &Client{nc: nc, cfg: cfg, pending: make(map[uint64]*clientCall), done: make(chan struct{})}
	if c.cfg.MaxFrameSize <= 0 {
		c.cfg.MaxFrameSize = 16380
	}
	c.engineID = cfg.EngineID
	if c.engineID == "" {
		c.engineID = newUUID()
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	if err := c.hello(); err != nil {
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	if c.caps&capPipelining == 0 {
		c.sync = make(chan struct{}, 1)
	}
	go c.readLoop()
	return c, nil
}

func (c *Client) hello() error {
	var caps capabilities
	if !c.cfg.NoPipelining {
		caps |= capPipelining
	}
	if c.cfg.Async {
		caps |= capAsync
	}
	b := appendHello(nil, frameHAProxyHello, c.cfg.MaxFrameSize, caps, c.engineID)
	if _, err := c.nc.Write(b); err != nil {
		return errors.Wrap(err, "spoe: HELLO")
	}
	c.rd.init(c.nc, c.cfg.MaxFrameSize)
	f, err := c.rd.next()
	if err != nil {
		return errors.Wrap(err, "spoe: AGENT-HELLO")
	}
	if f.typ == frameAgentDisconnect {
		return disconnectError(f.payload)
	}
	if f.typ != frameAgentHello {
		return errors.Errorf("spoe: %s instead of AGENT-HELLO", f.typ)
	}
	h, err := parseAgentHello(f.payload)
	if err != nil {
		return err
	}
	if h.version != nil && !supportsVersion20(h.version) {
		return errors.Errorf("spoe: agent version %q", h.version)
	}
	switch {
	case !h.hasFrameSize:
		c.maxFrame = c.cfg.MaxFrameSize
	case h.maxFrameSize < MinFrameSize || h.maxFrameSize > uint64(c.cfg.MaxFrameSize):
		return errors.Errorf("spoe: agent max-frame-size %d", h.maxFrameSize)
	default:
		c.maxFrame = int(h.maxFrameSize)
	}
	c.caps = h.caps & (caps | capFragmentation)
	c.rd.maxFrame = c.maxFrame
	return nil
}

func disconnectError(payload []byte) error {
	d, err := parseDisconnect(payload)
	if err != nil {
		return err
	}
	return &DisconnectError{Status: d.status, Message: d.message}
}

// MaxFrameSize returns the max-frame-size the agent answered.
func (c *Client) MaxFrameSize() int { return c.maxFrame }

// Capabilities returns the capabilities both sides announced, as SPOP's
// comma-separated list ("fragmentation" if the agent announced it).
func (c *Client) Capabilities() string { return c.caps.String() }

// EngineID returns the engine-id the client sent.
func (c *Client) EngineID() string { return c.engineID }

// Notify sends the messages in one NOTIFY frame and returns the actions of
// the agent's ACK, with values decoded as Message's arguments are. A
// set-var of NULL comes back as an ActionSetVar with a nil Value.
func (c *Client) Notify(ctx context.Context, messages ...ClientMessage) ([]Action, error) {
	payload, err := appendMessages(nil, messages)
	if err != nil {
		return nil, err
	}
	ack, err := c.NotifyRaw(ctx, payload)
	if err != nil {
		return nil, err
	}
	return decodeActions(ack)
}

// NotifyRaw sends payload, an encoded LIST-OF-MESSAGES, in one NOTIFY (or
// in fragments, see ClientConfig.FragmentSize) and returns the payload of
// the agent's ACK: its LIST-OF-ACTIONS.
func (c *Client) NotifyRaw(ctx context.Context, payload []byte) ([]byte, error) {
	if c.sync != nil {
		select {
		case c.sync <- struct{}{}:
			// The turn is given back when the ACK came, or the client
			// stopped, by whoever sees it first: see abandon.
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.done:
			return nil, c.stopErr()
		}
	}
	call := &clientCall{ack: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		c.endTurn()
		return nil, c.err
	}
	c.nextSID++
	sid := c.nextSID
	c.pending[sid] = call
	c.mu.Unlock()

	if err := c.sendNotify(sid, payload); err != nil {
		c.forget(sid)
		c.endTurn()
		return nil, err
	}
	select {
	case <-call.ack:
		c.endTurn()
		if call.aborted {
			return nil, ErrAborted
		}
		return call.payload, nil
	case <-ctx.Done():
		if !c.abandon(sid) {
			c.endTurn() // the ACK came meanwhile
		}
		return nil, ctx.Err()
	case <-c.done:
		c.endTurn()
		return nil, c.stopErr()
	}
}

// endTurn lets the next NOTIFY go, without pipelining.
func (c *Client) endTurn() {
	if c.sync != nil {
		<-c.sync
	}
}

// abandon gives up on the call of stream sid, whose NOTIFY is out. It
// reports false if its ACK was taken meanwhile. Without pipelining, the
// call keeps the turn: readLoop ends it when the ACK comes.
func (c *Client) abandon(sid uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	call := c.pending[sid]
	if call == nil {
		return false
	}
	if c.sync != nil {
		call.abandoned = true
	} else {
		delete(c.pending, sid)
	}
	return true
}

func (c *Client) forget(sid uint64) {
	c.mu.Lock()
	delete(c.pending, sid)
	c.mu.Unlock()
}

func (c *Client) stopErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// sendNotify writes the NOTIFY of stream sid (frame-id 1), fragmented if
// configured so, with one write.
func (c *Client) sendNotify(sid uint64, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b := c.buf[:0]
	frag := c.cfg.FragmentSize
	if frag <= 0 || c.caps&capFragmentation == 0 || len(payload) <= frag {
		b = appendFrame(b, frameNotify, flagFin, sid, 1, payload)
		if len(b)-lengthSize > c.maxFrame {
			return errors.Wrapf(ErrACKTooBig, "NOTIFY of %d bytes above max-frame-size %d", len(b)-lengthSize, c.maxFrame)
		}
	} else {
		typ := frameNotify
		for len(payload) > 0 {
			n := frag
			if n > len(payload) {
				n = len(payload)
			}
			var flags uint32
			if n == len(payload) {
				flags = flagFin
			}
			b = appendFrame(b, typ, flags, sid, 1, payload[:n])
			payload = payload[n:]
			typ = frameUnset
		}
	}
	c.buf = b
	_, err := c.nc.Write(b)
	return err
}

// readLoop reads the agent's frames and hands ACKs to their callers.
func (c *Client) readLoop() {
	var err error
	for {
		var f frame
		if f, err = c.rd.next(); err != nil {
			break
		}
		if f.typ == frameAgentDisconnect {
			err = disconnectError(f.payload)
			break
		}
		if f.typ != frameAck {
			err = errors.Errorf("spoe: unexpected %s frame from the agent", f.typ)
			break
		}
		c.mu.Lock()
		call := c.pending[f.streamID]
		delete(c.pending, f.streamID)
		c.mu.Unlock()
		if call == nil {
			continue // a call given up on, or an ACK for nothing: ignored
		}
		if call.abandoned {
			c.endTurn()
			continue
		}
		call.payload = append([]byte(nil), f.payload...)
		call.aborted = f.abort()
		close(call.ack)
	}
	c.rd.release()
	c.stop(err)
}

func (c *Client) stop(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	var de *DisconnectError
	if err == nil || isNormalEnd(err) || c.closing && errors.As(err, &de) && de.Status == StatusNormal {
		err = ErrClientClosed
	}
	c.err = err
	close(c.done)
	c.nc.Close()
}

// Err returns why the client stopped, or nil while it works.
func (c *Client) Err() error { return c.stopErr() }

// Done returns a channel closed when the client stops: after Close, or
// when the agent closed or disconnected (Err then says why).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close sends HAPROXY-DISCONNECT "normal", waits briefly for the agent's
// AGENT-DISCONNECT, and closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.wmu.Lock()
	_, werr := c.nc.Write(appendDisconnect(nil, frameHAProxyDisconnect, StatusNormal, StatusNormal.String()))
	c.wmu.Unlock()
	if werr == nil {
		select {
		case <-c.done:
		case <-time.After(time.Second):
		}
	}
	c.stop(ErrClientClosed)
	if err := c.stopErr(); !errors.Is(err, ErrClientClosed) {
		return err
	}
	return nil
}

// appendMessages encodes messages as a LIST-OF-MESSAGES.
func appendMessages(b []byte, messages []ClientMessage) ([]byte, error) {
	for _, m := range messages {
		if len(m.Args) > 255 {
			return nil, errors.Errorf("spoe: message %q has %d args, SPOP allows 255", m.Name, len(m.Args))
		}
		b = appendName(b, m.Name)
		b = append(b, byte(len(m.Args)))
		for _, a := range m.Args {
			b = appendName(b, a.Name)
			var err error
			if b, err = appendAnyValue(b, a.Value); err != nil {
				return nil, errors.Wrapf(err, "message %q arg %q", m.Name, a.Name)
			}
		}
	}
	return b, nil
}

// decodeActions decodes an ACK's LIST-OF-ACTIONS.
func decodeActions(p []byte) ([]Action, error) {
	var actions []Action
	for off := 0; off < len(p); {
		if p[off] == actionNoop {
			return actions, nil // "no actions" (HAProxy stops there too)
		}
		if len(p)-off < 3 {
			return actions, errTruncated
		}
		typ, nargs, scope := p[off], p[off+1], VarScope(p[off+2])
		off += 3
		name, next, err := readBytes(p, off)
		if err != nil {
			return actions, err
		}
		off = next
		switch {
		case typ == actionSetVar && nargs == 3:
			v, next, err := readValue(p, off)
			if err != nil {
				return actions, err
			}
			off = next
			actions = append(actions, ActionSetVar{Name: string(name), Scope: scope, Value: v.Interface()})
		case typ == actionUnsetVar && nargs == 2:
			actions = append(actions, ActionUnsetVar{Name: string(name), Scope: scope})
		default:
			return actions, errors.Errorf("spoe: action %d with %d args", typ, nargs)
		}
	}
	return actions, nil
}

// newUUID returns a random (version 4) UUID, as HAProxy's engine-ids are.
func newUUID() string {
	var u [16]byte
	_, _ = rand.Read(u[:])
	u[6] = u[6]&0x0F | 0x40
	u[8] = u[8]&0x3F | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
