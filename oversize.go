package spoe

// oversized handles a frame longer than the negotiated max-frame-size at
// the head of the reader's buffer (err is the reader's errFrameTooBig).
// HAProxy 3.1.0 does not check the negotiated size when it sends a NOTIFY
// (its multiplexer does only since 3.2-dev): with Agent.MaxFrameSize below
// the size of a message, such a NOTIFY arrives. Ending the connection for
// it (AGENT-DISCONNECT "frame is too big") would fail more than that
// event: 3.1.0 may send the next one on the closing connection. So a whole
// NOTIFY no longer than HAProxy's own max-frame-size is answered like a
// failed handler (the error variable, no actions) and its bytes are
// skipped as they come, never held; the connection goes on.
//
// It reports skip when the frame is being skipped (the reader drops its
// bytes as they come), err for any other oversized frame, or neither when
// the frame's header is not all read yet.
func (c *conn) oversized(err error) (skip bool, _ error) {
	length, head := c.rd.peek(maxFrameHeader)
	if !c.handshaken || uint64(length) > c.haproxyMaxFrame {
		return false, err
	}
	f, perr := parseFrame(head)
	if perr != nil {
		if len(head) < maxFrameHeader && len(head) < int(length) {
			return false, nil // read more of it first
		}
		return false, err
	}
	if f.typ != frameNotify || !f.fin() || f.abort() {
		return false, err
	}
	c.stats.notifyTooBig.Add(1)
	c.cfg.logger.WithField("stream_id", f.streamID).WithField("frame_id", f.frameID).
		Warnf("spoe: NOTIFY of %d bytes above the negotiated max-frame-size %d: failed, skipped", length, c.maxFrame)
	var w ActionWriter
	w.reset(c.outRoom(lengthSize+maxFrameHeader+c.cfg.errorVarRoom), f.streamID, f.frameID, c.maxFrame, c.cfg.prefixLen)
	if name := c.cfg.errorVar; name != "" {
		_ = w.SetBool(VarScopeTransaction, name, true)
	}
	c.out.b = w.finish()
	c.rd.skipFrame(lengthSize + int(length))
	return true, nil
}
