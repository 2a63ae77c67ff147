package spoe

// An attack client of the test suite's own: raw TCP, with a frame encoder
// and decoder written here from SPOP's text, not the library's, so that a
// bug the two would share cannot hide. It plays the hostile peers of
// issue 11 against an agent started in the test process and measures what
// the agent then holds: the live heap after a forced GC.
//
// The tests run at a CI size; SPOE_ATTACK_FULL=1 runs the sizes.

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// attackFull reports whether the attack tests run at the sizes.
func attackFull() bool { return os.Getenv("SPOE_ATTACK_FULL") != "" }

// attackSize returns full under SPOE_ATTACK_FULL, ci otherwise, or the
// value of the environment variable env when set.
func attackSize(t testing.TB, env string, ci, full int) int {
	if s := os.Getenv(env); s != "" {
		n, err := strconv.Atoi(s)
		require.NoError(t, err, env)
		return n
	}
	if attackFull() {
		return full
	}
	return ci
}

// SPOP encoding, from /work/shared/SPOP.md.

// avarint appends x in HAProxy's varint encoding.
func avarint(b []byte, x uint64) []byte {
	if x < 0xF0 {
		return append(b, byte(x))
	}
	b = append(b, 0xF0|byte(x&0x0F))
	x = (x - 0xF0) >> 4
	for x >= 0x80 {
		b = append(b, 0x80|byte(x&0x7F))
		x = (x - 0x80) >> 7
	}
	return append(b, byte(x))
}

// areadVarint decodes a varint at the front of b.
func areadVarint(b []byte) (uint64, []byte, bool) {
	if len(b) == 0 {
		return 0, nil, false
	}
	x := uint64(b[0])
	if x < 0xF0 {
		return x, b[1:], true
	}
	shift := uint(4)
	for i := 1; i < 10 && i < len(b); i++ {
		x += uint64(b[i]) << shift
		if b[i] < 0x80 {
			return x, b[i+1:], true
		}
		shift += 7
	}
	return 0, nil, false
}

func astr(b []byte, s string) []byte { return append(avarint(b, uint64(len(s))), s...) }

// SPOP typed values.
func aString(b []byte, s string) []byte                  { return astr(append(b, 8), s) }
func aInt(b []byte, typ byte, x uint64) []byte           { return avarint(append(b, typ), x) }
func aKVString(b []byte, k, v string) []byte             { return aString(astr(b, k), v) }
func aKVInt(b []byte, k string, t byte, x uint64) []byte { return aInt(astr(b, k), t, x) }

// Frame types and flags.
const (
	aUnset         = 0
	aHAProxyHello  = 1
	aHAProxyDisc   = 2
	aNotify        = 3
	aAgentHello    = 101
	aAgentDisc     = 102
	aAck           = 103
	aFin           = 1
	aAbort         = 2
	aUint32        = 3
	aUint64        = 5
	aFrameHeadSize = 4 + 1 + 4
)

// aFrame builds a whole frame, length prefix included.
func aFrame(typ byte, flags uint32, sid, fid uint64, payload []byte) []byte {
	b := make([]byte, 4, 4+aFrameHeadSize+20+len(payload))
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, flags)
	b = avarint(b, sid)
	b = avarint(b, fid)
	b = append(b, payload...)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

// aHello is a HAPROXY-HELLO as HAProxy 2.6 sends it; engineID may be empty.
func aHello(caps, engineID string, maxFrame uint64) []byte {
	p := aKVString(nil, "supported-versions", "2.0")
	p = aKVInt(p, "max-frame-size", aUint32, maxFrame)
	p = aKVString(p, "capabilities", caps)
	if engineID != "" {
		p = aKVString(p, "engine-id", engineID)
	}
	return aFrame(aHAProxyHello, aFin, 0, 0, p)
}

// aMessage appends a message with string arguments given as name, value
// pairs.
func aMessage(b []byte, name string, args ...string) []byte {
	b = astr(b, name)
	b = append(b, byte(len(args)/2))
	for i := 0; i+1 < len(args); i += 2 {
		b = aString(astr(b, args[i]), args[i+1])
	}
	return b
}

// aFrameRead is a frame read from the agent.
type aFrameRead struct {
	typ      byte
	flags    uint32
	sid, fid uint64
	payload  []byte
}

