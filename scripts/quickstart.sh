#!/usr/bin/env bash
# The quickstart: builds the gateway and the plugins the quickstart manifest loads (release
# profile), then runs it in the foreground on 127.0.0.1:8080 with examples/quickstart. Its
# configuration backups go to target/quickstart-backup. No external services.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p outpost -p outpost-policy-transform -p outpost-store-fs
exec target/release/outpost run --manifest examples/quickstart/outpost.toml "$@"
