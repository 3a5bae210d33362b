# Save and load a model using a distribution strategy: the code cells of tensorflow/docs
# site/en/tutorials/distribute/save_and_load.ipynb, in order, changed only where a trailing comment
# says why (tests/tutorials/_harness.py).

#@title Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
# https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import numpy as np  # offline: replaces "import tensorflow_datasets as tfds" (MNIST is built below)

import tensorflow as tf
import tfpar  # upstream:

def offline_mnist(num_examples, seed):  # offline: MNIST-shaped random data (uint8 (28, 28, 1) images, int64 labels)
  rng = np.random.default_rng(seed)  # offline
  labels = rng.integers(0, 10, num_examples)  # offline
  images = rng.integers(0, 128, (num_examples, 28, 28, 1)).astype(np.uint8)  # offline
  rows = np.arange(28)[None, :, None, None]  # offline: a bright bar at a label-dependent row makes it learnable
  bar = (rows >= 2 * labels[:, None, None, None] + 4) & (rows < 2 * labels[:, None, None, None] + 7)  # offline
  images = np.where(bar, np.uint8(255), images)  # offline
  return tf.data.Dataset.from_tensor_slices((images, labels))  # offline

mirrored_strategy = tfpar.get_strategy("mirrored")  # upstream: mirrored_strategy = tf.distribute.MirroredStrategy()

def get_data():
  datasets = {'train': offline_mnist(1000, 0), 'test': offline_mnist(300, 1)}  # offline: was datasets = tfds.load(name='mnist', as_supervised=True) (60000 / 10000 examples)
  mnist_train, mnist_test = datasets['train'], datasets['test']

  BUFFER_SIZE = 10000

  BATCH_SIZE_PER_REPLICA = 64
  BATCH_SIZE = BATCH_SIZE_PER_REPLICA * mirrored_strategy.num_replicas_in_sync

  def scale(image, label):
    image = tf.cast(image, tf.float32)
    image /= 255

    return image, label

  train_dataset = mnist_train.map(scale).cache().shuffle(BUFFER_SIZE).batch(BATCH_SIZE)
  eval_dataset = mnist_test.map(scale).batch(BATCH_SIZE)

  return train_dataset, eval_dataset

def get_model():
  with mirrored_strategy.scope():
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(32, 3, activation='relu', input_shape=(28, 28, 1)),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation='relu'),
        tf.keras.layers.Dense(10)
    ])

    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=tf.keras.optimizers.Adam(),
                  metrics=[tf.metrics.SparseCategoricalAccuracy()])
    return model

model = get_model()
train_dataset, eval_dataset = get_data()
model.fit(train_dataset, epochs=2)

keras_model_path = 'keras_save.keras'  # offline: was '/tmp/keras_save.keras' (in the test's directory, not a /tmp shared by concurrent runs)
model.save(keras_model_path)

restored_keras_model = tf.keras.models.load_model(keras_model_path)
restored_keras_model.fit(train_dataset, epochs=2)

another_strategy = tfpar.get_strategy("one_device", device='/cpu:0')  # upstream: another_strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
with another_strategy.scope():
  restored_keras_model_ds = tf.keras.models.load_model(keras_model_path)
  restored_keras_model_ds.fit(train_dataset, epochs=2)

model = get_model()  # get a fresh model
saved_model_path = 'tf_save'  # offline: was '/tmp/tf_save' (in the test's directory, not a /tmp shared by concurrent runs)
tf.saved_model.save(model, saved_model_path)

DEFAULT_FUNCTION_KEY = 'serving_default'
loaded = tf.saved_model.load(saved_model_path)
inference_func = loaded.signatures[DEFAULT_FUNCTION_KEY]

predict_dataset = eval_dataset.map(lambda image, label: image)
for batch in predict_dataset.take(1):
  print(inference_func(batch))

another_strategy = tfpar.get_strategy("mirrored")  # upstream: another_strategy = tf.distribute.MirroredStrategy()
with another_strategy.scope():
  loaded = tf.saved_model.load(saved_model_path)
  inference_func = loaded.signatures[DEFAULT_FUNCTION_KEY]

  dist_predict_dataset = another_strategy.experimental_distribute_dataset(
      predict_dataset)

  # Calling the function in a distributed manner
  for batch in dist_predict_dataset:
    result = another_strategy.run(inference_func, args=(batch,))
    print(result)
    break

