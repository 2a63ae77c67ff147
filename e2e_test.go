package spoe_test

// End-to-end scenarios against real HAProxy 2.6 and 3.2 processes (see
// e2e_harness_test.go). Each scenario starts its own agent and HAProxy, and
// checks the agent's answers in HAProxy's own rules wherever it can: the
// variables are tested with ACLs and copied into response headers, which
// the test then reads.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

const txn = spoe.VarScopeTransaction

// TestE2EScenariosPerVersion runs the protocol scenarios (types, several
// messages, events, errors, checks, pipelining, fragments...) against each
// HAProxy version; each subtest is named after what it checks.
func TestE2EScenariosPerVersion(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		t.Logf("HAProxy %s at %s", hp.version, hp.path)
		t.Run("types", func(t *testing.T) { testTypeRoundTrip(t, hp) })
		t.Run("several-messages", func(t *testing.T) { testSeveralMessages(t, hp) })
		t.Run("response-event", func(t *testing.T) { testResponseEvent(t, hp) })
		t.Run("unset-var", func(t *testing.T) { testUnsetVar(t, hp) })
		t.Run("handler-errors", func(t *testing.T) { testHandlerErrors(t, hp) })
		t.Run("spop-check", func(t *testing.T) { testSpopCheck(t, hp, "") })
		// 3.x's check announces 16380 whatever tune.bufsize is and fails
		// an answer above tune.bufsize - 4: the agent answers a check
		// with 256 (see helloFrameSize).
		t.Run("spop-check-bufsize-8192", func(t *testing.T) { testSpopCheck(t, hp, "tune.bufsize 8192") })
		t.Run("pipelining", func(t *testing.T) {
			// 2.6 to 3.0 open another connection whenever no idle one
			// is left: the burst gets one per request. So does 3.1+, to
			// which a fresh agent does not answer "pipelining" (see
			// TestE2EBigAnswersStallWithPipelining). Unchecked here; the
			// next cases bound it.
			testPipelining(t, hp, pipeliningCase{})
		})
		if !hp.is26() {
			// With "pipelining" kept, 3.1+ runs the burst on few
			// connections.
			t.Run("pipelining-kept", func(t *testing.T) {
				testPipelining(t, hp, pipeliningCase{maxConns: 4, keepPipelining: true})
			})
		}
		if hp.major == 2 {
			// With one new connection per second at most, 2.6 has to
			// pipeline the burst on the connection it has. (3.0 does too,
			// but under load its bursts then took 0.7 to 1.7 s, against
			// 0.36 s for 2.6: its applets wait longer for a connection;
			// not checked there.)
			t.Run("pipelining-maxconnrate", func(t *testing.T) {
				testPipelining(t, hp, pipeliningCase{agentDirectives: "maxconnrate 1", maxConns: 4})
			})
		}
		t.Run("capabilities", func(t *testing.T) { testCapabilities(t, hp) })
		if hp.is26() {
			t.Run("async-reroute", func(t *testing.T) { testAsyncReroute(t, hp) })
			t.Run("max-engines", func(t *testing.T) { testMaxEngines(t, hp) })
		}
		t.Run("big-notify", func(t *testing.T) { testBigNotify(t, hp) })
	})
}

// describe renders a typed value as "<type>:<value>", the way the
// assertions below spell what HAProxy sent.
func describe(v spoe.Value) string {
	switch v.Type() {
	case spoe.TypeNull:
		return "null"
	case spoe.TypeBool:
		b, _ := v.Bool()
		return fmt.Sprintf("bool:%t", b)
	case spoe.TypeInt32, spoe.TypeInt64:
		n, _ := v.Int()
		return fmt.Sprintf("%s:%d", v.Type(), n)
	case spoe.TypeUint32, spoe.TypeUint64:
		n, _ := v.Uint()
		return fmt.Sprintf("%s:%d", v.Type(), n)
	case spoe.TypeIPv4, spoe.TypeIPv6:
		a, _ := v.Addr()
		return fmt.Sprintf("%s:%s", v.Type(), a)
	case spoe.TypeString:
		b, _ := v.Bytes()
		return "string:" + string(b)
	case spoe.TypeBinary:
		b, _ := v.Bytes()
		return "binary:" + hex.EncodeToString(b)
	}
	return v.Type().String()
}

// describeArgs renders the arguments of the current message in order as
// "name=<type>:<value>" items.
func describeArgs(msgs *spoe.MessageIterator) []string {
	var out []string
	for args := msgs.Args(); args.Next(); {
		out = append(out, args.Name()+"="+describe(args.Value()))
	}
	return out
}

// recorder keeps what handlers saw, for the test goroutine to check.
type recorder struct {
	mu   sync.Mutex
	seen map[string][]string
}

func (r *recorder) add(key string, items ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = make(map[string][]string)
	}
	r.seen[key] = append(r.seen[key], items...)
}

func (r *recorder) get(key string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.seen[key]...)
}

func expectHeader(t *testing.T, res response, name, want string) {
	t.Helper()
	if got, ok := res.header[http.CanonicalHeaderKey(name)]; !ok {
		t.Errorf("response header %s missing, want %q", name, want)
	} else if len(got) != 1 || got[0] != want {
		t.Errorf("response header %s = %q, want %q", name, got, want)
	}
}

func expectNoHeader(t *testing.T, res response, name string) {
	t.Helper()
	if got, ok := res.header[http.CanonicalHeaderKey(name)]; ok {
		t.Errorf("response header %s = %q, want none", name, got)
	}
}

func expectList(t *testing.T, what string, got, want []string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s:\n got  %q\n want %q", what, got, want)
	}
}

