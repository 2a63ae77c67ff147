package spoe_test

// End-to-end harness: runs real HAProxy processes (2.6, 3.0 and 3.2 by
// default, and any listed in SPOE_HAPROXY) against agents served in the
// test process, and gives the scenarios of e2e_test.go small helpers to
// talk to them.
//
//   - forEachHAProxy runs a test for each HAProxy version, with a binary
//     found and checked by version (HAPROXY_2_6, HAPROXY_3_0, HAPROXY_3_2);
//     a missing one skips the test, or fails it when CI=true. Then it runs
//     the test on each binary SPOE_HAPROXY lists (paths separated by
//     spaces, e.g. builds made by .ci/build-haproxy), named after the
//     version its -v prints; a listed binary that does not run fails.
//   - startHAProxy writes haproxy.cfg and spoe.conf into a temporary folder,
//     checks them with "haproxy -c", runs HAProxy in the foreground and
//     stops it when the test ends, printing its output if the test failed.
//   - startAgentUnderTest serves a *spoe.Agent with the package's one agent
//     starter (helpers_test.go), shuts it down when the test ends, and keeps
//     its connections and the AGENT-HELLO frames it wrote, decoded by the
//     test's own small SPOP reader.
//   - waitWithin (spoe.WaitWithinForTest, the package's one poll-until
//     helper) is the only way the tests wait: it polls a condition until a
//     deadline. Nothing sleeps to synchronise.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spoe-go/spoe"
)

// ---------------------------------------------------------------------------
// Waiting

// waitWithin polls cond until it holds, and fails the test if it still
// does not after timeout: the package's one poll-until helper.
var waitWithin = spoe.WaitWithinForTest

// ---------------------------------------------------------------------------
// Locating HAProxy

// haproxyBinary is a HAProxy executable whose version was checked.
type haproxyBinary struct {
	name         string // "2.6" or "3.2": the subtest name
	path         string
	major, minor int
	version      string // as "-v" prints it, e.g. 2.6.12-1+deb12u4
}

// hasFeature reports whether "-vv" lists +feature (e.g. OPENSSL).
func (b haproxyBinary) hasFeature(feature string) bool {
	out, err := exec.Command(b.path, "-vv").Output()
	return err == nil && strings.Contains(string(out), " +"+feature+" ")
}

// is26 reports whether this is the applet engine of 2.6 to 3.0
// (flt_spoe.c alone); otherwise it is the 3.1+ multiplexer (mux_spop.c).
func (b haproxyBinary) is26() bool { return b.major < 3 || (b.major == 3 && b.minor == 0) }

// atLeast reports whether the version is major.minor or later.
func (b haproxyBinary) atLeast(major, minor int) bool {
	return b.major > major || (b.major == major && b.minor >= minor)
}

// spoeBackendMode is the mode of the backend of SPOE agents: 2.6 only knows
// "tcp"; 3.x has "spop" (and converts "tcp" to it silently).
func (b haproxyBinary) spoeBackendMode() string {
	if b.is26() {
		return "tcp"
	}
	return "spop"
}

// haproxyWanted describes one HAProxy version the tests run against.
type haproxyWanted struct {
	name    string
	env     string
	install string
	accepts func(major, minor int) bool
	// defaultPath is used when env is not set.
	defaultPath func() string
}

var haproxyVersions = []haproxyWanted{
	{
		name:        "2.6",
		env:         "HAPROXY_2_6",
		install:     "install Debian's package (apt-get install haproxy, 2.6.x on bookworm) or set HAPROXY_2_6 to a 2.6 binary",
		accepts:     func(major, minor int) bool { return major == 2 && minor == 6 },
		defaultPath: func() string { return "haproxy" },
	},
	{
		name:        "3.0",
		env:         "HAPROXY_3_0",
		install:     "run .ci/fetch-haproxy trixie .ci/haproxy-3.0 from the module root, or set HAPROXY_3_0 to a 3.0 binary",
		accepts:     func(major, minor int) bool { return major == 3 && minor == 0 },
		defaultPath: func() string { return filepath.Join(moduleRoot(), ".ci", "haproxy-3.0", "haproxy") },
	},
	{
		name:        "3.2",
		env:         "HAPROXY_3_2",
		install:     "run .ci/fetch-haproxy-3.2 from the module root, or set HAPROXY_3_2 to a 3.2+ binary",
		accepts:     func(major, minor int) bool { return major == 3 && minor >= 2 },
		defaultPath: func() string { return filepath.Join(moduleRoot(), ".ci", "haproxy-3.2", "haproxy") },
	},
}

