"""The results file store (eval/store.py) and the model identity it records."""

import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.eval.store import (
    ResultsFileError,
    ResultsStore,
    describe_differences,
    identity_differences,
    read_results,
)
from rocketkv_jax.model_store import load_model, model_identity
from rocketkv_jax.models.params import unstack_layers

IDENTITY = {"model": {"weights_sha256": "a" * 64, "dtype": "float32"}, "seed": 0,
            "max_new_tokens": {"qa": 16, "vt": 40}}


def _write(store, *batches):
    with store.open() as append:
        for batch in batches:
            append(batch)


def test_header_then_records_each_carrying_the_run(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl", IDENTITY, info={"model": "/m"})
    assert store.check() == []
    _write(store, [{"x": 1}, {"x": 2}], [{"x": 3}])
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "header" and lines[0]["identity"] == IDENTITY
    assert lines[0]["info"]["model"] == "/m" and "jax" in lines[0]["info"]
    assert [r["x"] for r in lines[1:]] == [1, 2, 3]
    assert {r["run"] for r in lines[1:]} == {lines[0]["run"]}
    assert [r["x"] for r in ResultsStore(tmp_path / "r.jsonl", IDENTITY).check()] == [1, 2, 3]


def test_differences_name_fields_with_their_flags_and_group_parts():
    new = {**IDENTITY, "seed": 1, "max_new_tokens": {"qa": 5, "vt": 5}, "turns": 3}
    diffs = identity_differences(IDENTITY, new)
    assert [d[0] for d in diffs] == ["max_new_tokens.qa", "max_new_tokens.vt", "seed", "turns"]
    text = describe_differences(diffs)
    assert "max_new_tokens.qa (--max-new-tokens): 16 in the file, 5 now (and 1 more " in text
    assert "seed (--seed): 0 in the file, 1 now" in text
    assert "turns (--multi-turn): (not recorded) in the file, 3 now" in text
    assert identity_differences(IDENTITY, {**new, "seed": 0, "turns": 1}, ignore=(
        "max_new_tokens", "turns")) == []
    assert identity_differences({"a": (1, 2)}, {"a": [1, 2]}) == []  # as JSON holds them


def test_refusal_changes_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(ResultsStore(path, IDENTITY), [{"x": 1}])
    before = path.read_bytes()
    with pytest.raises(ResultsFileError, match=r"seed \(--seed\): 0 in the file, 2 now"):
        ResultsStore(path, {**IDENTITY, "seed": 2}).check()
    assert path.read_bytes() == before


def test_force_replaces_the_file_and_only_the_named_companions(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(ResultsStore(path, IDENTITY), [{"x": 1}])
    (tmp_path / "table.md").write_text("old")
    (tmp_path / "mine.txt").write_text("keep")
    store = ResultsStore(path, {**IDENTITY, "seed": 2}, force=True,
                         replaces=[tmp_path / "table.md"])
    assert store.check() == []
    _write(store, [{"x": 9}])
    assert [r["x"] for r in read_results(path).records] == [9]
    assert not (tmp_path / "table.md").exists() and (tmp_path / "mine.txt").exists()


def test_torn_last_line_dropped_on_read_and_cut_on_open(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(ResultsStore(path, IDENTITY), [{"x": 1}, {"x": 2}])
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])
    assert [r["x"] for r in read_results(path).records] == [1]
    assert path.read_bytes() == whole[:-5]  # reading changes nothing
    _write(ResultsStore(path, IDENTITY), [{"x": 2}])
    assert path.read_bytes() == whole


def test_a_torn_header_alone_is_an_empty_file(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(ResultsStore(path, IDENTITY), [])
    path.write_bytes(path.read_bytes()[:30])  # killed while writing the header
    assert ResultsStore(path, {**IDENTITY, "seed": 5}).check() == []
    _write(ResultsStore(path, {**IDENTITY, "seed": 5}), [{"x": 1}])
    assert read_results(path).header["identity"]["seed"] == 5


@pytest.mark.parametrize(("damage", "message"), [
    (lambda lines: [lines[0], b"{not json\n", *lines[1:]], r"r.jsonl:2: damaged line"),
    (lambda lines: [*lines, lines[0]], r"r.jsonl:3: a second header"),
    (lambda lines: [lines[0], b"[1, 2]\n", *lines[1:]], r"r.jsonl:2: expected a JSON object"),
    (lambda lines: [lines[0], b'{"x": 7}\n', *lines[1:]], r"r.jsonl:2: a record of run None"),
    (lambda lines: [lines[0], b"\xff\xfe\n", *lines[1:]], r"r.jsonl:2: damaged line"),
])
def test_damage_is_named_by_line(tmp_path, damage, message):
    path = tmp_path / "r.jsonl"
    _write(ResultsStore(path, IDENTITY), [{"x": 1}])
    path.write_bytes(b"".join(damage(path.read_bytes().splitlines(keepends=True))))
    before = path.read_bytes()
    with pytest.raises(ResultsFileError, match=message):
        ResultsStore(path, IDENTITY).check()
    assert path.read_bytes() == before


def test_model_identity_is_the_weights_not_the_files(tmp_path):
    cfg = tiny_checkpoint_config()
    a = model_identity(load_model(make_tiny_checkpoint(tmp_path / "a", cfg)))
    again = model_identity(load_model(make_tiny_checkpoint(tmp_path / "again", cfg)))
    assert a == again  # orbax wrote other file names and timestamps: same identity
    other = model_identity(load_model(make_tiny_checkpoint(tmp_path / "b", cfg,
                                                           tiny_params(cfg, seed=1))))
    assert other["weights_sha256"] != a["weights_sha256"]
    assert {k: v for k, v in other.items() if k != "weights_sha256"} == {
        k: v for k, v in a.items() if k != "weights_sha256"}  # same config, tokenizer, dtype
    assert a["dtype"] == "float32" and a["config"]["num_layers"] == 2


def test_model_identity_keeps_its_digest_in_either_weight_layout(tmp_path):
    """Per-layer weights hash as the stacked arrays they equal (the layout changes speed,
    not outputs), and the digest is the documented one: path, dtype, shape and bytes of
    each stacked array, in path order."""
    model = load_model(make_tiny_checkpoint(tmp_path / "a", tiny_checkpoint_config()))
    stacked = model_identity(model)
    per_layer = dataclasses.replace(model, params=unstack_layers(model.params))
    assert model_identity(per_layer) == stacked
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(model.params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
        digest.update(array.tobytes())
    assert stacked["weights_sha256"] == digest.hexdigest()
    layers = per_layer.params["layers"]
    swapped = dataclasses.replace(model, params={**per_layer.params,
                                                 "layers": (layers[1], layers[0])})
    assert model_identity(swapped)["weights_sha256"] != stacked["weights_sha256"]
