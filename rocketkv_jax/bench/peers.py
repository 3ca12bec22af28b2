"""Peers for `rocketkv bench`: our jitted `generate_ids` vs Hugging Face transformers
`generate` (torch CPU, float32, full dynamic cache, greedy) and kvpress' SnapKV, on the same
machine, model (SmolLM2 from the same GGUF), prompt ids and new-token count.

The torch runs happen in subprocesses of `peer_hf.py` (one per round and interpreter),
so torch and JAX never share a process, and kvpress can run from its own venv: kvpress 0.5.5
pins transformers<5.3 while this project uses transformers 5.x >= 5.3. Rounds interleave
ours and theirs; medians over rounds are reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..engine.generate import generate_ids
from ..methods import make_method
from .tables import print_table

PEER_SCRIPT = Path(__file__).with_name("peer_hf.py")  # run by path: imports no rocketkv_jax
KVPRESS_ENV = "ROCKETKV_BENCH_KVPRESS_PYTHON"


class PeerError(RuntimeError):
    """A peer subprocess failed."""


def find_kvpress_python(explicit: str | None) -> tuple[str | None, str]:
    """(interpreter that can import kvpress, or None; why not / where from)."""
    if explicit:
        return explicit, "--kvpress-python"
    if os.environ.get(KVPRESS_ENV):
        return os.environ[KVPRESS_ENV], f"${KVPRESS_ENV}"
    if importlib.util.find_spec("kvpress") is not None:
        return sys.executable, "this interpreter"
    import transformers

    return None, (
        "kvpress is not installed here. kvpress 0.5.5 requires transformers<5.3 (this venv has "
        f"{transformers.__version__}) and would downgrade it, so it belongs in a throwaway "
        "venv (see docs/benchmarks.md); pass its python with --kvpress-python or "
        f"${KVPRESS_ENV}"
    )


def run_peer_script(python: str, gguf: str, ids_file: Path, new_tokens: int, runs: list[str],
                    threads: int = 0) -> dict:
    """Run peer_hf.py with `python`; returns its JSON."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [python, str(PEER_SCRIPT), "--gguf", gguf, "--ids", str(ids_file),
           "--new-tokens", str(new_tokens), "--runs", ",".join(runs), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PeerError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _first_divergence(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return str(i)
    return "none" if len(a) == len(b) else str(min(len(a), len(b)))


def run_peers(model, *, T: int, N: int, budget: int, rounds: int,
              kvpress_python: str | None, threads: tuple[int, ...] = (1, 2),
              progress: bool = True) -> dict:
    """Interleaved rounds of ours (full, rocketkv, snapkv at `budget`), transformers full and
    kvpress SnapKV (each at every torch thread count in `threads`); prints the table and
    returns the raw results."""
    from tqdm import tqdm

    if model.gguf is None:
        raise PeerError("peers need the embedded SmolLM2 GGUF (run without --model)")
    ids = [int(t) for t in model.prompt_ids(T)]
    kv_python, kv_why = find_kvpress_python(kvpress_python)
    ours = {"full": make_method("full"), f"rocketkv:{budget}": make_method("rocketkv", budget),
            f"snapkv:{budget}": make_method("snapkv", budget)}
    res: dict[str, list[dict]] = {}
    versions: dict[str, dict] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for _ in tqdm(range(rounds), desc="peers (rounds)", file=sys.stderr,
                      disable=not progress):
            for name, method in ours.items():
                out = generate_ids(model.params, model.config, [ids], method,
                                   max_new_tokens=N, stop_ids=[])
                s = out.stats
                res.setdefault(f"ours {name}", []).append({
                    "prefill_s": s.prefill_s, "decode_tok_s": s.decode_tokens_per_s,
                    "compile_s": s.compile_s, "tokens": out.tokens[0],
                })
            peers = [("transformers", sys.executable, ["full"], n) for n in threads]
            if kv_python:
                peers += [("kvpress", kv_python, ["full", f"snapkv:{budget}"], n)
                          for n in threads]
            for tag, python, runs, n in peers:
                try:
                    got = run_peer_script(python, model.gguf, ids_file, N, runs, n)
                except (PeerError, json.JSONDecodeError, OSError) as e:
                    errors.append(f"{tag}: {e}")
                    continue
                v = got["versions"]
                versions[tag] = v
                for r in got["runs"]:
                    label = (f"transformers {v['transformers']} {r['run']}" if tag ==
                             "transformers" else f"kvpress {v.get('kvpress', '?')} (transformers "
                             f"{v['transformers']}) {r['run']}") + f" [{v['threads']} thr]"
                    res.setdefault(label, []).append(r)
    summary = _summarize(res, budget)
    _print_peers(summary, T=T, N=N, budget=budget, rounds=rounds, kv_why=kv_why,
                 kv_python=kv_python, errors=errors)
    return {"T": T, "N": N, "budget": budget, "rounds": rounds, "versions": versions,
            "summary": summary, "errors": errors, "kvpress": kv_why, "kv_python": kv_python,
            "raw": {k: [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v]
                    for k, v in res.items()}}


def _summarize(res: dict[str, list[dict]], budget: int) -> dict[str, dict]:
    out = {}
    for label, runs in res.items():
        out[label] = {
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "tokens": runs[0]["tokens"], "kept": runs[0].get("kept"), "n": len(runs),
        }
    return out


def print_peers(res: dict, markdown: bool = False) -> None:
    """Re-print the peers table from `run_peers`' returned record."""
    _print_peers(res["summary"], T=res["T"], N=res["N"], budget=res["budget"],
                 rounds=res["rounds"], kv_why=res["kvpress"], kv_python=res.get("kv_python"),
                 errors=res["errors"], markdown=markdown)


def _print_peers(summary, *, T, N, budget, rounds, kv_why, kv_python, errors,
                 markdown=False) -> None:
    hf = [v for k, v in summary.items() if k.startswith("transformers")]
    hf_full = max(hf, key=lambda v: v["decode_tok_s"]) if hf else None
    ours_full = summary.get("ours full")
    rows = []
    for label, s in summary.items():
        if label.startswith("kvpress"):  # vs kvpress' own transformers full, same threads
            thr = label.rsplit("[", 1)[-1]
            ref = summary.get(next((k for k in summary if k.startswith("kvpress")
                                    and k.endswith(f" full [{thr}")), ""), s)
        elif label.startswith("ours"):
            ref = ours_full
        else:
            ref = s
        rows.append([
            label, f"{s['prefill_s']:.2f}", f"{s['decode_tok_s']:.1f}",
            f"{s['decode_tok_s'] / hf_full['decode_tok_s']:.2f}x" if hf_full else "n/a",
            f"{ref['prefill_s'] / s['prefill_s']:.2f}x" if ref else "n/a",
            f"{s['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "n/a",
            _first_divergence(s["tokens"], ours_full["tokens"]) if ours_full else "n/a",
        ])
    print_table(
        f"Peers: SmolLM2-135M float32, one {T}-token prompt, {N} greedy new tokens (no early "
        f"stop), budget M={budget}, median of {rounds} interleaved rounds",
        ["implementation / method", "prefill s", "decode tok/s", "decode vs best transformers",
         "prefill speedup vs own full", "decode speedup vs own full",
         "first token != ours full"],
        rows, markdown,
    )
    print("  'own full' = the same framework's full-KV run (ours full for ours, kvpress' "
          "transformers\n  full at the same thread count for kvpress). 'best transformers' = "
          "the fastest transformers\n  full run over the torch thread counts. Decode tok/s = "
          "(N - 1) / time from the first to the\n  last new token, measured the same way for "
          "all (io_callback timestamps for ours, a streamer\n  for transformers). Ours runs "
          "XLA's default CPU thread pool (all cores).")
    if kv_python is None:
        print(f"  kvpress: not run. {kv_why}")
    for e in errors:
        print(f"  error: {e}")
