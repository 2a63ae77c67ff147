package spoe_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/spoe-go/spoe"
)

// The simple API with a context: ctx is cancelled when HAProxy gives up or
// the agent closes, and carries the request's ids for logs.
func ExampleContextMessageHandler() {
	agent := &spoe.Agent{Handler: spoe.ContextMessageHandler(func(ctx context.Context, messages []spoe.Message) ([]spoe.Action, error) {
		info, _ := spoe.RequestInfoFromContext(ctx)
		fmt.Printf("engine %s, %d message(s)\n", info.EngineID, len(messages))
		lookup, cancel := context.WithTimeout(ctx, 50*time.Millisecond) // bound a slow lookup
		defer cancel()
		<-lookup.Done() // a lookup that gives up when ctx does
		return []spoe.Action{spoe.ActionSetVar{Name: "looked_up", Scope: spoe.VarScopeTransaction, Value: true}}, nil
	})}
	client, stop := serveWith(agent, spoe.ClientConfig{EngineID: "haproxy-1"})
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "lookup"})
	fmt.Println(actions, err)
	// Output:
	// engine haproxy-1, 1 message(s)
	// [{looked_up txn true}] <nil>
}

// On the zero-copy path, the ids are on the Request and in its context.
func ExampleRequestInfoFromContext() {
	agent := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		info, ok := spoe.RequestInfoFromContext(r.Context())
		fmt.Println(ok, info.EngineID == r.EngineID(), info.StreamID == r.StreamID(), info.FrameID == r.FrameID())
		return nil
	})}
	client, stop := serve(agent)
	defer stop()

	if _, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "m"}); err != nil {
		log.Fatal(err)
	}
	// Output:
	// true true true true
}

// RequestInfo is what a log line needs to find the frame in HAProxy's logs.
func ExampleRequestInfo() {
	info := spoe.RequestInfo{EngineID: "0b7e8c1a", StreamID: 12, FrameID: 1}
	fmt.Printf("engine=%s stream=%d frame=%d\n", info.EngineID, info.StreamID, info.FrameID)
	// Output:
	// engine=0b7e8c1a stream=12 frame=1
}

// Handle takes any Handler: the simple API's adapters, a HandlerFunc, or
// another Router.
func ExampleRouter_Handle() {
	var router spoe.Router
	router.Handle("ip-rep", spoe.MessageHandler(func(messages []spoe.Message) ([]spoe.Action, error) {
		ip, _ := messages[0].ArgIP("ip") // the routed message only
		return []spoe.Action{spoe.ActionSetVar{Name: "private", Scope: spoe.VarScopeSession, Value: ip.IsPrivate()}}, nil
	}))
	router.Handle("lookup", spoe.ContextMessageHandler(func(ctx context.Context, messages []spoe.Message) ([]spoe.Action, error) {
		return []spoe.Action{spoe.ActionSetVar{Name: "found", Scope: spoe.VarScopeTransaction, Value: ctx.Err() == nil}}, nil
	}))
	client, stop := serve(&spoe.Agent{Handler: &router})
	defer stop()

	actions, err := client.Notify(context.Background(),
		spoe.ClientMessage{Name: "lookup"},
		spoe.ClientMessage{Name: "ip-rep", Args: []spoe.Arg{{Name: "ip", Value: net.ParseIP("10.0.0.1")}}})
	fmt.Println(actions, err)
	// Output:
	// [{found txn true} {private sess true}] <nil>
}

// HandleFunc takes a zero-copy function; its Request holds the routed
// message only.
func ExampleRouter_HandleFunc() {
	var router spoe.Router
	router.HandleFunc("count", func(w *spoe.ActionWriter, r *spoe.Request) error {
		return w.SetInt(spoe.VarScopeTransaction, "messages", int64(r.NumMessages()))
	})
	client, stop := serve(&spoe.Agent{Handler: &router})
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "count"}, spoe.ClientMessage{Name: "other"})
	fmt.Println(actions, err)
	// Output:
	// [{messages txn 1}] <nil>
}

func ExampleMessage_ArgIP() {
	m := spoe.Message{Name: "ip-rep", Args: map[string]interface{}{"ip": net.IP{192, 0, 2, 1}}}
	ip, ok := m.ArgIP("ip")
	fmt.Println(ip, ok)
	// Output: 192.0.2.1 true
}

