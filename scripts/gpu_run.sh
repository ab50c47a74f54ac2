#!/usr/bin/env bash
# Runs a pack made by scripts/gpu_pack.sh on a GPU machine (no Rust needed):
# every test executable on CUDA, then `candle-rlhf bench` in bf16 and f32 on
# the GPU shapes (generation drawn on the device, and on the host for
# comparison), then the same workloads in PyTorch (scripts/bench_trl.py: TRL
# where its wheels came with the pack, transformers' generate always), with
# peak device memory sampled by nvidia-smi around each. Results (logs, bench
# JSON, nvidia-smi, summary.txt) go to RESULTS_DIR.
#
# Usage: scripts/gpu_run.sh PACK.tar.xz RESULTS_DIR [--tests-only|--bench-only]
#   (the pack's wheels/ folder, if any, sits beside PACK.tar.xz)
# Env:   SHAPES (default "gpt2 smollm2-135m qwen2.5-0.5b"), DTYPES (default "bf16 f32"),
#        BATCH_SIZES (generation batch sizes on both sides, default 1,16,64),
#        BENCH_ARGS (extra arguments of the main `bench` run), TEST_THREADS (default 4),
#        CANDLE_RLHF_TEST_DEVICE (default cuda), TORCH=0 to skip the PyTorch side,
#        BENCH_DEVICE (default cuda; cpu makes a dry run of this script on any machine),
#        PEAK_BF16 / PEAK_F32 (dense TFLOP/s for MFU; default from the GPU's name).
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
# bench reports the pack's commit (it runs outside a git checkout).
CANDLE_RLHF_COMMIT="$(sed -n 's/^commit: //p' "$work/PACK_INFO")"
export CANDLE_RLHF_COMMIT

if lib="$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)" && [[ -d "$lib" ]]; then
    export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
fi
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
nvidia-smi >"$results/nvidia-smi.txt" 2>&1
bin="$work/bin/candle-rlhf"
# Dense peak TFLOP/s of the tensor cores (bf16) and of plain f32, from the
# vendor's data sheets: H100 and H200 SXM 989 / 67, H100 PCIe 756 / 51.
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$gpu" in
    *H100*PCIe*) peak_bf16=756 peak_f32=51 ;;
    *H100* | *H200*) peak_bf16=989 peak_f32=67 ;;
    *) peak_bf16="" peak_f32="" ;;
esac
peak_bf16="${PEAK_BF16:-$peak_bf16}" peak_f32="${PEAK_F32:-$peak_f32}"

# with_memory TAG LOG COMMAND...: runs COMMAND (output to LOG) with
# nvidia-smi sampling device memory every 50 ms; prints "exit RC; peak
# device memory N MiB" (the whole GPU's use, the same for both sides).
with_memory() {
    local tag="$1" log="$2"
    shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$results/mem-$tag.txt" 2>/dev/null &
    local smi=$!
    "$@" >"$log" 2>&1
    local rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    local peak
    peak="$(sort -n "$results/mem-$tag.txt" | tail -1)"
    echo "exit $rc; peak device memory ${peak:-?} MiB"
    return $rc
}
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
    # The PyTorch side: TRL and datasets from the pack's wheels, if any.
    wheels="$(dirname "$pack")/wheels"
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheels"/*.whl &&
            export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    torch_parts="generate"
    python3 -c "import datasets; from trl import RewardTrainer; from trl.experimental.ppo import PPOTrainer" \
        2>"$results/trl-import.txt" && torch_parts="reward,generate,ppo"
    sizes="${BATCH_SIZES:-1,16,64}"
    for shape in ${SHAPES:-gpt2 smollm2-135m qwen2.5-0.5b}; do
        bench_dir="$work/bench/$shape"
        for dtype in ${DTYPES:-bf16 f32}; do
            tag="$shape-$dtype"
            peak="$peak_f32"
            [[ "$dtype" == bf16 ]] && peak="$peak_bf16"
            # shellcheck disable=SC2086
            line="$(with_memory "$tag" "$results/bench-$tag.log" "$bin" bench --model "$work/configs/models/$shape.toml" --device "${BENCH_DEVICE:-cuda}" \
                --dtype "$dtype" --work-dir "$bench_dir" ${peak:+--peak-tflops $peak} \
                --batch-sizes "$sizes" --json "$results/bench-$tag.json" ${BENCH_ARGS:-})" || status=1
            echo "bench $tag: $line" | tee -a "$results/summary.txt"
            # Generation with the tokens drawn on the host, as before on-device drawing.
            "$bin" bench --model "$work/configs/models/$shape.toml" --device "${BENCH_DEVICE:-cuda}" --dtype "$dtype" \
                --work-dir "$bench_dir" --parts generate --draw host --batch-sizes "$sizes" \
                --json "$results/bench-$tag-host-draw.json" >"$results/bench-$tag-host-draw.log" 2>&1 || status=1
            [[ "${TORCH:-1}" == 0 ]] && continue
            line="$(with_memory "torch-$tag" "$results/torch-$tag.log" python3 "$work/scripts/bench_trl.py" --shape "$work/configs/models/$shape.toml" \
                --work-dir "$bench_dir" --device "${BENCH_DEVICE:-cuda}" --dtype "$dtype" --parts "$torch_parts" --ppo-variants nogc \
                --batch-sizes "$sizes" --json "$results/torch-$tag.json")" || status=1
            echo "torch ($torch_parts) $tag: $line" | tee -a "$results/summary.txt"
        done
    done
fi
rm -rf "$work"
exit $status
