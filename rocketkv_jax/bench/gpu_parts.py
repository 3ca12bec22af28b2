"""Parts b-f of the GPU check (`benchmarks/gpu_check.py`): kernel timings, the decode step,
generate end to end, the cost-model calibration and the Mosaic GPU kernels' timings. Each
takes the check (options, time left, `add_row` that saves results after every measurement)
and its part's record.

Everything here is built from the library: the kernels' public functions, `measure.py`
(compiled decode steps, interleaved timing, compress, kernel operands, one row broadcast to
a batch), `roofline.py` (byte accounting), `grid.plan_methods`, `generate_ids` and
`calibrate.py`.
"""

from __future__ import annotations

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..engine.compile import drop_compiled_programs
from ..kernels import approx_scores, prefill_attention, sparse_decode_attention
from ..methods.read_bytes import kv_read_bytes
from ..models.plan import compress_layers
from . import measure
from .calibrate import time_call
from .grid import plan_methods
from .measure import broadcast_rows, make_operands
from .roofline import llama31_8b_config, llama_weight_bytes, model_dims

ELEM = 2  # bf16
BUDGETS = (256, 1024)  # rocketkv's token budgets in parts c and d
SMOKE_BUDGETS = (64,)


def _peaks(check):
    dev = check.results["device"] or {}
    return dev.get("peak_bytes_per_s"), dev.get("peak_bf16_flops")


def _fraction(x, peak):
    return None if peak is None else x / peak


def _time(check, f, *args, iters: int) -> float:
    return time_call(jax.jit(f), *args, iters=1 if check.smoke else iters,
                     repeats=1 if check.smoke else 3)


# ---------------------------------------------------------------------- b. kernels
def part_kernels(check, rec: dict) -> None:
    rec["what"] = (f"Each kernel against its jnp reference under XLA on this device, bf16, "
                   f"Llama-3.1-8B heads (8 KV, G = 4, D = 128); the Pallas backend is "
                   f"`{check.fast}` (the Mosaic GPU decode kernels: part f). Bytes and FLOPs "
                   "are counted from shapes (what the kernel must read: the selected K/V rows, "
                   "R channels of one bound per page; causal prefill FLOPs), the same count "
                   "for both implementations.")
    rec["columns"] = [("kernel", "kernel"), ("shape", "shape"), ("impl", "impl"),
                      ("ms", "ms"), ("bytes", "bytes"), ("GB/s", "GBps"),
                      ("TFLOP/s", "TFLOPs"), ("of peak", "of_peak"),
                      ("kernel speedup", "speedup")]
    bw_peak, flop_peak = _peaks(check)
    for case in _decode_cases(check, rec):
        _compare(check, rec, *case, peak=bw_peak)
    kv, g, d = _heads(check)
    for T in ((256,) if check.smoke else (8192, 32768)):
        if check.left() < 15:
            return
        keys = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(keys[0], (1, kv * g, T, d), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, kv, T, d), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, kv, T, d), jnp.bfloat16)
        lengths = jnp.full((1,), T, jnp.int32)
        flops = 4 * kv * g * d * T * (T + 1) / 2  # causal: QK^T and PV over seen keys
        _compare(check, rec, "prefill_attention", f"B1 T{T} causal",
                 lambda kern: functools.partial(prefill_attention, kernels=kern),
                 (q, k, v, lengths), flops=flops, peak=flop_peak, iters=3)


def _heads(check) -> tuple[int, int, int]:
    """(KV heads, G, D): Llama-3.1-8B's, or tiny ones in the smoke."""
    return (2, 2, 64) if check.smoke else (8, 4, 128)


