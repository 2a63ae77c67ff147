package spoe

import (
	"encoding/binary"
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
	name                     string // its key in messageTable.byName
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
	m := &messageStats{name: string(name)}
	next[m.name] = m
	t.byName.Store(&next)
	return m
}

// recentStats are the counters of the names one connection saw last, and
// the requests counted on them since its last flush, in the connection's
// reading role: HAProxy sends the same few names again and again, and a
// name found here costs a comparison, not a map lookup nor an atomic
// operation. flush adds the counts to the agent's before each write of
// ACKs by the reading role (conn.writeOut), before each blocking read, and
// before a rescued handler may write its own ACK (conn.rescue), so Stats
// sees every NOTIFY whose ACK left.
type recentStats struct {
	last    [4]*messageStats
	word    [4]uint64 // the first 8 bytes of each name, zero-padded (see nameWord)
	pending [4]uint64
	next    int // the next to replace
	hit     int // the last found
}

// find returns the index in last of the counters of name, or -1.
func (rc *recentStats) find(name []byte) int {
	if m := rc.last[rc.hit]; m != nil && m.name == string(name) {
		return rc.hit
	}
	for i, m := range rc.last {
		if m != nil && m.name == string(name) {
			rc.hit = i
			return i
		}
	}
	return -1
}

// add puts m in place of the counters seen least recently, flushing them.
func (rc *recentStats) add(m *messageStats) int {
	i := rc.next
	rc.flushOne(i)
	rc.last[i] = m
	var w [8]byte
	copy(w[:], m.name)
	rc.word[i] = binary.LittleEndian.Uint64(w[:])
	rc.next, rc.hit = (i+1)%len(rc.last), i
	return i
}

func (rc *recentStats) flushOne(i int) {
	if rc.pending[i] > 0 {
		rc.last[i].requests.Add(rc.pending[i])
		rc.pending[i] = 0
	}
}

// flush adds the pending counts to the agent's counters.
func (rc *recentStats) flush() {
	for i := range rc.pending {
		rc.flushOne(i)
	}
}

// nameWord returns the name of n bytes at p[off:] as a word, zero-padded,
// if it has at most 8 bytes and p holds 8 from off (a name is followed by
// at least its NB-ARGS byte).
func nameWord(p []byte, off, n int) (uint64, bool) {
	if n > 8 || off+8 > len(p) {
		return 0, false
	}
	return binary.LittleEndian.Uint64(p[off:]) & (1<<(8*uint(n)) - 1), true
}

// count counts r's messages and notes the counters of its first names in
// r (see counted). It reads the names from r's index, so the frame is not
// walked again for the first indexedMessages messages. recent may be nil:
// the agent's counters are then added to at once.
func (t *messageTable) count(r *Request, recent *recentStats) {
	r.routing, r.nstats = nil, 0
	if r.nmsgs == 1 && recent != nil {
		// The common case, kept short: one message, of the name found
		// last, compared as one word when it is short.
		x, i := r.index[0], recent.hit
		n := int(x.args - 1 - x.name)
		if m := recent.last[i]; m != nil && len(m.name) == n {
			w, ok := nameWord(r.payload, int(x.name), n)
			if ok && w == recent.word[i] || !ok && m.name == string(r.payload[x.name:x.args-1]) {
				recent.pending[i]++
				r.mstats[0], r.nstats = m, 1
				return
			}
		}
	}
	if r.nmsgs <= indexedMessages {
		for _, x := range r.index[:r.nmsgs] {
			t.countOne(r, recent, r.payload[x.name:x.args-1])
		}
		return
	}
	for it := r.Messages(); it.Next(); {
		t.countOne(r, recent, it.name())
	}
}

func (t *messageTable) countOne(r *Request, recent *recentStats, name []byte) {
	var m *messageStats
	if recent == nil {
		m = t.get(name)
		m.requests.Add(1)
	} else if i := recent.find(name); i >= 0 {
		m = recent.last[i]
		recent.pending[i]++
	} else if m = t.get(name); m != &t.other { // other's name is no name
		recent.pending[recent.add(m)]++
	} else {
		m.requests.Add(1)
	}
	if r.nstats < statMessages && !noted(r.mstats[:r.nstats], m) {
		r.mstats[r.nstats] = m
		r.nstats++
	}
}

// counted returns the counters of r's first statMessages names, each once,
// as count noted them: those a handler's error, panic and sampled latency
// are counted on.
func counted(r *Request) []*messageStats {
	r = r.root()
	return r.mstats[:r.nstats]
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
	for _, m := range counted(r) {
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
