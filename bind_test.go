package spoe

import (
	"context"
	"errors"
	"math"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

type upper string

func (u *upper) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		return errors.New("empty")
	}
	*u = upper(strings.ToUpper(string(b)))
	return nil
}

type boundArgs struct {
	IP       netip.Addr  `spoe:"ip"`
	IP6      net.IP      `spoe:"ip6"`
	Path     string      `spoe:"path"`
	Body     []byte      `spoe:"body"`
	BodyStr  string      `spoe:"body-as-string"`
	Length   int64       `spoe:"clen"`
	Small    int8        `spoe:"small"`
	Count    uint16      `spoe:"count"`
	Int      int         `spoe:"int32"`
	Secure   bool        `spoe:"secure"`
	Agent    *string     `spoe:"ua"`
	Missing  *int        `spoe:"absent"`
	Lang     string      `spoe:"lang,optional"`
	Any      interface{} `spoe:"any"`
	Method   upper       `spoe:"method"`
	Untagged string
	Skipped  string `spoe:"-"`
}

var boundArgsWant = boundArgs{
	IP:      netip.MustParseAddr("192.0.2.7"),
	IP6:     net.ParseIP("2001:db8::1"),
	Path:    "/login",
	Body:    []byte{0, 1, 2},
	BodyStr: "bin",
	Length:  1234,
	Small:   -5,
	Count:   65535,
	Int:     -7,
	Secure:  true,
	Lang:    "keep", // absent and optional: left as it was
	Any:     int64(9),
	Method:  "POST",
}

func boundArgsMessage() ClientMessage {
	return ClientMessage{Name: "req", Args: []Arg{
		{Name: "ip", Value: net.ParseIP("192.0.2.7").To4()},
		{Name: "ip", Value: net.ParseIP("192.0.2.99").To4()}, // a duplicate: the first counts
		{Name: "ip6", Value: netip.MustParseAddr("2001:db8::1")},
		{Name: "path", Value: "/login"},
		{Name: "body", Value: []byte{0, 1, 2}},
		{Name: "body-as-string", Value: []byte("bin")},
		{Name: "clen", Value: int64(1234)},
		{Name: "small", Value: int64(-5)},
		{Name: "count", Value: uint32(65535)},
		{Name: "int32", Value: int32(-7)},
		{Name: "secure", Value: true},
		{Name: "ua", Value: "curl/8"},
		{Name: "any", Value: int64(9)},
		{Name: "method", Value: "post"},
	}}
}

func checkBound(t *testing.T, got boundArgs) {
	t.Helper()
	if got.Agent == nil || *got.Agent != "curl/8" {
		t.Errorf("Agent = %v, want curl/8", got.Agent)
	}
	got.Agent = nil
	if !reflect.DeepEqual(got, boundArgsWant) {
		t.Errorf("bound\n%+v\nwant\n%+v", got, boundArgsWant)
	}
}