# keras3: "import tensorflow_hub as hub" dropped: hub.KerasLayer is a tf.keras (Keras 2) layer; Keras 3's own is keras.layers.TFSMLayer

def build_model(loaded):
  x = tf.keras.layers.Input(shape=(28, 28, 1), name='input_x')
  # Wrap what's loaded to a KerasLayer
  keras_layer = tf.keras.layers.TFSMLayer(saved_model_path, call_endpoint=DEFAULT_FUNCTION_KEY, trainable=True)(x)  # keras3: was hub.KerasLayer(loaded, trainable=True)(x) (TFSMLayer loads from the path)
  model = tf.keras.Model(x, keras_layer)
  return model

another_strategy = tfpar.get_strategy("mirrored")  # upstream: another_strategy = tf.distribute.MirroredStrategy()
with another_strategy.scope():
  loaded = tf.saved_model.load(saved_model_path)
  model = build_model(loaded)

  model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=tf.keras.optimizers.Adam(),
                metrics=[tf.metrics.SparseCategoricalAccuracy()])
  model.fit(train_dataset, epochs=2)

model = get_model()

# Saving the model using Keras `Model.save`
model.export(saved_model_path)  # keras3: was model.save(saved_model_path) (Keras 3 saves a SavedModel with Model.export; save takes a .keras path)

another_strategy = tfpar.get_strategy("mirrored")  # upstream: another_strategy = tf.distribute.MirroredStrategy()
# Loading the model using the lower-level API
with another_strategy.scope():
  loaded = tf.saved_model.load(saved_model_path)

model = get_model()

# Saving the model to a path on localhost.
saved_model_path = 'tf_save'  # offline: was '/tmp/tf_save' (in the test's directory, not a /tmp shared by concurrent runs)
save_options = tf.saved_model.SaveOptions(experimental_io_device='/job:localhost')
tf.saved_model.save(model, saved_model_path, options=save_options)  # keras3: was model.save(saved_model_path, options=save_options) (Keras 3's save takes no SaveOptions)

# Loading the model from a path on localhost.
another_strategy = tfpar.get_strategy("mirrored")  # upstream: another_strategy = tf.distribute.MirroredStrategy()
with another_strategy.scope():
  load_options = tf.saved_model.LoadOptions(experimental_io_device='/job:localhost')
  loaded = tf.saved_model.load(saved_model_path, options=load_options)  # keras3: was tf.keras.models.load_model(saved_model_path, options=load_options) (Keras 3 loads no SavedModel)

class SubclassedModel(tf.keras.Model):
  """Example model defined by subclassing `tf.keras.Model`."""

  output_name = 'output_layer'

  def __init__(self):
    super(SubclassedModel, self).__init__()
    self._dense_layer = tf.keras.layers.Dense(
        5, dtype=tf.dtypes.float32, name=self.output_name)

  def call(self, inputs):
    return self._dense_layer(inputs)

my_model = SubclassedModel()
try:
  my_model.save(saved_model_path)
except ValueError as e:
  print(f'{type(e).__name__}: ', *e.args)

tf.saved_model.save(my_model, saved_model_path)
x = tf.saved_model.load(saved_model_path)
x.signatures

print(not my_model.built)  # keras3: was print(my_model.save_spec() is None) (Keras 3 models have no save_spec)

BATCH_SIZE_PER_REPLICA = 4
BATCH_SIZE = BATCH_SIZE_PER_REPLICA * mirrored_strategy.num_replicas_in_sync

dataset_size = 100
dataset = tf.data.Dataset.from_tensors(
    (tf.range(5, dtype=tf.float32), tf.range(5, dtype=tf.float32))
    ).repeat(dataset_size).batch(BATCH_SIZE)

my_model.compile(optimizer='adam', loss='mean_squared_error')
my_model.fit(dataset, epochs=2)

print(not my_model.built)  # keras3: was print(my_model.save_spec() is None)
my_model.export(saved_model_path)  # keras3: was my_model.save(saved_model_path) (Keras 3 saves a SavedModel with Model.export)