// aKV decodes a KV list of strings and integers (the agent's HELLO and
// DISCONNECT).
func (f aFrameRead) kv() map[string]interface{} {
	m := map[string]interface{}{}
	p := f.payload
	for len(p) > 0 {
		n, rest, ok := areadVarint(p)
		if !ok || uint64(len(rest)) < n+1 {
			break
		}
		k := string(rest[:n])
		typ := rest[n] & 0x0F
		rest = rest[n+1:]
		switch typ {
		case 8, 9:
			l, r2, ok := areadVarint(rest)
			if !ok || uint64(len(r2)) < l {
				return m
			}
			m[k], rest = string(r2[:l]), r2[l:]
		case 2, 3, 4, 5:
			x, r2, ok := areadVarint(rest)
			if !ok {
				return m
			}
			m[k], rest = x, r2
		default:
			return m
		}
		p = rest
	}
	return m
}

// attacker is one raw connection to the agent.
type attacker struct {
	t        testing.TB
	nc       net.Conn
	br       *bufio.Reader
	deadline time.Time // of read; zero: 30 s from the call
}

func attack(t testing.TB, addr string) *attacker {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return &attacker{t: t, nc: nc, br: bufio.NewReaderSize(nc, 512)}
}

// tryAttack is attack without the test's cleanup, for connections by the
// thousand that the caller closes.
func tryAttack(addr string) (*attacker, error) {
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	return &attacker{nc: nc, br: bufio.NewReaderSize(nc, 512)}, nil
}

func (p *attacker) send(b []byte) error {
	_ = p.nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := p.nc.Write(b)
	return err
}

// read returns the next frame from the agent.
func (p *attacker) read() (aFrameRead, error) {
	if p.deadline.IsZero() {
		_ = p.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	} else {
		_ = p.nc.SetReadDeadline(p.deadline)
	}
	var l [4]byte
	if _, err := io.ReadFull(p.br, l[:]); err != nil {
		return aFrameRead{}, err
	}
	n := binary.BigEndian.Uint32(l[:])
	if n < 5 || n > 16<<20 {
		return aFrameRead{}, fmt.Errorf("attack: frame length %d", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(p.br, b); err != nil {
		return aFrameRead{}, err
	}
	f := aFrameRead{typ: b[0], flags: binary.BigEndian.Uint32(b[1:])}
	rest := b[5:]
	var ok bool
	if f.sid, rest, ok = areadVarint(rest); !ok {
		return f, fmt.Errorf("attack: bad stream-id")
	}
	if f.fid, rest, ok = areadVarint(rest); !ok {
		return f, fmt.Errorf("attack: bad frame-id")
	}
	f.payload = rest
	return f, nil
}

// handshake sends a HELLO and returns the agent's answer.
func (p *attacker) handshake(caps, engineID string, maxFrame uint64) (aFrameRead, error) {
	if err := p.send(aHello(caps, engineID, maxFrame)); err != nil {
		return aFrameRead{}, err
	}
	return p.read()
}

func (p *attacker) close() { p.nc.Close() }

// liveHeap is the heap the process holds after a forced collection: what
// is reachable, whatever the collector's pace.
func liveHeap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// peakRSS is the process's peak resident memory (VmHWM), in bytes, or 0
// where /proc is not there.
func peakRSS() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			n, _ := strconv.ParseUint(f[1], 10, 64)
			return n << 10
		}
	}
	return 0
}

// heapSampler samples HeapAlloc (garbage included) every period until
// the function it returns is called, which returns the highest sample.
func heapSampler(period time.Duration) func() uint64 {
	stop, peak := make(chan struct{}), make(chan uint64, 1)
	go func() {
		var max uint64
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > max {
				max = ms.HeapAlloc
			}
			select {
			case <-stop:
				peak <- max
				return
			case <-time.After(period):
			}
		}
	}()
	return func() uint64 { close(stop); return <-peak }
}

// discardLogger logs nothing and keeps nothing: the suite's null logger
// keeps every entry, which the measures would count.
func discardLogger() logrus.FieldLogger {
	l := logrus.New()
	l.Out = io.Discard
	l.SetLevel(logrus.DebugLevel) // formatted, as in production, then dropped
	return l
}

