package spoe

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestIdleConnectionMemory measures what an idle connection costs: it runs
// examples/bench-agent in a process of its own, opens SPOE_IDLE_CONNS
// connections (1,000 by default; SPOE_IDLE_CONNS=10000 for the README's
// figure), each after its HELLO and one NOTIFY, and reads the agent's
// resident memory. An idle connection must hold no frame buffer, and cost
// at most 10 KiB.
func TestIdleConnectionMemory(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc/PID/status")
	}
	n := 1000
	if s := os.Getenv("SPOE_IDLE_CONNS"); s != "" {
		var err error
		n, err = strconv.Atoi(s)
		require.NoError(t, err)
	}
	addr, pid := startBenchAgent(t, "-maxconns", "-1") // more than DefaultMaxConns at once

	// Warm the agent up, so that the baseline holds its pools.
	warm := dialAgent(t, addr, ClientConfig{})
	for i := 0; i < 100; i++ {
		_, err := warm.Notify(notifyCtx(t), heavyMessage)
		require.NoError(t, err)
	}
	before := residentKiB(t, pid)

	hello := rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(
		"supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "pipelining", "engine-id", "idle"))
	payload, err := appendMessages(nil, []ClientMessage{heavyMessage})
	require.NoError(t, err)
	notify := rawFrame(frameNotify, flagFin, 1, 1, payload)
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	buf := make([]byte, 4096)
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		conns = append(conns, c)
		for _, frame := range [][]byte{hello, notify} {
			_, err = c.Write(frame)
			require.NoError(t, err)
			_, err = c.Read(buf) // the AGENT-HELLO, then the ACK: one segment each
			require.NoError(t, err)
		}
	}
	after := residentKiB(t, pid)
	perConn := float64(after-before) * 1024 / float64(n)
	t.Logf("%d idle connections: agent RSS %d KiB -> %d KiB, %.0f bytes each", n, before, after, perConn)
	assert.Less(t, perConn, 10240.0, "bytes per idle connection")
}

// residentKiB reads a process's VmRSS.
func residentKiB(t *testing.T, pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) >= 2 && fields[0] == "VmRSS:" {
			n, err := strconv.Atoi(fields[1])
			require.NoError(t, err)
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// startBenchAgent builds examples/bench-agent and runs it, with args, in a
// process of its own (GOMAXPROCS=1), so that what it holds is measured apart from the
// test's side of the connections. It is killed when the test ends.
func startBenchAgent(t *testing.T, args ...string) (addr string, pid int) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bench-agent")
	out, err := exec.Command("go", "build", "-o", bin, "./examples/bench-agent").CombinedOutput()
	require.NoError(t, err, "%s", out)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	agent := exec.Command(bin, append([]string{"-port", strconv.Itoa(port)}, args...)...)
	agent.Env = append(os.Environ(), "GOMAXPROCS=1")
	require.NoError(t, agent.Start())
	t.Cleanup(func() { _ = agent.Process.Kill(); _ = agent.Wait() })
	addr = fmt.Sprintf("127.0.0.1:%d", port)
	waitFor(t, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, "bench-agent listening")
	return addr, agent.Process.Pid
}

// TestConnectionStorm: 10,000 connections opened at once (64 dialers) and
// dropped together, some before their HELLO, some after, some in the
// middle of a frame; the agent accepts them all, survives, and serves a new
// connection. SPOE_STORM_CONNS changes the count.
func TestConnectionStorm(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc/PID/status")
	}
	n := 10000
	if s := os.Getenv("SPOE_STORM_CONNS"); s != "" {
		var err error
		n, err = strconv.Atoi(s)
		require.NoError(t, err)
	}
	addr, pid := startBenchAgent(t, "-maxconns", "-1") // more than DefaultMaxConns at once
	hello := rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(
		"supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "pipelining", "engine-id", "storm"))
	conns := make(chan net.Conn, n)
	var dialErrs atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 64; w++ { // 64 dialers at once
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < n; i += 64 {
				c, err := net.DialTimeout("tcp", addr, 10*time.Second)
				if err != nil {
					dialErrs.Add(1)
					continue
				}
				switch i % 3 {
				case 1:
					_, _ = c.Write(hello)
				case 2:
					_, _ = c.Write(hello[:10]) // half a frame
				}
				conns <- c
			}
		}(w)
	}
	wg.Wait()
	close(conns)
	peak := residentKiB(t, pid)
	for c := range conns { // dropped at once
		c.Close()
	}
	t.Logf("%d connections (%d dial errors), agent RSS at peak %d KiB", n, dialErrs.Load(), peak)
	assert.Zero(t, dialErrs.Load(), "every connection accepted")

	// The agent still serves, and its connections are gone.
	c := dialAgent(t, addr, ClientConfig{})
	actions, err := c.Notify(notifyCtx(t), ipRepMessage)
	require.NoError(t, err)
	assert.Len(t, actions, 1)
}
