package spoe

import (
	"time"

	"github.com/sirupsen/logrus"
)

// Defaults of the Agent's zero-valued fields.
const (
	DefaultMaxFrameSize       = 1 << 20
	DefaultMaxInFlight        = 1024
	DefaultMaxInFlightPerConn = 64
	DefaultReadTimeout        = 10 * time.Second
	DefaultWriteTimeout       = 10 * time.Second
	DefaultErrorVar           = "error"
	DefaultMaxEngines         = 4096
	DefaultMaxNotifyMessages  = 256
	DefaultMaxNotifyArgs      = 4096
	DefaultMaxReassemblyBytes = 16 << 20
	DefaultMaxACKBacklog      = 64 << 10
	DefaultMaxACKBacklogTotal = 16 << 20
	DefaultMaxConns           = 4096
	DefaultMaxBufferBytes     = 64 << 20
)

// The Agent's fields read through their defaults, never written back.

func (a *Agent) handler() Handler {
	if a.Handler == nil {
		return emptyHandler{}
	}
	return a.Handler
}

type emptyHandler struct{}

func (emptyHandler) ServeSPOE(*ActionWriter, *Request) error { return nil }

func (a *Agent) maxFrameSize() int {
	switch {
	case a.MaxFrameSize <= 0:
		return DefaultMaxFrameSize
	case a.MaxFrameSize < MinFrameSize:
		return MinFrameSize
	case a.MaxFrameSize > 1<<31-1:
		return 1<<31 - 1
	}
	return a.MaxFrameSize
}

func (a *Agent) maxInFlight() int64 {
	if a.MaxInFlight <= 0 {
		return DefaultMaxInFlight
	}
	return int64(a.MaxInFlight)
}

func (a *Agent) maxInFlightPerConn() int64 {
	if a.MaxInFlightPerConn <= 0 {
		return DefaultMaxInFlightPerConn
	}
	return int64(a.MaxInFlightPerConn)
}

func (a *Agent) maxConns() int {
	if a.MaxConns == 0 {
		return DefaultMaxConns
	}
	return a.MaxConns
}

func (a *Agent) maxBufferBytes() int {
	if a.MaxBufferBytes <= 0 {
		return DefaultMaxBufferBytes
	}
	return a.MaxBufferBytes
}

func (a *Agent) maxEngines() int {
	if a.MaxEngines <= 0 {
		return DefaultMaxEngines
	}
	return a.MaxEngines
}

func (a *Agent) maxNotifyMessages() int {
	if a.MaxNotifyMessages <= 0 {
		return DefaultMaxNotifyMessages
	}
	return a.MaxNotifyMessages
}

func (a *Agent) maxNotifyArgs() int {
	if a.MaxNotifyArgs <= 0 {
		return DefaultMaxNotifyArgs
	}
	return a.MaxNotifyArgs
}

func (a *Agent) maxReassemblyBytes() int {
	if a.MaxReassemblyBytes <= 0 {
		return DefaultMaxReassemblyBytes
	}
	return a.MaxReassemblyBytes
}

func (a *Agent) maxACKBacklog() int {
	if a.MaxACKBacklog <= 0 {
		return DefaultMaxACKBacklog
	}
	return a.MaxACKBacklog
}

func (a *Agent) maxACKBacklogTotal() int {
	if a.MaxACKBacklogTotal <= 0 {
		return DefaultMaxACKBacklogTotal
	}
	return a.MaxACKBacklogTotal
}

func (a *Agent) readTimeout() time.Duration {
	if a.ReadTimeout <= 0 {
		return DefaultReadTimeout
	}
	return a.ReadTimeout
}

func (a *Agent) writeTimeout() time.Duration {
	if a.WriteTimeout <= 0 {
		return DefaultWriteTimeout
	}
	return a.WriteTimeout
}

func (a *Agent) errorVar() string {
	switch a.ErrorVar {
	case "":
		return DefaultErrorVar
	case "-":
		return ""
	}
	return a.ErrorVar
}

func (a *Agent) logger() logrus.FieldLogger {
	if a.Logger == nil {
		return logrus.StandardLogger()
	}
	return a.Logger
}

// config is the Agent's configuration resolved once, when Serve starts:
// connections read it, never the Agent's fields.
type config struct {
	handler      Handler
	logger       logrus.FieldLogger
	maxFrameSize int
	maxPerConn   int64
	maxBacklog   int // MaxACKBacklog
	readTimeout  time.Duration
	idleTimeout  time.Duration
	writeTimeout time.Duration
	errorVar     string // "" for none
	errorVarRoom int    // bytes its set-var takes in an ACK, kept free for it
	prefixLen    int    // of VarPrefix, to check variable names

	maxNotifyMessages int           // the simple API's decoding bound
	maxNotifyArgs     int           //
	buffers           *bufferBudget // the Agent's: MaxBufferBytes
	logs              *logLimiter   // the Agent's: rate of failure logs
	keepPipelining    bool          // tests only: see Agent.keepPipelining
	noPipelining      bool          //
}

func (a *Agent) config() *config {
	return &config{
		handler:      a.handler(),
		logger:       a.logger(),
		maxFrameSize: a.maxFrameSize(),
		maxPerConn:   a.maxInFlightPerConn(),
		maxBacklog:   a.maxACKBacklog(),
		readTimeout:  a.readTimeout(),
		idleTimeout:  a.IdleTimeout,
		writeTimeout: a.writeTimeout(),
		errorVar:     a.errorVar(),
		errorVarRoom: errorVarRoom(a.errorVar()),
		prefixLen:    len(a.VarPrefix),

		maxNotifyMessages: a.maxNotifyMessages(),
		maxNotifyArgs:     a.maxNotifyArgs(),
		buffers:           &a.buffers,
		logs:              &a.logs,
		keepPipelining:    a.keepPipelining,
		noPipelining:      a.noPipelining,
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
