package main

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestAgainstBenchAgent drives examples/bench-agent as built, on both of
// its APIs, with every workload: the agent the README's figures come from
// serves the contract spoe-bench checks.
func TestAgainstBenchAgent(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "bench-agent")
	if out, err := exec.Command("go", "build", "-o", bin, "../../examples/bench-agent").CombinedOutput(); err != nil {
		t.Fatalf("go build examples/bench-agent: %v\n%s", err, out)
	}
	for _, api := range []string{"fast", "simple"} {
		t.Run(api, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			port := l.Addr().(*net.TCPAddr).Port
			l.Close()
			agent := exec.Command(bin, "-api", api, "-port", strconv.Itoa(port))
			if err := agent.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- agent.Wait() }()
			defer func() {
				_ = agent.Process.Signal(syscall.SIGTERM)
				select {
				case err := <-exited:
					if err != nil {
						t.Errorf("bench-agent exited with %v on SIGTERM", err)
					}
				case <-time.After(5 * time.Second):
					_ = agent.Process.Kill()
					<-exited
					t.Error("bench-agent did not stop on SIGTERM")
				}
			}()
			addr := fmt.Sprintf("127.0.0.1:%d", port)
			deadline := time.Now().Add(10 * time.Second)
			for {
				c, err := net.Dial("tcp", addr)
				if err == nil {
					c.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("bench-agent not listening on %s: %v", addr, err)
				}
				time.Sleep(10 * time.Millisecond) // polling, not synchronisation
			}

			for _, name := range []string{"ip-rep", "heavy", "mixed"} {
				cfg := shortConfig(addr, name)
				if name == "mixed" {
					cfg.slowFraction, cfg.slowDelay = 0.05, 5*time.Millisecond
				}
				rep, err := run(cfg, agent.Process.Pid)
				if err != nil {
					t.Fatal(err)
				}
				if rep.errors() != 0 || rep.res.requests == 0 || rep.agentErr != nil {
					t.Errorf("%s: %d requests, errors %v: %s; agent CPU: %v", name, rep.res.requests, rep.res.errors, rep.res.firstErr, rep.agentErr)
				}
				if name == "mixed" && rep.res.slowH.n > 0 && rep.res.slowH.percentile(0.5) < 5*time.Millisecond {
					t.Errorf("the slow requests took %v at the median: bench-agent did not wait delay-ms", rep.res.slowH.percentile(0.5))
				}
			}
		})
	}
}