// haproxyVersionLine matches "HAProxy version 2.6.12-1+deb12u4 ..." and
// development versions such as "HAProxy version 3.5-dev5-2-g50872daa6 ...".
var haproxyVersionLine = regexp.MustCompile(`HAProxy version (\d+)\.(\d+)([.-]\S+)?`)

// lookups caches the result of checking each wanted version, so that "-v"
// runs once per test binary.
var lookups sync.Map // name -> haproxyLookup

type haproxyLookup struct {
	bin     haproxyBinary
	problem string // why it cannot be used; empty when it can
}

func lookupHAProxy(w haproxyWanted) haproxyLookup {
	if v, ok := lookups.Load(w.name); ok {
		return v.(haproxyLookup)
	}
	l := checkHAProxy(w)
	lookups.Store(w.name, l)
	return l
}

func checkHAProxy(w haproxyWanted) haproxyLookup {
	path := ""
	if w.env != "" {
		path = os.Getenv(w.env)
	}
	if path == "" {
		path = w.defaultPath()
	}
	if !strings.Contains(path, "/") {
		found, err := exec.LookPath(path)
		if err != nil {
			return haproxyLookup{problem: fmt.Sprintf("HAProxy %s: %q not found on PATH", w.name, path)}
		}
		path = found
	} else if _, err := os.Stat(path); err != nil {
		return haproxyLookup{problem: fmt.Sprintf("HAProxy %s: %v", w.name, err)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "-v").CombinedOutput()
	if err != nil {
		return haproxyLookup{problem: fmt.Sprintf("HAProxy %s: %s -v: %v: %s", w.name, path, err, out)}
	}
	m := haproxyVersionLine.FindSubmatch(out)
	if m == nil {
		return haproxyLookup{problem: fmt.Sprintf("HAProxy %s: %s -v printed no version: %s", w.name, path, out)}
	}
	major, _ := strconv.Atoi(string(m[1]))
	minor, _ := strconv.Atoi(string(m[2]))
	version := fmt.Sprintf("%d.%d%s", major, minor, m[3])
	if !w.accepts(major, minor) {
		return haproxyLookup{problem: fmt.Sprintf("HAProxy %s: %s is version %s", w.name, path, version)}
	}
	return haproxyLookup{bin: haproxyBinary{name: w.name, path: path, major: major, minor: minor, version: version}}
}

// requireHAProxy returns the binary for w, or skips the test with
// instructions, or fails it when CI=true: in CI a missing HAProxy is a
// broken setup, not a reason to pass.
func requireHAProxy(t *testing.T, w haproxyWanted) haproxyBinary {
	t.Helper()
	l := lookupHAProxy(w)
	if l.problem == "" {
		return l.bin
	}
	msg := fmt.Sprintf("%s; to run the end-to-end tests, %s", l.problem, w.install)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return haproxyBinary{}
}

// forEachHAProxy runs fn as a subtest for each HAProxy version, named after
// it ("2.6", "3.0", "3.2"), then for each binary SPOE_HAPROXY lists, named
// after the version it prints ("3.1.0", "3.5-dev5-2-g50872daa6").
func forEachHAProxy(t *testing.T, fn func(t *testing.T, hp haproxyBinary)) {
	for _, w := range haproxyVersions {
		w := w
		t.Run(w.name, func(t *testing.T) {
			fn(t, requireHAProxy(t, w))
		})
	}
	for _, path := range extraHAProxyPaths() {
		l := lookupExtraHAProxy(path)
		name := l.bin.version
		if l.problem != "" {
			name = filepath.Base(filepath.Dir(path))
		}
		t.Run(name, func(t *testing.T) {
			if l.problem != "" {
				t.Fatalf("SPOE_HAPROXY: %s", l.problem)
			}
			fn(t, l.bin)
		})
	}
}

// extraHAProxyPaths returns the binaries SPOE_HAPROXY lists.
func extraHAProxyPaths() []string { return strings.Fields(os.Getenv("SPOE_HAPROXY")) }

// lookupExtraHAProxy checks a binary SPOE_HAPROXY lists: any version from
// 2.6 on, named after its version.
func lookupExtraHAProxy(path string) haproxyLookup {
	w := haproxyWanted{
		name:        "SPOE_HAPROXY=" + path,
		accepts:     func(major, minor int) bool { return major > 2 || (major == 2 && minor >= 6) },
		defaultPath: func() string { return path },
	}
	l := lookupHAProxy(w)
	l.bin.name = l.bin.version
	return l
}

var (
	moduleRootOnce sync.Once
	moduleRootDir  string
)

// moduleRoot returns the folder of go.mod, searched upwards from the test's
// working directory (the package folder).
func moduleRoot() string {
	moduleRootOnce.Do(func() {
		dir, err := os.Getwd()
		if err != nil {
			panic(err)
		}
		for d := dir; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				moduleRootDir = d
				return
			}
			if filepath.Dir(d) == d {
				moduleRootDir = dir
				return
			}
		}
	})
	return moduleRootDir
}

