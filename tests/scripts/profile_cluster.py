"""Child process for tests/test_profiling.py: a StepProfiler run under a cluster from tfpar launch.

Usage: python profile_cluster.py OUT STRATEGY (multi_worker | parameter_server)
The chief (the task whose profiler has a report) writes OUT: the report's metrics JSON, and
trace.json next to it.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

import tfpar
from tfpar.profiling import StepProfiler

out, strategy = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
x = rng.random((1024, 16, 16, 3), dtype=np.float32)
y = rng.integers(0, 10, 1024)
with tfpar.scope(strategy):
    model = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
profiler = StepProfiler(warmup_steps=4, steps=10)
model.fit(x, y, batch_size=32, epochs=2, callbacks=[profiler], verbose=0)
if profiler.report is not None:
    profiler.report.write_trace(out.with_name("trace.json"))
    out.write_text(json.dumps(profiler.report.to_json()))
