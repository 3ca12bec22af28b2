"""The GPU check's record: device peaks, and results.json + summary.md rewritten after every
measurement (`benchmarks/gpu_check.py`), so that a run cut short still leaves its results.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from .tables import fmt_bytes, markdown_table

# device_kind substring -> (HBM bytes/s, dense bf16 FLOP/s), from NVIDIA's data sheets.
# The first match wins, so the more specific names come first.
PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
)


def device_peaks(device_kind: str) -> tuple[float | None, float | None]:
    """(peak bytes/s, peak bf16 FLOP/s) of a device kind, (None, None) if unknown (a CPU)."""
    for name, bw, flops in PEAKS:
        if name.lower() in device_kind.lower():
            return bw, flops
    return None, None


def nvidia_smi() -> str | None:
    """nvidia-smi's one-line view of the GPUs, without initialising JAX's GPU backend (the
    tests' subprocess must get the GPU's memory first)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                            "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def host_line() -> dict:
    import jax
    import numpy as np

    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "numpy": np.__version__}
    for name in ("jaxlib", "flax", "triton", "torch"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - absent packages are simply not listed
            pass
    return {"versions": versions, "cpu_count": os.cpu_count(), "nvidia_smi": nvidia_smi()}


def jax_device() -> dict:
    """JAX's view of its default device (initialises the backend)."""
    import jax

    dev = jax.devices()[0]
    out = {"platform": dev.platform, "device_kind": dev.device_kind,
           "device_count": jax.device_count()}
    try:
        stats = dev.memory_stats() or {}
        out["memory_bytes"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - CPU devices have none
        pass
    bw, flops = device_peaks(dev.device_kind)
    out["peak_bytes_per_s"], out["peak_bf16_flops"] = bw, flops
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(results: dict, out: Path) -> None:
    """results.json and summary.md in `out`, each replaced whole."""
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    write_atomic(out / "summary.md", markdown(results))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _part_table(part: dict) -> str:
    cols = part.get("columns") or []
    rows = part.get("rows") or []
    if not cols or not rows:
        return ""
    if any("error" in r for r in rows):
        cols = [*cols, ("error", "error")]
    header = [c for c, _ in cols]
    body = [[_fmt(r.get(key)) if key != "bytes" else fmt_bytes(r.get(key)) for _, key in cols]
            for r in rows]
    return markdown_table(header, body)


def markdown(results: dict) -> str:
    dev = results.get("device") or {}
    lines = [f"# GPU check: {dev.get('device_kind', 'device not read yet')}", "",
             f"- command: `{results.get('command', '')}`",
             f"- started {results.get('started', '')}, "
             f"{results.get('elapsed_s', 0):.0f} s so far"
             + (" (finished)" if results.get("finished") else " (running or cut short)"),
             f"- versions: {results.get('host', {}).get('versions')}",
             f"- nvidia-smi: {results.get('host', {}).get('nvidia_smi')}",
             f"- peaks used: {_fmt(dev.get('peak_bytes_per_s'))} B/s, "
             f"{_fmt(dev.get('peak_bf16_flops'))} bf16 FLOP/s", "",
             markdown_table(["part", "status", "seconds", "budget s"],
                            [[f"{k}. {p['name']}", p.get("status", "pending"),
                              _fmt(p.get("seconds")), _fmt(p.get("budget_s"))]
                             for k, p in results.get("parts", {}).items()])]
    for key, part in results.get("parts", {}).items():
        lines += ["", f"## {key}. {part['name']}", ""]
        if part.get("what"):
            lines += [part["what"], ""]
        if part.get("error"):
            lines += ["```", part["error"].rstrip(), "```", ""]
        for note in part.get("notes", []):
            lines.append(f"- {note}")
        table = _part_table(part)
        if table:
            lines += ["", table]
    return "\n".join(lines) + "\n"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
