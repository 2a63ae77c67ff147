package spoe

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestContextMessageHandler: the simple API with a context gets the
// request's ids, and a context cancelled once the handler returned.
func TestContextMessageHandler(t *testing.T) {
	kept := make(chan context.Context, 1)
	a := &Agent{Handler: ContextMessageHandler(func(ctx context.Context, ms []Message) ([]Action, error) {
		info, ok := RequestInfoFromContext(ctx)
		if !ok || ctx.Err() != nil {
			return nil, fmt.Errorf("ids %v, err %v", ok, ctx.Err())
		}
		kept <- ctx
		return []Action{ActionSetVar{Name: "who", Scope: VarScopeTransaction,
			Value: fmt.Sprintf("%s/%d/%d/%s", info.EngineID, info.StreamID, info.FrameID, ms[0].Name)}}, nil
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{EngineID: "eng"})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	require.Len(t, actions, 1)
	assert.Regexp(t, `^eng/\d+/\d+/m$`, actions[0].(ActionSetVar).Value)
	assert.ErrorIs(t, (<-kept).Err(), context.Canceled, "cancelled once the handler returned")

	_, ok := RequestInfoFromContext(context.Background())
	assert.False(t, ok)
}

// blockingSimple is a ContextMessageHandler that reports its context's end.
func blockingSimple(started chan<- struct{}, ended chan<- error) ContextMessageHandler {
	return func(ctx context.Context, _ []Message) ([]Action, error) {
		started <- struct{}{}
		select {
		case <-ctx.Done():
			ended <- ctx.Err()
		case <-time.After(time.Minute):
			ended <- nil
		}
		return nil, nil
	}
}

// TestSimpleContextCancelledOnConnClose: without async, HAProxy closing the
// connection cancels the handler's context.
func TestSimpleContextCancelledOnConnClose(t *testing.T) {
	started, ended := make(chan struct{}, 1), make(chan error, 1)
	p := dialRaw(t, startAgent(t, &Agent{Handler: blockingSimple(started, ended)}))
	p.hello("pipelining", "e", 16380)
	p.send(notifyNamed("m", 1, 1))
	<-started
	p.nc.Close()
	assert.ErrorIs(t, <-ended, context.Canceled)
}

// TestSimpleContextCancelledOnAgentClose: Close cancels running handlers'
// contexts; Shutdown lets them run.
func TestSimpleContextCancelledOnAgentClose(t *testing.T) {
	started, ended := make(chan struct{}, 1), make(chan error, 1)
	a := &Agent{Handler: blockingSimple(started, ended)}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	go func() { _, _ = c.Notify(context.Background(), ClientMessage{Name: "m"}) }()
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, a.Shutdown(ctx), context.DeadlineExceeded, "Shutdown waits for the handler")
	select {
	case err := <-ended:
		t.Fatalf("context ended by Shutdown: %v", err)
	default:
	}
	require.NoError(t, a.Close())
	assert.ErrorIs(t, <-ended, context.Canceled)
}

// TestErrorVarOnACKTooBig: an action left out for the frame's size sets the
// error variable, which always fits beside the actions that did.
func TestErrorVarOnACKTooBig(t *testing.T) {
	refused := make(chan int, 1)
	a := &Agent{Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		n := 0
		for i := 0; ; i++ {
			if err := w.SetString(VarScopeTransaction, fmt.Sprintf("v%d", i), "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"); err != nil {
				refused <- n
				return nil // the handler ignores it: the agent does not
			}
			n++
		}
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{MaxFrameSize: 256})
	actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	n := <-refused
	require.NotZero(t, n)
	require.Len(t, actions, n+1)
	assert.Equal(t, ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}, actions[n])
	assert.Equal(t, uint64(1), a.Stats().ActionsRefused)

	// The seed API cannot size its answers: the variable is its signal.
	b := New(func([]Message) ([]Action, error) {
		return []Action{
			ActionSetVar{Name: "big", Scope: VarScopeTransaction, Value: strings.Repeat("x", 300)},
			ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true},
		}, nil
	})
	b.ErrorVar = "failed"
	c = dialAgent(t, startAgent(t, b), ClientConfig{MaxFrameSize: 256})
	actions, err = c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	assert.Equal(t, []Action{
		ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true},
		ActionSetVar{Name: "failed", Scope: VarScopeTransaction, Value: true},
	}, actions)

	// ErrorVar "-": the actions that fit, nothing else.
	b = New(b.Handler.(MessageHandler))
	b.ErrorVar = "-"
	c = dialAgent(t, startAgent(t, b), ClientConfig{MaxFrameSize: 256})
	actions, err = c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
	require.NoError(t, err)
	assert.Equal(t, []Action{ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true}}, actions)
}