// ---------------------------------------------------------------------------
// b. Every type HAProxy can send, echoed back into variables, checked by
// HAProxy's ACLs, and sent back again to see which type HAProxy stored;
// and the same for values the agent makes from Go types.

// typeCase is one variable of the type round trip.
type typeCase struct {
	name string
	// fetch is the sample HAProxy sends in the "types" message, and
	// received what the agent must see; the agent echoes it as received.
	fetch, received string
	// set, for a variable HAProxy does not send, is the Go value the agent
	// gives SetVar.
	set interface{}
	// acl is the condition the variable must pass in HAProxy's rules, and
	// shown the variable as "%[var(...)]" prints it in a header.
	acl, shown string
	// back is what the "types-back" message carries: the type and value
	// HAProxy stored.
	back string
}

var typeCases = []typeCase{
	{name: "b_t", fetch: "bool(1)", received: "bool:true", acl: "{ var(txn.e2e.b_t) -m bool }", shown: "1", back: "bool:true"},
	{name: "b_f", fetch: "bool(0)", received: "bool:false",
		acl: "{ var(txn.e2e.b_f) -m found } !{ var(txn.e2e.b_f) -m bool }", shown: "0", back: "bool:false"},
	// "--": a pattern starting with "-" would be taken for an option.
	{name: "i_neg", fetch: "int(-5)", received: "int64:-5", acl: "{ var(txn.e2e.i_neg) -m int -- -5 }", shown: "-5", back: "int64:-5"},
	{name: "i_big", fetch: "int(9223372036854775807)", received: "int64:9223372036854775807",
		acl: "{ var(txn.e2e.i_big) -m int 9223372036854775807 }", shown: "9223372036854775807", back: "int64:9223372036854775807"},
	{name: "ip4", fetch: "ipv4(192.0.2.1)", received: "ipv4:192.0.2.1", acl: "{ var(txn.e2e.ip4) -m ip 192.0.2.1 }", shown: "192.0.2.1", back: "ipv4:192.0.2.1"},
	{name: "ip6", fetch: "ipv6(2001:db8::1)", received: "ipv6:2001:db8::1",
		acl: "{ var(txn.e2e.ip6) -m ip 2001:db8::1 }", shown: "2001:db8::1", back: "ipv6:2001:db8::1"},
	{name: "s", fetch: "str(hello)", received: "string:hello", acl: "{ var(txn.e2e.s) -m str hello }", shown: "hello", back: "string:hello"},
	// A header sent with an empty value: an empty STRING, not NULL.
	{name: "s_empty", fetch: "req.fhdr(x-empty)", received: "string:",
		acl: "{ var(txn.e2e.s_empty) -m found } { var(txn.e2e.s_empty) -m len 0 }", shown: "", back: "string:"},
	{name: "bin", fetch: "bin(00ff10e0)", received: "binary:00ff10e0",
		acl: "{ var(txn.e2e.bin),hex -m str 00FF10E0 }", shown: "00FF10E0", back: "binary:00ff10e0"},
	// A missing header is NULL; echoed, it unsets the variable, which a
	// rule set before the group was sent.
	{name: "nul", fetch: "req.hdr(x-absent)", received: "null", acl: "!{ var(txn.e2e.nul) -m found }", shown: "", back: "null"},
	// Unnamed in the message ("args ... src"); the agent names it.
	{name: "src", fetch: "src", received: "ipv4:127.0.0.1", acl: "{ var(txn.e2e.src) -m ip 127.0.0.1 }", shown: "127.0.0.1", back: "ipv4:127.0.0.1"},

	// Made by the agent: HAProxy keeps one integer type, and SPOP has no
	// float (the library sends a decimal string).
	{name: "c_i32", set: int32(-5), acl: "{ var(txn.e2e.c_i32) -m int -- -5 }", shown: "-5", back: "int64:-5"},
	{name: "c_u32", set: uint32(4000000000), acl: "{ var(txn.e2e.c_u32) -m int 4000000000 }", shown: "4000000000", back: "int64:4000000000"},
	{name: "c_u64", set: uint64(1) << 62, acl: "{ var(txn.e2e.c_u64) -m int 4611686018427387904 }",
		shown: "4611686018427387904", back: "int64:4611686018427387904"},
	{name: "c_f64", set: 42.5, acl: "{ var(txn.e2e.c_f64) -m str 42.5 }", shown: "42.5", back: "string:42.5"},
	{name: "c_netip4", set: netip.MustParseAddr("198.51.100.9"), acl: "{ var(txn.e2e.c_netip4) -m ip 198.51.100.9 }",
		shown: "198.51.100.9", back: "ipv4:198.51.100.9"},
	// An IPv4-mapped IPv6 address stays IPv6 (the library's rule).
	{name: "c_mapped", set: netip.MustParseAddr("::ffff:192.0.2.7"), acl: "{ var(txn.e2e.c_mapped) -m ip ::ffff:192.0.2.7 }",
		shown: "::ffff:192.0.2.7", back: "ipv6:::ffff:192.0.2.7"},
}

