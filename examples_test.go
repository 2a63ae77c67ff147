package spoe_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestExampleConfigs checks the configuration files of
// examples/ip-reputation with "haproxy -c" on every HAProxy version, from
// the example's folder as its comments say to run it (spoe.conf is a
// relative path there). -dW turns warnings into errors: the examples must
// be clean.
func TestExampleConfigs(t *testing.T) {
	dir := filepath.Join(moduleRoot(), "examples", "ip-reputation")
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		// haproxy.cfg works as-is on 2.6 and on 3.x.
		checkHAProxyConfig(t, hp, dir, "haproxy.cfg", "-dW")

		// haproxy-3.x.cfg uses "mode spop": valid on 3.x, unknown to 2.6.
		if !hp.is26() {
			checkHAProxyConfig(t, hp, dir, "haproxy-3.x.cfg", "-dW")
			return
		}
		out, err := runConfigCheck(hp, dir, "haproxy-3.x.cfg")
		if err == nil || !strings.Contains(out, "unknown proxy mode 'spop'") {
			t.Errorf("HAProxy %s on haproxy-3.x.cfg: %v, want it rejected for \"mode spop\":\n%s", hp.version, err, out)
		}
	})
}

// TestREADMEConfigs: the HAProxy configurations the README shows are the
// example's files, which TestExampleConfigs checks, word for word; and its
// scaling-out backend, put in the example's haproxy.cfg, passes
// "haproxy -dW -c" on every version.
func TestREADMEConfigs(t *testing.T) {
	root := moduleRoot()
	readme := readFile(t, filepath.Join(root, "README.md"))
	dir := filepath.Join(root, "examples", "ip-reputation")
	for _, name := range []string{"spoe.conf", "haproxy.cfg", "haproxy-3.x.cfg"} {
		if content := readFile(t, filepath.Join(dir, name)); !strings.Contains(readme, "```\n"+content+"```\n") {
			t.Errorf("README.md does not show examples/ip-reputation/%s as it is", name)
		}
	}

	m := regexp.MustCompile("(?s)### Scaling out\n.*?```\n(.*?)```").FindStringSubmatch(readme)
	if m == nil {
		t.Fatal("no configuration block under \"### Scaling out\" in README.md")
	}
	cfg := readFile(t, filepath.Join(dir, "haproxy.cfg"))
	i := strings.Index(cfg, "backend ip-reputation-agents")
	if i < 0 || !strings.HasPrefix(m[1], "backend ip-reputation-agents\n") {
		t.Fatal("the scaling-out block and haproxy.cfg must both declare backend ip-reputation-agents")
	}
	forEachHAProxy(t, func(t *testing.T, hp haproxyBinary) {
		tmp := t.TempDir()
		writeFile(t, filepath.Join(tmp, "spoe.conf"), readFile(t, filepath.Join(dir, "spoe.conf")))
		writeFile(t, filepath.Join(tmp, "haproxy.cfg"), cfg[:i]+m[1])
		checkHAProxyConfig(t, hp, tmp, "haproxy.cfg", "-dW")
	})
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
