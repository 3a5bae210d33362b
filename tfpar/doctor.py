"""`tfpar doctor`: versions, devices, detected cluster, and known-bad combinations."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform

import keras
import tensorflow as tf

import tfpar.coordinator  # noqa: F401 - declares the parameter-server interceptions in the catalogue
from tfpar import _compat, cluster, devices
from tfpar.version import __version__

MIN_VERSIONS = {"tensorflow": (2, 16), "keras": (3, 5)}


@dataclasses.dataclass(frozen=True)
class Report:
    """What `tfpar doctor` found.

    Attributes:
        versions: Package name -> version string.
        physical_devices: Physical device names.
        logical_devices: Canonical logical device names.
        cluster: A description of the detected cluster, or None on a single machine.
        problems: Known-bad combinations found (each with its fix).
        notes: Other observations.
    """

    versions: dict[str, str]
    physical_devices: list[str]
    logical_devices: list[str]
    cluster: str | None
    problems: list[str]
    notes: list[str]


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> Report:
    """Collects the report (initializes TensorFlow's devices).

    Example:
    >>> report = tfpar.doctor.collect()
    >>> report.problems
    []
    """
    versions = {
        "tfpar": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    problems: list[str] = []
    notes: list[str] = []
    for name, minimum in MIN_VERSIONS.items():
        if _major_minor(versions[name]) < minimum:
            problems.append(
                f"{name} {versions[name]} is older than tfpar needs ({'.'.join(map(str, minimum))}+): "
                f"pip install -U '{name}>={'.'.join(map(str, minimum))}'"
            )
    verified = _compat.VERIFIED_VERSIONS
    if (versions["tensorflow"], versions["keras"]) != (verified["tensorflow"], verified["keras"]):
        notes.append(
            f"tfpar's Keras fixes were verified on TensorFlow {verified['tensorflow']} / Keras "
            f"{verified['keras']}; run the test suite (pytest) to check this combination."
        )
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true"):
        problems.append(
            "TF_USE_LEGACY_KERAS is set: tf.keras is Keras 2 (tf_keras), which tfpar's fixes do not "
            "cover. Unset it and use `import keras` (Keras 3)."
        )
    horovod = _installed("horovod")
    if horovod and _major_minor(versions["tensorflow"]) >= (2, 16):
        problems.append(
            f"horovod {horovod} is installed and fails on TensorFlow >= 2.16 (horovod/horovod#4290); "
            "use tfpar.scope('multi_worker') instead and uninstall horovod."
        )
    physical = [d.name for d in tf.config.list_physical_devices()]
    logical = devices.list_devices()
    if not tf.config.list_physical_devices("GPU"):
        notes.append(
            "No GPU: tfpar.configure_virtual_devices(n) makes n virtual CPUs for testing data "
            "parallelism (they share the CPU cores: behaviour, not speed)."
        )
    try:
        info = cluster.detect()
    except ValueError as error:  # malformed TF_CONFIG or Slurm variables
        problems.append(f"cluster configuration: {error}")
        info = None
    description = None
    if info is not None:
        description = (
            f"{info.source}: {info.num_workers} worker(s), {info.num_ps} ps, "
            f"chief={'yes' if info.has_chief else 'no'}; this task is {info.task_type}:{info.task_index}"
        )
    for interception in _compat.catalogue():
        notes.append(
            f"fix active for tfpar strategies: {interception.slug}: {interception.summary} "
            f"({interception.upstream_issue})"
        )
    return Report(versions, physical, logical, description, problems, notes)


def format_report(report: Report) -> str:
    """Formats a :class:`Report` for the terminal."""
    lines = ["== tfpar doctor =="]
    lines += [f"{name:<12}{version}" for name, version in report.versions.items()]
    lines.append(f"{'devices':<12}{', '.join(report.logical_devices)}")
    lines.append(f"{'cluster':<12}{report.cluster or 'none detected (single machine)'}")
    lines.append("problems:" if report.problems else "problems:   none")
    lines += [f"  - {problem}" for problem in report.problems]
    lines.append("notes:")
    lines += [f"  - {note}" for note in report.notes]
    return "\n".join(lines)
