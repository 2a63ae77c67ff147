package spoe

// TestSoakChurn: NOTIFYs from several HAProxy engines over connections that
// the peer keeps closing and reopening, pipelined, once without and once
// with async, checking every ACK against the request it answers.
//
// The peer is written here (raw frames): soakEngines engine-ids, each with
// soakConnsPerEngine connections, each with up to soakWindow NOTIFYs in
// flight. Stream-ids are unique within an engine and, as HAProxy 2.6's
// uniq_id, restart at 0 in every engine (one starts just below 2^32 and
// wraps), so the same (stream-id, frame-id) is pending in several engines
// at once and an ACK delivered to the wrong engine hits a request that is
// not its own. Every NOTIFY carries a unique nonce, which the handler echoes
// with the engine-id, stream-id and frame-id it saw. One handler call in
// soakSlowOneIn sleeps 1-5 ms: it outlasts the inline budget and finishes
// detached, which is where ACKs cross connection ends.
//
// Connections end in three ways, one at a time per engine and only while
// another connection of the engine is up: a hard close (RST, SO_LINGER 0),
// a FIN the peer follows by reading until the agent closes, and HAProxy's
// DISCONNECT (status 0 or 2) answered by AGENT-DISCONNECT, after which the
// peer closes as HAProxy does. ACKs that arrive between the peer's
// DISCONNECT and the agent's answer are accepted and counted (HAProxy 2.6
// would ignore them: most crossed the DISCONNECT on the wire).
//
// The agent's accepted connections are wrapped (the wrapper keeps raw reads)
// to record which ACKs each Write handed to the kernel. That tells apart,
// for a connection the peer killed, the ACKs the agent wrote before it could
// know (lost with the connection, as with any TCP peer: counted, allowed)
// from ACKs it never wrote anywhere (lost: a failure). The handler notes
// which requests it saw, which tells the NOTIFYs a reset destroyed before
// the agent read them (counted, allowed).
//
// Rules:
//   - an ACK matches a pending request of its own engine (else misrouted),
//     with that request's nonce and ids, and is received once (else
//     duplicated);
//   - without async, an ACK arrives on its request's connection; requests
//     of a connection the peer closed are abandoned;
//   - with async, the request of a closed connection gets its ACK on a
//     sibling connection of its engine (unless the agent had written it on
//     the reset connection before the reset reached it), and no ACK is
//     written after the agent's own AGENT-DISCONNECT;
//   - once traffic stops and the agent has ended the connections the peer
//     closed, every request left is answered (lost otherwise);
//   - Rescues > 0; with async, ACKsRerouted > 0; without, none; no
//     protocol error counted, no warning or error logged;
//   - the live heap and the goroutines, sampled 30 times, do not grow from
//     the first third of the run to the last (checkSoakSamples), and once
//     the agent is closed the goroutines are back to what they were.
//
// TestSoakRepro* below are minimal reproducers of what the soak found.
//
// Size: SPOE_SOAK_NOTIFYS NOTIFYs per variant (default soakDefaultNotifys:
// about 5 s for both variants with -race on 2 cores, 25 s with the cores
// busy). Full size (about 6 min with -race on the 2-core machine):
//
//	SPOE_SOAK_NOTIFYS=1000000 go test -race -run TestSoakChurn -count=1 -timeout 60m -v .

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"runtime/metrics"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pkg/errors"
	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	soakEngines        = 4
	soakConnsPerEngine = 4
	soakWindow         = 16 // NOTIFYs in flight per connection (2.6's max-waiting-frames is 20)
	soakMaxBatch       = 4  // NOTIFYs written together
	soakSlowOneIn      = 50
	soakSamples        = 30
	soakTapRing        = 1024 // ACKs a tapped connection remembers
	soakDefaultNotifys = 50000
)

// How a connection ends.
const (
	soakCloseRST = iota
	soakCloseFIN
	soakCloseDisconnect
	soakCloseKinds
)

var soakCloseNames = [soakCloseKinds]string{"RST", "FIN", "DISCONNECT"}

func soakNotifys(t *testing.T) int {
	s := os.Getenv("SPOE_SOAK_NOTIFYS")
	if s == "" {
		return soakDefaultNotifys
	}
	n, err := strconv.Atoi(s)
	require.NoError(t, err, "SPOE_SOAK_NOTIFYS")
	require.GreaterOrEqual(t, n, 1000, "SPOE_SOAK_NOTIFYS")
	return n
}

func TestSoakChurn(t *testing.T) {
	n := soakNotifys(t)
	t.Run("pipelined", func(t *testing.T) { runSoak(t, n, false) })
	t.Run("async", func(t *testing.T) { runSoak(t, n, true) })
}

// soakHandler echoes the request's nonce, engine-id and ids, after sleeping
// for the "sleep" argument (microseconds) when it has one.
func soakHandler(calls *atomic.Int64, handled *soakHandled) Handler {
	return HandlerFunc(func(w *ActionWriter, r *Request) error {
		calls.Add(1)
		handled.mark(r.EngineID(), soakKey{r.StreamID(), r.FrameID()})
		msgs := r.Messages()
		if !msgs.Next() || !msgs.NameIs("soak") {
			return errors.New("no soak message")
		}
		var nonce []byte
		var sleep uint64
		for args := msgs.Args(); args.Next(); {
			switch {
			case args.NameIs("nonce"):
				nonce, _ = args.Value().Bytes()
			case args.NameIs("sleep"):
				sleep, _ = args.Value().Uint()
			}
		}
		if sleep > 0 {
			time.Sleep(time.Duration(sleep) * time.Microsecond) // the scenario: a slow handler
		}
		_ = w.SetStringBytes(VarScopeTransaction, "nonce", nonce)
		_ = w.SetString(VarScopeTransaction, "engine", r.EngineID())
		_ = w.SetUint(VarScopeTransaction, "sid", r.StreamID())
		_ = w.SetUint(VarScopeTransaction, "fid", r.FrameID())
		return w.Err()
	})
}

// soakHandled holds the requests whose handler started and whose fate the
// peer has not settled yet (a request killed with its connection before the
// agent read its NOTIFY never gets here), and the abandoned requests whose
// handler has not started yet: the handler of an abandoned request may
// still start after the peer closed its connection, from frames the agent
// had already read.
type soakHandled struct {
	engines   map[string]int // engine-id -> index, set before the traffic
	mu        sync.Mutex
	m         map[soakEngineKey]struct{}
	abandoned map[soakEngineKey]struct{}
}

