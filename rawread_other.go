//go:build !unix

package spoe

// initRawRead does nothing where raw socket reads are not available: the
// connection reads with net.Conn.Read and holds its buffer while waiting.
func (c *conn) initRawRead() {}

func (c *conn) read() (int, error) { return c.plainRead() }

// readNow reads nothing where raw socket reads are not available.
func (c *conn) readNow([]byte) int { return 0 }
