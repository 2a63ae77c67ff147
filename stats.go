package spoe

import (
	"expvar"
	"math/bits"
	"sync/atomic"
	"time"
)

// stats holds the agent's counters. Every field is updated atomically on
// the paths that count it, so that a snapshot can be taken at any time.
type stats struct {
	connsOpen  atomic.Int64
	connsTotal atomic.Uint64

	framesIn  [numFrameStats]atomic.Uint64
	framesOut [numFrameStats]atomic.Uint64
	writes    atomic.Uint64

	healthchecks       atomic.Uint64
	handlerErrors      atomic.Uint64
	handlerPanics      atomic.Uint64
	actionsRefused     atomic.Uint64
	acksDropped        atomic.Uint64
	acksRerouted       atomic.Uint64
	rescues            atomic.Uint64
	protocolErrors     atomic.Uint64
	notifyTooBig       atomic.Uint64
	reassemblyTimeouts atomic.Uint64
	asyncRefused       atomic.Uint64
	notifyRefused      atomic.Uint64

	disconnectsIn  [numStatusStats]atomic.Uint64
	disconnectsOut [numStatusStats]atomic.Uint64

	handlerLatency [latencyBuckets]atomic.Uint64
	handlerTime    atomic.Int64 // nanoseconds, sampled like handlerLatency

	messages messageTable
}

// Frame types counted, by index.
const (
	numFrameStats = 8 // UNSET, HAPROXY-HELLO, HAPROXY-DISCONNECT, NOTIFY, AGENT-HELLO, AGENT-DISCONNECT, ACK, other
)

func frameStat(t frameType) int {
	switch {
	case t <= frameNotify:
		return int(t)
	case t >= frameAgentHello && t <= frameAck:
		return int(t-frameAgentHello) + 4
	}
	return numFrameStats - 1
}

// Disconnect statuses counted: 0 to 13 each, then every other code.
const numStatusStats = int(StatusResourceAllocation) + 2

func statusStat(s Status) int {
	if s <= StatusResourceAllocation {
		return int(s)
	}
	return numStatusStats - 1
}

// countFramesOut adds sign (1 or -1) to the count of each whole frame of
// b by type: the frames a write hands to the kernel, or those it failed to.
func (s *stats) countFramesOut(b []byte, sign int) {
	var n [numFrameStats]uint64
	for f, rest, ok := splitFrame(b); ok; f, rest, ok = splitFrame(rest) {
		if len(f) > lengthSize {
			n[frameStat(frameType(f[lengthSize]))]++
		}
	}
	for i, k := range n {
		if k > 0 {
			if sign < 0 {
				k = -k // two's complement: Add subtracts
			}
			s.framesOut[i].Add(k)
		}
	}
}

func (s *stats) countDisconnect(status Status, fromHAProxy bool) {
	if fromHAProxy {
		s.disconnectsIn[statusStat(status)].Add(1)
	} else {
		s.disconnectsOut[statusStat(status)].Add(1)
	}
}

// processStart anchors monotime.
var processStart = time.Now()

// monotime reads the monotonic clock: time.Since reads only that clock for
// a time that carries it, where time.Now reads the wall clock too.
func monotime() time.Duration { return time.Since(processStart) }

// latencyBuckets is the number of handler latency buckets: bucket i counts
// calls that took less than 2^i microseconds (the last one, the rest).
const latencyBuckets = 24

// observeHandler counts n handler calls of duration d, on r's messages.
func (s *stats) observeHandler(d time.Duration, n uint64, r *Request) {
	i := latencyBucket(d)
	s.handlerLatency[i].Add(n)
	s.handlerTime.Add(int64(d) * int64(n))
	for _, m := range counted(r) {
		m.latency[i].Add(n)
		m.time.Add(int64(d) * int64(n))
	}
}

func latencyBucket(d time.Duration) int {
	i := bits.Len64(uint64(d / time.Microsecond))
	if i >= latencyBuckets {
		i = latencyBuckets - 1
	}
	return i
}

func latencyCounts(c *[latencyBuckets]atomic.Uint64) []LatencyBucket {
	b := make([]LatencyBucket, latencyBuckets)
	for i := range b {
		if i < latencyBuckets-1 {
			b[i].UpperBound = time.Duration(1<<i) * time.Microsecond
		}
		b[i].Count = c[i].Load()
	}
	return b
}