// TestMessageStats: counts by message name, bounded in the names kept.
func TestMessageStats(t *testing.T) {
	a := New(func(ms []Message) ([]Action, error) {
		switch ms[0].Name {
		case "fail":
			return nil, fmt.Errorf("no")
		case "panic":
			panic("boom")
		}
		return nil, nil
	})
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	ctx := notifyCtx(t)
	for i := 0; i < 3; i++ {
		_, err := c.Notify(ctx, ClientMessage{Name: "ok"})
		require.NoError(t, err)
	}
	for _, name := range []string{"fail", "panic"} {
		_, err := c.Notify(ctx, ClientMessage{Name: name}, ClientMessage{Name: "ok"})
		require.NoError(t, err)
	}
	st := a.Stats().Messages
	assert.Equal(t, uint64(5), st["ok"].Requests)
	assert.Equal(t, uint64(1), st["ok"].Errors, "a failed frame counts for each of its names")
	assert.Equal(t, uint64(1), st["ok"].Panics)
	assert.Equal(t, MessageStats{Requests: 1, Errors: 1}, withoutLatency(st["fail"]))
	assert.Equal(t, MessageStats{Requests: 1, Panics: 1}, withoutLatency(st["panic"]))
	var timed uint64
	for _, b := range st["ok"].HandlerLatency {
		timed += b.Count
	}
	assert.Equal(t, uint64(latencySampling), timed, "the connection's first call is timed")
	assert.NotContains(t, st, OtherMessages)

	for i := 0; i < MaxStatsMessages+10; i++ {
		_, err := c.Notify(ctx, ClientMessage{Name: fmt.Sprintf("n%d", i)})
		require.NoError(t, err)
	}
	st = a.Stats().Messages
	assert.Len(t, st, MaxStatsMessages+1, "the cap, and the other bucket")
	assert.Equal(t, uint64(13), st[OtherMessages].Requests, "3 names of the first 64 were taken before")
}

// TestMessageStatsRouter: with a Router, a route's failure counts on its
// message's name only, also behind a nested Router.
func TestMessageStatsRouter(t *testing.T) {
	var rt, inner Router
	rt.HandleFunc("ok", func(*ActionWriter, *Request) error { return nil })
	rt.HandleFunc("fail", func(*ActionWriter, *Request) error { return fmt.Errorf("no") })
	inner.HandleFunc("panic", func(*ActionWriter, *Request) error { panic("boom") })
	rt.Handle("panic", &inner)
	a := &Agent{Handler: &rt}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	for _, name := range []string{"fail", "panic"} {
		_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "ok"}, ClientMessage{Name: name})
		require.NoError(t, err)
	}
	_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "ok"})
	require.NoError(t, err)
	st := a.Stats().Messages
	assert.Equal(t, MessageStats{Requests: 3}, withoutLatency(st["ok"]))
	assert.Equal(t, MessageStats{Requests: 1, Errors: 1}, withoutLatency(st["fail"]))
	assert.Equal(t, MessageStats{Requests: 1, Panics: 1}, withoutLatency(st["panic"]))
}

// TestMessageStatsBeforeACK: Stats counts a NOTIFY before its ACK leaves
// (Stats.Messages), also when the ACK is written at once, with nothing
// gathered before it: each ACK read is already counted.
func TestMessageStatsBeforeACK(t *testing.T) {
	a := &Agent{Handler: HandlerFunc(func(*ActionWriter, *Request) error { return nil })}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	for i := 1; i <= 2000; i++ {
		_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "ok"})
		require.NoError(t, err)
		if n := a.Stats().Messages["ok"].Requests; n != uint64(i) {
			t.Fatalf("after the ACK of NOTIFY %d, Stats counts %d", i, n)
		}
	}
}

func withoutLatency(m MessageStats) MessageStats {
	m.HandlerLatency, m.HandlerTime = nil, 0
	return m
}