func ExampleMessage_ArgString() {
	m := spoe.Message{Name: "check", Args: map[string]interface{}{"path": "/admin", "n": int64(1)}}
	path, ok := m.ArgString("path")
	_, isString := m.ArgString("n")
	fmt.Println(path, ok, isString)
	// Output: /admin true false
}

func ExampleMessage_ArgInt() {
	// HAProxy sends integers as INT64; the other integer types work too.
	m := spoe.Message{Name: "check", Args: map[string]interface{}{"clen": int64(1234), "small": uint32(7)}}
	clen, _ := m.ArgInt("clen")
	small, _ := m.ArgInt("small")
	fmt.Println(clen, small)
	// Output: 1234 7
}

func ExampleMessage_ArgBool() {
	m := spoe.Message{Name: "check", Args: map[string]interface{}{"ssl": true}}
	ssl, ok := m.ArgBool("ssl")
	fmt.Println(ssl, ok)
	// Output: true true
}

func ExampleMessage_ArgBytes() {
	m := spoe.Message{Name: "check", Args: map[string]interface{}{"body": []byte("{}")}}
	body, ok := m.ArgBytes("body")
	fmt.Printf("%s %v\n", body, ok)
	// Output: {} true
}

func ExampleValue_EqualString() {
	agent := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		for m := r.Messages(); m.Next(); {
			method, _ := m.Arg("method")
			return w.SetBool(spoe.VarScopeTransaction, "is_get", method.EqualString("GET"))
		}
		return nil
	})}
	client, stop := serve(agent)
	defer stop()

	actions, err := client.Notify(context.Background(), spoe.ClientMessage{Name: "m", Args: []spoe.Arg{{Name: "method", Value: "GET"}}})
	fmt.Println(actions, err)
	// Output: [{is_get txn true}] <nil>
}

// Stats.Messages counts by message name.
func ExampleMessageStats() {
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		if messages[0].Name == "fail" {
			return nil, fmt.Errorf("lookup failed")
		}
		return nil, nil
	})
	agent.Logger = quietLogger()
	client, stop := serve(agent)
	defer stop()

	for _, name := range []string{"ip-rep", "ip-rep", "fail"} {
		if _, err := client.Notify(context.Background(), spoe.ClientMessage{Name: name}); err != nil {
			log.Fatal(err)
		}
	}
	for _, name := range []string{"ip-rep", "fail"} {
		st := agent.Stats().Messages[name]
		fmt.Printf("%s: %d requests, %d errors\n", name, st.Requests, st.Errors)
	}
	// Output:
	// ip-rep: 2 requests, 0 errors
	// fail: 1 requests, 1 errors
}

// Ready turns true once the agent serves, false once it shuts down.
func ExampleAgent_Ready() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) { return nil, nil })
	fmt.Println(agent.Ready())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go agent.Serve(l)
	for !agent.Ready() {
		time.Sleep(time.Millisecond) // polling a condition
	}
	fmt.Println(agent.Ready())
	agent.Shutdown(context.Background())
	fmt.Println(agent.Ready())
	// Output:
	// false
	// true
	// false
}

// HealthHandler answers readiness and liveness probes and serves the
// stats, under any prefix.
func ExampleAgent_HealthHandler() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) { return nil, nil })
	mux := http.NewServeMux()
	mux.Handle("/spoe/", http.StripPrefix("/spoe", agent.HealthHandler()))
	probe := func(path string) {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		fmt.Println(path, rec.Code, strings.TrimSpace(rec.Body.String()))
	}
	probe("/spoe/live")
	probe("/spoe/ready") // not serving yet
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go agent.Serve(l)
	for !agent.Ready() {
		time.Sleep(time.Millisecond) // polling a condition
	}
	probe("/spoe/ready")
	agent.Shutdown(context.Background())
	probe("/spoe/ready")
	// Output:
	// /spoe/live 200 ok
	// /spoe/ready 503 not ready
	// /spoe/ready 200 ready
	// /spoe/ready 503 not ready
}

func serveWith(agent *spoe.Agent, cfg spoe.ClientConfig) (*spoe.Client, func()) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go agent.Serve(l)
	client, err := spoe.Dial(context.Background(), "tcp", l.Addr().String(), cfg)
	if err != nil {
		log.Fatal(err)
	}
	return client, func() {
		client.Close()
		agent.Shutdown(context.Background())
	}
}
