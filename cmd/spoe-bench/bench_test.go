package main

import (
	"bytes"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spoe-go/spoe"
)

// contractHandler answers the three workloads as the contract says, with
// the library's simple API. score is what it sets sess.score to (100 is
// right).
func contractHandler(score int) spoe.MessageHandler {
	return func(messages []spoe.Message) ([]spoe.Action, error) {
		var actions []spoe.Action
		for _, m := range messages {
			actions = append(actions, spoe.ActionSetVar{Scope: spoe.VarScopeSession, Name: "score", Value: score})
			switch m.Name {
			case "heavy":
				host, _ := m.ArgString("host")
				actions = append(actions,
					spoe.ActionSetVar{Scope: spoe.VarScopeTransaction, Name: "host", Value: host},
					spoe.ActionSetVar{Scope: spoe.VarScopeTransaction, Name: "ok", Value: true})
			case "mixed":
				if ms, _ := m.ArgInt("delay-ms"); ms > 0 {
					time.Sleep(time.Duration(ms) * time.Millisecond)
				}
			}
		}
		return actions, nil
	}
}

// serve starts an agent on a loopback port and returns its address.
func serve(t *testing.T, h spoe.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetOutput(&bytes.Buffer{})
	agent := &spoe.Agent{Handler: h, Logger: log}
	served := make(chan error, 1)
	go func() { served <- agent.Serve(l) }()
	t.Cleanup(func() {
		agent.Close()
		<-served
	})
	return l.Addr().String()
}

func shortConfig(addr, workload string) *config {
	w, err := newWorkload(workload)
	if err != nil {
		panic(err)
	}
	return &config{addr: addr, conns: 2, inflight: 8, pipelining: true, workload: w,
		warmup: 50 * time.Millisecond, duration: 300 * time.Millisecond, timeout: 3 * time.Second}
}

func TestRunAgainstAgent(t *testing.T) {
	addr := serve(t, contractHandler(100))
	for _, name := range []string{"ip-rep", "heavy", "mixed"} {
		t.Run(name, func(t *testing.T) {
			cfg := shortConfig(addr, name)
			if name == "mixed" {
				cfg.slowFraction, cfg.slowDelay = 0.05, 5*time.Millisecond
			}
			rep, err := run(cfg, os.Getpid())
			if err != nil {
				t.Fatal(err)
			}
			if rep.errors() != 0 || rep.res.requests == 0 {
				t.Fatalf("%d requests, errors %v: %s", rep.res.requests, rep.res.errors, rep.res.firstErr)
			}
			if rep.agentErr != nil {
				t.Errorf("agent CPU: %v", rep.agentErr)
			}
			if name == "mixed" {
				if rep.res.slow == 0 || rep.res.slow > rep.res.requests/5 {
					t.Errorf("%d slow requests of %d, want about 5%%", rep.res.slow, rep.res.requests)
				}
				if p50 := rep.res.slowH.percentile(0.5); p50 < 5*time.Millisecond {
					t.Errorf("slow requests' p50 %v, want at least the 5ms delay", p50)
				}
				if rep.res.fast.n+rep.res.slowH.n != rep.res.requests {
					t.Errorf("fast %d + slow %d != %d", rep.res.fast.n, rep.res.slowH.n, rep.res.requests)
				}
			}
			var out bytes.Buffer
			rep.print(&out)
			if !strings.Contains(out.String(), "RESULT workload="+name) || !strings.Contains(out.String(), " errors=0 ") {
				t.Errorf("report:\n%s", out.String())
			}
		})
	}
}

func TestRunWithoutPipelining(t *testing.T) {
	addr := serve(t, contractHandler(100))
	cfg := shortConfig(addr, "ip-rep")
	cfg.pipelining, cfg.inflight = false, 1
	rep, err := run(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.errors() != 0 || rep.res.requests == 0 {
		t.Fatalf("%d requests, errors %v: %s", rep.res.requests, rep.res.errors, rep.res.firstErr)
	}
}

// A wrong answer is an error, not a request.
func TestRunCountsWrongAnswers(t *testing.T) {
	addr := serve(t, contractHandler(99))
	rep, err := run(shortConfig(addr, "ip-rep"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.res.requests != 0 || rep.res.errors[errActions] == 0 || !strings.Contains(rep.res.firstErr, "integer 100") {
		t.Fatalf("%d requests, errors %v: %s", rep.res.requests, rep.res.errors, rep.res.firstErr)
	}
}

// An agent that never answers: every NOTIFY in flight is a timeout, and
// the exit status is 2.
func TestRunTimeouts(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	addr := serve(t, spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		select {
		case <-block:
		case <-r.Context().Done():
		}
		return nil
	}))
	var out, errOut bytes.Buffer
	code := realMain([]string{"-addr", addr, "-conns", "1", "-inflight", "4", "-warmup", "0s",
		"-duration", "100ms", "-timeout", "200ms"}, &out, &errOut)
	if code != 2 || !strings.Contains(out.String(), "timeout 4") {
		t.Fatalf("exit %d, output:\n%s%s", code, out.String(), errOut.String())
	}
}

func TestFlags(t *testing.T) {
	var out, errOut bytes.Buffer
	for _, args := range [][]string{
		{"-workload", "nope"},
		{"-pipelining=false", "-inflight", "2"},
		{"-conns", "0"},
	} {
		if code := realMain(args, &out, &errOut); code != 1 {
			t.Errorf("%v: exit %d, want 1", args, code)
		}
	}
}

// CPU per request is a ratio of rates: a late sample changes the interval,
// not the result.
func TestPerRequest(t *testing.T) {
	w, _ := newWorkload("ip-rep")
	r := &report{cfg: &config{workload: w, duration: 10 * time.Second}, measured: 12 * time.Second}
	r.res.requests = 1000000 // 100,000 req/s
	// 1.2 s of CPU over 12 s is 0.1 CPU; at 100,000 req/s, 1 µs each.
	if got := r.perRequest(1200 * time.Millisecond); got < 0.999 || got > 1.001 {
		t.Errorf("perRequest = %v µs, want 1", got)
	}
	if r.rps() != 100000 {
		t.Errorf("rps = %v, want 100000", r.rps())
	}
}

// -addr unix:PATH drives an agent on a unix socket.
func TestRunUnixSocket(t *testing.T) {
	path := t.TempDir() + "/agent.sock"
	l, err := spoe.Listen("unix://" + path)
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetOutput(&bytes.Buffer{})
	agent := &spoe.Agent{Handler: contractHandler(100), Logger: log}
	served := make(chan error, 1)
	go func() { served <- agent.Serve(l) }()
	defer func() {
		agent.Close()
		<-served
	}()
	rep, err := run(shortConfig("unix:"+path, "heavy"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.errors() != 0 || rep.res.requests == 0 {
		t.Fatalf("%d requests, errors %v: %s", rep.res.requests, rep.res.errors, rep.res.firstErr)
	}
}
