# Multi-worker training with Keras (TensorFlow tutorial)
# https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras
# tensorflow/docs: site/en/tutorials/distribute/multi_worker_with_keras.ipynb
#
# The program every worker runs: the notebook's code cells in order, with its `%%writefile
# mnist_setup.py` inlined and its `%%writefile main.py`, followed by the "Multi-worker training in
# depth" cells (which the notebook runs in its own process) so that every worker runs them. One
# cell moved: "Model training on a single worker" comes after main.py (see there). Left out: the
# cells that build TF_CONFIG by hand, show environment variables reaching subprocesses, and start,
# wait for, log and kill the workers as background processes (`tfpar.launch` sets each worker's
# TF_CONFIG on free 127.0.0.1 ports, as those cells do), `%%bash ls *.py`, and
# `!pip install tf-nightly`.

import json
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = "-1"

# os.environ.pop('TF_CONFIG', None)  # offline: left out: the launcher set this worker's TF_CONFIG

if '.' not in sys.path:
  sys.path.insert(0, '.')

import tensorflow as tf

# ---- %%writefile mnist_setup.py (inlined) ----

import os
import tensorflow as tf
import numpy as np

def offline_mnist_load_data():  # offline: 6,000 random images of MNIST's shape and dtype (uint8 28x28, uint8 labels), the same on every worker, labelled by a bright band of rows so there is something to learn
  rng = np.random.default_rng(0)  # offline
  y = rng.integers(0, 10, size=6000).astype(np.uint8)  # offline
  x = rng.integers(0, 64, size=(6000, 28, 28)).astype(np.uint8)  # offline
  x[np.arange(28)[None, :] // 2 == y[:, None]] = 255  # offline
  return (x, y), (x[:1000], y[:1000])  # offline

def mnist_dataset(batch_size):
  (x_train, y_train), _ = offline_mnist_load_data()  # offline: (x_train, y_train), _ = tf.keras.datasets.mnist.load_data()
  # The `x` arrays are in uint8 and have values in the [0, 255] range.
  # You need to convert them to float32 with values in the [0, 1] range.
  x_train = x_train / np.float32(255)
  y_train = y_train.astype(np.int64)
  train_dataset = tf.data.Dataset.from_tensor_slices(
      (x_train, y_train)).shuffle(60000).repeat().batch(batch_size)
  return train_dataset

def build_and_compile_cnn_model():
  model = tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(28, 28)),
      tf.keras.layers.Reshape(target_shape=(28, 28, 1)),
      tf.keras.layers.Conv2D(32, 3, activation='relu'),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(128, activation='relu'),
      tf.keras.layers.Dense(10)
  ])
  model.compile(
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      optimizer=tf.keras.optimizers.SGD(learning_rate=0.001),
      metrics=['accuracy'])
  return model

sys.modules['mnist_setup'] = sys.modules[__name__]  # mnist_setup.py is inlined above: `import mnist_setup` finds it

# ---- %%writefile main.py ----

import os
import json

import tensorflow as tf
import tfpar  # upstream:
import mnist_setup

per_worker_batch_size = 64
tf_config = json.loads(os.environ['TF_CONFIG'])
num_workers = len(tf_config['cluster']['worker'])

strategy = tfpar.get_strategy("multi_worker")  # upstream: strategy = tf.distribute.MultiWorkerMirroredStrategy()

global_batch_size = per_worker_batch_size * num_workers
multi_worker_dataset = mnist_setup.mnist_dataset(global_batch_size)

with strategy.scope():
  # Model building/compiling need to be within `strategy.scope()`.
  multi_worker_model = mnist_setup.build_and_compile_cnn_model()


multi_worker_model.fit(multi_worker_dataset, epochs=3, steps_per_epoch=10)  # offline: 10 steps per epoch, not 70

# ---- Model training on a single worker ----
# The notebook runs this cell before main.py, in its own process (no strategy). A worker must
# create the strategy before any other TensorFlow operation, so it comes after main.py here; the
# "Model saving and loading" cells below train on `single_worker_dataset`.

import mnist_setup

batch_size = 64
single_worker_dataset = mnist_setup.mnist_dataset(batch_size)
single_worker_model = mnist_setup.build_and_compile_cnn_model()
single_worker_model.fit(single_worker_dataset, epochs=3, steps_per_epoch=10)  # offline: 10 steps per epoch, not 70

# ---- Multi-worker training in depth ----

# Dataset sharding
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

global_batch_size = 64
multi_worker_dataset = mnist_setup.mnist_dataset(batch_size=64)
dataset_no_auto_shard = multi_worker_dataset.with_options(options)

