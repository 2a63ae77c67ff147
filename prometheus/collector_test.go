package spoeprom_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sirupsen/logrus"

	"github.com/spoe-go/spoe"
	spoeprom "github.com/spoe-go/spoe/prometheus"
)

// startAgent serves an agent whose handler answers "ok", fails on "fail"
// and panics on "panic", and returns it with a connected Client.
func startAgent(t *testing.T) (*spoe.Agent, *spoe.Client) {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	agent := &spoe.Agent{Logger: log, Handler: spoe.MessageHandler(func(msgs []spoe.Message) ([]spoe.Action, error) {
		switch msgs[0].Name {
		case "fail":
			return nil, errors.New("failed")
		case "panic":
			panic("handler panic")
		}
		return []spoe.Action{spoe.ActionSetVar{Scope: spoe.VarScopeTransaction, Name: "ok", Value: true}}, nil
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- agent.Serve(l) }()
	t.Cleanup(func() {
		agent.Close()
		<-served
	})
	c, err := spoe.Dial(context.Background(), "tcp", l.Addr().String(), spoe.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return agent, c
}

func TestCollector(t *testing.T) {
	agent, c := startAgent(t)
	for _, name := range []string{"ok", "fail", "panic"} {
		if _, err := c.Notify(context.Background(), spoe.ClientMessage{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	c.Close() // HAPROXY-DISCONNECT, answered with AGENT-DISCONNECT
	deadline := time.Now().Add(5 * time.Second)
	for st := agent.Stats(); st.ConnsOpen != 0 || st.FramesOut.AgentDisconnect == 0; st = agent.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("the connection is still open: %+v", st)
		}
		time.Sleep(5 * time.Millisecond) // polling, not synchronisation
	}

	coll := spoeprom.NewCollector(agent)
	const want = `
# HELP spoe_connections_open SPOP connections open now.
# TYPE spoe_connections_open gauge
spoe_connections_open 0
# HELP spoe_connections_total SPOP connections accepted.
# TYPE spoe_connections_total counter
spoe_connections_total 1
# HELP spoe_frames_received_total Frames received from HAProxy, by type.
# TYPE spoe_frames_received_total counter
spoe_frames_received_total{type="haproxy_disconnect"} 1
spoe_frames_received_total{type="haproxy_hello"} 1
spoe_frames_received_total{type="notify"} 3
spoe_frames_received_total{type="other"} 0
spoe_frames_received_total{type="unset"} 0
# HELP spoe_frames_sent_total Frames sent to HAProxy, by type.
# TYPE spoe_frames_sent_total counter
spoe_frames_sent_total{type="ack"} 3
spoe_frames_sent_total{type="agent_disconnect"} 1
spoe_frames_sent_total{type="agent_hello"} 1
# HELP spoe_handler_errors_total Handler calls that returned an error.
# TYPE spoe_handler_errors_total counter
spoe_handler_errors_total 1
# HELP spoe_handler_panics_total Handler calls that panicked.
# TYPE spoe_handler_panics_total counter
spoe_handler_panics_total 1
# HELP spoe_in_flight NOTIFY frames being handled now.
# TYPE spoe_in_flight gauge
spoe_in_flight 0
# HELP spoe_buffer_bytes Bytes held now in the buffers that MaxBufferBytes bounds.
# TYPE spoe_buffer_bytes gauge
spoe_buffer_bytes 0
# HELP spoe_buffer_waiting Readers and decodings waiting now for MaxBufferBytes.
# TYPE spoe_buffer_waiting gauge
spoe_buffer_waiting 0
# HELP spoe_disconnects_received_total HAProxy's DISCONNECT frames, by status code.
# TYPE spoe_disconnects_received_total counter
spoe_disconnects_received_total{status="0"} 1
# HELP spoe_disconnects_sent_total The agent's DISCONNECT frames, by status code.
# TYPE spoe_disconnects_sent_total counter
spoe_disconnects_sent_total{status="0"} 1
# HELP spoe_protocol_errors_total Connections closed for a protocol error.
# TYPE spoe_protocol_errors_total counter
spoe_protocol_errors_total 0
`
	if err := testutil.CollectAndCompare(coll, strings.NewReader(want),
		"spoe_connections_open", "spoe_connections_total", "spoe_frames_received_total", "spoe_frames_sent_total",
		"spoe_handler_errors_total", "spoe_handler_panics_total", "spoe_in_flight", "spoe_buffer_bytes", "spoe_buffer_waiting",
		"spoe_disconnects_received_total", "spoe_disconnects_sent_total", "spoe_protocol_errors_total"); err != nil {
		t.Error(err)
	}

	// By message name: each of the three names has its counters.
	const wantMessages = `
# HELP spoe_message_errors_total NOTIFY frames with the message whose handler returned an error, by name.
# TYPE spoe_message_errors_total counter
spoe_message_errors_total{message="fail"} 1
spoe_message_errors_total{message="ok"} 0
spoe_message_errors_total{message="panic"} 0
# HELP spoe_message_panics_total NOTIFY frames with the message whose handler panicked, by name.
# TYPE spoe_message_panics_total counter
spoe_message_panics_total{message="fail"} 0
spoe_message_panics_total{message="ok"} 0
spoe_message_panics_total{message="panic"} 1
# HELP spoe_message_requests_total Messages received, by name.
# TYPE spoe_message_requests_total counter
spoe_message_requests_total{message="fail"} 1
spoe_message_requests_total{message="ok"} 1
spoe_message_requests_total{message="panic"} 1
`
	if err := testutil.CollectAndCompare(coll, strings.NewReader(wantMessages),
		"spoe_message_requests_total", "spoe_message_errors_total", "spoe_message_panics_total"); err != nil {
		t.Error(err)
	}

	// Every metric is there, once, and passes the Prometheus linter: 26,
	// and 4 per message name.
	if n := testutil.CollectAndCount(coll); n != 26+3*4 {
		t.Errorf("%d metrics collected, want %d", n, 26+3*4)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(coll)
	problems, err := testutil.GatherAndLint(reg)
	if err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}

	// The histogram holds the sampled handler calls, cumulated.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sampled uint64
	for _, b := range agent.Stats().HandlerLatency {
		sampled += b.Count
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() != "spoe_handler_duration_seconds" {
			continue
		}
		found = true
		h := mf.GetMetric()[0].GetHistogram()
		if h.GetSampleCount() != sampled || sampled == 0 {
			t.Errorf("histogram count %d, want %d (non-zero)", h.GetSampleCount(), sampled)
		}
		prev := uint64(0)
		for _, b := range h.GetBucket() {
			if b.GetCumulativeCount() < prev || b.GetCumulativeCount() > sampled {
				t.Errorf("bucket le=%g: %d after %d", b.GetUpperBound(), b.GetCumulativeCount(), prev)
			}
			prev = b.GetCumulativeCount()
		}
		if len(h.GetBucket()) != 23 || h.GetBucket()[0].GetUpperBound() != 1e-6 {
			t.Errorf("%d buckets from %g, want 23 from 1µs", len(h.GetBucket()), h.GetBucket()[0].GetUpperBound())
		}
	}
	if !found {
		t.Error("no spoe_handler_duration_seconds")
	}

	// By message: "ok", the connection's first call, was the one timed.
	byMessage := map[string]uint64{}
	for _, mf := range mfs {
		if mf.GetName() != "spoe_message_handler_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			byMessage[m.GetLabel()[0].GetValue()] = m.GetHistogram().GetSampleCount()
		}
	}
	if want := map[string]uint64{"ok": sampled, "fail": 0, "panic": 0}; fmt.Sprint(byMessage) != fmt.Sprint(want) {
		t.Errorf("message histograms' counts %v, want %v", byMessage, want)
	}
}

func TestCollectorOptions(t *testing.T) {
	agent, c := startAgent(t)
	defer c.Close()
	coll := spoeprom.NewCollector(agent, spoeprom.WithNamespace("iprep"), spoeprom.WithConstLabels(prometheus.Labels{"agent": "a1"}))
	const want = `
# HELP iprep_connections_total SPOP connections accepted.
# TYPE iprep_connections_total counter
iprep_connections_total{agent="a1"} 1
`
	if err := testutil.CollectAndCompare(coll, strings.NewReader(want), "iprep_connections_total"); err != nil {
		t.Error(err)
	}
	// Two agents, told apart by their labels, in one registry.
	other, c2 := startAgent(t)
	defer c2.Close()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(coll)
	if err := reg.Register(spoeprom.NewCollector(other, spoeprom.WithNamespace("iprep"), spoeprom.WithConstLabels(prometheus.Labels{"agent": "a2"}))); err != nil {
		t.Fatalf("a second agent with other labels: %v", err)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}
