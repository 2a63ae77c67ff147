package spoe_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/netip"

	"github.com/spoe-go/spoe"
)

// Bind fills a struct from the message's arguments by their spoe tags, and
// says which argument is missing or of the wrong type.
func ExampleMessage_Bind() {
	type checkArgs struct {
		IP        netip.Addr `spoe:"ip"`
		Path      string     `spoe:"path"`
		UserAgent *string    `spoe:"ua"`            // nil when absent or NULL
		Length    int64      `spoe:"clen,optional"` // left as is when absent
	}
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		var args checkArgs
		if err := messages[0].Bind(&args); err != nil {
			return nil, err // the agent answers with txn.<prefix>.error
		}
		blocked := args.Path == "/admin" && !args.IP.IsLoopback()
		return []spoe.Action{spoe.ActionSetVar{Name: "blocked", Scope: spoe.VarScopeTransaction, Value: blocked}}, nil
	})
	agent.Logger = quietLogger()
	client, stop := serve(agent)
	defer stop()

	for _, args := range [][]spoe.Arg{
		{{Name: "ip", Value: net.ParseIP("192.0.2.1")}, {Name: "path", Value: "/admin"}, {Name: "ua", Value: nil}},
		{{Name: "ip", Value: "192.0.2.1"}, {Name: "path", Value: "/admin"}},
	} {
		actions, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "check", Args: args})
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(actions)
	}
	var args checkArgs
	err := spoe.Message{Name: "check", Args: map[string]interface{}{"ip": "192.0.2.1"}}.Bind(&args)
	fmt.Println(err)
	// Output:
	// [{blocked txn true}]
	// [{error txn true}]
	// spoe: message "check", argument "ip" (field IP): is string, field is netip.Addr
}

// On the zero-copy path, Bind reads the current message's arguments from
// the frame and copies what it stores.
func ExampleMessageIterator_Bind() {
	var router spoe.Router
	router.HandleFunc("ip-rep", func(w *spoe.ActionWriter, r *spoe.Request) error {
		var args struct {
			IP netip.Addr `spoe:"ip"`
		}
		m := r.Messages() // a route's Request holds its message only
		m.Next()
		if err := m.Bind(&args); err != nil {
			return err
		}
		return w.SetBool(spoe.VarScopeSession, "private", args.IP.IsPrivate())
	})
	client, stop := serve(&spoe.Agent{Handler: &router})
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{
		Name: "ip-rep", Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP("10.1.2.3")}},
	})
	fmt.Println(actions, err)
	// Output:
	// [{private sess true}] <nil>
}