// mib formats a byte count for the logs.
func mib(n uint64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// TestAttackClientSpeaksSPOP: the attack client's encoder and decoder
// agree with the agent on a plain exchange, so that what the attack tests
// measure is the agent's answer to a well-formed peer.
func TestAttackClientSpeaksSPOP(t *testing.T) {
	a := New(func(msgs []Message) ([]Action, error) {
		return []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: len(msgs)}}, nil
	})
	p := attack(t, startAgent(t, a))
	f, err := p.handshake("pipelining,async", "fd8efb6b-f040-467f-a827-f1eecdc3803a", 16380)
	require.NoError(t, err)
	require.Equal(t, byte(aAgentHello), f.typ)
	kv := f.kv()
	require.Equal(t, "2.0", kv["version"])
	require.Equal(t, uint64(16380), kv["max-frame-size"])
	require.Equal(t, "pipelining,async,fragmentation", kv["capabilities"])
	payload := aMessage(aMessage(nil, "m1", "a", "x"), "m2")
	require.NoError(t, p.send(aFrame(aNotify, aFin, 300, 2, payload)))
	f, err = p.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAck), f.typ)
	require.Equal(t, uint64(300), f.sid)
	require.Equal(t, uint64(2), f.fid)
	// set-var(1) nb-args(3) scope txn(2) name "n" int64 2
	require.Equal(t, []byte{1, 3, 2, 1, 'n', 4, 2}, f.payload)
}

// TestAttackOversizedUint32: a HELLO whose max-frame-size is a UINT32
// holding 2^32+1000 is refused with "invalid frame", not read as 1000.
func TestAttackOversizedUint32(t *testing.T) {
	a := New(seedHandler)
	p := attack(t, startAgent(t, a))
	f, err := p.handshake("pipelining", "e", 1<<32+1000)
	require.NoError(t, err)
	require.Equal(t, byte(aAgentDisc), f.typ)
	require.Equal(t, uint64(StatusInvalidFrame), f.kv()["status-code"])
	// The same value as a UINT64 is a size like any other: capped.
	p = attack(t, startAgent(t, New(seedHandler)))
	pl := aKVString(nil, "supported-versions", "2.0")
	pl = aKVInt(pl, "max-frame-size", aUint64, 1<<32+1000)
	require.NoError(t, p.send(aFrame(aHAProxyHello, aFin, 0, 0, pl)))
	f, err = p.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAgentHello), f.typ)
	require.Equal(t, uint64(DefaultMaxFrameSize), f.kv()["max-frame-size"])
}

// engineID returns a distinct engine-id of n bytes (HAProxy's are 36-byte
// UUIDs, which n = 36 imitates).
func engineID(i, n int) string {
	id := fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i)
	if n > len(id) {
		id += strings.Repeat("x", n-len(id))
	}
	return id[:n]
}

