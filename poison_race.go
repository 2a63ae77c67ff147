//go:build race

package spoe

// Built with the race detector (as tests usually are), the agent poisons
// what a handler was given once it returns: its Request and ActionWriter
// panic when used, and the frame bytes its views point into are
// overwritten, so that a handler keeping a view fails loudly.
const poisonViews = true

func poison(b []byte) {
	for i := range b {
		b[i] = 0xA5
	}
}
