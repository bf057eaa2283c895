#!/usr/bin/env bash
# The release build, exactly as the Dockerfile runs it (CI runs it too, so what the image
# builds is tested). Produces target/release/outpost and the first-party plugin libraries, and
# checks that the binary starts, accepts the shipped manifests and loads the plugins from a
# plugin directory laid out as in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every first-party plugin library the image ships (crate names); the image copies the staged
# directory target/release/plugins/, so this list is the only one.
PLUGINS=(
    outpost-policy-transform outpost-policy-access outpost-policy-limits outpost-policy-caching
    outpost-policy-telemetry outpost-cache-memory outpost-cache-redis
    outpost-sink-access-log outpost-sink-appinsights outpost-sink-prometheus
    outpost-store-fs outpost-store-sqlite outpost-store-redis
)
packages=(-p outpost)
for crate in "${PLUGINS[@]}"; do packages+=(-p "$crate"); done
cargo build --release --locked "${packages[@]}"

bin=target/release/outpost
"$bin" --version
"$bin" check --manifest examples/quickstart/outpost.toml
"$bin" check --manifest examples/docker/outpost.toml

# The image's plugin directory, staged: target/release/plugins/ holds exactly the libraries above.
plugin_dir=target/release/plugins
rm -rf "$plugin_dir"
mkdir -p "$plugin_dir"
for crate in "${PLUGINS[@]}"; do
    cp "target/release/lib${crate//-/_}.so" "$plugin_dir/"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/check.toml" <<EOF
[runtime]
plugin_dir = "$PWD/$plugin_dir"

[[listeners]]
name = "http"
address = "127.0.0.1:0"

[[plugins]]
name = "access-policies"
library = "outpost_policy_access"

[[plugins]]
name = "limits"
library = "outpost_policy_limits"

[[plugins]]
name = "caching"
library = "outpost_policy_caching"

[[plugins]]
name = "redis-cache"
library = "outpost_cache_redis"

[[plugins]]
name = "telemetry-policies"
library = "outpost_policy_telemetry"

[[plugins]]
name = "appinsights"
library = "outpost_sink_appinsights"

[[plugins]]
name = "prometheus"
library = "outpost_sink_prometheus"

[[plugins]]
name = "transform"
library = "outpost_policy_transform"

[[plugins]]
name = "memory"
library = "outpost_cache_memory"

[[plugins]]
name = "access"
library = "outpost_sink_access_log"

[[plugins]]
name = "fs"
library = "outpost_store_fs"

[[plugins]]
name = "sqlite"
library = "outpost_store_sqlite"

[[plugins]]
name = "redis"
library = "outpost_store_redis"

[backup]
store = "fs"
config = { dir = "$work/backup" }

[[caches]]
name = "local"
provider = "cache-memory"

# Connections open on first use: checking needs no Redis.
[[caches]]
name = "shared"
provider = "cache-redis"
config = { url = "redis://127.0.0.1:6379" }

[[telemetry.sinks]]
name = "access"
provider = "access-log"
config = { path = "-" }

# Nothing is contacted at check time; the Prometheus listener binds a free port.
[[telemetry.sinks]]
name = "appinsights"
provider = "appinsights"
config = { connection_string = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:9/" }

[[telemetry.sinks]]
name = "prometheus"
provider = "prometheus"
config = { listen = "127.0.0.1:0" }

[config]
type = "file"
path = "$PWD/examples/docker/api.json"
EOF
"$bin" plugins --manifest "$work/check.toml"
"$bin" check --manifest "$work/check.toml"
# Every staged library is loaded by the check manifest.
for lib in "$plugin_dir"/*.so; do
    name=$(basename "$lib" .so)
    grep -q "library = \"${name#lib}\"" "$work/check.toml" || { echo "build-release: $name is not checked" >&2; exit 1; }
done
