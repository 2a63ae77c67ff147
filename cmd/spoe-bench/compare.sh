#!/usr/bin/env bash
# compare.sh — the README's performance table, with the repository's own
# tools: examples/bench-agent on the zero-copy path (fast) and on the
# simple API (simple), measured by cmd/spoe-bench.
#
#   cmd/spoe-bench/compare.sh [NAME=AGENT_BINARY ...]
#
# Extra agents follow the same contract (see cmd/spoe-bench/workload.go):
# serve SPOP on 127.0.0.1:PORT given "-port PORT", exit on SIGTERM.
#
# For each round, workload and shape, every agent runs in a fresh process
# pinned to AGENT_CPU (GOMAXPROCS=1), spoe-bench pinned to LOAD_CPU
# (GOMAXPROCS=1); the table gives the medians of the rounds: the agent's
# CPU per request (from /proc), requests/s, latency p99, errors. For the
# mixed workload, the p99 is the fast requests'.
#
# Environment (defaults): ROUNDS=3 DURATION=10s WARMUP=2s
#   WORKLOADS="ip-rep heavy" SHAPES="4x32 64x1" AGENT_CPU=0 LOAD_CPU=1
#   PORT=19200 SLOW_FRACTION=0.01 (mixed)  OUT=<new dir under /tmp>
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
WORKLOADS=${WORKLOADS:-"ip-rep heavy"}
SHAPES=${SHAPES:-"4x32 64x1"}
AGENT_CPU=${AGENT_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT=${PORT:-19200}
SLOW_FRACTION=${SLOW_FRACTION:-0.01}
OUT=${OUT:-$(mktemp -d /tmp/spoe-bench.XXXXXX)}
mkdir -p "$OUT"

go build -o "$OUT/bench-agent" ./examples/bench-agent
go build -o "$OUT/spoe-bench" ./cmd/spoe-bench

names=(fast simple)
cmds=("$OUT/bench-agent -api fast" "$OUT/bench-agent -api simple")
for pair in "$@"; do
	name=${pair%%=*}
	bin=${pair#*=}
	if [ "$name" = "$pair" ] || [ ! -x "$bin" ]; then
		echo "compare.sh: bad agent '$pair' (want NAME=EXECUTABLE)" >&2
		exit 1
	fi
	names+=("$name")
	cmds+=("$bin")
done

# up PORT: whether something accepts on 127.0.0.1:PORT
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

: >"$OUT/results.tsv"
for round in $(seq "$ROUNDS"); do
	for w in $WORKLOADS; do
		for shape in $SHAPES; do
			conns=${shape%x*}
			inflight=${shape#*x}
			pipelining=true
			[ "$inflight" = 1 ] && pipelining=false
			for i in "${!names[@]}"; do
				name=${names[$i]}
				port=$((PORT + i))
				GOMAXPROCS=1 taskset -c "$AGENT_CPU" ${cmds[$i]} -port "$port" &
				pid=$!
				for _ in $(seq 100); do up "$port" && break; sleep 0.05; done
				log="$OUT/$name-$w-$shape-$round.txt"
				GOMAXPROCS=1 taskset -c "$LOAD_CPU" "$OUT/spoe-bench" -addr "127.0.0.1:$port" \
					-workload "$w" -conns "$conns" -inflight "$inflight" -pipelining="$pipelining" \
					-slow-fraction "$SLOW_FRACTION" -duration "$DURATION" -warmup "$WARMUP" \
					-agent-pid "$pid" >"$log" 2>&1 || true
				kill -TERM "$pid" 2>/dev/null || true
				wait "$pid" 2>/dev/null || true
				result=$(grep '^RESULT ' "$log" || echo "RESULT errors=run-failed")
				printf '%s\t%s\t%s\t%s\n' "$name" "$w" "$shape" "$result" >>"$OUT/results.tsv"
				echo "round $round $w $shape $name: ${result#RESULT }" >&2
			done
		done
	done
done

# Medians per agent, workload and shape.
awk -F'\t' '
function val(s, k,   n, i, kv) {
	n = split(s, kv, " ")
	for (i = 1; i <= n; i++) if (index(kv[i], k "=") == 1) return substr(kv[i], length(k) + 2)
	return ""
}
function median(list,   n, a, i, j, t) {
	n = split(list, a, " ")
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
	return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
	key = $2 "\t" $3 "\t" $1
	if (!(key in seen)) { order[++nk] = key; seen[key] = 1 }
	p99 = val($4, "fast_p99_us"); if (p99 == "") p99 = val($4, "p99_us")
	cpu[key] = cpu[key] " " val($4, "agent_cpu_us")
	rps[key] = rps[key] " " val($4, "rps")
	lat[key] = lat[key] " " p99
	errs[key] += val($4, "errors") + 0
}
END {
	print "| workload | connections × in flight | agent | agent CPU µs / request | req/s | p99 µs | errors |"
	print "|---|---|---|---|---|---|---|"
	for (i = 1; i <= nk; i++) {
		split(order[i], k, "\t")
		printf "| %s | %s | %s | %.3f | %d | %.0f | %d |\n", k[1], k[2], k[3], median(cpu[order[i]]), median(rps[order[i]]), median(lat[order[i]]), errs[order[i]]
	}
}' "$OUT/results.tsv" | tee "$OUT/table.md"
echo "raw outputs in $OUT" >&2