func testTypeRoundTrip(t *testing.T, hp haproxyBinary) {
	var rec recorder
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		for msgs := r.Messages(); msgs.Next(); {
			switch {
			case msgs.NameIs("types"):
				for args := msgs.Args(); args.Next(); {
					name := args.Name()
					if name == "" {
						name = "src" // the unnamed argument
					}
					rec.add("types", name+"="+describe(args.Value()))
					// Echo the value as received, with its SPOP type.
					if err := w.SetVar(txn, name, args.Value()); err != nil {
						return err
					}
				}
				for _, tc := range typeCases {
					if tc.set != nil {
						if err := w.SetVar(txn, tc.name, tc.set); err != nil {
							return err
						}
					}
				}
			case msgs.NameIs("types-back"):
				rec.add("types-back", describeArgs(&msgs)...)
			}
		}
		return nil
	})})

	var messageArgs, backArgs, rules, wantSent, wantBack []string
	for _, tc := range typeCases {
		switch {
		case tc.name == "src":
			messageArgs = append(messageArgs, tc.fetch) // unnamed on purpose
		case tc.fetch != "":
			messageArgs = append(messageArgs, tc.name+"="+tc.fetch)
		}
		if tc.fetch != "" {
			wantSent = append(wantSent, tc.name+"="+tc.received)
		}
		backArgs = append(backArgs, fmt.Sprintf("%s=var(txn.e2e.%s)", tc.name, tc.name))
		wantBack = append(wantBack, tc.name+"="+tc.back)
		rules = append(rules, fmt.Sprintf("http-after-response set-header x-ok-%s 1 if %s", tc.name, tc.acl))
		conv := ""
		if tc.name == "bin" {
			conv = ",hex"
		}
		rules = append(rules, fmt.Sprintf(`http-after-response set-header x-val-%s "%%[var(txn.e2e.%s)%s]"`, tc.name, tc.name, conv))
	}
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages types-back\ngroups types",
		SpoeSections: fmt.Sprintf(`
spoe-message types
    args %s

spoe-group types
    messages types

# Sent on the response, once the echoed variables exist: carries them back.
spoe-message types-back
    args %s
    event on-http-response
`, strings.Join(messageArgs, " "), strings.Join(backArgs, " ")),
		// The "types" group is sent from a rule, after nul was given a
		// value: the NULL the agent echoes must unset it.
		Frontend: "http-request set-var(txn.e2e.nul) str(preset)\n" +
			"http-request send-spoe-group e2e types\n" +
			"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }\n" +
			"http-after-response set-header x-agent-error 1 if { var(txn.e2e.error) -m found }\n" +
			strings.Join(rules, "\n"),
	})

	res := get(t, newClient(t, false), h.url+"/types", "X-Empty", "")
	if res.status != http.StatusOK {
		t.Fatalf("status %d, want 200", res.status)
	}
	expectNoHeader(t, res, "x-spoe-error")
	expectNoHeader(t, res, "x-agent-error")
	for _, tc := range typeCases {
		expectHeader(t, res, "x-ok-"+tc.name, "1")
		expectHeader(t, res, "x-val-"+tc.name, tc.shown)
	}
	expectList(t, "arguments of \"types\" as the agent received them", rec.get("types"), wantSent)
	// What HAProxy stored, as it sends the variables back.
	expectList(t, "variables sent back by \"types-back\"", rec.get("types-back"), wantBack)
	if s := agent.Stats(); s.ActionsRefused != 0 || s.HandlerErrors != 0 {
		t.Errorf("ActionsRefused = %d, HandlerErrors = %d, want 0", s.ActionsRefused, s.HandlerErrors)
	}
}

// ---------------------------------------------------------------------------
// c. Several messages in one NOTIFY, from a group and from an event, in
// the order of the "messages" lines; unnamed and duplicate arguments kept.

func testSeveralMessages(t *testing.T, hp haproxyBinary) {
	var notifies atomic.Int32
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		notifies.Add(1)
		// name/number of args(name=type:value,...) for each message.
		var parts []string
		for msgs := r.Messages(); msgs.Next(); {
			parts = append(parts, fmt.Sprintf("%s/%d(%s)", msgs.Name(), msgs.NumArgs(), strings.Join(describeArgs(&msgs), ",")))
		}
		// The group's messages are called g-*, the event's e-*.
		kind := "event"
		if len(parts) > 0 && strings.HasPrefix(parts[0], "g-") {
			kind = "group"
		}
		return w.SetString(txn, "summary_"+kind, strings.Join(parts, ";"))
	})})
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr: agent.addr,
		// The "messages" lines list the messages in another order than
		// their sections: the NOTIFY follows the lines.
		AgentDirectives: "messages e-last e-first e-empty\ngroups several",
		SpoeSections: `
spoe-message g-first
    args id=str(first) dup=str(one) dup=str(two) str(unnamed) n=int(7)

# No "args" line at all.
spoe-message g-empty

spoe-message g-last
    args last=bool(1)

spoe-group several
    messages g-last g-first g-empty

spoe-message e-first
    args dup=str(a) dup=str(b) path
    event on-frontend-http-request

spoe-message e-empty
    event on-frontend-http-request

spoe-message e-last
    args method=method
    event on-frontend-http-request
`,
		Frontend: "http-request send-spoe-group e2e several\n" +
			"http-after-response set-header x-summary-group %[var(txn.e2e.summary_group)]\n" +
			"http-after-response set-header x-summary-event %[var(txn.e2e.summary_event)]",
	})
	res := get(t, newClient(t, false), h.url+"/several")
	if res.status != http.StatusOK {
		t.Fatalf("status %d, want 200", res.status)
	}
	expectHeader(t, res, "x-summary-group",
		"g-last/1(last=bool:true);g-first/5(id=string:first,dup=string:one,dup=string:two,=string:unnamed,n=int64:7);g-empty/0()")
	expectHeader(t, res, "x-summary-event",
		"e-last/1(method=string:GET);e-first/3(dup=string:a,dup=string:b,=string:/several);e-empty/0()")
	if n := notifies.Load(); n != 2 {
		t.Errorf("agent received %d NOTIFY frames, want 2 (one per event or group)", n)
	}
}