func (h *soakHandled) mark(engineID string, key soakKey) {
	k := soakEngineKey{h.engines[engineID], key}
	h.mu.Lock()
	if _, ok := h.abandoned[k]; ok {
		delete(h.abandoned, k)
	} else {
		h.m[k] = struct{}{}
	}
	h.mu.Unlock()
}

// forget removes the request and reports whether its handler had started.
func (h *soakHandled) forget(engine int, key soakKey) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	k := soakEngineKey{engine, key}
	_, ok := h.m[k]
	delete(h.m, k)
	return ok
}

// abandon forgets a request whose handler may not have started yet.
func (h *soakHandled) abandon(engine int, key soakKey) {
	h.mu.Lock()
	defer h.mu.Unlock()
	k := soakEngineKey{engine, key}
	if _, ok := h.m[k]; ok {
		delete(h.m, k)
	} else {
		h.abandoned[k] = struct{}{}
	}
}

func (h *soakHandled) has(engine int, key soakKey) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.m[soakEngineKey{engine, key}]
	return ok
}

func (h *soakHandled) len() (handled, abandoned int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.m), len(h.abandoned)
}

// ---------------------------------------------------------------------------
// The tap: what the agent wrote on each connection.

type soakKey struct{ sid, fid uint64 }

type soakTap struct {
	mu    sync.Mutex
	conns map[string]*soakTapConn // by the peer's address
	// The last ACKs that a failed Write did not hand over whole, for the
	// report: a ring, so that it holds bounded memory.
	failed  [1024]soakFailedWrite
	nfailed int
}

type soakFailedWrite struct {
	soakEngineKey
	err string
}

func (tp *soakTap) failedWrite(k soakEngineKey) (string, bool) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	for _, f := range tp.failed {
		if f.soakEngineKey == k && f.err != "" {
			return f.err, true
		}
	}
	return "", false
}

type soakEngineKey struct {
	engine int
	key    soakKey
}

type soakListener struct {
	net.Listener
	tap *soakTap
}

func (l *soakListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &soakTapConn{TCPConn: nc.(*net.TCPConn), tap: l.tap, engine: -1}
	l.tap.mu.Lock()
	l.tap.conns[nc.RemoteAddr().String()] = tc
	l.tap.mu.Unlock()
	return tc, nil
}

func (tp *soakTap) get(addr string) *soakTapConn {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return tp.conns[addr]
}

func (tp *soakTap) remove(addr string) {
	tp.mu.Lock()
	delete(tp.conns, addr)
	tp.mu.Unlock()
}

// soakTapConn records the ids of the ACKs that each Write handed to the
// kernel whole, in order. Embedding *net.TCPConn keeps SyscallConn, so the
// agent reads as it does in production.
type soakTapConn struct {
	*net.TCPConn
	tap    *soakTap
	engine int // the peer's engine index, once known

	mu      sync.Mutex
	writes  int  // Writes under way
	closed  bool // the agent closed it
	acks    uint64
	ring    [soakTapRing]soakKey // the ids of ACK i at ring[i%soakTapRing]
	disc    bool                 // AGENT-DISCONNECT written
	discAck uint64               // ACKs written before it
}

func (c *soakTapConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes++
	c.mu.Unlock()
	n, err := c.TCPConn.Write(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes--
	for off := 0; off+lengthSize <= n; {
		end := off + lengthSize + int(binary.BigEndian.Uint32(p[off:]))
		if end > n {
			break
		}
		if f, perr := parseFrame(p[off+lengthSize : end]); perr == nil {
			switch f.typ {
			case frameAck:
				c.ring[c.acks%soakTapRing] = soakKey{f.streamID, f.frameID}
				c.acks++
			case frameAgentDisconnect:
				if !c.disc {
					c.disc, c.discAck = true, c.acks
				}
			}
		}
		off = end
	}
	if err != nil {
		// The ACKs not handed over whole: the agent knows they did not go.
		for off := 0; off+lengthSize <= len(p); {
			end := off + lengthSize + int(binary.BigEndian.Uint32(p[off:]))
			if end > len(p) {
				break
			}
			if f, perr := parseFrame(p[off+lengthSize : end]); perr == nil && f.typ == frameAck && end > n {
				c.tap.mu.Lock()
				c.tap.failed[c.tap.nfailed%len(c.tap.failed)] = soakFailedWrite{soakEngineKey{c.engine, soakKey{f.streamID, f.frameID}}, err.Error()}
				c.tap.nfailed++
				c.tap.mu.Unlock()
			}
			off = end
		}
	}
	return n, err
}

func (c *soakTapConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	return c.TCPConn.Close()
}

// settled reports whether the agent closed the connection and no Write is
// under way: its record is final.
func (c *soakTapConn) settled() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed && c.writes == 0
}

// ---------------------------------------------------------------------------
// The peer.

type soakReq struct {
	nonce  uint64
	origin *soakConn
}

type soakEngine struct {
	idx int
	id  string

	mu      sync.Mutex
	nextSid uint32 // wraps at 2^32, as 2.6's uniq_id
	seq     uint64
	pending map[soakKey]soakReq
	live    int  // connections up and not closing
	closing bool // one connection closes at a time
}

// tryBeginClose reserves the engine's close for one of its connections, if
// none is closing and another one stays up.
func (e *soakEngine) tryBeginClose() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing || e.live < 2 {
		return false
	}
	e.closing = true
	e.live--
	return true
}

func (e *soakEngine) endClose() {
	e.mu.Lock()
	e.closing = false
	e.mu.Unlock()
}

func (e *soakEngine) pendingLen() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.pending)
}

type soakConn struct {
	serial int64
	eng    *soakEngine
	nc     *net.TCPConn
	local  string
	window chan struct{} // a token per NOTIFY in flight from this connection

	closing       atomic.Bool // the peer is ending it: the reader's end is expected
	closeKind     int
	disconnecting atomic.Bool // HAPROXY-DISCONNECT sent
	discStatus    Status

	readerDone chan struct{}
	received   uint64 // ACK frames read (the reader's, final once readerDone)
	gotDisc    bool   // AGENT-DISCONNECT read
}

type soakSample struct {
	sent       int64
	heapLive   uint64
	goroutines int
}

