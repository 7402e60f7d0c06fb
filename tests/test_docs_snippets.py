"""Every code block of README.md and docs/*.md that is meant to run, run as written (fast).

Conventions (an HTML comment on the line before a fenced block; invisible when rendered):

* ``<!-- doc-test: NAME, ... = VALUES -->`` -- run the block with the assignment to ``NAME, ...``
  replaced by these (small) values; the assignment must exist in the block.
* ``<!-- doc-test: skip: REASON -->`` -- the block cannot run here (a file or a GPU it needs);
  reported as a skip with the reason, never as a pass.

``python`` blocks are executed in a fresh namespace.  Shell blocks are not executed (they install
packages, build, or run for minutes); every command in them that names something in this checkout
is checked instead: ``python -m lkconv ...`` arguments go through the real CLI validation (argparse
and, for ``bench``, the full pre-run validation), ``lkconv.models.train`` / ``examples/train_replknet.py``
arguments through the trainer's parser, script paths must exist, and ``pip install -e ".[extra]"``
extras must be declared in pyproject.toml.
"""
import contextlib
import io
import os
import re
import shlex

import pytest

import lkconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lkconv.__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
FENCE = re.compile(r"^(?:<!-- doc-test: (?P<marker>.*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$",
                   re.S | re.M)
SHELL = ("bash", "sh", "shell", "console", "")


def blocks(lang_filter):
    out = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for m in FENCE.finditer(text):
            if m["lang"] in lang_filter:
                line = text.count("\n", 0, m.start("body"))
                out.append(pytest.param(doc, line, m["marker"], m["body"], id=f"{doc}:{line}"))
    return out


def apply_marker(body: str, marker):
    if marker is None:
        return body
    if marker.startswith("skip:"):
        pytest.skip(f"doc-test marker: {marker[5:].strip()}")
    lhs, sep, rhs = marker.partition("=")
    assert sep, f"doc-test marker must be 'NAME = VALUE' or 'skip: reason', got {marker!r}"
    pat = re.compile(r"^(\s*" + re.escape(lhs.strip()) + r"\s*=)[^\n#]*", re.M)
    new, n = pat.subn(lambda m: m[1] + " " + rhs.strip() + "  ", body)
    assert n, f"doc-test marker {marker!r}: no assignment to {lhs.strip()!r} in the block"
    return new


PY_BLOCKS = blocks(("python",))


def test_there_are_python_blocks():
    assert any(p.values[0] == "README.md" for p in PY_BLOCKS)


@pytest.mark.parametrize("doc,line,marker,body", PY_BLOCKS)
def test_python_block_runs(doc, line, marker, body):
    code = apply_marker(body, marker)
    ns = {"__name__": f"doc_block_{line}"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"{doc}:{line}", "exec"), ns)


# ------------------------------------------------------------------------------------------------
def _commands(body: str):
    """Shell commands of a block: comments stripped, `$ ` prompts removed, split at && ; |."""
    for raw in body.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        elif raw.startswith(" ") or not line:
            continue  # output lines of a console transcript
        try:
            toks = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd = []
        for t in toks + ["&&"]:
            if t in ("&&", ";", "||", "|"):
                if cmd:
                    yield cmd
                cmd = []
            else:
                cmd.append(t)


def _extras():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def _check_command(cmd):
    """Returns a description of what was checked, or None for a command this test does not know."""
    from lkconv import cli
    from lkconv.models import train

    while cmd and re.match(r"^[A-Z_]+=", cmd[0]):  # VAR=value prefixes
        cmd = cmd[1:]
    if not cmd:
        return None
    if cmd[0] in ("python", "python3") and cmd[1:3] == ["-m", "lkconv"]:
        args = cmd[3:]
        if args and args[0] == "train":
            train.build_parser().parse_args(args[1:])
            return "train args"
        ns = cli.build_parser().parse_args(args)
        if ns.command == "bench":
            cli.bench_config(ns)  # the whole pre-run validation, nothing is run
        return "lkconv CLI"
    if "lkconv.models.train" in cmd or any(c.endswith("train_replknet.py") for c in cmd):
        idx = max(i for i, c in enumerate(cmd) if c == "lkconv.models.train" or c.endswith("train_replknet.py"))
        if cmd[idx].endswith(".py"):
            assert os.path.isfile(os.path.join(ROOT, cmd[idx])), cmd[idx]
        train.build_parser().parse_args(cmd[idx + 1:])
        return "train args"
    if cmd[0] == "bash" and len(cmd) > 1 or cmd[0].endswith(".sh"):
        path = cmd[1] if cmd[0] == "bash" else cmd[0]
        assert os.path.isfile(os.path.join(ROOT, path)), f"script {path} does not exist"
        return "script exists"
    if cmd[0] in ("python", "python3") and len(cmd) > 1 and cmd[1].endswith(".py"):
        assert os.path.isfile(os.path.join(ROOT, cmd[1])), f"{cmd[1]} does not exist"
        return "script exists"
    if "pip" in cmd and "install" in cmd:
        for t in cmd:
            m = re.match(r"^\.\[(.*)\]$", t)
            if m:
                missing = set(m[1].split(",")) - _extras()
                assert not missing, f"extras {missing} are not declared in pyproject.toml"
        return "pip extras"
    return None


SHELL_BLOCKS = blocks(SHELL)


@pytest.mark.parametrize("doc,line,marker,body", SHELL_BLOCKS)
def test_shell_block_commands_are_valid(doc, line, marker, body):
    if marker is not None and marker.startswith("skip:"):
        pytest.skip(f"doc-test marker: {marker[5:].strip()}")
    for cmd in _commands(body):
        try:
            _check_command(cmd)
        except SystemExit as e:  # argparse / CLI validation
            raise AssertionError(f"{doc}:{line}: `{' '.join(cmd)}` is rejected by the CLI: {e.code}") from None


def test_readme_shell_commands_are_checked():
    """The README's two main commands are among those checked (the test is not vacuous)."""
    seen = set()
    for p in SHELL_BLOCKS:
        if p.values[0] == "README.md":
            for cmd in _commands(p.values[3]):
                what = _check_command(cmd)
                if what:
                    seen.add((what, " ".join(cmd)))
    cmds = {c for _, c in seen}
    assert "python -m lkconv bench" in cmds and "python -m lkconv info" in cmds
    assert "bash scripts/setup_and_test.sh" in cmds