// ---------------------------------------------------------------------------
// d. A message on the on-http-response event sets a variable that a
// response header shows.

func testResponseEvent(t *testing.T, hp haproxyBinary) {
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, ok := r.Message("on-resp")
		if !ok {
			return errors.New("no on-resp message")
		}
		status, _ := m.Arg("status")
		backend, _ := m.Arg("backend")
		return w.SetString(txn, "resp", describe(status)+"/"+describe(backend))
	})})
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages on-resp",
		SpoeSections: `
spoe-message on-resp
    args status=status backend=res.hdr(x-from-backend)
    event on-http-response
`,
		Frontend: "http-after-response set-header x-resp %[var(txn.e2e.resp)] if { var(txn.e2e.resp) -m found }",
	})
	res := get(t, newClient(t, false), h.url+"/resp")
	if res.status != http.StatusOK || res.body != "app" {
		t.Fatalf("status %d body %q, want 200 from the application", res.status, res.body)
	}
	expectHeader(t, res, "x-resp", "int64:200/string:app")
	if n := agent.Stats().FramesIn.Notify; n != 1 {
		t.Errorf("agent received %d NOTIFY frames, want 1", n)
	}
}

// ---------------------------------------------------------------------------
// e. unset-var removes a variable HAProxy's configuration had set.

func testUnsetVar(t *testing.T, hp haproxyBinary) {
	var rec recorder
	agent := startAgentUnderTest(t, spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
		for _, m := range messages {
			if m.Name != "unset-me" {
				continue
			}
			rec.add("gone", fmt.Sprint(m.Args["gone"]))
			return []spoe.Action{spoe.ActionUnsetVar{Name: "gone", Scope: spoe.VarScopeTransaction}}, nil
		}
		return nil, errors.New("no unset-me message")
	}))
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "groups unset",
		SpoeSections: `
spoe-message unset-me
    args gone=var(txn.e2e.gone)

spoe-group unset
    messages unset-me
`,
		Frontend: `
http-request set-var(txn.e2e.gone) str(x)
http-request set-var(txn.e2e.kept) str(y)
http-request send-spoe-group e2e unset
http-after-response set-header x-gone %[var(txn.e2e.gone)] if { var(txn.e2e.gone) -m found }
http-after-response set-header x-kept %[var(txn.e2e.kept)] if { var(txn.e2e.kept) -m found }
http-after-response set-header x-agent-error 1 if { var(txn.e2e.error) -m found }
`,
	})
	res := get(t, newClient(t, false), h.url+"/unset")
	if res.status != http.StatusOK {
		t.Fatalf("status %d, want 200", res.status)
	}
	// The agent saw the variable set before the group was sent...
	expectList(t, "value of txn.e2e.gone the agent received", rec.get("gone"), []string{"x"})
	// ...and it is gone afterwards, while its neighbour stays.
	expectNoHeader(t, res, "x-gone")
	expectHeader(t, res, "x-kept", "y")
	expectNoHeader(t, res, "x-agent-error")
}

// ---------------------------------------------------------------------------
// f. A handler error and a handler panic are seen by HAProxy's rules as
// txn.e2e.error, and counted.

func testHandlerErrors(t *testing.T, hp haproxyBinary) {
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, _ := r.Message("check")
		path, _ := m.Arg("path")
		// An action written before failing must be dropped.
		if err := w.SetBool(txn, "ok", true); err != nil {
			return err
		}
		switch {
		case path.EqualString("/error"):
			return errors.New("handler failure on purpose")
		case path.EqualString("/panic"):
			panic("handler panic on purpose")
		}
		return nil
	})})
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages check",
		SpoeSections: `
spoe-message check
    args path=path
    event on-frontend-http-request
`,
		Frontend: `
http-request deny deny_status 503 if { var(txn.e2e.error) -m bool }
http-after-response set-header x-ok %[var(txn.e2e.ok)] if { var(txn.e2e.ok) -m found }
http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }
`,
	})
	c := newClient(t, false)
	for _, step := range []struct {
		path   string
		status int
		ok     bool
	}{
		{"/ok", 200, true},
		{"/error", 503, false},
		{"/panic", 503, false},
		{"/ok", 200, true}, // the agent still answers after a panic
	} {
		res := get(t, c, h.url+step.path)
		if res.status != step.status {
			t.Errorf("GET %s: status %d, want %d", step.path, res.status, step.status)
		}
		if step.ok {
			expectHeader(t, res, "x-ok", "1")
		} else {
			expectNoHeader(t, res, "x-ok")
		}
		// HAProxy itself saw no error: the agent answered every time.
		expectNoHeader(t, res, "x-spoe-error")
	}
	s := agent.Stats()
	if s.HandlerErrors != 1 || s.HandlerPanics != 1 {
		t.Errorf("HandlerErrors = %d, HandlerPanics = %d, want 1 and 1", s.HandlerErrors, s.HandlerPanics)
	}
}

// ---------------------------------------------------------------------------
// g. option spop-check marks the agent's server UP.

func testSpopCheck(t *testing.T, hp haproxyBinary, global string) {
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		return w.SetString(txn, "checked", "yes")
	})})
	// A second backend checks a port nobody listens on: it must go DOWN,
	// which shows that the check really checks.
	deadPort := freePort(t)
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages ping",
		SpoeSections: `
spoe-message ping
    args src
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-checked %[var(txn.e2e.checked)]\n" +
			"    http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
		AgentBackend:  "option spop-check",
		ServerOptions: "check inter 100ms rise 1 fall 1",
		Extra: fmt.Sprintf(`backend spoe-dead
    mode %s
    option spop-check
    server dead 127.0.0.1:%d check inter 100ms rise 1 fall 1
