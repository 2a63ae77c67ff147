package main

import (
	"bytes"
	"fmt"
	"strconv"
)

// The workloads and what a correct agent answers. Any agent that follows
// this contract can be measured (examples/bench-agent does):
//
// ip-rep: message "ip-rep" with one argument, ip (IPV4, a different address
// per request). The ACK sets sess "score" to the integer 100 (any integer
// type) and nothing else.
//
// heavy: message "heavy" with 8 arguments: ip (IPV4), method, path and host
// (STRING; host is "h<8 hex digits>.example.com", different per request),
// headers (a 200-byte STRING), clen (INT64 1234), secure (BOOL true) and body
// (a 32-byte BINARY). The ACK sets, in any order and nothing else: sess
// "score" to the integer 100, txn "host" to the STRING of this request's
// host argument, txn "ok" to the BOOL true.
//
// mixed: message "mixed" with two arguments, ip (IPV4) and delay-ms (INT64).
// The agent waits delay-ms milliseconds before answering (a slow database,
// an HTTP call), then sets sess "score" to the integer 100 and nothing else.
// delay-ms is 0 for most requests and -slow-delay for the fraction
// -slow-fraction of them, so that the latency of the fast requests shows
// how much the slow ones hold them up.
type workload struct {
	name string
	// prefix and suffix surround the per-request part of the message list.
	prefix, suffix []byte
	// wants is the bit set of the set-vars expected in each ACK.
	wants uint8
}

const (
	wantScore = 1 << iota
	wantHost
	wantOK
)

func newWorkload(name string) (*workload, error) {
	w := &workload{name: name}
	switch name {
	case "ip-rep":
		w.prefix = putBytes(nil, "ip-rep")
		w.prefix = append(w.prefix, 1)
		w.prefix = putBytes(w.prefix, "ip")
		w.wants = wantScore
	case "mixed":
		w.prefix = putBytes(nil, "mixed")
		w.prefix = append(w.prefix, 2)
		w.prefix = putBytes(w.prefix, "ip")
		w.wants = wantScore
	case "heavy":
		p := putBytes(nil, "heavy")
		p = append(p, 8)
		p = putBytes(p, "method")
		p = append(p, tString)
		p = putBytes(p, "GET")
		p = putBytes(p, "path")
		p = append(p, tString)
		p = putBytes(p, "/api/v1/items/7f3a9c?lang=en&page=2")
		p = putBytes(p, "host")
		w.prefix = p
		s := putBytes(nil, "headers")
		s = append(s, tString)
		s = putBytes(s, headerBlock(200))
		s = putBytes(s, "clen")
		s = append(s, tInt64)
		s = putVarint(s, 1234)
		s = putBytes(s, "secure")
		s = append(s, tBool|0x10)
		s = putBytes(s, "body")
		s = append(s, tBinary)
		s = putVarint(s, 32)
		for i := 0; i < 32; i++ {
			s = append(s, byte(i*13+5))
		}
		s = putBytes(s, "ip")
		w.suffix = s
		w.wants = wantScore | wantHost | wantOK
	default:
		return nil, fmt.Errorf("unknown workload %q (want ip-rep, heavy or mixed)", name)
	}
	return w, nil
}

// headerBlock returns n bytes of plausible request headers.
func headerBlock(n int) string {
	const lines = "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0\r\n" +
		"accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n" +
		"accept-encoding: gzip, deflate, br\r\n" +
		"cookie: sid=5f0c3a9e2b7d4c18a6e1f09b3d2c7a45\r\n"
	return string(bytes.Repeat([]byte(lines), n/len(lines)+1)[:n])
}

const hexDigits = "0123456789abcdef"

// hostOf returns, appended to b, the host argument of the request with
// stream-id sid.
func hostOf(b []byte, sid uint64) []byte {
	b = append(b, 'h')
	for i := 28; i >= 0; i -= 4 {
		b = append(b, hexDigits[(sid>>uint(i))&15])
	}
	return append(b, ".example.com"...)
}

// appendNotify appends the NOTIFY frame of request (sid, fid); delayMs is
// the mixed workload's delay-ms.
func (w *workload) appendNotify(b []byte, sid, fid uint64, delayMs int64) []byte {
	b, start := startFrame(b, frameNotify, flagFin, sid, fid)
	b = append(b, w.prefix...)
	switch w.name {
	case "heavy":
		b = append(b, tString, 8+1+12)
		b = hostOf(b, sid)
		b = append(b, w.suffix...)
	}
	b = append(b, tIPv4, 10, byte(sid>>16), byte(sid>>8), byte(sid))
	if w.name == "mixed" {
		b = putBytes(b, "delay-ms")
		b = append(b, tInt64)
		b = putVarint(b, uint64(delayMs))
	}
	endFrame(b, start)
	return b
}

// checkACK checks the LIST-OF-ACTIONS of the ACK to request sid. It returns
// "" when it is the expected answer, or what is wrong.
func (w *workload) checkACK(p []byte, sid uint64) string {
	var got uint8
	var v typed
	var host [32]byte
	for len(p) > 0 {
		if len(p) < 3 {
			return "malformed action"
		}
		act, nargs, scope := p[0], p[1], p[2]
		p = p[3:]
		name, n := getBytes(p)
		if n <= 0 {
			return "malformed variable name"
		}
		p = p[n:]
		if act == actUnsetVar && nargs == 2 {
			return "unexpected unset-var " + string(name)
		}
		if act != actSetVar || nargs != 3 {
			return "malformed action " + strconv.Itoa(int(act))
		}
		if n = getTyped(p, &v); n <= 0 {
			return "malformed value of " + string(name)
		}
		p = p[n:]
		var bit uint8
		switch {
		case scope == scopeSession && string(name) == "score":
			if !v.isInt() || v.num != 100 {
				return "sess.score is not the integer 100"
			}
			bit = wantScore
		case w.wants&wantHost != 0 && scope == scopeTxn && string(name) == "host":
			if v.typ != tString || v.flags != 0 || !bytes.Equal(v.raw, hostOf(host[:0], sid)) {
				return "txn.host is not this request's host"
			}
			bit = wantHost
		case w.wants&wantOK != 0 && scope == scopeTxn && string(name) == "ok":
			if v.typ != tBool || v.flags != 1 {
				return "txn.ok is not the boolean true"
			}
			bit = wantOK
		default:
			return "unexpected variable " + strconv.Itoa(int(scope)) + "." + string(name)
		}
		if got&bit != 0 {
			return "variable set twice: " + string(name)
		}
		got |= bit
	}
	if got != w.wants {
		return "expected variables missing"
	}
	return ""
}
