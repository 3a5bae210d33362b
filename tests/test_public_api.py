"""The public surface is frozen: names may be added, never renamed or removed (DESIGN.md, "Public API").

Pins ``tfpar.__all__``, the ``__all__`` of every public subpackage, and the documented signatures of
the names DESIGN.md lists (each exists, is callable, and takes the documented parameters, in the
documented order for positional ones, with the documented defaults). Internal restructuring
(module splits and renames) must leave every assertion here true.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import tfpar

REQUIRED = inspect.Parameter.empty  # a parameter without a default

# module -> names its __all__ must contain (a superset is fine: "add freely").
PINNED_ALL = {
    "tfpar": [
        "__version__", "available_strategies", "cluster", "configure_virtual_devices", "coordinator",
        "data", "datasets", "devices", "doctor", "get_strategy", "job", "launch", "local_cluster",
        "models", "parallel", "profiling", "register_strategy", "scope", "strategies", "training", "tuning",
    ],
    "tfpar.profiling": ["PARTS", "Breakdown", "ProfileReport", "StageTime", "StepProfiler", "TaskProfile"],
    "tfpar.tuning": ["Candidate", "DEFAULT_BUDGET_SECONDS", "TuningResult", "apply_settings", "describe", "tune"],
    "tfpar.data": [
        "Imputation", "IncrementalFiles", "IncrementalTrainer", "check_deterministic", "choose_policy",
        "compute_statistics", "distribute", "from_numpy", "image_class_names", "imputation",
        "mean_centering", "pipeline", "read", "read_images", "read_numpy", "read_tfrecords",
        "set_auto_shard_policy", "shard", "source_files", "split", "standardization", "write_tfrecords",
    ],
    "tfpar.parallel": [
        "BALANCE_MODES", "PlacementReport", "Plan", "SplitModel", "Stage", "bubble_fraction", "cost",
        "graph", "layer_costs", "partition", "pipeline", "placement_report", "plan", "planner",
        "report", "split",
    ],
    "tfpar.models": [
        "LocalResponseNormalization", "accepted_options", "alexnet", "available", "get", "register",
        "resnet50", "vgg", "vgg11", "vgg13", "vgg16", "vgg19",
    ],
    "tfpar.coordinator": [
        "ParameterServerError", "ParameterServerOptions", "VARIABLE_PARTITIONERS", "options",
        "parameter_server_strategy",
    ],
    "tfpar.cluster": [
        "ClusterInfo", "JOB_NAMES", "SLURM_VARIABLES", "cleanup_write_path", "detect", "free_ports",
        "is_chief", "listening_addresses", "local_cluster", "parse_tf_config", "resolve", "task_index",
        "task_type", "write_path",
    ],
}

# Public names of modules without __all__ (attributes that must stay).
PINNED_ATTRIBUTES = {
    "tfpar.datasets": ["load_digits"],
    "tfpar.strategies": [
        "available_strategies", "describe_strategies", "get_strategy", "register_strategy", "scope",
        "strategy_name", "unregister_strategy", "StrategySpec",
    ],
    "tfpar.devices": ["configure_virtual_devices"],
}

# DESIGN.md's "Public API": name -> [(parameter, default or REQUIRED)], in declaration order for the
# positional ones; "**" marks a documented **options.
SIGNATURES = {
    "tfpar.configure_virtual_devices": [("n", REQUIRED), ("device_type", "CPU")],
    "tfpar.available_strategies": [],
    "tfpar.register_strategy": [("name", REQUIRED), ("factory", REQUIRED), ("*description", REQUIRED),
                                ("*override", False)],
    "tfpar.get_strategy": [("strategy", "auto"), ("**", None)],
    "tfpar.scope": [("strategy", "auto"), ("**", None)],
    "tfpar.local_cluster": [("workers", 2), ("ps", 1), ("chief", False)],
    "tfpar.models.alexnet": [("input_shape", (227, 227, 3)), ("num_classes", 1000)],
    "tfpar.models.vgg": [("depth", 16), ("input_shape", (224, 224, 3)), ("num_classes", 1000),
                         ("batch_norm", False)],
    **{
        f"tfpar.models.vgg{depth}": [("input_shape", (224, 224, 3)), ("num_classes", 1000), ("batch_norm", False)]
        for depth in (11, 13, 16, 19)
    },
    "tfpar.data.shard": [("dataset", REQUIRED), ("num_shards", REQUIRED), ("index", REQUIRED), ("policy", "auto")],
    "tfpar.data.split": [("dataset", REQUIRED), ("fractions", REQUIRED), ("mode", "sequential"), ("seed", None)],
    "tfpar.parallel.plan": [("model", REQUIRED), ("devices", REQUIRED), ("balance", "flops")],
    "tfpar.parallel.split": [("model", REQUIRED), ("plan_or_devices", REQUIRED), ("microbatches", None)],
}

# Documented attributes of documented classes.
CLASS_ATTRIBUTES = {
    "tfpar.parallel.Plan": ["stages", "layer_costs"],
    "tfpar.parallel.Stage": ["device", "layers", "cost"],
}

STRATEGY_NAMES = ["auto", "default", "one_device", "mirrored", "multi_worker", "parameter_server",
                  "central_storage", "ps", "multi_worker_mirrored"]


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module", sorted(PINNED_ALL))
def test_all_keeps_every_pinned_name(module):
    imported = importlib.import_module(module)
    missing = sorted(set(PINNED_ALL[module]) - set(imported.__all__))
    assert not missing, f"{module}.__all__ lost {missing}"
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.__all__ names {name!r}, which the module does not have"


@pytest.mark.parametrize("module", sorted(PINNED_ATTRIBUTES))
def test_modules_without_all_keep_their_public_names(module):
    imported = importlib.import_module(module)
    missing = [name for name in PINNED_ATTRIBUTES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize("dotted", sorted(SIGNATURES))
def test_documented_signatures(dotted):
    function = _resolve(dotted)
    assert callable(function), f"{dotted} is not callable"
    parameters = inspect.signature(function).parameters
    positional = [p for p in parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    documented_positional = [name for name, _ in SIGNATURES[dotted] if not name.startswith("*")]
    assert [p.name for p in positional[: len(documented_positional)]] == documented_positional, (
        f"{dotted}{inspect.signature(function)}: expected positional parameters {documented_positional} first"
    )
    for name, default in SIGNATURES[dotted]:
        if name == "**":
            assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), f"{dotted} lost **options"
            continue
        keyword_only = name.startswith("*")
        name = name.lstrip("*")
        assert name in parameters, f"{dotted} lost parameter {name!r}"
        parameter = parameters[name]
        if keyword_only:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{dotted}: {name!r} must be keyword-only"
        assert parameter.default == default, f"{dotted}: {name}={parameter.default!r}, documented {default!r}"


@pytest.mark.parametrize("dotted", sorted(CLASS_ATTRIBUTES))
def test_documented_class_attributes(dotted):
    cls = _resolve(dotted)
    fields = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(dir(cls))
    missing = [name for name in CLASS_ATTRIBUTES[dotted] if name not in fields]
    assert not missing, f"{dotted} lost {missing}"


def test_documented_strategy_names_are_available():
    assert set(STRATEGY_NAMES) <= set(tfpar.available_strategies())


def test_launch_and_parallel_split_are_callable():
    assert callable(tfpar.launch)
    assert callable(tfpar.parallel.split)
