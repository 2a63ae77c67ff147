// Command spoe-bench is a load generator for SPOE agents: it speaks SPOP to
// an agent as HAProxy does (HAPROXY-HELLO, NOTIFY frames, HAPROXY-DISCONNECT
// at the end) with no HAProxy in between, so that what it measures is the
// agent's cost alone.
//
//	go build -o /tmp/spoe-bench ./cmd/spoe-bench
//	/tmp/spoe-bench -addr 127.0.0.1:12345 -conns 4 -inflight 32 -workload ip-rep -agent-pid PID
//
// Each connection keeps -inflight NOTIFY frames in flight (pipelined: sent
// without waiting for the ACKs of the others; -pipelining=false announces no
// pipelining to the agent and needs -inflight 1) and sends a new one as soon
// as an ACK comes. Every ACK is decoded and checked against the request it
// answers (its ids, its flags, its actions); a wrong one is an error, not a
// request. The workloads and the answers they expect are described in
// workload.go: ip-rep (one address), heavy (8 arguments, three variables
// back, one echoing an argument) and mixed (ip-rep's answer, but the agent
// waits delay-ms milliseconds for the fraction -slow-fraction of requests).
//
// It prints requests/s, latency percentiles (for mixed, those of the fast
// requests too), errors by kind, its own CPU and, given the agent's PID, the
// agent's CPU per request read from /proc. The last line, starting with
// RESULT, is the same as key=value pairs for scripts. It exits with status 2
// when any error was seen or no request was answered.
//
// spoe-bench writes its frames with its own small SPOP codec, not the spoe
// library's, so that a bug in the library's codec cannot hide behind the
// same bug in the checker.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func realMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("spoe-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:12345", "the agent's `address`: host:port, or unix:PATH for a unix socket")
	conns := fs.Int("conns", 4, "connections")
	inflight := fs.Int("inflight", 32, "NOTIFY frames in flight per connection")
	pipelining := fs.Bool("pipelining", true, "announce pipelining (and async, as HAProxy 2.6 to 3.0 do); false needs -inflight 1")
	name := fs.String("workload", "ip-rep", "ip-rep, heavy or mixed")
	slowFraction := fs.Float64("slow-fraction", 0.01, "mixed: the fraction of requests the agent must delay")
	slowDelay := fs.Duration("slow-delay", 20*time.Millisecond, "mixed: how long the agent delays them (whole milliseconds)")
	warmup := fs.Duration("warmup", 2*time.Second, "load before measuring")
	duration := fs.Duration("duration", 10*time.Second, "measurement window")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the handshake, and for the last ACKs after the window")
	agentPID := fs.Int("agent-pid", 0, "the agent's `PID`: report its CPU per request from /proc")
	if err := fs.Parse(args); err != nil {
		return 1
	}
	w, err := newWorkload(*name)
	if err != nil {
		fmt.Fprintln(stderr, "spoe-bench:", err)
		return 1
	}
	cfg := &config{
		addr: *addr, conns: *conns, inflight: *inflight, pipelining: *pipelining,
		workload: w, warmup: *warmup, duration: *duration, timeout: *timeout,
	}
	if w.name == "mixed" {
		cfg.slowFraction, cfg.slowDelay = *slowFraction, *slowDelay
	}
	switch {
	case cfg.conns < 1 || cfg.inflight < 1:
		fmt.Fprintln(stderr, "spoe-bench: -conns and -inflight must be at least 1")
		return 1
	case !cfg.pipelining && cfg.inflight != 1:
		fmt.Fprintln(stderr, "spoe-bench: without pipelining, one NOTIFY at a time: -inflight 1")
		return 1
	case cfg.duration <= 0:
		fmt.Fprintln(stderr, "spoe-bench: -duration must be positive")
		return 1
	}
	rep, err := run(cfg, *agentPID)
	if err != nil {
		fmt.Fprintln(stderr, "spoe-bench:", err)
		return 1
	}
	rep.print(stdout)
	if rep.errors() > 0 || rep.res.requests == 0 {
		return 2
	}
	return 0
}

// report is the outcome of a run.
type report struct {
	cfg       *config
	res       result
	self      cpuTimes
	agent     cpuTimes
	hasAgent  bool
	agentErr  error
	measured  time.Duration
	connected int
}

func (r *report) errors() uint64 {
	var n uint64
	for _, e := range r.res.errors {
		n += e
	}
	return n
}

