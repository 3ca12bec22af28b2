"""benchmarks/ruler_misses.py: each NIAH miss is sorted by what its answer holds, with the
prompt found in the eval's RULER cache by its hash."""

from __future__ import annotations

import hashlib
import json

import pytest
from benchmark_scripts import load_script

from rocketkv_jax.eval.ruler import cached_prompts

rm = load_script("ruler_misses")

PROMPT = ("One of the special magic numbers for wry-excellence is: 8121922. "
          "One of the special magic numbers for teeny-defense is: 3417186. "
          "What is the special magic number for wry-excellence mentioned in the text?")
UUID = "1f2e3d4c-5b6a-4789-8abc-def012345678"


def record(method, output, score, prompt=PROMPT, task="niah_multikey_2", budget=256):
    return {"method": method, "budget": budget, "task": task, "expected": ["8121922"],
            "output": output, "score": score,
            "prompt_sha1": hashlib.sha1(prompt.encode()).hexdigest()[:16]}


@pytest.fixture
def out(tmp_path):
    data = tmp_path / "ruler-data" / "niah_multikey_2" / "ctx4096-seed0"
    data.mkdir(parents=True)
    (data / "validation.jsonl").write_text(json.dumps({"index": 0, "input": PROMPT}) + "\n")
    rows = [{"info": "header"},
            record("full", " 8121922.", 1.0, budget=None),  # a hit: not a miss
            record("rocketkv", " 3417186.", 0.0),  # the other needle's value
            record("rocketkv", " 8121935.", 0.0),  # digits that drifted
            record("rocketkv", f" {UUID}", 0.0),  # a UUID the prompt does not hold
            record("hybrid", " I don't know.", 0.0),
            record("hybrid", " 8121922.", 0.0, prompt="a prompt never cached"),
            record("hybrid", " 3417186", 0.0, task="vt")]  # not a NIAH task
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_misses_are_sorted_by_what_the_answer_holds(out):
    prompts = cached_prompts(out / "ruler-data")
    assert list(prompts.values()) == [PROMPT]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    counts = rm.misses([r for r in records if "task" in r], prompts)
    assert dict(counts[("rocketkv", 256, "niah_multikey_2")]) == {"distractor": 1,
                                                                  "not in prompt": 2}
    assert dict(counts[("hybrid", 256, "niah_multikey_2")]) == {"no value": 1,
                                                                "no prompt": 1}
    assert ("full", None, "niah_multikey_2") not in counts
    assert not any(task == "vt" for _, _, task in counts)


def test_the_table_and_json(out, capsys, tmp_path):
    assert rm.main(["--out", str(out), "--json", str(tmp_path / "m.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| method | budget | task | misses | distractor |")
    assert "| rocketkv | 256 | niah_multikey_2 | 3 | 1 | 2 | 0 | 0 |" in lines
    rows = json.loads((tmp_path / "m.json").read_text())
    assert {"method": "hybrid", "budget": 256, "task": "niah_multikey_2", "no value": 1,
            "no prompt": 1} in rows


def test_a_missing_results_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rm.main(["--out", str(tmp_path)])
    assert e.value.code == 2
    assert "no results file at" in capsys.readouterr().err


def test_a_damaged_results_file_is_one_error_naming_the_line(out, capsys):
    with (out / "results.jsonl").open("a") as f:
        f.write('{"method": "rocketkv", "out\n{"task": "niah_single_1"}\n')
    with pytest.raises(SystemExit) as e:
        rm.main(["--out", str(out)])
    assert e.value.code == 2
    assert "results.jsonl:9: damaged line" in capsys.readouterr().err
