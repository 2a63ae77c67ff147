// Command ip-reputation is an SPOE agent for HAProxy: for every HTTP request
// HAProxy sends it the client's address (the "ip-rep" message of spoe.conf),
// and the agent answers with a reputation score, from 0 to 1000, that
// HAProxy stores in the session variable sess.iprep.reputation, for its
// rules to use (see haproxy.cfg).
//
//	go run . -addr :9000
//	haproxy -f haproxy.cfg          # from this folder: spoe.conf is a relative path
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"math"
	"net"
	"time"

	"github.com/spoe-go/spoe"
)

func main() {
	addr := flag.String("addr", ":9000", "`address` to serve HAProxy's SPOE connections on: host:port, or unix:///path/to/agent.sock")
	shutdownTimeout := flag.Duration("shutdown-timeout", 10*time.Second, "how long to let running requests finish on SIGINT/SIGTERM")
	flag.Parse()

	agent := spoe.New(handleMessages)
	// Serve until SIGINT or SIGTERM, then stop accepting, let the handlers
	// that are running finish and their answers reach HAProxy, and close;
	// past the timeout, close at once.
	if err := agent.Run(context.Background(), *addr, *shutdownTimeout); err != nil {
		log.Fatal(err)
	}
}

// handleMessages answers one NOTIFY frame: for the "ip-rep" message, it
// looks the client's address up and sets sess.<var-prefix>.reputation.
func handleMessages(messages []spoe.Message) ([]spoe.Action, error) {
	reputation := 0.0
	for _, msg := range messages {
		if msg.Name != "ip-rep" {
			continue
		}
		ip, ok := msg.Args["ip"].(net.IP)
		if !ok {
			return nil, fmt.Errorf("spoe handler: expected ip in message")
		}
		var err error
		if reputation, err = getReputation(ip); err != nil {
			return nil, fmt.Errorf("spoe handler: error processing request: %s", err)
		}
	}
	// HAProxy has no decimal numbers (a float64 would reach it as the
	// string "0.75", which its rules can only match as text): the score
	// travels as an integer in thousandths, 750, that haproxy.cfg compares
	// with "-m int". A returned error makes the agent set txn.iprep.error
	// instead.
	return []spoe.Action{
		spoe.ActionSetVar{Name: "reputation", Scope: spoe.VarScopeSession, Value: int64(math.Round(reputation * 1000))},
	}, nil
}

// getReputation returns a score from 0 (hostile) to 1 (trusted).
//
// This stub trusts loopback addresses a little more than the rest. A real
// agent looks the address up here: a local blocklist or GeoIP database, a
// cache in front of a reputation service... Keep it fast: HAProxy holds the
// request until the answer comes, at most "timeout processing" (spoe.conf).
func getReputation(ip net.IP) (float64, error) {
	if ip.IsLoopback() {
		return 0.75, nil
	}
	return 0.5, nil
}
