package main

import (
	"bytes"
	"encoding/hex"
	"math"
	"strings"
	"testing"
	"time"
)

// The vectors of SPOP.md §2, printed by a port of HAProxy's encode_varint.
var varintVectors = []struct {
	x   uint64
	hex string
}{
	{0, "00"},
	{239, "ef"},
	{240, "f000"},
	{241, "f100"},
	{256, "f001"},
	{2287, "ff7f"},
	{2288, "f08000"},
	{16380, "fcf006"},
	{264431, "ffff7f"},
	{264432, "f0808000"},
	{33818864, "f080808000"},
	{1<<32 - 1, "fff0fefe7e"},
	{1<<63 - 1, "fff0fefefefefefefe06"},
	{math.MaxUint64, "fff0fefefefefefefe0e"},
	{uint64(1<<64 - 2), "fef0fefefefefefefe0e"}, // int64 -2
}

func TestVarintVectors(t *testing.T) {
	for _, v := range varintVectors {
		want, _ := hex.DecodeString(v.hex)
		if got := putVarint(nil, v.x); !bytes.Equal(got, want) {
			t.Errorf("putVarint(%d) = % x, want % x", v.x, got, want)
		}
		// Followed by a byte that must not be consumed.
		x, n := getVarint(append(want, 0x55))
		if x != v.x || n != len(want) {
			t.Errorf("getVarint(% x) = %d, %d bytes; want %d, %d bytes", want, x, n, v.x, len(want))
		}
		for cut := 0; cut < len(want); cut++ {
			if _, n := getVarint(want[:cut]); n > 0 {
				t.Errorf("getVarint(% x) (cut) took %d bytes", want[:cut], n)
			}
		}
	}
}

// The byte lengths of SPOP.md §2: the first value of each length.
func TestVarintLengths(t *testing.T) {
	firsts := []uint64{0, 240, 2288, 264432, 33818864, 4328786160, 554084600048,
		70922828777712, 9078122083518704, 1161999626690365680}
	for i, x := range firsts {
		if got := len(putVarint(nil, x)); got != i+1 {
			t.Errorf("len(putVarint(%d)) = %d, want %d", x, got, i+1)
		}
		if x > 0 {
			if got := len(putVarint(nil, x-1)); got != i {
				t.Errorf("len(putVarint(%d)) = %d, want %d", x-1, got, i)
			}
		}
	}
	for x := uint64(0); x < 1<<20; x += 7 {
		if y, n := getVarint(putVarint(nil, x)); y != x || n <= 0 {
			t.Fatalf("round trip of %d: %d, %d", x, y, n)
		}
	}
}

func TestVarintTooLong(t *testing.T) {
	b, _ := hex.DecodeString("fffffffffffffffffffff0") // 11 bytes
	if _, n := getVarint(b); n > 0 {
		t.Errorf("an 11-byte varint was read (%d bytes)", n)
	}
	// "F0 80 00" is 2288: the continuation bit is added, not masked.
	if x, _ := getVarint([]byte{0xf0, 0x80, 0x00}); x != 2288 {
		t.Errorf("F0 80 00 = %d, want 2288", x)
	}
}

func TestTypedData(t *testing.T) {
	cases := []struct {
		hex   string
		typ   byte
		flags byte
		num   uint64
		raw   string
		n     int
	}{
		{"00", tNull, 0, 0, "", 1},
		{"11", tBool, 1, 0, "", 1},
		{"01", tBool, 0, 0, "", 1},
		{"0464", tInt64, 0, 100, "", 2},
		{"03fcf006", tUint32, 0, 16380, "", 4},
		{"067f000001", tIPv4, 0, 0, "\x7f\x00\x00\x01", 5},
		{"080568656c6c6f", tString, 0, 0, "hello", 7},
		{"0800", tString, 0, 0, "", 2},
		{"090201ff", tBinary, 0, 0, "\x01\xff", 4},
	}
	for _, c := range cases {
		b, _ := hex.DecodeString(c.hex)
		var v typed
		n := getTyped(b, &v)
		if n != c.n || v.typ != c.typ || v.flags != c.flags || v.num != c.num || string(v.raw) != c.raw {
			t.Errorf("getTyped(%s) = %+v, %d", c.hex, v, n)
		}
	}
	for _, bad := range []string{"", "04", "04f0", "06010203", "0805abcd", "0a", "0f"} {
		b, _ := hex.DecodeString(bad)
		var v typed
		if n := getTyped(b, &v); n > 0 {
			t.Errorf("getTyped(%q) took %d bytes, want an error", bad, n)
		}
	}
}

