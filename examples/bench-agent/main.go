// Command bench-agent is an SPOE agent on the zero-copy path that serves
// the load contract of spopload (../shared/tools/spopload):
//
//   - message "ip-rep" (arg ip): set-var sess.score = 100;
//   - message "heavy" (8 args): set-var sess.score = 100, txn.host = the
//     host argument, txn.ok = true.
//
// It listens on 127.0.0.1:PORT and exits on SIGTERM or SIGINT, after
// writing the CPU profile asked for with -cpuprofile.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spoe-go/spoe"
)

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
		}
	}
	return nil
}

func main() {
	port := flag.Int("port", 12345, "serve SPOP on 127.0.0.1:`PORT`")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile to `FILE` until SIGTERM")
	flag.Parse()

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

	log := logrus.New()
	log.SetOutput(io.Discard)
	agent := &spoe.Agent{Handler: spoe.HandlerFunc(handle), Logger: log}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-agent:", err)
		os.Exit(1)
	}
	go func() { _ = agent.Serve(l) }()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if agent.Shutdown(ctx) != nil {
		_ = agent.Close()
	}
}
