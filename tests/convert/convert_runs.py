"""Running `rocketkv-convert` on bad files: `convert_error` in-process (the contract of
every refusal), and `run_convert_bounded` in a child process under a memory and time
limit (a file that claims huge sizes must fail fast, not grow memory until killed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def convert_error(capsys, src: Path, out: Path) -> str:
    """Run the CLI on `src`; assert exit 2, one `error:` line, no traceback, no OUT.
    Returns the line."""
    from rocketkv_jax.cli.convert import main

    rc = main([str(src), str(out), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("rocketkv-convert: error: ") and "Traceback" not in err
    assert "ROCKETKV_DEBUG" not in err, err  # the catch-all for our own bugs
    assert not out.exists()
    return lines[0]


# Address space for the child: a tiny conversion needs about 2.2 GiB of it on CPU (JAX's
# reservations), while a loop sized by a claimed count grows past it within seconds.
ADDRESS_SPACE = 3 << 30
SECONDS = 120  # a normal tiny conversion takes ~6 s on a busy 2-core machine


# The child limits its own address space before importing anything (a preexec_fn would
# fork a multithreaded JAX process).
CHILD = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({n}, {n})); "
         "from rocketkv_jax.cli.convert import main; sys.exit(main(sys.argv[1:]))")


def run_convert_bounded(src: Path, out: Path) -> str:
    """`rocketkv-convert SRC OUT -q` under the limits; asserts one error line and exit 2
    (a MemoryError would be the catch-all's exit 1). Returns the line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-P", "-c", CHILD.format(n=ADDRESS_SPACE), str(src), str(out), "-q"],
        capture_output=True, text=True, timeout=SECONDS, env=env,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    assert "error: " in lines[0] and "ROCKETKV_DEBUG" not in lines[0], lines[0]
    assert "MemoryError" not in lines[0], lines[0]
    assert time.monotonic() - start < SECONDS
    return lines[0]