// An ACK frame of SPOP.md §5.4: length, type 103, flags FIN, ids, payload.
func TestNextFrame(t *testing.T) {
	b, _ := hex.DecodeString("0000000767000000010203")
	var f frame
	n, err := nextFrame(b, maxFrameSize, &f)
	if err != nil || n != len(b) || f.typ != frameAck || f.flags != flagFin || f.sid != 2 || f.fid != 3 || len(f.payload) != 0 {
		t.Fatalf("nextFrame = %+v, %d, %v", f, n, err)
	}
	if n, err := nextFrame(b[:6], maxFrameSize, &f); n != 0 || err != nil {
		t.Errorf("partial frame: %d, %v; want 0, nil", n, err)
	}
	if _, err := nextFrame([]byte{0, 1, 0, 0, 0}, maxFrameSize, &f); err == nil {
		t.Error("a frame above max-frame-size was accepted")
	}
	if _, err := nextFrame([]byte{0, 0, 0, 2, 103, 0}, maxFrameSize, &f); err == nil {
		t.Error("a frame shorter than its header was accepted")
	}
	// The frame spoe-bench writes reads back.
	out, start := startFrame(nil, frameNotify, flagFin, 300, 7)
	out = append(out, "xyz"...)
	endFrame(out, start)
	if n, err := nextFrame(out, maxFrameSize, &f); err != nil || n != len(out) || f.sid != 300 || f.fid != 7 || string(f.payload) != "xyz" {
		t.Errorf("round trip: %+v, %d, %v", f, n, err)
	}
}

// setVar encodes a set-var action by hand, byte by byte.
func setVar(scope byte, name string, value ...byte) []byte {
	b := []byte{actSetVar, 3, scope, byte(len(name))}
	b = append(b, name...)
	return append(b, value...)
}

func TestCheckACK(t *testing.T) {
	ipRep, _ := newWorkload("ip-rep")
	heavy, _ := newWorkload("heavy")
	const sid = 0x1234abcd
	host := "h1234abcd.example.com"
	hostVal := append([]byte{tString, byte(len(host))}, host...)
	score := setVar(scopeSession, "score", tInt64, 100)
	join := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	cases := []struct {
		w       *workload
		actions []byte
		want    string // "" or a part of the error
	}{
		{ipRep, score, ""},
		{ipRep, setVar(scopeSession, "score", tInt32, 100), ""},
		{ipRep, setVar(scopeSession, "score", tUint64, 100), ""},
		{ipRep, nil, "missing"},
		{ipRep, setVar(scopeSession, "score", tInt64, 99), "integer 100"},
		{ipRep, setVar(scopeSession, "score", tString, 3, '1', '0', '0'), "integer 100"},
		{ipRep, setVar(scopeTxn, "score", tInt64, 100), "unexpected variable"},
		{ipRep, join(score, score), "twice"},
		{ipRep, join(score, setVar(scopeSession, "x", tBool|0x10)), "unexpected variable"},
		{ipRep, join(score, []byte{actUnsetVar, 2, scopeTxn, 1, 'x'}), "unset-var"},
		{ipRep, score[:len(score)-1], "malformed"},
		{heavy, join(score, setVar(scopeTxn, "host", hostVal...), setVar(scopeTxn, "ok", tBool|0x10)), ""},
		{heavy, join(setVar(scopeTxn, "ok", tBool|0x10), setVar(scopeTxn, "host", hostVal...), score), ""},
		{heavy, join(score, setVar(scopeTxn, "host", hostVal...)), "missing"},
		{heavy, join(score, setVar(scopeTxn, "host", hostVal...), setVar(scopeTxn, "ok", tBool)), "true"},
		{heavy, join(score, setVar(scopeTxn, "host", append([]byte{tString | 0x10}, hostVal[1:]...)...), setVar(scopeTxn, "ok", tBool|0x10)), "host"},
		{heavy, join(score, setVar(scopeTxn, "host", tString, 3, 'a', 'b', 'c'), setVar(scopeTxn, "ok", tBool|0x10)), "host"},
	}
	for i, c := range cases {
		got := c.w.checkACK(c.actions, sid)
		if c.want == "" && got != "" || c.want != "" && !strings.Contains(got, c.want) {
			t.Errorf("case %d (%s, % x): %q, want %q", i, c.w.name, c.actions, got, c.want)
		}
	}
}

