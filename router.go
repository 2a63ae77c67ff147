package spoe

import (
	"fmt"
)

// Router is a Handler that sends each message of a NOTIFY to the Handler
// registered for its name, in the manner of http.ServeMux:
//
//	var router spoe.Router
//	router.Handle("ip-rep", spoe.MessageHandler(ipReputation))      // func([]spoe.Message) ([]spoe.Action, error)
//	router.Handle("lookup", spoe.ContextMessageHandler(lookup))     // func(context.Context, []spoe.Message) ([]spoe.Action, error)
//	router.HandleFunc("bot-check", botScore)                        // func(*spoe.ActionWriter, *spoe.Request) error
//	agent := &spoe.Agent{Handler: &router}
//
// The Handler of a route receives a Request that holds only the routed
// message: its Messages yield that message alone, NumMessages is 1, and a
// MessageHandler gets a slice of one. Its Context, ids and ActionWriter are
// those of the whole NOTIFY, so the actions of every route go in one ACK.
//
// Messages are handled in the order of the frame, one after the other; the
// first error stops the frame, whose ACK then carries the error variable
// only (see Agent.ErrorVar). In Stats.Messages, the error or panic of a
// route counts on its message's name only.
//
// A message with no route goes to NotFound; when NotFound is nil it is
// skipped, the other messages of the frame are still handled, and the ACK
// goes as usual: HAProxy sends the messages its configuration names, so an
// unknown one is configuration the agent does not serve (yet).
//
// Register every route before the agent serves: a Router is not safe for
// concurrent registration and use.
type Router struct {
	// NotFound handles the messages no route matches; nil skips them.
	NotFound Handler

	routes map[string]Handler
}

// Handle registers h for the messages called name. It panics if name is
// empty or already registered, or if h is nil.
func (rt *Router) Handle(name string, h Handler) {
	switch {
	case name == "":
		panic("spoe: Router route with an empty message name")
	case h == nil:
		panic(fmt.Sprintf("spoe: Router route %q with a nil Handler", name))
	}
	if _, dup := rt.routes[name]; dup {
		panic(fmt.Sprintf("spoe: Router route %q registered twice", name))
	}
	if rt.routes == nil {
		rt.routes = make(map[string]Handler)
	}
	rt.routes[name] = h
}

// HandleFunc registers f, on the zero-copy path, for the messages called
// name. It panics if name is empty or already registered, or if f is nil.
func (rt *Router) HandleFunc(name string, f func(w *ActionWriter, r *Request) error) {
	if f == nil {
		panic(fmt.Sprintf("spoe: Router route %q with a nil function", name))
	}
	rt.Handle(name, HandlerFunc(f))
}

// ServeSPOE hands each message of r to its route, in a Request of its own.
func (rt *Router) ServeSPOE(w *ActionWriter, r *Request) error {
	for it := r.Messages(); it.Next(); {
		h, ok := rt.routes[string(it.name())]
		if !ok {
			if h = rt.NotFound; h == nil {
				continue
			}
		}
		root := r.root()
		root.routing = it.name() // a failure is counted on this name only
		if err := h.ServeSPOE(w, r.routed(&it)); err != nil {
			return err
		}
		root.routing = nil
	}
	return nil
}
