package spoe

import (
	"time"

	"github.com/sirupsen/logrus"
)

// config is the Agent's configuration resolved once, when Serve starts:
// connections read it, never the Agent's fields.
type config struct {
	handler      Handler
	logger       logrus.FieldLogger
	maxFrameSize int
	maxPerConn   int64
	readTimeout  time.Duration
	idleTimeout  time.Duration
	writeTimeout time.Duration
	errorVar     string // "" for none
	errorVarRoom int    // bytes its set-var takes in an ACK, kept free for it
	prefixLen    int    // of VarPrefix, to check variable names
}

func (a *Agent) config() *config {
	return &config{
		handler:      a.handler(),
		logger:       a.logger(),
		maxFrameSize: a.maxFrameSize(),
		maxPerConn:   a.maxInFlightPerConn(),
		readTimeout:  a.readTimeout(),
		idleTimeout:  a.IdleTimeout,
		writeTimeout: a.writeTimeout(),
		errorVar:     a.errorVar(),
		errorVarRoom: errorVarRoom(a.errorVar()),
		prefixLen:    len(a.VarPrefix),
	}
}

// errorVarRoom returns the size of the action that sets the error variable
// name to true: action type, NB-ARGS, scope, name, BOOL.
func errorVarRoom(name string) int {
	if name == "" {
		return 0
	}
	return 3 + len(appendVarint(nil, uint64(len(name)))) + len(name) + 1
}
