package spoe_test

// TestSoakHAProxyReload: HTTP traffic through real HAProxy 2.6 with
// "option async" while HAProxy is reloaded again and again the classic way:
// each reload starts a new process with "-sf <old pids>", which binds the
// same port and asks the old ones to finish what they serve and leave. Old
// and new processes then run side by side, with their own engine-ids (one
// per process and thread) and stream-ids that all restart at 0: the case
// where an ACK given to the wrong engine would set a variable on another
// request (SPOP.md §6.2).
//
// Every request carries a unique x-nonce header, sent to the agent as an
// argument; the agent echoes it into txn.e2e.nonce and HAProxy returns that
// variable in x-echo. The test fails on any response whose x-echo is not
// its own nonce. Requests that fail while processes come and go (transport
// errors, HAProxy's set-on-error variable, answers without the variable)
// are counted and logged, and must stay a minority. Each process also
// returns its generation (an environment variable) in x-gen and sends it to
// the agent, so that the test knows that every new process served traffic
// through its own engines, and that no engine-id is shared by two
// processes.
//
// Size: SPOE_SOAK_RELOADS reloads (default 6, one every
// SPOE_SOAK_RELOAD_EVERY, default 300ms) and at least SPOE_SOAK_REQUESTS
// requests (default 3000; about 5 s). Full size, e.g. (about 1.5 min on
// the 2-core machine):
//
//	SPOE_SOAK_RELOADS=40 SPOE_SOAK_REQUESTS=40000 go test -race -run TestSoakHAProxyReload -count=1 -timeout 60m -v .
//
// HAProxy 2.6 only: 3.x has no async.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

func soakEnvInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

const soakReloadSpoeConf = `[e2e]
spoe-agent e2e-agent
    messages echo
    option var-prefix e2e
    option set-on-error spoe_error
    option async
    option pipelining
    timeout hello 2s
    timeout idle 30s
    timeout processing 3s
    use-backend spoe-agents

spoe-message echo
    args nonce=req.hdr(x-nonce) gen=env(SOAK_GEN)
    event on-frontend-http-request
`

const soakReloadConf = `global
    nbthread 4
    hard-stop-after 20s
    log stderr format raw local0 notice

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:%[1]d
    filter spoe engine e2e config %[2]s
    http-after-response set-header x-gen %%[env(SOAK_GEN)]
    http-after-response set-header x-echo %%[var(txn.e2e.nonce)] if { var(txn.e2e.nonce) -m found }
    http-after-response set-header x-spoe-error %%[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }
    default_backend app

backend app
    server app %[3]s

backend spoe-agents
    mode tcp
    timeout connect 2s
    # Must outlast the spoe-agent's "timeout idle".
    timeout server 1m
    server agent1 %[4]s
`

// soakProc is one HAProxy process of the reload chain.
type soakProc struct {
	gen     int
	started time.Time
	cmd     *exec.Cmd
	out     *syncBuffer
	exited  chan struct{}
	waitErr error
}

