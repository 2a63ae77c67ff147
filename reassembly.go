package spoe

// maxReassembled bounds a NOTIFY joined from fragments.
const maxReassembled = 1 << 20

// reassembly gathers the fragments of one NOTIFY (HAProxy 2.6 and 3.0 send
// them to an agent that announced "fragmentation"): a NOTIFY without FIN,
// then UNSET frames with the same ids, the last one with FIN. An UNSET with
// ABORT ends it without an ACK.
type reassembly struct {
	active   bool
	dropping bool // too big: answered with an aborting ACK, rest ignored
	streamID uint64
	frameID  uint64
	buf      []byte
}

func (ra *reassembly) start(f *frame) {
	ra.active, ra.dropping = true, false
	ra.streamID, ra.frameID = f.streamID, f.frameID
	ra.buf = append([]byte(nil), f.payload...)
}

func (ra *reassembly) matches(f *frame) bool {
	return ra.active && f.streamID == ra.streamID && f.frameID == ra.frameID
}

// end forgets the NOTIFY and lets go of its buffer: fragmented NOTIFYs
// are rare, and an idle connection holds no buffer.
func (ra *reassembly) end() {
	ra.active, ra.dropping = false, false
	ra.buf = nil
}

// onUnset continues, ends or aborts the NOTIFY being reassembled.
func (c *conn) onUnset(f *frame) error {
	if !c.frag.matches(f) {
		if c.frag.active {
			return errInterlaced
		}
		return nil // nothing to continue or abort: ignored
	}
	if f.abort() {
		c.frag.end()
		return nil
	}
	if !c.frag.dropping {
		c.frag.buf = append(c.frag.buf, f.payload...)
		c.checkReassembly()
	}
	if !f.fin() {
		return nil
	}
	if c.frag.dropping {
		c.frag.end()
		return nil
	}
	if err := c.handle(c.frag.streamID, c.frag.frameID, c.frag.buf); err != nil {
		return err
	}
	c.frag.end()
	return nil
}

// checkReassembly answers a NOTIFY that grew too big with an aborting ACK
// (HAProxy then fails that event) and ignores the rest of its fragments.
func (c *conn) checkReassembly() {
	if len(c.frag.buf) <= maxReassembled {
		return
	}
	c.stats.notifyTooBig.Add(1)
	c.cfg.logger.WithField("stream_id", c.frag.streamID).WithField("frame_id", c.frag.frameID).
		Warnf("spoe: fragmented NOTIFY above %d bytes: aborted", maxReassembled)
	c.out.b = appendFrame(c.outBuf(), frameAck, flagFin|flagAbort, c.frag.streamID, c.frag.frameID, nil)
	c.frag.dropping = true
	c.frag.buf = nil
}
