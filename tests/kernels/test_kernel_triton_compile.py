"""Optional: compile the kernels' Triton IR to sm_90 machine code with pip's `triton`.

The lowering test proves Pallas accepts the kernels; this one runs Triton's own compiler
(TTIR -> TTGIR -> PTX -> cubin) for an H100 target on the CPU and checks for register
spills, which the lowering cannot see. It approximates what XLA's bundled Triton does (the
versions differ). Skipped unless `triton` is importable (it is not a project dependency);
it also uses a private JAX hook to capture the Triton module, hence `slow`.
"""

from __future__ import annotations

import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from rocketkv_jax.kernels import approx_scores, backend, sparse_decode_attention

triton = pytest.importorskip("triton")
S = jax.ShapeDtypeStruct


def triton_module_text(f, *shapes, monkeypatch) -> str:
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    backend.lower_for_cuda(f, *shapes)
    assert len(captured) == 1
    return captured[0]


def compile_for_h100(ttir: str, tmp_path, num_warps: int, num_stages: int) -> str:
    from triton.backends.compiler import GPUTarget

    path = tmp_path / "kernel.ttir"
    path.write_text(ttir)
    compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    return usage


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernels_compile_for_sm90_without_spills(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    kv, g, d, c, m, r, page = 8, 4, 128, 32768, 2048, 32, 16
    attn = triton_module_text(
        lambda *a: sparse_decode_attention(*a, kernels="triton"),
        S((1, kv, g, d), dtype), S((1, kv, c, d), dtype), S((1, kv, c, d), dtype),
        S((1, kv, m), jnp.int32), monkeypatch=monkeypatch,
    )
    usage = compile_for_h100(attn, tmp_path, num_warps=8, num_stages=2)  # the defaults
    assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage
    scores = triton_module_text(
        lambda *a: approx_scores(*a, page_size=page, kernels="triton"),
        S((1, kv, g, d), dtype), S((1, kv, c // page, d), dtype),
        S((1, kv, c // page, d), dtype), S((1, kv, r), jnp.int32), S((1,), jnp.int32),
        monkeypatch=monkeypatch,
    )
    usage = compile_for_h100(scores, tmp_path, num_warps=4, num_stages=2)  # the defaults
    assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage
