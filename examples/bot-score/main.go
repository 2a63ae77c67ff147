// Command bot-score is an SPOE agent that scores each HTTP request for how
// likely it comes from a bot, from all its headers (HAProxy's req.hdrs_bin
// in one argument) and from how many requests its client made in the last
// second. HAProxy receives the score in txn.bot.score and the reasons in
// txn.bot.reasons, and its rules decide (see haproxy.cfg): deny at 80,
// tag the request below.
//
//	go run ./examples/bot-score -addr :9001
//	haproxy -f examples/bot-score/haproxy.cfg   # from examples/bot-score
//
// It runs on the zero-copy path: arguments and headers are read from the
// frame without copying, and a request allocates nothing.
package main

import (
	"context"
	"flag"
	"log"
	"net/netip"
	"sync"
	"time"

	"github.com/spoe-go/spoe"
)

func main() {
	addr := flag.String("addr", ":9001", "address to listen on for HAProxy's SPOE connections")
	rate := flag.Int("rate", 20, "requests per second and client above which a client looks like a bot")
	flag.Parse()

	scorer := &botScorer{rates: newRateCounter(*rate)}
	var router spoe.Router
	router.HandleFunc("bot-check", scorer.check)
	agent := &spoe.Agent{Handler: &router, VarPrefix: "bot"}

	if err := agent.Run(context.Background(), *addr, 10*time.Second); err != nil {
		log.Fatal(err)
	}
}

// Signals and what each adds to the score (out of 100).
const (
	noUserAgent     = 40
	automationAgent = 50
	noAccept        = 15
	noLanguage      = 15
	noEncoding      = 10
	fewHeaders      = 10
	tooFast         = 30
)

// automationTokens appear in the User-Agent of scripts and crawlers.
var automationTokens = []string{"curl", "wget", "python", "go-http-client", "java", "scrapy", "headless", "bot", "spider", "crawl"}

type botScorer struct {
	rates *rateCounter
}

// check answers the bot-check message: args ip=src headers=req.hdrs_bin.
// As a Router's route, r holds that message only.
func (s *botScorer) check(w *spoe.ActionWriter, r *spoe.Request) error {
	m := r.Messages()
	m.Next()
	score := 0
	var reasons [96]byte // "no-ua,automation-ua,..." without allocating
	why := reasons[:0]
	add := func(points int, reason string) {
		score += points
		if len(why) > 0 {
			why = append(why, ',')
		}
		why = append(why, reason...)
	}

	var ua []byte
	var accept, language, encoding bool
	headers := 0
	if v, ok := m.Arg("headers"); ok {
		block, _ := v.Bytes()
		for h := spoe.Headers(block); h.Next(); {
			headers++
			switch {
			case h.NameIs("user-agent"):
				ua = h.Value()
			case h.NameIs("accept"):
				accept = true
			case h.NameIs("accept-language"):
				language = true
			case h.NameIs("accept-encoding"):
				encoding = true
			}
		}
	}
	switch {
	case len(ua) == 0:
		add(noUserAgent, "no-ua")
	case containsAnyFold(ua, automationTokens):
		add(automationAgent, "automation-ua")
	}
	if !accept {
		add(noAccept, "no-accept")
	}
	if !language {
		add(noLanguage, "no-language")
	}
	if !encoding {
		add(noEncoding, "no-encoding")
	}
	if headers < 4 {
		add(fewHeaders, "few-headers")
	}
	if v, ok := m.Arg("ip"); ok {
		if ip, ok := v.Addr(); ok && s.rates.tooFast(ip, time.Now()) {
			add(tooFast, "too-fast")
		}
	}
	if score > 100 {
		score = 100
	}
	if err := w.SetInt(spoe.VarScopeTransaction, "score", int64(score)); err != nil {
		return err
	}
	return w.SetStringBytes(spoe.VarScopeTransaction, "reasons", why)
}

// containsAnyFold reports whether s contains one of the lower-case tokens,
// ignoring ASCII case.
func containsAnyFold(s []byte, tokens []string) bool {
	for _, tok := range tokens {
		for i := 0; i+len(tok) <= len(s); i++ {
			j := 0
			for j < len(tok) && lower(s[i+j]) == tok[j] {
				j++
			}
			if j == len(tok) {
				return true
			}
		}
	}
	return false
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// rateCounter counts requests per client address in one-second windows.
// It keeps the current and the previous window only, so its memory is
// bounded by the clients seen in two seconds. It is safe for concurrent use.
type rateCounter struct {
	limit int

	mu       sync.Mutex
	window   int64 // current window, in seconds
	current  map[netip.Addr]int
	previous map[netip.Addr]int
}

func newRateCounter(limit int) *rateCounter {
	return &rateCounter{limit: limit, current: make(map[netip.Addr]int), previous: make(map[netip.Addr]int)}
}

// tooFast counts one request from ip at now and reports whether ip made
// more than limit requests in the last second (estimated over the current
// and the previous window, weighted by how far the current one is).
func (c *rateCounter) tooFast(ip netip.Addr, now time.Time) bool {
	sec, frac := now.Unix(), float64(now.Nanosecond())/1e9
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case sec == c.window+1:
		c.previous, c.current = c.current, c.previous
		clear(c.current)
	case sec != c.window:
		clear(c.previous)
		clear(c.current)
	}
	c.window = sec
	c.current[ip]++
	estimate := float64(c.previous[ip])*(1-frac) + float64(c.current[ip])
	return estimate > float64(c.limit)
}