// The NOTIFY frames of each workload decode as the contract says.
func TestNotifyFrames(t *testing.T) {
	for _, name := range []string{"ip-rep", "heavy", "mixed"} {
		w, err := newWorkload(name)
		if err != nil {
			t.Fatal(err)
		}
		b := w.appendNotify(nil, 0xabcdef, 5, 20)
		var f frame
		if n, err := nextFrame(b, maxFrameSize, &f); err != nil || n != len(b) || f.typ != frameNotify || f.sid != 0xabcdef || f.fid != 5 {
			t.Fatalf("%s: %+v, %d, %v", name, f, n, err)
		}
		p := f.payload
		msg, n := getBytes(p)
		if string(msg) != name {
			t.Fatalf("%s: message %q", name, msg)
		}
		p = p[n:]
		nargs := int(p[0])
		p = p[1:]
		args := map[string]typed{}
		for i := 0; i < nargs; i++ {
			k, n := getBytes(p)
			if n <= 0 {
				t.Fatalf("%s: arg %d name", name, i)
			}
			p = p[n:]
			var v typed
			if n = getTyped(p, &v); n <= 0 {
				t.Fatalf("%s: arg %s value", name, k)
			}
			p = p[n:]
			args[string(k)] = v
		}
		if len(p) != 0 || len(args) != nargs {
			t.Fatalf("%s: %d bytes left, %d distinct args of %d", name, len(p), len(args), nargs)
		}
		if ip := args["ip"]; ip.typ != tIPv4 || !bytes.Equal(ip.raw, []byte{10, 0xab, 0xcd, 0xef}) {
			t.Errorf("%s: ip %+v", name, ip)
		}
		switch name {
		case "heavy":
			if h := args["host"]; h.typ != tString || string(h.raw) != "h00abcdef.example.com" {
				t.Errorf("host %+v", h)
			}
			if len(args["headers"].raw) != 200 || args["clen"].num != 1234 || args["secure"].flags != 1 || len(args["body"].raw) != 32 {
				t.Errorf("heavy args %+v", args)
			}
		case "mixed":
			if d := args["delay-ms"]; d.typ != tInt64 || d.num != 20 {
				t.Errorf("delay-ms %+v", d)
			}
		}
	}
}

func TestHistogram(t *testing.T) {
	var h histogram
	for i := 1; i <= 100000; i++ {
		h.add(time.Duration(i) * time.Microsecond)
	}
	for _, q := range []float64{0.5, 0.99, 0.999} {
		want := q * 100000 * float64(time.Microsecond)
		got := float64(h.percentile(q))
		if got > want || got < want*(1-1.0/64)-float64(time.Microsecond) {
			t.Errorf("p%v = %v, want within 1.6%% below %v", q*100, time.Duration(got), time.Duration(want))
		}
	}
	for v := uint64(0); v < 1<<40; v = v*3/2 + 1 {
		i := bucketOf(v)
		if lo := lowerBound(i); lo > v || (i+1 < len(h.counts) && lowerBound(i+1) <= v) {
			t.Fatalf("value %d in bucket %d [%d, %d)", v, i, lo, lowerBound(i+1))
		}
	}
}
