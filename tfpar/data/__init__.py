"""tfpar.data: input pipelines for data parallelism (tf.data in -> tf.data out).

* sharding (:mod:`tfpar.data.shard`): ``shard``, ``choose_policy``, ``source_files``,
  ``set_auto_shard_policy``, ``check_deterministic``: FILE when there are enough files, DATA otherwise,
  chosen explicitly; too few files or a random order are refused with the fix;
* splitting (:mod:`tfpar.data.splitting`): ``split``, sequential or seeded random, exact and disjoint;
* pipelines (:mod:`tfpar.data.pipeline`): ``pipeline`` (map, cache, shuffle, augment, batch, prefetch)
  and ``distribute`` (per-replica batches from ``strategy.distribute_datasets_from_function``);
* readers (:mod:`tfpar.data.readers`): ``read_images``, ``read_tfrecords``, ``from_numpy``,
  ``read_numpy``, ``read``, ``write_tfrecords``;
* preprocessing (:mod:`tfpar.data.preprocessing`): ``standardization``, ``mean_centering``,
  ``imputation`` / ``Imputation``, ``compute_statistics``: Keras layers that ship with the model;
* incremental training (:mod:`tfpar.data.incremental`): ``IncrementalFiles``, ``IncrementalTrainer``.

Example:
    import tfpar
    import tfpar.data

    with tfpar.scope("mirrored") as strategy:
        model = build_model()   # compiled Keras model
    images = tfpar.data.read_images("/data/flowers", image_size=(128, 128))
    train, val = tfpar.data.split(images, (0.9, 0.1), mode="random", seed=0)
    model.fit(tfpar.data.distribute(strategy, train, global_batch_size=64, shuffle=1000, seed=0),
              epochs=10)
"""

from tfpar.data.incremental import IncrementalFiles, IncrementalTrainer
from tfpar.data.pipeline import distribute, pipeline
from tfpar.data.preprocessing import (
    Imputation,
    compute_statistics,
    imputation,
    mean_centering,
    standardization,
)
from tfpar.data.readers import (
    from_numpy,
    image_class_names,
    read,
    read_images,
    read_numpy,
    read_tfrecords,
    write_tfrecords,
)
from tfpar.data.shard import (
    check_deterministic,
    choose_policy,
    set_auto_shard_policy,
    shard,
    source_files,
)
from tfpar.data.splitting import split

__all__ = [
    "Imputation",
    "IncrementalFiles",
    "IncrementalTrainer",
    "check_deterministic",
    "choose_policy",
    "compute_statistics",
    "distribute",
    "from_numpy",
    "image_class_names",
    "imputation",
    "mean_centering",
    "pipeline",
    "read",
    "read_images",
    "read_numpy",
    "read_tfrecords",
    "set_auto_shard_policy",
    "shard",
    "source_files",
    "split",
    "standardization",
    "write_tfrecords",
]