type soakPeer struct {
	t        *testing.T
	agent    *Agent
	addr     string
	async    bool
	total    int64
	meanLife int
	tap      *soakTap
	handled  *soakHandled
	engines  []*soakEngine

	nonces    atomic.Uint64
	serials   atomic.Int64
	sent      atomic.Int64
	stopSend  chan struct{} // closed once total NOTIFYs are sent
	stopOnce  sync.Once
	finish    chan struct{} // closed by the test: close everything
	abort     chan struct{} // closed at the deadline
	abortOne  sync.Once
	parked    atomic.Int32 // slots waiting for finish
	openConns atomic.Int64 // connections open, from handshake to settled

	acked, ackedElsewhere, abandoned, inherent, unread, afterDisc atomic.Int64
	closes                                                        [soakCloseKinds]atomic.Int64

	sampleCh chan int64
	samples  []soakSample // the sampler's

	errMu  sync.Mutex
	errs   map[string]int
	errMsg []string
}

// fail records a broken rule: kind counts it, msg describes it (the first
// ones are kept).
func (p *soakPeer) fail(kind, format string, args ...interface{}) {
	p.errMu.Lock()
	defer p.errMu.Unlock()
	p.errs[kind]++
	if len(p.errMsg) < 40 {
		p.errMsg = append(p.errMsg, kind+": "+fmt.Sprintf(format, args...))
	}
}

