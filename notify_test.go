package spoe

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// goldenRequest returns a Request over a golden NOTIFY's payload.
func goldenRequest(t testing.TB, version, name string) *Request {
	t.Helper()
	f := goldenFrame(t, version, name)
	require.Equal(t, frameNotify, f.typ)
	r := &Request{streamID: f.streamID, frameID: f.frameID}
	require.NoError(t, r.indexMessages(f.payload))
	return r
}

// The arguments of the golden "echo" message, in order, with the Go value
// the simple API gives each.
var echoArgs = []struct {
	name  string
	typ   Type
	value interface{}
}{
	{"b_t", TypeBool, true},
	{"b_f", TypeBool, false},
	{"i_0", TypeInt64, int64(0)},
	{"i_239", TypeInt64, int64(239)},
	{"i_240", TypeInt64, int64(240)},
	{"i_2288", TypeInt64, int64(2288)},
	{"i_neg", TypeInt64, int64(-1)},
	{"i_min", TypeInt64, int64(-math.MaxInt64)},
	{"i_max", TypeInt64, int64(math.MaxInt64)},
	{"i_u32", TypeInt64, int64(math.MaxUint32)},
	{"ip4", TypeIPv4, net.IP{192, 0, 2, 1}},
	{"ip6", TypeIPv6, net.ParseIP("2001:db8::1")},
	{"src", TypeIPv4, net.IP{127, 0, 0, 1}},
	{"s", TypeString, "hello"},
	{"s_utf8", TypeString, "héllo ✓"},
	{"s_empty", TypeString, ""},
	{"s_long", TypeString, strings.Repeat("a", 300)},
	{"bin", TypeBinary, []byte{0x00, 0xFF, 0x10, 0xE0}},
	{"body", TypeBinary, []byte("ab\x00\xffcd")},
	{"meth", TypeString, "POST"},
	{"nul", TypeNull, nil},
}

func TestGoldenEchoFastPath(t *testing.T) {
	for _, version := range goldenVersions {
		t.Run(version, func(t *testing.T) {
			r := goldenRequest(t, version, "notify-echo.bin")
			msgs := r.Messages()
			require.True(t, msgs.Next())
			assert.True(t, msgs.NameIs("echo"))
			assert.Equal(t, "echo", msgs.Name())
			assert.Equal(t, len(echoArgs), msgs.NumArgs())
			args := msgs.Args()
			for i, want := range echoArgs {
				require.True(t, args.Next(), "arg %d", i)
				assert.True(t, args.NameIs(want.name), "arg %d is %q, not %q", i, args.Name(), want.name)
				v := args.Value()
				assert.Equal(t, want.typ, v.Type(), want.name)
				assert.Equal(t, want.value, v.Interface(), want.name)
			}
			assert.False(t, args.Next())
			assert.False(t, msgs.Next())

			m, ok := r.Message("echo")
			require.True(t, ok)
			v, ok := m.Arg("src")
			require.True(t, ok)
			a, ok := v.Addr()
			assert.True(t, ok)
			assert.Equal(t, netip.MustParseAddr("127.0.0.1"), a)
			v, _ = m.Arg("i_neg")
			i, ok := v.Int()
			assert.True(t, ok)
			assert.Equal(t, int64(-1), i)
			v, _ = m.Arg("s_utf8")
			assert.True(t, v.EqualString("héllo ✓"))
			_, ok = m.Arg("absent")
			assert.False(t, ok)
			_, ok = r.Message("absent")
			assert.False(t, ok)
		})
	}
}

func TestGoldenEchoSimpleAPI(t *testing.T) {
	for _, version := range goldenVersions {
		msgs := goldenRequest(t, version, "notify-echo.bin").decodeMessages()
		require.Len(t, msgs, 1)
		assert.Equal(t, "echo", msgs[0].Name)
		assert.Len(t, msgs[0].Args, len(echoArgs))
		for _, want := range echoArgs {
			got, ok := msgs[0].Args[want.name]
			assert.True(t, ok, want.name)
			assert.Equal(t, want.value, got, want.name)
		}
	}
}

