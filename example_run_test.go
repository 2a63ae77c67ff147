package spoe_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spoe-go/spoe"
)

// Run is the whole life of an agent's process: it serves until the context
// is cancelled or SIGINT/SIGTERM arrives, then shuts down gracefully. Here
// the context is cancelled once a Client, playing HAProxy, got its answer
// over the unix socket.
func ExampleAgent_Run() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) {
		return []spoe.Action{spoe.ActionSetVar{Name: "seen", Scope: spoe.VarScopeTransaction, Value: true}}, nil
	})
	agent.Logger = quietLogger()
	dir, err := os.MkdirTemp("", "spoe")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "agent.sock")

	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- agent.Run(ctx, "unix://"+sock, 5*time.Second) }()

	client := dialUntilUp("unix", sock)
	defer client.Close()
	actions, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "any"})
	fmt.Println(actions, err)

	cancel() // or SIGTERM
	fmt.Println("Run:", <-ran)
	_, err = os.Stat(sock)
	fmt.Println("socket removed:", os.IsNotExist(err))
	// Output:
	// [{seen txn true}] <nil>
	// Run: <nil>
	// socket removed: true
}

// Listen takes the addresses users write, HAProxy's spellings included.
func ExampleListen() {
	dir, err := os.MkdirTemp("", "spoe")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	for _, addr := range []string{
		"tcp://127.0.0.1:0",
		"ipv4@127.0.0.1:0",
		"unix@" + filepath.Join(dir, "a.sock"),
		"unix://" + filepath.Join(dir, "b.sock"),
	} {
		l, err := spoe.Listen(addr)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(l.Addr().Network())
		l.Close() // removes a unix socket file
	}
	// Output:
	// tcp
	// tcp
	// unix
	// unix
}

// ListenConfig sets the permission of a unix socket file: HAProxy needs
// to write to it.
func ExampleListenConfig_Listen() {
	dir, err := os.MkdirTemp("", "spoe")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "agent.sock")
	l, err := spoe.ListenConfig{SocketMode: 0o666}.Listen("unix://" + sock)
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(sock)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(fi.Mode())
	// Output:
	// Srw-rw-rw-
}

// RunListener is Run on a listener of the caller's: here a unix socket
// only its owner may use; tls.NewListener(l, config) serves over TLS the
// same way.
func ExampleAgent_RunListener() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) {
		return []spoe.Action{spoe.ActionSetVar{Name: "ok", Scope: spoe.VarScopeTransaction, Value: true}}, nil
	})
	agent.Logger = quietLogger()
	dir, err := os.MkdirTemp("", "spoe")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "agent.sock")
	l, err := spoe.ListenConfig{SocketMode: 0o600}.Listen("unix://" + sock)
	if err != nil {
		log.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- agent.RunListener(ctx, l, time.Second) }()
	client := dialUntilUp("unix", sock)
	defer client.Close()
	fmt.Println(client.Notify(context.Background(), spoe.ClientMessage{Name: "any"}))
	cancel()
	fmt.Println("RunListener:", <-ran)
	// Output:
	// [{ok txn true}] <nil>
	// RunListener: <nil>
}

func quietLogger() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

// dialUntilUp connects a Client once the agent accepts.
func dialUntilUp(network, address string) *spoe.Client {
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := spoe.Dial(context.Background(), network, address, spoe.ClientConfig{})
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			log.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
