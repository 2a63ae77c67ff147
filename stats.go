package spoe

import (
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

	healthchecks   atomic.Uint64
	handlerErrors  atomic.Uint64
	handlerPanics  atomic.Uint64
	actionsRefused atomic.Uint64
	acksDropped    atomic.Uint64
	acksRerouted   atomic.Uint64
	rescues        atomic.Uint64
	protocolErrors atomic.Uint64
	notifyTooBig   atomic.Uint64

	disconnectsIn  [numStatusStats]atomic.Uint64
	disconnectsOut [numStatusStats]atomic.Uint64

	handlerLatency [latencyBuckets]atomic.Uint64
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

func (s *stats) countDisconnect(status Status, fromHAProxy bool) {
	if fromHAProxy {
		s.disconnectsIn[statusStat(status)].Add(1)
	} else {
		s.disconnectsOut[statusStat(status)].Add(1)
	}
}

// latencyBuckets is the number of handler latency buckets: bucket i counts
// calls that took less than 2^i microseconds (the last one, the rest).
const latencyBuckets = 24

func (s *stats) observeHandler(d time.Duration) {
	i := bits.Len64(uint64(d / time.Microsecond))
	if i >= latencyBuckets {
		i = latencyBuckets - 1
	}
	s.handlerLatency[i].Add(1)
}
