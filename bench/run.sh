#!/usr/bin/env bash
# Outpost vs nginx reverse-proxy benchmark. Method and knobs: bench/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROUNDS=${BENCH_ROUNDS:-3} # nginx and outpost alternate; the report gives each metric's median
ONLY_NGINX=${BENCH_ONLY_NGINX:-0}
RESTART=${BENCH_RESTART:-0} # 1: a fresh process of each Outpost variant for every measured run
OUTPOST_BIN_SET=${OUTPOST_BIN:-}
OUTPOST_BIN=${OUTPOST_BIN:-$REPO/target/release/outpost}
RESULTS=$REPO/bench/results/latest.md
SIZES=(small 16k)
PROXY_CPU=1 # proxy under test
LOAD_CPU=0  # wrk and the backend

die() { echo "bench: $*" >&2; exit 1; }

# The two-sink variant's cap on Application Insights items, in words.
ai_cap() {
  case ${BENCH_AI_MAX_ITEMS:-} in
    "") echo "max_items_per_second unset (the build's default: 100 items/s since 2026-11-24, no cap before)" ;;
    0|0.0|00) echo "no cap" ;;
    *) echo "capped at $BENCH_AI_MAX_ITEMS items/s" ;;
  esac
}

# --- tools ------------------------------------------------------------------
install_tools() {
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  local pkgs=()
  if ! command -v nginx >/dev/null; then
    # nginx-light is enough (proxy + static files) and is what the numbers were taken with.
    if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
  fi
  command -v wrk >/dev/null || pkgs+=(wrk)
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
}
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then install_tools; fi
for t in taskset curl python3 awk; do command -v "$t" >/dev/null || die "$t is required"; done
[[ $(nproc) -ge 2 ]] || die "needs at least 2 CPUs (proxy on CPU $PROXY_CPU, load on CPU $LOAD_CPU)"

if [[ $ONLY_NGINX != 1 && ! -x $OUTPOST_BIN ]]; then
  die "no outpost binary at $OUTPOST_BIN
Build it first:  cargo build --release -p outpost
(or set OUTPOST_BIN, or BENCH_ONLY_NGINX=1 to measure nginx alone)"
fi

# --- processes --------------------------------------------------------------
TMP=$(mktemp -d -t outpost-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers drop to nobody when started as root
STARTED=()

cleanup() {
  local pid i
  for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STARTED[@]}"; do
    for i in {1..30}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  [[ ${BENCH_KEEP_TMP:-0} == 1 ]] && echo "bench: kept $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL PID LOG: until URL answers 2xx, or the process dies, or 10 s pass.
wait_http() {
  local i
  for i in {1..100}; do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "process $2 exited before $1 answered"; }
    sleep 0.1
  done
  cat "$3" >&2
  die "$1 did not answer within 10 s"
}

# start_nginx DIR CPU HTTP_BLOCK: foreground master (so $! is its pid), everything under DIR.
start_nginx() {
  local dir=$1 cpu=$2 body=$3
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  # The default (1000) makes nginx close client connections periodically; outpost does not.
  keepalive_requests 1000000;
$body
}
EOF
  taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
  STARTED+=($!)
  LAST_PID=$!
}

declare -A PORT PID RSS_MIB INGEST_PORT METRICS_PORT
VARIANTS=() # proxies measured, in order; nginx first (the ratio baseline)

mkdir -p "$TMP/www"
printf 'Hello, bench\n' >"$TMP/www/small" # 13 bytes
head -c 16384 /dev/zero | tr '\0' x >"$TMP/www/16k"
declare -A SIZE_BYTES=([small]=13 [16k]=16384)

BACKEND_PORT=$(free_port)
start_nginx "$TMP/backend" "$LOAD_CPU" "
  sendfile on;
  open_file_cache max=16;
  server { listen 127.0.0.1:$BACKEND_PORT; root $TMP/www; }"
wait_http "http://127.0.0.1:$BACKEND_PORT/small" "$LAST_PID" "$TMP/backend/error.log"

