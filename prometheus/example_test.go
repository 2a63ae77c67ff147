package spoeprom_test

import (
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/spoe-go/spoe"
	spoeprom "github.com/spoe-go/spoe/prometheus"
)

// The collector is registered once per agent; promhttp.Handler() then
// serves the metrics:
//
//	http.Handle("/metrics", promhttp.Handler())
//	go http.ListenAndServe(":9100", nil)
func ExampleNewCollector() {
	agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) { return nil, nil })
	reg := prometheus.NewRegistry()
	reg.MustRegister(spoeprom.NewCollector(agent, spoeprom.WithConstLabels(prometheus.Labels{"agent": "ip-reputation"})))

	err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP spoe_connections_open SPOP connections open now.
# TYPE spoe_connections_open gauge
spoe_connections_open{agent="ip-reputation"} 0
`), "spoe_connections_open")
	fmt.Println(err)
	// Output: <nil>
}

// WithNamespace renames the metrics; WithConstLabels tells the agents of
// one process apart.
func ExampleWithNamespace() {
	reg := prometheus.NewRegistry()
	for _, name := range []string{"ip-reputation", "bot-score"} {
		agent := spoe.New(func([]spoe.Message) ([]spoe.Action, error) { return nil, nil })
		reg.MustRegister(spoeprom.NewCollector(agent,
			spoeprom.WithNamespace("edge_spoe"),
			spoeprom.WithConstLabels(prometheus.Labels{"agent": name})))
	}
	n, err := testutil.GatherAndCount(reg, "edge_spoe_connections_total")
	fmt.Println(n, err)
	// Output: 2 <nil>
}