func (p *soakPeer) stopped(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// open dials the agent and completes the handshake.
func (p *soakPeer) open(e *soakEngine) (*soakConn, error) {
	nc, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := &soakConn{serial: p.serials.Add(1), eng: e, nc: nc.(*net.TCPConn), local: nc.LocalAddr().String(),
		window: make(chan struct{}, soakWindow), readerDone: make(chan struct{})}
	caps := "pipelining"
	if p.async {
		caps = "pipelining,async"
	}
	hello := rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload("supported-versions", "2.0",
		"max-frame-size", uint32(16380), "capabilities", caps, "engine-id", e.id))
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := nc.Write(hello); err != nil {
		nc.Close()
		return nil, err
	}
	b, err := readFrame(nc, nil, 1<<16)
	if err != nil {
		nc.Close()
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	f, err := parseFrame(b)
	if err != nil || f.typ != frameAgentHello {
		nc.Close()
		return nil, errors.Errorf("no AGENT-HELLO: %v %v", f.typ, err)
	}
	for off := 0; off < len(f.payload); {
		kv, next, err := readKV(f.payload, off)
		if err != nil {
			nc.Close()
			return nil, err
		}
		off = next
		if string(kv.key) == "capabilities" {
			got, _ := kv.value.Bytes()
			if parseCapabilities(got)&(capPipelining|capAsync) != parseCapabilities([]byte(caps)) {
				p.fail("handshake", "agent answered capabilities %q to %q", got, caps)
			}
		}
	}
	if tc := p.tap.get(c.local); tc != nil {
		tc.mu.Lock()
		tc.engine = e.idx
		tc.mu.Unlock()
	}
	e.mu.Lock()
	e.live++
	e.mu.Unlock()
	p.openConns.Add(1)
	go p.readLoop(c)
	return c, nil
}

// runSlot keeps one connection of engine e going: open, send, close, again,
// until the test says finish.
func (p *soakPeer) runSlot(e *soakEngine, wg *sync.WaitGroup) {
	defer wg.Done()
	buf := make([]byte, 0, 4096)
	for {
		c, err := p.open(e)
		if err != nil {
			p.fail("dial", "engine %d: %v", e.idx, err)
			p.parked.Add(1)
			return
		}
		kind, finishing := p.drive(c, &buf)
		if !finishing {
			p.close(c, kind)
			e.endClose()
			continue
		}
		p.parked.Add(1)
		select {
		case <-p.finish:
		case <-p.abort:
		}
		e.mu.Lock()
		e.live--
		e.mu.Unlock()
		p.close(c, soakCloseFIN)
		return
	}
}

// drive sends NOTIFYs on c until its life is over (it then holds its
// engine's close) or the traffic stops.
func (p *soakPeer) drive(c *soakConn, buf *[]byte) (kind int, finishing bool) {
	life := p.meanLife/4 + rand.IntN(p.meanLife*3/2)
	for sent := 0; ; {
		if p.stopped(p.stopSend) || p.stopped(p.abort) {
			return 0, true
		}
		if sent >= life && c.eng.tryBeginClose() {
			return rand.IntN(soakCloseKinds), false
		}
		select {
		case c.window <- struct{}{}:
		case <-p.stopSend:
			return 0, true
		case <-p.abort:
			return 0, true
		}
		n, batch := 1, 1+rand.IntN(soakMaxBatch)
	more:
		for n < batch {
			select {
			case c.window <- struct{}{}:
				n++
			default:
				break more
			}
		}
		b := (*buf)[:0]
		for i := 0; i < n; i++ {
			b = p.appendNotify(b, c)
		}
		*buf = b
		if _, err := c.nc.Write(b); err != nil {
			p.fail("write", "conn %d: %v", c.serial, err)
			c.eng.mu.Lock()
			c.eng.live--
			c.eng.closing = true // released by endClose
			c.eng.mu.Unlock()
			return soakCloseRST, false
		}
		sent += n
		total := p.sent.Add(int64(n))
		step := p.total / soakSamples
		if (total-int64(n))/step != total/step {
			select {
			case p.sampleCh <- total:
			default:
			}
		}
		if total >= p.total {
			p.stopOnce.Do(func() { close(p.stopSend) })
		}
	}
}

// appendNotify registers a new request of c's engine and appends its
// NOTIFY to b.
func (p *soakPeer) appendNotify(b []byte, c *soakConn) []byte {
	e := c.eng
	nonce := p.nonces.Add(1)
	e.mu.Lock()
	sid := uint64(e.nextSid)
	e.nextSid++
	e.seq++
	key := soakKey{sid, 1 + e.seq%3}
	if _, dup := e.pending[key]; dup {
		p.fail("test", "stream-id %d reused while pending", sid)
	}
	e.pending[key] = soakReq{nonce: nonce, origin: c}
	e.mu.Unlock()
	var sleep uint64
	if rand.IntN(soakSlowOneIn) == 0 {
		sleep = 1000 + rand.Uint64N(4000)
	}
	b, start := appendFrameHeader(b, frameNotify, flagFin, key.sid, key.fid)
	b = appendName(b, "soak")
	b = append(b, 2)
	b = appendName(b, "nonce")
	var hex [16]byte
	b = appendTypedBytes(b, TypeString, soakNonce(&hex, nonce))
	b = appendName(b, "sleep")
	b = appendTypedInt(b, TypeUint32, sleep)
	finishFrame(b, start)
	return b
}

func soakNonce(buf *[16]byte, n uint64) []byte {
	const digits = "0123456789abcdef"
	for i := 15; i >= 0; i-- {
		buf[i] = digits[n&15]
		n >>= 4
	}
	return buf[:]
}

// readLoop reads the agent's frames on c until c ends.
func (p *soakPeer) readLoop(c *soakConn) {
	defer close(c.readerDone)
	buf := make([]byte, 64<<10)
	r, w := 0, 0
	for {
		for w-r >= lengthSize {
			n := int(binary.BigEndian.Uint32(buf[r:]))
			if n > len(buf)-lengthSize {
				p.fail("protocol", "conn %d: frame of %d bytes", c.serial, n)
				return
			}
			if w-r < lengthSize+n {
				break
			}
			f, err := parseFrame(buf[r+lengthSize : r+lengthSize+n])
			r += lengthSize + n
			if err != nil {
				p.fail("protocol", "conn %d: %v", c.serial, err)
				return
			}
			if p.onFrame(c, &f) {
				return
			}
		}
		if r > 0 {
			w = copy(buf, buf[r:w])
			r = 0
		}
		m, err := c.nc.Read(buf[w:])
		w += m
		if err != nil && m == 0 {
			if !c.closing.Load() {
				p.fail("agent closed", "conn %d: %v", c.serial, err)
			}
			return
		}
	}
}

// onFrame handles one frame from the agent; it reports true when c's
// reading is over.
func (p *soakPeer) onFrame(c *soakConn, f *frame) bool {
	switch f.typ {
	case frameAck:
		c.received++
		p.onAck(c, f)
		return false
	case frameAgentDisconnect:
		d, err := parseDisconnect(f.payload)
		switch {
		case !c.disconnecting.Load():
			p.fail("agent closed", "conn %d: AGENT-DISCONNECT %d %q", c.serial, d.status, d.message)
		case err != nil || d.status != c.discStatus:
			p.fail("protocol", "conn %d: AGENT-DISCONNECT %d (%v) in answer to %d", c.serial, d.status, err, c.discStatus)
		}
		c.gotDisc = true
		return true
	}
	p.fail("protocol", "conn %d: unexpected frame %v", c.serial, f.typ)
	return true
}

// parseSoakAck reads the four variables the handler sets.
func parseSoakAck(p []byte) (nonce, engine []byte, sid, fid uint64, err error) {
	for off := 0; off < len(p); {
		if len(p)-off < 3 || p[off] != actionSetVar || p[off+1] != 3 || VarScope(p[off+2]) != VarScopeTransaction {
			return nil, nil, 0, 0, errors.Errorf("unexpected action at %d: % x", off, p[off:])
		}
		name, next, err := readBytes(p, off+3)
		if err != nil {
			return nil, nil, 0, 0, err
		}
		v, next, err := readValue(p, next)
		if err != nil {
			return nil, nil, 0, 0, err
		}
		off = next
		switch string(name) {
		case "nonce":
			nonce, _ = v.Bytes()
		case "engine":
			engine, _ = v.Bytes()
		case "sid":
			sid, _ = v.Uint()
		case "fid":
			fid, _ = v.Uint()
		default:
			return nil, nil, 0, 0, errors.Errorf("unexpected variable %q", name)
		}
	}
	if nonce == nil || engine == nil {
		return nil, nil, 0, 0, errors.New("nonce or engine missing")
	}
	return nonce, engine, sid, fid, nil
}

func (p *soakPeer) onAck(c *soakConn, f *frame) {
	e := c.eng
	key := soakKey{f.streamID, f.frameID}
	nonce, engine, sid, fid, err := parseSoakAck(f.payload)
	if err != nil {
		p.fail("malformed ACK", "conn %d, ids %v: %v", c.serial, key, err)
		return
	}
	if sid != key.sid || fid != key.fid {
		p.fail("foreign values", "conn %d: ACK ids %v carry the values of request (%d, %d)", c.serial, key, sid, fid)
	}
	if c.disconnecting.Load() {
		p.afterDisc.Add(1)
	}
	var hex [16]byte
	e.mu.Lock()
	req, ok := e.pending[key]
	match := ok && string(engine) == e.id && string(nonce) == string(soakNonce(&hex, req.nonce))
	if match {
		delete(e.pending, key)
	}
	e.mu.Unlock()
	switch {
	case string(engine) != e.id:
		p.fail("misrouted", "conn %d of engine %d: ACK %v for engine %q (nonce %s)", c.serial, e.idx, key, engine, nonce)
	case !ok:
		p.fail("duplicated", "conn %d of engine %d: ACK %v (nonce %s) for no pending request", c.serial, e.idx, key, nonce)
	case !match:
		p.fail("foreign values", "conn %d of engine %d: ACK %v has nonce %s, its request %s", c.serial, e.idx, key, nonce, soakNonce(&hex, req.nonce))
	default:
		p.acked.Add(1)
		if !p.handled.forget(e.idx, key) {
			p.fail("test", "ACK %v of engine %d before its handler started", key, e.idx)
		}
		select {
		case <-req.origin.window:
		default:
		}
		if req.origin != c {
			p.ackedElsewhere.Add(1)
			if !p.async {
				p.fail("rerouted without async", "ACK %v of conn %d arrived on conn %d", key, req.origin.serial, c.serial)
			}
		}
	}
}

// close ends c the way kind says, then settles its requests.
func (p *soakPeer) close(c *soakConn, kind int) {
	p.closes[kind].Add(1)
	c.closeKind = kind
	c.closing.Store(true)
	readerGone := func() bool {
		select {
		case <-c.readerDone:
			return true
		case <-time.After(10 * time.Second):
			p.fail("stuck", "conn %d: no end after %s close", c.serial, soakCloseNames[kind])
			_ = c.nc.SetReadDeadline(time.Unix(1, 0))
			<-c.readerDone
			return false
		}
	}
	switch kind {
	case soakCloseRST:
		// Stop reading first, so that what was read is known, then reset.
		_ = c.nc.SetReadDeadline(time.Unix(1, 0))
		<-c.readerDone
		_ = c.nc.SetLinger(0)
	case soakCloseFIN:
		_ = c.nc.CloseWrite()
		readerGone()
	case soakCloseDisconnect:
		c.discStatus = StatusNormal
		if rand.IntN(2) == 0 {
			c.discStatus = StatusTimeout
		}
		c.disconnecting.Store(true)
		d, start := appendFrameHeader(nil, frameHAProxyDisconnect, flagFin, 0, 0)
		d = append(d, helloPayload("status-code", uint32(c.discStatus), "message", c.discStatus.String())...)
		finishFrame(d, start)
		if _, err := c.nc.Write(d); err != nil {
			p.fail("write", "conn %d: DISCONNECT: %v", c.serial, err)
		}
		if readerGone() && !c.gotDisc {
			p.fail("protocol", "conn %d: no AGENT-DISCONNECT", c.serial)
		}
	}
	c.nc.Close()
	p.settle(c, kind)
	p.openConns.Add(-1)
}

// settle waits until the agent closed c's other end, then accounts for the
// ACKs the agent wrote on c that the peer did not read, and, without async,
// abandons c's requests.
func (p *soakPeer) settle(c *soakConn, kind int) {
	var tc *soakTapConn
	deadline := time.Now().Add(10 * time.Second)
	for tc = p.tap.get(c.local); tc == nil || !tc.settled(); tc = p.tap.get(c.local) {
		if time.Now().After(deadline) {
			p.fail("stuck", "conn %d: the agent did not close its end after a %s close", c.serial, soakCloseNames[kind])
			return
		}
		time.Sleep(100 * time.Microsecond) // polling the condition
	}
	p.tap.remove(c.local)
	tc.mu.Lock()
	var unread []soakKey
	switch {
	case tc.acks < c.received:
		p.fail("test", "conn %d: read %d ACKs, the agent wrote %d", c.serial, c.received, tc.acks)
	case tc.acks-c.received > soakTapRing:
		p.fail("test", "conn %d: %d unread ACKs, more than the tap keeps", c.serial, tc.acks-c.received)
	default:
		for i := c.received; i < tc.acks; i++ {
			unread = append(unread, tc.ring[i%soakTapRing])
		}
	}
	afterOwnDisc := tc.disc && c.received >= tc.discAck
	tc.mu.Unlock()

	e := c.eng
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, key := range unread {
		if _, ok := e.pending[key]; !ok {
			p.fail("duplicated", "conn %d: ACK %v written on it, unread, and its request already answered", c.serial, key)
			continue
		}
		delete(e.pending, key)
		switch {
		case !p.async:
			p.handled.abandon(e.idx, key)
			p.abandoned.Add(1)
		case kind == soakCloseRST:
			// Written before the reset reached the agent: lost with the
			// connection, whatever the agent does.
			p.handled.forget(e.idx, key)
			p.inherent.Add(1)
		case kind == soakCloseDisconnect && afterOwnDisc:
			p.handled.forget(e.idx, key)
			p.fail("lost", "conn %d: ACK %v written after the agent's own AGENT-DISCONNECT, with a sibling up", c.serial, key)
		default:
			p.handled.forget(e.idx, key)
			p.fail("lost", "conn %d: ACK %v written on a %s-closed connection, never read", c.serial, key, soakCloseNames[kind])
		}
	}
	if !p.async {
		for key, req := range e.pending {
			if req.origin == c {
				delete(e.pending, key)
				p.handled.abandon(e.idx, key)
				p.abandoned.Add(1)
			}
		}
	}
}

// unreadNotify reports whether req, pending, was sent on a connection the
// peer reset and its handler never started: its NOTIFY was still unread
// when the reset came, and went with the connection. Final once the agent
// has ended that connection.
func (p *soakPeer) unreadNotify(e *soakEngine, key soakKey, req soakReq) bool {
	return req.origin.closing.Load() && req.origin.closeKind == soakCloseRST && !p.handled.has(e.idx, key)
}

// mustAnswer counts the pending requests that still wait for their ACK.
func (p *soakPeer) mustAnswer() int {
	n := 0
	for _, e := range p.engines {
		e.mu.Lock()
		for key, req := range e.pending {
			if !p.unreadNotify(e, key, req) {
				n++
			}
		}
		e.mu.Unlock()
	}
	return n
}

// dropUnread settles the requests whose NOTIFY went unread with a reset
// connection.
func (p *soakPeer) dropUnread() {
	for _, e := range p.engines {
		e.mu.Lock()
		for key, req := range e.pending {
			if p.unreadNotify(e, key, req) {
				delete(e.pending, key)
				p.unread.Add(1)
			}
		}
		e.mu.Unlock()
	}
}

func (p *soakPeer) pendingLen() int {
	n := 0
	for _, e := range p.engines {
		n += e.pendingLen()
	}
	return n
}

func (p *soakPeer) describePending(max int) []string {
	var out []string
	for _, e := range p.engines {
		e.mu.Lock()
		for key, req := range e.pending {
			if len(out) < max {
				state := "up"
				if req.origin.closing.Load() {
					state = soakCloseNames[req.origin.closeKind] + " close"
				}
				if !p.handled.has(e.idx, key) {
					state += "; handler not called"
				}
				if err, ok := p.tap.failedWrite(soakEngineKey{e.idx, key}); ok {
					state += "; the agent's Write of its ACK failed: " + err
				}
				out = append(out, fmt.Sprintf("engine %d %v from conn %d (%s)", e.idx, key, req.origin.serial, state))
			}
		}
		e.mu.Unlock()
	}
	sort.Strings(out)
	return out
}

// sampler records, at each sample point the traffic signals, the live
// heap as of the last GC and the goroutines, through runtime/metrics,
// forcing a GC only when none ran since the previous sample.
func (p *soakPeer) sampler(done chan<- struct{}) {
	defer close(done)
	m := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/sched/goroutines:goroutines"}, {Name: "/gc/cycles/total:gc-cycles"}}
	var cycles uint64
	for sent := range p.sampleCh {
		metrics.Read(m)
		if m[2].Value.Uint64() == cycles {
			// No GC since the last sample: the live heap would be stale.
			runtime.GC()
			metrics.Read(m)
		}
		cycles = m[2].Value.Uint64()
		p.samples = append(p.samples, soakSample{sent: sent, heapLive: m[0].Value.Uint64(), goroutines: int(m[1].Value.Uint64())})
	}
}

// soakLogCounter counts the agent's logs by level and keeps the first
// errors and warnings.
type soakLogCounter struct {
	mu     sync.Mutex
	counts map[logrus.Level]int
	first  []string
}

func (h *soakLogCounter) Levels() []logrus.Level { return logrus.AllLevels }

func (h *soakLogCounter) Fire(e *logrus.Entry) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.counts[e.Level]++
	if e.Level <= logrus.WarnLevel && len(h.first) < 10 {
		s, _ := e.String()
		h.first = append(h.first, s)
	}
	return nil
}

