package spoe

import (
	"fmt"
)

// RouteFunc handles one message of a NOTIFY on the zero-copy path: m is
// positioned on that message (calling m.Next does not disturb the router).
// Like a Handler, it writes actions to w, and an error fails the whole
// NOTIFY.
type RouteFunc func(w *ActionWriter, r *Request, m *MessageIterator) error

// MessageRouteFunc handles one message in the simple API.
type MessageRouteFunc func(m Message) ([]Action, error)

// Router is a Handler that sends each message of a NOTIFY to the function
// registered for its name, in the manner of http.ServeMux, with the
// zero-copy path (Handle) or the simple API (HandleMessage):
//
//	var router spoe.Router
//	router.HandleMessage("ip-rep", ipReputation)
//	router.Handle("bot-check", botScore)
//	agent := &spoe.Agent{Handler: &router}
//
// Messages are handled in the order of the frame, one after the other; the
// first error stops the frame, whose ACK then carries the error variable
// only (see Agent.ErrorVar).
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
	NotFound RouteFunc

	routes map[string]route
}

type route struct {
	fast   RouteFunc
	simple MessageRouteFunc
}

// Handle registers f for the messages called name. It panics if name is
// empty or already registered.
func (rt *Router) Handle(name string, f RouteFunc) {
	rt.add(name, route{fast: f}, f == nil)
}

// HandleMessage registers f, in the simple API, for the messages called
// name. It panics if name is empty or already registered.
func (rt *Router) HandleMessage(name string, f MessageRouteFunc) {
	rt.add(name, route{simple: f}, f == nil)
}

func (rt *Router) add(name string, r route, nilFunc bool) {
	switch {
	case name == "":
		panic("spoe: Router route with an empty message name")
	case nilFunc:
		panic(fmt.Sprintf("spoe: Router route %q with a nil function", name))
	}
	if _, dup := rt.routes[name]; dup {
		panic(fmt.Sprintf("spoe: Router route %q registered twice", name))
	}
	if rt.routes == nil {
		rt.routes = make(map[string]route)
	}
	rt.routes[name] = r
}

// ServeSPOE handles each message of r with its route.
func (rt *Router) ServeSPOE(w *ActionWriter, r *Request) error {
	for it := r.Messages(); it.Next(); {
		m := &r.routed // a copy the route may move, in the pooled Request
		*m = it
		var err error
		switch route, ok := rt.routes[string(it.name())]; {
		case ok && route.fast != nil:
			err = route.fast(w, r, m)
		case ok:
			var actions []Action
			if actions, err = route.simple(r.decodeMessage(m)); err == nil {
				for _, a := range actions {
					if a != nil {
						_ = a.writeTo(w) // refusals are recorded in w
					}
				}
			}
		case rt.NotFound != nil:
			err = rt.NotFound(w, r, m)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