// ---------------------------------------------------------------------------
// Output capture

// syncBuffer is a bytes.Buffer safe for a writer goroutine and a reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logOnFailure prints what was captured in buf, under title, when the test
// has failed by the time it ends.
func logOnFailure(t testing.TB, title string, buf *syncBuffer) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- %s ----\n%s---- end of %s ----", title, buf.String(), title)
		}
	})
}

// ---------------------------------------------------------------------------
// Ports

// freePort returns a loopback TCP port that was free a moment ago: the
// kernel picks it for a listener that is closed at once. HAProxy then binds
// it itself.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on a free port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// ---------------------------------------------------------------------------
// Agent under test

// agentUnderTest is an Agent served on a loopback port for one test.
type agentUnderTest struct {
	*spoe.Agent
	addr string // host:port HAProxy connects to
	tap  *tapRecorder
}

// startAgentUnderTest serves a as every test of the package does
// (spoe.ServeAgentForTest) until the test ends, then shuts it down
// gracefully (Close if that takes too long) and checks that Serve returned
// ErrAgentClosed. It records what the agent writes (tap), and prints the
// agent's logs if the test failed.
func startAgentUnderTest(t testing.TB, a *spoe.Agent) *agentUnderTest {
	t.Helper()
	o := spoe.ServeOptionsForTest{Graceful: true}
	if a.Logger == nil {
		logs := &syncBuffer{}
		logOnFailure(t, "agent log", logs)
		o.Logs = logs
	}
	rec := &tapRecorder{}
	o.Wrap = func(ln net.Listener) net.Listener { return &tapListener{Listener: ln, rec: rec} }
	addr, _ := spoe.ServeAgentForTest(t, a, o)
	return &agentUnderTest{Agent: a, addr: addr, tap: rec}
}

// tapListener hands the agent connections whose writes are recorded. The
// wrapper embeds *net.TCPConn, so the agent still reaches SyscallConn and
// reads the way it does in production; only Write is intercepted.
type tapListener struct {
	net.Listener
	rec *tapRecorder
}

func (l *tapListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nc, nil
	}
	c := &tapConn{TCPConn: tc, rec: l.rec}
	l.rec.mu.Lock()
	l.rec.conns = append(l.rec.conns, c)
	l.rec.mu.Unlock()
	return c, nil
}

type tapConn struct {
	*net.TCPConn
	rec *tapRecorder

	mu      sync.Mutex
	first   []byte // bytes written until the first frame is whole
	decoded bool
}

func (c *tapConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if !c.decoded {
		c.first = append(c.first, p...)
		if f, ok := firstFrame(c.first); ok {
			c.decoded = true
			c.rec.add(f)
			c.first = nil
		}
	}
	c.mu.Unlock()
	return c.TCPConn.Write(p)
}

// tapRecorder keeps the first frame the agent wrote on each connection
// (its AGENT-HELLO), and the connections in the order they were accepted.
type tapRecorder struct {
	mu     sync.Mutex
	hellos []agentHello
	conns  []*tapConn
}

// conn returns the i-th connection accepted (from 0), or nil.
func (r *tapRecorder) conn(i int) *tapConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i >= len(r.conns) {
		return nil
	}
	return r.conns[i]
}

// agentHello is what one AGENT-HELLO said, decoded by the test itself.
type agentHello struct {
	frameType    byte
	version      string
	maxFrameSize uint64
	capabilities string
}