func (p *soakProc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// soakTally is what the traffic saw.
type soakTally struct {
	mu         sync.Mutex
	sent       int
	ok         int
	mismatches []string
	transport  map[string]int // error text (without addresses) -> count
	status     map[int]int
	spoeError  map[string]int // value of txn.e2e.spoe_error
	noVar      int
	perGen     map[string]int
	first      map[string]time.Time // first and last answer of each generation
	last       map[string]time.Time
}

func (s *soakTally) genCount(gen int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perGen[strconv.Itoa(gen)]
}

func TestSoakHAProxyReload(t *testing.T) {
	hp := requireHAProxy(t, haproxyVersions[0]) // 2.6: the only one with async
	reloads := soakEnvInt(t, "SPOE_SOAK_RELOADS", 6)
	requests := soakEnvInt(t, "SPOE_SOAK_REQUESTS", 3000)
	every := 300 * time.Millisecond
	if s := os.Getenv("SPOE_SOAK_RELOAD_EVERY"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("SPOE_SOAK_RELOAD_EVERY=%q: want a duration", s)
		}
		every = d
	}

	// The agent: echoes the nonce; one request in 8 is slow (5-30 ms), so
	// that NOTIFYs are in flight on old processes when they are told to
	// stop, and handlers outlive their connection.
	var engMu sync.Mutex
	engineGen := map[string]string{} // engine-id -> the generation that used it
	var sharedEngines []string
	var handled atomic.Int64
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		handled.Add(1)
		m, ok := r.Message("echo")
		if !ok {
			return fmt.Errorf("no echo message")
		}
		nonce, _ := m.Arg("nonce")
		b, ok := nonce.Bytes()
		if !ok || len(b) == 0 {
			return fmt.Errorf("nonce is %s", nonce.Type())
		}
		genv, _ := m.Arg("gen")
		gb, _ := genv.Bytes()
		engMu.Lock()
		if g, seen := engineGen[r.EngineID()]; !seen {
			engineGen[r.EngineID()] = string(gb)
		} else if g != string(gb) {
			sharedEngines = append(sharedEngines, fmt.Sprintf("%s: generations %s and %s", r.EngineID(), g, gb))
		}
		engMu.Unlock()
		if b[len(b)-1]%8 == 0 {
			time.Sleep(time.Duration(5+int(b[len(b)-2])%26) * time.Millisecond) // the scenario: a slow handler
		}
		return w.SetStringBytes(txn, "nonce", b)
	})})
	gensSeen := func() map[string]int {
		engMu.Lock()
		defer engMu.Unlock()
		n := map[string]int{}
		for _, g := range engineGen {
			n[g]++
		}
		return n
	}

	appAddr := startApp(t)
	dir := t.TempDir()
	port := freePort(t)
	spoeConf := filepath.Join(dir, "spoe.conf")
	writeFile(t, spoeConf, soakReloadSpoeConf)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	writeFile(t, cfgPath, fmt.Sprintf(soakReloadConf, port, spoeConf, appAddr, agent.addr))
	checkHAProxyConfig(t, hp, dir, cfgPath)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)

	var procMu sync.Mutex
	var procs []*soakProc
	start := func(gen int, old []*soakProc) *soakProc {
		args := []string{"-db", "-f", cfgPath}
		if len(old) > 0 {
			args = append(args, "-sf")
			for _, o := range old {
				args = append(args, strconv.Itoa(o.cmd.Process.Pid))
			}
		}
		p := &soakProc{gen: gen, started: time.Now(), out: &syncBuffer{}, exited: make(chan struct{})}
		p.cmd = exec.Command(hp.path, args...)
		p.cmd.Dir = dir
		p.cmd.Env = append(os.Environ(), "SOAK_GEN="+strconv.Itoa(gen))
		p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
		if err := p.cmd.Start(); err != nil {
			t.Fatalf("start HAProxy generation %d: %v", gen, err)
		}
		go func() {
			p.waitErr = p.cmd.Wait()
			close(p.exited)
		}()
		procMu.Lock()
		procs = append(procs, p)
		procMu.Unlock()
		return p
	}
	t.Cleanup(func() {
		procMu.Lock()
		defer procMu.Unlock()
		for _, p := range procs {
			if !p.hasExited() {
				_ = p.cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-p.exited:
				case <-time.After(5 * time.Second):
					_ = p.cmd.Process.Kill()
					<-p.exited
				}
			}
			if t.Failed() {
				t.Logf("---- HAProxy generation %d (pid %d, %v) ----\n%s", p.gen, p.cmd.Process.Pid, p.waitErr, p.out.String())
			}
		}
	})
	running := func() []*soakProc {
		procMu.Lock()
		defer procMu.Unlock()
		var r []*soakProc
		for _, p := range procs {
			if !p.hasExited() {
				r = append(r, p)
			}
		}
		return r
	}

	tally := &soakTally{transport: map[string]int{}, status: map[int]int{}, spoeError: map[string]int{},
		perGen: map[string]int{}, first: map[string]time.Time{}, last: map[string]time.Time{}}
	first := start(0, nil)
	// Half the workers keep their connections (they stay on an old process
	// until it closes them: old and new serve side by side), half open one
	// per request (the new process gets them as soon as it listens).
	client := newClient(t, true)
	oneShot := newClient(t, false)
	waitWithin(t, 10*time.Second, func() bool {
		if first.hasExited() {
			t.Fatalf("HAProxy exited at start: %v", first.waitErr)
		}
		res, err := tryGet(client, url, "x-nonce", "warm-up")
		return err == nil && res.header.Get("x-echo") == "warm-up"
	}, "HAProxy and the agent to answer")

	// Traffic: workers send requests until the reloads are over and enough
	// requests were sent.
	var reloadsDone atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	const workers = 8
	for g := 0; g < workers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			var rnd [6]byte
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				tally.mu.Lock()
				if reloadsDone.Load() && tally.sent >= requests {
					tally.mu.Unlock()
					return
				}
				tally.sent++
				tally.mu.Unlock()
				_, _ = rand.Read(rnd[:])
				nonce := fmt.Sprintf("w%d-%d-%s", g, i, hex.EncodeToString(rnd[:]))
				c := client
				if g%2 == 1 {
					c = oneShot
				}
				res, err := tryGet(c, url, "x-nonce", nonce)
				now := time.Now()
				tally.mu.Lock()
				switch {
				case err != nil:
					tally.transport[soakErrorKind(err)]++
				case res.status != 200:
					tally.status[res.status]++
				default:
					gen := res.header.Get("x-gen")
					tally.perGen[gen]++
					if _, ok := tally.first[gen]; !ok {
						tally.first[gen] = now
					}
					tally.last[gen] = now
					switch echo := res.header.Get("x-echo"); {
					case echo == nonce:
						tally.ok++
					case echo != "":
						tally.mismatches = append(tally.mismatches, fmt.Sprintf("request %s (generation %s) got x-echo %s", nonce, gen, echo))
					case res.header.Get("x-spoe-error") != "":
						tally.spoeError[res.header.Get("x-spoe-error")]++
					default:
						tally.noVar++
					}
				}
				tally.mu.Unlock()
			}
		}(g)
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()

	// Reloads, paced by a ticker (the scenario, not synchronisation): each
	// new process must have answered through the agent before the next.
	began := time.Now()
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for gen := 1; gen <= reloads; gen++ {
		<-ticker.C
		p := start(gen, running())
		waitWithin(t, 15*time.Second, func() bool {
			if p.hasExited() {
				t.Fatalf("HAProxy generation %d exited: %v", gen, p.waitErr)
			}
			return tally.genCount(gen) > 0 && gensSeen()[strconv.Itoa(gen)] > 0
		}, fmt.Sprintf("HAProxy generation %d to answer requests through the agent", gen))
	}
	reloadsDone.Store(true)
	reloadTime := time.Since(began)
	waitWithin(t, time.Duration(requests/50+60)*time.Second, func() bool {
		tally.mu.Lock()
		defer tally.mu.Unlock()
		return tally.sent >= requests
	}, fmt.Sprintf("%d requests", requests))
	close(stop)
	wg.Wait()
	stop = make(chan struct{}) // for the deferred close
	elapsed := time.Since(began)
	// The old processes finish what they serve and leave.
	client.Transport.(interface{ CloseIdleConnections() }).CloseIdleConnections()
	last := procs[len(procs)-1]
	waitWithin(t, 30*time.Second, func() bool {
		r := running()
		return len(r) == 1 && r[0] == last
	}, "the old HAProxy processes to exit")

	perGenEngines := gensSeen()
	tally.mu.Lock()
	defer tally.mu.Unlock()
	engMu.Lock()
	defer engMu.Unlock()
	failed := tally.sent - tally.ok - len(tally.mismatches)
	var overlaps, startups []string
	for _, p := range procs {
		startups = append(startups, tally.first[strconv.Itoa(p.gen)].Sub(p.started).Round(time.Millisecond).String())
	}
	for gen := 0; gen < reloads; gen++ {
		g, next := strconv.Itoa(gen), strconv.Itoa(gen+1)
		if tally.last[g].After(tally.first[next]) {
			overlaps = append(overlaps, fmt.Sprintf("%s/%s %v", g, next, tally.last[g].Sub(tally.first[next]).Round(time.Millisecond)))
		}
	}
	st := agent.Stats()
	t.Logf("%d requests in %v with %d reloads (done in %v): %d answered with their own nonce, %d with another request's, %d failed "+
		"(transport errors %v, statuses %v, set-on-error %v, no variable %d)",
		tally.sent, elapsed.Round(time.Millisecond), reloads, reloadTime.Round(time.Millisecond), tally.ok, len(tally.mismatches), failed,
		tally.transport, tally.status, tally.spoeError, tally.noVar)
	t.Logf("time from each process's start to its first answer: %s", strings.Join(startups, " "))
	t.Logf("answers per HAProxy generation %v; old and new generations answering side by side (old's last answer after new's first): %s",
		tally.perGen, strings.Join(overlaps, ", "))
	t.Logf("engine-ids seen by the agent: %d (per generation %v); handler calls %d; agent: connections %d, ACKs rerouted %d, "+
		"ACKs dropped %d, rescues %d, DISCONNECTs from HAProxy %v",
		len(engineGen), perGenEngines, handled.Load(), st.ConnsTotal, st.ACKsRerouted, st.ACKsDropped, st.Rescues, st.DisconnectsIn)
	for _, p := range procs[:len(procs)-1] {
		if p.waitErr != nil {
			t.Logf("HAProxy generation %d exited with %v", p.gen, p.waitErr)
		}
	}

	if len(tally.mismatches) > 0 {
		sort.Strings(tally.mismatches)
		n := len(tally.mismatches)
		if n > 20 {
			n = 20
		}
		t.Errorf("%d responses carry another request's variable, e.g.:\n%s", len(tally.mismatches), strings.Join(tally.mismatches[:n], "\n"))
	}
	if len(sharedEngines) > 0 {
		t.Errorf("engine-ids used by two HAProxy generations: %v", sharedEngines)
	}
	if tally.ok < tally.sent/2 {
		t.Errorf("only %d of %d requests answered with their own nonce", tally.ok, tally.sent)
	}
	if len(engineGen) < reloads+1 {
		t.Errorf("%d engine-ids seen, want at least one per HAProxy process (%d)", len(engineGen), reloads+1)
	}
}

// soakErrorKind names a transport error without its addresses and ports,
// so that errors of one kind are counted together.
func soakErrorKind(err error) string {
	var ne *net.OpError
	switch {
	case err == nil:
		return ""
	case strings.Contains(err.Error(), "connection reset"):
		return "connection reset"
	case strings.Contains(err.Error(), "connection refused"):
		return "connection refused"
	case strings.Contains(err.Error(), "EOF"):
		if strings.Contains(err.Error(), io.ErrUnexpectedEOF.Error()) {
			return "unexpected EOF"
		}
		return "EOF"
	case errors.As(err, &ne):
		return ne.Op + ": " + ne.Err.Error()
	}
	return err.Error()
}
