#!/usr/bin/env bash
# The GPU record (docs/benchmarks.md, "GPU record"): one script, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_record/)
#
# Writes OUT_DIR/gpu_record.md (every table, the device, torch and the commit) and the JSON rows:
#   1. stage-1 step time and peak memory, mnist / cifar10 / celeba64 at their per-GPU batch, fp32 / bf16 / fp16
#      (bench_train.py; bf16 is skipped by Precision where the GPU has no native bf16);
#   2. the same step with --checkpoint-activations (memory saver) at fp32;
#   3. sampling: EVaLP on all groups and EVaLP + SIR(1000) against the Gaussian prior (bench_sampling.py);
#   4. a 2-rank NCCL stage-1 run of 30 steps when more than one GPU is present.
# Every stage has its own time limit, within a 7.5-minute budget, so that one slow stage cannot take the record
# with it.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_record}}"
mkdir -p "$OUT_DIR"
RECORD="$OUT_DIR/gpu_record.md"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_check.sh: no CUDA device visible (torch.cuda.device_count() = 0)" >&2
    exit 2
fi

DEADLINE=$((SECONDS + 450))  # 7.5 minutes for all stages together

section() {  # section TITLE LIMIT_S COMMAND...: run COMMAND with a time limit, tee its output into the record
    local title="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        printf '\n## %s\n\nskipped: the 7.5-minute budget is spent\n' "$title" >>"$RECORD"
        return
    fi
    {
        echo
        echo "## $title"
        echo
        echo '```'
        echo "\$ $*"
    } >>"$RECORD"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$RECORD"
    local status=${PIPESTATUS[0]}
    {
        echo "(exit $status, $((SECONDS - start)) s)"
        echo '```'
    } >>"$RECORD"
}

{
    echo "# GPU record"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}'); [print(f'- GPU {i}: {torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB') for i in range(torch.cuda.device_count())]"
} >"$RECORD"

# 1-2. Stage-1 steps: per-GPU batches of the presets (mnist 200, cifar10 32, celeba64 16).
for spec in "mnist 200" "cifar10 32" "celeba64 16"; do
    set -- $spec
    section "Stage-1 step, $1, batch $2" 100 python benchmarks/bench_train.py --device cuda --presets "$1" --batch "$2" \
        --precisions fp32 bf16 fp16 --variants eager --rounds 1 --steps 5 --warmup 2 --json "$OUT_DIR/train_$1.json"
    section "Activation checkpointing, $1, batch $2, fp32" 60 python benchmarks/bench_train.py --device cuda --presets "$1" \
        --batch "$2" --variants eager ckpt --rounds 1 --steps 5 --warmup 2 --json "$OUT_DIR/ckpt_$1.json"
done

# 3. Sampling cost against the Gaussian prior (the published --groups top and the default all).
section "Sampling, EVaLP and SIR(1000) vs the Gaussian prior" 90 python benchmarks/bench_sampling.py --device cuda \
    --presets mnist cifar10 celeba64 --batch 64 --sir 1000 --repeats 5 --no-memory

# 4. Two ranks over NCCL (bundled MNIST, 30 steps, bf16), only with two GPUs or more.
if [ "$GPUS" -ge 2 ]; then
    section "2-rank NCCL stage-1 run" 90 torchrun --standalone --nproc_per_node=2 scripts/train_nvae.py --preset mnist \
        --dataset mnist --max-steps 30 --log-every 10 --eval-batches 2 --bn-readjust-batches 2 --precision bf16 \
        --save "$OUT_DIR/ddp_run"
    tail -n 5 "$OUT_DIR/ddp_run/train.log" >>"$RECORD" 2>/dev/null
else
    printf '\n## 2-rank NCCL stage-1 run\n\nskipped: one GPU visible\n' >>"$RECORD"
fi
echo "wrote $RECORD"