func (r *tapRecorder) add(frame []byte) {
	h, err := decodeAgentHello(frame)
	if err != nil {
		h.version = "undecodable: " + err.Error()
	}
	r.mu.Lock()
	r.hellos = append(r.hellos, h)
	r.mu.Unlock()
}

func (r *tapRecorder) agentHellos() []agentHello {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]agentHello(nil), r.hellos...)
}

// firstFrame returns the first whole frame of b (without its length
// prefix), if b holds one.
func firstFrame(b []byte) ([]byte, bool) {
	if len(b) < 4 {
		return nil, false
	}
	n := int(binary.BigEndian.Uint32(b))
	if len(b) < 4+n {
		return nil, false
	}
	return b[4 : 4+n], true
}

// A minimal, independent SPOP decoder for the AGENT-HELLO: type, flags,
// stream-id, frame-id, then a list of name / typed value pairs.

func decodeAgentHello(f []byte) (agentHello, error) {
	h := agentHello{}
	if len(f) < 5 {
		return h, fmt.Errorf("frame of %d bytes", len(f))
	}
	h.frameType = f[0]
	p := f[5:] // skip type and flags
	var err error
	for i := 0; i < 2; i++ { // stream-id and frame-id
		if _, p, err = spopVarint(p); err != nil {
			return h, err
		}
	}
	for len(p) > 0 {
		var name []byte
		if name, p, err = spopBytes(p); err != nil {
			return h, err
		}
		if len(p) == 0 {
			return h, errors.New("missing value")
		}
		typ := p[0] & 0x0f
		p = p[1:]
		switch typ {
		case 2, 3, 4, 5: // integers
			var v uint64
			if v, p, err = spopVarint(p); err != nil {
				return h, err
			}
			if string(name) == "max-frame-size" {
				h.maxFrameSize = v
			}
		case 8, 9: // string, binary
			var s []byte
			if s, p, err = spopBytes(p); err != nil {
				return h, err
			}
			switch string(name) {
			case "version":
				h.version = string(s)
			case "capabilities":
				h.capabilities = string(s)
			}
		case 0, 1: // null, bool: no data
		default:
			return h, fmt.Errorf("unexpected type %d for %q", typ, name)
		}
	}
	return h, nil
}

// spopVarint decodes SPOP's varint (HAProxy's peers encoding, not LEB128).
func spopVarint(p []byte) (uint64, []byte, error) {
	if len(p) == 0 {
		return 0, p, errors.New("truncated varint")
	}
	v := uint64(p[0])
	p = p[1:]
	if v < 240 {
		return v, p, nil
	}
	for shift := uint(4); ; shift += 7 {
		if len(p) == 0 || shift > 63 {
			return 0, p, errors.New("bad varint")
		}
		b := p[0]
		p = p[1:]
		v += uint64(b) << shift
		if b < 128 {
			return v, p, nil
		}
	}
}

func spopBytes(p []byte) ([]byte, []byte, error) {
	n, p, err := spopVarint(p)
	if err != nil {
		return nil, p, err
	}
	if uint64(len(p)) < n {
		return nil, p, errors.New("truncated bytes")
	}
	return p[:n], p[n:], nil
}

// ---------------------------------------------------------------------------
// Application backend

