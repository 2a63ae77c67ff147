package spoe

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/errors"
)

// An engine is one HAProxy SPOE engine, known by the engine-id of its
// HELLO: one per filter and process on HAProxy 3.x, one per filter and
// thread on 2.6. Stream-ids are unique only within an engine (2.6 restarts
// them at 0 on every reload), so an ACK must never reach another engine.
//
// With the async capability (HAProxy 2.6 to 3.0) HAProxy accepts an ACK on
// any connection of the NOTIFY's engine. ACKs whose own connection is gone
// are held by the engine and written on one of its live connections by a
// goroutine that runs only while there are some to deliver. When an async
// engine loses its last connection while ACKs are still due (held, or of
// handlers still running on a connection that left), it lingers for
// engineLinger: they wait for the next connection HAProxy opens with that
// engine-id (2.6 never answers a client whose pending ACK never comes).
// Then, or at once when nothing is due, it goes away; ACKs left are
// dropped, and counted.
//
// An engine is small (its id, its connections, a mutex): the context its
// requests derive from is made by the first request that needs it, the
// linger timer by the first linger, the goroutine by the first ACK to
// deliver. The registry holds at most Agent.MaxEngines engines, and the
// ACKs held by all of them at most maxHeldACKBytes: past the first bound a
// new engine-id is not granted async (see admit), past the second an ACK
// to reroute is dropped and counted.
type engine struct {
	id       string
	registry *engines

	mu       sync.Mutex // guards what follows; registry.mu is taken before it
	conns    []*conn    // live connections, in joining order
	departed []*conn    // connections that left with handlers running
	ctx      context.Context
	cancel   context.CancelFunc
	held     [][]byte // whole ACK frames waiting for a live connection
	pumping  bool     // a goroutine is delivering held
	linger   *time.Timer
	lingerAt time.Time // when the engine lost its last connection
	ended    bool      // gone from the registry: nothing more is taken
}

// engineQueue is how many ACK writes (each one or more ACK frames) an
// engine holds while they wait for a live connection; beyond that they are
// dropped.
const engineQueue = 256

// maxHeldACKBytes bounds the ACK bytes held by all the engines of an agent
// together; beyond it, ACKs to reroute are dropped.
const maxHeldACKBytes = 8 << 20

// maxEngineID bounds the engine-id of a HAPROXY-HELLO (HAProxy's are
// 36-byte UUIDs); a longer one is refused as an invalid frame.
const maxEngineID = 128

// engineLinger is how long an async engine with ACKs still due outlives
// its last connection.
var engineLinger = 10 * time.Second

// engines is the registry of engines by engine-id.
type engines struct {
	agent     *Agent
	mu        sync.Mutex
	m         map[string]*engine
	heldBytes atomic.Int64 // ACK bytes held by every engine
}

// admit reports whether a connection about to announce async may do so
// for engine-id id: yes for an engine the registry holds, or when it holds
// fewer than MaxEngines. Otherwise the connection goes on without async
// (HAProxy then keeps its NOTIFYs' ACKs to that connection, as with
// pipelining), and the refusal is counted. The bound is checked here and
// the engine made by join, after the AGENT-HELLO is out: handshakes under
// way at once may take the registry past MaxEngines by their number.
func (r *engines) admit(id string) bool {
	if id == "" {
		return true // no engine: the connection is its own
	}
	a := r.agent
	r.mu.Lock()
	ok := r.m[id] != nil || len(r.m) < a.maxEngines()
	r.mu.Unlock()
	if !ok {
		a.stats.asyncRefused.Add(1)
		if ok, held := a.logs.allow("engines"); ok {
			a.logger().WithField("max_engines", a.maxEngines()).WithField("refused_before", held).
				Warn("spoe: MaxEngines reached: a new engine-id is served without async")
		}
	}
	return ok
}

