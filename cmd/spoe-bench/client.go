package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// maxFrameSize is the max-frame-size spoe-bench announces, HAProxy's
// default (tune.bufsize - 4).
const maxFrameSize = 16380

// Error kinds, counted over the run.
const (
	errHandshake  = iota // bad AGENT-HELLO, or none
	errFrame             // malformed frame, or a frame type HAProxy would refuse
	errIDs               // an ACK that matches no pending NOTIFY
	errActions           // an ACK whose actions are not the expected answer
	errDisconnect        // an AGENT-DISCONNECT during the run, or a bad one at its end
	errIO                // connection closed or failed
	errTimeout           // a NOTIFY still unanswered -timeout after the run
	numErrors
)

var errorNames = [numErrors]string{"handshake", "frame", "ids", "actions", "disconnect", "io", "timeout"}

// config is what one run does.
type config struct {
	addr         string // host:port, or unix:PATH
	conns        int
	inflight     int
	pipelining   bool
	workload     *workload
	slowFraction float64
	slowDelay    time.Duration
	warmup       time.Duration
	duration     time.Duration
	timeout      time.Duration
}

// result is what one connection, then the whole run, measured inside the
// measurement window.
type result struct {
	requests uint64
	slow     uint64
	all      histogram // every request
	fast     histogram // mixed workload: the requests with delay-ms 0
	slowH    histogram // mixed workload: the slow ones
	errors   [numErrors]uint64
	firstErr string // the first error seen, for the report
}

func (r *result) fail(kind int, format string, args ...interface{}) {
	r.errors[kind]++
	if r.firstErr == "" {
		r.firstErr = errorNames[kind] + ": " + fmt.Sprintf(format, args...)
	}
}

func (r *result) merge(o *result) {
	r.requests += o.requests
	r.slow += o.slow
	r.all.merge(&o.all)
	r.fast.merge(&o.fast)
	r.slowH.merge(&o.slowH)
	for i, n := range o.errors {
		r.errors[i] += n
	}
	if r.firstErr == "" {
		r.firstErr = o.firstErr
	}
}

// slot is one request in flight on a connection; its frame-id is its index
// plus one, so that an ACK finds its slot at once.
type slot struct {
	sid  uint64
	sent time.Duration
	slow bool
	busy bool
}

// client drives one connection.
type client struct {
	cfg   *config
	nc    net.Conn
	epoch time.Time // the run's start; times are durations since it
	from  time.Duration
	until time.Duration
	slots []slot
	busy  int
	sid   uint64
	rng   uint64
	in    []byte
	out   []byte
	res   result
}

func dial(addr string) (net.Conn, error) {
	if len(addr) > 5 && addr[:5] == "unix:" {
		return net.Dial("unix", addr[5:])
	}
	return net.Dial("tcp", addr)
}

func (c *client) now() time.Duration { return time.Since(c.epoch) }

// run drives the connection: handshake, NOTIFYs until the end of the
// window, then the answers still due, then DISCONNECT.
func (c *client) run(id int) {
	c.rng = uint64(id)*0x9E3779B97F4A7C15 + 1
	c.in = make([]byte, 0, 64<<10)
	c.slots = make([]slot, c.cfg.inflight)
	defer c.nc.Close()
	if err := c.handshake(id); err != nil {
		c.res.fail(errHandshake, "%v", err)
		return
	}
	for i := range c.slots {
		c.send(i)
	}
	if !c.flush() {
		return
	}
	// Every read is bounded by the end of the run plus -timeout.
	_ = c.nc.SetReadDeadline(c.epoch.Add(c.until + c.cfg.timeout))
	var f frame
	for c.busy > 0 {
		n, err := c.nc.Read(c.in[len(c.in):cap(c.in)])
		c.in = c.in[:len(c.in)+n]
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				c.res.errors[errTimeout] += uint64(c.busy)
				if c.res.firstErr == "" {
					c.res.firstErr = fmt.Sprintf("timeout: %d NOTIFY unanswered %v after the run", c.busy, c.cfg.timeout)
				}
			} else {
				c.res.fail(errIO, "%v (%d NOTIFY unanswered)", err, c.busy)
			}
			return
		}
		now := c.now()
		p := c.in
		for {
			size, err := nextFrame(p, maxFrameSize, &f)
			if err != nil {
				c.res.fail(errFrame, "%v", err)
				return
			}
			if size == 0 {
				break
			}
			p = p[size:]
			if !c.onFrame(&f, now) {
				return
			}
		}
		// Keep the partial frame at the start of the buffer.
		c.in = c.in[:copy(c.in, p)]
		if len(c.in) == cap(c.in) {
			c.in = append(c.in, make([]byte, len(c.in))...)[:len(c.in)]
		}
		if !c.flush() {
			return
		}
	}
	c.disconnect()
}

