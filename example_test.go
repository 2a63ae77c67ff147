package spoe_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"time"

	"github.com/spoe-go/spoe"
)

// The simple API: messages with their arguments as Go values in, actions
// out. HAProxy then reads sess.<var-prefix>.reputation; here a Client plays
// HAProxy's part.
func ExampleNew() {
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		reputation := 0.0
		for _, msg := range messages {
			if msg.Name != "ip-rep" {
				continue
			}
			ip, ok := msg.ArgIP("ip")
			if !ok {
				return nil, fmt.Errorf("expected ip in message")
			}
			if ip.IsLoopback() {
				reputation = 1
			}
		}
		return []spoe.Action{
			spoe.ActionSetVar{Name: "reputation", Scope: spoe.VarScopeSession, Value: reputation},
		}, nil
	})
	client, stop := serve(agent)
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{
		Name: "ip-rep", Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP("127.0.0.1")}},
	})
	fmt.Println(actions, err)
	// Output:
	// [{reputation sess 1}] <nil>
}

// An agent listens on a TCP address, HAProxy's backend server line points
// at it.
func ExampleAgent_ListenAndServe() {
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		return []spoe.Action{spoe.ActionSetVar{Name: "seen", Scope: spoe.VarScopeTransaction, Value: true}}, nil
	})
	if err := agent.ListenAndServe(":9000"); err != nil {
		log.Fatal(err)
	}
}

// Shutdown stops accepting, lets the running handlers finish and their
// answers reach HAProxy, then says goodbye to every connection. A program
// calls it on SIGTERM:
//
//	stop, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
//	defer cancel()
//	<-stop.Done()
func ExampleAgent_Shutdown() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) { return nil, nil })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- agent.Serve(l) }()
	client, err := spoe.Dial(context.Background(), "tcp", l.Addr().String(), spoe.ClientConfig{})
	if err != nil {
		log.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := agent.Shutdown(ctx); err != nil {
		agent.Close() // some handlers outlived the timeout
	}
	fmt.Println(<-served)
	<-client.Done() // HAProxy would open a new connection, to another agent
	fmt.Println(client.Err())
	// Output:
	// spoe: Agent closed
	// spoe: agent disconnected: status 0 (normal): "normal"
}

// serve runs agent on a loopback port and returns a client connected to it
// and a function that stops both.
func serve(agent *spoe.Agent) (*spoe.Client, func()) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go agent.Serve(l)
	client, err := spoe.Dial(context.Background(), "tcp", l.Addr().String(), spoe.ClientConfig{})
	if err != nil {
		log.Fatal(err)
	}
	return client, func() {
		client.Close()
		agent.Shutdown(context.Background())
	}
}

// The zero-copy path: arguments are read from the frame as they are asked
// for, and actions are appended straight into the ACK. Nothing is allocated.
func ExampleHandlerFunc() {
	agent := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		for msgs := r.Messages(); msgs.Next(); {
			if !msgs.NameIs("check-request") {
				continue
			}
			if path, ok := msgs.Arg("path"); ok && path.EqualString("/admin") {
				if err := w.SetBool(spoe.VarScopeTransaction, "blocked", true); err != nil {
					return err
				}
			}
			if ip, ok := msgs.Arg("ip"); ok {
				if addr, ok := ip.Addr(); ok {
					if err := w.SetAddr(spoe.VarScopeTransaction, "client", addr); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})}
	client, stop := serve(agent)
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{
		Name: "check-request",
		Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP("192.0.2.7")}, {Name: "path", Value: "/admin"}},
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, a := range actions {
		fmt.Printf("%+v\n", a)
	}
	// Output:
	// {Name:blocked Scope:txn Value:true}
	// {Name:client Scope:txn Value:192.0.2.7}
}

// A handler is tested without HAProxy: the Client speaks HAProxy's side of
// SPOP to the agent.
func ExampleClient() {
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		ip, _ := messages[0].ArgIP("ip")
		if ip.Equal(net.IPv4(203, 0, 113, 9)) {
			return nil, fmt.Errorf("reputation service unreachable")
		}
		return []spoe.Action{spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: 80}}, nil
	})
	agent.ErrorVar = "failed"
	client, stop := serve(agent)
	defer stop()

	for _, ip := range []string{"192.0.2.1", "203.0.113.9"} {
		actions, err := client.Notify(context.Background(), spoe.ClientMessage{
			Name: "ip-rep", Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP(ip)}},
		})
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(ip, actions)
	}
	// Output:
	// 192.0.2.1 [{score sess 80}]
	// 203.0.113.9 [{failed txn true}]
}

// A Router sends each message to the Handler registered for its name, on
// either API; the route's Request holds that message only. Messages without
// a route are skipped.
func ExampleRouter() {
	var router spoe.Router
	// The simple API: messages holds the routed message only.
	router.Handle("ip-rep", spoe.MessageHandler(func(messages []spoe.Message) ([]spoe.Action, error) {
		return []spoe.Action{spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: 50}}, nil
	}))
	// The zero-copy path: r.Messages() yields the routed message only.
	router.HandleFunc("bot-check", func(w *spoe.ActionWriter, r *spoe.Request) error {
		for m := r.Messages(); m.Next(); {
			ua, _ := m.Arg("ua")
			b, _ := ua.Bytes()
			if err := w.SetBool(spoe.VarScopeTransaction, "bot", len(b) == 0); err != nil {
				return err
			}
		}
		return nil
	})
	client, stop := serve(&spoe.Agent{Handler: &router})
	defer stop()

	actions, err := client.Notify(context.Background(),
		spoe.ClientMessage{Name: "ip-rep", Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP("192.0.2.1")}}},
		spoe.ClientMessage{Name: "bot-check", Args: []spoe.Arg{{Name: "ua", Value: ""}}},
		spoe.ClientMessage{Name: "not-routed"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(actions)
	// Output:
	// [{score sess 50} {bot txn true}]
}

// HAProxy's req.hdrs_bin sends all the request's headers in one binary
// argument; Headers walks it without copying.
func ExampleHeaders() {
	block := []byte("\x0auser-agent\x0acurl/8.5.0\x06accept\x03*/*\x00\x00")
	for h := spoe.Headers(block); h.Next(); {
		fmt.Printf("%s: %s\n", h.Name(), h.Value())
	}
	hdr, err := spoe.ParseHeaders(block)
	fmt.Println(hdr.Get("User-Agent"), err)
	// Output:
	// user-agent: curl/8.5.0
	// accept: */*
	// curl/8.5.0 <nil>
}