// bindThroughAgent sends msg to an agent whose handler binds it on both
// APIs, and returns what each bound and the errors.
func bindThroughAgent(t *testing.T, msg ClientMessage, newTarget func() interface{}) (simple, fast interface{}, simpleErr, fastErr error) {
	t.Helper()
	simple, fast = newTarget(), newTarget()
	var rt Router
	rt.Handle("simple", MessageHandler(func(ms []Message) ([]Action, error) {
		simpleErr = ms[0].Bind(simple)
		return nil, nil
	}))
	rt.HandleFunc("fast", func(w *ActionWriter, r *Request) error {
		m := r.Messages()
		m.Next()
		fastErr = m.Bind(fast)
		return nil
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	agent := quietAgent(&rt)
	go agent.Serve(l)
	defer agent.Close()
	c, err := Dial(context.Background(), "tcp", l.Addr().String(), ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, b := msg, msg
	a.Name, b.Name = "simple", "fast"
	// The ACK comes after the handler returned: the results are there.
	if _, err := c.Notify(context.Background(), a, b); err != nil {
		t.Fatal(err)
	}
	return simple, fast, simpleErr, fastErr
}

func TestBind(t *testing.T) {
	newTarget := func() interface{} { return &boundArgs{Lang: "keep", Untagged: "", Skipped: ""} }
	simple, fast, serr, ferr := bindThroughAgent(t, boundArgsMessage(), newTarget)
	if serr != nil || ferr != nil {
		t.Fatalf("Bind: simple %v, fast %v", serr, ferr)
	}
	checkBound(t, *simple.(*boundArgs))
	checkBound(t, *fast.(*boundArgs))
}

func TestBindErrors(t *testing.T) {
	cases := []struct {
		name   string
		args   []Arg
		target func() interface{}
		want   string
	}{
		{"missing", nil, func() interface{} {
			return &struct {
				IP netip.Addr `spoe:"ip"`
			}{}
		}, `argument "ip" (field IP): missing`},
		{"null", []Arg{{Name: "ua", Value: nil}}, func() interface{} {
			return &struct {
				UA string `spoe:"ua"`
			}{}
		}, `argument "ua" (field UA): NULL`},
		{"wrong type", []Arg{{Name: "ip", Value: "192.0.2.1"}}, func() interface{} {
			return &struct {
				IP netip.Addr `spoe:"ip"`
			}{}
		}, `argument "ip" (field IP): is string, field is netip.Addr`},
		{"int as string", []Arg{{Name: "n", Value: int64(3)}}, func() interface{} {
			return &struct {
				N string `spoe:"n"`
			}{}
		}, "is int64, field is string"},
		{"overflow", []Arg{{Name: "n", Value: int64(300)}}, func() interface{} {
			return &struct {
				N int8 `spoe:"n"`
			}{}
		}, "300 overflows int8"},
		{"uint32 overflow", []Arg{{Name: "n", Value: uint32(math.MaxUint32)}}, func() interface{} {
			return &struct {
				N int32 `spoe:"n"`
			}{}
		}, "4294967295 overflows int32"},
		{"negative", []Arg{{Name: "n", Value: int64(-1)}}, func() interface{} {
			return &struct {
				N uint `spoe:"n"`
			}{}
		}, "-1 is negative"},
		{"text", []Arg{{Name: "m", Value: ""}}, func() interface{} {
			return &struct {
				M upper `spoe:"m"`
			}{}
		}, `argument "m" (field M): empty`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, serr, ferr := bindThroughAgent(t, ClientMessage{Name: "x", Args: c.args}, c.target)
			for api, err := range map[string]error{"simple": serr, "fast": ferr} {
				var ae *ArgError
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), `message "`+api+`"`) {
					t.Errorf("%s: %v, want an *ArgError with %q", api, err, c.want)
				}
			}
		})
	}
}

func TestBindBadTargets(t *testing.T) {
	m := Message{Name: "x", Args: map[string]interface{}{"a": "b"}}
	var notStruct int
	var nilPtr *boundArgs
	type unexported struct {
		//lint:ignore U1000 Bind must refuse a tagged field it cannot set
		a string `spoe:"a"`
	}
	type badOption struct {
		A string `spoe:"a,omitempty"`
	}
	type badType struct {
		A float64 `spoe:"a"`
	}
	for _, target := range []interface{}{nil, boundArgs{}, &notStruct, nilPtr, &unexported{}, &badOption{}, &badType{}} {
		err := m.Bind(target)
		var ae *ArgError
		if err == nil || errors.As(err, &ae) {
			t.Errorf("Bind(%T): %v, want an error about the target", target, err)
		}
	}
}

// A UINT64 above math.MaxInt64 (which the Client refuses to send) into an
// int64.
func TestBindUint64Overflow(t *testing.T) {
	var args struct {
		N int64 `spoe:"n"`
	}
	err := Message{Name: "x", Args: map[string]interface{}{"n": uint64(math.MaxUint64)}}.Bind(&args)
	if err == nil || !strings.Contains(err.Error(), "18446744073709551615 overflows int64") {
		t.Errorf("Bind: %v", err)
	}
}

// A pointer field is reset to nil when the argument is absent, NULL too.
func TestBindPointerReset(t *testing.T) {
	s := "old"
	var args struct {
		UA *string `spoe:"ua"`
	}
	args.UA = &s
	if err := (Message{Args: map[string]interface{}{"ua": nil}}).Bind(&args); err != nil || args.UA != nil {
		t.Errorf("Bind: %v, UA %v; want nil", err, args.UA)
	}
}
