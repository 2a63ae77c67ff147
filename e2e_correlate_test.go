package spoe_test

// Correlating the request and the response of one HTTP transaction, as the
// README shows: HAProxy's unique-id sent in both messages, and a
// transaction variable the agent set on the request sent back with the
// response.

import (
	"fmt"
	"net/http"
	"sync"
	"testing"

	"github.com/spoe-go/spoe"
)

func TestE2ECorrelateTransaction(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		var mu sync.Mutex
		requests := map[string]string{} // unique-id -> path, kept by the agent between the two events
		var router spoe.Router
		router.Handle("on-request", spoe.MessageHandler(func(ms []spoe.Message) ([]spoe.Action, error) {
			m := ms[0]
			id, _ := m.ArgString("id")
			path, _ := m.ArgString("path")
			mu.Lock()
			requests[id] = path
			mu.Unlock()
			return []spoe.Action{spoe.ActionSetVar{Name: "token", Scope: spoe.VarScopeTransaction, Value: "t:" + path}}, nil
		}))
		router.Handle("on-response", spoe.MessageHandler(func(ms []spoe.Message) ([]spoe.Action, error) {
			m := ms[0]
			id, _ := m.ArgString("id")
			token, _ := m.ArgString("token")
			mu.Lock()
			path, ok := requests[id]
			delete(requests, id)
			mu.Unlock()
			if !ok {
				return nil, fmt.Errorf("response of unknown transaction %q", id)
			}
			return []spoe.Action{spoe.ActionSetVar{Name: "pair", Scope: spoe.VarScopeTransaction, Value: path + "|" + token}}, nil
		}))
		agent := startAgent(t, &spoe.Agent{Handler: &router})
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       agent.addr,
			AgentDirectives: "messages on-request on-response",
			SpoeSections: `
spoe-message on-request
    args id=unique-id path=path
    event on-frontend-http-request

spoe-message on-response
    args id=unique-id token=var(txn.e2e.token)
    event on-http-response
`,
			Frontend: "unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid\n" +
				"http-after-response set-header x-pair %[var(txn.e2e.pair)]\n" +
				"http-after-response set-header x-error %[var(txn.e2e.error)]",
		})
		c := newClient(t, true) // one connection: unique-id must still tell the requests apart
		for _, path := range []string{"/a", "/b", "/c"} {
			res := get(t, c, h.url+path)
			if res.status != http.StatusOK {
				t.Fatalf("%s: status %d", path, res.status)
			}
			expectHeader(t, res, "x-pair", path+"|t:"+path)
			expectHeader(t, res, "x-error", "")
		}
		mu.Lock()
		defer mu.Unlock()
		if len(requests) != 0 {
			t.Errorf("transactions left without their response: %v", requests)
		}
	})
}
