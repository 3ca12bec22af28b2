"""What the misses of a RULER run answered: for every NIAH record that scored below 1,
whether its answer is another needle's value from the same prompt (a distractor), a value
the prompt does not hold, or no value at all.

    python benchmarks/ruler_misses.py [--out docs/eval/ruler-qwen] [--json FILE]

Reads `<out>/results.jsonl` and the RULER prompts that `rocketkv eval --suite ruler`
cached in `<out>/ruler-data` (`eval.ruler`'s <task>/<settings>/validation.jsonl, matched to
each record by its `prompt_sha1`). Values are
what RULER's NIAH needles hold: numbers of 4 or more digits and UUIDs. For a miss, the
values in its answer that are not expected are looked up in its prompt:

  distractor   at least one of them is in the prompt (the model read another needle)
  not in prompt   values were answered, none of them in the prompt (digits that drifted)
  no value     the answer holds no value that was not expected

Records whose prompt is not in the cache are counted as "no prompt". Prints one row per
(method, budget) and task with misses.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from rocketkv_jax.eval.ruler import cached_prompts
from rocketkv_jax.eval.store import ResultsFileError, read_records

VALUE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d{4,}")
KINDS = ("distractor", "not in prompt", "no value", "no prompt")


def classify(output: str, expected: list[str], prompt: str | None) -> str:
    """One of KINDS for a miss (see the module docstring)."""
    if prompt is None:
        return "no prompt"
    wrong = [v for v in VALUE.findall(output) if v not in expected]
    if not wrong:
        return "no value"
    held = set(VALUE.findall(prompt))
    return "distractor" if any(v in held for v in wrong) else "not in prompt"


def misses(records: list[dict], prompts: dict[str, str]) -> dict[tuple, collections.Counter]:
    """(method, budget, task) -> Counter of KINDS over its NIAH records scoring below 1."""
    out: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        if not r.get("task", "").startswith("niah") or r.get("score", 1.0) >= 1.0:
            continue
        kind = classify(r["output"], [str(e) for e in r["expected"]],
                        prompts.get(r.get("prompt_sha1")))
        out[(r["method"], r["budget"], r["task"])][kind] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/eval/ruler-qwen"),
                    help="the eval's results directory (default: docs/eval/ruler-qwen)")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    args = ap.parse_args(argv)
    results = args.out / "results.jsonl"
    if not results.is_file():
        ap.error(f"no results file at {results}")
    try:
        records = [r for r in read_records(results) if "task" in r]
    except ResultsFileError as e:
        ap.error(str(e))
    counts = misses(records, cached_prompts(args.out / "ruler-data"))
    print(f"| method | budget | task | misses | {' | '.join(KINDS)} |")
    print("|---|---|---|---:|" + "---:|" * len(KINDS))
    for (method, budget, task), c in sorted(counts.items(), key=lambda kv: (
            kv[0][0], kv[0][1] or 0, kv[0][2])):
        cells = " | ".join(str(c[k]) for k in KINDS)
        print(f"| {method} | {budget or '-'} | {task} | {sum(c.values())} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(
            [{"method": m, "budget": b, "task": t, **c} for (m, b, t), c in counts.items()],
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
