#!/usr/bin/env bash
# The test suite: builds the whole workspace once (the gateway binary and every plugin cdylib
# the end-to-end tests load), then runs every test against that build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --locked
cargo nextest run --workspace --locked "$@"
# nextest does not run documentation examples; the SDK's are part of what plugin authors read.
if [ "$#" -eq 0 ]; then
    cargo test --workspace --doc --locked
fi