def _decode_cases(check, rec):
    """(kernel, shape, make, args, nbytes) of the two decode kernels at a 128k-slot cache:
    sparse_decode_attention at batch 1 and 8, M = 1024 and 4096; approx_scores over its
    channel-major page bounds at batch 1 and 8. Operands are made as each case is reached,
    and none once the part is out of time (a note says so)."""
    kv, g, d = _heads(check)
    C = 1024 if check.smoke else 131072
    decode = [(2, 64)] if check.smoke else [(1, 1024), (1, 4096), (8, 1024), (8, 4096)]
    for B, m in decode:
        if check.left() < 8:
            rec.setdefault("notes", []).append(f"out of time before B={B} m={m}")
            return
        q, k, v, _, _, _ = make_operands(B, kv, g, d, C, 16, jnp.bfloat16)
        slots = jax.random.permutation(jax.random.key(m), C)[:m].astype(jnp.int32)
        slots = jnp.broadcast_to(slots, (B, kv, m))  # [B, K, m]
        yield ("sparse_decode_attention", f"B{B} C{C // 1024}k m{m}",
               lambda kern: functools.partial(sparse_decode_attention, kernels=kern),
               (q, k, v, slots), B * kv * m * (2 * d * ELEM + 4))
        del q, k, v
    page, r = 16, (8 if check.smoke else 32)
    for B in ((2,) if check.smoke else (1, 8)):
        if check.left() < 8:
            rec.setdefault("notes", []).append(f"out of time before approx_scores B={B}")
            return
        q, _, _, pmax, pmin, lengths = make_operands(B, kv, g, d, C, page, jnp.bfloat16)
        pmax, pmin = jnp.swapaxes(pmax, 2, 3), jnp.swapaxes(pmin, 2, 3)  # [B, K, D, P]
        channels = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32) * (d // r), (B, kv, r))
        P = pmax.shape[-1]
        yield ("approx_scores", f"B{B} P{P} page{page} R{r}",
               lambda kern: functools.partial(approx_scores, page_size=page, kernels=kern,
                                              channel_major=True),
               (q, pmax, pmin, channels, lengths),
               B * kv * P * (r * ELEM + g * 4))  # R channels of one bound; f32 scores
        del q, pmax, pmin


def _compare(check, rec, name, shape, make, args, nbytes=None, *, flops=None, peak=None,
             iters=20, impls=None, context=None):
    """Time the implementations `impls` (backend names; default the Pallas backend and the
    reference) on the same arguments, each inside `context(impl)` if given: a row each, a
    kernel's with its speedup over the reference and Mosaic's with Triton's time over its
    own ('vs triton') where both ran."""
    done = {}
    for impl in impls or (check.fast, "reference"):
        row = {"kernel": name, "shape": shape, "impl": impl, "bytes": nbytes}
        try:
            with context(impl) if context else contextlib.nullcontext():
                t = _time(check, make(impl), *args, iters=iters)
        except Exception as e:  # noqa: BLE001 - one failing shape must not end the part
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            check.add_row(rec, row)
            continue
        rate = (nbytes or flops) / t
        row.update(ms=t * 1e3, GBps=nbytes / t / 1e9 if nbytes else None,
                   TFLOPs=flops / t / 1e12 if flops else None, of_peak=_fraction(rate, peak))
        done[impl] = (row, t)
        check.add_row(rec, row)
    for impl, (row, t) in done.items():
        if "reference" in done and impl != "reference":
            row["speedup"] = done["reference"][1] / t
    if "mosaic" in done and check.fast in done:
        done["mosaic"][0]["vs_triton"] = done[check.fast][1] / done["mosaic"][1]
    check.save()


# ----------------------------------------------------------------------- c. decode
def model_8b(check):
    """Llama-3.1-8B's shape with random bf16 weights, 32 layers and the real vocabulary (a
    2-layer toy model in the smoke), kept for part d."""
    if "model" not in check.state:
        from ..models.params import device_random_params

        cfg = measure.TINY_CONFIG if check.smoke else llama31_8b_config()
        t0 = time.perf_counter()
        params = jax.block_until_ready(device_random_params(cfg, dtype=jnp.bfloat16))
        check.state["model"] = (cfg, params, time.perf_counter() - t0)
    return check.state["model"]


def _batch_struct(x, B: int):
    return jax.ShapeDtypeStruct((x.shape[0], B, *x.shape[2:]), x.dtype)


def part_decode(check, rec: dict) -> None:
    cfg, params, init_s = model_8b(check)
    N = 16 if check.smoke else 256
    cells = [(256, 2)] if check.smoke else [(32768, 1), (32768, 8), (131072, 1)]
    budgets = SMOKE_BUDGETS if check.smoke else BUDGETS
    weights = llama_weight_bytes(model_dims(cfg), ELEM)
    rec["what"] = (
        f"One decode step ({cfg.num_layers} layers, bf16, random weights, "
        f"{weights / 1e9:.1f} GB of weights read per step), full KV against rocketkv "
        f"(kernels auto = {check.fast}), each method interleaved step by step with full KV "
        "(median of the timed steps after 2 warm-up). byte bound = (weights + full KV bytes) "
        "/ (weights + the method's bytes), the speedup of a purely memory-bound step; 'of "
        "bound' = speedup / byte bound. Caches come from random k/v (stage 1 compresses "
        "them), compressed at batch 1 and repeated to B rows.")
    rec["notes"] = [f"weights drawn on the device in {init_s:.1f} s"]
    rec["columns"] = [("T", "T"), ("B", "B"), ("method", "method"), ("step ms", "ms"),
                      ("speedup", "speedup"), ("byte bound", "byte_bound"),
                      ("of bound", "of_bound"), ("step GB/s", "GBps"),
                      ("of peak BW", "of_peak"), ("path", "path")]
    bw_peak, _ = _peaks(check)
    kernels = check.fast
    for T, B in cells:
        if check.left() < (10 if check.smoke else 25):
            rec["notes"].append(f"out of time before T={T} B={B}")
            return
        try:
            _decode_cell(check, rec, cfg, params, T, B, N, budgets, kernels, weights, bw_peak)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, next cell
            check.add_row(rec, {"T": T, "B": B, "method": "-",
                                "path": f"{type(e).__name__}: {str(e)[:300]}"})
        drop_compiled_programs()


def _decode_cell(check, rec, cfg, params, T, B, N, budgets, kernels, weights, bw_peak):
    plans = {"full": plan_methods(cfg, ["full"], None, T, N, kernels=kernels)["full"]}
    for M in budgets:
        plans[f"rocketkv M={M}"] = plan_methods(cfg, ["rocketkv"], M, T, N,
                                                kernels=kernels)["rocketkv"]
    bad = {m: p for m, p in plans.items() if isinstance(p, str)}
    if bad:
        raise ValueError(f"plans failed: {bad}")
    cap = measure.synthetic_capture(cfg, T, 1, dtype=jnp.bfloat16)
    structs = [_batch_struct(x, B) for x in (cap.k, cap.v, cap.q)]
    caches = {}
    for m, p in plans.items():
        one, _ = measure.compress_cache(p, cap)
        want = jax.eval_shape(lambda k, v, q, n, p=p: compress_layers(p, k, v, q, n), *structs,
                              jax.ShapeDtypeStruct((B,), jnp.int32))  # the batch of B rows
        caches[m] = broadcast_rows(one, want)
        del one
    del cap
    steps = {m: measure.compile_step(cfg, p, params, caches[m], B).fn for m, p in plans.items()}
    times = measure.time_interleaved(steps, caches, params, B=B, T=T, warmup=2,
                                iters=3 if check.smoke else 8)
    del caches
    full_t = measure.median(times["full"])
    S = T + 1
    full_kv = kv_read_bytes(plans["full"], S, cfg, ELEM, B)
    for m, p in plans.items():
        t = measure.median(times[m])
        kv = kv_read_bytes(p, S, cfg, ELEM, B)
        bound = (weights + full_kv) / (weights + kv)
        d = p.describe()
        path = d.get("fallback") or ("sparse" if not d.get("dense") else "dense")
        check.add_row(rec, {
            "T": T, "B": B, "method": m, "ms": t * 1e3, "speedup": full_t / t,
            "byte_bound": bound, "of_bound": full_t / t / bound,
            "GBps": (weights + kv) / t / 1e9, "of_peak": _fraction((weights + kv) / t, bw_peak),
            "path": f"{path}, kernels {d.get('kernels')}", "times_s": times[m],
            "kv_read_bytes": kv,
        })


# --------------------------------------------------------------------- d. generate
def part_generate(check, rec: dict) -> None:
    from ..engine.generate import generate_ids
    from ..methods import make_method

    cfg, params, _ = model_8b(check)
    T, N = (256, 16) if check.smoke else (32768, 256)
    rec["what"] = (f"`generate_ids` end to end, batch 1, a {T}-token prompt (random ids) and "
                   f"{N} new tokens (no stop token), kernels auto, prefill in chunks of "
                   "4096; compile time is reported apart. e2e = prefill + decode seconds.")
    rec["columns"] = [("method", "method"), ("compile s", "compile_s"),
                      ("prefill s", "prefill_s"), ("prefill tok/s", "prefill_tps"),
                      ("decode tok/s", "decode_tps"), ("e2e s", "e2e_s"),
                      ("e2e speedup", "speedup"), ("kernels", "kernels")]
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, T).tolist()
    methods = [("full", None)] + [("rocketkv", M) for M in (SMOKE_BUDGETS if check.smoke
                                                            else BUDGETS)]
    full_e2e = None
    for name, M in methods:
        if check.left() < (10 if check.smoke else 30):
            rec.setdefault("notes", []).append(f"out of time before {name} M={M}")
            return
        method = make_method(name, M, kernels="auto" if not check.smoke else check.fast)
        out = generate_ids(params, cfg, [prompt], method, max_new_tokens=N, stop_ids=(),
                           kernels="auto" if not check.smoke else check.fast)
        s = out.stats
        e2e = s.prefill_s + s.decode_s
        full_e2e = full_e2e or e2e
        check.add_row(rec, {
            "method": name if M is None else f"{name} M={M}", "compile_s": s.compile_s,
            "prefill_s": s.prefill_s, "prefill_tps": s.prefill_tokens_per_s,
            "decode_tps": s.decode_tokens_per_s, "e2e_s": e2e, "speedup": full_e2e / e2e,
            "kernels": s.kernels, "generated": s.generated_tokens, "summary": s.summary(),
        })
        del out
        jax.clear_caches()


