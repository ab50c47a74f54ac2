#!/usr/bin/env bash
# Measures what CI costs: a clean build of the tests, then the test run, in a
# throwaway target directory so the normal one is kept. Prints both in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
start=$(date +%s)
CARGO_TARGET_DIR="$target" cargo test --no-run --quiet
built=$(date +%s)
CARGO_TARGET_DIR="$target" cargo test --quiet
done_=$(date +%s)
echo "clean test build: $((built - start)) s; test run: $((done_ - built)) s; cores: $(nproc); commit: $(git rev-parse --short HEAD)"
