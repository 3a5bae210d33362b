"""collective-keys: several MirroredStrategy objects in one process.

Two strategies with different collective patterns share collective keys and fail with "Shape
mismatch in the collective instance" (notebooks re-running cells). TensorFlow's own tests bump
``MirroredStrategy._collective_key_base`` (strategy_combinations.py); tfpar does the same before
every MirroredStrategy it creates. No function is replaced.
"""

from __future__ import annotations

import tensorflow as tf

from tfpar._compat import _patching

KEY_BASE = "tensorflow.python.distribute.mirrored_strategy:MirroredStrategy._collective_key_base"
_STRIDE = 100_000


def bump_collective_key_base() -> None:
    """Gives the next MirroredStrategy collective keys no earlier strategy used."""
    _patching.install(INTERCEPTION)  # checks that the attribute still exists
    with _patching.LOCK:
        tf.distribute.MirroredStrategy._collective_key_base += _STRIDE


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="collective-keys",
    summary="several MirroredStrategy objects in one process (notebooks re-running cells): fresh "
    "collective keys for every strategy",
    targets=(KEY_BASE,),
    upstream_issue="none: TensorFlow's own tests do the same "
    "(strategy_combinations._mirrored_strategy_with_collective_key_base)",
    test="tests/test_strategies.py::test_many_mirrored_scopes_with_different_models_in_one_process",
    patches={},
))
