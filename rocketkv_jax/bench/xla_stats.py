"""XLA's own statistics of a compiled program: its buffer assignment (`memory_stats`) and its
cost model's bytes accessed (`bytes_accessed`, and `loop_aware_bytes`, which counts every while
loop's body once per trip). Shared by `rocketkv bench`, the scripts in benchmarks/ and the
tests that guard the decode step's memory traffic (tests/models/test_decode_inplace.py).
"""

from __future__ import annotations

import re

import jax.numpy as jnp


def memory_stats(compiled) -> dict[str, int] | None:
    """XLA's buffer assignment of a compiled program: argument, output, temp and aliased
    (donated) bytes, and peak = argument + output + temp - alias. None if unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - memory analysis is best effort per platform
        return None
    if m is None:
        return None
    out = {
        "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def bytes_accessed(compiled) -> float | None:
    """XLA's cost-model "bytes accessed" of a compiled program (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost else cost.get("bytes accessed")


_WHILE = re.compile(
    r"\) while\(.*?condition=%[\w.\-]+, body=%([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")


def loop_aware_bytes(compiled) -> float | None:
    """XLA's "bytes accessed" with every while loop's body counted trip-count times.

    XLA's cost analysis counts a while body once, so for the decode step (a `lax.fori_loop`
    over layers) the plain number holds one layer's weights and per-layer cache traffic, not L.
    This re-runs XLA's own cost analysis on each loop body (the compiled HLO with the body
    made the entry computation) and adds (trip count - 1) x body bytes. Loops without a
    known trip count are left as XLA counts them. None if XLA's HLO cannot be re-parsed.
    """
    total = bytes_accessed(compiled)
    if total is None:
        return None
    try:
        import jaxlib._hlo as hlo
        from jax._src import xla_bridge
        from jax._src.lib import xla_client

        text = compiled.as_text()
        lines = text.split("\n")
        lines[0] = "HloModule loop_body"  # drop the entry layout and aliasing of the program
        module_text = re.sub(r"^ENTRY ", "", "\n".join(lines), flags=re.M)
        client = xla_bridge.get_backend()
        for body, trips in {(m.group(1), int(m.group(2))) for m in _WHILE.finditer(text)}:
            body_text = re.sub(rf"^%{re.escape(body)} \(", f"ENTRY %{body} (", module_text,
                               flags=re.M)
            cost = xla_client._xla.hlo_module_cost_analysis(
                client, hlo.hlo_module_from_text(body_text))
            total += (trips - 1) * cost["bytes accessed"]
    except Exception:  # noqa: BLE001 - private XLA APIs; the plain number is still reported
        return None
    return total


# HLO's names of the element types a weight may have
HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def copy_fusions(hlo: str, shape: tuple[int, int], dtype="float32") -> int:
    """Loop fusions in optimized HLO text that produce a whole weight matrix of `shape`
    and `dtype` (a numpy/JAX dtype or its name)."""
    want = f"{HLO_TYPES[jnp.dtype(dtype).name]}[{shape[0]},{shape[1]}]"
    return sum(1 for line in hlo.splitlines()
               if "kind=kLoop" in line and f"= {want}" in line)