// join adds c, a connection that negotiated async and whose AGENT-HELLO
// is written, to the engine of that id, creating it if needed, and sets
// c.engine before any other goroutine can see c through the engine.
func (r *engines) join(id string, c *conn) *engine {
	r.mu.Lock()
	e := r.m[id]
	if e == nil {
		if r.m == nil {
			r.m = make(map[string]*engine)
		}
		e = &engine{id: id, registry: r}
		r.m[id] = e
	}
	e.mu.Lock()
	c.engine = e
	e.conns = append(e.conns, c)
	if e.linger != nil {
		e.linger.Stop()
	}
	start := e.startPump()
	e.mu.Unlock()
	r.mu.Unlock()
	if start {
		go e.pump()
	}
	return e
}

// context returns the parent of the contexts of the engine's requests,
// cancelled when the engine goes away.
func (e *engine) context() context.Context {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ctx == nil {
		e.ctx, e.cancel = context.WithCancel(e.registry.agent.baseContext())
		if e.ended {
			e.cancel()
		}
	}
	return e.ctx
}

// leave removes c from its engine. When the last connection leaves, the
// engine ends at once if no ACK is due, and lingers otherwise: it looks
// again after engineRecheck, then at doubling intervals, and ends once
// nothing is due any more or engineLinger has passed.
func (e *engine) leave(c *conn) {
	r := e.registry
	r.mu.Lock()
	e.mu.Lock()
	for i, x := range e.conns {
		if x == c {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			break
		}
	}
	e.departed = append(e.departed, c)
	var held [][]byte
	end := false
	if len(e.conns) == 0 && !e.ended {
		if e.due() {
			e.lingerAt = time.Now()
			e.lingerFor(engineRecheck)
		} else {
			end = true
			held = e.endLocked()
		}
	} else {
		e.due() // prunes departed
	}
	e.mu.Unlock()
	r.mu.Unlock()
	if end {
		e.finish(held)
	}
}

// engineRecheck is how soon an engine whose last connection left looks
// again whether ACKs are still due: the connection's own end, which may
// still reroute what it gathered, takes a moment.
const engineRecheck = 20 * time.Millisecond

// lingerFor arms the linger timer. e.mu is held.
func (e *engine) lingerFor(d time.Duration) {
	if e.linger == nil {
		e.linger = time.AfterFunc(d, e.expire)
	} else {
		e.linger.Reset(d)
	}
}

// due reports whether ACKs are still due: held, being delivered, or still
// to come from connections that left (their loop or handlers still run).
// It forgets the connections that left for good. e.mu is held.
func (e *engine) due() bool {
	kept := e.departed[:0]
	for _, c := range e.departed {
		if c.refs.Load() > 0 {
			kept = append(kept, c)
		}
	}
	for i := len(kept); i < len(e.departed); i++ {
		e.departed[i] = nil
	}
	e.departed = kept
	if len(kept) == 0 {
		e.departed = nil
	}
	return len(e.held) > 0 || e.pumping || len(e.departed) > 0
}

// endLocked takes the engine out of the registry and returns what it
// held. r.mu and e.mu are held.
func (e *engine) endLocked() [][]byte {
	r := e.registry
	e.ended = true
	if r.m[e.id] == e {
		delete(r.m, e.id)
	}
	if e.linger != nil {
		e.linger.Stop()
	}
	held := e.held
	e.held, e.departed = nil, nil
	return held
}

// finish cancels the requests of an ended engine and drops what it held.
func (e *engine) finish(held [][]byte) {
	e.mu.Lock()
	cancel := e.cancel
	e.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	for _, frames := range held {
		e.drop(frames)
	}
}

// drop counts held ACK frames as dropped and gives their bytes back.
func (e *engine) drop(frames []byte) {
	r := e.registry
	r.heldBytes.Add(-int64(len(frames)))
	r.agent.stats.acksDropped.Add(uint64(countFrames(frames)))
}

