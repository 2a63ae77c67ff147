package spoe

// oversized handles a frame longer than the negotiated max-frame-size
// whose length prefix is at c.in.b[c.r:]. HAProxy 3.1.0 does not check the
// negotiated size when it sends a NOTIFY (its multiplexer does only since
// 3.2-dev): with Agent.MaxFrameSize below the size of a message, such a
// NOTIFY arrives. Ending the connection for it (AGENT-DISCONNECT "frame is
// too big") would fail more than that event: 3.1.0 may send the next one
// on the closing connection. So a whole NOTIFY no longer than HAProxy's
// own max-frame-size is answered like a failed handler (the error
// variable, no actions) and its bytes are skipped as they come, never
// held; the connection goes on.
//
// It reports skip when the frame is being skipped (c.skip counts its bytes
// still to come), the error for any other oversized frame, or neither when
// the frame's header is not all read yet.
func (c *conn) oversized(length uint32, err error) (skip bool, _ error) {
	if err != errFrameTooBig || !c.handshaken || uint64(length) > c.haproxyMaxFrame {
		return false, err
	}
	avail := c.w - c.r - lengthSize
	const maxHeader = 1 + 4 + 10 + 10 // type, flags, two varints
	if avail > maxHeader {
		avail = maxHeader
	}
	f, perr := parseFrame(c.in.b[c.r+lengthSize : c.r+lengthSize+avail])
	if perr != nil {
		if avail < maxHeader && avail < int(length) {
			return false, nil // read more of it first
		}
		return false, err
	}
	if f.typ != frameNotify || !f.fin() || f.abort() {
		return false, err
	}
	a := c.agent
	a.stats.notifyTooBig.Add(1)
	a.logger().WithField("stream_id", f.streamID).WithField("frame_id", f.frameID).
		Warnf("spoe: NOTIFY of %d bytes above the negotiated max-frame-size %d: failed, skipped", length, c.maxFrame)
	var w ActionWriter
	w.reset(c.outBuf(), f.streamID, f.frameID, c.maxFrame, a.prefixLen())
	if name := a.errorVar(); name != "" {
		_ = w.SetBool(VarScopeTransaction, name, true)
	}
	c.out.b = w.finish()
	c.skip = lengthSize + int(length)
	c.frames++
	return true, nil
}

// skipping drops the bytes of a frame oversized is skipping, as far as
// they were read.
func (c *conn) skipping() {
	n := c.w - c.r
	if n > c.skip {
		n = c.skip
	}
	c.r += n
	c.skip -= n
}
