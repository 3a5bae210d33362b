"""Distributed input across real processes: MultiWorkerMirroredStrategy with 2 workers on 127.0.0.1.

Each worker runs tests/data/mw_input_worker.py: tfpar.data.distribute with FILE sharding (TFRecord
files) and DATA sharding (in-memory data), a collective per step, preprocessing statistics combined
across workers, and a one-file dataset that TensorFlow's AUTO policy fails on and tfpar shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

import tfpar.data as td

WORKER = os.path.join(os.path.dirname(__file__), "mw_input_worker.py")
TIMEOUT_S = 240
AUTO_SHARD_LOGS = ("AUTO sharding policy", "Could not apply FILE based sharding", "auto_shard")


def _run_cluster(record_dir: str) -> list[tuple[dict, str]]:
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # keep TensorFlow's warnings: the test reads them
            env["CUDA_VISIBLE_DEVICES"] = ""
            processes.append(
                subprocess.Popen(
                    [sys.executable, WORKER, record_dir],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    results = []
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, f"worker failed ({process.returncode}):\n{stderr[-4000:]}"
        line = next(text for text in stdout.splitlines() if text.startswith("RESULT "))
        results.append((json.loads(line[len("RESULT "):]), stderr))
    return sorted(results, key=lambda r: r[0]["task"])


@pytest.fixture(scope="module")
def cluster_results(tmp_path_factory):
    record_dir = str(tmp_path_factory.mktemp("mw_records"))
    td.write_tfrecords({"id": np.arange(40)}, record_dir, num_files=4)
    td.write_tfrecords({"id": np.arange(4)}, os.path.join(record_dir, "single"), num_files=1,
                       prefix="one")
    return _run_cluster(record_dir)


@pytest.mark.multiprocess
def test_file_sharding_gives_each_worker_its_own_files(cluster_results):
    results = [r for r, _ in cluster_results]
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["file_policy"] for r in results] == ["file", "file"]
    ids = [set(r["file_ids"]) for r in results]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range(40))
    # write_tfrecords put id i in file i % 4; FILE sharding gives worker k files k and k + 2.
    assert {i % 4 for i in ids[0]} == {0, 2} and {i % 4 for i in ids[1]} == {1, 3}
    # The per-step all-reduce saw both workers' data.
    assert results[0]["file_sum"] == results[1]["file_sum"] == sum(range(40))


@pytest.mark.multiprocess
def test_data_sharding_gives_equal_disjoint_full_batches(cluster_results):
    results = [r for r, _ in cluster_results]
    assert [r["data_policy"] for r in results] == ["data", "data"]
    ids = [r["data_ids"] for r in results]
    assert len(ids[0]) == len(ids[1]) == 24  # 51 -> 25 per worker -> 12 batches of 2
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0])) == 24
    assert set(ids[0]) | set(ids[1]) <= set(range(51))
    assert ids[0] != sorted(ids[0])  # shuffled after sharding
    assert results[0]["data_sum"] == results[1]["data_sum"] == sum(ids[0]) + sum(ids[1])


@pytest.mark.multiprocess
def test_statistics_adapted_on_shards_cover_the_whole_dataset(cluster_results):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(301, 3))
    table[rng.random(table.shape) < 0.2] = np.nan
    for result, _ in cluster_results:
        stats = result["stats"]
        np.testing.assert_array_equal(stats["count"], np.sum(~np.isnan(table), axis=0))
        np.testing.assert_allclose(stats["mean"], np.nanmean(table, axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats["variance"], np.nanvar(table, axis=0), rtol=1e-10)
        np.testing.assert_array_equal(stats["median"], np.nanmedian(table, axis=0))
        np.testing.assert_allclose(result["layer_mean"], np.nanmean(table, axis=0), rtol=1e-12)


@pytest.mark.multiprocess
def test_explicit_policy_where_tensorflow_auto_fails(cluster_results):
    for result, stderr in cluster_results:
        before, _, _ = stderr.partition("MARKER naive-distribute")
        # tfpar: DATA chosen explicitly for 1 file / 2 workers; no auto-shard complaint logged.
        assert result["explicit_policy"] == 2  # tf.data.experimental.AutoShardPolicy.DATA
        assert not any(text in before for text in AUTO_SHARD_LOGS)
        assert "naive_batches" not in result  # the naive run failed on every worker
    ids = [set(r["explicit_ids"]) for r, _ in cluster_results]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {0, 1, 2, 3}
    # TensorFlow's AUTO on the same dataset fails (tensorflow/tensorflow#36846); the worker that
    # hits it first reports why, its peer sees the aborted collective.
    errors = [r["naive_error"] for r, _ in cluster_results]
    assert any("Could not apply FILE based sharding" in e for e in errors), errors