// Stats is a snapshot of an agent's counters, from Agent.Stats.
type Stats struct {
	ConnsOpen  int64  // connections open now
	ConnsTotal uint64 // connections accepted

	FramesIn  FrameCounts // frames received, by type
	FramesOut FrameCounts // frames sent, by type
	Writes    uint64      // write calls: frames sent together share one

	Healthchecks   uint64 // health-check HELLOs answered
	InFlight       int64  // NOTIFY frames being handled now
	HandlerErrors  uint64 // handler calls that returned an error
	HandlerPanics  uint64 // handler calls that panicked
	ActionsRefused uint64 // actions left out of an ACK (bad name, value or size)
	ACKsDropped    uint64 // ACKs that found no connection to leave on
	ACKsRerouted   uint64 // ACKs sent on another connection of their engine (async)
	Rescues        uint64 // handlers that outlasted the inline budget
	ProtocolErrors uint64 // connections closed for a protocol error
	NotifyTooBig   uint64 // fragmented NOTIFYs aborted for their size (1 MiB, or MaxReassemblyBytes in all)
	NotifyTimeouts uint64 // fragmented NOTIFYs aborted as unfinished within ReadTimeout
	AsyncRefused   uint64 // connections served without async: MaxEngines reached
	NotifyRefused  uint64 // NOTIFYs the simple API did not decode: MaxNotifyMessages or MaxNotifyArgs
	BufferBytes    int64  // bytes held now in the buffers MaxBufferBytes bounds
	BufferWaiting  int64  // readers and decodings waiting now for MaxBufferBytes

	// DisconnectsIn counts HAProxy's DISCONNECT frames by status code;
	// DisconnectsOut the agent's.
	DisconnectsIn  map[Status]uint64
	DisconnectsOut map[Status]uint64

	// HandlerLatency counts handler calls by duration: each bucket holds
	// the calls that took less than its UpperBound and at least the
	// previous bucket's. The last bucket's UpperBound is 0: no bound.
	// Reading the clock costs as much as a quick handler, so one call in 8
	// of each connection (its first, 9th, ...) is timed and counted 8
	// times: the counts are a sample, their sum close to the calls made.
	HandlerLatency []LatencyBucket
	// HandlerTime is the time spent in handlers, sampled the same way.
	HandlerTime time.Duration

	// Messages counts the NOTIFY frames by the names of their messages
	// (see MessageStats), for the first MaxStatsMessages names seen; the
	// frames of later names are counted together under OtherMessages. A
	// connection adds its requests to these counts before it writes their
	// ACKs, not one by one.
	Messages map[string]MessageStats
}

// FrameCounts counts frames by type.
type FrameCounts struct {
	Unset, HAProxyHello, HAProxyDisconnect, Notify uint64
	AgentHello, AgentDisconnect, ACK               uint64
	Other                                          uint64
}

// LatencyBucket is one bucket of Stats.HandlerLatency.
type LatencyBucket struct {
	UpperBound time.Duration
	Count      uint64
}

func frameCounts(c *[numFrameStats]atomic.Uint64) FrameCounts {
	return FrameCounts{
		Unset: c[0].Load(), HAProxyHello: c[1].Load(), HAProxyDisconnect: c[2].Load(), Notify: c[3].Load(),
		AgentHello: c[4].Load(), AgentDisconnect: c[5].Load(), ACK: c[6].Load(), Other: c[7].Load(),
	}
}

func statusCounts(c *[numStatusStats]atomic.Uint64) map[Status]uint64 {
	m := make(map[Status]uint64)
	for i := range c {
		if n := c[i].Load(); n > 0 {
			s := Status(i)
			if i == numStatusStats-1 {
				s = StatusUnknown
			}
			m[s] = n
		}
	}
	return m
}

// Stats returns a snapshot of the agent's counters. It may be called at
// any time, from any goroutine.
func (a *Agent) Stats() Stats {
	s := &a.stats
	st := Stats{
		ConnsOpen:      s.connsOpen.Load(),
		ConnsTotal:     s.connsTotal.Load(),
		FramesIn:       frameCounts(&s.framesIn),
		FramesOut:      frameCounts(&s.framesOut),
		Writes:         s.writes.Load(),
		Healthchecks:   s.healthchecks.Load(),
		InFlight:       a.sched.slots.inUse(),
		HandlerErrors:  s.handlerErrors.Load(),
		HandlerPanics:  s.handlerPanics.Load(),
		ActionsRefused: s.actionsRefused.Load(),
		ACKsDropped:    s.acksDropped.Load(),
		ACKsRerouted:   s.acksRerouted.Load(),
		Rescues:        s.rescues.Load(),
		ProtocolErrors: s.protocolErrors.Load(),
		NotifyTooBig:   s.notifyTooBig.Load(),
		NotifyTimeouts: s.reassemblyTimeouts.Load(),
		AsyncRefused:   s.asyncRefused.Load(),
		NotifyRefused:  s.notifyRefused.Load(),
		BufferBytes:    a.buffers.used.Load(),
		BufferWaiting:  int64(a.buffers.waiting.Load()),
		DisconnectsIn:  statusCounts(&s.disconnectsIn),
		DisconnectsOut: statusCounts(&s.disconnectsOut),
	}
	st.HandlerTime = time.Duration(s.handlerTime.Load())
	st.HandlerLatency = latencyCounts(&s.handlerLatency)
	st.Messages = s.messages.snapshot()
	return st
}

// Expvar returns the agent's Stats as an expvar.Var, to publish under a
// name of your choice (expvar.Publish panics on a name used twice):
//
//	expvar.Publish("spoe", agent.Expvar())
//
// It is then served as JSON at /debug/vars by expvar's handler.
func (a *Agent) Expvar() expvar.Var {
	return expvar.Func(func() interface{} { return a.Stats() })
}
