#!/usr/bin/env bash
# The release build, exactly as the Dockerfile runs it (CI runs it too, so what the image
# builds is tested). Produces target/release/outpost and checks that it starts and that the
# shipped manifests are valid.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p outpost

bin=target/release/outpost
"$bin" --version
"$bin" check --manifest examples/quickstart/outpost.toml
"$bin" check --manifest examples/docker/outpost.toml