func TestGoldenThreeMessages(t *testing.T) {
	for _, version := range goldenVersions {
		r := goldenRequest(t, version, "notify-m_one-3msgs.bin")
		msgs := r.decodeMessages()
		require.Len(t, msgs, 3)
		assert.Equal(t, Message{Name: "m_one", Args: map[string]interface{}{"a": int64(1)}}, msgs[0])
		assert.Equal(t, Message{Name: "m_two", Args: map[string]interface{}{}}, msgs[1])
		assert.Equal(t, Message{Name: "m_three", Args: map[string]interface{}{"s": "three", "b": true}}, msgs[2])

		var names []string
		for it := r.Messages(); it.Next(); {
			names = append(names, it.Name())
			if it.NameIs("m_two") {
				assert.Equal(t, 0, it.NumArgs())
				args := it.Args()
				assert.False(t, args.Next())
			}
		}
		assert.Equal(t, []string{"m_one", "m_two", "m_three"}, names)
	}
}

func TestGoldenIPRep(t *testing.T) {
	for _, version := range goldenVersions {
		msgs := goldenRequest(t, version, "notify-ip-rep.bin").decodeMessages()
		require.Len(t, msgs, 1)
		assert.Equal(t, "ip-rep", msgs[0].Name)
		ip, ok := msgs[0].Args["ip"].(net.IP)
		require.True(t, ok)
		assert.True(t, ip.Equal(net.IPv4(127, 0, 0, 1)))
	}
}

// TestDuplicateAndUnnamedArgs: the fast path keeps every argument in order;
// the simple API keeps the first of each name, unnamed ones under "".
func TestDuplicateAndUnnamedArgs(t *testing.T) {
	payload, err := appendMessages(nil, []ClientMessage{{Name: "m", Args: []Arg{
		{"ip", net.IP{10, 0, 0, 1}}, {"", "first unnamed"}, {"ip", net.IP{10, 0, 0, 2}}, {"", "second unnamed"},
	}}})
	require.NoError(t, err)
	r := &Request{}
	require.NoError(t, r.indexMessages(payload))
	var got []string
	it := r.Messages()
	require.True(t, it.Next())
	for args := it.Args(); args.Next(); {
		got = append(got, args.Name()+"="+valueString(args.Value()))
	}
	assert.Equal(t, []string{"ip=10.0.0.1", "=first unnamed", "ip=10.0.0.2", "=second unnamed"}, got)
	m := r.decodeMessages()[0]
	assert.Equal(t, net.IP{10, 0, 0, 1}, m.Args["ip"])
	assert.Equal(t, "first unnamed", m.Args[""])
}

// TestManyMessages: messages past the indexed ones are found by stepping
// over their predecessors.
func TestManyMessages(t *testing.T) {
	var msgs []ClientMessage
	for i := 0; i < 40; i++ {
		msgs = append(msgs, ClientMessage{Name: fmt.Sprintf("m%d", i), Args: []Arg{{"i", int64(i)}, {"s", strings.Repeat("x", i)}}})
	}
	payload, err := appendMessages(nil, msgs)
	require.NoError(t, err)
	r := &Request{}
	require.NoError(t, r.indexMessages(payload))
	assert.Equal(t, 40, r.NumMessages())
	i := 0
	for it := r.Messages(); it.Next(); i++ {
		assert.Equal(t, fmt.Sprintf("m%d", i), it.Name())
		v, ok := it.Arg("i")
		require.True(t, ok)
		n, _ := v.Int()
		assert.Equal(t, int64(i), n)
		v, _ = it.Arg("s")
		assert.True(t, v.EqualString(strings.Repeat("x", i)))
	}
	assert.Equal(t, 40, i)
	m, ok := r.Message("m33")
	require.True(t, ok)
	assert.Equal(t, 2, m.NumArgs())
	assert.Len(t, r.decodeMessages(), 40)
}

// TestSealedRequestPanics: a Request kept past its handler panics when used
// (builds with the race detector seal it).
func TestSealedRequestPanics(t *testing.T) {
	r := goldenRequest(t, "2.6.12", "notify-ip-rep.bin")
	it := r.Messages()
	r.sealed = true
	assert.Panics(t, func() { r.Messages() })
	assert.Panics(t, func() { it.Next() })
	assert.Panics(t, func() { r.Context() })
}

func valueString(v Value) string {
	if a, ok := v.Addr(); ok {
		return a.String()
	}
	if b, ok := v.Bytes(); ok {
		return string(b)
	}
	return v.Type().String()
}

