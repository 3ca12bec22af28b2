"""Bytes a decode step moves, counted from shapes: the shared accounting of the benchmarks.

Used by `rocketkv bench` (`grid.py`: whole-model decode steps of every KV method) and
`benchmarks/bench_kernels.py` (per-layer kernel bytes, the Llama-3.1-8B H100 roofline).
Everything here is pure arithmetic on shapes; nothing is measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..methods.budget import RocketKVSplit, rocketkv_split
from ..methods.read_bytes import kv_read_bytes, kv_token_bytes
from .tables import fmt_bytes, print_table

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 peak
SECTOR_BYTES = 32  # DRAM -> L2 transfer granularity on NVIDIA GPUs

# Llama-3.1-8B (HF config.json)
LLAMA_8B = dict(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
    vocab=128256, tied_embeddings=False,
)


# ------------------------------------------------------------------- bytes from shapes
def sector_fraction(head_dim: int, top_r: int, elem_bytes: int) -> float:
    """Expected fraction of a [D]-row's DRAM sectors fetched from ONE of page_max/page_min.

    Row-major [P, D] metadata: a sector holds 32 / elem_bytes channels; it is fetched when any
    of the R selected channels in it reads that array (sign + reads max, - reads min, taken as
    a fair coin). Channels are taken as uniformly random (top-|q| is not, so this is a model).
    """
    per_sector = max(1, SECTOR_BYTES // elem_bytes)
    d, r = head_dim, top_r
    untouched = sum(
        math.comb(per_sector, j) * math.comb(d - per_sector, r - j) / math.comb(d, r) * 0.5**j
        for j in range(0, min(per_sector, r) + 1)
    )
    return 1.0 - untouched


def dense_layer_bytes(context: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """K and V of every cached token, one layer, batch 1."""
    return 2 * context * kv_heads * head_dim * elem_bytes


def sparse_layer_bytes(
    plan: RocketKVSplit, kv_heads: int, group: int, head_dim: int, elem_bytes: int,
    layout: str = "ideal",
) -> dict[str, float]:
    """Bytes of RocketKV's stage 2 for one layer, batch 1, cache of `plan.capacity` tokens
    (`plan` is the method's own budget split, `rocketkv_split`).

    layout: "ideal" = only the R selected elements of one of max/min per page (what the
    kernel requests; achieved by channel-major [B, K, D, P] metadata), "row-major" = DRAM
    sectors fetched from [B, K, P, D] metadata (`sector_fraction`).
    """
    pages = math.ceil(plan.capacity / plan.page_size)
    if layout == "ideal":
        meta = pages * plan.top_r * elem_bytes
    else:
        meta = 2 * pages * head_dim * elem_bytes * sector_fraction(
            head_dim, plan.top_r, elem_bytes
        )
    scores = 2 * group * pages * 4  # approx [G, P] f32 written by the kernel, read by top-k
    n_sel = plan.k_top
    attn = n_sel * 2 * head_dim * elem_bytes + 2 * n_sel * 4  # K/V rows + indices (w + r)
    parts = {"metadata": meta, "scores": scores, "attention": attn}
    parts = {k: v * kv_heads for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def llama_weight_bytes(cfg: dict, elem_bytes: int) -> int:
    """Weights read per decode step: all matrices, but one embedding row (a lookup)."""
    h, kvh, hd = cfg["hidden"], cfg["kv_heads"], cfg["head_dim"]
    attn = h * cfg["heads"] * hd * 2 + h * kvh * hd * 2  # q, o + k, v
    mlp = 3 * h * cfg["intermediate"]
    per_layer = attn + mlp + 2 * h  # + two RMSNorm vectors
    lm_head = cfg["vocab"] * h
    return (cfg["layers"] * per_layer + lm_head + h + h) * elem_bytes  # + final norm + 1 row



def print_roofline(
    context: int, new_tokens: int, batches: Sequence[int], budgets: Sequence[int],
    markdown: bool = False,
) -> None:
    """Llama-3.1-8B per-step bytes (weights + KV) and the H100 bound on decode speedup:
    full KV vs RocketKV's stage-2 reads (`sparse_layer_bytes`) at each budget, bf16."""
    cfg, e = LLAMA_8B, 2
    kv, g, d = cfg["kv_heads"], cfg["heads"] // cfg["kv_heads"], cfg["head_dim"]
    weights = llama_weight_bytes(cfg, e)
    seq = context + new_tokens
    full_kv = cfg["layers"] * dense_layer_bytes(seq, kv, d, e)
    rows = []
    for batch in batches:
        full = weights + batch * full_kv
        rows.append([str(batch), "full", "-", fmt_bytes(batch * full_kv), fmt_bytes(full),
                     f"{full / H100_HBM_BYTES_PER_S * 1e3:.2f}", "1.00x", "1.00x"])
        for budget in budgets:
            plan = rocketkv_split(budget, seq, new_tokens, d)
            ideal = batch * cfg["layers"] * sparse_layer_bytes(plan, kv, g, d, e)["total"]
            rowm = batch * cfg["layers"] * sparse_layer_bytes(plan, kv, g, d, e,
                                                              "row-major")["total"]
            rows.append([
                str(batch), "rocketkv", str(budget), fmt_bytes(ideal), fmt_bytes(weights + ideal),
                f"{(weights + ideal) / H100_HBM_BYTES_PER_S * 1e3:.2f}",
                f"{full / (weights + ideal):.2f}x", f"{full / (weights + rowm):.2f}x",
            ])
    print_table(
        f"Llama-3.1-8B roofline at {context // 1024}k context (+{new_tokens} new), "
        f"bf16, H100 HBM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s; weights read per step "
        f"{fmt_bytes(weights)}",
        ["batch", "method", "M", "KV bytes", "total bytes", "ms/step", "speedup bound",
         "bound (row-major meta)"],
        rows, markdown,
    )
    print("  KV bytes = 32 layers x (full: K+V of every token; rocketkv: stage-2 reads of the "
          "stage-1 cache).\n  Bound = full bytes / rocketkv bytes, i.e. a memory-bound step "
          "with perfect kernels.")


def cpu_name() -> str:
    """The CPU's model name (the cost model's calibration files are keyed by it too)."""
    from ..methods.cost_file import host_cpu

    return host_cpu()


# ------------------------------------------------------------- method-layer accounting
def model_dims(config) -> dict:
    """A ModelConfig as the LLAMA_8B-style dict `llama_weight_bytes` takes."""
    return dict(
        layers=config.num_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size, heads=config.num_heads,
        kv_heads=config.num_kv_heads, head_dim=config.head_dim, vocab=config.vocab_size,
        tied_embeddings=config.tie_word_embeddings,
    )


def read_split(plan, context: int) -> tuple[int, int]:
    """`plan.read_tokens(context)` split into (tokens attended exactly, tokens' worth read
    to choose them: page max/min for quest, R-channel bounds for hybrid / rocketkv, R key
    channels for sparq, every key for topk; 0 for dense methods)."""
    from ..methods import QuestPlan, SparQPlan, TopKPlan, TwoStagePlan
    from ..methods.base import cached_tokens

    total = plan.read_tokens(context)
    if isinstance(plan, TwoStagePlan) and not plan.stage2_dense:
        attended = min(plan.k_top, cached_tokens(context, plan.prompt_len, plan.prompt_budget))
    elif isinstance(plan, QuestPlan):
        attended = min(plan.num_pages * plan.page_size, context)
    elif isinstance(plan, SparQPlan):
        attended = min(plan.k_top, context)
    elif isinstance(plan, TopKPlan):
        attended = total - math.ceil(context / 2)  # values of k_top; all keys score
    else:
        attended = total
    return attended, total - attended


def llama31_8b_config(layers: int = LLAMA_8B["layers"], vocab: int = LLAMA_8B["vocab"]):
    """Llama-3.1-8B's ModelConfig (for planning methods in the H100 roofline), or its layer
    shapes (hidden 4096, 32 / 8 heads, head_dim 128, MLP 14336, llama3 RoPE scaling, 128k
    positions) with `layers` layers and a `vocab`-token vocabulary (the llama8b-shape model).
    Llama-3.1's bos/eos ids are kept only where the vocabulary holds them."""
    from ..models.config import ModelConfig, RopeScaling

    c = LLAMA_8B
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=c["hidden"],
        intermediate_size=c["intermediate"], num_layers=layers, num_heads=c["heads"],
        num_kv_heads=c["kv_heads"], head_dim=c["head_dim"], rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        bos_token_id=128000 if vocab > 128000 else None,
        eos_token_ids=(128001,) if vocab > 128001 else (),
    )


