package spoe

import (
	"sync/atomic"
	"time"
)

// maxReassembled bounds a NOTIFY joined from fragments.
const maxReassembled = 1 << 20

// reassembly gathers the fragments of one NOTIFY (HAProxy 2.6 and 3.0 send
// them to an agent that announced "fragmentation"): a NOTIFY without FIN,
// then UNSET frames with the same ids, the last one with FIN. An UNSET with
// ABORT ends it without an ACK.
//
// What it may hold is bounded three ways: maxReassembled per NOTIFY, the
// agent's MaxReassemblyBytes for all of them together (reserved, in
// reassemblyBudget, as the buffer grows), and a deadline, ReadTimeout from
// the first fragment. Beyond any of them the NOTIFY is answered with an
// aborting ACK (HAProxy fails that event with error 4 and sends no more of
// its fragments) and its buffer let go; the connection goes on. Its buffer
// is let go as soon as the NOTIFY ends, so that an idle connection holds
// none.
type reassembly struct {
	active   bool
	streamID uint64
	frameID  uint64
	deadline time.Time
	buf      []byte
	reserved int // bytes of the budget held for buf

	// The NOTIFY last answered with an aborting ACK: HAProxy 2.6 fails
	// that event and forgets it without sending a fragment with ABORT,
	// but fragments of it already on their way still come; they are
	// ignored, even amid another NOTIFY's.
	aborted                bool
	abortedSID, abortedFID uint64
}

// reassemblyBudget is the agent-wide count of the bytes that reassemblies
// hold, bounded by MaxReassemblyBytes.
type reassemblyBudget struct {
	max  int64
	used atomic.Int64
}

// grow reserves n more bytes. It reports false, reserving nothing, when
// they would exceed the budget.
func (b *reassemblyBudget) grow(n int) bool {
	if b.used.Add(int64(n)) > b.max {
		b.used.Add(-int64(n))
		return false
	}
	return true
}

func (b *reassemblyBudget) shrink(n int) { b.used.Add(-int64(n)) }

func (ra *reassembly) matches(f *frame) bool {
	return ra.active && f.streamID == ra.streamID && f.frameID == ra.frameID
}

// pending reports whether a NOTIFY is being joined.
func (ra *reassembly) pending() bool { return ra.active }

// stray reports whether f is a fragment of the NOTIFY last aborted.
func (ra *reassembly) stray(f *frame) bool {
	return ra.aborted && f.streamID == ra.abortedSID && f.frameID == ra.abortedFID
}

// detached is the state a rescuer starts from: no NOTIFY under way (the
// one handed to the slow handler left the reassembly, and its budget,
// before it ran), the aborted one still known.
func (ra *reassembly) detached() reassembly {
	return reassembly{aborted: ra.aborted, abortedSID: ra.abortedSID, abortedFID: ra.abortedFID}
}

// startReassembly begins joining the fragmented NOTIFY f.
func (c *conn) startReassembly(f *frame) {
	c.frag.active = true
	c.frag.streamID, c.frag.frameID = f.streamID, f.frameID
	c.frag.deadline = time.Now().Add(c.cfg.readTimeout)
	c.appendFragment(f.payload)
}

// appendFragment adds a fragment's payload, within the bounds: beyond
// them the NOTIFY is aborted.
func (c *conn) appendFragment(p []byte) {
	ra := &c.frag
	if len(ra.buf)+len(p) > maxReassembled {
		c.stats.notifyTooBig.Add(1)
		c.abortReassembly("spoe: fragmented NOTIFY above 1 MiB: aborted")
		return
	}
	if need := len(ra.buf) + len(p); need > ra.reserved {
		size := 2 * cap(ra.buf)
		if size < need {
			size = need
		}
		if size > maxReassembled {
			size = maxReassembled
		}
		if !c.agent.reassemblies.grow(size - ra.reserved) {
			c.stats.notifyTooBig.Add(1)
			c.abortReassembly("spoe: MaxReassemblyBytes reached: fragmented NOTIFY aborted")
			return
		}
		nb := make([]byte, len(ra.buf), size)
		copy(nb, ra.buf)
		ra.buf = nb
		ra.reserved = size
	}
	ra.buf = append(ra.buf, p...)
}

// endReassembly forgets the NOTIFY and lets go of its buffer: fragmented
// NOTIFYs are rare, and an idle connection holds no buffer.
func (c *conn) endReassembly() {
	ra := &c.frag
	ra.active = false
	ra.buf = nil
	if ra.reserved > 0 {
		c.agent.reassemblies.shrink(ra.reserved)
		ra.reserved = 0
	}
}

// abortReassembly answers the NOTIFY being joined with an aborting ACK
// (HAProxy then fails that event with error 4) and ends its transfer
// there: HAProxy 2.6 sends no fragment with ABORT after it, and the next
// NOTIFY would else be taken for an interlaced frame. Its fragments still
// on their way are ignored (reassembly.stray).
func (c *conn) abortReassembly(why string) {
	if ok, suppressed := c.cfg.logs.allow(why); ok {
		c.log().WithField("stream_id", c.frag.streamID).WithField("frame_id", c.frag.frameID).
			WithField("suppressed", suppressed).Warn(why)
	}
	b := c.outRoom(lengthSize + maxFrameHeader) // before c.out is read: it may take the buffer
	c.out.b = appendFrame(b, frameAck, flagFin|flagAbort, c.frag.streamID, c.frag.frameID, nil)
	c.frag.aborted, c.frag.abortedSID, c.frag.abortedFID = true, c.frag.streamID, c.frag.frameID
	c.endReassembly()
}

// reassemblyExpired aborts the NOTIFY being joined if its deadline passed.
// It reports whether it did.
func (c *conn) reassemblyExpired() bool {
	if !c.frag.pending() || time.Now().Before(c.frag.deadline) {
		return false
	}
	c.stats.reassemblyTimeouts.Add(1)
	c.abortReassembly("spoe: fragmented NOTIFY not finished within ReadTimeout: aborted")
	return true
}

// onUnset continues, ends or aborts the NOTIFY being reassembled.
func (c *conn) onUnset(f *frame) error {
	if !c.frag.matches(f) {
		if c.frag.active && !c.frag.stray(f) {
			return errInterlaced
		}
		return nil // nothing to continue or abort, or of an aborted NOTIFY: ignored
	}
	if f.abort() {
		c.endReassembly()
		return nil
	}
	if c.reassemblyExpired() {
		return nil // aborted: the rest of it is ignored
	}
	if c.appendFragment(f.payload); !c.frag.active {
		return nil // aborted: the rest of it is ignored
	}
	if !f.fin() {
		return nil
	}
	// The joined NOTIFY stays counted in the budget while its handler runs
	// inline on it (rescued or not: handle returns once it is done); a
	// dispatched handler's copy is counted in MaxBufferBytes instead.
	id, fid, payload := c.frag.streamID, c.frag.frameID, c.frag.buf
	reserved := c.frag.reserved
	c.frag.reserved = 0
	c.endReassembly()
	err := c.handle(id, fid, payload)
	c.agent.reassemblies.shrink(reserved)
	return err
}
