"""MkDocs hooks of tfpar's site (``hooks:`` in mkdocs.yml): notebooks with outputs, benchmark results.

* **Notebooks.** ``notebooks/*.ipynb`` are committed with their outputs cleared (a test asserts
  it), so the site runs them when it is built, the way ``tests/test_notebooks.py`` does: nbclient,
  a fresh ``python3`` kernel per notebook, a temporary working directory, a timeout per cell,
  ``TF_CPP_MIN_LOG_LEVEL=3``. A cell that raises fails the build (never a page with a traceback).
  The executed copies live in a temporary folder and join the site as ``notebooks/<name>.ipynb``;
  mkdocs-jupyter renders them (``execute: false`` there: the execution is done here). The repository's
  notebooks are never written to.

  ``TFPAR_DOCS_EXECUTE=0`` skips the execution (pages then show code without outputs and a note
  saying so), for quick previews of prose changes with ``mkdocs serve``.

* **Benchmarks.** ``docs/benchmarks.md`` holds the line ``<!-- include: benchmarks/RESULTS.md -->``;
  it is replaced by that file, its headings moved one level down, so the results have one source.

* **Command-line help.** A line ``<!-- help: tfpar train -->`` becomes the output of
  ``tfpar train --help`` (80 columns), taken from the installed ``tfpar`` in one subprocess per
  build, so the command-line page cannot drift from the parser.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mkdocs.plugins
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.tfpar")  # under "mkdocs.": a warning fails --strict

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell, as tests/test_notebooks.py
INCLUDE = re.compile(r"^<!-- include: (?P<path>[\w./-]+) -->$", re.M)
HELP = re.compile(r"^<!-- help: (?P<command>tfpar(?: [a-z]+)?) -->$", re.M)
HELP_SEPARATOR = "\n=== tfpar docs: next help ===\n"
# One process prints every help text: each `tfpar` import costs a TensorFlow import.
HELP_SCRIPT = """
import sys
from tfpar import cli
for index, argv in enumerate(sys.argv[1:]):
    if index:
        print(%r, end="", flush=True)
    try:
        cli.main([*argv.split(), "--help"])
    except SystemExit:
        pass
    sys.stdout.flush()
