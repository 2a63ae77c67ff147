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
	prefixLen    int    // of VarPrefix, to check variable names

	maxNotifyMessages int         // the simple API's decoding bound
	maxNotifyArgs     int         //
	logs              *logLimiter // the Agent's: rate of failure logs
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
		prefixLen:    len(a.VarPrefix),

		maxNotifyMessages: a.maxNotifyMessages(),
		maxNotifyArgs:     a.maxNotifyArgs(),
		logs:              &a.logs,
	}
}
