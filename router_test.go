package spoe

import (
	"encoding/json"
	"errors"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRouter(t *testing.T) {
	var rt Router
	rt.HandleMessage("ip-rep", func(m Message) ([]Action, error) {
		ip, ok := m.IP("ip")
		require.True(t, ok)
		return []Action{ActionSetVar{Name: "last_octet", Scope: VarScopeSession, Value: int(ip.To4()[3])}}, nil
	})
	rt.Handle("bot", func(w *ActionWriter, r *Request, m *MessageIterator) error {
		v, _ := m.Arg("ua")
		return w.SetBool(VarScopeTransaction, "bot", v.Equal("curl"))
	})
	rt.Handle("fail", func(*ActionWriter, *Request, *MessageIterator) error { return errors.New("no") })
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

	rt.NotFound = func(w *ActionWriter, r *Request, m *MessageIterator) error {
		return w.SetString(VarScopeTransaction, "unrouted", m.Name())
	}
	actions, err = c.Notify(ctx, ClientMessage{Name: "other"})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "unrouted", Scope: VarScopeTransaction, Value: "other"}}, actions)
}

func TestRouterRegistrationPanics(t *testing.T) {
	var rt Router
	f := func(*ActionWriter, *Request, *MessageIterator) error { return nil }
	rt.Handle("a", f)
	assert.Panics(t, func() { rt.Handle("a", f) }, "twice")
	assert.Panics(t, func() { rt.HandleMessage("a", func(Message) ([]Action, error) { return nil, nil }) }, "twice, other API")
	assert.Panics(t, func() { rt.Handle("", f) }, "empty name")
	assert.Panics(t, func() { rt.Handle("b", nil) }, "nil function")
}

func TestRouterNoAlloc(t *testing.T) {
	var rt Router
	rt.Handle("heavy", func(w *ActionWriter, r *Request, m *MessageIterator) error {
		return w.SetInt(VarScopeSession, "score", 100)
	})
	r := &Request{}
	payload, err := appendMessages(nil, []ClientMessage{heavyMessage})
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
	ip, ok := m.IP("ip")
	assert.True(t, ok)
	assert.Equal(t, net.IP{1, 2, 3, 4}, ip)
	_, ok = m.IP("s")
	assert.False(t, ok)
	s, ok := m.String("s")
	assert.True(t, ok)
	assert.Equal(t, "x", s)
	_, ok = m.String("bin")
	assert.False(t, ok)
	b, ok := m.Bool("b")
	assert.True(t, ok && b)
	bin, ok := m.Bytes("bin")
	assert.True(t, ok)
	assert.Equal(t, []byte{1}, bin)
	for name, want := range map[string]int64{"i64": -3, "i32": -4, "u32": 5, "u64": 6} {
		n, ok := m.Int(name)
		assert.True(t, ok, name)
		assert.Equal(t, want, n, name)
	}
	_, ok = m.Int("big")
	assert.False(t, ok, "uint64 above MaxInt64")
	_, ok = m.Int("nul")
	assert.False(t, ok)
	_, ok = m.Int("absent")
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