func runSoak(t *testing.T, total int, async bool) {
	began := time.Now()
	baseline := runtime.NumGoroutine()
	var calls atomic.Int64
	logs := &soakLogCounter{counts: map[logrus.Level]int{}}
	logger := logrus.New()
	logger.SetOutput(io.Discard)
	logger.SetLevel(logrus.DebugLevel)
	logger.AddHook(logs)
	handled := &soakHandled{engines: map[string]int{}, m: map[soakEngineKey]struct{}{}, abandoned: map[soakEngineKey]struct{}{}}
	a := &Agent{Handler: soakHandler(&calls, handled), Logger: logger}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	tap := &soakTap{conns: map[string]*soakTapConn{}}
	served := make(chan error, 1)
	a.keepPipelining = true // the Client offers what 3.1+ does (see startAgent)
	go func() { served <- a.Serve(&soakListener{Listener: ln, tap: tap}) }()
	var wg sync.WaitGroup

	p := &soakPeer{t: t, agent: a, addr: ln.Addr().String(), async: async, total: int64(total),
		meanLife: 800, tap: tap, handled: handled, stopSend: make(chan struct{}), finish: make(chan struct{}),
		abort: make(chan struct{}), sampleCh: make(chan int64, soakSamples+8), errs: map[string]int{}}
	for i := 0; i < soakEngines; i++ {
		e := &soakEngine{idx: i, id: newUUID(), pending: map[soakKey]soakReq{}}
		if i == 0 {
			e.nextSid = 1<<32 - 3000 // wraps to 0 early in the run
		}
		p.engines = append(p.engines, e)
		handled.engines[e.id] = i
	}
	stop := func() { p.abortOne.Do(func() { close(p.abort) }) }
	limit := time.Duration(total/1000)*time.Second + 2*time.Minute
	abortTimer := time.AfterFunc(limit, stop)
	defer abortTimer.Stop()
	// closeAgent stops the peer and closes the agent; it runs on any end
	// of the test, a failed wait included.
	var closeOnce sync.Once
	closeAgent := func() {
		closeOnce.Do(func() {
			stop()
			_ = a.Close()
			wg.Wait()
			select {
			case err := <-served:
				assert.ErrorIs(t, err, ErrAgentClosed)
			case <-time.After(5 * time.Second):
				t.Error("Serve did not return after Close")
			}
		})
	}
	defer closeAgent()
	sampled := make(chan struct{})
	go p.sampler(sampled)

	for _, e := range p.engines {
		for i := 0; i < soakConnsPerEngine; i++ {
			wg.Add(1)
			go p.runSlot(e, &wg)
		}
	}

	// Traffic runs until total NOTIFYs are sent and every slot parked.
	slots := int32(soakEngines * soakConnsPerEngine)
	waitForSoak(t, limit, func() bool { return p.parked.Load() == slots }, "the traffic to end")
	sentAt := time.Since(began)
	// The agent has ended every connection the peer closed (their handlers
	// are done and every ACK written or rerouted) once it has as many open
	// as the peer.
	waitForSoak(t, 20*time.Second, func() bool { return a.Stats().ConnsOpen == p.openConns.Load() },
		"the agent to end the connections the peer closed")
	endedAt := time.Since(began)
	// Quiescence: every request still pending must get its ACK, except
	// those whose NOTIFY the agent never read.
	quiet := time.Now().Add(20 * time.Second)
	for p.mustAnswer() > 0 && time.Now().Before(quiet) {
		time.Sleep(time.Millisecond) // polling the condition
	}
	p.dropUnread()
	quietAt := time.Since(began)
	for _, s := range p.describePending(20) {
		p.fail("lost", "no ACK: %s", s)
	}
	if n := p.pendingLen(); n > 20 {
		p.fail("lost", "and %d more", n-20)
	}
	close(p.finish)
	wg.Wait()
	close(p.sampleCh)
	<-sampled
	waitForSoak(t, 10*time.Second, func() bool { return a.Stats().ConnsOpen == 0 }, "the agent to close every connection")
	st := a.Stats()
	t.Logf("phases: traffic %v, agent caught up %v, quiescent %v, all closed %v", sentAt.Round(time.Millisecond),
		endedAt.Round(time.Millisecond), quietAt.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	// Async engines may outlive their last connection for a while, by
	// design; Close ends them. Then every goroutine of the run must be gone
	// (one more is allowed to the runtime, e.g. a GC worker starting).
	closeAgent()
	waitForSoak(t, 10*time.Second, func() bool { return runtime.NumGoroutine() <= baseline+1 },
		fmt.Sprintf("goroutines back to %d (+1)", baseline))

	var closes []string
	for k := range p.closes {
		closes = append(closes, fmt.Sprintf("%s %d", soakCloseNames[k], p.closes[k].Load()))
	}
	t.Logf("%d NOTIFYs sent in %v (%.0f/s), finished in %v; handler calls %d; ACKs %d (%d on another connection of the engine); "+
		"abandoned %d; ACKs lost with a reset connection after the agent wrote them %d; NOTIFYs lost unread with a reset connection %d; "+
		"ACKs read after our DISCONNECT %d; closes: %s; "+
		"agent: connections %d, rescues %d, ACKs rerouted %d, ACKs dropped %d, writes %d",
		p.sent.Load(), sentAt.Round(time.Millisecond), float64(p.sent.Load())/sentAt.Seconds(), time.Since(began).Round(time.Millisecond),
		calls.Load(), p.acked.Load(), p.ackedElsewhere.Load(), p.abandoned.Load(), p.inherent.Load(), p.unread.Load(), p.afterDisc.Load(),
		strings.Join(closes, ", "), st.ConnsTotal, st.Rescues, st.ACKsRerouted, st.ACKsDropped, st.Writes)
	var heap []string
	for _, s := range p.samples {
		heap = append(heap, fmt.Sprintf("%d:%.1fMiB/%dg", s.sent, float64(s.heapLive)/(1<<20), s.goroutines))
	}
	t.Logf("samples (NOTIFYs sent: live heap / goroutines): %s", strings.Join(heap, " "))
	logs.mu.Lock()
	t.Logf("agent logs by level: %v", logs.counts)
	for _, s := range logs.first {
		t.Logf("agent log: %s", strings.TrimSpace(s))
	}
	// The peer sends nothing malformed and ends connections only in ways
	// that are normal (reset, FIN, DISCONNECT 0 or 2): nothing to warn of.
	assert.Zero(t, logs.counts[logrus.WarnLevel]+logs.counts[logrus.ErrorLevel]+logs.counts[logrus.FatalLevel]+logs.counts[logrus.PanicLevel],
		"warnings and errors logged by the agent")
	logs.mu.Unlock()

	p.errMu.Lock()
	assert.Empty(t, p.errs, "broken rules (first ones below)")
	for _, m := range p.errMsg {
		t.Log(m)
	}
	p.errMu.Unlock()

	assert.GreaterOrEqual(t, p.sent.Load(), int64(total))
	assert.Equal(t, p.sent.Load(), p.acked.Load()+p.abandoned.Load()+p.inherent.Load()+p.unread.Load(),
		"every request answered, abandoned or lost with its reset connection")
	left, neverHandled := handled.len()
	assert.Zero(t, left, "requests handled and never settled")
	t.Logf("abandoned requests whose handler never ran: %d", neverHandled)
	for k := range p.closes {
		assert.NotZero(t, p.closes[k].Load(), "%s closes", soakCloseNames[k])
	}
	assert.NotZero(t, st.Rescues, "slow handlers rescued")
	assert.Zero(t, st.ProtocolErrors, "protocol errors counted by the agent")
	assert.Zero(t, st.HandlerErrors+st.HandlerPanics+st.ActionsRefused, "handler failures")
	if async {
		assert.NotZero(t, st.ACKsRerouted, "ACKs rerouted")
		assert.NotZero(t, p.ackedElsewhere.Load(), "ACKs received on a sibling connection")
		assert.Zero(t, p.abandoned.Load(), "abandoned requests")
	} else {
		assert.Zero(t, st.ACKsRerouted, "ACKs rerouted")
		assert.Zero(t, p.inherent.Load())
	}
	checkSoakSamples(t, p.samples)
}

// checkSoakSamples compares the last third of the run with the first third
// (without its first sample, taken while pools and maps fill up).
//
// Live heap (as marked by the last GC): it holds the peer's pending maps and
// buffers and the agent's per-connection state and buffer pools, all bounded
// by the connections (16) and requests in flight (at most 256); between two
// samples only what is in flight differs. The mean of the last third may
// exceed the first third's by 20 % plus 2 MiB: GC timing and sync.Pool
// victim caches move it by a few hundred KiB (the means stay within
// 2-3 MiB run after run). The two thirds' means are two thirds of the run
// apart, so a leak of 100 bytes per request shows as 3.3 MiB at the
// default 50,000 NOTIFYs, and one of 4 bytes per request as 2.7 MiB at
// full size (1,000,000).
//
// Goroutines: the peer runs two per connection, the agent one per
// connection plus one per slow handler running (each connection has at
// most soakWindow NOTIFYs in flight, one in 50 slow), so single samples
// jump by a hundred when slow handlers bunch up, and a third's median flips
// between the quiet and the busy level. Its lowest sample is the floor that
// a leak raises: the last third's may exceed the first third's by one per
// connection slot (16), what connections being reopened at that moment
// move it by. A goroutine left behind by each connection closed raises it
// by some 50 between the two thirds at the default size (about 75 closes
// per variant), thousands at full size.
func checkSoakSamples(t *testing.T, samples []soakSample) {
	if !assert.GreaterOrEqual(t, len(samples), soakSamples-1, "memory samples") {
		return
	}
	third := len(samples) / 3
	summary := func(s []soakSample) (heap float64, gmin int) {
		gmin = s[0].goroutines
		for _, x := range s {
			heap += float64(x.heapLive)
			if x.goroutines < gmin {
				gmin = x.goroutines
			}
		}
		return heap / float64(len(s)), gmin
	}
	firstHeap, firstG := summary(samples[1:third])
	lastHeap, lastG := summary(samples[len(samples)-third:])
	t.Logf("live heap: first third %.2f MiB, last third %.2f MiB; goroutines (lowest): %d, %d",
		firstHeap/(1<<20), lastHeap/(1<<20), firstG, lastG)
	assert.LessOrEqual(t, lastHeap, firstHeap*1.2+2<<20, "live heap grew")
	assert.LessOrEqual(t, lastG, firstG+soakEngines*soakConnsPerEngine, "goroutines grew")
}

// waitForSoak polls cond until it holds or timeout passes.
func waitForSoak(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(time.Millisecond) // polling the condition
	}
}

