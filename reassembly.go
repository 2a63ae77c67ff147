package spoe

// maxReassembled bounds a NOTIFY joined from fragments.
const maxReassembled = 1 << 20

// reassembly gathers the fragments of one NOTIFY (HAProxy 2.6 and 3.0 send
// them to an agent that announced "fragmentation"): a NOTIFY without FIN,
// then UNSET frames with the same ids, the last one with FIN. An UNSET with
// ABORT ends it without an ACK.
type reassembly struct {
	active   bool
	streamID uint64
	frameID  uint64
	buf      []byte

	// The NOTIFY last answered with an aborting ACK (too big): HAProxy 2.6
	// fails that event and forgets it without sending a fragment with
	// ABORT, but fragments of it already on their way still come; they
	// are ignored, even amid another NOTIFY's.
	aborted                bool
	abortedSID, abortedFID uint64
}

func (ra *reassembly) start(f *frame) {
	ra.active = true
	ra.streamID, ra.frameID = f.streamID, f.frameID
	ra.buf = append([]byte(nil), f.payload...)
}

func (ra *reassembly) matches(f *frame) bool {
	return ra.active && f.streamID == ra.streamID && f.frameID == ra.frameID
}

// end forgets the NOTIFY and lets go of its buffer: fragmented NOTIFYs
// are rare, and an idle connection holds no buffer.
func (ra *reassembly) end() {
	ra.active = false
	ra.buf = nil
}

// abort ends the NOTIFY, answered with an aborting ACK: its later
// fragments are strays.
func (ra *reassembly) abort() {
	ra.aborted, ra.abortedSID, ra.abortedFID = true, ra.streamID, ra.frameID
	ra.end()
}

// stray reports whether f is a fragment of the NOTIFY last aborted.
func (ra *reassembly) stray(f *frame) bool {
	return ra.aborted && f.streamID == ra.abortedSID && f.frameID == ra.abortedFID
}

// detached is the state a rescuer starts from: no NOTIFY under way (its
// buffer stays with the slow handler), the aborted one still known.
func (ra *reassembly) detached() reassembly {
	return reassembly{aborted: ra.aborted, abortedSID: ra.abortedSID, abortedFID: ra.abortedFID}
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
		c.frag.end()
		return nil
	}
	c.frag.buf = append(c.frag.buf, f.payload...)
	if c.checkReassembly(); !c.frag.active {
		return nil // aborted: the rest of it is ignored
	}
	if !f.fin() {
		return nil
	}
	if err := c.handle(c.frag.streamID, c.frag.frameID, c.frag.buf); err != nil {
		return err
	}
	c.frag.end()
	return nil
}

// checkReassembly answers a NOTIFY that grew too big with an aborting ACK
// (HAProxy then fails that event) and ends its transfer there: HAProxy 2.6
// sends no fragment with ABORT after it, and the next NOTIFY would else be
// taken for an interlaced frame. Its fragments still on their way are
// ignored (reassembly.stray).
func (c *conn) checkReassembly() {
	if len(c.frag.buf) <= maxReassembled {
		return
	}
	c.stats.notifyTooBig.Add(1)
	c.cfg.logger.WithField("stream_id", c.frag.streamID).WithField("frame_id", c.frag.frameID).
		Warnf("spoe: fragmented NOTIFY above %d bytes: aborted", maxReassembled)
	b := c.outBuf() // before c.out is read: it may take the buffer
	c.out.b = appendFrame(b, frameAck, flagFin|flagAbort, c.frag.streamID, c.frag.frameID, nil)
	c.frag.abort()
}
