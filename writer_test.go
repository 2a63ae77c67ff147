package spoe

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestWriterBacklogBound: while a write blocks (the peer does not read),
// frames brought by others are gathered up to maxPending; the next ones
// wait until the blocked write takes the pending ones, and are never
// dropped nor reordered.
func TestWriterBacklogBound(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maxPending int
		total      int64
	}{
		{"per connection", 100, 1 << 20},
		{"per agent", 1 << 20, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agentSide, peer := net.Pipe() // a write blocks until the peer reads
			defer agentSide.Close()
			defer peer.Close()
			budget := &backlogBudget{max: tc.total}
			var fw frameWriter
			fw.init(agentSide, time.Hour, &stats{}, tc.maxPending, budget)
			waiting := make(chan struct{}, 8)
			hook := func() { waiting <- struct{}{} }
			testHookBacklogWait.Store(&hook)
			defer testHookBacklogWait.Store(nil)

			frame := func(fill byte, n int) []byte {
				b := make([]byte, n)
				for i := range b {
					b[i] = fill
				}
				return b
			}
			errs := make(chan error, 3)
			go func() { errs <- fw.write(frame(1, 50), false) }() // blocks in Write
			waitFor(t, func() bool {
				fw.mu.Lock()
				defer fw.mu.Unlock()
				return fw.writing
			}, "a write under way")
			require.NoError(t, fw.write(frame(2, 60), false), "taken: nothing was pending")
			assert.EqualValues(t, 60, budget.used.Load())
			go func() { errs <- fw.write(frame(3, 60), false) }()
			<-waiting // over the bound: it waits
			assert.EqualValues(t, 60, budget.used.Load(), "not taken while full")

			got := make([]byte, 170)
			_, err := io.ReadFull(peer, got)
			require.NoError(t, err)
			for i := 0; i < 2; i++ {
				require.NoError(t, <-errs)
			}
			assert.Equal(t, append(append(frame(1, 50), frame(2, 60)...), frame(3, 60)...), got, "all, in order")
			assert.Zero(t, budget.used.Load())
		})
	}
}

// TestWriterBacklogClosed: a goroutine waiting for room gives up when the
// connection closes, with the frames still its own (errWriteClosed).
func TestWriterBacklogClosed(t *testing.T) {
	agentSide, peer := net.Pipe()
	defer peer.Close()
	budget := &backlogBudget{max: 1 << 20}
	var fw frameWriter
	fw.init(agentSide, time.Hour, &stats{}, 10, budget)
	waiting := make(chan struct{}, 8)
	hook := func() { waiting <- struct{}{} }
	testHookBacklogWait.Store(&hook)
	defer testHookBacklogWait.Store(nil)
	first := make(chan error, 1)
	go func() { first <- fw.write(make([]byte, 8), false) }()
	waitFor(t, func() bool {
		fw.mu.Lock()
		defer fw.mu.Unlock()
		return fw.writing
	}, "a write under way")
	require.NoError(t, fw.write(make([]byte, 8), false))
	third := make(chan error, 1)
	go func() { third <- fw.write(make([]byte, 8), false) }()
	<-waiting
	fw.close()
	agentSide.Close()
	assert.ErrorIs(t, <-third, errWriteClosed)
	var we *writeError
	assert.ErrorAs(t, <-first, &we)
	assert.Zero(t, budget.used.Load(), "the pending frames given back to the budget")
}
