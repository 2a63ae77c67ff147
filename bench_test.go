package spoe

import (
	"encoding/binary"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"
)

// The two workloads of spopload: "ip-rep" (one IPv4 argument) and "heavy"
// (eight arguments, one of them echoed back).
var (
	ipRepMessage = ClientMessage{Name: "ip-rep", Args: []Arg{{"ip", net.IP{10, 0, 0, 1}}}}
	heavyMessage = ClientMessage{Name: "heavy", Args: []Arg{
		{"ip", net.IP{10, 0, 0, 1}}, {"method", "GET"}, {"path", "/api/v1/items/7f3a9c?lang=en&page=2"},
		{"host", "h00000001.example.com"}, {"headers", strings.Repeat("h", 200)}, {"clen", int64(1234)},
		{"secure", true}, {"body", make([]byte, 32)},
	}}
)

// fastHandler answers both workloads on the zero-copy path.
var fastHandler = HandlerFunc(func(w *ActionWriter, r *Request) error {
	for msgs := r.Messages(); msgs.Next(); {
		if err := w.SetInt(VarScopeSession, "score", 100); err != nil {
			return err
		}
		if msgs.NameIs("heavy") {
			host, _ := msgs.Arg("host")
			b, _ := host.Bytes()
			if err := w.SetStringBytes(VarScopeTransaction, "host", b); err != nil {
				return err
			}
			if err := w.SetBool(VarScopeTransaction, "ok", true); err != nil {
				return err
			}
		}
	}
	return nil
})

// simpleHandler answers both workloads with the simple API.
var simpleHandler = MessageHandler(func(messages []Message) ([]Action, error) {
	actions := make([]Action, 0, 3)
	for _, m := range messages {
		actions = append(actions, ActionSetVar{Name: "score", Scope: VarScopeSession, Value: 100})
		if m.Name == "heavy" {
			actions = append(actions,
				ActionSetVar{Name: "host", Scope: VarScopeTransaction, Value: m.Args["host"]},
				ActionSetVar{Name: "ok", Scope: VarScopeTransaction, Value: true})
		}
	}
	return actions, nil
})

// loadPeer is a minimal HAProxy side for benchmarks: precomputed NOTIFY
// frames, ACKs read into a fixed buffer. It allocates nothing per request,
// so that allocation counts are the agent's.
type loadPeer struct {
	nc    net.Conn
	batch []byte // inflight NOTIFY frames, stream-ids 1..inflight
	rbuf  []byte
	r, w  int
}

func newLoadPeer(t testing.TB, a *Agent, msg ClientMessage, inflight int) *loadPeer {
	t.Helper()
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	a.Logger = quiet
	p := &loadPeer{nc: dialRaw(t, startAgent(t, a)).nc, rbuf: make([]byte, 1<<16)}
	hello := rawFrame(frameHAProxyHello, flagFin, 0, 0, helloPayload(
		"supported-versions", "2.0", "max-frame-size", uint32(16380), "capabilities", "pipelining", "engine-id", "bench"))
	_, err := p.nc.Write(hello)
	require.NoError(t, err)
	f, err := p.next()
	require.NoError(t, err)
	require.Equal(t, frameAgentHello, f.typ)
	payload, err := appendMessages(nil, []ClientMessage{msg})
	require.NoError(t, err)
	for sid := 1; sid <= inflight; sid++ {
		p.batch = append(p.batch, rawFrame(frameNotify, flagFin, uint64(sid), 1, payload)...)
	}
	return p
}

// next returns the next frame from the agent.
func (p *loadPeer) next() (frame, error) {
	for {
		if p.w-p.r >= lengthSize {
			n := int(binary.BigEndian.Uint32(p.rbuf[p.r:]))
			if p.w-p.r >= lengthSize+n {
				b := p.rbuf[p.r+lengthSize : p.r+lengthSize+n]
				p.r += lengthSize + n
				return parseFrame(b)
			}
		}
		if p.r > 0 {
			p.w = copy(p.rbuf, p.rbuf[p.r:p.w])
			p.r = 0
		}
		n, err := p.nc.Read(p.rbuf[p.w:])
		if err != nil {
			return frame{}, err
		}
		p.w += n
	}
}

// BenchmarkRoundTrip measures NOTIFY -> handler -> ACK over loopback, with
// 1 and 32 NOTIFYs in flight on one connection, for both APIs. One op is
// one request; allocations are the whole process's (the peer allocates
// none).
func BenchmarkRoundTrip(b *testing.B) {
	for _, api := range []struct {
		name    string
		handler Handler
	}{{"fast", fastHandler}, {"simple", simpleHandler}} {
		for _, msg := range []ClientMessage{ipRepMessage, heavyMessage} {
			for _, inflight := range []int{1, 32} {
				b.Run(api.name+"/"+msg.Name+"/inflight"+strconv.Itoa(inflight), func(b *testing.B) {
					p := newLoadPeer(b, &Agent{Handler: api.handler}, msg, inflight)
					b.ReportAllocs()
					b.ResetTimer()
					for i := 0; i < b.N; i += inflight {
						if err := p.roundTripN(inflight); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}

// roundTripN sends the batch of n NOTIFYs and reads their n ACKs.
func (p *loadPeer) roundTripN(n int) error {
	if _, err := p.nc.Write(p.batch); err != nil {
		return err
	}
	for ; n > 0; n-- {
		f, err := p.next()
		if err != nil {
			return err
		}
		if f.typ != frameAck {
			return io.ErrUnexpectedEOF
		}
	}
	return nil
}