func TestCheckMessagesErrors(t *testing.T) {
	valid, err := appendMessages(nil, []ClientMessage{{Name: "m", Args: []Arg{{"a", int64(1)}, {"s", "xy"}}}})
	require.NoError(t, err)
	require.NoError(t, (&Request{}).indexMessages(valid))
	require.NoError(t, (&Request{}).indexMessages(nil), "no message at all")
	tests := []struct {
		name    string
		payload []byte
	}{
		{"name length past the end", unhex(t, "09 61 62")},
		{"no nb-args", unhex(t, "01 6D")},
		{"nb-args larger than present", unhex(t, "01 6D 03 01 61 04 01")},
		{"arg name cut", unhex(t, "01 6D 01 05 61")},
		{"arg without value", unhex(t, "01 6D 01 01 61")},
		{"unknown type byte", unhex(t, "01 6D 01 01 61 0B")},
		{"string length past the frame", unhex(t, "01 6D 01 01 61 08 10 61")},
		{"eleven-byte varint", unhex(t, "01 6D 01 01 61 04 FF FF FF FF FF FF FF FF FF FF 00")},
		{"truncated golden", valid[:len(valid)-1]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Error(t, (&Request{}).indexMessages(tt.payload))
		})
	}
}

// TestIteratorsNeverPanic walks iterators over every prefix of a golden
// frame, whether indexing it failed or not: iteration must end, not crash.
func TestIteratorsNeverPanic(t *testing.T) {
	f := goldenFrame(t, "2.6.12", "notify-m_one-3msgs.bin")
	payload := append(append([]byte{}, f.payload...), goldenFrame(t, "2.6.12", "notify-echo.bin").payload...)
	for n := 0; n <= len(payload); n++ {
		r := &Request{}
		_ = r.indexMessages(payload[:n])
		for it := r.Messages(); it.Next(); {
			_, _ = it.Arg("s")
			for args := it.Args(); args.Next(); {
				_ = args.Value().Interface()
			}
		}
	}
}

func TestFastPathAccessorsNoAlloc(t *testing.T) {
	r := goldenRequest(t, "2.6.12", "notify-echo.bin")
	var sink int
	allocs := testing.AllocsPerRun(1000, func() {
		for it := r.Messages(); it.Next(); {
			if !it.NameIs("echo") {
				continue
			}
			for args := it.Args(); args.Next(); {
				v := args.Value()
				if i, ok := v.Int(); ok {
					sink += int(i)
				}
				if a, ok := v.Addr(); ok && a.Is4() {
					sink++
				}
				if b, ok := v.Bytes(); ok {
					sink += len(b)
				}
				if args.NameIs("s") {
					sink++
				}
			}
		}
	})
	assert.Zero(t, allocs)
}

func BenchmarkDecodeNotify(b *testing.B) {
	for _, tt := range []struct {
		name string
		msg  ClientMessage
	}{
		{"1arg", ClientMessage{Name: "ip-rep", Args: []Arg{{"ip", net.IP{10, 0, 0, 1}}}}},
		{"8args", ClientMessage{Name: "heavy", Args: []Arg{
			{"ip", net.IP{10, 0, 0, 1}}, {"method", "GET"}, {"path", "/api/v1/items/7f3a9c?lang=en&page=2"},
			{"host", "h00000001.example.com"}, {"headers", strings.Repeat("x", 200)}, {"clen", int64(1234)},
			{"secure", true}, {"body", make([]byte, 32)},
		}}},
	} {
		payload, err := appendMessages(nil, []ClientMessage{tt.msg})
		require.NoError(b, err)
		b.Run("fast/"+tt.name, func(b *testing.B) {
			b.ReportAllocs()
			var sink int
			r := new(Request) // pooled in the agent
			for i := 0; i < b.N; i++ {
				if r.indexMessages(payload) != nil {
					b.Fatal("invalid")
				}
				for it := r.Messages(); it.Next(); {
					for args := it.Args(); args.Next(); {
						if b, ok := args.Value().Bytes(); ok {
							sink += len(b)
						}
					}
				}
			}
			_ = sink
		})
		b.Run("simple/"+tt.name, func(b *testing.B) {
			b.ReportAllocs()
			r := new(Request) // pooled in the agent
			for i := 0; i < b.N; i++ {
				if r.indexMessages(payload) != nil {
					b.Fatal("invalid")
				}
				_ = r.decodeMessages()
			}
		})
	}
}
