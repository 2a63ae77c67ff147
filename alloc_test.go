//go:build !race

package spoe

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFastPathNoAllocs: in steady state a NOTIFY -> handler -> ACK on the
// zero-copy path allocates nothing, over a real loopback connection, one
// frame at a time and 32 in flight.
func TestFastPathNoAllocs(t *testing.T) {
	for _, msg := range []ClientMessage{ipRepMessage, heavyMessage} {
		for _, inflight := range []int{1, 32} {
			p := newLoadPeer(t, &Agent{Handler: fastHandler}, msg, inflight)
			for i := 0; i < 100; i++ { // warm the pools up
				require.NoError(t, p.roundTripN(inflight))
			}
			allocs := testing.AllocsPerRun(2000/inflight, func() {
				if err := p.roundTripN(inflight); err != nil {
					t.Fatal(err)
				}
			})
			assert.Zero(t, allocs, "%s, %d in flight: allocations per batch", msg.Name, inflight)
		}
	}
}

// TestSimpleAPIAllocs counts what the simple API costs per NOTIFY: the
// library allocates per frame, not per value (decode.go), and the test's
// handler allocates its own []Action and boxed actions.
func TestSimpleAPIAllocs(t *testing.T) {
	for _, tt := range []struct {
		msg ClientMessage
		max float64
	}{
		// The []Message with the boxes of its values (one allocation
		// for a NOTIFY of one message; the address held in its box),
		// the map (header and slots); the handler's []Action and its
		// boxed ActionSetVar. Names are interned.
		{ipRepMessage, 5},
		// The same, with one copy of the payload for the strings and
		// bytes longer than a box holds; the handler's 3 boxed actions.
		{heavyMessage, 8},
	} {
		p := newLoadPeer(t, &Agent{Handler: simpleHandler}, tt.msg, 1)
		for i := 0; i < 100; i++ {
			require.NoError(t, p.roundTripN(1))
		}
		allocs := testing.AllocsPerRun(2000, func() {
			if err := p.roundTripN(1); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("simple API, %s: %.1f allocations per request", tt.msg.Name, allocs)
		assert.LessOrEqual(t, allocs, tt.max, tt.msg.Name)
	}
}

// TestContextAPIAllocs: the simple API with a context costs what the
// simple API does, and the context: context.WithCancel's context and
// CancelFunc, and the value that carries the ids.
func TestContextAPIAllocs(t *testing.T) {
	h := ContextMessageHandler(func(ctx context.Context, ms []Message) ([]Action, error) {
		return simpleHandler(ms)
	})
	p := newLoadPeer(t, &Agent{Handler: h}, ipRepMessage, 1)
	for i := 0; i < 100; i++ {
		require.NoError(t, p.roundTripN(1))
	}
	allocs := testing.AllocsPerRun(2000, func() {
		if err := p.roundTripN(1); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("simple API with a context, ip-rep: %.1f allocations per request", allocs)
	assert.LessOrEqual(t, allocs, 6.0+3)
}
