package spoe

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

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
	return dialLoadPeer(t, startAgent(t, a), msg, inflight)
}

// dialLoadPeer connects a loadPeer to the agent at addr.
func dialLoadPeer(t testing.TB, addr string, msg ClientMessage, inflight int) *loadPeer {
	t.Helper()
	p := &loadPeer{nc: dialRaw(t, addr).nc, rbuf: make([]byte, 1<<16)}
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

// Mixed workload: most requests are answered at once, one in slowEvery
// blocks its handler for slowFor. The figures are the fast requests'
// latencies, from the NOTIFY's write to its ACK's read, beside those of the
// same load without slow handlers (slow=none). A slow handler must not hold
// up the fast frames read after it, on its connection or any other.
const slowFor = 20 * time.Millisecond

// mixedFast and mixedSimple answer "slow" after slowFor and the rest as
// fastHandler and simpleHandler do.
var (
	mixedFast = HandlerFunc(func(w *ActionWriter, r *Request) error {
		if _, slow := r.Message("slow"); slow {
			time.Sleep(slowFor)
		}
		return fastHandler(w, r)
	})
	mixedSimple = MessageHandler(func(messages []Message) ([]Action, error) {
		for _, m := range messages {
			if m.Name == "slow" {
				time.Sleep(slowFor)
			}
		}
		return simpleHandler(messages)
	})
)

// BenchmarkMixed reports the fast requests' p50, p99 and p99.9 latencies
// with 4 connections of 32 NOTIFYs in flight and 64 of 1, closed loop, for
// both APIs, with no slow request and with 1%, 0.1% and 0.01% of them
// slow. One op is one request; run with enough of them for the rare mixes,
// e.g. -benchtime=1000000x.
//
// At 64 × 1 a slow request idles its connection for slowFor, so the fast
// requests meet a load of fewer busy connections than with slow=none. The
// pause=X runs give that same load without a slow handler: the client
// itself waits slowFor where it would have sent a slow request. Compared
// with them, the slow=X runs show what the agent's slow handlers cost the
// fast requests, and nothing else.
func BenchmarkMixed(b *testing.B) {
	for _, api := range []struct {
		name    string
		handler Handler
	}{{"fast", mixedFast}, {"simple", mixedSimple}} {
		for _, shape := range [][2]int{{4, 32}, {64, 1}} {
			for _, mix := range []struct {
				name      string
				slowEvery int
				pause     bool
			}{
				{"slow=none", 0, false},
				{"slow=1%", 100, false}, {"slow=0.1%", 1000, false}, {"slow=0.01%", 10000, false},
				{"pause=1%", 100, true}, {"pause=0.1%", 1000, true}, {"pause=0.01%", 10000, true},
			} {
				if mix.pause && shape[1] != 1 {
					continue // a pause holds the whole connection: the same load only one at a time
				}
				name := fmt.Sprintf("%s/%dx%d/%s", api.name, shape[0], shape[1], mix.name)
				b.Run(name, func(b *testing.B) {
					runMixed(b, api.handler, shape[0], shape[1], mix.slowEvery, mix.pause)
				})
			}
		}
	}
}

// runMixed runs the mixed workload; with pause, the client waits slowFor
// instead of sending a slow request (inflight 1 only).
func runMixed(b *testing.B, h Handler, conns, inflight, slowEvery int, pause bool) {
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	addr := startAgent(b, &Agent{Handler: h, Logger: quiet})
	fast, err := appendMessages(nil, []ClientMessage{ipRepMessage})
	require.NoError(b, err)
	slow, err := appendMessages(nil, []ClientMessage{{Name: "slow"}})
	require.NoError(b, err)
	peers := make([]*loadPeer, conns)
	for i := range peers {
		peers[i] = dialLoadPeer(b, addr, ipRepMessage, 0)
	}
	var issued atomic.Int64 // requests sent, over all connections
	total := int64(b.N)
	lats := make([][]time.Duration, conns)
	errs := make(chan error, conns)
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Add(1)
		go func(i int, p *loadPeer) {
			defer wg.Done()
			const ring = 1 << 12 // stream-ids in flight at most: inflight + slow ones
			sent := make([]time.Time, ring)
			isSlow := make([]bool, ring)
			var buf []byte
			var sid uint64
			outstanding := 0
			send := func() error {
				for {
					n := issued.Add(1)
					if n > total {
						return nil
					}
					s := slowEvery > 0 && n%int64(slowEvery) == 0
					if s && pause {
						time.Sleep(slowFor) // the connection idles as a slow handler would idle it
						continue
					}
					sid++
					payload := fast
					if s {
						payload = slow
					}
					buf = appendFrame(buf[:0], frameNotify, flagFin, sid, 1, payload)
					sent[sid%ring], isSlow[sid%ring] = time.Now(), s
					outstanding++
					_, err := p.nc.Write(buf)
					return err
				}
			}
			for j := 0; j < inflight; j++ {
				if err := send(); err != nil {
					errs <- err
					return
				}
			}
			lat := make([]time.Duration, 0, 2*b.N/conns+inflight)
			for outstanding > 0 {
				f, err := p.next()
				if err != nil {
					errs <- err
					return
				}
				d := time.Since(sent[f.streamID%ring])
				outstanding--
				if !isSlow[f.streamID%ring] {
					lat = append(lat, d)
				}
				if err := send(); err != nil {
					errs <- err
					return
				}
			}
			lats[i] = lat
		}(i, p)
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	if len(all) < 1000 {
		return // too few for percentiles (the first, calibrating run)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	at := func(q float64) float64 {
		return float64(all[int(q*float64(len(all)-1))]) / float64(time.Microsecond)
	}
	b.ReportMetric(at(0.50), "p50-µs")
	b.ReportMetric(at(0.99), "p99-µs")
	b.ReportMetric(at(0.999), "p99.9-µs")
}

// floorSink keeps BenchmarkSeedAPIFloor's results alive.
var floorSink []Action

// BenchmarkSeedAPIFloor is the least that the seed program's signature
// costs per NOTIFY beyond the zero-copy path, whatever the decoder: the
// []Message with the boxes of the values (one allocation), a map per
// message (Message.Args: Go's map is two), the bytes the handler may keep
// (one copy of the payload), and the handler's own []Action and boxed
// actions (simpleHandler). It walks no frame, checks nothing and writes no
// ACK, so its ns/op (run with -cpu 1, as compare.sh runs agents) is a
// lower bound on what the simple API adds to the zero-copy path's CPU per
// request.
func BenchmarkSeedAPIFloor(b *testing.B) {
	for _, msg := range []ClientMessage{ipRepMessage, heavyMessage} {
		b.Run(msg.Name, func(b *testing.B) {
			payload, err := appendMessages(nil, []ClientMessage{msg})
			require.NoError(b, err)
			// What each argument is, found once: its type word and
			// length; an integer or bool has no bytes.
			type argShape struct {
				name  string
				typ   unsafe.Pointer
				n     int
				isInt bool
				b     bool
			}
			shapes := make([]argShape, len(msg.Args))
			for i, a := range msg.Args {
				s := argShape{name: a.Name, typ: typeWord(a.Value)}
				switch x := a.Value.(type) {
				case string:
					s.n = len(x)
				case []byte:
					s.n = len(x)
				case net.IP:
					s.n = len(x)
				case int64:
					s.isInt = true
				case bool:
					s.typ, s.b = nil, x
				}
				shapes[i] = s
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				var msgs []Message
				var boxes []valueBox
				if len(shapes) <= 2 {
					one := new(oneMessage2)
					msgs, boxes = one.msg[:], one.boxes[:]
				} else {
					one := new(oneMessage8)
					msgs, boxes = one.msg[:], one.boxes[:]
				}
				var clone []byte
				args := make(map[string]interface{}, len(shapes))
				for j := range shapes {
					s, box := &shapes[j], &boxes[j]
					switch {
					case s.typ == nil:
						args[s.name] = s.b
					case s.isInt:
						box.n = 1234
						args[s.name] = boxed(s.typ, unsafe.Pointer(&box.n))
					default:
						if s.n <= len(box.small) {
							box.p = unsafe.Pointer(&box.small[0])
						} else {
							if clone == nil {
								clone = append([]byte(nil), payload...)
							}
							box.p = unsafe.Pointer(&clone[0])
						}
						box.n, box.c = s.n, s.n
						args[s.name] = boxed(s.typ, unsafe.Pointer(box))
					}
				}
				msgs[0] = Message{Name: msg.Name, Args: args}
				floorSink, _ = simpleHandler(msgs)
			}
		})
	}
}
