//go:build race

package spoe

import (
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestKeptViewsFailLoudly: in builds with the race detector, what a handler
// keeps past its return fails loudly: its Request, ActionWriter and
// iterators panic, and the frame bytes its views point into are
// overwritten (a read of them from another goroutine is a reported race).
func TestKeptViewsFailLoudly(t *testing.T) {
	kept := make(chan struct {
		r    *Request
		w    *ActionWriter
		it   MessageIterator
		view []byte
	}, 1)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		it := r.Messages()
		it.Next()
		v, _ := it.Arg("host")
		b, _ := v.Bytes()
		kept <- struct {
			r    *Request
			w    *ActionWriter
			it   MessageIterator
			view []byte
		}{r, w, it, b}
		return nil
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m", Args: []Arg{{"host", "h.example.com"}, {"ip", net.IP{1, 2, 3, 4}}}})
	require.NoError(t, err)
	k := <-kept
	assert.Panics(t, func() { k.r.Messages() }, "a kept Request")
	assert.Panics(t, func() { _ = k.r.Context() }, "a kept Request's context")
	assert.Panics(t, func() { _ = k.w.SetBool(VarScopeTransaction, "late", true) }, "a kept ActionWriter")
	assert.Panics(t, func() { k.it.Next() }, "a kept iterator")
	assert.Panics(t, func() { k.it.NameIs("m") }, "a kept iterator's name")
	assert.Panics(t, func() { k.it.Arg("host") }, "a kept iterator's arguments")
	// k.view now holds 0xA5 bytes; reading it here is itself reported by
	// the race detector (nothing orders the agent's poisoning with this
	// goroutine), which is the loud failure wanted: it is not read.
	assert.Len(t, k.view, len("h.example.com"))
}

// TestKeptRoutedRequestFailsLoudly: a Request a Router handed its route,
// nested or not, is sealed with its NOTIFY's.
func TestKeptRoutedRequestFailsLoudly(t *testing.T) {
	kept := make(chan *Request, 2)
	var inner, outer Router
	keep := HandlerFunc(func(w *ActionWriter, r *Request) error {
		kept <- r
		return nil
	})
	inner.Handle("m", keep)
	outer.Handle("m", &inner)
	outer.Handle("n", keep)
	c := dialAgent(t, startAgent(t, &Agent{Handler: &outer}), ClientConfig{})
	_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"}, ClientMessage{Name: "n"})
	require.NoError(t, err)
	for i := 0; i < 2; i++ {
		r := <-kept
		assert.Panics(t, func() { r.Messages() }, "a kept routed Request")
		assert.Panics(t, func() { _ = r.Context() }, "a kept routed Request's context")
	}
}
