"""Child process for tests/test_local_cluster.py: tfpar.cluster.local_cluster + ParameterServerStrategy.

Usage: python local_cluster_ps.py CHIEF(0|1) CLOSURES
Prints one JSON line prefixed with RESULT: the counter value after the scheduled closures, the
cluster spec, the resolver's task type, what a repeated call returned, the error of a call with
another shape, and the listening addresses of the cluster's ports.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tfpar import cluster  # noqa: E402

chief = bool(int(sys.argv[1]))
closures = int(sys.argv[2])

resolver = cluster.local_cluster(workers=2, ps=1, chief=chief)
spec = resolver.cluster_spec().as_dict()
strategy = tf.distribute.ParameterServerStrategy(resolver)
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
with strategy.scope():
    counter = tf.Variable(0, dtype=tf.int64)
    total = tf.Variable(0.0)


@tf.function
def step(value):
    counter.assign_add(1)
    total.assign_add(value)
    return counter.device


remote = [coordinator.schedule(step, args=(tf.constant(float(i)),)) for i in range(closures)]
coordinator.join()
device = remote[-1].fetch().decode()

again = cluster.local_cluster(workers=2, ps=1, chief=chief)
try:
    cluster.local_cluster(workers=3, ps=1, chief=chief)
    other_error = None
except RuntimeError as error:
    other_error = str(error)

ports = sorted(int(a.rsplit(":", 1)[1]) for tasks in spec.values() for a in tasks)
result = {
    "counter": int(counter.numpy()),
    "total": float(total.numpy()),
    "variable_device": counter.device,
    "closure_saw": device,
    "spec": spec,
    "task_type": resolver.task_type,
    "task_id": resolver.task_id,
    "rpc_layer": resolver.rpc_layer,
    "again_spec": again.cluster_spec().as_dict(),
    "other_shape_error": other_error,
    "listening": {str(k): v for k, v in cluster.listening_addresses(ports).items()},
}
print("RESULT:" + json.dumps(result), flush=True)
