package spoe_test

// End to end through HAProxy 2.6 and 3.2: an agent served over TLS (the
// server line's "ssl verify required ca-file ..."), and one served on a
// unix socket (a "unix@" server line), both with Agent.RunListener as a
// production main would. The certificates are made by the test.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/spoe-go/spoe"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// serverCert issues a certificate for the agent, valid for dnsName and
// 127.0.0.1.
func (ca *testCA) serverCert(t *testing.T, dnsName string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: dnsName},
		DNSNames:     []string{dnsName},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// runAgent serves a on l with RunListener until the test ends, and counts
// the NOTIFY frames it answered.
func runAgent(t *testing.T, l net.Listener) *atomic.Int32 {
	t.Helper()
	var notifies atomic.Int32
	logs := &syncBuffer{}
	logger := logrus.New()
	logger.SetOutput(logs)
	logger.SetLevel(logrus.DebugLevel)
	agent := &spoe.Agent{Logger: logger, Handler: spoe.HandlerFunc(func(w *spoe.ActionWriter, r *spoe.Request) error {
		notifies.Add(1)
		return w.SetInt(spoe.VarScopeSession, "score", 42)
	})}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- agent.RunListener(ctx, l, 5*time.Second) }()
	t.Cleanup(func() {
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("RunListener: %v", err)
		}
	})
	logOnFailure(t, "agent log", logs)
	return &notifies
}

const scoreSections = `
spoe-message check
    args ip=src
    event on-frontend-http-request
`

const scoreFrontend = "http-after-response set-header x-score %[var(sess.e2e.score)]\n" +
	"http-after-response set-header x-spoe-error %[var(txn.e2e.spoe_error)]"

// TestE2ETLS: HAProxy verifies the agent's certificate against its CA and
// name, and talks SPOP over TLS; with a certificate from another CA, it
// refuses the connection and its rules see the error.
func TestE2ETLS(t *testing.T) {
	ca := newTestCA(t, "spoe test CA")
	other := newTestCA(t, "another CA")
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		if !hp.hasFeature("OPENSSL") {
			// A build from source without USE_OPENSSL=1 (.ci/build-haproxy
			// makes one unless libssl-dev is there); CI's packages have it.
			// Those are only ever extra binaries (SPOE_HAPROXY).
			for _, w := range haproxyVersions {
				if w.name == hp.name {
					t.Fatalf("HAProxy %s was built without OpenSSL", hp.version)
				}
			}
			t.Skipf("HAProxy %s (SPOE_HAPROXY) was built without OpenSSL: no TLS test", hp.version)
		}
		caFile := filepath.Join(t.TempDir(), "ca.pem")
		writeFile(t, caFile, string(ca.pem))
		// The health check (option spop-check) goes over TLS too.
		serverOptions := "ssl verify required ca-file " + caFile + " verifyhost spoe-agent.test check inter 100ms rise 1 fall 1"

		t.Run("verified", func(t *testing.T) {
			tcp, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			var handshakes atomic.Int32
			cfg := &tls.Config{
				Certificates: []tls.Certificate{ca.serverCert(t, "spoe-agent.test")},
				MinVersion:   tls.VersionTLS12,
				VerifyConnection: func(tls.ConnectionState) error {
					handshakes.Add(1)
					return nil
				},
			}
			notifies := runAgent(t, tls.NewListener(tcp, cfg))
			h := startHAProxy(t, hp, haproxySetup{
				AgentAddr:       tcp.Addr().String(),
				AgentBackend:    "option spop-check",
				ServerOptions:   serverOptions,
				AgentDirectives: "messages check",
				SpoeSections:    scoreSections,
				Frontend:        scoreFrontend,
			})
			waitWithin(t, 10*time.Second, func() bool {
				row := h.serverStat(t, "spoe-agents", "agent1")
				return strings.HasPrefix(row["check_status"], "L7OK") && row["status"] == "UP"
			}, "the SPOP health check over TLS to pass")
			c := newClient(t, false)
			for i := 0; i < 3; i++ {
				res := get(t, c, h.url+"/")
				if res.status != http.StatusOK {
					t.Fatalf("status %d", res.status)
				}
				expectHeader(t, res, "x-score", "42")
				expectHeader(t, res, "x-spoe-error", "")
			}
			if notifies.Load() < 3 || handshakes.Load() == 0 {
				t.Errorf("%d NOTIFY frames over %d TLS handshakes, want 3 over at least 1", notifies.Load(), handshakes.Load())
			}
		})

		t.Run("untrusted", func(t *testing.T) {
			tcp, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			cfg := &tls.Config{Certificates: []tls.Certificate{other.serverCert(t, "spoe-agent.test")}}
			notifies := runAgent(t, tls.NewListener(tcp, cfg))
			h := startHAProxy(t, hp, haproxySetup{
				AgentAddr:       tcp.Addr().String(),
				AgentBackend:    "option spop-check",
				ServerOptions:   serverOptions,
				AgentDirectives: "messages check",
				SpoeSections:    scoreSections,
				Frontend:        scoreFrontend,
			})
			waitWithin(t, 10*time.Second, func() bool {
				return h.serverStat(t, "spoe-agents", "agent1")["status"] == "DOWN"
			}, "the health check to fail on the untrusted certificate")
			res := get(t, newClient(t, false), h.url+"/")
			expectHeader(t, res, "x-score", "")
			if res.header.Get("x-spoe-error") == "" {
				t.Errorf("no txn.e2e.spoe_error with an untrusted agent certificate")
			}
			if n := notifies.Load(); n != 0 {
				t.Errorf("%d NOTIFY frames reached the agent over an unverified connection", n)
			}
		})
	})
}

// TestE2EUnixSocket: an agent on spoe.Listen("unix://...") behind a
// "server ... unix@/path" line.
func TestE2EUnixSocket(t *testing.T) {
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		path := filepath.Join(t.TempDir(), "agent.sock")
		l, err := spoe.Listen("unix://" + path)
		if err != nil {
			t.Fatal(err)
		}
		notifies := runAgent(t, l)
		h := startHAProxy(t, hp, haproxySetup{
			AgentAddr:       "unix@" + path,
			AgentDirectives: "messages check",
			SpoeSections:    scoreSections,
			Frontend:        scoreFrontend,
		})
		res := get(t, newClient(t, false), h.url+"/")
		if res.status != http.StatusOK {
			t.Fatalf("status %d", res.status)
		}
		expectHeader(t, res, "x-score", "42")
		expectHeader(t, res, "x-spoe-error", "")
		if notifies.Load() != 1 {
			t.Errorf("%d NOTIFY frames, want 1", notifies.Load())
		}
	})
}
