"""Every code block of the README runs, as a reader would run it.

The Python blocks run in order in one fresh process (a later block may use what an
earlier one made, as in a session), in an empty directory, with nothing but the
installed package. The shell blocks set up machines and run the whole suite, so
here each command is checked to name what exists (a script, a module that answers
``--help``); CI runs the quick start's test command itself. The command-line block
must list every verb the CLI has, and no other.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == language]  # fmt: skip


def test_the_readme_has_the_blocks_this_file_runs() -> None:
    assert len(blocks("python")) >= 5 and len(blocks("bash")) >= 2


@pytest.mark.slow
def test_every_python_block_runs_in_order(tmp_path: Path, seaweed: Any) -> None:
    """(The object-storage block's s3://models is a bucket of this session's SeaweedFS,
    reached through the AWS_* variables the README names.)"""
    runner = "\n".join([
        "import sys",
        "blocks = " + repr(blocks("python")),
        "scope = {'__name__': '__main__'}",
        "for line, code in blocks:",
        "    print(f'== README.md:{line}', flush=True)",
        "    exec(compile(code, f'README.md:{line}', 'exec'), scope)",
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seaweed.bucket("models")
    env.update(AWS_ENDPOINT_URL=seaweed.endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1",
               AWS_SKIP_SIGNATURE="true")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    done = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ran = done.stdout.count("== README.md:")
    assert ran == len(blocks("python"))


def test_every_shell_command_names_what_exists() -> None:
    checked = 0
    for line, code in blocks("bash"):
        for command in code.splitlines():
            words = shlex.split(command, comments=True)
            if not words:
                continue
            if words[0] == "bash":
                script = ROOT / words[1]
                assert script.is_file(), f"README.md:{line}: {words[1]} does not exist"
                subprocess.run(["bash", "-n", str(script)], check=True)
            elif words[0].endswith("python") and words[1] == "-m":
                module = words[2]
                done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                                      capture_output=True, text=True, timeout=120)  # fmt: skip
                assert done.returncode == 0, f"README.md:{line}: {module}: {done.stderr[-2000:]}"
            else:
                pytest.fail(f"README.md:{line}: no check for {command!r}: add one here")
            checked += 1
    assert checked >= 4


def test_the_command_line_block_lists_every_verb() -> None:
    from mmcore.cli import build_parser

    listing = [code for _, code in blocks("") if code.lstrip().startswith("mmcore info")]
    assert len(listing) == 1, "the README's command-line block"
    listed = {line.split()[1] for line in listing[0].splitlines() if line.startswith("mmcore ")}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert listed == set(sub.choices)  # type: ignore[arg-type]
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        for action in command._actions:
            if not action.option_strings:  # positional: each says what it is
                assert action.help, f"mmcore {name}: argument {action.dest!r} has no help text"