PORT[nginx]=$(free_port)
start_nginx "$TMP/nginx" "$PROXY_CPU" "
  upstream backend {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${PORT[nginx]};
    location /bench/ {
      proxy_pass http://backend/;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
PID[nginx]=$LAST_PID
VARIANTS+=(nginx)
wait_http "http://127.0.0.1:${PORT[nginx]}/bench/small" "${PID[nginx]}" "$TMP/nginx/error.log"

declare -A BIN_OF # each Outpost variant's binary

# launch_outpost NAME: starts the variant's process on its manifest and waits until it answers.
launch_outpost() {
  local name=$1 dir=$TMP/$1
  taskset -c "$PROXY_CPU" env ${OUTPOST_ENV:-} "${BIN_OF[$name]}" run --manifest "$dir/outpost.toml" >>"$dir/outpost.log" 2>&1 &
  STARTED+=($!)
  PID[$name]=$!
  wait_http "http://127.0.0.1:${PORT[$name]}/status-0123456789abcdef" "$!" "$dir/outpost.log"
  # Idle: ready, no proxied request served yet.
  RSS_MIB[$name]=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$name]}/status")
}

declare -A D_REQUESTS D_SENT D_SAMPLED D_LOST # summed over the variant's processes
# add_delivery NAME: adds what the variant's running process says its sinks delivered (the
# sinks' own counters as Prometheus shows them, which lag by up to one metrics snapshot).
add_delivery() {
  local name=$1 metrics sampled
  metrics=$(curl -fsS "http://127.0.0.1:${METRICS_PORT[$name]}/metrics") || die "$name: cannot read /metrics"
  metric_sum() { awk -v m="$1" '$1 ~ "^"m"({|$)" { s += $NF } END { printf "%d", s }' <<<"$metrics"; }
  sampled=$(awk '/^appinsights_items_dropped_total\{reason="sampling"\}/ { printf "%d", $NF }' <<<"$metrics")
  sampled=${sampled:-0}
  D_REQUESTS[$name]=$((${D_REQUESTS[$name]:-0} + $(metric_sum outpost_http_requests_total)))
  D_SENT[$name]=$((${D_SENT[$name]:-0} + $(metric_sum appinsights_items_sent_total)))
  D_SAMPLED[$name]=$((${D_SAMPLED[$name]:-0} + sampled))
  D_LOST[$name]=$((${D_LOST[$name]:-0} + $(metric_sum appinsights_items_dropped_total) - sampled + $(metric_sum outpost_telemetry_dropped_total)))
}

# restart_outpost NAME: stops the variant's process (after counting what its sinks delivered)
# and starts a new one on the same manifest and port.
restart_outpost() {
  local name=$1
  if [[ -n ${METRICS_PORT[$name]:-} ]]; then
    sleep 1.5 # the next metrics snapshot (every second with BENCH_RESTART=1)
    add_delivery "$name"
  fi
  kill -TERM "${PID[$name]}"
  wait "${PID[$name]}" 2>/dev/null || true
  launch_outpost "$name"
}

# start_outpost NAME API_JSON [EXTRA_MANIFEST_TOML]: one more outpost variant, measured against
# the same nginx.
start_outpost() {
  local name=$1 dir=$TMP/$1 port extra=${3:-}
  port=$(free_port)
  mkdir -p "$dir"
  cp "$2" "$dir/api.json"
  cat >"$dir/outpost.toml" <<EOF
[runtime]
worker_threads = 1

[log]
level = "warn"

[[listeners]]
name = "http"
address = "127.0.0.1:$port"

$extra

[config]
type = "file"
path = "api.json"
watch_interval_ms = 0
EOF
  BIN_OF[$name]=${BIN:-$OUTPOST_BIN}
  PORT[$name]=$port
  launch_outpost "$name"
  VARIANTS+=("$name")
}

