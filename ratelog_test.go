package spoe

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLogLimiter(t *testing.T) {
	var l logLimiter
	ok, held := l.allow("a")
	assert.True(t, ok, "the first line of a kind goes through")
	assert.Zero(t, held)
	for i := 0; i < 100; i++ {
		ok, _ = l.allow("a")
		assert.False(t, ok, "held back within the interval")
	}
	ok, _ = l.allow("b")
	assert.True(t, ok, "another kind has its own interval")

	l = logLimiter{interval: 20 * time.Millisecond}
	ok, _ = l.allow("a")
	require.True(t, ok)
	calls := uint64(0)
	deadline := time.Now().Add(10 * time.Second)
	for {
		calls++
		if ok, held = l.allow("a"); ok {
			break
		}
		require.True(t, time.Now().Before(deadline), "no line let through after the interval")
	}
	assert.Equal(t, calls-1, held, "the line let through counts those held back before it")

	// Keys are bounded: past maxLogKeys, new kinds share one slot.
	l = logLimiter{}
	for i := 0; i < 2*maxLogKeys; i++ {
		l.allow(strings.Repeat("k", i%100) + string(rune('a'+i%26)) + strings.Repeat("x", i))
	}
	assert.LessOrEqual(t, len(l.keys), maxLogKeys+1)
	for k := range l.keys {
		assert.LessOrEqual(t, len(k), maxLogKeyLen)
	}
}

// TestHandlerFailureLogsRateLimited: a panic on every request logs one
// stack per interval, a handler error one line per message name and
// interval, naming the message; Stats counts every one.
func TestHandlerFailureLogsRateLimited(t *testing.T) {
	logger, hook := test.NewNullLogger()
	a := &Agent{Logger: logger, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		msgs := r.Messages()
		msgs.Next()
		switch {
		case msgs.NameIs("boom"):
			panic("boom on purpose")
		case msgs.NameIs("fail-a"), msgs.NameIs("fail-b"):
			return errors.New("lookup failed")
		}
		return nil
	})}
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	const n = 200
	errVar := []Action{ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}}
	for i := 0; i < n; i++ {
		for _, name := range []string{"boom", "fail-a", "fail-b"} {
			actions, err := c.Notify(notifyCtx(t), ClientMessage{Name: name})
			require.NoError(t, err)
			require.Equal(t, errVar, actions, "every failure answered with the error variable")
		}
	}
	st := a.Stats()
	assert.Equal(t, uint64(n), st.HandlerPanics, "every panic counted")
	assert.Equal(t, uint64(2*n), st.HandlerErrors, "every error counted")
	stacks, failed := 0, map[string]int{}
	for _, e := range hook.AllEntries() {
		if _, ok := e.Data["stack"]; ok {
			stacks++
		}
		if strings.HasPrefix(e.Message, "spoe: handler failed on message") {
			failed[e.Message]++
		}
	}
	assert.Equal(t, 1, stacks, "one stack per interval")
	assert.Equal(t, map[string]int{
		`spoe: handler failed on message "fail-a"`: 1,
		`spoe: handler failed on message "fail-b"`: 1,
	}, failed, "one line per message name per interval, naming it")
}

// TestHandlerPanicSummary: after the interval, the next stack logged is
// preceded by a summary of the panics held back, which with the stacks
// account for every panic counted.
func TestHandlerPanicSummary(t *testing.T) {
	logger, hook := test.NewNullLogger()
	a := &Agent{Logger: logger, Handler: HandlerFunc(func(w *ActionWriter, r *Request) error {
		panic("boom on purpose")
	})}
	a.logs.interval = 100 * time.Millisecond
	c := dialAgent(t, startAgent(t, a), ClientConfig{})
	summaries := func() (n int, held uint64) {
		for _, e := range hook.AllEntries() {
			if s, ok := e.Data["suppressed"]; ok {
				n++
				held += s.(uint64)
			}
		}
		return n, held
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Notify(notifyCtx(t), ClientMessage{Name: "m"})
		require.NoError(t, err)
		if n, _ := summaries(); n > 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "no summary line")
	}
	stacks := 0
	for _, e := range hook.AllEntries() {
		if _, ok := e.Data["stack"]; ok {
			stacks++
		}
		if _, ok := e.Data["suppressed"]; ok {
			assert.Equal(t, logrus.ErrorLevel, e.Level)
			assert.Contains(t, e.Message, "handler panics not logged")
		}
	}
	_, held := summaries()
	assert.Equal(t, 2, stacks)
	assert.Equal(t, a.Stats().HandlerPanics, uint64(stacks)+held, "stacks and summaries account for every panic")
}
