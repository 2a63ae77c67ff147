package spoe

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func quietAgent(h Handler) *Agent {
	log := logrus.New()
	log.SetOutput(io.Discard)
	return &Agent{Handler: h, Logger: log}
}

func scoreHandler() MessageHandler {
	return func([]Message) ([]Action, error) {
		return []Action{ActionSetVar{Scope: VarScopeSession, Name: "score", Value: 100}}, nil
	}
}

// dialRetry dials until the agent accepts, or fails the test after 5 s.
func dialRetry(t *testing.T, network, address string) *Client {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := Dial(context.Background(), network, address, ClientConfig{})
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial %s %s: %v", network, address, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func notifyScore(t *testing.T, c *Client) {
	t.Helper()
	actions, err := c.Notify(context.Background(), ClientMessage{Name: "m"})
	if err != nil || len(actions) != 1 || actions[0] != (ActionSetVar{Scope: VarScopeSession, Name: "score", Value: int64(100)}) {
		t.Fatalf("Notify: %v, %v", actions, err)
	}
}

func TestParseListenAddr(t *testing.T) {
	cases := []struct{ in, network, address string }{
		{":9000", "tcp", ":9000"},
		{"127.0.0.1:9000", "tcp", "127.0.0.1:9000"},
		{"[::1]:9000", "tcp", "[::1]:9000"},
		{"tcp://127.0.0.1:9000", "tcp", "127.0.0.1:9000"},
		{"tcp4://:9000", "tcp4", ":9000"},
		{"tcp6://[::1]:9000", "tcp6", "[::1]:9000"},
		{"ipv4@127.0.0.1:9000", "tcp4", "127.0.0.1:9000"},
		{"ipv6@[::1]:9000", "tcp6", "[::1]:9000"},
		{"unix:///run/agent.sock", "unix", "/run/agent.sock"},
		{"unix:/run/agent.sock", "unix", "/run/agent.sock"},
		{"unix@/run/agent.sock", "unix", "/run/agent.sock"},
		{"unix://agent.sock", "unix", "agent.sock"},
		{"abns@agent", "unix", "@agent"},
	}
	for _, c := range cases {
		network, address, err := parseListenAddr(c.in)
		if err != nil || network != c.network || address != c.address {
			t.Errorf("parseListenAddr(%q) = %q, %q, %v; want %q, %q", c.in, network, address, err, c.network, c.address)
		}
	}
	for _, bad := range []string{"", "9000", "unix://", "unix@", "abns@", "http://127.0.0.1:9000", "tcp://nohost"} {
		if n, a, err := parseListenAddr(bad); err == nil {
			t.Errorf("parseListenAddr(%q) = %q, %q, want an error", bad, n, a)
		}
	}
}

// A unix socket served end to end: a stale socket file is replaced, the
// new one has the default mode, a Client is answered through it, and the
// file is gone once Run returns.
func TestRunUnixSocket(t *testing.T) {
	for _, scheme := range []string{"unix://", "unix@"} {
		t.Run(scheme, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "agent.sock")
			// A stale socket: its listener closed without removing it.
			stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			stale.SetUnlinkOnClose(false)
			stale.Close()
			if _, err := os.Stat(path); err != nil {
				t.Fatalf("the stale socket is not there: %v", err)
			}

			agent := quietAgent(scoreHandler())
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ran := make(chan error, 1)
			go func() { ran <- agent.Run(ctx, scheme+path, 0) }()

			c := dialRetry(t, "unix", path)
			notifyScore(t, c)
			fi, err := os.Stat(path)
			if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != DefaultSocketMode {
				t.Errorf("socket file: %v, %v; want a socket with mode %v", fi.Mode(), err, DefaultSocketMode)
			}

			cancel()
			if err := <-ran; err != nil {
				t.Fatalf("Run: %v", err)
			}
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the client's connection is still open after Run returned")
			}
			var de *DisconnectError
			if !errors.As(c.Err(), &de) || de.Status != StatusNormal {
				t.Errorf("client ended with %v, want AGENT-DISCONNECT normal", c.Err())
			}
			c.Close()
			if _, err := os.Lstat(path); !os.IsNotExist(err) {
				t.Errorf("the socket file is still there after Run returned: %v", err)
			}
		})
	}
}

func TestListenSocketMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := ListenConfig{SocketMode: 0o600}.Listen("unix://" + path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, %v; want 0600", fi.Mode(), err)
	}
	l.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("the socket file outlived its listener: %v", err)
	}
}