""" % HELP_SEPARATOR

STARTUP_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] .*)\r?\n?$"
)

_workdirs: list[Path] = []
_help: dict[str, str] = {}


def on_pre_build(config):
    _help.clear()  # a rebuild (mkdocs serve) reads the parser again


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter's on_files, which wraps .ipynb files
def on_files(files, config):
    execute = os.environ.get("TFPAR_DOCS_EXECUTE", "1").strip().lower() not in ("0", "false", "no")
    workdir = Path(tempfile.mkdtemp(prefix="tfpar-docs-notebooks-"))
    _workdirs.append(workdir)
    started = time.monotonic()
    (workdir / "notebooks").mkdir()
    for source in sorted(NOTEBOOKS.glob("*.ipynb")):
        target = workdir / "notebooks" / source.name
        if execute:
            _execute(source, target, workdir / f"{source.stem}.cwd")
        else:
            _copy_unexecuted(source, target)
        # A File with a real src_dir (not File.generated): mkdocs-jupyter's wrapper needs src_dir.
        files.append(
            File(f"notebooks/{source.name}", str(workdir), config["site_dir"], config["use_directory_urls"])
        )
    if execute:
        log.info("tfpar: executed the notebooks in %.0f s", time.monotonic() - started)
    else:
        log.info("tfpar: TFPAR_DOCS_EXECUTE=0: notebooks rendered without outputs")
    return files


def on_page_markdown(markdown, page, config, files):
    def include(match: re.Match) -> str:
        path = ROOT / match.group("path")
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: cannot include {match.group('path')}: no such file")
        text = path.read_text(encoding="utf-8")
        return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)  # one level down: the page has its own title

    markdown = INCLUDE.sub(include, markdown)
    commands = [match.group("command") for match in HELP.finditer(markdown)]
    if commands:
        _read_help(commands, page.file.src_uri)
        markdown = HELP.sub(lambda match: f"```text\n{_help[match.group('command')]}\n```", markdown)
    return markdown


def _read_help(commands: list[str], where: str) -> None:
    missing = [command for command in dict.fromkeys(commands) if command not in _help]
    if not missing:
        return
    arguments = [command.removeprefix("tfpar").strip() for command in missing]
    environment = {**os.environ, "COLUMNS": "80", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, *arguments],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300,
    )
    texts = result.stdout.split(HELP_SEPARATOR)
    if result.returncode != 0 or len(texts) != len(missing) or not all(t.strip() for t in texts):
        raise PluginError(f"{where}: could not read the help of {missing}:\n{result.stderr[-2000:]}")
    _help.update({command: text.rstrip() for command, text in zip(missing, texts)})


def on_post_build(config):
    _remove_workdirs()


def on_shutdown():
    _remove_workdirs()


def _remove_workdirs() -> None:
    while _workdirs:
        shutil.rmtree(_workdirs.pop(), ignore_errors=True)


def _execute(source: Path, target: Path, cwd: Path) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(source, as_version=4)
    cwd.mkdir()
    started = time.monotonic()
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    # The kernel is this environment's python3 (ahead of a user-level kernelspec of that name).
    with _environment(TF_CPP_MIN_LOG_LEVEL="3", JUPYTER_PREFER_ENV_PATH="1"):
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as error:
            raise PluginError(f"notebooks/{source.name} failed while the site was built:\n{error}") from None
        except nbclient.exceptions.CellTimeoutError as error:
            raise PluginError(
                f"notebooks/{source.name}: a cell ran longer than {CELL_TIMEOUT} s while the site was built: {error}"
            ) from None
        except nbclient.exceptions.DeadKernelError as error:
            raise PluginError(f"notebooks/{source.name}: the kernel died while the site was built: {error}") from None
    seconds = time.monotonic() - started
    _drop_startup_logs(notebook)
    _insert_note(notebook, _executed_note(source.name, seconds))
    nbformat.write(notebook, target)
    log.info("tfpar: executed notebooks/%s in %.0f s", source.name, seconds)


def _drop_startup_logs(notebook) -> None:
    """Removes TensorFlow's C++ start-up INFO lines from stderr outputs (nothing else).

    Lines logged before absl is initialized ignore ``TF_CPP_MIN_LOG_LEVEL``: "WARNING: All log
    messages before absl::InitializeLog() ...", then absl INFO lines such as "I0000 ... port.cc:153]
    oneDNN custom operations are on" and "cudart_stub.cc:31] Could not find cuda drivers". They
    say nothing about the notebook. Warnings and errors (``W....``/``E....`` lines) stay.
    """
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = [line for line in output.text.splitlines(keepends=True) if not STARTUP_LOG.match(line)]
                if not "".join(lines).strip():
                    continue
                output.text = "".join(lines)
            kept.append(output)
        cell.outputs = kept


def _copy_unexecuted(source: Path, target: Path) -> None:
    import nbformat

    notebook = nbformat.read(source, as_version=4)
    _insert_note(
        notebook,
        "**Not executed.** This build skipped running the notebook (`TFPAR_DOCS_EXECUTE=0`): the code is "
        "shown without its outputs.",
    )
    nbformat.write(notebook, target)


def _executed_note(name: str, seconds: float) -> str:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    today = datetime.date.today().isoformat()
    return (
        f"*Executed when this site was built ({today}, in {seconds:.0f} s): Python {platform.python_version()}, "
        f"TensorFlow {version('tensorflow')}, Keras {version('keras')}, tfpar {version('tfpar')}, "
        f"{os.cpu_count()} CPU cores. Timings are that machine's. The repository holds the notebook as "
        f"`notebooks/{name}`, without outputs.*"
    )


def _insert_note(notebook, text: str) -> None:
    """Puts a markdown cell after the cell with the notebook's title (its first ``# `` heading)."""
    import nbformat

    position = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown" and re.search(r"^# ", cell.source, re.M):
            position = index + 1
            break
    notebook.cells.insert(position, nbformat.v4.new_markdown_cell(text))


@contextlib.contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