// endAll ends every engine at once (Shutdown, once no connection is left).
func (r *engines) endAll() {
	r.mu.Lock()
	ended := make([]*engine, 0, len(r.m))
	helds := make([][][]byte, 0, len(r.m))
	for _, e := range r.m {
		e.mu.Lock()
		helds = append(helds, e.endLocked())
		e.mu.Unlock()
		ended = append(ended, e)
	}
	r.mu.Unlock()
	for i, e := range ended {
		e.finish(helds[i])
	}
}

// expire looks again at a lingering engine: it ends it once nothing is due
// or engineLinger has passed, and looks later otherwise.
func (e *engine) expire() {
	r := e.registry
	r.mu.Lock()
	e.mu.Lock()
	if e.ended || len(e.conns) > 0 {
		e.mu.Unlock()
		r.mu.Unlock()
		return
	}
	if lingered := time.Since(e.lingerAt); e.due() && lingered < engineLinger {
		next := lingered
		if next < engineRecheck {
			next = engineRecheck
		}
		if left := engineLinger - lingered; next > left {
			next = left
		}
		e.lingerFor(next)
		e.mu.Unlock()
		r.mu.Unlock()
		return
	}
	held := e.endLocked()
	e.mu.Unlock()
	r.mu.Unlock()
	e.finish(held)
}

// send queues whole ACK frames (owned by the engine from now on) for a live
// connection of the engine, and counts them once they leave or are
// dropped. It reports false when they cannot be queued: the engine is gone
// or holds as much as it may.
func (e *engine) send(frames []byte) bool {
	r := e.registry
	e.mu.Lock()
	if e.ended || len(e.held) >= engineQueue {
		e.mu.Unlock()
		return false
	}
	if r.heldBytes.Add(int64(len(frames))) > maxHeldACKBytes {
		r.heldBytes.Add(-int64(len(frames)))
		e.mu.Unlock()
		return false
	}
	e.held = append(e.held, frames)
	start := e.startPump()
	e.mu.Unlock()
	if start {
		go e.pump()
	}
	return true
}

// startPump reports whether a pump must be started for what the engine
// holds, and marks it started. e.mu is held.
func (e *engine) startPump() bool {
	if e.pumping || e.ended || len(e.held) == 0 || len(e.conns) == 0 {
		return false
	}
	e.pumping = true
	e.registry.agent.goroutines.Add(1)
	return true
}

// pump writes held ACKs on the engine's live connections, in order, and
// returns once none is held or no connection takes them (join starts it
// again).
func (e *engine) pump() {
	a := e.registry.agent
	defer a.goroutines.Done()
	var conns []*conn
	for {
		e.mu.Lock()
		if e.ended || len(e.held) == 0 || len(e.conns) == 0 {
			e.pumping = false
			e.mu.Unlock()
			return
		}
		frames := e.held[0]
		e.held[0] = nil
		if e.held = e.held[1:]; len(e.held) == 0 {
			e.held = nil
		}
		conns = append(conns[:0], e.conns...)
		e.mu.Unlock()

		taken, written := deliverOn(frames, conns)
		if written {
			a.stats.acksRerouted.Add(uint64(countFrames(frames)))
		}
		if taken {
			// Written, or handed back by the connection that failed with
			// them: they are no longer held here.
			e.registry.heldBytes.Add(-int64(len(frames)))
			continue
		}
		// Every connection is closing: held again, first in line, until
		// a connection joins (join starts the pump again).
		e.mu.Lock()
		if e.ended {
			e.mu.Unlock()
			e.drop(frames)
			continue
		}
		e.held = append([][]byte{frames}, e.held...)
		e.pumping = false
		e.mu.Unlock()
		return
	}
}

// deliverOn writes frames on the first connection of conns that takes them.
// It reports whether a connection took them, and whether they were
// written: a connection that fails while writing them hands back, through
// its writeFailed, what it could not write.
func deliverOn(frames []byte, conns []*conn) (taken, written bool) {
	for _, c := range conns {
		if err := c.write(frames, false); !errors.Is(err, errWriteClosed) {
			return true, err == nil
		}
	}
	return false, false
}
