package spoe

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRouter(t *testing.T) {
	var rt Router
	rt.Handle("ip-rep", MessageHandler(func(ms []Message) ([]Action, error) {
		require.Len(t, ms, 1, "a route gets its message only")
		ip, ok := ms[0].ArgIP("ip")
		require.True(t, ok)
		return []Action{ActionSetVar{Name: "last_octet", Scope: VarScopeSession, Value: int(ip.To4()[3])}}, nil
	}))
	rt.HandleFunc("bot", func(w *ActionWriter, r *Request) error {
		require.Equal(t, 1, r.NumMessages(), "a route gets its message only")
		m, ok := r.Message("bot")
		require.True(t, ok)
		v, _ := m.Arg("ua")
		return w.SetBool(VarScopeTransaction, "bot", v.EqualString("curl"))
	})
	rt.HandleFunc("fail", func(*ActionWriter, *Request) error { return errors.New("no") })
	c := dialAgent(t, startAgent(t, &Agent{Handler: &rt}), ClientConfig{})
	ctx := notifyCtx(t)

	actions, err := c.Notify(ctx,
		ClientMessage{Name: "unknown", Args: []Arg{{"x", int64(1)}}},
		ipRep(net.IP{10, 0, 0, 9}),
		ClientMessage{Name: "bot", Args: []Arg{{"ua", "curl"}}})
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "last_octet", Scope: VarScopeSession, Value: int64(9)},
		ActionSetVar{Name: "bot", Scope: VarScopeTransaction, Value: true},
	}, actions, "routes in frame order, the unknown message skipped")

	actions, err = c.Notify(ctx, ClientMessage{Name: "bot", Args: []Arg{{"ua", "x"}}}, ClientMessage{Name: "fail"})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}}, actions,
		"a failing route fails the frame")

	rt.NotFound = HandlerFunc(func(w *ActionWriter, r *Request) error {
		for m := r.Messages(); m.Next(); {
			if err := w.SetString(VarScopeTransaction, "unrouted", m.Name()); err != nil {
				return err
			}
		}
		return nil
	})
	actions, err = c.Notify(ctx, ClientMessage{Name: "other"}, ipRep(net.IP{10, 0, 0, 1}))
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "unrouted", Scope: VarScopeTransaction, Value: "other"},
		ActionSetVar{Name: "last_octet", Scope: VarScopeSession, Value: int64(1)},
	}, actions, "NotFound gets the unrouted message only")
}

// TestRouterContext: a route's Request shares the NOTIFY's context and
// ids, on both APIs, and nested Routers work.
func TestRouterContext(t *testing.T) {
	var inner, outer Router
	type seen struct {
		info RequestInfo
		ok   bool
	}
	got := make(chan seen, 2)
	inner.Handle("ctx", ContextMessageHandler(func(ctx context.Context, ms []Message) ([]Action, error) {
		info, ok := RequestInfoFromContext(ctx)
		got <- seen{info, ok}
		return []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: len(ms)}}, nil
	}))
	outer.Handle("ctx", &inner)
	outer.HandleFunc("fast", func(w *ActionWriter, r *Request) error {
		info, ok := RequestInfoFromContext(r.Context())
		got <- seen{info, ok}
		return nil
	})
	c := dialAgent(t, startAgent(t, &Agent{Handler: &outer}), ClientConfig{EngineID: "eng-1"})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "ctx"}, ClientMessage{Name: "fast"})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "n", Scope: VarScopeTransaction, Value: int64(1)}}, actions)
	for i := 0; i < 2; i++ {
		s := <-got
		require.True(t, s.ok)
		assert.Equal(t, "eng-1", s.info.EngineID)
		assert.NotZero(t, s.info.StreamID)
	}
}

func TestRouterRegistrationPanics(t *testing.T) {
	var rt Router
	f := func(*ActionWriter, *Request) error { return nil }
	rt.HandleFunc("a", f)
	assert.Panics(t, func() { rt.HandleFunc("a", f) }, "twice")
	assert.Panics(t, func() {
		rt.Handle("a", MessageHandler(func([]Message) ([]Action, error) { return nil, nil }))
	}, "twice, other API")
	assert.Panics(t, func() { rt.HandleFunc("", f) }, "empty name")
	assert.Panics(t, func() { rt.HandleFunc("b", nil) }, "nil function")
	assert.Panics(t, func() { rt.Handle("b", nil) }, "nil Handler")
}

func TestRouterNoAlloc(t *testing.T) {
	var rt Router
	rt.HandleFunc("heavy", func(w *ActionWriter, r *Request) error {
		for m := r.Messages(); m.Next(); {
			v, _ := m.Arg("host")
			b, _ := v.Bytes()
			if err := w.SetStringBytes(VarScopeSession, "host", b); err != nil {
				return err
			}
		}
		return w.SetInt(VarScopeSession, "score", 100)
	})
	r := &Request{}
	payload, err := appendMessages(nil, []ClientMessage{heavyMessage, ipRepMessage})
	require.NoError(t, err)
	require.NoError(t, r.indexMessages(payload))
	w := newTestWriter(1, 1, 16380)
	allocs := testing.AllocsPerRun(1000, func() {
		w.reset(w.buf[:0], 1, 1, 16380, 0)
		_ = rt.ServeSPOE(w, r)
	})
	assert.Zero(t, allocs)
}

func TestMessageGetters(t *testing.T) {
	m := Message{Name: "m", Args: map[string]interface{}{
		"ip": net.IP{1, 2, 3, 4}, "s": "x", "b": true, "bin": []byte{1},
		"i64": int64(-3), "i32": int32(-4), "u32": uint32(5), "u64": uint64(6), "big": uint64(1 << 63), "nul": nil,
	}}
	ip, ok := m.ArgIP("ip")
	assert.True(t, ok)
	assert.Equal(t, net.IP{1, 2, 3, 4}, ip)
	_, ok = m.ArgIP("s")
	assert.False(t, ok)
	s, ok := m.ArgString("s")
	assert.True(t, ok)
	assert.Equal(t, "x", s)
	_, ok = m.ArgString("bin")
	assert.False(t, ok)
	b, ok := m.ArgBool("b")
	assert.True(t, ok && b)
	bin, ok := m.ArgBytes("bin")
	assert.True(t, ok)
	assert.Equal(t, []byte{1}, bin)
	for name, want := range map[string]int64{"i64": -3, "i32": -4, "u32": 5, "u64": 6} {
		n, ok := m.ArgInt(name)
		assert.True(t, ok, name)
		assert.Equal(t, want, n, name)
	}
	_, ok = m.ArgInt("big")
	assert.False(t, ok, "uint64 above MaxInt64")
	_, ok = m.ArgInt("nul")
	assert.False(t, ok)
	_, ok = m.ArgInt("absent")
	assert.False(t, ok)
}

func TestExpvar(t *testing.T) {
	a := New(seedHandler)
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	_, err := c.Notify(notifyCtx(t), ipRep(net.IP{1, 1, 1, 1}))
	require.NoError(t, err)
	var st Stats
	require.NoError(t, json.Unmarshal([]byte(a.Expvar().String()), &st))
	assert.Equal(t, uint64(1), st.FramesIn.Notify)
	assert.Equal(t, uint64(1), st.FramesOut.ACK)
	assert.Equal(t, int64(1), st.ConnsOpen)
	var calls uint64
	for _, b := range st.HandlerLatency {
		calls += b.Count
	}
	assert.Equal(t, uint64(latencySampling), calls, "the first call of a connection is timed, counted 8 times")
}