// ---------------------------------------------------------------------------
// Reproducers of what the async soak found: ACKs lost although a sibling
// connection of their engine was up.

// soakResetListener hands out connections whose first Write carrying an
// ACK fails as on a connection HAProxy has just reset: ECONNRESET, the
// socket gone. That is what the soak's tap recorded on connections the peer
// reset while the agent had ACKs to write.
type soakResetListener struct {
	net.Listener
	accepted atomic.Int32
	conn     atomic.Pointer[soakResetOnACKConn] // the first one
}

func (l *soakResetListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &soakResetOnACKConn{TCPConn: nc.(*net.TCPConn)}
	if l.accepted.Add(1) == 1 { // the first connection only
		c.armed.Store(true)
		l.conn.Store(c)
	}
	return c, nil
}

type soakResetOnACKConn struct {
	*net.TCPConn
	armed atomic.Bool
}

func (c *soakResetOnACKConn) Write(p []byte) (int, error) {
	if len(p) > lengthSize && frameType(p[lengthSize]) == frameAck && c.armed.CompareAndSwap(true, false) {
		_ = c.TCPConn.SetLinger(0)
		_ = c.TCPConn.Close()
		return 0, &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(),
			Err: os.NewSyscallError("write", syscall.ECONNRESET)}
	}
	return c.TCPConn.Write(p)
}