// onFrame checks one frame from the agent; it reports false when the
// connection must stop.
func (c *client) onFrame(f *frame, now time.Duration) bool {
	switch f.typ {
	case frameAck:
	case frameAgentDisconnect:
		c.res.fail(errDisconnect, "AGENT-DISCONNECT during the run: %s", describeDisconnect(f.payload))
		return false
	default:
		c.res.fail(errFrame, "frame type %d", f.typ)
		return false
	}
	if f.flags&flagFin == 0 || f.flags&flagAbort != 0 {
		c.res.fail(errFrame, "ACK flags %#x", f.flags)
		return false
	}
	i := int(f.fid) - 1
	if f.fid == 0 || i >= len(c.slots) || !c.slots[i].busy || c.slots[i].sid != f.sid {
		c.res.fail(errIDs, "ACK stream-id %d frame-id %d matches no NOTIFY in flight", f.sid, f.fid)
		return false
	}
	s := &c.slots[i]
	s.busy = false
	c.busy--
	if msg := c.cfg.workload.checkACK(f.payload, f.sid); msg != "" {
		c.res.fail(errActions, "stream-id %d: %s", f.sid, msg)
	} else if now >= c.from && now < c.until {
		lat := now - s.sent
		c.res.requests++
		c.res.all.add(lat)
		if s.slow {
			c.res.slow++
			c.res.slowH.add(lat)
		} else {
			c.res.fast.add(lat)
		}
	}
	if now < c.until {
		c.send(i)
	}
	return true
}

// send queues a new NOTIFY in slot i.
func (c *client) send(i int) {
	c.sid++
	s := &c.slots[i]
	*s = slot{sid: c.sid, busy: true}
	var delay int64
	if c.cfg.slowFraction > 0 {
		// xorshift64: the same sequence of slow requests every run.
		c.rng ^= c.rng << 13
		c.rng ^= c.rng >> 7
		c.rng ^= c.rng << 17
		if float64(c.rng>>11)/(1<<53) < c.cfg.slowFraction {
			s.slow = true
			delay = c.cfg.slowDelay.Milliseconds()
		}
	}
	c.out = c.cfg.workload.appendNotify(c.out, s.sid, uint64(i+1), delay)
	s.sent = c.now()
	c.busy++
}

func (c *client) flush() bool {
	if len(c.out) == 0 {
		return true
	}
	_, err := c.nc.Write(c.out)
	c.out = c.out[:0]
	if err != nil {
		c.res.fail(errIO, "%v", err)
		return false
	}
	return true
}

// handshake sends HAPROXY-HELLO as HAProxy does and checks the AGENT-HELLO.
func (c *client) handshake(id int) error {
	caps := ""
	if c.cfg.pipelining {
		// As HAProxy 2.6 to 3.0 offer by default: an agent may decline
		// pipelining to a HAProxy that offers it without async (the 3.1+
		// multiplexer; spoe does, see its README's "Known HAProxy issues").
		caps = "pipelining,async"
	}
	b, start := startFrame(nil, frameHAProxyHello, flagFin, 0, 0)
	b = putBytes(b, "supported-versions")
	b = append(b, tString)
	b = putBytes(b, "2.0")
	b = putBytes(b, "max-frame-size")
	b = append(b, tUint32)
	b = putVarint(b, maxFrameSize)
	b = putBytes(b, "capabilities")
	b = append(b, tString)
	b = putBytes(b, caps)
	b = putBytes(b, "engine-id")
	b = append(b, tString)
	b = putBytes(b, engineID(id))
	endFrame(b, start)
	_ = c.nc.SetDeadline(time.Now().Add(c.cfg.timeout))
	defer c.nc.SetDeadline(time.Time{})
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	f, err := c.readFrame()
	if err != nil {
		return err
	}
	if f.typ == frameAgentDisconnect {
		return fmt.Errorf("AGENT-DISCONNECT: %s", describeDisconnect(f.payload))
	}
	if f.typ != frameAgentHello || f.flags != flagFin || f.sid != 0 || f.fid != 0 {
		return fmt.Errorf("want AGENT-HELLO with FIN and ids 0, got type %d flags %#x ids %d/%d", f.typ, f.flags, f.sid, f.fid)
	}
	var version string
	var size uint64
	var agentCaps string
	err = kvList(f.payload, func(k string, v *typed) error {
		switch k {
		case "version":
			version = string(v.raw)
		case "max-frame-size":
			if !v.isInt() {
				return errors.New("max-frame-size is not an integer")
			}
			size = v.num
		case "capabilities":
			agentCaps = string(v.raw)
		}
		return nil
	})
	switch {
	case err != nil:
		return fmt.Errorf("AGENT-HELLO: %v", err)
	case version != "2.0":
		return fmt.Errorf("AGENT-HELLO version %q", version)
	case size < 256 || size > maxFrameSize:
		return fmt.Errorf("AGENT-HELLO max-frame-size %d", size)
	case c.cfg.pipelining && !hasCapability(agentCaps, "pipelining"):
		return fmt.Errorf("the agent does not pipeline (capabilities %q): run with -pipelining=false -inflight 1", agentCaps)
	}
	return nil
}