def print_method_roofline(
    methods: Sequence[str], context: int, new_tokens: int, batches: Sequence[int],
    budgets: Sequence[int], markdown: bool = False,
) -> dict:
    """The H100 bound for every method (not only rocketkv): Llama-3.1-8B, bf16, per-step bytes
    = weights + batch x `kv_read_bytes` at the last decode step (S = context + new_tokens),
    bound = full bytes / method bytes. Returns {method: {batch: {budget: bound}}}."""
    from ..methods import make_method
    from ..methods.base import MethodConfigError

    cfg, e = llama31_8b_config(), 2
    weights = llama_weight_bytes(LLAMA_8B, e)
    seq = context + new_tokens
    full_kv = kv_token_bytes(cfg, e) * seq
    out: dict = {}
    rows = []
    for m in methods:
        for batch in batches:
            cells = []
            for budget in budgets:
                try:
                    plan = make_method(m, budget).plan(cfg, context, new_tokens)
                except MethodConfigError:
                    cells.append("n/a")
                    continue
                kv = kv_read_bytes(plan, seq, cfg, e, batch)
                bound = (weights + batch * full_kv) / (weights + kv)
                out.setdefault(m, {}).setdefault(batch, {})[budget] = bound
                cells.append(f"{bound:.2f}x")
            rows.append([m, str(batch), *cells])
    print_table(
        f"H100 bound per method: Llama-3.1-8B (32 layers), {context // 1024}k context + "
        f"{new_tokens} new, bf16, {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s: full bytes / method "
        "bytes (weights + KV read per step, method-layer `read_tokens` accounting)",
        ["method", "batch", *(f"M={b}" for b in budgets)], rows, markdown,
    )
    return out