# -------------------------------------------------------------------- e. calibrate
def part_calibrate(check, rec: dict) -> None:
    import io

    from ..methods import cost_file
    from ..methods.cost import BUILTIN_CONSTANTS
    from . import calibrate

    shape = "tiny" if check.smoke else "gpu"
    rec["what"] = (f"`rocketkv bench --calibrate --calibrate-shape {shape}`: the dense "
                   "fallback's constants measured here, per backend, beside the built-ins. "
                   "To use them on such a device, copy the file into "
                   "~/.cache/rocketkv_jax/cost/ (its name is the device's) or point "
                   "ROCKETKV_JAX_COST_FILE at it.")
    path = check.out / "cost-constants.json"
    buf = io.StringIO()
    calibrate.run(shape, path, out=buf)
    rec["notes"] = buf.getvalue().splitlines()
    _, measured = cost_file.read(path)
    rec["columns"] = [("backend", "backend"), ("source", "source")] + [
        (n, n) for n in ("score_bytes", "rank_bytes", "gather_factor", "metadata_factor",
                         "key_channel_factor")]
    for b, c in measured.items():
        check.add_row(rec, {"backend": b, "source": "measured", **c.as_dict()})
        check.add_row(rec, {"backend": b, "source": "built-in",
                            **BUILTIN_CONSTANTS[b].as_dict()})
    rec["notes"].append(f"file: {path.name} (default name here: "
                        f"{cost_file.default_path().name})")


