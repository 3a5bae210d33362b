"""The interception declarations, the one installer, the fit context and docs/interceptions.md.

In-process and fast: nothing here trains. What each interception fixes is tested by the test its
declaration names (checked to exist below).
"""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import pytest
import tensorflow as tf

import tfpar.coordinator  # noqa: F401 - declares the parameter-server interceptions
from tfpar import _compat
from tfpar._compat import _context, _patching, shared_shuffle
from tfpar.coordinator import _patches

REPO = Path(__file__).resolve().parents[1]
FIT = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer.fit"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_declaration_names_its_targets_issue_versions_and_an_existing_test():
    slugs = [interception.slug for interception in _compat.catalogue()]
    assert len(slugs) == len(set(slugs)) == 15
    for interception in _compat.catalogue():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)+", interception.slug), interception.slug
        assert interception.targets and interception.summary and interception.upstream_issue
        assert set(interception.patches) <= set(interception.targets)
        assert set(interception.verified_versions) == {"tensorflow", "keras"}
        path, _, function = interception.test.partition("::")
        assert function in _test_functions(REPO / path), f"{interception.slug}: no test {interception.test}"


def test_every_target_exists_in_the_installed_keras_and_tensorflow():
    for interception in _compat.catalogue():
        for target in interception.targets:
            owner, name = _patching.resolve(target)
            assert hasattr(owner, name), f"{interception.slug}: {target}"


def test_a_missing_target_is_a_loud_error_naming_it_and_the_verified_versions(monkeypatch):
    monkeypatch.setattr(_patching, "_DECLARED", dict(_patching._DECLARED))  # keep the catalogue as it is
    broken = _compat.Interception(
        slug="test-missing-target", summary="s", upstream_issue="none", test="tests/test_compat.py::x",
        targets=("keras.src.backend.tensorflow.trainer:TensorFlowTrainer.no_such_method",),
    )
    with pytest.raises(RuntimeError) as caught:
        _compat.install(broken)
    message = str(caught.value)
    assert "TensorFlowTrainer.no_such_method (test-missing-target)" in message
    assert "Expected the versions tfpar was verified on: TensorFlow 2.21.0 / Keras 3.15.1" in message
    assert re.search(r"pip install 'tensorflow[<>=,.0-9]+' 'keras[<>=,.0-9]+'", message)  # setup.cfg's bounds
    assert "test-missing-target" not in _compat.installed()


def test_a_patch_of_an_undeclared_target_is_refused():
    with pytest.raises(ValueError, match="patches targets it does not declare"):
        _compat.Interception(slug="a-b", summary="s", upstream_issue="none", test="t", targets=("m:x",),
                             patches={"m:y": print})


def test_slugs_are_declared_once():
    with pytest.raises(ValueError, match="declared twice"):
        _compat.declare(_compat.Interception(
            slug="exact-gradients", summary="s", upstream_issue="none", test="t", targets=("m:x",)))


def test_manage_installs_every_managed_interception_once():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert _compat.manage(strategy) is strategy and _compat.is_managed(strategy)
    installed = _compat.installed()
    assert {i.slug for i in _compat.MANAGED} <= set(installed)
    _compat.manage(tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert _compat.installed() == installed
    assert _compat.layers(FIT)[0] == "shared-shuffle"


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "passed on"


class _Model:
    def __init__(self, strategy):
        self._distribute_strategy = self.distribute_strategy = strategy


def _managed_ps_strategy():
    strategy = object.__new__(tf.distribute.ParameterServerStrategy)  # no cluster needed to route
    _context.add_managed(strategy)
    return strategy


def test_the_two_fit_layers_pass_each_others_models_through_so_their_order_does_not_matter(monkeypatch):
    """shared-shuffle's fit and ps-loops' fit both patch TensorFlowTrainer.fit. Each hands the
    models of the other on untouched, so either layering gives every model the right fit."""
    _compat.manage(tf.distribute.OneDeviceStrategy("/cpu:0"))
    below, loop = _Recorder(), _Recorder()
    monkeypatch.setitem(_patching._ORIGINALS, ("shared-shuffle", FIT), below)
    monkeypatch.setitem(_patching._ORIGINALS, ("ps-loops", FIT), below)
    monkeypatch.setattr(_patches, "fit", loop)
    ps_model = _Model(_managed_ps_strategy())
    assert shared_shuffle._fit(ps_model, 1, epochs=2) == "passed on"
    assert below.calls == [((ps_model, 1), {"epochs": 2})]
    mirrored_model = _Model(_compat.manage(tf.distribute.OneDeviceStrategy("/cpu:0")))
    assert _patches._routed_fit(mirrored_model, 1, epochs=2) == "passed on"
    assert below.calls[-1] == ((mirrored_model, 1), {"epochs": 2}) and not loop.calls
    _patches._routed_fit(ps_model, 1, epochs=2)
    assert loop.calls == [((ps_model, 1), {"epochs": 2})]


def test_the_fit_context_is_a_stack_per_thread():
    outer, inner, state = object(), object(), object()
    with _context.running(outer, state):
        with _context.running(inner):
            assert _context.running_model() is inner
            assert _context.fit_state(outer) is state and _context.fit_state(inner) is None
            assert _context.shuffle_state() is state
            seen = []
            thread = threading.Thread(target=lambda: seen.append((_context.running_model(), _context.shuffle_state())))
            thread.start()
            thread.join()
            assert seen == [(None, None)]
        assert _context.running_model() is outer
    assert _context.running_model() is None and _context.shuffle_state() is None


def test_docs_catalogue_table_is_the_generated_one_and_every_slug_is_explained():
    text = (REPO / "docs" / "interceptions.md").read_text()
    table = re.search(r"<!-- catalogue: begin.*?-->\n(.*?)<!-- catalogue: end -->", text, re.S).group(1)
    assert table == _compat.catalogue_markdown(), (
        "docs/interceptions.md's table is out of date; replace it with:\n" + _compat.catalogue_markdown()
    )
    explained = re.findall(r"^### `([a-z-]+)`$", text, re.M)
    assert explained == [interception.slug for interception in _compat.catalogue()]