`, hp.spoeBackendMode(), deadPort),
		Global: global,
	})

	var agentRow, deadRow map[string]string
	waitWithin(t, 10*time.Second, func() bool {
		agentRow = h.serverStat(t, "spoe-agents", "agent1")
		deadRow = h.serverStat(t, "spoe-dead", "dead")
		return agentRow != nil && deadRow != nil &&
			strings.HasPrefix(agentRow["check_status"], "L7OK") && agentRow["status"] == "UP" &&
			deadRow["status"] == "DOWN"
	}, "agent1 UP with L7OK and dead DOWN in \"show stat\"")
	t.Logf("show stat: agent1 status=%s check_status=%s check_desc=%q; dead status=%s check_status=%s",
		agentRow["status"], agentRow["check_status"], agentRow["check_desc"], deadRow["status"], deadRow["check_status"])
	if hc := agent.Stats().Healthchecks; hc == 0 {
		t.Errorf("agent Stats().Healthchecks = 0 with the server UP")
	}
	// Health-check connections are not SPOE traffic: requests still work.
	res := get(t, newClient(t, false), h.url+"/checked")
	expectNoHeader(t, res, "x-spoe-error")
	expectHeader(t, res, "x-checked", "yes")
}

// ---------------------------------------------------------------------------
// h. Pipelining: slow handlers run concurrently, on few connections.

const (
	pipelinedRequests = 20
	slowHandler       = 300 * time.Millisecond
)

// pipeliningCase is one way to send the concurrent requests.
type pipeliningCase struct {
	// agentDirectives are extra spoe-agent lines.
	agentDirectives string
	// maxConns bounds the agent connections HAProxy may open for the
	// burst; 0 leaves them unchecked (only logged).
	maxConns uint64
	// keepPipelining: the agent answers "pipelining" to 3.1+ at once,
	// which it does not by default (spoe.KeepPipelining).
	keepPipelining bool
}

func testPipelining(t *testing.T, hp haproxyBinary, pc pipeliningCase) {
	var running, maxRunning atomic.Int32
	a := &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, _ := r.Message("slow")
		if path, _ := m.Arg("path"); path.EqualString("/slow") {
			n := running.Add(1)
			for old := maxRunning.Load(); n > old && !maxRunning.CompareAndSwap(old, n); old = maxRunning.Load() {
			}
			timer := time.NewTimer(slowHandler) // the handler's own work
			select {
			case <-timer.C:
			case <-r.Context().Done():
				timer.Stop()
			}
			running.Add(-1)
		}
		return w.SetString(txn, "slow", "done")
	})}
	if pc.keepPipelining {
		spoe.KeepPipelining(a)
	}
	agent := startAgentUnderTest(t, a)
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages slow\n" + pc.agentDirectives,
		SpoeSections: `
spoe-message slow
    args path=path
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-slow %[var(txn.e2e.slow)] if { var(txn.e2e.slow) -m found }",
	})
	c := newClient(t, false)
	// Warm up: the first request opens an agent connection.
	expectHeader(t, get(t, c, h.url+"/warm"), "x-slow", "done")
	connsBefore := agent.Stats().ConnsTotal

	// The machine running the tests may be busy: a burst slower than the
	// bound is tried again, up to three bursts. Handled serially, every
	// burst would take pipelinedRequests x slowHandler (6s).
	const bursts = 3
	var timings []time.Duration
	var connsAfter uint64
	passed := false
	for burst := 1; burst <= bursts && !passed; burst++ {
		maxRunning.Store(0)
		elapsed := sendBurst(t, c, h.url+"/slow", pipelinedRequests)
		timings = append(timings, elapsed)
		if burst == 1 {
			connsAfter = agent.Stats().ConnsTotal
		}
		passed = elapsed < 2*slowHandler && maxRunning.Load() == pipelinedRequests
		t.Logf("HAProxy %s %q, burst %d: %d requests with a %v handler took %v, %d handlers ran at once",
			hp.version, pc.agentDirectives, burst, pipelinedRequests, slowHandler, elapsed, maxRunning.Load())
	}
	s := agent.Stats()
	t.Logf("HAProxy %s %q: agent connections: %d before the first burst, %d after it, %d after all; %d ACKs in %d writes",
		hp.version, pc.agentDirectives, connsBefore, connsAfter, s.ConnsTotal, s.FramesOut.ACK, s.Writes)
	if !passed {
		t.Errorf("no burst of %d requests ran all its handlers at once in well under 2 x %v: %v", pipelinedRequests, slowHandler, timings)
	}
	if pc.maxConns > 0 && connsAfter > pc.maxConns {
		t.Errorf("HAProxy opened %d agent connections for %d requests, want at most %d", connsAfter, pipelinedRequests, pc.maxConns)
	}
}

