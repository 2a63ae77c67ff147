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
	"testing"
	"time"

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
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func attack(t testing.TB, addr string) *attacker {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return &attacker{t: t, nc: nc, br: bufio.NewReaderSize(nc, 64<<10)}
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
	_ = p.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
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
