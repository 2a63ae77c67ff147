// Package spoeprom exports the counters of a spoe.Agent to Prometheus. It
// is a module of its own (github.com/spoe-go/spoe/prometheus), so that the
// spoe library does not depend on the Prometheus client:
//
//	import spoeprom "github.com/spoe-go/spoe/prometheus"
//
//	prometheus.MustRegister(spoeprom.NewCollector(agent))
//	http.Handle("/metrics", promhttp.Handler())
//
// The collector reads Agent.Stats on each scrape; it costs nothing between
// scrapes. Metric names start with "spoe_" (WithNamespace changes it); to
// export several agents from one process, give each collector its own
// labels with WithConstLabels.
package spoeprom

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spoe-go/spoe"
)

// Collector is a prometheus.Collector of one agent's Stats.
type Collector struct {
	agent *spoe.Agent

	connsOpen, connsTotal         *prometheus.Desc
	framesIn, framesOut, writes   *prometheus.Desc
	healthchecks, inFlight        *prometheus.Desc
	bufferBytes, bufferWaiting    *prometheus.Desc
	handlerErrors, handlerPanics  *prometheus.Desc
	actionsRefused                *prometheus.Desc
	acksDropped, acksRerouted     *prometheus.Desc
	rescues, protocolErrors       *prometheus.Desc
	notifyTooBig                  *prometheus.Desc
	disconnectsIn, disconnectsOut *prometheus.Desc
	handlerSeconds                *prometheus.Desc

	messageRequests, messageErrors *prometheus.Desc
	messagePanics, messageSeconds  *prometheus.Desc
}

// Option changes how NewCollector names and labels the metrics.
type Option func(*options)

type options struct {
	namespace string
	labels    prometheus.Labels
}

// WithNamespace sets the prefix of the metric names: "spoe" by default,
// hence spoe_connections_open.
func WithNamespace(namespace string) Option {
	return func(o *options) { o.namespace = namespace }
}

// WithConstLabels adds labels with fixed values to every metric, e.g.
// {"agent": "ip-reputation"} when a process serves several agents.
func WithConstLabels(labels prometheus.Labels) Option {
	return func(o *options) { o.labels = labels }
}

// NewCollector returns a collector of agent's Stats. Register it once:
//
//	prometheus.MustRegister(spoeprom.NewCollector(agent))
//
// Metrics (all counters are totals since the agent was created):
//
//	spoe_connections_open                    gauge
//	spoe_connections_total                   counter
//	spoe_frames_received_total{type}         counter: haproxy_hello, notify, haproxy_disconnect, unset, other
//	spoe_frames_sent_total{type}             counter: agent_hello, ack, agent_disconnect
//	spoe_writes_total                        counter: write calls (frames sent together share one)
//	spoe_healthchecks_total                  counter
//	spoe_in_flight                           gauge: NOTIFY frames being handled
//	spoe_buffer_bytes                        gauge: bytes held in the buffers spoe.Agent.MaxBufferBytes bounds
//	spoe_buffer_waiting                      gauge: readers and decodings waiting for that budget
//	spoe_handler_errors_total                counter
//	spoe_handler_panics_total                counter
//	spoe_actions_refused_total               counter: actions left out of an ACK
//	spoe_acks_dropped_total                  counter
//	spoe_acks_rerouted_total                 counter
//	spoe_handler_rescues_total               counter
//	spoe_protocol_errors_total               counter
//	spoe_notify_too_big_total                counter
//	spoe_disconnects_received_total{status}  counter: HAProxy's DISCONNECT frames by status code
//	spoe_disconnects_sent_total{status}      counter: the agent's
//	spoe_handler_duration_seconds            histogram, sampled (see spoe.Stats.HandlerLatency)
//	spoe_message_requests_total{message}     counter: messages received, by name
//	spoe_message_errors_total{message}       counter: frames with the message whose handler failed
//	spoe_message_panics_total{message}       counter: frames with the message whose handler panicked
//	spoe_message_handler_duration_seconds{message}  histogram, sampled
//
// The message label takes at most spoe.MaxStatsMessages values, plus
// spoe.OtherMessages for the names seen after them (see spoe.Stats.Messages).
func NewCollector(agent *spoe.Agent, opts ...Option) *Collector {
	o := options{namespace: "spoe"}
	for _, opt := range opts {
		opt(&o)
	}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(o.namespace, "", name), help, labels, o.labels)
	}
	return &Collector{
		agent:          agent,
		connsOpen:      desc("connections_open", "SPOP connections open now."),
		connsTotal:     desc("connections_total", "SPOP connections accepted."),
		framesIn:       desc("frames_received_total", "Frames received from HAProxy, by type.", "type"),
		framesOut:      desc("frames_sent_total", "Frames sent to HAProxy, by type.", "type"),
		writes:         desc("writes_total", "Write calls; frames sent together share one."),
		healthchecks:   desc("healthchecks_total", "Health-check HELLOs answered."),
		inFlight:       desc("in_flight", "NOTIFY frames being handled now."),
		bufferBytes:    desc("buffer_bytes", "Bytes held now in the buffers that MaxBufferBytes bounds."),
		bufferWaiting:  desc("buffer_waiting", "Readers and decodings waiting now for MaxBufferBytes."),
		handlerErrors:  desc("handler_errors_total", "Handler calls that returned an error."),
		handlerPanics:  desc("handler_panics_total", "Handler calls that panicked."),
		actionsRefused: desc("actions_refused_total", "Actions left out of an ACK: bad name, bad value or too big."),
		acksDropped:    desc("acks_dropped_total", "ACKs that found no connection to leave on."),
		acksRerouted:   desc("acks_rerouted_total", "ACKs sent on another connection of their HAProxy engine."),
		rescues:        desc("handler_rescues_total", "Handler calls that outlasted the inline budget."),
		protocolErrors: desc("protocol_errors_total", "Connections closed for a protocol error."),
		notifyTooBig:   desc("notify_too_big_total", "Fragmented NOTIFY frames aborted for their size."),
		disconnectsIn:  desc("disconnects_received_total", "HAProxy's DISCONNECT frames, by status code.", "status"),
		disconnectsOut: desc("disconnects_sent_total", "The agent's DISCONNECT frames, by status code.", "status"),
		handlerSeconds: desc("handler_duration_seconds", "Handler latency, sampled: one call in 8 is timed and counted 8 times."),

		messageRequests: desc("message_requests_total", "Messages received, by name.", "message"),
		messageErrors:   desc("message_errors_total", "NOTIFY frames with the message whose handler returned an error, by name.", "message"),
		messagePanics:   desc("message_panics_total", "NOTIFY frames with the message whose handler panicked, by name.", "message"),
		messageSeconds:  desc("message_handler_duration_seconds", "Handler latency of the NOTIFY frames with the message, by name, sampled as handler_duration_seconds.", "message"),
	}
}