// TestAttackEngineChurn (issue 11, case 3): short connections, each a
// HELLO with async and an engine-id of its own, then a close. The engines
// they leave must stay within the memory model: none lingers when it has
// nothing to deliver, and never more than MaxEngines.
//
// SPOE_ATTACK_FULL=1: 100,000 connections (SPOE_ATTACK_ENGINES), 36-byte
// ids (SPOE_ATTACK_ENGINE_ID_LEN, 16000 for the long ids).
func TestAttackEngineChurn(t *testing.T) {
	n := attackSize(t, "SPOE_ATTACK_ENGINES", 2000, 100000)
	idLen := attackSize(t, "SPOE_ATTACK_ENGINE_ID_LEN", 36, 36)
	a := New(seedHandler)
	a.Logger = discardLogger()
	addr := startAgent(t, a)
	base := liveHeap()
	sampled := heapSampler(10 * time.Millisecond)
	start := time.Now()
	const workers = 8
	errs := make(chan error, workers)
	var hellos, refusals [workers]int
	for w := 0; w < workers; w++ {
		go func(w int) {
			for i := w; i < n; i += workers {
				p, err := tryAttack(addr)
				if err != nil {
					errs <- err
					return
				}
				_ = p.nc.(*net.TCPConn).SetLinger(0) // no TIME_WAIT: 100,000 ports
				f, err := p.handshake("pipelining,async", engineID(i, idLen), 16380)
				p.close()
				if err != nil {
					errs <- err
					return
				}
				switch f.typ {
				case aAgentHello:
					hellos[w]++
				case aAgentDisc:
					refusals[w]++
				}
			}
			errs <- nil
		}(w)
	}
	for w := 0; w < workers; w++ {
		require.NoError(t, <-errs)
	}
	waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "every connection closed")
	took := time.Since(start)
	peak := sampled()
	live := liveHeap()
	engines := a.engines.count()
	var h, r int
	for w := range hellos {
		h, r = h+hellos[w], r+refusals[w]
	}
	grown := int64(live) - int64(base)
	t.Logf("%d connections (%d answered, %d refused), engine-id %d bytes, in %v: %d engines held; live heap %s -> %s (%+.1f MiB, %.0f bytes per connection); sampled peak heap %s; peak RSS %s",
		n, h, r, idLen, took.Round(time.Millisecond), engines, mib(base), mib(live), float64(grown)/(1<<20), float64(grown)/float64(n), mib(peak), mib(peakRSS()))
	require.Equal(t, n, h+r, "every HELLO answered")
	require.LessOrEqual(t, engines, engineBound(a), "engines held")
	require.Less(t, grown, int64(engineBound(a))*engineCostBound+4<<20, "live heap within the memory model")
	waitFor(t, func() bool { return a.engines.count() == 0 }, "no engine lingers with nothing due")
}

// TestAttackSimpleAPIAmplification (issue 11, case 4): NOTIFYs of 1 MiB,
// each of 524,264 empty messages (the peer announced a big
// max-frame-size), in flight at once on connections of their own, to an
// agent on the simple API. Decoded, each would be ~37 MiB; the agent must
// refuse them before decoding, with the error variable in their ACK, while
// a well-behaved connection is answered.
//
// SPOE_ATTACK_FULL=1: 40 in flight (SPOE_ATTACK_AMPLIFY).
func TestAttackSimpleAPIAmplification(t *testing.T) {
	n := attackSize(t, "SPOE_ATTACK_AMPLIFY", 4, 40)
	const msgs = 524264
	decoded := make(chan struct{}, n)
	release := make(chan struct{})
	a := New(func(m []Message) ([]Action, error) {
		if len(m) > 1 {
			decoded <- struct{}{}
			<-release // hold what was decoded, as a slow handler would
			runtime.KeepAlive(m)
			return nil, nil
		}
		return []Action{ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true}}, nil
	})
	a.Logger = discardLogger()
	addr := startAgent(t, a)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	payload := make([]byte, 0, 2*msgs)
	for i := 0; i < msgs; i++ {
		payload = append(payload, 0, 0) // name "", no argument
	}
	bomb := aFrame(aNotify, aFin, 1, 1, payload)
	require.LessOrEqual(t, len(bomb)-4, DefaultMaxFrameSize)

	good := attack(t, addr)
	_, err := good.handshake("pipelining", "good", 16380)
	require.NoError(t, err)
	base := liveHeap()

	// Sample the heap while the bombs are in flight.
	sampled := heapSampler(2 * time.Millisecond)
	peers := make([]*attacker, n)
	for i := range peers {
		peers[i] = attack(t, addr)
		_, err := peers[i].handshake("pipelining", "bomb", 2<<20)
		require.NoError(t, err)
	}
	start := time.Now()
	for _, p := range peers {
		go func(p *attacker) { _ = p.send(bomb) }(p)
	}
	// The well-behaved connection is answered meanwhile.
	require.NoError(t, good.send(aFrame(aNotify, aFin, 7, 1, aMessage(nil, "m", "a", "b"))))
	f, err := good.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAck), f.typ)
	goodLatency := time.Since(start)

	// Each bomb is either refused (an ACK with the error variable) or, as
	// before the fix, decoded and held by the handler.
	acks := make(chan error, n)
	for _, p := range peers {
		go func(p *attacker) {
			f, err := p.read()
			if err == nil && (f.typ != aAck || string(f.payload) != errorVarACK) {
				err = fmt.Errorf("attack: frame %d %x instead of the error ACK", f.typ, f.payload)
			}
			acks <- err
		}(p)
	}
	answered, held := 0, 0
	var liveInFlight uint64
	for answered+held < n {
		select {
		case <-decoded:
			held++
		case err := <-acks:
			require.NoError(t, err)
			answered++
		}
	}
	if held > 0 {
		liveInFlight = liveHeap() // the decoded bombs are held by the handler
	}
	peak := sampled()
	if liveInFlight == 0 {
		liveInFlight = liveHeap()
	}
	close(release)
	t.Logf("%d NOTIFYs of %d empty messages (%d bytes): %d refused, %d decoded; live heap %s before, %s with them in flight; sampled peak heap %s (%+.1f MiB, %.1f MiB per NOTIFY); peak RSS %s; well-behaved ACK after %v",
		n, msgs, len(bomb), answered, held, mib(base), mib(liveInFlight), mib(peak),
		float64(peak-base)/(1<<20), float64(peak-base)/(1<<20)/float64(n), mib(peakRSS()), goodLatency.Round(time.Millisecond))
	require.Zero(t, held, "no bomb reached the handler")
	require.Equal(t, n, answered)
	require.Less(t, peak-base, uint64(n)*notifyCostBound+16<<20, "heap within the memory model")
}