// sendBurst sends n concurrent GET requests, checks their answers, and
// returns how long they took together.
func sendBurst(t *testing.T, c *http.Client, url string, n int) time.Duration {
	start := time.Now()
	results := make(chan error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := tryGet(c, url)
			switch {
			case err != nil:
				results <- err
			case res.status != 200 || res.header.Get("X-Slow") != "done":
				results <- fmt.Errorf("status %d, x-slow %q", res.status, res.header.Get("X-Slow"))
			default:
				results <- nil
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(results)
	for err := range results {
		if err != nil {
			t.Errorf("concurrent request: %v", err)
		}
	}
	return elapsed
}

// ---------------------------------------------------------------------------
// i. Capabilities: 2.6 offers pipelining and async, the agent announces
// them back (and fragmentation); 3.1+ offers only pipelining, which the agent
// does not take (see TestE2EBigAnswersStallWithPipelining).

func testCapabilities(t *testing.T, hp haproxyBinary) {
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		if r.EngineID() == "" {
			return errors.New("no engine-id")
		}
		return w.SetString(txn, "engine", r.EngineID())
	})})
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages caps",
		SpoeSections: `
spoe-message caps
    args src
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-engine %[var(txn.e2e.engine)] if { var(txn.e2e.engine) -m found }",
	})
	c := newClient(t, true)
	first := get(t, c, h.url+"/caps")
	second := get(t, c, h.url+"/caps")
	engine := first.header.Get("X-Engine")
	if len(engine) != 36 || second.header.Get("X-Engine") != engine {
		t.Errorf("engine-ids %q and %q, want one 36-character UUID", engine, second.header.Get("X-Engine"))
	}

	hellos := agent.tap.agentHellos()
	// 2.8 and 3.0's applets may open a second connection for the second
	// request (each applet that finds no idle one opens its own); 2.6 and
	// 3.1+ reuse the first. Every HELLO must say the same.
	if len(hellos) == 0 || (len(hellos) > 1 && !(hp.is26() && hp.atLeast(2, 8))) || len(hellos) > 2 {
		t.Fatalf("agent sent %d AGENT-HELLO frames, want 1 (1 or 2 on 2.8 and 3.0): %+v", len(hellos), hellos)
	}
	for _, h := range hellos[1:] {
		if h != hellos[0] {
			t.Errorf("AGENT-HELLO frames differ: %+v", hellos)
		}
	}
	hello := hellos[0]
	caps := strings.Split(hello.capabilities, ",")
	sort.Strings(caps)
	// 3.1+ offers only pipelining, which the agent does not take (see
	// TestE2EBigAnswersStallWithPipelining).
	want := []string{"fragmentation"}
	if hp.is26() {
		want = []string{"async", "fragmentation", "pipelining"}
	}
	t.Logf("AGENT-HELLO: version %q, max-frame-size %d, capabilities %q", hello.version, hello.maxFrameSize, hello.capabilities)
	if hello.frameType != 101 || hello.version != "2.0" || hello.maxFrameSize != 16380 {
		t.Errorf("AGENT-HELLO = %+v, want type 101, version 2.0, max-frame-size 16380 (HAProxy's)", hello)
	}
	expectList(t, "capabilities the agent announced", caps, want)
}

// heldSetup sends the path of each request to the agent at addr in a
// message "held", and returns the agent's txn.held (or its error) in
// headers x-held and x-spoe-error.
func heldSetup(addr string) haproxySetup {
	return haproxySetup{
		AgentAddr:       addr,
		AgentDirectives: "messages held",
		SpoeSections: `
spoe-message held
    args path=path
    event on-frontend-http-request