# ----------------------------------------------------------------------- f. mosaic
def part_mosaic(check, rec: dict) -> None:
    """The Mosaic GPU decode kernels timed beside the Triton ones, at part b's shapes. The
    last part, because it runs kernels that no GPU has run before: what they cost if they
    fail, crash or never return is this part alone (everything else is saved by then, and
    gpu_check's watchdog ends a call that never returns). The smoke runs them in the Mosaic
    GPU interpreter where this JAX has one."""
    from ..kernels.backend import mosaic_jax_ok, mosaic_missing

    rec["what"] = (f"The Mosaic GPU decode kernels (`mosaic`) against the `{check.fast}` ones "
                   "on the same operands as part b (bf16, Llama-3.1-8B heads, 128k slots), "
                   "timed one after the other. 'vs triton' = Triton's time / Mosaic's (the "
                   "target is >= 0.9); 'of peak' = GB/s on the kernel's own bytes over the "
                   "card's HBM bandwidth (the target is >= 0.6). Their correctness on this "
                   "GPU: part a's second pytest run.")
    rec["columns"] = [("kernel", "kernel"), ("shape", "shape"), ("impl", "impl"),
                      ("ms", "ms"), ("bytes", "bytes"), ("GB/s", "GBps"),
                      ("of peak", "of_peak"), ("vs triton", "vs_triton")]
    missing = ("" if mosaic_jax_ok() else mosaic_missing()) if check.smoke else mosaic_missing()
    if missing:
        rec["notes"] = [f"not run: {missing}"]
        return
    if check.smoke:
        rec["notes"] = ["smoke: the Mosaic kernels run in the Mosaic GPU interpreter"]
    bw_peak, _ = _peaks(check)
    for case in _decode_cases(check, rec):
        _compare(check, rec, *case, peak=bw_peak, impls=(check.fast, "mosaic"),
                 context=functools.partial(_mosaic_context, check.smoke))


def _mosaic_context(smoke: bool, impl: str):
    """The Mosaic GPU interpreter around a smoke's Mosaic kernels (traced, compiled and run
    inside it); nothing otherwise."""
    if not (smoke and impl == "mosaic"):
        return contextlib.nullcontext()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())