// errorVarACK is the payload of an ACK that sets txn.<prefix>.error:
// set-var(1) nb-args(3) scope txn(2) name "error" BOOL true.
const errorVarACK = "\x01\x03\x02\x05error\x11"

// Bounds of the memory model (docs-memory-model.md) the attack tests hold
// the agent to.
const (
	engineCostBound = 1 << 10 // one engine: its struct, id and registry entry
	notifyCostBound = 3 << 20 // one NOTIFY of 1 MiB refused by the simple API: its frame, a copy, its index
)

func engineBound(a *Agent) int { return a.maxEngines() }

// TestAttackEnginesBounded: engines that must linger (their connection
// left with a handler running) are bounded by MaxEngines; a connection
// with one engine-id too many is served without async, and counted. The
// lingering engines still deliver their ACKs to the next connection of
// their engine-id.
func TestAttackEnginesBounded(t *testing.T) {
	g := newGate()
	g.started = make(chan struct{}, 64)
	const max, n = 8, 20
	a := &Agent{Handler: g, MaxEngines: max}
	addr := startAgent(t, a)
	granted := 0
	for i := 0; i < n; i++ {
		p := attack(t, addr)
		f, err := p.handshake("pipelining,async", engineID(i, 36), 16380)
		require.NoError(t, err)
		require.Equal(t, byte(aAgentHello), f.typ)
		caps := f.kv()["capabilities"]
		if i < max {
			require.Equal(t, "pipelining,async,fragmentation", caps, "engine %d", i)
			granted++
		} else {
			require.Equal(t, "pipelining,fragmentation", caps, "engine %d: MaxEngines reached", i)
		}
		require.NoError(t, p.send(aFrame(aNotify, aFin, uint64(100+i), 1, aMessage(nil, "slow"))))
		<-g.started
		p.close()
		waitFor(t, func() bool { return a.Stats().ConnsOpen == 0 }, "closed")
		require.LessOrEqual(t, a.engines.count(), max)
	}
	require.Equal(t, max, a.engines.count(), "engines with a handler running linger")
	require.Equal(t, uint64(n-max), a.Stats().AsyncRefused)

	// A known engine-id is still admitted when the registry is full.
	p := attack(t, addr)
	f, err := p.handshake("pipelining,async", engineID(3, 36), 16380)
	require.NoError(t, err)
	require.Equal(t, "pipelining,async,fragmentation", f.kv()["capabilities"])
	close(g.release)
	f, err = p.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAck), f.typ)
	require.Equal(t, uint64(103), f.sid, "the lingering engine's ACK on its next connection")
	waitFor(t, func() bool { return !strings.Contains(packageGoroutines(), "(*engine).pump") },
		"no goroutine kept once the ACKs are delivered")
	// The ACKs of the connections without async found no connection.
	waitFor(t, func() bool { return a.Stats().ACKsDropped >= n-max }, "ACKs without async dropped")
}