`,
		Frontend: "http-after-response set-header x-held %[var(txn.e2e.held)] if { var(txn.e2e.held) -m found }\n" +
			"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }",
	}
}

// ---------------------------------------------------------------------------
// i (bonus). Async on 2.6: an ACK whose connection is gone leaves on a sibling
// connection of the same engine, and HAProxy applies it.

func testAsyncReroute(t *testing.T, hp haproxyBinary) {
	startedA := make(chan struct{})
	releaseA := make(chan struct{})
	agent := startAgentUnderTest(t, &spoe.Agent{Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, _ := r.Message("held")
		path, _ := m.Arg("path")
		if path.EqualString("/a") {
			close(startedA)
			select {
			case <-releaseA:
			case <-r.Context().Done():
				return r.Context().Err()
			}
		}
		b, _ := path.Bytes()
		return w.SetStringBytes(txn, "held", b)
	})})
	h := startHAProxy(t, hp, heldSetup(agent.addr))
	c := newClient(t, false)

	// A's NOTIFY waits on the only connection there is...
	answerA := make(chan response, 1)
	go func() {
		res, err := tryGet(c, h.url+"/a")
		if err != nil {
			res.body = err.Error()
		}
		answerA <- res
	}()
	select {
	case <-startedA:
	case <-time.After(5 * time.Second):
		t.Fatal("handler for /a did not start")
	}
	if n := agent.Stats().ConnsTotal; n != 1 {
		t.Fatalf("%d agent connections while A is pending, want 1", n)
	}
	// ...and B, finding no idle connection, makes 2.6 open a second one
	// of the same engine (B itself may ride on either).
	expectHeader(t, get(t, c, h.url+"/b"), "x-held", "/b")
	waitWithin(t, 5*time.Second, func() bool { return len(agent.tap.agentHellos()) == 2 },
		"HAProxy 2.6 to open and set up a second agent connection")

	// The first connection dies under A's handler (closed beneath the
	// agent): A's ACK must leave on the second one, where HAProxy, in async
	// mode, still accepts it.
	agent.tap.conn(0).TCPConn.Close()
	close(releaseA)
	a := <-answerA
	if a.status != 200 {
		t.Errorf("request A: status %d (%s), want 200", a.status, a.body)
	}
	expectHeader(t, a, "x-held", "/a")
	expectNoHeader(t, a, "x-spoe-error")
	// The engine counts a rerouted ACK once its write returned, which may
	// be after HAProxy answered the client.
	waitWithin(t, 5*time.Second, func() bool { return agent.Stats().ACKsRerouted >= 1 }, "the rerouted ACK to be counted")
	if s := agent.Stats(); s.ACKsRerouted != 1 || s.ACKsDropped != 0 {
		t.Errorf("ACKsRerouted = %d, ACKsDropped = %d, want 1 and 0", s.ACKsRerouted, s.ACKsDropped)
	}
}

// ---------------------------------------------------------------------------
// i (bonus). MaxEngines reached on 2.6: HAProxy's new engine-id is served
// without async; HAProxy then runs that connection as pipelining, every
// request is answered, and a connection that dies under a pending NOTIFY
// fails that request at once (set-on-error) instead of leaving it waiting
// for an ACK on a sibling.

func testMaxEngines(t *testing.T, hp haproxyBinary) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	agent := startAgentUnderTest(t, &spoe.Agent{MaxEngines: 1, Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, _ := r.Message("held")
		path, _ := m.Arg("path")
		if path.EqualString("/slow") {
			started <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
				return r.Context().Err()
			}
		}
		b, _ := path.Bytes()
		return w.SetStringBytes(txn, "held", b)
	})})
	defer close(release)
	// Another engine takes the only place.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	filler, err := spoe.Dial(ctx, "tcp", agent.addr, spoe.ClientConfig{Async: true, EngineID: "filler"})
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()

	h := startHAProxy(t, hp, heldSetup(agent.addr))
	c := newClient(t, false)
	for i := 0; i < 5; i++ {
		expectHeader(t, get(t, c, h.url+"/fast"), "x-held", "/fast")
	}
	hellos := agent.tap.agentHellos()
	if len(hellos) < 2 {
		t.Fatalf("%d AGENT-HELLOs, want the filler's and HAProxy's", len(hellos))
	}
	if hellos[0].capabilities != "pipelining,async,fragmentation" {
		t.Errorf("filler's AGENT-HELLO capabilities %q", hellos[0].capabilities)
	}
	for _, hello := range hellos[1:] {
		if hello.capabilities != "pipelining,fragmentation" {
			t.Errorf("HAProxy's AGENT-HELLO capabilities %q, want no async", hello.capabilities)
		}
	}
	if s := agent.Stats(); s.AsyncRefused == 0 {
		t.Errorf("AsyncRefused = 0")
	}

	// A pending NOTIFY whose connection dies: without async, HAProxy fails
	// it at once rather than wait for its ACK elsewhere.
	answer := make(chan response, 1)
	go func() {
		res, err := tryGet(c, h.url+"/slow")
		if err != nil {
			res.body = err.Error()
		}
		answer <- res
	}()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("handler for /slow did not start")
	}
	for i := 1; i < len(hellos); i++ {
		agent.tap.conn(i).TCPConn.Close()
	}
	select {
	case res := <-answer:
		if res.status != 200 || res.header.Get("x-spoe-error") == "" {
			t.Errorf("/slow: status %d, x-spoe-error %q (%s): want 200 and HAProxy's error", res.status, res.header.Get("x-spoe-error"), res.body)
		}
		t.Logf("/slow after its connection died: status %d, x-spoe-error %q", res.status, res.header.Get("x-spoe-error"))
	case <-time.After(2 * time.Second): // below timeout processing (3 s)
		t.Error("/slow not answered after its connection died")
	}
	// The agent serves on. HAProxy 2.8 may fail the first event after its
	// connections died (it tried one of them): poll.
	waitWithin(t, 2*time.Second, func() bool {
		return get(t, c, h.url+"/fast").header.Get("x-held") == "/fast"
	}, "/fast answered by the agent after the connections died")
}

// ---------------------------------------------------------------------------
// j. A NOTIFY bigger than the agent's max-frame-size (256): HAProxy 2.6
// fragments it, 3.2 fails the event.

func testBigNotify(t *testing.T, hp haproxyBinary) {
	var rec recorder
	agent := startAgentUnderTest(t, &spoe.Agent{MaxFrameSize: 256, Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		m, _ := r.Message("big")
		v, _ := m.Arg("h")
		b, ok := v.Bytes()
		if !ok {
			return fmt.Errorf("h is %s", v.Type())
		}
		sum := sha256.Sum256(b)
		rec.add("len", fmt.Sprint(len(b)))
		if err := w.SetInt(txn, "big_len", int64(len(b))); err != nil {
			return err
		}
		return w.SetString(txn, "big_sum", hex.EncodeToString(sum[:8]))
	})})
	h := startHAProxy(t, hp, haproxySetup{
		AgentAddr:       agent.addr,
		AgentDirectives: "messages big",
		SpoeSections: `
spoe-message big
    args h=req.hdr(x-big)
    event on-frontend-http-request
`,
		Frontend: `
