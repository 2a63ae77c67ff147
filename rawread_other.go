//go:build !unix

package spoe

// initRawRead does nothing where raw socket reads are not available: the
// reader reads with the source's Read and holds its buffer while waiting.
func (rd *frameReader) initRawRead() {}

func (rd *frameReader) read() (int, error) { return rd.plainRead() }

// readNow reads nothing where raw socket reads are not available.
func (rd *frameReader) readNow([]byte) int { return 0 }
