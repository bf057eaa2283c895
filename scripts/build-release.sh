#!/usr/bin/env bash
# The release build, exactly as the Dockerfile runs it (CI runs it too, so what the image
# builds is tested). Produces target/release/outpost and the first-party plugin libraries, and
# checks that the binary starts, accepts the shipped manifests and loads the plugins from a
# plugin directory laid out as in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p outpost -p outpost-policy-transform -p outpost-cache-memory -p outpost-sink-access-log \
    -p outpost-store-fs -p outpost-store-sqlite -p outpost-store-redis

bin=target/release/outpost
"$bin" --version
"$bin" check --manifest examples/quickstart/outpost.toml
"$bin" check --manifest examples/docker/outpost.toml

plugin_dir=$(mktemp -d)
trap 'rm -rf "$plugin_dir"' EXIT
cp target/release/liboutpost_policy_transform.so target/release/liboutpost_cache_memory.so \
    target/release/liboutpost_sink_access_log.so target/release/liboutpost_store_fs.so \
    target/release/liboutpost_store_sqlite.so target/release/liboutpost_store_redis.so "$plugin_dir/"
cat >"$plugin_dir/check.toml" <<EOF
[runtime]
plugin_dir = "$plugin_dir"

[[listeners]]
name = "http"
address = "127.0.0.1:0"

[[plugins]]
name = "basic"
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
config = { dir = "$plugin_dir/backup" }

[[caches]]
name = "local"
provider = "cache-memory"

[[telemetry.sinks]]
name = "access"
provider = "access-log"
config = { path = "-" }

[config]
type = "file"
path = "$PWD/examples/docker/api.json"
EOF
"$bin" plugins --manifest "$plugin_dir/check.toml"
"$bin" check --manifest "$plugin_dir/check.toml"
