# Distributed training with Keras: the code cells of tensorflow/docs
# site/en/tutorials/distribute/keras.ipynb, in order (shell / magic lines dropped), changed only where
# a trailing comment says why (tests/tutorials/_harness.py).

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

import os

print(tf.__version__)

def offline_mnist(num_examples, seed):  # offline: MNIST-shaped random data (uint8 (28, 28, 1) images, int64 labels)
  rng = np.random.default_rng(seed)  # offline
  labels = rng.integers(0, 10, num_examples)  # offline
  images = rng.integers(0, 128, (num_examples, 28, 28, 1)).astype(np.uint8)  # offline
  rows = np.arange(28)[None, :, None, None]  # offline: a bright bar at a label-dependent row makes it learnable
  bar = (rows >= 2 * labels[:, None, None, None] + 4) & (rows < 2 * labels[:, None, None, None] + 7)  # offline
  images = np.where(bar, np.uint8(255), images)  # offline
  return tf.data.Dataset.from_tensor_slices((images, labels))  # offline

datasets = {'train': offline_mnist(1000, 0), 'test': offline_mnist(300, 1)}  # offline: was datasets, info = tfds.load(name='mnist', with_info=True, as_supervised=True) (60000 / 10000 examples)
info = type('Info', (), {'splits': {k: type('Split', (), {'num_examples': len(v)}) for k, v in datasets.items()}})  # offline

mnist_train, mnist_test = datasets['train'], datasets['test']

strategy = tfpar.get_strategy("mirrored")  # upstream: strategy = tf.distribute.MirroredStrategy()

print('Number of devices: {}'.format(strategy.num_replicas_in_sync))

# You can also do info.splits.total_num_examples to get the total
# number of examples in the dataset.

num_train_examples = info.splits['train'].num_examples
num_test_examples = info.splits['test'].num_examples

BUFFER_SIZE = 10000

BATCH_SIZE_PER_REPLICA = 64
BATCH_SIZE = BATCH_SIZE_PER_REPLICA * strategy.num_replicas_in_sync

def scale(image, label):
  image = tf.cast(image, tf.float32)
  image /= 255

  return image, label

train_dataset = mnist_train.map(scale).cache().shuffle(BUFFER_SIZE).batch(BATCH_SIZE)
eval_dataset = mnist_test.map(scale).batch(BATCH_SIZE)

with strategy.scope():
  model = tf.keras.Sequential([
      tf.keras.layers.Conv2D(32, 3, activation='relu', input_shape=(28, 28, 1)),
      tf.keras.layers.MaxPooling2D(),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(64, activation='relu'),
      tf.keras.layers.Dense(10)
  ])

  model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=tf.keras.optimizers.Adam(learning_rate=0.001),
                metrics=['accuracy'])

# Define the checkpoint directory to store the checkpoints.
checkpoint_dir = './training_checkpoints'
# Define the name of the checkpoint files.
checkpoint_prefix = os.path.join(checkpoint_dir, "ckpt_{epoch}.weights.h5")  # keras3: was "ckpt_{epoch}" (Keras 3 saves weights only to a .weights.h5 file)

# Define a function for decaying the learning rate.
# You can define any decay function you need.
def decay(epoch):
  if epoch < 3:
    return 1e-3
  elif epoch >= 3 and epoch < 7:
    return 1e-4
  else:
    return 1e-5

# Define a callback for printing the learning rate at the end of each epoch.
class PrintLR(tf.keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    print('\nLearning rate for epoch {} is {}'.format(
        epoch + 1, model.optimizer.learning_rate.numpy()))  # keras3: was model.optimizer.lr (Keras 3 optimizers have no lr alias)

# Put all the callbacks together.
callbacks = [
    tf.keras.callbacks.TensorBoard(log_dir='./logs'),
    tf.keras.callbacks.ModelCheckpoint(filepath=checkpoint_prefix,
                                       save_weights_only=True),
    tf.keras.callbacks.LearningRateScheduler(decay),
    PrintLR()
]

EPOCHS = 12

model.fit(train_dataset, epochs=EPOCHS, callbacks=callbacks)

model.load_weights(os.path.join(checkpoint_dir, "ckpt_{}.weights.h5".format(EPOCHS)))  # keras3: was model.load_weights(tf.train.latest_checkpoint(checkpoint_dir)) (a .weights.h5 file is no TF checkpoint)

eval_loss, eval_acc = model.evaluate(eval_dataset)

print('Eval loss: {}, Eval accuracy: {}'.format(eval_loss, eval_acc))

path = 'my_model.keras'

model.save(path)

unreplicated_model = tf.keras.models.load_model(path)

unreplicated_model.compile(
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    optimizer=tf.keras.optimizers.Adam(),
    metrics=['accuracy'])

eval_loss, eval_acc = unreplicated_model.evaluate(eval_dataset)

print('Eval loss: {}, Eval Accuracy: {}'.format(eval_loss, eval_acc))

with strategy.scope():
  replicated_model = tf.keras.models.load_model(path)
  replicated_model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           optimizer=tf.keras.optimizers.Adam(),
                           metrics=['accuracy'])

  eval_loss, eval_acc = replicated_model.evaluate(eval_dataset)
  print ('Eval loss: {}, Eval Accuracy: {}'.format(eval_loss, eval_acc))