// TestSoakReproRerouteAfterWriteError: with async, an ACK whose write fails
// because HAProxy reset its connection must leave on a sibling connection of
// the same engine. The ACK of an inline handler is gathered and written
// before the next read; when that write fails, the agent drops it.
func TestSoakReproRerouteAfterWriteError(t *testing.T) {
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		return w.SetUint(VarScopeTransaction, "sid", r.StreamID())
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	a.Logger = quiet
	served := make(chan error, 1)
	a.keepPipelining = true // the Client offers what 3.1+ does (see startAgent)
	go func() { served <- a.Serve(&soakResetListener{Listener: l}) }()
	t.Cleanup(func() {
		_ = a.Close()
		select {
		case err := <-served:
			assert.ErrorIs(t, err, ErrAgentClosed)
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
	origin := dialRaw(t, l.Addr().String())
	origin.hello("pipelining,async", "engine-A", 16380)
	sibling := dialRaw(t, l.Addr().String())
	sibling.hello("pipelining,async", "engine-A", 16380)

	payload, _ := appendMessages(nil, []ClientMessage{{Name: "m"}})
	origin.send(rawFrame(frameNotify, flagFin, 41, 1, payload))
	f, err := soakNextWithin(sibling, 3*time.Second)
	if assert.NoError(t, err, "the ACK of stream 41 on the sibling connection") {
		assert.Equal(t, frameAck, f.typ)
		assert.Equal(t, uint64(41), f.streamID)
	}
	st := a.Stats()
	t.Logf("ACKs rerouted %d, dropped %d", st.ACKsRerouted, st.ACKsDropped)
}

// TestSoakReproNoACKAfterHAProxyDisconnect: after HAPROXY-DISCONNECT, HAProxy
// 2.6 reads nothing but AGENT-DISCONNECT on that connection (SPOP.md §5.5,
// F26 spoe_handle_disconnecting_appctx): an ACK the agent writes there after
// reading the DISCONNECT is ignored, and with async (where HAProxy sends
// DISCONNECT on soft-stop with NOTIFYs still waiting in the thread's queue)
// the request then waits for "timeout processing" although a sibling
// connection of its engine could carry it. The agent flushes the ACKs it
// gathered onto the disconnecting connection before its AGENT-DISCONNECT.
func TestSoakReproNoACKAfterHAProxyDisconnect(t *testing.T) {
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		return w.SetUint(VarScopeTransaction, "sid", r.StreamID())
	})}
	addr := startAgent(t, a)
	origin := dialRaw(t, addr)
	origin.hello("pipelining,async", "engine-A", 16380)
	sibling := dialRaw(t, addr)
	sibling.hello("pipelining,async", "engine-A", 16380)

	// One write: the agent reads the NOTIFY and the DISCONNECT together,
	// so its ACK cannot have crossed the DISCONNECT.
	payload, _ := appendMessages(nil, []ClientMessage{{Name: "m"}})
	disc := rawFrame(frameHAProxyDisconnect, flagFin, 0, 0, helloPayload("status-code", uint32(0), "message", "normal"))
	origin.send(append(rawFrame(frameNotify, flagFin, 42, 1, payload), disc...))
	f, err := soakNextWithin(origin, 3*time.Second)
	require.NoError(t, err)
	assert.Equal(t, frameAgentDisconnect, f.typ, "first frame on the disconnecting connection (%v, stream %d)", f.typ, f.streamID)
	f, err = soakNextWithin(sibling, 3*time.Second)
	if assert.NoError(t, err, "the ACK of stream 42 on the sibling connection") {
		assert.Equal(t, frameAck, f.typ)
		assert.Equal(t, uint64(42), f.streamID)
	}
}