if [[ $ONLY_NGINX != 1 ]]; then
  cat >"$TMP/api.json" <<EOF
{
  "backends": [{"id": "backend", "urls": ["http://127.0.0.1:$BACKEND_PORT"]}],
  "apis": [{
    "id": "bench", "path": "/bench", "backend": "backend", "subscription_required": false,
    "operations": [{"id": "all", "method": "*", "url_template": "/*"}]
  }]
}
EOF
  start_outpost outpost "$TMP/api.json"
  # Another build of the gateway on the plain API, alternating with this one in the same run:
  # an A/B comparison of two builds that the machine's drift between runs cannot blur.
  if [[ -n ${OUTPOST_BIN_B:-} ]]; then
    [[ -x $OUTPOST_BIN_B ]] || die "no outpost binary at OUTPOST_BIN_B=$OUTPOST_BIN_B"
    BIN=$OUTPOST_BIN_B start_outpost outpost-b "$TMP/api.json"
  fi
  # The same API with 10 no-op policies from a plugin library on every request: the cost of
  # the plugin ABI on the request path.
  FIXTURES=${OUTPOST_FIXTURES:-$(dirname "$OUTPOST_BIN")/liboutpost_fixture_policies.so}
  if [[ -f $FIXTURES ]]; then
    noops=$(printf '{"policy": "noop"},%.0s' {1..10})
    noops=${noops%,}
    cat >"$TMP/api-policies.json" <<EOF
{
  "backends": [{"id": "backend", "urls": ["http://127.0.0.1:$BACKEND_PORT"]}],
  "apis": [{
    "id": "bench", "path": "/bench", "backend": "backend", "subscription_required": false,
    "policies": {"inbound": [$noops]},
    "operations": [{"id": "all", "method": "*", "url_template": "/*"}]
  }]
}
EOF
    start_outpost outpost-10-policies "$TMP/api-policies.json" "[[plugins]]
name = \"fixtures\"
path = \"$FIXTURES\""
  else
    echo "bench: $FIXTURES missing (cargo build --release -p outpost-fixture-policies); skipping the policy variant" >&2
  fi
  # A realistic chain: subscription key, rate-limit-by-key counted in the memory cache,
  # set-header and cors (the request carries an Origin, so cors adds its headers).
  PLUGIN_DIR=$(dirname "$OUTPOST_BIN")
  if [[ -f $PLUGIN_DIR/liboutpost_policy_limits.so && -f $PLUGIN_DIR/liboutpost_policy_transform.so && -f $PLUGIN_DIR/liboutpost_cache_memory.so ]]; then
    cat >"$TMP/api-chain.json" <<EOF
{
  "backends": [{"id": "backend", "urls": ["http://127.0.0.1:$BACKEND_PORT"]}],
  "apis": [{
    "id": "bench", "path": "/bench", "backend": "backend", "subscription_required": true,
    "policies": {
      "inbound": [
        {"policy": "cors", "config": {"allowed_origins": ["https://app.example"]}},
        {"policy": "rate-limit-by-key", "config": {"calls": 1000000000, "renewal_period": 60, "counter_key": "{subscription.id}"}},
        {"policy": "set-header", "config": {"name": "x-gateway", "value": "outpost"}}
      ]
    },
    "operations": [{"id": "all", "method": "*", "url_template": "/*"}]
  }],
  "subscriptions": [{"id": "bench", "scope": {"type": "all"}, "primary_key": "bench-key-0123456789"}]
}
EOF
    start_outpost outpost-chain "$TMP/api-chain.json" "[[plugins]]
name = \"limits\"
path = \"$PLUGIN_DIR/liboutpost_policy_limits.so\"

[[plugins]]
name = \"transform\"
path = \"$PLUGIN_DIR/liboutpost_policy_transform.so\"

[[plugins]]
name = \"memory\"
path = \"$PLUGIN_DIR/liboutpost_cache_memory.so\"

[[caches]]
name = \"local\"
provider = \"cache-memory\""
  else
    echo "bench: policy-limits, policy-transform or cache-memory missing next to $OUTPOST_BIN; skipping the chain variant" >&2
  fi
  # The plain API with a telemetry sink: a record per request through the bounded queue to the
  # access-log plugin, which writes JSON lines to /dev/null (the cost of telemetry itself).
  ACCESS_LOG=${OUTPOST_ACCESS_LOG:-$(dirname "$OUTPOST_BIN")/liboutpost_sink_access_log.so}
  if [[ -f $ACCESS_LOG ]]; then
    start_outpost outpost-access-log "$TMP/api.json" "[[plugins]]
