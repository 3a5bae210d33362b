"""The coordinator (chief task) of a parameter-server cluster started by `tfpar launch --ps M`.

Reads the cluster from TF_CONFIG with tfpar.cluster.resolve, schedules CLOSURES closures through a
ClusterCoordinator, and prints one JSON line prefixed with RESULT: the counter on the ps, the
cluster spec, and what listens on each cluster port (the worker and ps servers run in other
processes of the same machine).

Usage: python ps_coordinator.py CLOSURES [WAIT_FOR_PATH]

With TFPAR_TEST_SLOW_CLOSURES=1 each closure also multiplies matrices for a while, the chief
prints "scheduled" once all closures are queued (a test kills a worker then), and the chief ends
with os._exit(0): after a worker failure, TF 2.21's ClusterCoordinator can deadlock at interpreter
exit (its WorkerPreemptionHandler daemon thread holds _cluster_update_lock inside
update_server_def while the restarted worker comes back; ClusterCoordinator.__del__ -> stop() then
waits for that lock forever during finalization).

With WAIT_FOR_PATH the chief waits (up to 60 s) for that file to exist before exiting, so a test
can look at the running cluster from outside.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tfpar import cluster  # noqa: E402

closures = int(sys.argv[1])
resolver = cluster.resolve("tf_config")
info = cluster.detect()
spec = resolver.cluster_spec().as_dict()
strategy = tf.distribute.ParameterServerStrategy(resolver)
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
with strategy.scope():
    counter = tf.Variable(0, dtype=tf.int64)


slow = os.environ.get("TFPAR_TEST_SLOW_CLOSURES") == "1"


@tf.function
def step():
    if slow:
        matrix = tf.random.stateless_normal([200, 200], seed=[1, 2])
        for _ in range(10):
            matrix = tf.linalg.normalize(matrix @ matrix)[0]
        counter.assign_add(tf.cast(tf.reduce_sum(matrix) * 0.0, tf.int64) + 1)
    else:
        counter.assign_add(1)
    return counter.read_value()


for _ in range(closures):
    coordinator.schedule(step)
if slow:
    print("scheduled", flush=True)
coordinator.join()
ports = [int(a.rsplit(":", 1)[1]) for job in ("worker", "ps") for a in spec[job]]
print("RESULT:" + json.dumps({
    "counter": int(counter.numpy()),
    "variable_device": counter.device,
    "task": f"{resolver.task_type}:{resolver.task_id}",
    "is_chief": cluster.is_chief(),
    "detect": None if info is None else [info.source, info.num_workers, info.num_ps, info.has_chief],
    "spec": spec,
    "listening": {str(k): v for k, v in cluster.listening_addresses(ports).items()},
}), flush=True)

if len(sys.argv) > 2:
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
if slow:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
