package spoe

import (
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// logInterval is how often one kind of repeated log line may be written:
// a handler that fails or panics on every request must not flood the log
// (a panic's stack is kilobytes). Stats keeps the exact counts.
const logInterval = 10 * time.Second

// Bounds of the rate limiter's keys: message names come from the peer.
const (
	maxLogKeys   = 256
	maxLogKeyLen = 64
	logKeyOther  = "(other)"
)

// logLimiter lets through one log line per key and logInterval, and counts
// the lines it holds back, so that the next line let through can say how
// many there were. Its zero value is ready; it is safe for concurrent use.
type logLimiter struct {
	interval time.Duration // zero: logInterval
	mu       sync.Mutex
	keys     map[string]*logSlot
}

type logSlot struct {
	next       time.Duration // monotime before which lines are held back
	suppressed uint64        // lines held back since the last one let through
}

// allow reports whether a line of kind key may be written now and, if so,
// how many lines of that kind were held back before it.
func (l *logLimiter) allow(key string) (ok bool, suppressed uint64) {
	if len(key) > maxLogKeyLen {
		key = key[:maxLogKeyLen]
	}
	now := monotime()
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.keys[key]
	if s == nil {
		if l.keys == nil {
			l.keys = make(map[string]*logSlot)
		}
		if len(l.keys) >= maxLogKeys {
			key = logKeyOther
			s = l.keys[key]
		}
		if s == nil {
			s = new(logSlot)
			l.keys[strings.Clone(key)] = s
		}
	}
	if now < s.next {
		s.suppressed++
		return false, 0
	}
	s.next = now + l.period()
	suppressed, s.suppressed = s.suppressed, 0
	return true, suppressed
}

// period is the interval between two lines of one kind.
func (l *logLimiter) period() time.Duration {
	if l.interval <= 0 {
		return logInterval
	}
	return l.interval
}

// requestLog is the logger for a line about r.
func requestLog(cfg *config, r *Request) logrus.FieldLogger {
	return cfg.logger.WithField("stream_id", r.streamID).WithField("frame_id", r.frameID)
}

// logHeld writes the summary of the lines of one kind the rate limiter held
// back, before the next one it lets through.
func logHeld(cfg *config, held uint64, what string) {
	if held > 0 {
		cfg.logger.WithField("suppressed", held).
			Errorf("spoe: %d more %s not logged (at most one line per %v; Stats counts them all)", held, what, cfg.logs.period())
	}
}

// firstMessageName names a request in the logs: its first message's name,
// cut to maxLogKeyLen bytes.
func (r *Request) firstMessageName() string {
	it := r.Messages()
	if !it.Next() {
		return ""
	}
	name := it.name()
	if len(name) > maxLogKeyLen {
		name = name[:maxLogKeyLen]
	}
	return string(name)
}
