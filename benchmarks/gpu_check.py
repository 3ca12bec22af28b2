"""The GPU check: one command that measures everything a short GPU lease is for.

    python benchmarks/gpu_check.py --out DIR           # a CUDA GPU, at most 8 minutes
    python benchmarks/gpu_check.py --smoke --out DIR   # CPU: tiny shapes, interpret kernels

Parts, in this order, each under its own time budget (--budgets), the whole under --total-s:
  a. tests: `pytest -m gpu` (tests/gpu/: the compiled kernels against their references at
     real shapes, and a tiny-model generate with them) in two subprocesses, so a crash
     there cannot stop the rest: the Triton tests first, then the Mosaic GPU ones (where
     JAX >= 0.11.2 runs on a Hopper GPU) with what is left of the part;
  b. kernels: approx_scores, sparse_decode_attention and prefill_attention at
     Llama-3.1-8B shapes, Triton against the jnp reference under XLA: time, GB/s (TFLOP/s
     for prefill) and the fraction of the card's peak;
  c. decode: the decode step of full KV against rocketkv at M = 256 and 1024, Llama-3.1-8B
     shape (32 layers, bf16, random weights), at 32k batch 1 and 8 and 128k batch 1, each
     speedup beside its byte bound;
  d. generate: end to end on the same weights, a 32k prompt and 256 new tokens, full
     against rocketkv: prefill tok/s, decode tok/s, end-to-end time;
  e. calibrate: `rocketkv bench --calibrate` for this device (the file lands in DIR);
  f. mosaic: the Mosaic GPU decode kernels timed beside the Triton ones at part b's
     shapes (where JAX >= 0.11.2 runs on a Hopper GPU). Last, because no GPU has run these
     kernels before: whatever they do costs this part only.
DIR gets results.json and summary.md after every measurement (a run cut short keeps what it
measured), pytest.log, pytest-mosaic.log and the calibration file. A part that fails is
recorded with its error and the next part runs; a part stuck in a call that never returns
(a GPU kernel that never ends) is recorded as `hung` and the process ends. docs/gpu.md says
how to run it and what each part costs.

Runs from a checkout without installing it (a GPU machine without a build backend): the
package's folders are mapped as `pip install -e .` would map them.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# The parent holds 16 GB of weights and up to 34 GB of KV cache in part c; JAX's default
# pool is 75% of the card. Set before JAX starts (it is imported lazily below, after part a's
# subprocess has had the GPU to itself).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import rocketkv_jax; "
             f"rocketkv_jax.__path__.append({str(ROOT)!r})")


class WrongCheckout(Exception):
    """rocketkv_jax is installed from another folder than this checkout."""


def make_importable() -> bool:
    """Import rocketkv_jax as installed (editable, from this checkout), or else from this
    checkout with `models/`, `kernels/` and `convert/` as its subpackages (pyproject's
    package-dir). True if it was installed. Refuses an install of other code: the check
    must measure this checkout."""
    try:
        import rocketkv_jax.models
    except ImportError:
        for name in [m for m in sys.modules if m.split(".")[0] == "rocketkv_jax"]:
            del sys.modules[name]
        exec(BOOTSTRAP)  # the same lines the tests' subprocess runs
        import rocketkv_jax.models
        installed = False
    else:
        installed = True
    where = Path(rocketkv_jax.models.__file__).resolve().parents[1]
    if where != ROOT:
        raise WrongCheckout(
            f"rocketkv_jax.models is imported from {where}, not from this checkout {ROOT}; "
            f"run `python -m pip install --no-deps --no-build-isolation -e {ROOT}` or "
            "uninstall the other copy")
    return installed


PARTS = {"a": "tests", "b": "kernels", "c": "decode", "d": "generate", "e": "calibrate",
         "f": "mosaic"}
# seconds on an H100 (docs/gpu.md); the parts' sum is over TOTAL_S, which cuts the last
# ones short only where the first ones use their whole budgets
BUDGETS = {"a": 200, "b": 60, "c": 110, "d": 85, "e": 35, "f": 60}
SMOKE_BUDGETS = dict.fromkeys(BUDGETS, 60)
TOTAL_S = 475
ALARM_GRACE_S = 5.0  # a part's own time checks stop it first; the alarm is the backstop
# After the alarm: a part still inside one call (SIGALRM reaches Python only between
# statements, so a GPU kernel that never ends would hold the process for good) is recorded
# as hung, and the process ends. Longer than any one compile.
HANG_GRACE_S = 30.0
# Part a's pytest runs, each in a process of its own: (log file, -k selection, at most this
# many seconds; None: what is left of the part). The Triton tests keep the time they had
# before the Mosaic ones came; the Mosaic tests come second, so that a Mosaic kernel that
# hangs or crashes costs only its own run.
PYTEST_RUNS = (("pytest.log", "not mosaic", 150.0), ("pytest-mosaic.log", "mosaic", None))


class PartTimeout(Exception):
    """A part ran past its budget (raised between Python statements by SIGALRM)."""


class Check:
    """The run's state: results (saved after every row), deadlines, the options."""

    def __init__(self, args):
        from rocketkv_jax.bench.gpu_report import host_line, now

        self.args, self.out, self.smoke = args, args.out, args.smoke
        self.fast = "interpret" if args.smoke else "triton"  # the Pallas kernels' backend
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.total_s
        self.part_deadline = self.deadline
        self.state: dict = {}  # objects shared between parts (the 8B weights)
        self.results = {"command": " ".join(sys.argv), "started": now(),
                        "smoke": self.smoke, "host": host_line(), "device": None,
                        "parts": {k: {"name": PARTS[k], "status": "pending"}
                                  for k in args.parts}}

    def left(self) -> float:
        return min(self.part_deadline, self.deadline) - time.perf_counter()

    def save(self) -> None:
        from rocketkv_jax.bench.gpu_report import save

        self.results["elapsed_s"] = time.perf_counter() - self.t0
        save(self.results, self.out)

    def add_row(self, rec: dict, row: dict) -> None:
        rec.setdefault("rows", []).append(row)
        self.save()


