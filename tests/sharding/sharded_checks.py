"""Sharded checks on 4 forced host devices, run by test_sharding.py in ONE subprocess
(XLA_FLAGS must be set before JAX starts). Prints one JSON report on the last line.

usage: python sharded_checks.py CHECKPOINT_DIR

CHECKPOINT_DIR holds a converted checkpoint of `CFG` (written by the test with
`save_checkpoint`). Every mesh run restores it straight into that mesh's shardings.
"""

from __future__ import annotations

import os

# Only when run as a script: test_sharding.py imports the constants below, and must not
# change the device count of the pytest process.
if __name__ == "__main__":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rocketkv_jax import partitioned  # noqa: E402
from rocketkv_jax import sharding as shd  # noqa: E402
from rocketkv_jax.convert.checkpoint import load_checkpoint  # noqa: E402
from rocketkv_jax.engine import decode, programs  # noqa: E402
from rocketkv_jax.engine import generate as gen  # noqa: E402
from rocketkv_jax.methods import (  # noqa: E402
    make_method,
    method_hparams,
    quest,
    stage1,
    stage2,
)
from rocketkv_jax.models.config import ModelConfig  # noqa: E402
from rocketkv_jax.models.llama import forward_prefill  # noqa: E402
from rocketkv_jax.models.params import flatten, random_params  # noqa: E402
from rocketkv_jax.sampling import Sampling  # noqa: E402

# 4 KV heads (so model=4 divides them), G = 2, F = 96 (divisible by 4), V = 128.
CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=8, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=512, tie_word_embeddings=False, eos_token_ids=(),
)
PROMPT_LENS = (200, 150, 181, 97)  # mixed; the bucket is 256, rocketkv keeps 159 + 8 new
BUDGET, NEW = 64, 8
MESHES = ((1, 4), (2, 2), (4, 1))


def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in PROMPT_LENS]


def method(name):
    # stage2 "on": the sparse paths are what sharding must keep exact (at these sizes the
    # cost model would run them densely)
    kw = {"stage2": "on"} if "stage2" in method_hparams(name) else {}
    return make_method(name, None if name == "full" else BUDGET, **kw)


def collectives(hlos: list[str]) -> list[str]:
    """Sorted 'kind op_name' of every collective in the HLO texts of a generate call's
    compiled programs."""
    return sorted(
        f"{kind} {JIT_PREFIX.sub('', name)}" for hlo in hlos for kind, name in shd.collectives(hlo)
    )


JIT_PREFIX = re.compile(r"^jit\([^)]*\)/")  # the program's name in an op_name
# name = shape (a tuple shape has spaces) opcode(operands)
HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?(%[\w.-]+) = (?:\([^()]*\)|\S+) ([\w-]+)\(([^)]*)\)")


def _feeds_top_k(users: dict, name: str, depth: int = 0) -> bool:
    """Whether `name`'s result reaches a top-k, directly or through ops of one operand
    (copies, bitcasts, the fusions XLA makes of them)."""
    for user, opcode, n_operands, line in users.get(name, []):
        if opcode == "topk" or 'custom_call_target="TopK"' in line:
            return True
        if n_operands == 1 and depth < 6 and _feeds_top_k(users, user, depth + 1):
            return True
    return False


def top_k_operand_gathers(hlos: list[str]) -> list[str]:
    """Sorted 'kind op_name' of the collectives whose result reaches a top-k (XLA's `TopK`
    custom call or `topk`) on its own (`_feeds_top_k`): the all-gathers of a top-k operand.

    Found in the HLO rather than by op name: jaxlib 0.10 names such an all-gather after the
    top_k, jaxlib 0.12 after the op that produced the operand (`select_n`, `div`)."""
    found = []
    for hlo in hlos:
        lines = [(m, line) for line in hlo.splitlines() if (m := HLO_INSTRUCTION.match(line))]
        users: dict[str, list[tuple[str, str, int, str]]] = {}
        for m, line in lines:
            operands = re.findall(r"%[\w.-]+", m.group(3))
            for operand in operands:
                users.setdefault(operand, []).append((m.group(1), m.group(2), len(operands),
                                                      line))
        for m, line in lines:
            kind = shd.collectives(line)
            if kind and _feeds_top_k(users, m.group(1)):
                found.append(f"{kind[0][0]} {JIT_PREFIX.sub('', kind[0][1])}")
    return sorted(found)


PROGRAMS = ((programs, "init_program"), (programs, "chunk_program"),
            (programs, "start_program"), (decode, "decode_program"))


class Recorder:
    """Wraps the program builders of rocketkv_jax.engine to keep the compiled programs a
    generate call ran (cache hits included), for their HLO."""

    def __init__(self):
        self.inner = {(module, name): getattr(module, name) for module, name in PROGRAMS}
        self.used: list = []
        for (module, name), fn in self.inner.items():
            setattr(module, name, self._wrap(fn))

    def _wrap(self, fn):
        def record(*args):
            compiled, t = fn(*args)
            self.used.append(compiled)
            return compiled, t

        return record

    def clear_caches(self) -> None:
        """Forget the compiled programs (the wrapped builders' lru caches)."""
        for fn in self.inner.values():
            fn.cache_clear()

    def hlos(self) -> list[str]:
        """The HLO of every program used since the last call, then forget them."""
        texts = [c.as_text() for c in self.used]
        self.used = []
        return texts