http-after-response set-header x-big-len %[var(txn.e2e.big_len)] if { var(txn.e2e.big_len) -m found }
http-after-response set-header x-big-sum %[var(txn.e2e.big_sum)] if { var(txn.e2e.big_sum) -m found }
http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)] if { var(txn.e2e.spoe_error) -m found }
http-after-response set-header x-agent-error 1 if { var(txn.e2e.error) -m found }
`,
	})
	// 1000 bytes, no comma (req.hdr would split the value on commas).
	big := strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz", 28)[:1000]
	sum := sha256.Sum256([]byte(big))
	bigSum := hex.EncodeToString(sum[:8])
	c := newClient(t, false)

	// The first NOTIFY is encoded before any connection exists, with the
	// configured max-frame-size (16380); the connection then negotiates
	// 256, and the frame cannot go: both versions fail the event with
	// 256+3 ("frame is too big").
	//
	// But 3.1.0 does not check the negotiated size when it sends (its
	// multiplexer does since 3.2-dev): the NOTIFY reaches the agent, which
	// fails that event alone, like a failed handler (see oversized in
	// oversize.go), and keeps the connection.
	first := get(t, c, h.url+"/big", "X-Big", big)
	sendsOversized := strings.HasPrefix(hp.version, "3.1.0") ||
		(hp.major == 3 && hp.minor == 1 && first.header.Get("X-Agent-Error") != "")
	if sendsOversized {
		expectHeader(t, first, "x-agent-error", "1")
		expectNoHeader(t, first, "x-spoe-error")
	} else {
		expectHeader(t, first, "x-spoe-error", "259")
	}
	expectNoHeader(t, first, "x-big-len")

	// A small message passes on both versions.
	small := get(t, c, h.url+"/small", "X-Big", "small")
	expectHeader(t, small, "x-big-len", "5")
	expectNoHeader(t, small, "x-spoe-error")

	second := get(t, c, h.url+"/big", "X-Big", big)
	s := agent.Stats()
	t.Logf("HAProxy %s: frames in: NOTIFY %d, UNSET (fragments) %d; second big request: x-spoe-error %q x-big-len %q",
		hp.version, s.FramesIn.Notify, s.FramesIn.Unset, second.header.Get("X-Spoe-Error"), second.header.Get("X-Big-Len"))
	if hp.is26() {
		// Now that the connection negotiated 256, 2.6 encodes with it and
		// fragments: NOTIFY without FIN, then UNSET frames.
		expectHeader(t, second, "x-big-len", "1000")
		expectHeader(t, second, "x-big-sum", bigSum)
		expectNoHeader(t, second, "x-spoe-error")
		if s.FramesIn.Unset == 0 {
			t.Errorf("no UNSET frame received: the NOTIFY was not fragmented")
		}
		expectList(t, "lengths of h the handler saw", rec.get("len"), []string{"5", "1000"})
	} else if sendsOversized {
		expectHeader(t, second, "x-agent-error", "1")
		expectNoHeader(t, second, "x-big-len")
		if s.NotifyTooBig != 2 {
			t.Errorf("agent failed %d oversized NOTIFYs, want 2", s.NotifyTooBig)
		}
		expectList(t, "lengths of h the handler saw", rec.get("len"), []string{"5"})
	} else {
		// 3.x never fragments: the event fails again and nothing reaches
		// the agent.
		expectHeader(t, second, "x-spoe-error", "259")
		expectNoHeader(t, second, "x-big-len")
		if s.FramesIn.Unset != 0 || s.FramesIn.Notify != 1 {
			t.Errorf("agent received %d NOTIFY and %d UNSET frames, want only the small request's NOTIFY", s.FramesIn.Notify, s.FramesIn.Unset)
		}
		expectList(t, "lengths of h the handler saw", rec.get("len"), []string{"5"})
	}
}

// ---------------------------------------------------------------------------
// a. The seed example, built and run as its own program on :9000.

func TestE2ESeed(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("the go command is needed to build testdata/seed: %v", err)
	}
	var (
		seed      sync.Once
		seedReady bool
	)
	forEachHAProxy(t, func(vt *testing.T, hp haproxyBinary) {
		// Built and started once, by the first version that runs, and
		// stopped when TestE2ESeed ends.
		seed.Do(func() {
			startSeed(t, vt)
			seedReady = true
		})
		if !seedReady {
			vt.Fatal("the seed program is not running (see the first subtest)")
		}
		h := startHAProxy(vt, hp, haproxySetup{
			AgentAddr:       "127.0.0.1:9000",
			AgentDirectives: "messages ip-rep",
			SpoeSections: `
spoe-message ip-rep
    args ip=src
    event on-frontend-http-request
`,
			Frontend: "http-after-response set-header x-reputation %[var(sess.e2e.reputation)] if { var(sess.e2e.reputation) -m found }\n" +
				"http-after-response set-header x-agent-error 1 if { var(txn.e2e.error) -m found }",
		})
		res := get(vt, newClient(vt, false), h.url+"/")
		// getReputation answers 0.75 for loopback; a float64 travels as
		// the string "0.75".
		expectHeader(vt, res, "x-reputation", "0.75")
		expectNoHeader(vt, res, "x-agent-error")
	})
}

// startSeed builds testdata/seed, checks that :9000 is free, runs the
// program until parent ends, and waits until it accepts connections.
// Failures are reported on vt, the subtest that asked.
func startSeed(parent, vt *testing.T) {
	vt.Helper()
	bin := filepath.Join(parent.TempDir(), "seed")
	build := exec.Command("go", "build", "-o", bin, "./testdata/seed")
	build.Dir = moduleRoot()
	if out, err := build.CombinedOutput(); err != nil {
		vt.Fatalf("go build ./testdata/seed: %v\n%s", err, out)
	}
	// The seed program listens on :9000, hard-coded.
	l, err := net.Listen("tcp", ":9000")
	if err != nil {
		vt.Fatalf("port 9000 is busy, the seed program cannot listen on it (it is hard-coded): %v", err)
	}
	l.Close()

	out := &syncBuffer{}
	cmd := exec.Command(bin)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		vt.Fatalf("start seed: %v", err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	parent.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	logOnFailure(parent, "seed program output", out)
	waitWithin(vt, 10*time.Second, func() bool {
		select {
		case <-exited:
			vt.Fatalf("seed program exited: %v\n%s", waitErr, out.String())
		default:
		}
		c, err := net.DialTimeout("tcp", "127.0.0.1:9000", time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}, "the seed program to listen on :9000")
}
