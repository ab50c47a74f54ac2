#!/usr/bin/env bash
# Re-creates vendor/candle-core: crates.io's candle-core (the version and
# checksum below, as Cargo.lock had them before the patch) with
# vendor/candle-core.patch applied; vendor/README.md says why. Only the
# library's own files are kept (src, LICENSE, Cargo.toml without the crate's
# tests, benches, examples and their dev-dependencies). To move to a newer
# Candle: change VERSION and SHA256, run this, fix the patch if it no longer
# applies, and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.11.1
SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
# The candle crates in Cargo.toml must be pinned to the version patched here
# (tests/it/vendor.rs checks it too): another would bring its own candle-core.
for crate in candle-core candle-nn candle-transformers; do
    if ! grep -q "^$crate = \"=$VERSION\"" Cargo.toml; then
        echo "Cargo.toml: $crate is not pinned to \"=$VERSION\", the version this script vendors" >&2
        exit 1
    fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL -o "$tmp/candle-core.crate" \
    "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate"
echo "$SHA256  $tmp/candle-core.crate" | sha256sum -c --quiet
tar -xzf "$tmp/candle-core.crate" -C "$tmp"
src="$tmp/candle-core-$VERSION"
rm -rf vendor/candle-core
mkdir -p vendor/candle-core
cp -r "$src/src" "$src/LICENSE" vendor/candle-core/
# Cargo.toml without the [[example]], [[test]], [[bench]] targets (their
# files are not kept) and the [dev-dependencies.*] tables they use.
awk '/^\[\[(example|test|bench)\]\]$/ || /^\[dev-dependencies/ { skip = 1; next }
     /^\[/ { skip = 0 }
     !skip' "$src/Cargo.toml" > vendor/candle-core/Cargo.toml
patch -s -p1 -d vendor/candle-core < vendor/candle-core.patch
echo "vendor/candle-core: candle-core $VERSION with vendor/candle-core.patch"