// TestMessageStatsNoAlloc: counting by name allocates nothing once the
// name is known, nor for names beyond the cap.
func TestMessageStatsNoAlloc(t *testing.T) {
	var tbl messageTable
	r := &Request{}
	payload, err := appendMessages(nil, []ClientMessage{heavyMessage, ipRepMessage})
	require.NoError(t, err)
	require.NoError(t, r.indexMessages(payload))
	tbl.count(r, nil)
	assert.Zero(t, testing.AllocsPerRun(1000, func() { tbl.count(r, nil) }))
	for i := 0; i < MaxStatsMessages; i++ {
		tbl.get([]byte(fmt.Sprint(i)))
	}
	other, err := appendMessages(nil, []ClientMessage{{Name: "unknown"}})
	require.NoError(t, err)
	require.NoError(t, r.indexMessages(other))
	assert.Zero(t, testing.AllocsPerRun(1000, func() { tbl.count(r, nil) }))
	assert.Equal(t, []*messageStats{&tbl.other}, counted(r))
}

// TestMessageStatsRecent: a connection's recent names count as the table
// does, without allocating, and a name beyond the cap is not taken for
// another.
func TestMessageStatsRecent(t *testing.T) {
	var tbl messageTable
	var recent recentStats
	r := &Request{}
	payload, err := appendMessages(nil, []ClientMessage{heavyMessage, ipRepMessage, heavyMessage})
	require.NoError(t, err)
	require.NoError(t, r.indexMessages(payload))
	tbl.count(r, &recent)
	// AllocsPerRun runs it 1001 times: 1,002 NOTIFYs in all.
	assert.Zero(t, testing.AllocsPerRun(1000, func() { tbl.count(r, &recent) }))
	assert.Empty(t, tbl.snapshot()[ipRepMessage.Name].Requests, "counted at the next flush")
	recent.flush()
	snap := tbl.snapshot()
	assert.Equal(t, uint64(2*1002), snap[heavyMessage.Name].Requests)
	assert.Equal(t, uint64(1002), snap[ipRepMessage.Name].Requests)
	assert.Equal(t, []*messageStats{tbl.get([]byte(heavyMessage.Name)), tbl.get([]byte(ipRepMessage.Name))}, counted(r),
		"the counters of each first name, once")

	for i := 0; len(tbl.snapshot()) < MaxStatsMessages; i++ {
		tbl.get([]byte(fmt.Sprint("m", i)))
	}
	unnamed, err := appendMessages(nil, []ClientMessage{{Name: "late"}, {Name: ""}})
	require.NoError(t, err)
	require.NoError(t, r.indexMessages(unnamed))
	tbl.count(r, &recent)
	tbl.count(r, &recent)
	recent.flush()
	assert.Equal(t, uint64(4), tbl.snapshot()[OtherMessages].Requests)
	assert.Equal(t, uint64(2*1002), tbl.snapshot()[heavyMessage.Name].Requests)
}

// TestMessageStatsNameWord: names compared as a word (at most 8 bytes) or
// whole are told apart by every byte, wherever they sit in the frame.
func TestMessageStatsNameWord(t *testing.T) {
	var tbl messageTable
	var recent recentStats
	names := []string{"ab", "ac", "abcdefgh", "abcdefgi", "abcdefghi", "abcdefghj", "a", "a\x00", "b"}
	want := map[string]uint64{}
	for round := 0; round < 3; round++ {
		for i, name := range names {
			for k := 0; k <= i%3; k++ { // the same name again, and the next one
				// An argument after the name, or none: the name ends 1
				// byte before the frame, too near for a word.
				var args []Arg
				if (round+k)%2 == 0 {
					args = []Arg{{"x", "0123456789"}}
				}
				r := &Request{}
				payload, err := appendMessages(nil, []ClientMessage{{Name: name, Args: args}})
				require.NoError(t, err)
				require.NoError(t, r.indexMessages(payload))
				tbl.count(r, &recent)
				assert.Equal(t, []*messageStats{tbl.get([]byte(name))}, counted(r), name)
				want[name]++
			}
		}
	}
	recent.flush()
	for name, n := range want {
		assert.Equal(t, n, tbl.snapshot()[name].Requests, name)
	}
}

