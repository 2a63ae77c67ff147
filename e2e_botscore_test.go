package spoe_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestE2EBotScore runs examples/bot-score as built, behind HAProxy 2.6 and
// 3.2 configured with the example's own spoe.conf and haproxy.cfg (only the
// addresses rewritten), and checks its decisions in HAProxy's answers:
// browser-like requests pass with score 0, scripts are tagged, requests
// without headers are denied, a client going too fast is tagged, and with
// the agent gone HAProxy fails open and says so.
func TestE2EBotScore(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "bot-score")
	if out, err := exec.Command("go", "build", "-o", bin, "./examples/bot-score").CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/bot-score: %v\n%s", err, out)
	}
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		agentAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		agent := exec.Command(bin, "-addr", agentAddr, "-rate", "5")
		agentLog := &syncBuffer{}
		agent.Stdout, agent.Stderr = agentLog, agentLog
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		agentDone := make(chan struct{})
		go func() { _ = agent.Wait(); close(agentDone) }()
		stopAgent := func() {
			_ = agent.Process.Signal(syscall.SIGTERM)
			select {
			case <-agentDone:
			case <-time.After(5 * time.Second):
				_ = agent.Process.Kill()
				<-agentDone
			}
		}
		t.Cleanup(stopAgent)
		logOnFailure(t, "bot-score agent log", agentLog)

		// The application echoes what HAProxy told it.
		app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Seen-Reasons", r.Header.Get("X-Bot-Reasons"))
			w.Header().Set("X-Seen-Failed", r.Header.Get("X-Bot-Check-Failed"))
		}))
		t.Cleanup(app.Close)

		url := runExampleHAProxy(t, hp, "examples/bot-score", map[string]string{
			"bind :8081":     fmt.Sprintf("bind 127.0.0.1:%d", freePort(t)),
			"127.0.0.1:9001": agentAddr,
			"127.0.0.1:8000": app.Listener.Addr().String(),
		})
		client := newClient(t, false)
		waitWithin(t, 10*time.Second, func() bool {
			r, err := tryGet(client, url+"/", browser...)
			return err == nil && r.header.Get("X-Bot-Score") != ""
		}, "HAProxy and the agent answering")

		r := get(t, client, url+"/", browser...)
		expect(t, r, 200, "0", "")

		r = get(t, client, url+"/", "User-Agent", "curl/8.5.0", "Accept", "*/*")
		expect(t, r, 200, "65", "automation-ua,no-language")

		r = get(t, client, url+"/", "User-Agent", "") // Go then sends no User-Agent
		expect(t, r, 403, "", "")

		// A client above 5 requests a second.
		var fast response
		for i := 0; i < 15; i++ {
			fast = get(t, client, url+"/", browser...)
		}
		expect(t, fast, 200, "30", "too-fast")

		// The agent gone: HAProxy's error variable, fail open.
		stopAgent()
		r = get(t, client, url+"/", browser...)
		if r.status != 200 || r.header.Get("X-Seen-Failed") != "1" {
			t.Errorf("agent down: status %d, X-Seen-Failed %q; want 200 and 1", r.status, r.header.Get("X-Seen-Failed"))
		}
	})
}

// browser is what a browser sends, less the Host.
var browser = []string{
	"User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
	"Accept", "text/html,application/xhtml+xml",
	"Accept-Language", "en-US,en;q=0.8",
	"Accept-Encoding", "gzip, deflate",
}

func expect(t *testing.T, r response, status int, score, reasons string) {
	t.Helper()
	if r.status != status || r.header.Get("X-Bot-Score") != score || r.header.Get("X-Seen-Reasons") != reasons {
		t.Errorf("got %d, score %q, reasons %q; want %d, %q, %q",
			r.status, r.header.Get("X-Bot-Score"), r.header.Get("X-Seen-Reasons"), status, score, reasons)
	}
}

// runExampleHAProxy runs HAProxy on an example's haproxy.cfg and spoe.conf,
// copied with the replacements applied, from a folder of the test, until
// the test ends. It returns the frontend's URL.
func runExampleHAProxy(t *testing.T, hp haproxyBinary, example string, replace map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	var url string
	for _, name := range []string{"haproxy.cfg", "spoe.conf"} {
		b, err := os.ReadFile(filepath.Join(moduleRoot(), example, name))
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		for from, to := range replace {
			if strings.Contains(s, from) {
				s = strings.ReplaceAll(s, from, to)
				if strings.HasPrefix(to, "bind ") {
					url = "http://" + strings.TrimPrefix(to, "bind ")
				}
			}
		}
		writeFile(t, filepath.Join(dir, name), s)
	}
	if url == "" {
		t.Fatal("no bind address replaced")
	}
	checkHAProxyConfig(t, hp, dir, filepath.Join(dir, "haproxy.cfg"))
	cmd := exec.Command(hp.path, "-db", "-f", "haproxy.cfg")
	cmd.Dir = dir
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	logOnFailure(t, "HAProxy output", out)
	return url
}
