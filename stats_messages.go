package spoe

import (
	"sync"
	"sync/atomic"
	"time"
)

// MaxStatsMessages is how many message names Stats.Messages counts apart:
// HAProxy sends the names of its configuration, but a peer may send any,
// so the frames of names seen after the first MaxStatsMessages are counted
// together under OtherMessages.
const MaxStatsMessages = 64

// OtherMessages is the key of Stats.Messages that counts the messages of
// names beyond the first MaxStatsMessages. HAProxy's configuration cannot
// name a message so ("~" is not allowed in its identifiers).
const OtherMessages = "~other"

// statMessages is how many messages of one frame the errors, panics and
// latency are counted for, by name; later ones count as requests only.
const statMessages = 4

// MessageStats counts the NOTIFY frames that carried messages of one name.
// A frame of several messages counts for each of its names (its first
// four for Errors, Panics and the latency), except that the error or panic
// of a Router's route counts on its message's name only.
type MessageStats struct {
	Requests uint64 // messages of this name received
	Errors   uint64 // frames with this message whose handler returned an error
	Panics   uint64 // frames with this message whose handler panicked

	// HandlerLatency and HandlerTime are those of Stats, for the frames
	// with this message, sampled the same way.
	HandlerLatency []LatencyBucket
	HandlerTime    time.Duration
}

// messageStats are the counters of one message name.
type messageStats struct {
	requests, errors, panics atomic.Uint64
	latency                  [latencyBuckets]atomic.Uint64
	time                     atomic.Int64
}

// messageTable finds the counters of a message name without a lock nor
// an allocation: the map is never written once published, and a new name
// publishes a copy (at most MaxStatsMessages times).
type messageTable struct {
	byName atomic.Pointer[map[string]*messageStats]
	full   atomic.Bool
	other  messageStats
	mu     sync.Mutex // serializes the publication of new names
}

func (t *messageTable) get(name []byte) *messageStats {
	if p := t.byName.Load(); p != nil {
		if m, ok := (*p)[string(name)]; ok {
			return m
		}
	}
	if t.full.Load() {
		return &t.other
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var old map[string]*messageStats
	if p := t.byName.Load(); p != nil {
		old = *p
	}
	if m, ok := old[string(name)]; ok {
		return m
	}
	if len(old) >= MaxStatsMessages {
		t.full.Store(true)
		return &t.other
	}
	next := make(map[string]*messageStats, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	m := new(messageStats)
	next[string(name)] = m
	t.byName.Store(&next)
	return m
}

// count counts r's messages and notes the counters of its first ones in
// r, for failed and observeHandler.
func (t *messageTable) count(r *Request) {
	r.mstats, r.routing = [statMessages]*messageStats{}, nil
	n := 0
	for it := r.Messages(); it.Next(); {
		m := t.get(it.name())
		m.requests.Add(1)
		if n < statMessages && !noted(r.mstats[:n], m) {
			r.mstats[n] = m
			n++
		}
	}
}

func noted(ms []*messageStats, m *messageStats) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// failed counts a handler error or panic on r's messages, or on the one a
// Router was handling.
func (t *messageTable) failed(r *Request, panicked bool) {
	count := func(m *messageStats) {
		if panicked {
			m.panics.Add(1)
		} else {
			m.errors.Add(1)
		}
	}
	if r.routing != nil {
		count(t.get(r.routing))
		return
	}
	for _, m := range r.mstats {
		if m == nil {
			break
		}
		count(m)
	}
}

func (t *messageTable) snapshot() map[string]MessageStats {
	out := make(map[string]MessageStats)
	add := func(name string, m *messageStats) {
		out[name] = MessageStats{
			Requests: m.requests.Load(), Errors: m.errors.Load(), Panics: m.panics.Load(),
			HandlerLatency: latencyCounts(&m.latency), HandlerTime: time.Duration(m.time.Load()),
		}
	}
	if p := t.byName.Load(); p != nil {
		for name, m := range *p {
			add(name, m)
		}
	}
	if t.full.Load() {
		add(OtherMessages, &t.other)
	}
	return out
}