// TestAttackLongEngineID: an engine-id longer than 128 bytes is refused
// with "invalid frame"; 128 bytes are taken.
func TestAttackLongEngineID(t *testing.T) {
	a := New(seedHandler)
	addr := startAgent(t, a)
	p := attack(t, addr)
	f, err := p.handshake("pipelining,async", engineID(1, 16000), 16380)
	require.NoError(t, err)
	require.Equal(t, byte(aAgentDisc), f.typ)
	require.Equal(t, uint64(StatusInvalidFrame), f.kv()["status-code"])
	p = attack(t, addr)
	f, err = p.handshake("pipelining,async", engineID(2, 128), 16380)
	require.NoError(t, err)
	require.Equal(t, byte(aAgentHello), f.typ)
	require.Equal(t, "pipelining,async,fragmentation", f.kv()["capabilities"])
}

// TestEngineEndsWhenNothingDue: an engine whose last connection leaves
// with nothing due goes away without lingering, and its goroutine, made
// only to deliver, is gone with it.
func TestEngineEndsWhenNothingDue(t *testing.T) {
	a := New(seedHandler)
	addr := startAgent(t, a)
	p := attack(t, addr)
	_, err := p.handshake("pipelining,async", "short-lived", 16380)
	require.NoError(t, err)
	require.NoError(t, p.send(aFrame(aNotify, aFin, 1, 1, aMessage(nil, "m"))))
	f, err := p.read()
	require.NoError(t, err)
	require.Equal(t, byte(aAck), f.typ)
	require.True(t, a.engines.has("short-lived"))
	p.close()
	waitFor(t, func() bool { return !a.engines.has("short-lived") }, "the engine gone")
	assert.Zero(t, a.Stats().ACKsDropped)
}

// TestSimpleAPIDecodeLimits: the simple API decodes a NOTIFY of up to
// MaxNotifyMessages messages and MaxNotifyArgs arguments; one more of
// either is answered with the error variable without calling the handler,
// and counted. The zero-copy Handler is not bound by them.
func TestSimpleAPIDecodeLimits(t *testing.T) {
	calls := 0
	a := New(func(m []Message) ([]Action, error) {
		calls++
		return []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: len(m)}}, nil
	})
	a.MaxNotifyMessages, a.MaxNotifyArgs = 10, 20
	p := attack(t, startAgent(t, a))
	_, err := p.handshake("pipelining", "e", 16380)
	require.NoError(t, err)
	notify := func(sid uint64, msgs, argsEach int) aFrameRead {
		var payload []byte
		for i := 0; i < msgs; i++ {
			var args []string
			for j := 0; j < argsEach; j++ {
				args = append(args, fmt.Sprint("a", j), "v")
			}
			payload = aMessage(payload, fmt.Sprint("m", i), args...)
		}
		require.NoError(t, p.send(aFrame(aNotify, aFin, sid, 1, payload)))
		f, err := p.read()
		require.NoError(t, err)
		require.Equal(t, byte(aAck), f.typ)
		require.Equal(t, sid, f.sid)
		return f
	}
	assert.Equal(t, []byte{1, 3, 2, 1, 'n', 4, 10}, notify(1, 10, 2).payload, "10 messages, 20 arguments: decoded")
	assert.Equal(t, errorVarACK, string(notify(2, 11, 0).payload), "11 messages")
	assert.Equal(t, errorVarACK, string(notify(3, 7, 3).payload), "21 arguments")
	assert.Equal(t, 1, calls, "the handler saw only the NOTIFY within the limits")
	assert.Equal(t, uint64(2), a.Stats().NotifyRefused)
	assert.Zero(t, a.Stats().HandlerErrors)

	// The zero-copy path reads any NOTIFY in place.
	z := &Agent{MaxNotifyMessages: 1, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		return w.SetInt(VarScopeTransaction, "n", int64(r.NumMessages()))
	})}
	p = attack(t, startAgent(t, z))
	_, err = p.handshake("pipelining", "e", 16380)
	require.NoError(t, err)
	require.NoError(t, p.send(aFrame(aNotify, aFin, 1, 1, aMessage(aMessage(nil, "a"), "b"))))
	f, err := p.read()
	require.NoError(t, err)
	assert.Equal(t, []byte{1, 3, 2, 1, 'n', 4, 2}, f.payload)
}

