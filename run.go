package spoe

// The lifecycle of an agent's process: serve until told to stop, then stop
// gracefully. Its own file, beside listen.go, because it is about the
// process (signals, a shutdown deadline) rather than about serving SPOP:
// it only calls Serve, Shutdown and Close.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// DefaultShutdownTimeout is how long Run lets a graceful shutdown take
// before it closes the connections that are left.
const DefaultShutdownTimeout = 10 * time.Second

// notifyContext is signal.NotifyContext; tests replace it so as not to
// send real signals to the test process.
var notifyContext = signal.NotifyContext

// Run serves SPOP on addr (any form Listen accepts: ":9000",
// "tcp://127.0.0.1:9000", "unix:///run/agent.sock", "unix@/run/agent.sock")
// until ctx is done or the process receives SIGINT or SIGTERM. It then
// stops as a production agent should: Shutdown, which lets the running
// handlers finish and their answers reach HAProxy, for at most
// shutdownTimeout (zero means DefaultShutdownTimeout), then Close for
// whatever is left. A unix socket file is removed when Run returns.
//
// Run returns nil after a graceful stop, also when someone else called
// Shutdown or Close. It returns an error if it could not listen, if
// accepting failed (the connections already open are then shut down the
// same way), or if the shutdown had to close connections with handlers
// still running (the error then wraps context.DeadlineExceeded). It logs
// where it serves and when it shuts down at info level. A main function
// is then:
//
//	func main() {
//		agent := spoe.New(handle)
//		if err := agent.Run(context.Background(), "unix:///run/spoe-agent.sock", 0); err != nil {
//			log.Fatal(err)
//		}
//	}
func (a *Agent) Run(ctx context.Context, addr string, shutdownTimeout time.Duration) error {
	l, err := Listen(addr)
	if err != nil {
		return err
	}
	return a.RunListener(ctx, l, shutdownTimeout)
}

// RunListener is Run on a listener of the caller's: a TLS listener (see
// the README), a socket with ListenConfig's options, or one inherited from
// systemd. It takes l over and closes it.
func (a *Agent) RunListener(ctx context.Context, l net.Listener, shutdownTimeout time.Duration) error {
	ctx, stop := notifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	served := make(chan error, 1)
	go func() { served <- a.Serve(l) }()
	a.logger().Infof("spoe: serving on %s %s", l.Addr().Network(), l.Addr())

	var serveErr error
	select {
	case serveErr = <-served:
		if errors.Is(serveErr, ErrAgentClosed) {
			// Someone else's Shutdown or Close: theirs to finish.
			return nil
		}
		// Accepting failed: the connections already open still get a
		// graceful end.
		a.logger().WithError(serveErr).Error("spoe: serve")
		served <- serveErr
	case <-ctx.Done():
	}

	if shutdownTimeout <= 0 {
		shutdownTimeout = DefaultShutdownTimeout
	}
	a.logger().Infof("spoe: shutting down (at most %v)", shutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := a.Shutdown(sctx)
	a.Close()
	<-served
	if serveErr != nil {
		return serveErr
	}
	if err != nil {
		return fmt.Errorf("spoe: graceful shutdown: %w; connections closed with handlers still running", err)
	}
	return nil
}