// startApp serves the HTTP application behind HAProxy: every answer is 200
// "app" with the header X-From-Backend: app.
func startApp(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-From-Backend", "app")
		io.WriteString(w, "app")
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// ---------------------------------------------------------------------------
// HAProxy

// haproxySetup is what a scenario puts into the generated configuration.
// Every instance has one HTTP frontend with the SPOE filter of engine "e2e",
// whose spoe-agent uses "option var-prefix e2e" (variables are
// <scope>.e2e.<name>) and "option set-on-error spoe_error" (HAProxy's own
// errors land in txn.e2e.spoe_error, distinct from the agent's
// txn.e2e.error).
type haproxySetup struct {
	// AgentAddr is the SPOE agent's host:port.
	AgentAddr string
	// AgentDirectives are extra lines of the spoe-agent section: at least
	// "messages ..." and/or "groups ...".
	AgentDirectives string
	// SpoeSections are the spoe-message and spoe-group sections.
	SpoeSections string
	// Frontend holds the frontend's rules, after the filter line.
	Frontend string
	// AgentBackend holds extra lines for the agents' backend (e.g. option
	// spop-check), ServerOptions extra keywords of its server line.
	AgentBackend  string
	ServerOptions string
	// Extra is appended to haproxy.cfg (more backends...).
	Extra string
	// Global holds extra lines of the global section (tune.bufsize...).
	Global string
}

// haproxyInstance is a running HAProxy.
type haproxyInstance struct {
	bin       haproxyBinary
	dir       string
	url       string // http://127.0.0.1:<frontend port>
	statsSock string
	out       *syncBuffer
	exited    chan struct{}
	waitErr   error
}

const spoeConfTemplate = `[e2e]
spoe-agent e2e-agent
%s
    option var-prefix e2e
    option set-on-error spoe_error
    # timeout hello and idle only matter to 2.6; 3.x parses and ignores them.
    timeout hello 2s
    timeout idle 30s
    timeout processing 3s
    use-backend spoe-agents

%s
`

const haproxyConfTemplate = `global
    nbthread 1
    stats socket %[1]s mode 600 level admin
    log stderr format raw local0 info
%[11]s

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:%[2]d
    filter spoe engine e2e config %[3]s
%[4]s
    default_backend app

backend app
    server app %[5]s

backend spoe-agents
    mode %[6]s
    # On 2.6 this must outlast the spoe-agent's "timeout idle".
    timeout server 1m
%[7]s
    server agent1 %[8]s %[9]s

%[10]s
`

// writeHAProxyConfig writes haproxy.cfg and spoe.conf into dir and returns
// the path of haproxy.cfg and the frontend's port.
func writeHAProxyConfig(t testing.TB, hp haproxyBinary, dir string, s haproxySetup, appAddr string) (string, int, string) {
	t.Helper()
	spoeConf := filepath.Join(dir, "spoe.conf")
	statsSock := filepath.Join(dir, "admin.sock")
	port := freePort(t)
	writeFile(t, spoeConf, fmt.Sprintf(spoeConfTemplate, indent(s.AgentDirectives), s.SpoeSections))
	cfg := fmt.Sprintf(haproxyConfTemplate, statsSock, port, spoeConf, indent(s.Frontend), appAddr,
		hp.spoeBackendMode(), indent(s.AgentBackend), s.AgentAddr, s.ServerOptions, s.Extra, indent(s.Global))
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	writeFile(t, cfgPath, cfg)
	return cfgPath, port, statsSock
}

// indent puts every non-empty line of s under a section, four spaces in.
func indent(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		b.WriteString("    ")
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return strings.TrimRight(b.String(), "\n")
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkHAProxyConfig runs "haproxy -c" and fails the test with HAProxy's
// output if the configuration is invalid.
func checkHAProxyConfig(t testing.TB, hp haproxyBinary, dir, cfgPath string, flags ...string) {
	t.Helper()
	if out, err := runConfigCheck(hp, dir, cfgPath, flags...); err != nil {
		if !filepath.IsAbs(cfgPath) {
			cfgPath = filepath.Join(dir, cfgPath)
		}
		cfg, _ := os.ReadFile(cfgPath)
		t.Fatalf("HAProxy %s rejects %s: %v\n%s\n---- %s ----\n%s", hp.version, cfgPath, err, out, filepath.Base(cfgPath), numberLines(cfg))
	}
}

// runConfigCheck runs "haproxy <flags> -c -f cfgPath" in dir and returns
// its output; the error is non-nil when HAProxy rejects the configuration.
func runConfigCheck(hp haproxyBinary, dir, cfgPath string, flags ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, hp.path, append(flags, "-c", "-f", cfgPath)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func numberLines(b []byte) string {
	var sb strings.Builder
	for i, line := range strings.Split(string(b), "\n") {
		fmt.Fprintf(&sb, "%3d  %s\n", i+1, line)
	}
	return sb.String()
}

// startHAProxy generates the configuration for s, checks it, starts HAProxy
// in the foreground with an application backend, and waits until the
// frontend accepts connections. HAProxy is stopped when the test ends.
func startHAProxy(t testing.TB, hp haproxyBinary, s haproxySetup) *haproxyInstance {
	t.Helper()
	appAddr := startApp(t)
	dir := t.TempDir()
	cfgPath, port, statsSock := writeHAProxyConfig(t, hp, dir, s, appAddr)
	checkHAProxyConfig(t, hp, dir, cfgPath)

	h := &haproxyInstance{
		bin:       hp,
		dir:       dir,
		url:       fmt.Sprintf("http://127.0.0.1:%d", port),
		statsSock: statsSock,
		out:       &syncBuffer{},
		exited:    make(chan struct{}),
	}
	// -db: stay in the foreground, no daemon, no master process.
	cmd := exec.Command(hp.path, "-db", "-f", cfgPath)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = h.out, h.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start HAProxy %s: %v", hp.version, err)
	}
	go func() {
		h.waitErr = cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		h.stop(t, cmd.Process)
		if t.Failed() {
			cfg, _ := os.ReadFile(cfgPath)
			spoeConf, _ := os.ReadFile(filepath.Join(dir, "spoe.conf"))
			t.Logf("---- HAProxy %s output ----\n%s---- haproxy.cfg ----\n%s---- spoe.conf ----\n%s",
				hp.version, h.out.String(), numberLines(cfg), numberLines(spoeConf))
		}
	})

	addr := fmt.Sprintf("127.0.0.1:%d", port)
	waitWithin(t, 10*time.Second, func() bool {
		if h.hasExited() {
			t.Fatalf("HAProxy %s exited at start: %v", hp.version, h.waitErr)
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		// The stats socket may come a moment after the frontend (seen
		// on 2.8): the tests' serverStat needs it.
		c, err = net.DialTimeout("unix", statsSock, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}, "HAProxy's frontend to accept connections on "+addr+" and its stats socket")
	return h
}

func (h *haproxyInstance) hasExited() bool {
	select {
	case <-h.exited:
		return true
	default:
		return false
	}
}

// stop ends HAProxy: SIGTERM (an immediate stop), then SIGKILL if it is
// still there after a few seconds.
func (h *haproxyInstance) stop(t testing.TB, p *os.Process) {
	if h.hasExited() {
		t.Errorf("HAProxy %s exited before the end of the test: %v", h.bin.version, h.waitErr)
		return
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(5 * time.Second):
		t.Errorf("HAProxy %s did not stop on SIGTERM; killing it", h.bin.version)
		_ = p.Kill()
		<-h.exited
	}
}

// command sends one command to HAProxy's stats socket and returns the
// answer.
func (h *haproxyInstance) command(t testing.TB, cmd string) string {
	t.Helper()
	c, err := net.DialTimeout("unix", h.statsSock, 2*time.Second)
	if err != nil {
		t.Fatalf("stats socket: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		t.Fatalf("stats socket: %v", err)
	}
	out, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("stats socket: %v", err)
	}
	return string(out)
}

// serverStat returns the "show stat" CSV row of server srv of backend px,
// as a map from column name to value, or nil if there is none.
func (h *haproxyInstance) serverStat(t testing.TB, px, srv string) map[string]string {
	t.Helper()
	var header []string
	sc := bufio.NewScanner(strings.NewReader(h.command(t, "show stat")))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# ") {
			header = strings.Split(strings.TrimPrefix(line, "# "), ",")
			continue
		}
		fields := strings.Split(line, ",")
		if len(fields) < 2 || fields[0] != px || fields[1] != srv {
			continue
		}
		row := make(map[string]string, len(header))
		for i, name := range header {
			if i < len(fields) {
				row[name] = fields[i]
			}
		}
		return row
	}
	return nil
}

// ---------------------------------------------------------------------------
// HTTP client

// newClient returns an HTTP client for one test. Without keep-alive, every
// request opens its own connection, hence its own HAProxy session.
func newClient(t testing.TB, keepAlive bool) *http.Client {
	tr := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 64}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// response is what the tests look at in an HTTP answer.
type response struct {
	status int
	header http.Header
	body   string
}

// get sends GET url+path with the given headers (name, value pairs) and
// returns the answer; a transport error fails the test.
func get(t testing.TB, c *http.Client, url string, headers ...string) response {
	t.Helper()
	r, err := tryGet(c, url, headers...)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return r
}

func tryGet(c *http.Client, url string, headers ...string) (response, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return response{}, err
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := c.Do(req)
	if err != nil {
		return response{}, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return response{}, err
	}
	return response{status: res.StatusCode, header: res.Header, body: string(body)}, nil
}
