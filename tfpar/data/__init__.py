"""tfpar.data: input pipelines for data parallelism (tf.data in -> tf.data out)."""

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
from tfpar.data.split import split

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
