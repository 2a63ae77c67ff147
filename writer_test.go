package spoe

import (
	"bytes"
	"io"
	"net"
	"strings"
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

// TestWriterWindowConcurrent: goroutines write ACKs at once through a
// window small enough to replace many of them; every frame arrives whole,
// in the order of each goroutine, as written or as the error ACK of the
// same ids (the window's copies never share memory with the runs the
// writer keeps for the next burst).
func TestWriterWindowConcurrent(t *testing.T) {
	agentSide, peer := net.Pipe()
	defer agentSide.Close()
	defer peer.Close()
	var fw frameWriter
	fw.init(agentSide, time.Hour, &stats{}, 1<<20, &backlogBudget{max: 1 << 30})
	replaced := 0
	fw.window = &ackWindow{limit: 2000, errVar: "error", refused: func() { replaced++ }} // under fw's write

	const writers, each = 4, 300
	ack := func(sid uint64) []byte {
		var w ActionWriter
		w.reset(nil, sid, 1, 16380, 0)
		_ = w.SetString(VarScopeTransaction, "v", strings.Repeat(string(rune('a'+sid%26)), int(sid%7)*60))
		return w.finish()
	}
	errs := make(chan error, writers)
	for g := 0; g < writers; g++ {
		go func(g int) {
			for i := 0; i < each; i++ {
				if err := fw.write(ack(uint64(g*each+i+1)), false); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}(g)
	}
	last := make([]int, writers)
	for n := 0; n < writers*each; n++ {
		b, err := readFrame(peer, nil, 1<<20)
		require.NoError(t, err)
		f, err := parseFrame(b)
		require.NoError(t, err)
		require.Equal(t, frameAck, f.typ)
		sid := f.streamID
		g, i := int(sid-1)/each, int(sid-1)%each
		require.Greater(t, i+1, last[g]-1, "in order within a writer")
		last[g] = i + 1
		acts, err := decodeActions(f.payload)
		require.NoError(t, err)
		want, _ := parseFrame(ack(sid)[lengthSize:])
		if !bytes.Equal(want.payload, f.payload) {
			assert.Equal(t, []Action{ActionSetVar{Name: "error", Scope: VarScopeTransaction, Value: true}}, acts, "stream %d", sid)
		}
	}
	for g := 0; g < writers; g++ {
		require.NoError(t, <-errs)
	}
	t.Logf("%d of %d ACKs replaced", replaced, writers*each)
	assert.Positive(t, replaced)
}