// run connects, drives the load and gathers the connections' results.
func run(cfg *config, agentPID int) (*report, error) {
	rep := &report{cfg: cfg, hasAgent: agentPID > 0}
	clients := make([]*client, cfg.conns)
	for i := range clients {
		nc, err := dial(cfg.addr)
		if err != nil {
			for _, c := range clients[:i] {
				c.nc.Close()
			}
			return nil, err
		}
		clients[i] = &client{cfg: cfg, nc: nc}
	}
	rep.connected = len(clients)
	epoch := time.Now()
	var wg sync.WaitGroup
	for i, c := range clients {
		c.epoch, c.from, c.until = epoch, cfg.warmup, cfg.warmup+cfg.duration
		wg.Add(1)
		go func(i int, c *client) {
			defer wg.Done()
			c.run(i)
		}(i, c)
	}

	// CPU times at the edges of the measurement window.
	var self0, agent0 cpuTimes
	time.Sleep(time.Until(epoch.Add(cfg.warmup)))
	start := time.Now()
	self0 = selfCPU()
	if rep.hasAgent {
		agent0, rep.agentErr = processCPU(agentPID)
	}
	time.Sleep(time.Until(epoch.Add(cfg.warmup + cfg.duration)))
	rep.measured = time.Since(start)
	rep.self = selfCPU().sub(self0)
	if rep.hasAgent && rep.agentErr == nil {
		var agent1 cpuTimes
		agent1, rep.agentErr = processCPU(agentPID)
		rep.agent = agent1.sub(agent0)
	}
	wg.Wait()
	for _, c := range clients {
		rep.res.merge(&c.res)
	}
	return rep, nil
}

// rps is the rate of answered requests: those whose ACK came inside the
// measurement window, over its length.
func (r *report) rps() float64 { return float64(r.res.requests) / r.cfg.duration.Seconds() }

// perRequest is the CPU time d, spent over the sampling interval, per
// request in microseconds. The CPU times are sampled by a goroutine that
// may wake late on a busy CPU, so both are taken as rates: CPU seconds per
// second of the sampling interval, over requests per second of the window.
func (r *report) perRequest(d time.Duration) float64 {
	if r.res.requests == 0 || r.measured <= 0 {
		return 0
	}
	return d.Seconds() / r.measured.Seconds() / r.rps() * 1e6
}

func us(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e3) }

func (r *report) print(w io.Writer) {
	cfg, res := r.cfg, &r.res
	mode := "pipelined"
	if !cfg.pipelining {
		mode = "no pipelining"
	}
	fmt.Fprintf(w, "workload %s, %d connections x %d in flight, %s, %v measured after %v\n",
		cfg.workload.name, cfg.conns, cfg.inflight, mode, cfg.duration, cfg.warmup)
	if cfg.workload.name == "mixed" {
		fmt.Fprintf(w, "slow requests: %.4g%% delayed %v by the agent\n", 100*cfg.slowFraction, cfg.slowDelay)
	}
	fmt.Fprintf(w, "requests   %d, %.0f/s\n", res.requests, r.rps())
	fmt.Fprintf(w, "latency    p50 %s µs, p99 %s µs, p99.9 %s µs, max %s µs\n",
		us(res.all.percentile(0.5)), us(res.all.percentile(0.99)), us(res.all.percentile(0.999)), us(time.Duration(res.all.max)))
	if cfg.workload.name == "mixed" {
		fmt.Fprintf(w, "fast ones  %d: p50 %s µs, p99 %s µs, p99.9 %s µs, max %s µs\n", res.fast.n,
			us(res.fast.percentile(0.5)), us(res.fast.percentile(0.99)), us(res.fast.percentile(0.999)), us(time.Duration(res.fast.max)))
		fmt.Fprintf(w, "slow ones  %d: p50 %s µs, max %s µs\n", res.slowH.n, us(res.slowH.percentile(0.5)), us(time.Duration(res.slowH.max)))
	}
	var errs []string
	for i, n := range res.errors {
		if n > 0 {
			errs = append(errs, fmt.Sprintf("%s %d", errorNames[i], n))
		}
	}
	if len(errs) == 0 {
		fmt.Fprintln(w, "errors     0")
	} else {
		fmt.Fprintf(w, "errors     %s; first: %s\n", strings.Join(errs, ", "), res.firstErr)
	}
	fmt.Fprintf(w, "bench CPU  %.2f µs/request (user %v, sys %v)\n",
		r.perRequest(r.self.user+r.self.sys), r.self.user, r.self.sys)
	agentCPU := "-"
	if r.hasAgent {
		if r.agentErr != nil {
			fmt.Fprintf(w, "agent CPU  unknown: %v\n", r.agentErr)
		} else {
			agentCPU = fmt.Sprintf("%.3f", r.perRequest(r.agent.user+r.agent.sys))
			fmt.Fprintf(w, "agent CPU  %s µs/request (user %v, sys %v over %v)\n",
				agentCPU, r.agent.user, r.agent.sys, r.measured.Round(time.Millisecond))
		}
	}
	fmt.Fprintf(w, "RESULT workload=%s conns=%d inflight=%d pipelining=%t requests=%d rps=%.0f p50_us=%s p99_us=%s p999_us=%s",
		cfg.workload.name, cfg.conns, cfg.inflight, cfg.pipelining, res.requests, r.rps(),
		us(res.all.percentile(0.5)), us(res.all.percentile(0.99)), us(res.all.percentile(0.999)))
	if cfg.workload.name == "mixed" {
		fmt.Fprintf(w, " fast_p50_us=%s fast_p99_us=%s fast_p999_us=%s slow=%d",
			us(res.fast.percentile(0.5)), us(res.fast.percentile(0.99)), us(res.fast.percentile(0.999)), res.slow)
	}
	fmt.Fprintf(w, " errors=%d agent_cpu_us=%s\n", r.errors(), agentCPU)
}
