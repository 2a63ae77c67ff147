package spoe_test

import (
	"path/filepath"
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
