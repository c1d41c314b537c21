"""The README's shell commands, and a check that they run as written after ``make demo``.

Each ``mmrad`` command of the README's bash blocks is one of:

- *run*: cheap and without Ray (building the synthetic set, the tiny model, stats): run
  for real, so what it writes exists for the commands after it;
- *resolved*: a job (SFT, GRPO, evaluation, serving, ...): its config is resolved and
  validated with ``--print-config``, and every input it names must exist, or be written
  by a command above it (its run folder or export);
- *template*: a command on the reader's own data or services (``/data/...``,
  ``s3://bucket``, a hosted API, a local S3 server): skipped, with the reason.

Commands that are not ``mmrad`` (``make``, ``ray``, ``docker``, ``curl``, benchmark
scripts) are outside this check.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

README = Path(__file__).parents[2] / "README.md"

TEMPLATE_MARKERS = {
    " /data/": "the reader's own data",
    "s3://": "an object store the reader runs",
    "https://": "a hosted service",
    "http://mlflow": "the reader's MLflow server",
    "http://127.0.0.1:8000": "a running `mmrad serve`",
}
JOB_PREFIX = "ray_jobs."
RUN_FOR_REAL = (("data", "build"), ("data", "stats"), ("model", "tiny"))
NO_CONFIG = {("eval", "compare"), ("eval", "report"), ("eval", "table")}
OUTPUT_OPTIONS = ("--out",)
"""Options whose value a command writes (a later command may read it)."""
SERVERS = {("s3", "local"): "starts a server the reader stops"}
INPUT_KEYS = {"manifest", "path", "model_dir", "input", "reference", "config"}
"""Config keys whose local paths a job reads (``path`` under model, target or teacher)."""


@dataclass
class Command:
    line: int
    block: int
    """Which bash block (its first line): commands chain within a block only."""
    argv: list[str]
    """From ``mmrad`` on (``scripts/loopback-netns`` and the venv's path left out)."""

    @property
    def name(self) -> tuple[str, ...]:
        if self.argv[0].startswith(JOB_PREFIX):
            return (self.argv[0],)
        words = [a for a in self.argv[1:3] if not a.startswith("-") and "=" not in a]
        if words and words[0] in {"data", "model", "eval", "s3"}:
            return tuple(words[:2])
        return tuple(words[:1])

    def template_reason(self) -> str | None:
        text = " " + " ".join(arg.split("=", 1)[-1] for arg in self.argv)
        return next((why for marker, why in TEMPLATE_MARKERS.items() if marker in text), None)


def readme_commands(text: str | None = None) -> list[Command]:
    """Every ``mmrad`` command in the README's ``bash`` blocks, continuation lines joined
    and comments dropped."""
    text = README.read_text() if text is None else text
    commands = []
    in_block, pending, start, block = False, "", 0, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, block = line.strip() == "```bash", number
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        argv = argv[1:] if argv and argv[0].endswith("loopback-netns") else argv
        if argv and Path(argv[0]).name == "mmrad":
            commands.append(Command(start, block, ["mmrad", *argv[1:]]))
        elif job_module(argv):
            at = argv.index(job_module(argv))
            commands.append(Command(start, block, argv[at:]))
    return commands


def job_module(argv: list[str]) -> str | None:
    """``ray_jobs.<job>`` of a ``python -m ray_jobs.<job> ...`` command (also after
    ``ray job submit ... --``), else None."""
    for flag, module in zip(argv, argv[1:], strict=False):
        if flag == "-m" and module.startswith(JOB_PREFIX):
            return module
    return None


def local_inputs(config: Any, under: str = "") -> list[str]:
    """The local paths among a resolved config's input keys, at any depth."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, dict | list):
                found += local_inputs(value, key)
            elif is_input(key, under) and isinstance(value, str) and is_local_path(value):
                found.append(value)
    elif isinstance(config, list):
        for item in config:
            found += local_inputs(item, under)
    return found


def is_input(key: str, section: str) -> bool:
    return key in INPUT_KEYS and (key != "path" or section in {"model", "target", "teacher"})


def is_local_path(value: str) -> bool:
    return "://" not in value and ("/" in value or value.endswith((".yaml", ".parquet")))


def promised_outputs(config: Any) -> list[str]:
    """Folders a job writes: ``<run.storage_path>/<run.name>`` and ``export.out``."""
    if not isinstance(config, dict):
        return []
    run, export = config.get("run") or {}, config.get("export") or {}
    found = []
    if isinstance(run, dict) and run.get("storage_path") and run.get("name"):
        found.append(f"{run['storage_path'].rstrip('/')}/{run['name']}")
    if isinstance(export, dict) and export.get("out"):
        found.append(export["out"])
    return found


@dataclass
class ChainCheck:
    """Walks the commands in order from a working folder where ``make demo`` ran."""

    workdir: Path
    invoke: Any
    """``invoke(argv) -> (exit_code, stdout or output)``: ``mmrad ...`` or
    ``ray_jobs.<job> ...``, run in-process in ``workdir``."""
    promised: list[str] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def exists(self, path: str) -> bool:
        target = Path(path) if Path(path).is_absolute() else self.workdir / path
        if target.exists():
            return True
        normal = str(Path(path))
        return any(normal == p or normal.startswith(p.rstrip("/") + "/") for p in self.promised)

    def check(self, command: Command) -> None:
        reason = SERVERS.get(command.name) or command.template_reason()
        if reason:
            self.skipped[command.line] = reason
            return
        where = f"README line {command.line}: {shlex.join(command.argv)}"
        if command.name in RUN_FOR_REAL:
            code, output = self.invoke(command.argv)
            if code:
                self.problems.append(f"{where}: exit {code}: {output[-800:]}")
            return
        written = _option(command.argv, *OUTPUT_OPTIONS)
        positional = [a for a in command.argv[1:]
                      if is_local_path(a) and "=" not in a and a != written]  # fmt: skip
        self.promised += [written] if written else []
        config_file = _option(command.argv, "--config", "-c")
        missing = [p for p in positional if not self.exists(p)]
        if command.name in NO_CONFIG or (config_file and not (self.workdir / config_file).exists()):
            # no config to resolve: its inputs must exist or be written above
            self.problems += [f"{where}: {p} does not exist" for p in missing]
            return
        code, output = self.invoke([*command.argv, "--print-config"])
        if code:
            self.problems.append(f"{where}: --print-config exit {code}: {output[-800:]}")
            return
        resolved = yaml.safe_load(output)
        inputs = [p for p in local_inputs(resolved) if p != config_file]
        missing = [p for p in [*positional, *inputs] if not self.exists(p)]
        self.problems += [f"{where}: reads {p}, which does not exist" for p in missing]
        self.promised += promised_outputs(resolved)


def _option(argv: list[str], *names: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg in names and index + 1 < len(argv):
            return argv[index + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def check_readme_after_demo(demo_latest: Path, root: Path) -> dict[int, ChainCheck]:
    """The README's commands block by block, each block in a fresh working folder under
    ``root`` whose ``runs/pipeline/latest`` is ``demo_latest`` (a pipeline run's links):
    a command may read what the demo wrote and what the commands above it in its own
    block write, nothing else. The CLI runs in-process; the checks by block."""
    from itertools import groupby

    from typer.testing import CliRunner

    from mmrad.cli import app

    checks = {}
    for block, commands in groupby(readme_commands(), key=lambda c: c.block):
        workdir = root / f"block-{block}"
        (workdir / "runs/pipeline").mkdir(parents=True)
        (workdir / "runs/pipeline/latest").symlink_to(demo_latest)
        (workdir / "configs").symlink_to(README.parent / "configs")

        def invoke(argv: list[str], workdir: Path = workdir) -> tuple[int, str]:
            with _working_dir(workdir):
                if argv[0].startswith(JOB_PREFIX):
                    return run_job_module(argv)
                result = CliRunner().invoke(app, argv[1:])
            return result.exit_code, result.stdout if result.exit_code == 0 else result.output

        checks[block] = check = ChainCheck(workdir, invoke)
        for command in commands:
            check.check(command)
    return checks


def run_job_module(argv: list[str]) -> tuple[int, str]:
    """``python -m <argv[0]> <argv[1:]>`` in this process: its exit status and output."""
    import runpy
    import sys
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    out, err, saved = StringIO(), StringIO(), sys.argv
    sys.argv = [argv[0], *argv[1:]]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        return 0, out.getvalue()
    except SystemExit as done:
        code = int(done.code or 0)
        return code, out.getvalue() if code == 0 else out.getvalue() + err.getvalue()
    finally:
        sys.argv = saved


@contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