// soakNextWithin reads the next frame from p, waiting at most d.
func soakNextWithin(p *rawPeer, d time.Duration) (frame, error) {
	_ = p.nc.SetReadDeadline(time.Now().Add(d))
	b, err := readFrame(p.nc, nil, 1<<20)
	if err != nil {
		return frame{}, err
	}
	return parseFrame(b)
}

// TestSoakReproWriteClosedIsNoProtocolError: when a detached handler's
// write finds HAProxy gone (ECONNRESET), the connection is closed for
// writing; if the loop then flushes ACKs it gathered meanwhile, the flush
// gets errWriteClosed, reroutes them, and the connection ends with that
// error, which end() does not expect: it counts a protocol error, logs a
// warning and tries an AGENT-DISCONNECT 4 "invalid frame received" and a
// linger on a connection HAProxy reset. The soak meets it about once per
// 50,000 NOTIFYs. The interleaving depends on the scheduler (the inline
// handler may be rescued, or the loop may flush first), so the scenario is
// played up to 20 times.
func TestSoakReproWriteClosedIsNoProtocolError(t *testing.T) {
	var protocolErrors uint64
	var warnings []string
	for attempt := 0; attempt < 20 && protocolErrors == 0; attempt++ {
		n, w := soakWriteClosedScenario(t)
		protocolErrors += n
		warnings = append(warnings, w...)
	}
	assert.Zero(t, protocolErrors, "protocol errors")
	assert.Empty(t, warnings, "warnings")
}

func soakWriteClosedScenario(t *testing.T) (uint64, []string) {
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	var ln *soakResetListener
	logs := &soakLogCounter{counts: map[logrus.Level]int{}}
	logger := logrus.New()
	logger.SetOutput(io.Discard)
	logger.AddHook(logs)
	a := &Agent{Logger: logger, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		msgs := r.Messages()
		msgs.Next()
		switch {
		case msgs.NameIs("slow"): // detached: its ACK's write fails
			started <- struct{}{}
			<-release
		case msgs.NameIs("fast"): // inline: its ACK is gathered meanwhile
			close(release)
			deadline := time.Now().Add(2 * time.Second)
			for ln.conn.Load() == nil || ln.conn.Load().armed.Load() {
				if time.Now().After(deadline) {
					return errors.New("the slow handler's ACK was not written")
				}
				runtime.Gosched() // polling the condition
			}
		}
		return w.SetUint(VarScopeTransaction, "sid", r.StreamID())
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ln = &soakResetListener{Listener: l}
	served := make(chan error, 1)
	a.keepPipelining = true // the Client offers what 3.1+ does (see startAgent)
	go func() { served <- a.Serve(ln) }()
	defer func() {
		_ = a.Close()
		select {
		case err := <-served:
			assert.ErrorIs(t, err, ErrAgentClosed)
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Close")
		}
	}()
	origin := dialRaw(t, l.Addr().String())
	defer origin.nc.Close()
	origin.hello("pipelining,async", "engine-A", 16380)
	sibling := dialRaw(t, l.Addr().String())
	defer sibling.nc.Close()
	sibling.hello("pipelining,async", "engine-A", 16380)

	slow, _ := appendMessages(nil, []ClientMessage{{Name: "slow"}})
	fast, _ := appendMessages(nil, []ClientMessage{{Name: "fast"}})
	origin.send(rawFrame(frameNotify, flagFin, 51, 1, slow))
	<-started
	waitFor(t, func() bool { return a.Stats().Rescues == 1 }, "the slow handler rescued")
	origin.send(rawFrame(frameNotify, flagFin, 52, 1, fast))
	got := map[uint64]bool{}
	for len(got) < 2 {
		f, err := soakNextWithin(sibling, 3*time.Second)
		if !assert.NoError(t, err, "ACKs of streams 51 and 52 on the sibling, got %v", got) {
			break
		}
		got[f.streamID] = f.typ == frameAck
	}
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 1 }, "the reset connection ended")
	logs.mu.Lock()
	defer logs.mu.Unlock()
	return a.Stats().ProtocolErrors, logs.first
}