// TestReadyAndHealthHandler: ready while serving, not before nor once
// shutting down; the handler answers probes and serves the stats.
func TestReadyAndHealthHandler(t *testing.T) {
	a := New(seedHandler)
	h := a.HealthHandler()
	get := func(path string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code, rec.Body.String()
	}
	assert.False(t, a.Ready(), "not serving yet")
	code, _ := get("/ready")
	assert.Equal(t, http.StatusServiceUnavailable, code)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- a.Serve(l) }()
	waitFor(t, a.Ready, "Ready once serving")
	code, body := get("/spoe/ready")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ready\n", body)
	code, _ = get("/live")
	assert.Equal(t, http.StatusOK, code)

	c := dialAgent(t, l.Addr().String(), ClientConfig{})
	_, err = c.Notify(notifyCtx(t), ipRep(net.IP{10, 0, 0, 1}))
	require.NoError(t, err)
	code, body = get("/stats")
	assert.Equal(t, http.StatusOK, code)
	var st Stats
	require.NoError(t, json.Unmarshal([]byte(body), &st))
	assert.Equal(t, uint64(1), st.FramesIn.Notify)
	assert.Equal(t, uint64(1), st.Messages["ip-rep"].Requests)

	code, _ = get("/other")
	assert.Equal(t, http.StatusNotFound, code)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/ready", nil))
	assert.Equal(t, http.StatusMethodNotAllowed, rec.Code)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, a.Shutdown(ctx))
	assert.False(t, a.Ready(), "not ready once shut down")
	code, _ = get("/ready")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	code, _ = get("/live")
	assert.Equal(t, http.StatusOK, code)
	assert.ErrorIs(t, <-served, ErrAgentClosed)
}

// TestSimpleValuesKept: the simple API's values, decoded with one copy of
// the payload per NOTIFY, have the documented types and stay intact after
// the handler returned, across later requests and garbage collections.
func TestSimpleValuesKept(t *testing.T) {
	long := strings.Repeat("s", 100)
	args := []Arg{
		{"null", nil}, {"t", true}, {"f", false}, {"i32", int32(-7)}, {"u32", uint32(7)},
		{"i64", int64(-1 << 40)}, {"u64", uint64(1 << 40)}, {"ip4", net.IP{192, 0, 2, 1}},
		{"ip6", net.ParseIP("2001:db8::1")}, {"short", "GET"}, {"long", long}, {"empty", ""},
		{"bin", []byte{0, 1, 2}}, {"longbin", make([]byte, 40)}, {"nobin", []byte{}},
	}
	want := map[string]interface{}{
		"null": nil, "t": true, "f": false, "i32": int32(-7), "u32": uint32(7),
		"i64": int64(-1 << 40), "u64": uint64(1 << 40), "ip4": net.IP{192, 0, 2, 1},
		"ip6": net.ParseIP("2001:db8::1"), "short": "GET", "long": long, "empty": "",
		"bin": []byte{0, 1, 2}, "longbin": make([]byte, 40), "nobin": []byte{},
	}
	kept := make(chan []Message, 200)
	a := New(func(ms []Message) ([]Action, error) {
		kept <- ms
		return nil, nil
	})
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	for i := 0; i < cap(kept); i++ {
		_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "all", Args: args}, ClientMessage{Name: "two", Args: args[:2]})
		require.NoError(t, err)
		if i%50 == 0 {
			runtime.GC()
		}
	}
	runtime.GC()
	close(kept)
	for ms := range kept {
		require.Len(t, ms, 2)
		assert.Equal(t, "all", ms[0].Name)
		assert.Equal(t, want, ms[0].Args)
		assert.Equal(t, map[string]interface{}{"null": nil, "t": true}, ms[1].Args)
		ms[0].Args["bin"].([]byte)[0] = 9 // the handler's own: changes nothing else
		assert.Equal(t, long, ms[0].Args["long"])
	}
}

// TestSimpleDuplicateArgs: of duplicate argument names the first is kept.
func TestSimpleDuplicateArgs(t *testing.T) {
	got := make(chan Message, 1)
	c := dialAgent(t, startAgent(t, New(func(ms []Message) ([]Action, error) {
		got <- ms[0]
		return nil, nil
	})), ClientConfig{})
	_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m", Args: []Arg{
		{"a", "first"}, {"", int64(1)}, {"a", "second"}, {"", int64(2)}, {"b", true},
	}})
	require.NoError(t, err)
	assert.Equal(t, map[string]interface{}{"a": "first", "": int64(1), "b": true}, (<-got).Args)
}