// Listen never removes a socket another process serves, nor a file that is
// not a socket.
func TestListenKeepsWhatIsNotStale(t *testing.T) {
	dir := t.TempDir()
	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l2, err := Listen("unix://" + live); err == nil || !strings.Contains(err.Error(), "another process") {
		if l2 != nil {
			l2.Close()
		}
		t.Errorf("Listen on a live socket: %v, want an error", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("the live socket was removed: %v", err)
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if l2, err := Listen("unix://" + file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		if l2 != nil {
			l2.Close()
		}
		t.Errorf("Listen on a regular file: %v, want an error", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Errorf("the file was touched: %q, %v", b, err)
	}
}

func TestRunTCP(t *testing.T) {
	for _, addr := range []string{"tcp://127.0.0.1:0", "127.0.0.1:0", "ipv4@127.0.0.1:0"} {
		l, err := Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		agent := quietAgent(scoreHandler())
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- agent.RunListener(ctx, l, time.Second) }()
		c := dialRetry(t, "tcp", l.Addr().String())
		notifyScore(t, c)
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("%s: Run: %v", addr, err)
		}
		c.Close()
	}
}

func TestRunListenError(t *testing.T) {
	agent := quietAgent(nil)
	if err := agent.Run(context.Background(), "http://x", 0); err == nil {
		t.Fatal("Run on a bad address returned nil")
	}
}

// A handler that outlives the shutdown timeout: Run closes its connection,
// cancels its context and says so.
func TestRunShutdownTimeout(t *testing.T) {
	started, release := make(chan context.Context, 1), make(chan struct{})
	defer close(release)
	agent := quietAgent(HandlerFunc(func(w *ActionWriter, r *Request) error {
		started <- r.Context()
		<-release // deaf to its context: only the test ends it
		return nil
	}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- agent.RunListener(ctx, l, 50*time.Millisecond) }()
	c := dialRetry(t, "tcp", l.Addr().String())
	defer c.Close()
	notified := make(chan error, 1)
	go func() {
		_, err := c.Notify(context.Background(), ClientMessage{Name: "m"})
		notified <- err
	}()
	handlerCtx := <-started
	cancel()
	err = <-ran
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run: %v, want an error wrapping context.DeadlineExceeded", err)
	}
	select {
	case <-handlerCtx.Done():
	default:
		t.Error("Run returned with the running handler's context not cancelled")
	}
	if err := <-notified; err == nil {
		t.Error("the NOTIFY held past the timeout was answered")
	}
}

// SIGINT and SIGTERM stop Run as its context does: the signal context is
// faked so that no real signal is sent to the test process.
func TestRunStopsOnSignal(t *testing.T) {
	var mu sync.Mutex
	var gotSignals []os.Signal
	sigCtx, signal := context.WithCancel(context.Background())
	saved := notifyContext
	defer func() { notifyContext = saved }()
	notifyContext = func(parent context.Context, sigs ...os.Signal) (context.Context, context.CancelFunc) {
		mu.Lock()
		gotSignals = sigs
		mu.Unlock()
		ctx, cancel := context.WithCancel(parent)
		go func() {
			select {
			case <-sigCtx.Done():
				cancel()
			case <-ctx.Done():
			}
		}()
		return ctx, cancel
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	agent := quietAgent(scoreHandler())
	ran := make(chan error, 1)
	go func() { ran <- agent.RunListener(context.Background(), l, time.Second) }()
	c := dialRetry(t, "tcp", l.Addr().String())
	defer c.Close()
	notifyScore(t, c)
	select {
	case err := <-ran:
		t.Fatalf("Run returned before the signal: %v", err)
	default:
	}
	signal()
	if err := <-ran; err != nil {
		t.Fatalf("Run: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(gotSignals) != 2 || gotSignals[0] != os.Interrupt || gotSignals[1].String() != "terminated" {
		t.Errorf("Run listens to %v, want SIGINT and SIGTERM", gotSignals)
	}
}

// Someone else's Shutdown ends Run without an error.
func TestRunAfterShutdown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	agent := quietAgent(nil)
	ran := make(chan error, 1)
	go func() { ran <- agent.RunListener(context.Background(), l, time.Second) }()
	c := dialRetry(t, "tcp", l.Addr().String())
	c.Close()
	if err := agent.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-ran; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

type failingListener struct{ net.Listener }

func (failingListener) Accept() (net.Conn, error) { return nil, errors.New("accept broke") }

func TestRunAcceptError(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	agent := quietAgent(nil)
	err = agent.RunListener(context.Background(), failingListener{l}, time.Second)
	if err == nil || !strings.Contains(err.Error(), "accept broke") {
		t.Fatalf("Run: %v, want the accept error", err)
	}
}
