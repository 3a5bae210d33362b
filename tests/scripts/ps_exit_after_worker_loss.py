"""A coordinator that loses a worker and then exits normally (tfpar's coordinator-shutdown interception).

Run by `tfpar launch --workers 2 --ps 1` as the chief: a custom training loop on tfpar's
parameter_server strategy with its own tf.distribute.coordinator.ClusterCoordinator. It schedules
CLOSURES slow closures, prints "scheduled" (the test kills a worker then), joins, prints RESULT
with the counter, waits (up to 60 s) for WAIT_FOR_PATH (the test creates it once the restarted
worker is up) and returns like any program. In TF 2.21 that exit deadlocks:
ClusterCoordinator.__del__ -> Cluster.stop() waits for a lock held by the WorkerPreemptionHandler
thread, which is frozen during interpreter finalization.

Usage: ps_exit_after_worker_loss.py CLOSURES WAIT_FOR_PATH
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402
from tfpar import coordinator as ps_coordinator  # noqa: E402

closures, wait_for = int(sys.argv[1]), sys.argv[2]
strategy = tfpar.get_strategy(ps_coordinator.parameter_server_strategy("tf_config"))
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
with strategy.scope():
    counter = tf.Variable(0, dtype=tf.int64)


@tf.function
def slow_step():
    matrix = tf.random.stateless_normal([200, 200], seed=[1, 2])
    for _ in range(10):
        matrix = tf.linalg.normalize(matrix @ matrix)[0]
    counter.assign_add(tf.cast(tf.reduce_sum(matrix) * 0.0, tf.int64) + 1)


for _ in range(closures):
    coordinator.schedule(slow_step)
print("scheduled", flush=True)
coordinator.join()
print("RESULT:" + json.dumps({"counter": int(counter.numpy())}), flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(wait_for) and time.monotonic() < deadline:
    time.sleep(0.05)
print("exiting", flush=True)
