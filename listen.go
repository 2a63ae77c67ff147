package spoe

// Listening addresses as users write them. This is its own file rather than
// a part of spoe.go: it is about the process's sockets (address syntax,
// unix socket files and their permissions), not about serving SPOP, and
// nothing in the agent's engine depends on it.

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultSocketMode is the permission of the unix socket files Listen
// creates: read and write for the owner and the group, so that HAProxy
// can connect when it runs in the agent's group.
const DefaultSocketMode fs.FileMode = 0o660

// ListenConfig holds the options of Listen.
type ListenConfig struct {
	// SocketMode is the permission given to a unix socket file (HAProxy
	// needs write permission on it to connect). Zero means
	// DefaultSocketMode.
	SocketMode fs.FileMode
}

// Listen announces on addr, written in one of these forms:
//
//	:9000, 127.0.0.1:9000, [::1]:9000  TCP (as net.Listen("tcp", addr))
//	tcp://host:port                    TCP; tcp4:// and tcp6:// for one family
//	ipv4@host:port, ipv6@host:port     TCP, HAProxy's spelling
//	unix:///run/agent.sock             a unix socket file (also unix:/run/agent.sock)
//	unix@/run/agent.sock               the same, HAProxy's spelling
//	abns@name                          a Linux abstract unix socket, as HAProxy's abns@
//
// Before creating a socket file, it removes a stale one, left by an agent
// that died: a socket file nobody accepts on. It refuses to replace a
// socket another process still serves, or a file that is not a socket. The
// file is given the mode DefaultSocketMode, and removed when the listener
// is closed (Serve closes it when it returns).
func Listen(addr string) (net.Listener, error) {
	return ListenConfig{}.Listen(addr)
}

// Listen is the package's Listen with the options of lc.
func (lc ListenConfig) Listen(addr string) (net.Listener, error) {
	network, address, err := parseListenAddr(addr)
	if err != nil {
		return nil, err
	}
	if network != "unix" || strings.HasPrefix(address, "@") {
		l, err := net.Listen(network, address)
		if err != nil {
			return nil, fmt.Errorf("spoe: listen: %w", err)
		}
		return l, nil
	}
	if err := removeStaleSocket(address); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("spoe: listen: %w", err)
	}
	mode := lc.SocketMode
	if mode == 0 {
		mode = DefaultSocketMode
	}
	if err := os.Chmod(address, mode.Perm()); err != nil {
		l.Close() // removes the file
		return nil, fmt.Errorf("spoe: listen: %w", err)
	}
	return l, nil
}

// listenSchemes are the prefixes Listen knows, longest first where one
// starts another.
var listenSchemes = []struct{ prefix, network string }{
	{"unix://", "unix"}, {"unix@", "unix"}, {"unix:", "unix"}, {"abns@", "abns"},
	{"tcp://", "tcp"}, {"tcp4://", "tcp4"}, {"tcp6://", "tcp6"},
	{"ipv4@", "tcp4"}, {"ipv6@", "tcp6"},
}

// parseListenAddr turns addr into the arguments of net.Listen.
func parseListenAddr(addr string) (network, address string, err error) {
	network, address = "tcp", addr
	for _, s := range listenSchemes {
		if rest, ok := strings.CutPrefix(addr, s.prefix); ok {
			network, address = s.network, rest
			break
		}
	}
	switch {
	case network == "unix" && address == "":
		return "", "", fmt.Errorf("spoe: listen address %q: no socket path", addr)
	case network == "abns" && address == "":
		return "", "", fmt.Errorf("spoe: listen address %q: no socket name", addr)
	case network == "abns":
		return "unix", "@" + address, nil
	case network == "unix":
		return network, address, nil
	case strings.Contains(address, "://"):
		return "", "", fmt.Errorf("spoe: listen address %q: unknown scheme (want host:port, tcp:// or unix://)", addr)
	}
	if _, _, err := net.SplitHostPort(address); err != nil {
		return "", "", fmt.Errorf("spoe: listen address %q: want host:port: %w", addr, err)
	}
	return network, address, nil
}

// removeStaleSocket removes the socket file at path if no process accepts
// on it any more. A missing file is fine; a live socket or another kind of
// file is an error.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("spoe: listen: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("spoe: listen: %s exists and is not a socket", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("spoe: listen: %s: another process is serving on this socket", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("spoe: listen: checking the socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("spoe: listen: removing the stale socket: %w", err)
	}
	return nil
}

// closeOnce is a listener whose Close closes it once and reports that
// close's result to every caller.
type closeOnce struct {
	net.Listener
	once sync.Once
	err  error
}

func (l *closeOnce) Close() error {
	l.once.Do(func() { l.err = l.Listener.Close() })
	return l.err
}

func isTemporary(err error) bool {
	t, ok := err.(interface{ Temporary() bool })
	return ok && t.Temporary()
}

func nextBackoff(d time.Duration) time.Duration {
	if d == 0 {
		return 5 * time.Millisecond
	}
	if d *= 2; d > time.Second {
		d = time.Second
	}
	return d
}
