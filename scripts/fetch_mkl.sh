#!/usr/bin/env bash
# Fetches Intel oneMKL for `cargo build --features mkl` without the network
# access Candle's route needs: candle-core's `mkl` feature builds
# intel-mkl-src, which links a local MKL it finds under $MKLROOT and
# otherwise downloads one from a container registry (ghcr.io). This script
# takes MKL's own wheels from PyPI instead (versions and hashes pinned in
# scripts/mkl-requirements.txt), unpacks the four static libraries of the
# LP64 + Intel OpenMP configuration Candle asks for, and mkl.h, into .mkl/
# (ignored by git). Then:
#
#     export MKLROOT=$PWD/.mkl
#     cargo build --release --features mkl
#
# The binary links MKL statically and needs nothing at run time. Not run by
# CI. Needs python3 with pip and access to PyPI; x86_64 Linux only.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.mkl}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 \
    --require-hashes -r scripts/mkl-requirements.txt -d "$tmp"
mkdir -p "$out/lib" "$out/include"
python3 - "$tmp" "$out" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wanted = {
    "libmkl_intel_lp64.a": "lib", "libmkl_intel_thread.a": "lib",
    "libmkl_core.a": "lib", "libiomp5.a": "lib", "mkl.h": "include",
}
found = set()
for wheel in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if base in wanted and ("/lib/" in name or "/include/" in name):
                with open(os.path.join(out, wanted[base], base), "wb") as f:
                    f.write(z.read(name))
                found.add(base)
missing = sorted(set(wanted) - found)
if missing:
    sys.exit(f"fetch_mkl.sh: the wheels lack {', '.join(missing)}")
PY
echo "MKL unpacked into $out; now: export MKLROOT=$PWD/$out && cargo build --release --features mkl"
