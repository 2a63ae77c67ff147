// Command bench-agent is the SPOE agent the README's performance figures
// are measured on. It serves the contract of cmd/spoe-bench (and of the
// spopload tool in ../shared/tools/spopload, which shares it):
//
//   - message "ip-rep" (arg ip): set-var sess.score = 100;
//   - message "heavy" (8 args): set-var sess.score = 100, txn.host = the
//     host argument, txn.ok = true;
//   - message "mixed" (args ip, delay-ms): wait delay-ms milliseconds, then
//     set-var sess.score = 100.
//
// -api fast (the default) answers on the zero-copy path (a Handler),
// -api simple with the simple API (a MessageHandler, the seed program's
// signature). It listens on 127.0.0.1:PORT and exits on SIGTERM or SIGINT,
// after writing the CPU profile asked for with -cpuprofile.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spoe-go/spoe"
)

// handle answers on the zero-copy path.
func handle(w *spoe.ActionWriter, r *spoe.Request) error {
	for msgs := r.Messages(); msgs.Next(); {
		switch {
		case msgs.NameIs("ip-rep"):
			if err := w.SetInt(spoe.VarScopeSession, "score", 100); err != nil {
				return err
			}
		case msgs.NameIs("heavy"):
			if err := w.SetInt(spoe.VarScopeSession, "score", 100); err != nil {
				return err
			}
			if host, ok := msgs.Arg("host"); ok {
				b, _ := host.Bytes()
				if err := w.SetStringBytes(spoe.VarScopeTransaction, "host", b); err != nil {
					return err
				}
			}
			if err := w.SetBool(spoe.VarScopeTransaction, "ok", true); err != nil {
				return err
			}
		case msgs.NameIs("mixed"):
			if v, ok := msgs.Arg("delay-ms"); ok {
				if ms, ok := v.Int(); ok && ms > 0 {
					sleep(r.Context(), time.Duration(ms)*time.Millisecond)
				}
			}
			if err := w.SetInt(spoe.VarScopeSession, "score", 100); err != nil {
				return err
			}
		}
	}
	return nil
}

// handleMessages answers with the simple API, as the package's simple
// API benchmarks do (BenchmarkRoundTrip, BenchmarkSeedAPIFloor): one
// []Action with room for the three actions, the host argument passed on
// as it came.
func handleMessages(messages []spoe.Message) ([]spoe.Action, error) {
	actions := make([]spoe.Action, 0, 3)
	for _, msg := range messages {
		switch msg.Name {
		case "ip-rep":
			actions = append(actions, spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: 100})
		case "heavy":
			actions = append(actions,
				spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: 100},
				spoe.ActionSetVar{Name: "host", Scope: spoe.VarScopeTransaction, Value: msg.Args["host"]},
				spoe.ActionSetVar{Name: "ok", Scope: spoe.VarScopeTransaction, Value: true})
		case "mixed":
			if ms, ok := msg.ArgInt("delay-ms"); ok && ms > 0 {
				time.Sleep(time.Duration(ms) * time.Millisecond)
			}
			actions = append(actions, spoe.ActionSetVar{Name: "score", Scope: spoe.VarScopeSession, Value: 100})
		}
	}
	return actions, nil
}

// sleep waits d, or less if ctx ends first (the agent is closing).
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func main() {
	port := flag.Int("port", 12345, "serve SPOP on 127.0.0.1:`PORT`")
	api := flag.String("api", "fast", "fast (zero-copy Handler) or simple (MessageHandler)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile to `FILE` until SIGTERM")
	maxConns := flag.Int("maxconns", 0, "Agent.MaxConns (0: the default, negative: no limit)")
	flag.Parse()

	log := logrus.New()
	log.SetOutput(io.Discard)
	agent := &spoe.Agent{Logger: log, MaxConns: *maxConns}
	switch *api {
	case "fast":
		agent.Handler = spoe.HandlerFunc(handle)
	case "simple":
		agent.Handler = spoe.MessageHandler(handleMessages)
	default:
		fmt.Fprintf(os.Stderr, "bench-agent: -api %q: want fast or simple\n", *api)
		os.Exit(2)
	}

	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-agent:", err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "bench-agent:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}

	if err := agent.Run(context.Background(), fmt.Sprintf("127.0.0.1:%d", *port), time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "bench-agent:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}