func hasCapability(list, want string) bool {
	for len(list) > 0 {
		i := 0
		for i < len(list) && list[i] != ',' {
			i++
		}
		item := list[:i]
		for len(item) > 0 && item[0] == ' ' {
			item = item[1:]
		}
		for len(item) > 0 && item[len(item)-1] == ' ' {
			item = item[:len(item)-1]
		}
		if item == want {
			return true
		}
		if i == len(list) {
			break
		}
		list = list[i+1:]
	}
	return false
}

// readFrame reads one whole frame, outside of the run's loop.
func (c *client) readFrame() (frame, error) {
	var f frame
	for {
		size, err := nextFrame(c.in, maxFrameSize, &f)
		if err != nil {
			return f, err
		}
		if size > 0 {
			// Copy the payload out: the buffer is reused.
			f.payload = append([]byte(nil), f.payload...)
			c.in = c.in[:copy(c.in, c.in[size:])]
			return f, nil
		}
		if len(c.in) == cap(c.in) {
			return f, errors.New("frame too big")
		}
		n, err := c.nc.Read(c.in[len(c.in):cap(c.in)])
		c.in = c.in[:len(c.in)+n]
		if err != nil {
			return f, err
		}
	}
}

// disconnect ends the connection as HAProxy does: HAPROXY-DISCONNECT
// "normal", then the agent must answer AGENT-DISCONNECT and close.
func (c *client) disconnect() {
	b, start := startFrame(nil, frameHAProxyDisconnect, flagFin, 0, 0)
	b = putBytes(b, "status-code")
	b = append(b, tUint32)
	b = putVarint(b, 0)
	b = putBytes(b, "message")
	b = append(b, tString)
	b = putBytes(b, "normal")
	endFrame(b, start)
	_ = c.nc.SetDeadline(time.Now().Add(c.cfg.timeout))
	if _, err := c.nc.Write(b); err != nil {
		c.res.fail(errDisconnect, "writing HAPROXY-DISCONNECT: %v", err)
		return
	}
	f, err := c.readFrame()
	switch {
	case err != nil:
		c.res.fail(errDisconnect, "no AGENT-DISCONNECT after HAPROXY-DISCONNECT: %v", err)
	case f.typ != frameAgentDisconnect:
		c.res.fail(errDisconnect, "frame type %d after HAPROXY-DISCONNECT", f.typ)
	default:
		if status := disconnectStatus(f.payload); status != 0 {
			c.res.fail(errDisconnect, "AGENT-DISCONNECT after HAPROXY-DISCONNECT: %s", describeDisconnect(f.payload))
		}
	}
}

func disconnectStatus(p []byte) int64 {
	status := int64(-1)
	_ = kvList(p, func(k string, v *typed) error {
		if k == "status-code" && v.isInt() {
			status = int64(v.num)
		}
		return nil
	})
	return status
}

func describeDisconnect(p []byte) string {
	status, msg := int64(-1), ""
	err := kvList(p, func(k string, v *typed) error {
		switch k {
		case "status-code":
			status = int64(v.num)
		case "message":
			msg = string(v.raw)
		}
		return nil
	})
	if err != nil {
		return "malformed payload"
	}
	return "status " + strconv.FormatInt(status, 10) + " " + strconv.Quote(msg)
}

// engineID returns a UUID-shaped engine-id, one per connection of this
// process: HAProxy sends one per process, but spoe-bench's connections are
// independent.
func engineID(id int) string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:], uint64(os.Getpid()))
	binary.BigEndian.PutUint64(b[8:], uint64(id))
	b[6] = b[6]&0x0F | 0x40
	b[8] = b[8]&0x3F | 0x80
	const h = "0123456789abcdef"
	out := make([]byte, 0, 36)
	for i, x := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out = append(out, '-')
		}
		out = append(out, h[x>>4], h[x&15])
	}
	return string(out)
}
