package spoe

import (
	"context"
	"sync"
)

// An engine is one HAProxy SPOE engine, known by the engine-id of its
// HELLO: one per filter and process on HAProxy 3.x, one per filter and
// thread on 2.6. Stream-ids are unique only within an engine (2.6 restarts
// them at 0 on every reload), so an ACK must never reach another engine.
//
// With the async capability (HAProxy 2.6 to 3.0) HAProxy accepts an ACK on
// any connection of the NOTIFY's engine. ACKs whose own connection is gone
// go through the engine's channel, which one goroutine drains onto the
// engine's live connections. The engine goes away with its last connection;
// ACKs still queued then are dropped, and counted.
type engine struct {
	id       string
	registry *engines

	// ctx is the parent of the contexts of async requests: cancelled when
	// the engine goes away.
	ctx    context.Context
	cancel context.CancelFunc

	acks     chan []byte // whole ACK frames waiting for a connection
	pumpOnce sync.Once

	mu    sync.Mutex // guards conns; registry.mu is taken before it
	conns []*conn    // live connections, in joining order
}

// engineQueue is how many ACKs an engine holds while they wait for a live
// connection; beyond that they are dropped.
const engineQueue = 256

// engines is the registry of engines by engine-id.
type engines struct {
	agent *Agent
	mu    sync.Mutex
	m     map[string]*engine
}

// join adds c to the engine of that id, creating it if needed.
func (r *engines) join(id string, c *conn) *engine {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.m[id]
	if e == nil {
		if r.m == nil {
			r.m = make(map[string]*engine)
		}
		e = &engine{id: id, registry: r, acks: make(chan []byte, engineQueue)}
		e.ctx, e.cancel = context.WithCancel(r.agent.baseContext())
		r.m[id] = e
	}
	e.mu.Lock()
	e.conns = append(e.conns, c)
	e.mu.Unlock()
	return e
}

// leave removes c from its engine; the last connection to leave ends it.
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
	last := len(e.conns) == 0
	e.mu.Unlock()
	if last && r.m[e.id] == e {
		delete(r.m, e.id)
	}
	r.mu.Unlock()
	if last {
		e.cancel()
	}
}

// len returns the number of live connections of the engine.
func (e *engine) len() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// send queues whole ACK frames (owned by the engine from now on) for any
// live connection of the engine. It reports false when they were dropped:
// the engine is gone or its queue is full.
func (e *engine) send(frames []byte) bool {
	if e.ctx.Err() != nil {
		return false
	}
	e.pumpOnce.Do(func() {
		a := e.registry.agent
		a.goroutines.Add(1)
		go e.pump()
	})
	select {
	case e.acks <- frames:
		return true
	default:
		return false
	}
}

// pump writes queued ACKs to the engine's live connections until the
// engine goes away.
func (e *engine) pump() {
	a := e.registry.agent
	defer a.goroutines.Done()
	for {
		select {
		case frames := <-e.acks:
			if !e.deliver(frames) {
				a.stats.acksDropped.Add(1)
			}
		case <-e.ctx.Done():
			for {
				select {
				case <-e.acks:
					a.stats.acksDropped.Add(1)
				default:
					return
				}
			}
		}
	}
}

// deliver writes frames on the first live connection that takes them.
func (e *engine) deliver(frames []byte) bool {
	e.mu.Lock()
	conns := append([]*conn(nil), e.conns...)
	e.mu.Unlock()
	for _, c := range conns {
		if c.write(frames) == nil {
			return true
		}
	}
	return false
}