name = \"access\"
path = \"$ACCESS_LOG\"

[[telemetry.sinks]]
name = \"access\"
provider = \"access-log\"
config = { path = \"/dev/null\" }"
  else
    echo "bench: $ACCESS_LOG missing (cargo build --release -p outpost-sink-access-log); skipping the access-log variant" >&2
  fi
  # The plain API with both telemetry sinks of issue 6: Application Insights and Prometheus
  # (its own listener); with OUTPOST_BIN_B, the same for build B when its sink libraries sit
  # next to it. The ingestion endpoint is an nginx on the load CPU that accepts every batch
  # (one server per variant): it must keep up, or the sink drops what it cannot send and the
  # variant measures less work than it should (the drop counters are checked after the runs).
  APPINSIGHTS=${OUTPOST_APPINSIGHTS:-$(dirname "$OUTPOST_BIN")/liboutpost_sink_appinsights.so}
  PROMETHEUS=${OUTPOST_PROMETHEUS:-$(dirname "$OUTPOST_BIN")/liboutpost_sink_prometheus.so}
  TELEMETRY=() # "name|binary|appinsights library|prometheus library"
  if [[ -f $APPINSIGHTS && -f $PROMETHEUS ]]; then
    TELEMETRY+=("outpost-telemetry|$OUTPOST_BIN|$APPINSIGHTS|$PROMETHEUS")
  else
    echo "bench: $APPINSIGHTS or $PROMETHEUS missing; skipping the two-sink variant" >&2
  fi
  if [[ -n ${OUTPOST_BIN_B:-} ]]; then
    b_dir=$(dirname "$OUTPOST_BIN_B")
    if [[ -f $b_dir/liboutpost_sink_appinsights.so && -f $b_dir/liboutpost_sink_prometheus.so ]]; then
      TELEMETRY+=("outpost-b-telemetry|$OUTPOST_BIN_B|$b_dir/liboutpost_sink_appinsights.so|$b_dir/liboutpost_sink_prometheus.so")
    fi
  fi
  if ((${#TELEMETRY[@]})); then
    servers=""
    for t in "${TELEMETRY[@]}"; do
      name=${t%%|*}
      INGEST_PORT[$name]=$(free_port)
      servers+="
  server {
    listen 127.0.0.1:${INGEST_PORT[$name]};
    location = /v2.1/track {
      access_log $TMP/ingest/track-$name.log ingest;
      default_type application/json;
      return 200 '{\"itemsReceived\":0,\"itemsAccepted\":0,\"errors\":[]}';
    }
  }"
    done
    start_nginx "$TMP/ingest" "$LOAD_CPU" "
  client_max_body_size 64m;
  client_body_buffer_size 16m;
  log_format ingest '\$content_length \$status';$servers"
    for t in "${TELEMETRY[@]}"; do
      IFS='|' read -r name bin ai prom <<<"$t"
      wait_http "http://127.0.0.1:${INGEST_PORT[$name]}/v2.1/track" "$LAST_PID" "$TMP/ingest/error.log"
      METRICS_PORT[$name]=$(free_port)
      BIN=$bin start_outpost "$name" "$TMP/api.json" "$([[ $RESTART != 1 ]] || printf '[telemetry]\nmetrics_interval_ms = 1000\n')
[[plugins]]
name = \"appinsights\"
path = \"$ai\"

[[plugins]]
name = \"prometheus\"
path = \"$prom\"

[[telemetry.sinks]]
name = \"appinsights\"
provider = \"appinsights\"
config = { connection_string = \"InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:${INGEST_PORT[$name]}/\", sampling_percentage = ${BENCH_AI_SAMPLING:-100}${BENCH_AI_MAX_ITEMS:+, max_items_per_second = $BENCH_AI_MAX_ITEMS} }

[[telemetry.sinks]]
name = \"prometheus\"
provider = \"prometheus\"
config = { listen = \"127.0.0.1:${METRICS_PORT[$name]}\" }"
    done
  fi
fi

# --- measurement ------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)

# other_threads_ns PID: CPU time, in ns, of the process's threads other than its main one
# (the scheduler's own count, /proc/PID/task/TID/schedstat, not the 10 ms ticks of stat): for
# Outpost, the telemetry and sink threads, and the threads plugins start.
other_threads_ns() {
  local t total=0 ns
  for t in /proc/"$1"/task/*; do
    [[ ${t##*/} == "$1" ]] && continue
    read -r ns _ <"$t/schedstat" 2>/dev/null || continue
    total=$((total + ns))
  done
  echo "$total"
}

# cpu_ticks PID...: utime+stime summed (fields 14 and 15; comm may contain spaces).
cpu_ticks() {
  local pid total=0 stat rest f
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat")
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

# to_ms VALUE: wrk duration ("850.00us", "1.23ms", "1.01s", "2.00m") in ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : -1
    if (f < 0) { print "bad wrk duration: " v > "/dev/stderr"; exit 1 }
    printf "%.3f", n * f }'
}

# Every request carries a subscription key and an Origin: only the chain variant uses them.
REQ_HEADERS=(-H "Ocp-Apim-Subscription-Key: bench-key-0123456789" -H "Origin: https://app.example")
WRK=(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" --latency "${REQ_HEADERS[@]}")
declare -A RPS P50 P99 CPU_US CPU_PCT ERRORS
FAILED=()

# measure_proxy NAME PORT PATH: warm-up, then one measured wrk run; results keyed "NAME|PATH".
measure_proxy() {
  local name=$1 url="http://127.0.0.1:$2$3" key="$1|$3" out="$TMP/wrk-$1-${3//\//_}.txt"
  local pids t0 t1 c0 c1 requests
  # nginx's CPU is master + worker; outpost is one process.
  read -r -a pids <<<"${PID[$name]} $(pgrep -P "${PID[$name]}" | tr '\n' ' ' || true)"

  "${WRK[@]}" -d"$WARMUP" "$url" >/dev/null
  local perf_pid= stat_pid=
  if [[ -n ${BENCH_PERF:-} ]]; then
    command -v perf >/dev/null || die "BENCH_PERF needs perf (apt-get install linux-perf)"
    # Syscalls and context switches per request, for nginx and outpost alike.
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$(IFS=,; echo "${pids[*]}")" \
      -o "$TMP/stat-$name-${3//\//_}.txt" 2>/dev/null &
    stat_pid=$!
  fi
  if [[ -n ${BENCH_PERF:-} && $name != nginx ]]; then
    # Profile the measured run (it costs a little CPU; use it to find hot spots, not for numbers).
    perf record -q -F 1999 -g -p "${PID[$name]}" -o "$TMP/perf-$name-${3//\//_}.data" 2>/dev/null &
    perf_pid=$!
  fi
  local o0= o1=
  [[ $name != nginx ]] && o0=$(other_threads_ns "${PID[$name]}")
  c0=$(cpu_ticks "${pids[@]}"); t0=$(date +%s.%N)
  "${WRK[@]}" -d"$DURATION" "$url" >"$out"
  c1=$(cpu_ticks "${pids[@]}"); t1=$(date +%s.%N)
  [[ $name != nginx ]] && o1=$(other_threads_ns "${PID[$name]}")
  if [[ -n $stat_pid ]]; then
    kill -INT "$stat_pid"; wait "$stat_pid" || true
    awk -F, -v n="$(awk '/ requests in / { print $1 }' "$out")" -v who="$name $3" '
      $3 ~ /sys_enter/ { s = $1 } $3 ~ /context-switches/ { c = $1 }
      END { printf "bench: %s: %.2f syscalls/req, %.3f context switches/req\n", who, s / n, c / n }' \
      "$TMP/stat-$name-${3//\//_}.txt" >&2
  fi
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    perf report -q -i "$TMP/perf-$name-${3//\//_}.data" --no-children --sort symbol --stdio -g none 2>/dev/null | cut -c1-160 | sed "s/ *-* *-* *$//" \
      >"$REPO/bench/results/perf-$name-${3//\//_}.txt" 2>/dev/null || true
    echo "bench: profile in bench/results/perf-$name-${3//\//_}.txt" >&2
  fi

  requests=$(awk '/ requests in / { print $1 }' "$out")
  [[ -n $requests && $requests -gt 0 ]] || { cat "$out" >&2; die "$name $3: wrk completed no requests"; }
  RPS[$key]+="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out") "
  P50[$key]+="$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")") "
  P99[$key]+="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")") "
  local cpu_us
  cpu_us=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.3f", d / hz * 1e6 / n }')
  CPU_US[$key]+="$cpu_us "
  # Every measured run, unrounded, for the paired comparisons of the report (and for reanalysis).
  # The sixth column: the other threads' ns per request (empty for nginx).
  local other=
  [[ -n $o0 ]] && other=$(awk -v d=$((o1 - o0)) -v n="$requests" 'BEGIN { printf "%.1f", d / n }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${3#/bench/}" "$round" "$cpu_us" "$requests" "$other" >>"$TMP/rounds.tsv"
  CPU_PCT[$key]+="$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", d / hz / (t1 - t0) * 100 }') "
  # Both lines are printed only when non-zero.
  local errors
  errors=$(awk '
    /^ *Non-2xx or 3xx responses:/ { n += $NF }
    /^ *Socket errors:/ { for (i = 4; i <= NF; i += 2) n += $i }
    END { print n + 0 }' "$out")
  ERRORS[$key]=$((${ERRORS[$key]:-0} + errors))
  if [[ $errors != 0 ]]; then
    echo "bench: $name $3: $errors errors" >&2
    cat "$out" >&2
    FAILED+=("$name $3")
  fi
}

for size in "${SIZES[@]}"; do
  for name in "${VARIANTS[@]}"; do
    # A wrong route would still be "fast"; check status and body size first.
    got=$(curl -fsS "${REQ_HEADERS[@]}" -o /dev/null -w '%{size_download}' "http://127.0.0.1:${PORT[$name]}/bench/$size") ||
      die "$name: GET /bench/$size failed"
    [[ $got == "${SIZE_BYTES[$size]}" ]] || die "$name: /bench/$size returned $got bytes, expected ${SIZE_BYTES[$size]}"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for name in "${VARIANTS[@]}"; do
      echo "bench: $name /bench/$size round $round/$ROUNDS ($DURATION, $CONNECTIONS connections)" >&2
      if [[ $RESTART == 1 && $name != nginx ]]; then restart_outpost "$name"; fi
      measure_proxy "$name" "${PORT[$name]}" "/bench/$size"
    done
  done
done

declare -A DELIVERY # per two-sink variant: what its sinks delivered, for the report
if ((${#METRICS_PORT[@]})); then
  # What the two-sink variants delivered, once the next metrics snapshot has been taken
  # (every 15 s; every second with BENCH_RESTART=1).
  if [[ $RESTART == 1 ]]; then sleep 1.5; else sleep 16; fi
  for name in "${!METRICS_PORT[@]}"; do
    add_delivery "$name"
    bytes=$(awk '{ s += $1 } END { printf "%d", s }' "$TMP/ingest/track-$name.log")
    DELIVERY[$name]="${D_REQUESTS[$name]} requests, ${D_SENT[$name]} items accepted by the ingestion endpoint ($bytes gzip body bytes), ${D_SAMPLED[$name]} sampled out, ${D_LOST[$name]} lost"
    echo "bench: $name (Application Insights at ${BENCH_AI_SAMPLING:-100} % sampling, $(ai_cap), Prometheus): ${DELIVERY[$name]} (queue or buffer full, refused)" >&2
    if ((D_LOST[$name] > 0)); then
      echo "bench: WARNING: $name lost telemetry, so it measured less work than it should" >&2
    fi
  done
fi

# --- report -----------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# med "v1 v2 …": the median.
med() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# ratios "a1 a2 …" "b1 b2 …": each round's a/b, for showing the spread.
ratios() { paste -d' ' <(tr ' ' '\n' <<<"$1" | awk 'NF') <(tr ' ' '\n' <<<"$2" | awk 'NF') | awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 / $2 }'; }

report() {
  local size name k b
  echo "## Outpost vs nginx reverse proxy"
  echo
  echo "Medians of $ROUNDS alternating rounds; the last column shows each round's CPU ratio."
  echo
  echo "| proxy | size | req/s | p50 ms | p99 ms | CPU µs/req | proxy CPU % | req/s ×nginx | p50 ×nginx | p99 ×nginx | CPU ×nginx | errors | CPU ×nginx per round |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  local r p50 p99 cpu pct br bp50 bp99 bcpu
  for size in "${SIZES[@]}"; do
    b="nginx|/bench/$size"
    br=$(med "${RPS[$b]}"); bp50=$(med "${P50[$b]}"); bp99=$(med "${P99[$b]}"); bcpu=$(med "${CPU_US[$b]}")
    for name in "${VARIANTS[@]}"; do
      k="$name|/bench/$size"
      r=$(med "${RPS[$k]}"); p50=$(med "${P50[$k]}"); p99=$(med "${P99[$k]}")
      cpu=$(med "${CPU_US[$k]}"); pct=$(med "${CPU_PCT[$k]}")
      echo "| $name | $size | $r | $p50 | $p99 | $cpu | $pct |" \
        "$(ratio "$r" "$br") | $(ratio "$p50" "$bp50") |" \
        "$(ratio "$p99" "$bp99") | $(ratio "$cpu" "$bcpu") | ${ERRORS[$k]} | $(ratios "${CPU_US[$k]}" "${CPU_US[$b]}") |"
    done
  done
  echo
  for name in "${VARIANTS[@]}"; do
    if [[ -n ${RSS_MIB[$name]:-} ]]; then echo "- $name idle RSS: ${RSS_MIB[$name]} MiB"; fi
  done
  for name in "${VARIANTS[@]}"; do
    if [[ -n ${DELIVERY[$name]:-} ]]; then
      echo "- $name (Application Insights at ${BENCH_AI_SAMPLING:-100} % sampling, $(ai_cap), Prometheus): ${DELIVERY[$name]}"
    fi
  done
  echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo); $(uname -sr)"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'); wrk: $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
  echo "- outpost: $([[ $ONLY_NGINX == 1 ]] && echo "not measured" || echo "$OUTPOST_BIN")"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  local cmd="BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP BENCH_CONNECTIONS=$CONNECTIONS BENCH_ROUNDS=$ROUNDS"
  [[ $ONLY_NGINX == 1 ]] && cmd+=" BENCH_ONLY_NGINX=1"
  [[ $RESTART == 1 ]] && cmd+=" BENCH_RESTART=1"
  [[ -n ${OUTPOST_BIN_SET:-} ]] && cmd+=" OUTPOST_BIN=$OUTPOST_BIN"
  echo "- command: \`$cmd bench/run.sh\`"
  echo "- load: \`${WRK[*]} -d$DURATION http://127.0.0.1:PORT/bench/SIZE\` (after a $WARMUP warm-up); proxy on CPU $PROXY_CPU"
  if ((${#FAILED[@]})); then
    echo
    echo "**INVALID: errors in: $(IFS=,; echo "${FAILED[*]}")**"
  fi
}

# paired: each two-sink variant against the plain variant of its build, round by round (the
# rounds measure them seconds apart, so the ratio of a round is free of the machine's slower
# drift), with a bootstrap 95 % interval of the median (fixed seed: the same rounds give the
# same interval) and what that says about the target of at most 5 % more CPU per request.
paired() {
  python3 - "$TMP/rounds.tsv" "${VARIANTS[@]}" <<'PY'
import random, statistics, sys
path, variants = sys.argv[1], sys.argv[2:]
cpu, other = {}, {}
for line in open(path):
    f = line.rstrip("\n").split("\t")
    name, size, rnd, us = f[0], f[1], int(f[2]), float(f[3])
    cpu.setdefault((name, size), {})[rnd] = us
    if len(f) > 5 and f[5]:
        other.setdefault((name, size), {})[rnd] = float(f[5])
pairs = [(t, "outpost-b" if t.startswith("outpost-b-") else "outpost")
         for t in variants if t.endswith("-telemetry")]
pairs = [(t, b) for t, b in pairs if b in variants]
if not pairs:
    sys.exit(0)
print("\n### Both telemetry sinks over plain, CPU per request (target: at most +5 %)\n")
print("Each round's ratio of the two-sink variant's CPU µs per request to the plain variant's (same build, same round).\n")
print("| variant | size | rounds | median | 95 % interval of the median | mean | SD of a round | target |")
print("|---|---|---:|---:|---|---:|---:|---|")
for tele, base in pairs:
    for size in ("small", "16k"):
        a, b = cpu.get((tele, size), {}), cpu.get((base, size), {})
        r = [(a[k] / b[k] - 1) * 100 for k in sorted(a) if k in b and b[k] > 0]
        if not r:
            continue
        med = statistics.median(r)
        rng = random.Random(20261125)
        boot = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(4000))
        lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
        sd = statistics.stdev(r) if len(r) > 1 else float("nan")
        # Fewer than 10 rounds give no interval worth the name.
        verdict = ("cannot tell from %d rounds" % len(r) if len(r) < 10
                   else "met" if hi <= 5 else "missed" if lo > 5
                   else "cannot tell from %d rounds" % len(r))
        print(f"| {tele} | {size} | {len(r)} | {med:+.1f} % | {lo:+.1f} … {hi:+.1f} % | "
              f"{statistics.mean(r):+.1f} % | {sd:.1f} | {verdict} |")

def interval(r):
    rng = random.Random(20261125)
    boot = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(4000))
    return statistics.median(r), boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]

if other:
    print("\n### CPU of the threads besides the main one, ns per request\n")
    print("The telemetry and sink threads (and any a plugin starts), from the scheduler's count "
          "per thread: what the sinks cost directly, without what their work costs the request "
          "thread (caches, wake-ups). Median of the rounds, bootstrap 95 % interval.\n")
    print("| variant | size | rounds | median ns/req | 95 % interval |")
    print("|---|---|---:|---:|---|")
    for name in variants:
        for size in ("small", "16k"):
            r = list(other.get((name, size), {}).values())
            if r:
                med, lo, hi = interval(r)
                print(f"| {name} | {size} | {len(r)} | {med:.0f} | {lo:.0f} … {hi:.0f} |")

# Build B against build A, two-sink variant against two-sink variant, round by round.
if "outpost-b-telemetry" in variants and "outpost-telemetry" in variants:
    print("\n### Build B over build A, both sinks, CPU per request\n")
    print("| size | rounds | median | 95 % interval | other threads, median difference ns/req |")
    print("|---|---:|---:|---|---:|")
    for size in ("small", "16k"):
        a, b = cpu.get(("outpost-telemetry", size), {}), cpu.get(("outpost-b-telemetry", size), {})
        r = [(b[k] / a[k] - 1) * 100 for k in sorted(a) if k in b and a[k] > 0]
        if not r:
            continue
        med, lo, hi = interval(r)
        oa, ob = other.get(("outpost-telemetry", size), {}), other.get(("outpost-b-telemetry", size), {})
        d = [ob[k] - oa[k] for k in sorted(oa) if k in ob]
        dd = f"{statistics.median(d):+.0f}" if d else "—"
        print(f"| {size} | {len(r)} | {med:+.1f} % | {lo:+.1f} … {hi:+.1f} % | {dd} |")
PY
}

mkdir -p "$(dirname "$RESULTS")"
{ report; paired; } | tee "$RESULTS"
cp "$TMP/rounds.tsv" "$(dirname "$RESULTS")/rounds.tsv"
echo "bench: written to ${RESULTS#"$REPO"/}" >&2
((${#FAILED[@]} == 0)) || die "requests failed (see above); the numbers are not valid"