def run_part(check: Check, key: str, fn) -> None:
    rec = check.results["parts"][key]
    budget = check.args.budgets[key]
    left = check.deadline - time.perf_counter()
    if left < 5:
        rec.update(status="skipped", notes=["no time left in --total-s"])
        check.save()
        return
    budget = min(budget, left)
    rec.update(status="running", budget_s=round(budget, 1))
    check.part_deadline = time.perf_counter() + budget
    check.save()
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + ALARM_GRACE_S)
    watchdog = Watchdog(check, key, t0, budget + ALARM_GRACE_S + HANG_GRACE_S)
    try:
        fn(check, rec)
        rec["status"] = rec.get("status_override", "ok")
    except PartTimeout:
        rec["status"] = "timeout"
    except BaseException as e:  # noqa: BLE001 - record it; the next part runs
        rec["status"] = "error"
        rec["error"] = "".join(traceback.format_exception(e)[-12:])
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        watchdog.stop()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        _release()
        check.save()
        print(f"[gpu_check] {key}. {rec['name']}: {rec['status']} in {rec['seconds']} s",
              file=sys.stderr, flush=True)


def _alarm(signum, frame):
    raise PartTimeout


class Watchdog:
    """Ends the process `after_s` seconds into part `key` unless stopped first: records the
    part as hung and the parts after it as not run, saves, exits with status 3. Runs on its
    own thread, which gets the GIL while the main thread waits inside JAX."""

    def __init__(self, check: Check, key: str, t0: float, after_s: float):
        self.check, self.key, self.t0 = check, key, t0
        self.lock, self.stopped = threading.Lock(), False
        self.timer = threading.Timer(after_s, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
        self.timer.cancel()

    def fire(self) -> None:
        with self.lock:
            if self.stopped:
                return
            parts = self.check.results["parts"]
            seconds = round(time.perf_counter() - self.t0, 1)
            parts[self.key].update(status="hung", seconds=seconds, error=(
                f"still inside one call {seconds} s into the part, past its budget and the "
                f"alarm (a GPU kernel that never ends?): the process was ended"))
            for other in parts.values():
                if other["status"] == "pending":
                    other.update(status="not run",
                                 notes=[f"part {self.key} hung and the process was ended"])
            self.check.save()
            print(f"[gpu_check] {self.key}. {parts[self.key]['name']}: hung; ending the "
                  f"process", file=sys.stderr, flush=True)
            os._exit(3)


def _release() -> None:
    gc.collect()
    if "jax" in sys.modules:
        import jax

        jax.clear_caches()


# ------------------------------------------------------------------------ a. tests
def part_tests(check: Check, rec: dict) -> None:
    rec["what"] = ("`pytest -m gpu tests/gpu` in subprocesses: the compiled Triton and Mosaic "
                   "GPU kernels against their references at real shapes, and generate with "
                   "kernels=triton and kernels=mosaic against the references (skipped "
                   "without a GPU; Mosaic also without JAX >= 0.11.2 and a Hopper GPU). The "
                   "Triton tests run first (`-k 'not mosaic'`, pytest.log), the Mosaic ones "
                   "second with the rest of the part (`-k mosaic`, pytest-mosaic.log).")
    rec.update(counts={}, notes=[], rows=[], columns=[("test", "test"), ("outcome", "outcome")])
    problems = []
    for log_name, select, cap in PYTEST_RUNS:
        limit = check.left() if cap is None else min(cap, check.left())
        if limit < 5:
            rec["notes"].append(f"`-k {select!r}`: not run, no time left in the part")
            problems.append("timeout")
            continue
        problem = _pytest_run(check, rec, check.out / log_name, select, limit)
        if problem:
            problems.append(problem)
    if problems:
        rec["status_override"] = ("timeout" if "timeout" in problems else
                                  "failed" if "failed" in problems else problems[0])


def _pytest_run(check: Check, rec: dict, log: Path, select: str, limit: float) -> str:
    """One `pytest -m gpu -k select tests/gpu` in a process of its own, killed after `limit`
    seconds; its outcomes go into `rec`. Returns "" if it passed (or skipped), else "timeout",
    "failed" or "pytest exit N"."""
    cmd = [sys.executable, "-u", "-c",
           ("" if check.state["installed"] else BOOTSTRAP + "; ")
           + "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))",
           "-m", "gpu", "-k", select, "-v", "-rfEs", "-p", "no:cacheprovider", "tests/gpu"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    returncode = None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M)
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
        rec["counts"][outcome] = rec["counts"].get(outcome, 0) + 1
    summary = re.findall(r"^=+ (.*(?:passed|failed|skipped|error).*) =+$", text, re.M)
    ran = (f"killed after {limit:.0f} s" if returncode is None
           else summary[-1] if summary else f"exit {returncode}, no summary")
    rec["notes"].append(f"`-k {select!r}` ({log.name}): {ran}; per outcome {counts}")
    rec["rows"] += [{"test": t.split("::", 1)[1], "outcome": o} for t, o in outcomes
                    if o in ("FAILED", "ERROR")]
    reasons = sorted({line.split(": ", 1)[-1] for line in text.splitlines()
                      if line.startswith("SKIPPED ")})
    rec["notes"] += [f"skipped because: {r}" for r in reasons[:5]]
    rec["notes"] += [line for line in text.splitlines()
                     if line.startswith(("FAILED ", "ERROR "))][:20]
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return ""
    return "failed" if counts.get("FAILED") or counts.get("ERROR") else f"pytest exit {returncode}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke: tiny shapes, interpret kernels (CI; under 2 minutes)")
    p.add_argument("--parts", default="".join(PARTS),
                   help=f"which parts to run (default: {''.join(PARTS)})")
    p.add_argument("--total-s", type=float, default=None,
                   help=f"stop starting new work after this many seconds (default: {TOTAL_S})")
    p.add_argument("--budgets", default="",
                   help="per-part seconds, e.g. a=120,c=90 (defaults: "
                   + ",".join(f"{k}={v}" for k, v in BUDGETS.items()) + ")")
    args = p.parse_args(argv)
    bad = sorted(set(args.parts) - set(PARTS))
    if bad or not args.parts:
        p.error(f"--parts takes letters of {''.join(PARTS)}, got {args.parts!r}")
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for item in filter(None, args.budgets.split(",")):
        k, _, v = item.partition("=")
        if k not in PARTS or not v.replace(".", "", 1).isdigit():
            p.error(f"--budgets takes part=seconds pairs such as a=120, got {item!r}")
        budgets[k] = float(v)
    args.budgets = budgets
    args.total_s = args.total_s or (sum(budgets[k] for k in args.parts) if args.smoke
                                    else TOTAL_S)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        installed = make_importable()
    except WrongCheckout as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rocketkv_jax.bench.gpu_parts import (
        part_calibrate,
        part_decode,
        part_generate,
        part_kernels,
        part_mosaic,
    )

    check = Check(args)
    check.state["installed"] = installed
    check.save()
    funcs = {"a": part_tests, "b": part_kernels, "c": part_decode, "d": part_generate,
             "e": part_calibrate, "f": part_mosaic}
    for key in args.parts:
        if key != "a" and check.results["device"] is None:
            from rocketkv_jax.bench.gpu_report import jax_device

            check.results["device"] = jax_device()  # starts JAX's backend: after part a
        run_part(check, key, funcs[key])
    check.results["finished"] = True
    check.save()
    bad = [k for k, r in check.results["parts"].items() if r["status"] != "ok"]
    print(f"[gpu_check] done in {time.perf_counter() - check.t0:.0f} s; results in "
          f"{args.out}/summary.md" + (f"; not ok: {', '.join(bad)}" if bad else ""),
          file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