def cache_shapes(mesh_shape, capacity):
    """Global and per-device shape strings of the stacked k cache [Ly, B, K, C, D]."""
    d, m = mesh_shape
    Ly, B, K, D = CFG.num_layers, len(PROMPT_LENS), CFG.num_kv_heads, CFG.head_dim
    return f"f32[{Ly},{B},{K},{capacity},{D}]", f"f32[{Ly},{B // d},{K // m},{capacity},{D}]"


def run(ckpt, report, tag, names, reference=True):
    """Single-device reference, then every mesh (params restored into its shardings)."""
    single, _ = load_checkpoint(ckpt)
    for name in names if reference else ():
        ref = gen.generate_ids(single, CFG, prompts(), method(name), max_new_tokens=NEW)
        report[f"{tag}/{name}/single"] = ref.tokens
    for shape in MESHES:
        mesh = shd.make_mesh(*shape)
        params, _ = load_checkpoint(ckpt, shardings=shd.param_shardings(CFG, mesh))
        for name in names:
            RECORDER.hlos()  # forget programs of earlier calls
            out = gen.generate_ids(
                params, CFG, prompts(), method(name), max_new_tokens=NEW, mesh=mesh
            )
            hlos = RECORDER.hlos()
            hlo = "\n".join(hlos)
            T = out.stats.prompt_bucket
            capacity = method(name).plan(CFG, T, NEW).capacity
            whole, local = cache_shapes(shape, capacity)
            report[f"{tag}/{name}/{shape[0]}x{shape[1]}"] = {
                "tokens": out.tokens,
                "collectives": collectives(hlos),
                "top_k_operand_gathers": top_k_operand_gathers(hlos),
                "cache_local_in_hlo": local in hlo,
                "cache_whole_in_hlo": whole in hlo,
            }


def sampled(ckpt, report):
    """Temperature + top-k + top-p sampling, 3 prompts (padded to 4 rows), on 2x2."""
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    single, _ = load_checkpoint(ckpt)
    mesh = shd.make_mesh(2, 2)
    params, _ = load_checkpoint(ckpt, shardings=shd.param_shardings(CFG, mesh))
    for tag, p, m in (("single", single, None), ("2x2", params, mesh)):
        out = gen.generate_ids(
            p, CFG, prompts()[:3], method("rocketkv"), max_new_tokens=NEW, sampling=sampling,
            seed=3, mesh=m,
        )
        report[f"sampled/{tag}"] = out.tokens


def restored_shardings(ckpt, report):
    mesh = shd.make_mesh(2, 2)
    expected = flatten(shd.param_shardings(CFG, mesh))
    params, _ = load_checkpoint(ckpt, shardings=shd.param_shardings(CFG, mesh))
    rows = {}
    for path, x in flatten(params).items():
        rows[path] = {
            "spec": str(x.sharding.spec),
            "matches": x.sharding == expected[path],
            "shard_shape": list(x.addressable_shards[0].data.shape),
            "shape": list(x.shape),
            "devices": len(x.sharding.device_set),
        }
    report["restored"] = rows
    # the cache rules as the program applies them, on the real cache pytree
    plan = method("rocketkv").plan(CFG, 256, NEW)
    cache = jax.eval_shape(
        lambda p: forward_prefill(
            p, CFG, jax.numpy.zeros((4, 256), "int32"), jax.numpy.full((4,), 200, "int32"),
            plan, all_logits=False,
        )[1],
        params,
    )
    report["cache_specs"] = {
        k: str(s.spec) for k, s in vars(shd.cache_shardings(cache, mesh)).items()
    }


def errors(report):
    msgs = {}
    big = ModelConfig(**{**vars(CFG), "num_kv_heads": 6, "num_heads": 12})
    try:
        gen.generate_ids(
            random_params(big), big, prompts(), method("full"), max_new_tokens=2,
            mesh=shd.make_mesh(1, 4),
        )
    except ValueError as e:
        msgs["heads"] = str(e)
    for shape in ((3, 1), (4, 2)):
        try:
            shd.make_mesh(*shape)
        except ValueError as e:
            msgs[f"devices {shape}"] = str(e)
    report["errors"] = msgs


# The methods' selections call `partitioned.top_k` (partition-aware); "stock" runs put plain
# `jax.lax.top_k` in its place to show what it saves.
TOP_K_USERS = (quest, stage1, stage2)


def use_top_k(fn) -> None:
    for module in TOP_K_USERS:
        assert hasattr(module, "top_k"), module
        module.top_k = fn
    RECORDER.clear_caches()


def main():
    ckpt = sys.argv[1]
    global RECORDER
    RECORDER = Recorder()
    report = {"devices": jax.device_count()}
    use_top_k(lambda x, k: tuple(jax.lax.top_k(x, k)))
    run(ckpt, report, "stock", ("full", "rocketkv"))
    use_top_k(partitioned.top_k)
    restored_shardings(ckpt, report)
    sampled(ckpt, report)
    errors(report)
    # rocketkv again with the partition-aware top-k (the library's own path), compared
    # with the stock single-device tokens
    run(ckpt, report, "patched", ("rocketkv",), reference=False)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
