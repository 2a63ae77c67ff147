package spoe

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain runs the whole suite, then fails it if any goroutine of the
// package (library or tests) outlived its test: every agent, connection,
// handler, engine pump and client must be gone once the tests are done.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaks := waitForLeaks(10 * time.Second); leaks != "" {
			fmt.Fprintf(os.Stderr, "goroutines left behind by the tests:\n\n%s\n", leaks)
			code = 1
		}
	}
	os.Exit(code)
}

// waitForLeaks returns the stacks of the package's goroutines still alive
// after timeout, or "" as soon as there is none. Goroutines end a little
// after what ended them, so it polls.
func waitForLeaks(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		leaks := packageGoroutines()
		if leaks == "" || time.Now().After(deadline) {
			return leaks
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func packageGoroutines() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var leaks []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/spoe-go/spoe") && !strings.Contains(g, "spoe.packageGoroutines") {
			leaks = append(leaks, g)
		}
	}
	return strings.Join(leaks, "\n\n")
}
