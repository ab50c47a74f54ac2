#!/usr/bin/env bash
# Runs a pack made by scripts/gpu_pack.sh on a GPU machine (no Rust needed):
# every test executable on CUDA, then `candle-rlhf bench` in bf16 and f32 on
# the GPU shapes, with peak device memory sampled by nvidia-smi. Results
# (logs, bench JSON, nvidia-smi) go to RESULTS_DIR.
#
# Usage: scripts/gpu_run.sh PACK.tar.xz RESULTS_DIR [--tests-only|--bench-only]
# Env:   SHAPES (default "gpt2 smollm2-135m qwen2.5-0.5b"), DTYPES (default "bf16 f32"),
#        BENCH_ARGS (extra `bench` arguments, default --batch-sizes 1,16,64), TEST_THREADS (default 4),
#        CANDLE_RLHF_TEST_DEVICE (default cuda).
# Needs at run time: the driver's libcuda.so.1 and CUDA 13's libcudart,
# libcublas, libcublasLt and libcurand; PyTorch's pip wheels carry them in
# site-packages/nvidia/cu13/lib, which is put on LD_LIBRARY_PATH when found.
set -uo pipefail
pack="$1"
results="$(mkdir -p "$2" && cd "$2" && pwd)"
what="${3:-all}"
work="$(mktemp -d)"
tar -C "$work" -xJf "$pack" || exit 1
cp "$work/PACK_INFO" "$results/"

if lib="$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)" && [[ -d "$lib" ]]; then
    export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
fi
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
nvidia-smi >"$results/nvidia-smi.txt" 2>&1
bin="$work/bin/candle-rlhf"
ldd "$bin" | grep -E "cuda|cublas|curand" >"$results/ldd.txt"

status=0
if [[ "$what" != "--bench-only" ]]; then
    export CANDLE_RLHF_BIN="$bin" CANDLE_RLHF_REPO="$work"
    export CANDLE_RLHF_TEST_DEVICE="${CANDLE_RLHF_TEST_DEVICE:-cuda}"
    for t in "$work"/tests/*; do
        [[ -f "$t" && -x "$t" ]] || continue
        name="$(basename "$t")"
        (cd "$work" && "$t" --test-threads="${TEST_THREADS:-4}") >"$results/test-$name.log" 2>&1
        rc=$?
        echo "$name: exit $rc; $(grep -E '^test result' "$results/test-$name.log" | tail -1)" | tee -a "$results/summary.txt"
        [[ $rc -eq 0 ]] || status=1
    done
fi

if [[ "$what" != "--tests-only" ]]; then
    for shape in ${SHAPES:-gpt2 smollm2-135m qwen2.5-0.5b}; do
        for dtype in ${DTYPES:-bf16 f32}; do
            tag="$shape-$dtype"
            # Peak device memory: nvidia-smi sampled every 50 ms during the run.
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$results/mem-$tag.txt" 2>/dev/null &
            smi=$!
            # shellcheck disable=SC2086
            "$bin" bench --model "$work/configs/models/$shape.toml" --device cuda --dtype "$dtype" \
                --json "$results/bench-$tag.json" ${BENCH_ARGS:---batch-sizes 1,16,64} >"$results/bench-$tag.log" 2>&1
            rc=$?
            kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
            peak="$(sort -n "$results/mem-$tag.txt" | tail -1)"
            echo "bench $tag: exit $rc; peak device memory ${peak:-?} MiB" | tee -a "$results/summary.txt"
            [[ $rc -eq 0 ]] || status=1
        done
    done
fi
rm -rf "$work"
exit $status
