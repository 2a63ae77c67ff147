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

// Listen takes the addresses users write, HAProxy's spellings included;
// ListenConfig sets the mode of a unix socket.
func ExampleListen() {
	dir, err := os.MkdirTemp("", "spoe")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	for _, addr := range []string{
		"tcp://127.0.0.1:0",
		"unix@" + filepath.Join(dir, "a.sock"),
	} {
		l, err := spoe.Listen(addr)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(l.Addr().Network())
		l.Close()
	}
	l, err := spoe.ListenConfig{SocketMode: 0o666}.Listen("unix://" + filepath.Join(dir, "b.sock"))
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	fi, _ := os.Stat(filepath.Join(dir, "b.sock"))
	fmt.Println(fi.Mode().Perm())
	// Output:
	// tcp
	// unix
	// -rw-rw-rw-
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
