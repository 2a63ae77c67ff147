package spoe

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
