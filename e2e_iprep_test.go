package spoe_test

// The flagship example's HAProxy rules, end to end: examples/ip-reputation's
// haproxy.cfg and spoe.conf as they are (addresses rewritten) behind HAProxy
// 2.6 and 3.2, first with an agent of the test answering chosen scores,
// then with the example's own agent as built.

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// reputationApp is the application behind the example: it echoes the
// X-IP-Reputation* headers HAProxy added to the request.
func reputationApp(t *testing.T) string {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Reputation", r.Header.Get("X-IP-Reputation"))
		w.Header().Set("X-Seen-Error", r.Header.Get("X-IP-Reputation-Error"))
	}))
	t.Cleanup(app.Close)
	return app.Listener.Addr().String()
}

func TestE2EIPReputationRules(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		// Each NOTIFY gets the next answer: a score in thousandths, or
		// -1 for a handler error.
		var mu sync.Mutex
		var next int64
		agent := startAgentUnderTest(t, spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
			mu.Lock()
			score := next
			mu.Unlock()
			if score < 0 {
				return nil, errors.New("reputation service down")
			}
			return []spoe.Action{spoe.ActionSetVar{Name: "reputation", Scope: spoe.VarScopeSession, Value: score}}, nil
		}))
		url := runExampleHAProxy(t, hp, "examples/ip-reputation", map[string]string{
			"bind :8080":     fmt.Sprintf("bind 127.0.0.1:%d", freePort(t)),
			"127.0.0.1:9000": agent.addr,
			"127.0.0.1:8000": reputationApp(t),
		})
		client := newClient(t, false)
		ask := func(score int64) response {
			mu.Lock()
			next = score
			mu.Unlock()
			return get(t, client, url+"/")
		}
		mu.Lock()
		next = 750
		mu.Unlock()
		waitWithin(t, 10*time.Second, func() bool {
			r, err := tryGet(client, url+"/")
			return err == nil && r.header.Get("X-Seen-Reputation") == "750"
		}, "HAProxy and the agent answering")

		for _, c := range []struct {
			score         int64
			status        int
			seen, seenErr string
		}{
			{750, 200, "750", ""},
			{200, 200, "200", ""},
			{199, 403, "", ""},
			{0, 403, "", ""},
			{1000, 200, "1000", ""},
			{-1, 200, "", "1"}, // the handler failed: through, flagged
		} {
			r := ask(c.score)
			if r.status != c.status || r.header.Get("X-Seen-Reputation") != c.seen || r.header.Get("X-Seen-Error") != c.seenErr {
				t.Errorf("score %d: status %d, X-IP-Reputation %q, X-IP-Reputation-Error %q; want %d, %q, %q",
					c.score, r.status, r.header.Get("X-Seen-Reputation"), r.header.Get("X-Seen-Error"), c.status, c.seen, c.seenErr)
			}
		}
	})
}

// The example's agent as built, on a unix socket, answers a loopback
// client with 750.
func TestE2EIPReputationExample(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "ip-reputation")
	if out, err := exec.Command("go", "build", "-o", bin, "./examples/ip-reputation").CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/ip-reputation: %v\n%s", err, out)
	}
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		sock := filepath.Join(t.TempDir(), "agent.sock")
		agent := exec.Command(bin, "-addr", "unix://"+sock, "-shutdown-timeout", "2s")
		agentLog := &syncBuffer{}
		agent.Stdout, agent.Stderr = agentLog, agentLog
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- agent.Wait() }()
		t.Cleanup(func() {
			_ = agent.Process.Signal(syscall.SIGTERM)
			select {
			case err := <-exited:
				if err != nil {
					t.Errorf("the agent exited with %v on SIGTERM, want 0", err)
				}
			case <-time.After(5 * time.Second):
				_ = agent.Process.Kill()
				<-exited
				t.Error("the agent did not stop on SIGTERM")
			}
		})
		logOnFailure(t, "ip-reputation agent log", agentLog)
		waitWithin(t, 10*time.Second, func() bool {
			c, err := net.Dial("unix", sock)
			if err == nil {
				c.Close()
			}
			return err == nil
		}, "the agent listening on "+sock)

		url := runExampleHAProxy(t, hp, "examples/ip-reputation", map[string]string{
			"bind :8080":     fmt.Sprintf("bind 127.0.0.1:%d", freePort(t)),
			"127.0.0.1:9000": "unix@" + sock,
			"127.0.0.1:8000": reputationApp(t),
		})
		client := newClient(t, false)
		waitWithin(t, 10*time.Second, func() bool {
			r, err := tryGet(client, url+"/")
			return err == nil && r.status == 200 && r.header.Get("X-Seen-Reputation") == "750"
		}, "a loopback client scored 750 by the example's agent")
	})
}
