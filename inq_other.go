//go:build !linux

package spoe

// unreadInSocket bounds what a draining reader takes from the socket where
// the socket cannot say what it holds: one read buffer's worth (nothing
// where the reader cannot read without waiting: rawread_other.go).
func (rd *frameReader) unreadInSocket() int { return 64 << 10 }

// sentAndAcked cannot be known here: closing waits for the peer.
func (rd *frameReader) sentAndAcked() bool { return false }
