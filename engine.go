package spoe

import (
	"context"
	"sync"
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
// go through the engine's channel, which one goroutine drains onto the
// engine's live connections. When an async engine loses its last
// connection, it lingers for engineLinger: ACKs still due wait for the next
// connection HAProxy opens with that engine-id (2.6 never answers a client
// whose pending ACK never comes). Then, or at once for an engine that never
// negotiated async, it goes away; ACKs left are dropped, and counted.
type engine struct {
	id       string
	registry *engines

	// ctx is the parent of the contexts of async requests: cancelled when
	// the engine goes away.
	ctx    context.Context
	cancel context.CancelFunc

	acks     chan []byte   // whole ACK frames waiting for a connection
	joined   chan struct{} // a connection joined: the pump retries what it holds
	pumpOnce sync.Once

	mu     sync.Mutex // guards what follows; registry.mu is taken before it
	conns  []*conn    // live connections, in joining order
	linger *time.Timer
	closed bool // the pump stopped: nothing more may be queued
}

// engineQueue is how many ACKs an engine holds while they wait for a live
// connection; beyond that they are dropped.
const engineQueue = 256

// engineLinger is how long an async engine outlives its last connection.
var engineLinger = 10 * time.Second

// engines is the registry of engines by engine-id.
type engines struct {
	agent *Agent
	mu    sync.Mutex
	m     map[string]*engine
}

// join adds c, a connection that negotiated async and whose AGENT-HELLO
// is written, to the engine of that id, creating it if needed, and sets
// c.engine before any other goroutine can see c through the engine.
func (r *engines) join(id string, c *conn) *engine {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.m[id]
	if e == nil {
		if r.m == nil {
			r.m = make(map[string]*engine)
		}
		e = &engine{id: id, registry: r, acks: make(chan []byte, engineQueue), joined: make(chan struct{}, 1)}
		e.ctx, e.cancel = context.WithCancel(r.agent.baseContext())
		r.m[id] = e
	}
	e.mu.Lock()
	c.engine = e
	e.conns = append(e.conns, c)
	if e.linger != nil {
		e.linger.Stop()
	}
	e.mu.Unlock()
	select {
	case e.joined <- struct{}{}:
	default:
	}
	return e
}

// leave removes c from its engine. The last connection to leave makes the
// engine linger for engineLinger, then end.
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
	if len(e.conns) == 0 && e.ctx.Err() == nil {
		if e.linger == nil {
			e.linger = time.AfterFunc(engineLinger, e.expire)
		} else {
			e.linger.Reset(engineLinger)
		}
	}
	e.mu.Unlock()
	r.mu.Unlock()
}

// endAll ends every engine at once (Shutdown, once no connection is left).
func (r *engines) endAll() {
	r.mu.Lock()
	ended := make([]*engine, 0, len(r.m))
	for id, e := range r.m {
		ended = append(ended, e)
		delete(r.m, id)
	}
	r.mu.Unlock()
	for _, e := range ended {
		e.cancel()
	}
}

// expire ends an engine that lingered without a connection joining.
func (e *engine) expire() {
	r := e.registry
	r.mu.Lock()
	e.mu.Lock()
	empty := len(e.conns) == 0
	e.mu.Unlock()
	if empty && r.m[e.id] == e {
		delete(r.m, e.id)
	}
	r.mu.Unlock()
	if empty {
		e.cancel()
	}
}

// send queues whole ACK frames (owned by the engine from now on) for a live
// connection of the engine, and counts them once they leave or are
// dropped. It reports false when they cannot be queued: the engine is gone
// or its queue is full.
func (e *engine) send(frames []byte) bool {
	e.pumpOnce.Do(func() {
		a := e.registry.agent
		a.goroutines.Add(1)
		go e.pump()
	})
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	select {
	case e.acks <- frames:
		return true
	default:
		return false
	}
}

// pump writes queued ACKs to the engine's live connections, holding those
// that find none until a connection joins, until the engine goes away.
func (e *engine) pump() {
	a := e.registry.agent
	defer a.goroutines.Done()
	var held [][]byte
	deliver := func(frames []byte) bool {
		taken, written := e.deliver(frames)
		if written {
			a.stats.acksRerouted.Add(uint64(countFrames(frames)))
		}
		return taken
	}
	for {
		select {
		case frames := <-e.acks:
			if !deliver(frames) {
				if len(held) < engineQueue {
					held = append(held, frames)
				} else {
					a.stats.acksDropped.Add(uint64(countFrames(frames)))
				}
			}
		case <-e.joined:
			kept := held[:0]
			for _, frames := range held {
				if !deliver(frames) {
					kept = append(kept, frames)
				}
			}
			held = kept
		case <-e.ctx.Done():
			e.mu.Lock()
			e.closed = true // no send from now on: what is queued is all
			e.mu.Unlock()
			for _, frames := range held {
				a.stats.acksDropped.Add(uint64(countFrames(frames)))
			}
			for {
				select {
				case frames := <-e.acks:
					a.stats.acksDropped.Add(uint64(countFrames(frames)))
				default:
					return
				}
			}
		}
	}
}

// deliver writes frames on the first live connection that takes them. It
// reports whether a connection took them, and whether they were written:
// a connection that fails while writing them hands back, through its
// writeFailed, what it could not write.
func (e *engine) deliver(frames []byte) (taken, written bool) {
	e.mu.Lock()
	conns := append([]*conn(nil), e.conns...)
	e.mu.Unlock()
	for _, c := range conns {
		if err := c.write(frames, false); !errors.Is(err, errWriteClosed) {
			return true, err == nil
		}
	}
	return false, false
}
