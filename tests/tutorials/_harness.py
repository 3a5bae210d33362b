"""Runs an adapted public TensorFlow / Keras tutorial as real processes, under tfpar or upstream.

Each script in ``scripts/`` is a public tutorial's code, changed only where adoption requires, and
every changed line says why in a trailing comment:

* ``# upstream: <the tutorial's line>``: the line tfpar changes (the strategy line and the
  ``import tfpar`` it needs). :func:`source` with ``upstream=True`` puts the tutorial's line back
  (an empty original removes the line), so the same file runs both ways.
* ``# offline: ...``: data replaced by offline data of the same shapes and dtypes (the tasks run in
  an isolated network namespace; CI has no dataset cache), or made smaller.
* ``# keras3: ...``: a line that fails on Keras 3 with any strategy (tf.keras-only API).

The harness adds a prelude the tutorial does not have: the working directory (so the tutorial's
relative paths land in the test's tmp_path) and, for one-process tutorials, 2 virtual CPUs, the
stand-in for the two GPUs the tutorials are written for.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from tfpar import launch

SCRIPTS = Path(__file__).parent / "scripts"
_UPSTREAM = re.compile(r"^(?P<indent>\s*)(?P<code>.*?)\s*#\s*upstream:\s?(?P<original>.*)$")

_PRELUDE = """\
import os as _os
_os.chdir({directory!r})
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
"""
_VIRTUAL_CPUS = """\
import tensorflow as _tf
_tf.config.set_logical_device_configuration(
    _tf.config.list_physical_devices("CPU")[0], [_tf.config.LogicalDeviceConfiguration()] * {count})
"""


@dataclasses.dataclass
class Run:
    """The outcome of one tutorial run: exit code and all output (stdout and stderr, prefixed per task)."""

    code: int
    output: str

    def assert_clean(self) -> None:
        """Asserts the run succeeded and printed no traceback (a successful run must not)."""
        assert self.code == 0, self.output[-6000:]
        assert "Traceback" not in self.output, self.output[-6000:]


def source(name: str, upstream: bool = False) -> str:
    """The tutorial script's text, as adapted for tfpar or (upstream=True) as the tutorial has it."""
    lines = []
    for line in (SCRIPTS / f"{name}.py").read_text().splitlines():
        match = _UPSTREAM.match(line)
        if match and upstream:
            if match["original"].strip():
                lines.append(match["indent"] + match["original"].strip())
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def changed_lines(name: str) -> list[str]:
    """The lines tfpar changes in the tutorial (those with an ``# upstream:`` comment)."""
    return [line.strip() for line in source(name).splitlines() if _UPSTREAM.match(line)]


def run(
    name: str,
    directory: Path,
    *,
    upstream: bool = False,
    workers: int = 0,
    ps: int = 0,
    chief: bool = False,
    virtual_cpus: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Run:
    """Runs tutorial `name` in `directory`: one process, or a local cluster when `workers` > 0.

    One process gets `virtual_cpus` logical CPUs (the tutorial's GPUs); cluster tasks get one
    device each, started by ``tfpar.launch`` with TF_CONFIG, as ``tfpar launch`` would.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prelude = _PRELUDE.format(directory=str(directory))
    if not workers and virtual_cpus > 1:
        prelude += _VIRTUAL_CPUS.format(count=virtual_cpus)
    script = directory / f"{name}{'_upstream' if upstream else ''}.py"
    script.write_text(prelude + source(name, upstream))
    task_env = {**(env or {}), "PYTHONUNBUFFERED": "1"}
    if workers:
        buffer = io.StringIO()
        code = launch.launch([sys.executable, str(script), *args], workers=workers, ps=ps, chief=chief,
                             timeout=timeout, output=buffer, env=task_env)
        return Run(code, buffer.getvalue())
    try:
        result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                                timeout=timeout, cwd=directory, env={**os.environ, **task_env})
    except subprocess.TimeoutExpired as timed_out:
        out = (timed_out.stdout or b"").decode() if isinstance(timed_out.stdout, bytes) else timed_out.stdout or ""
        return Run(-9, f"{out}\n[timed out after {timeout} s]")
    return Run(result.returncode, result.stdout + result.stderr)