// TestEngineHeldBytesBounded: the ACKs all engines hold for a connection
// to come are bounded in number per engine and in bytes per agent; what
// does not fit is refused (the caller drops and counts it), and what is
// held is dropped, counted and given back when the engine ends.
func TestEngineHeldBytesBounded(t *testing.T) {
	a := &Agent{}
	a.init()
	defer a.Close()
	r := &a.engines
	r.mu.Lock()
	r.m = map[string]*engine{"x": {id: "x", registry: r}, "y": {id: "y", registry: r}}
	x, y := r.m["x"], r.m["y"]
	r.mu.Unlock()
	ack := ackFrame(1)
	big := make([]byte, 0, 1<<20)
	for len(big)+len(ack) <= 1<<20 {
		big = append(big, ack...)
	}
	for i := 0; i < engineQueue; i++ {
		if !y.send(ackFrame(uint64(i))) {
			t.Fatalf("ACK %d refused before the engine's queue is full", i)
		}
	}
	assert.False(t, y.send(ackFrame(1)), "over the engine's queue")
	taken := 0
	for x.send(append([]byte(nil), big...)) {
		taken++
	}
	assert.Equal(t, (maxHeldACKBytes-engineQueue*len(ack))/len(big), taken, "up to the agent's budget")
	assert.LessOrEqual(t, r.heldBytes.Load(), int64(maxHeldACKBytes))
	r.endAll()
	assert.Zero(t, r.heldBytes.Load(), "given back")
	assert.Equal(t, uint64(taken*countFrames(big)+engineQueue), a.Stats().ACKsDropped)
	assert.False(t, x.send(ackFrame(1)), "an ended engine takes nothing")
}

// countingWriter counts the bytes written to it.
type countingWriter struct{ n atomic.Int64 }

func (w *countingWriter) Write(b []byte) (int, error) { w.n.Add(int64(len(b))); return len(b), nil }

// TestAttackPanicStormLog: connections pipelining NOTIFYs at a handler
// that panics on every one. The log stays small (one stack per 10 s, then
// a summary), every panic is answered with the error variable and counted.
//
// CI: 2 s; SPOE_ATTACK_FULL=1: 20 s (SPOE_ATTACK_STORM_SECONDS).
func TestAttackPanicStormLog(t *testing.T) {
	secs := attackSize(t, "SPOE_ATTACK_STORM_SECONDS", 2, 20)
	out := &countingWriter{}
	logger := logrus.New()
	logger.Out = out
	a := &Agent{Logger: logger, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		panic("storm")
	})}
	addr := startAgent(t, a)
	notify := aFrame(aNotify, aFin, 1, 1, aMessage(nil, "m"))
	batch := make([]byte, 0, 20*len(notify))
	for i := 0; i < 20; i++ {
		batch = append(batch, notify...)
	}
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	errs := make(chan error, 4)
	var answered atomic.Int64
	for i := 0; i < 4; i++ {
		p := attack(t, addr)
		_, err := p.handshake("pipelining", "storm", 16380)
		require.NoError(t, err)
		go func() {
			for time.Now().Before(deadline) {
				if err := p.send(batch); err != nil {
					errs <- err
					return
				}
				for j := 0; j < 20; j++ {
					f, err := p.read()
					if err == nil && (f.typ != aAck || string(f.payload) != errorVarACK) {
						err = fmt.Errorf("frame %d %x instead of the error ACK", f.typ, f.payload)
					}
					if err != nil {
						errs <- err
						return
					}
					answered.Add(1)
				}
			}
			errs <- nil
		}()
	}
	for i := 0; i < 4; i++ {
		require.NoError(t, <-errs)
	}
	st := a.Stats()
	t.Logf("panic storm for %ds: %d panics answered, %d counted, %d bytes of log (%.0f per panic)",
		secs, answered.Load(), st.HandlerPanics, out.n.Load(), float64(out.n.Load())/float64(answered.Load()))
	assert.Equal(t, uint64(answered.Load()), st.HandlerPanics, "every panic counted")
	assert.Less(t, out.n.Load(), int64(secs/10+1)*16<<10, "one stack per 10 s")
}