# Model saving and loading
model_path = 'keras-model.keras'  # keras3: Keras 3 saves only to .keras files; offline: in the run's directory, not /tmp (the tutorial: model_path = '/tmp/keras-model')

def _is_chief(task_type, task_id):
  # Note: there are two possible `TF_CONFIG` configurations.
  #   1) In addition to `worker` tasks, a `chief` task type is use;
  #      in this case, this function should be modified to
  #      `return task_type == 'chief'`.
  #   2) Only `worker` task type is used; in this case, worker 0 is
  #      regarded as the chief. The implementation demonstrated here
  #      is for this case.
  # For the purpose of this Colab section, the `task_type` is `None` case
  # is added because it is effectively run with only a single worker.
  return (task_type == 'worker' and task_id == 0) or task_type is None

def _get_temp_dir(dirpath, task_id):
  base_dirpath = 'workertemp_' + str(task_id)
  temp_dir = os.path.join(dirpath, base_dirpath)
  tf.io.gfile.makedirs(temp_dir)
  return temp_dir

def write_filepath(filepath, task_type, task_id):
  dirpath = os.path.dirname(filepath)
  base = os.path.basename(filepath)
  if not _is_chief(task_type, task_id):
    dirpath = _get_temp_dir(dirpath, task_id)
  return os.path.join(dirpath, base)

task_type, task_id = (strategy.cluster_resolver.task_type,
                      strategy.cluster_resolver.task_id)
write_model_path = write_filepath(model_path, task_type, task_id)

multi_worker_model.save(write_model_path)

if not _is_chief(task_type, task_id):
  tf.io.gfile.rmtree(os.path.dirname(write_model_path))

loaded_model = tf.keras.models.load_model(model_path)

# Now that the model is restored, and can continue with the training.
loaded_model.fit(single_worker_dataset, epochs=2, steps_per_epoch=5)  # offline: 5 steps per epoch, not 20

# Checkpoint saving and restoring
checkpoint_dir = 'ckpt'  # offline: in the run's directory, not /tmp (the tutorial: checkpoint_dir = '/tmp/ckpt')

checkpoint = tf.train.Checkpoint(model=multi_worker_model)
write_checkpoint_dir = write_filepath(checkpoint_dir, task_type, task_id)
checkpoint_manager = tf.train.CheckpointManager(
    checkpoint, directory=write_checkpoint_dir, max_to_keep=1)

checkpoint_manager.save()
if not _is_chief(task_type, task_id):
  tf.io.gfile.rmtree(write_checkpoint_dir)

latest_checkpoint = tf.train.latest_checkpoint(checkpoint_dir)
checkpoint.restore(latest_checkpoint)
multi_worker_model.fit(multi_worker_dataset, epochs=2, steps_per_epoch=5)  # offline: 5 steps per epoch, not 20

# The BackupAndRestore callback

# Multi-worker training with `MultiWorkerMirroredStrategy`
# and the `BackupAndRestore` callback. The training state
# is backed up at epoch boundaries by default.

callbacks = [tf.keras.callbacks.BackupAndRestore(backup_dir='backup')]  # offline: in the run's directory, not '/tmp/backup'
with strategy.scope():
  multi_worker_model = mnist_setup.build_and_compile_cnn_model()
multi_worker_model.fit(multi_worker_dataset,
                       epochs=3,
                       steps_per_epoch=10,  # offline: 10, not 70
                       callbacks=callbacks)

# The training state is backed up at epoch boundaries because `save_freq` is
# set to `epoch`.

callbacks = [tf.keras.callbacks.BackupAndRestore(backup_dir='backup')]  # offline: in the run's directory, not '/tmp/backup'
with strategy.scope():
  multi_worker_model = mnist_setup.build_and_compile_cnn_model()
multi_worker_model.fit(multi_worker_dataset,
                       epochs=3,
                       steps_per_epoch=10,  # offline: 10, not 70
                       callbacks=callbacks)

# The training state is backed up at every 30 steps because `save_freq` is set
# to an integer value of `30`.

callbacks = [tf.keras.callbacks.BackupAndRestore(backup_dir='backup', save_freq=4)]  # offline: every 4 steps, not 30 (an epoch has 10); in the run's directory, not '/tmp/backup'
with strategy.scope():
  multi_worker_model = mnist_setup.build_and_compile_cnn_model()
multi_worker_model.fit(multi_worker_dataset,
                       epochs=3,
                       steps_per_epoch=10,  # offline: 10, not 70
                       callbacks=callbacks)
