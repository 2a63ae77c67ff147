// Command seed is the example program of the spoe design card, verbatim
// but for the import path. TestE2ESeed builds and runs it against HAProxy.
package main

import (
	"fmt"
	"log"
	"net"

	"github.com/spoe-go/spoe"
)

func main() {
	agent := spoe.New(func(messages []spoe.Message) ([]spoe.Action, error) {
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
		return []spoe.Action{
			spoe.ActionSetVar{Name: "reputation", Scope: spoe.VarScopeSession, Value: reputation},
		}, nil
	})
	if err := agent.ListenAndServe(":9000"); err != nil {
		log.Fatal(err)
	}
}