// Describe sends the descriptions of every metric.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.connsOpen, c.connsTotal, c.framesIn, c.framesOut, c.writes, c.healthchecks, c.inFlight,
		c.bufferBytes, c.bufferWaiting,
		c.handlerErrors, c.handlerPanics, c.actionsRefused, c.acksDropped, c.acksRerouted, c.rescues,
		c.protocolErrors, c.notifyTooBig, c.disconnectsIn, c.disconnectsOut, c.handlerSeconds,
		c.messageRequests, c.messageErrors, c.messagePanics, c.messageSeconds,
	} {
		ch <- d
	}
}

// Collect reads the agent's Stats and sends them as metrics.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.agent.Stats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(c.connsOpen, float64(st.ConnsOpen))
	counter(c.connsTotal, st.ConnsTotal)
	counter(c.framesIn, st.FramesIn.HAProxyHello, "haproxy_hello")
	counter(c.framesIn, st.FramesIn.Notify, "notify")
	counter(c.framesIn, st.FramesIn.HAProxyDisconnect, "haproxy_disconnect")
	counter(c.framesIn, st.FramesIn.Unset, "unset")
	counter(c.framesIn, st.FramesIn.Other, "other")
	counter(c.framesOut, st.FramesOut.AgentHello, "agent_hello")
	counter(c.framesOut, st.FramesOut.ACK, "ack")
	counter(c.framesOut, st.FramesOut.AgentDisconnect, "agent_disconnect")
	counter(c.writes, st.Writes)
	counter(c.healthchecks, st.Healthchecks)
	gauge(c.inFlight, float64(st.InFlight))
	gauge(c.bufferBytes, float64(st.BufferBytes))
	gauge(c.bufferWaiting, float64(st.BufferWaiting))
	counter(c.handlerErrors, st.HandlerErrors)
	counter(c.handlerPanics, st.HandlerPanics)
	counter(c.actionsRefused, st.ActionsRefused)
	counter(c.acksDropped, st.ACKsDropped)
	counter(c.acksRerouted, st.ACKsRerouted)
	counter(c.rescues, st.Rescues)
	counter(c.protocolErrors, st.ProtocolErrors)
	counter(c.notifyTooBig, st.NotifyTooBig)
	for status, n := range st.DisconnectsIn {
		counter(c.disconnectsIn, n, strconv.FormatUint(uint64(status), 10))
	}
	for status, n := range st.DisconnectsOut {
		counter(c.disconnectsOut, n, strconv.FormatUint(uint64(status), 10))
	}

	histogram(ch, c.handlerSeconds, st.HandlerLatency, st.HandlerTime)
	for name, m := range st.Messages {
		counter(c.messageRequests, m.Requests, name)
		counter(c.messageErrors, m.Errors, name)
		counter(c.messagePanics, m.Panics, name)
		histogram(ch, c.messageSeconds, m.HandlerLatency, m.HandlerTime, name)
	}
}

// histogram sends a latency histogram. spoe.Stats buckets are not
// cumulative; Prometheus' are. The last one, with no bound, is +Inf: only
// in the count.
func histogram(ch chan<- prometheus.Metric, d *prometheus.Desc, latency []spoe.LatencyBucket, sum time.Duration, labels ...string) {
	buckets := make(map[float64]uint64, len(latency))
	var count uint64
	for _, b := range latency {
		count += b.Count
		if b.UpperBound > 0 {
			buckets[b.UpperBound.Seconds()] = count
		}
	}
	ch <- prometheus.MustNewConstHistogram(d, count, sum.Seconds(), buckets, labels...)
}
