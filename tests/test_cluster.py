"""Tests of tfpar.cluster: TF_CONFIG / Slurm / dict discovery and validation, task roles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tfpar import cluster
from tfpar.cluster import _local

TWO_WORKERS = {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}


def tf_config(spec, ttype="worker", index=0, **extra) -> str:
    return json.dumps({"cluster": spec, "task": {"type": ttype, "index": index}, **extra})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TF_CONFIG", *cluster.SLURM_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------------------
# TF_CONFIG validation: every malformed case has a clear message
# ---------------------------------------------------------------------------------------------

MALFORMED = [
    pytest.param(
        '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker" "index": 0}}',
        r"TF_CONFIG is not valid JSON: Expecting ',' delimiter at line 1 column 68 \(char 67\):"
        r"\n.*\n {4}\s*\^",
        id="bad-json-position",
    ),
    pytest.param("[1, 2]", r"Expected TF_CONFIG to be a JSON object", id="not-an-object"),
    pytest.param(
        '{"task": {"type": "worker", "index": 0}}', r'TF_CONFIG has no "cluster" key\.', id="no-cluster"
    ),
    pytest.param(
        '{"clusters": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}',
        r"Found 'clusters': did you mean 'cluster'\?",
        id="cluster-typo",
    ),
    pytest.param(
        json.dumps({"cluster": TWO_WORKERS}), r'TF_CONFIG has no "task" key', id="no-task"
    ),
    pytest.param(
        json.dumps({"cluster": TWO_WORKERS, "task": "worker"}),
        r'Expected TF_CONFIG\["task"\] to be an object',
        id="task-not-object",
    ),
    pytest.param(
        tf_config(TWO_WORKERS, "ps", 0),
        r"Task type 'ps' is not a job of the cluster; the cluster has 'worker'",
        id="type-not-in-cluster",
    ),
    pytest.param(
        tf_config(TWO_WORKERS, "master", 0),
        r"Unknown task type 'master'\. Valid task types: chief, worker, ps, evaluator",
        id="unknown-task-type",
    ),
    pytest.param(
        tf_config(TWO_WORKERS, "worker", 2),
        r"Task index 2 is out of range: job 'worker' has 2 task\(s\), valid indices are 0\.\.1",
        id="index-out-of-range",
    ),
    pytest.param(tf_config(TWO_WORKERS, "worker", -1), r"task index to be >= 0", id="negative-index"),
    pytest.param(tf_config(TWO_WORKERS, "worker", "one"), r"task index to be an integer", id="index-text"),
    pytest.param(
        tf_config({"workers": ["127.0.0.1:1"]}),
        r"Unknown job name 'workers' in the TF_CONFIG cluster\. Did you mean 'worker'\? "
        r"Valid job names: chief, worker, ps, evaluator",
        id="unknown-job",
    ),
    pytest.param(
        tf_config({"worker": ["127.0.0.1"]}),
        r'Expected the address of task worker:0 to be "host:port".*Received: address=\'127\.0\.0\.1\'',
        id="address-without-port",
    ),
    pytest.param(
        tf_config({"worker": ["127.0.0.1:70000"]}), r"port in 1\.\.65535", id="port-out-of-range"
    ),
    pytest.param(
        tf_config({"worker": ["grpc://127.0.0.1:2222"]}),
        r"Remove the scheme: TF_CONFIG addresses are plain host:port",
        id="address-with-scheme",
    ),
    pytest.param(tf_config({"worker": [2222]}), r'"host:port" string', id="address-not-string"),
    pytest.param(
        tf_config({"worker": ["10.0.0.1:2222", "10.0.0.1:2222"]}),
        r"Tasks worker:0 and worker:1 have the same address '10\.0\.0\.1:2222'",
        id="duplicate-address",
    ),
    pytest.param(
        tf_config({"chief": ["localhost:2222"], "worker": ["127.0.0.1:2222"]}, "chief"),
        r"Port clash: tasks chief:0 \(localhost:2222\) and worker:0 \(127\.0\.0\.1:2222\) both use "
        r"port 2222 on this machine",
        id="local-port-clash",
    ),
    pytest.param(
        tf_config({"chief": ["127.0.0.1:1", "127.0.0.1:2"]}, "chief"),
        r"at most one 'chief' task; found 2",
        id="two-chiefs",
    ),
    pytest.param(tf_config({"worker": []}), r"Job 'worker' has no tasks", id="empty-job"),
    pytest.param(tf_config({}), r"non-empty object mapping job names", id="empty-cluster"),
]


@pytest.mark.parametrize("value, message", MALFORMED)
def test_malformed_tf_config_gives_a_clear_error(clean_env, value, message):
    with pytest.raises(ValueError, match=message) as info:
        cluster.parse_tf_config(value)
    text = str(info.value)
    assert "Received:" in text
    if "not valid JSON" in text:  # the caret points at the offending character
        snippet, caret = text.splitlines()[1:3]
        assert snippet[caret.index("^") :].startswith('"index"')
    # The same checks run from the environment, for resolve() and detect().
    clean_env.setenv("TF_CONFIG", value)
    with pytest.raises(ValueError, match=message):
        cluster.resolve("tf_config")
    with pytest.raises(ValueError, match=message):
        cluster.detect()


def test_parse_tf_config_normalizes_and_keeps_extra_keys():
    config = cluster.parse_tf_config(
        {"cluster": {"worker": "127.0.0.1:1", "ps": {"0": "127.0.0.1:2"}},
         "task": {"type": "worker", "index": "0", "trial": "7"}, "environment": "cloud"}
    )
    assert config == {
        "cluster": {"worker": ["127.0.0.1:1"], "ps": {0: "127.0.0.1:2"}},
        "task": {"type": "worker", "index": 0, "trial": "7"},
        "environment": "cloud",
    }


@pytest.mark.parametrize("value", ["", "  ", "{}"])
def test_empty_tf_config_is_a_single_process(value):
    assert cluster.parse_tf_config(value) == {}


def test_parse_tf_config_rejects_other_types():
    with pytest.raises(TypeError, match=r"JSON string or a dict\. Received: tf_config=3"):
        cluster.parse_tf_config(3)


def test_evaluator_may_be_outside_the_cluster():
    config = cluster.parse_tf_config(tf_config(TWO_WORKERS, "evaluator", 0))
    assert config["task"] == {"type": "evaluator", "index": 0}


# ---------------------------------------------------------------------------------------------
# resolve()
# ---------------------------------------------------------------------------------------------


def test_resolve_tf_config(clean_env):
    clean_env.setenv("TF_CONFIG", tf_config({"chief": ["127.0.0.1:12344"], **TWO_WORKERS}, "worker", 1))
    resolver = cluster.resolve("tf_config")
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert (resolver.task_type, resolver.task_id, resolver.rpc_layer) == ("worker", 1, "grpc")
    assert resolver.cluster_spec().as_dict() == {"chief": ["127.0.0.1:12344"], **TWO_WORKERS}
    assert cluster.resolve(None).cluster_spec().as_dict() == resolver.cluster_spec().as_dict()


def test_resolve_without_tf_config_is_a_single_process(clean_env):
    resolver = cluster.resolve("tf_config")
    assert resolver.cluster_spec().as_dict() == {}
    assert cluster.resolve().cluster_spec().as_dict() == {}


def test_resolve_cluster_spec_dict_and_clusterspec():
    spec = {"worker": TWO_WORKERS["worker"], "ps": ["127.0.0.1:12347"], "chief": ["127.0.0.1:12348"]}
    resolver = cluster.resolve(spec, task_type="chief")
    assert isinstance(resolver, tf.distribute.cluster_resolver.SimpleClusterResolver)
    assert (resolver.task_type, resolver.task_id, resolver.rpc_layer) == ("chief", 0, "grpc")
    assert resolver.cluster_spec().as_dict() == spec
    same = cluster.resolve(tf.train.ClusterSpec(spec), task_type="worker", task_id=1)
    assert (same.task_type, same.task_id) == ("worker", 1)
    coordinator = cluster.resolve(spec)
    assert coordinator.task_type is None


def test_resolve_tf_config_shaped_dict():
    resolver = cluster.resolve(
        {"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 1}, "rpc_layer": "grpc+x"}
    )
    assert (resolver.task_type, resolver.task_id, resolver.rpc_layer) == ("worker", 1, "grpc+x")


def test_resolve_returns_a_resolver_as_is():
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(TWO_WORKERS))
    assert cluster.resolve(resolver) is resolver


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("yaml",), {}, ValueError, r"Unknown cluster source 'yaml'\. Valid choices: 'tf_config', 'slurm'"),
        ((42,), {}, TypeError, r"Expected cluster to be 'tf_config', 'slurm', a dict.*Received: cluster=42"),
        ((TWO_WORKERS,), {"task_type": "ps"}, ValueError, r"Task type 'ps' is not a job of the cluster"),
        ((TWO_WORKERS,), {"task_type": "worker", "task_id": 5}, ValueError, r"Task index 5 is out of range"),
        ((TWO_WORKERS,), {"task_id": 1}, ValueError, r"task_id needs a task_type"),
        ((TWO_WORKERS,), {"task_type": "worker", "task_id": "1"}, TypeError, r"task_id to be an int"),
        (("tf_config",), {"task_type": "worker"}, ValueError, r"reads them from the environment"),
        (({"cluster": TWO_WORKERS, "task": {"type": "worker"}},), {"task_id": 0}, ValueError, r'carries its own "task"'),
        (({"worker": ["nohost"]},), {}, ValueError, r'Expected the address of task worker:0 to be "host:port"'),
        (("tf_config",), {"rpc_layer": ""}, TypeError, r"rpc_layer"),
    ],
)
def test_resolve_bad_arguments(clean_env, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        cluster.resolve(*args, **kwargs)


def test_resolver_with_task_arguments_is_refused():
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(TWO_WORKERS))
    with pytest.raises(ValueError, match="a ClusterResolver carries its own"):
        cluster.resolve(resolver, task_type="worker")


@pytest.mark.multiprocess
def test_port_taken_by_another_process_is_reported(clean_env):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys; s = socket.socket(socket.AF_INET6); "
         "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(('::', 0)); s.listen(); "
         "print(s.getsockname()[1], flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(holder.stdout.readline())
        spec = {"worker": [f"127.0.0.1:{port}", "127.0.0.1:12346"]}
        clean_env.setenv("TF_CONFIG", tf_config(spec, "worker", 0))
        with pytest.raises(ValueError, match=rf"Port {port} of this task \(worker:0, 127\.0\.0\.1:{port}\) "
                                             r"is already in use by another process"):
            cluster.resolve("tf_config")
        # Another task's port being busy is not this process's problem.
        clean_env.setenv("TF_CONFIG", tf_config(spec, "worker", 1))
        assert cluster.resolve("tf_config").task_id == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_port_held_by_this_process_is_not_a_clash(clean_env):
    import socket

    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    sock.listen()
    try:
        port = sock.getsockname()[1]
        assert cluster.listening_addresses([port]) == {port: [f"[::]:{port}"]}
        resolver = cluster.resolve({"worker": [f"127.0.0.1:{port}"]}, task_type="worker")
        assert resolver.task_id == 0
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------

SLURM = {
    "SLURM_PROCID": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_slurm_environment_is_parsed(clean_env):
    for name, value in SLURM.items():
        clean_env.setenv(name, value)
    resolver = cluster.resolve("slurm")
    assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["node01:8888", "node01:8889", "node02:8888", "node02:8889"]
    }
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert resolver.num_accelerators() == {}  # this machine has no GPU
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # upstream would have set it
    assert cluster.detect() == cluster.ClusterInfo("slurm", 4, 0, False, "worker", 2)
    assert cluster.resolve(None).cluster_spec().as_dict() == resolver.cluster_spec().as_dict()
    assert (cluster.task_type(), cluster.task_index(), cluster.is_chief()) == ("worker", 2, False)


def test_slurm_rank_zero_is_chief(clean_env):
    for name, value in {**SLURM, "SLURM_PROCID": "0"}.items():
        clean_env.setenv(name, value)
    assert cluster.is_chief()


def test_missing_slurm_variables_are_named(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    with pytest.raises(RuntimeError) as info:
        cluster.resolve("slurm")
    text = str(info.value)
    assert "Missing: SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE" in text
    assert "srun" in text


@pytest.mark.parametrize(
    "override, message",
    [
        ({"SLURM_PROCID": "x"}, r"Expected SLURM_PROCID to be a non-negative integer"),
        ({"SLURM_PROCID": "4"}, r"Expected SLURM_PROCID < SLURM_STEP_NUM_TASKS"),
        ({"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "4"},
         r"do not describe a consistent job step: Requested 5 tasks but only 4 were assigned.*"
         r"Received: SLURM_PROCID='4', SLURM_STEP_NUM_TASKS='5'"),
        ({"SLURM_STEP_NODELIST": "node[01-"}, r"do not describe a consistent job step: Invalid hostlist"),
    ],
)
def test_malformed_slurm_variables(clean_env, override, message):
    for name, value in {**SLURM, **override}.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        cluster.resolve("slurm")


def test_single_task_slurm_step_is_not_a_cluster(clean_env):
    for name, value in {**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}.items():
        clean_env.setenv(name, value)
    assert cluster.detect() is None


# ---------------------------------------------------------------------------------------------
# detect() and task roles
# ---------------------------------------------------------------------------------------------


def test_detect_single_machine(clean_env):
    assert cluster.detect() is None
    assert (cluster.task_type(), cluster.task_index(), cluster.is_chief()) == (None, 0, True)


def test_detect_one_worker_tf_config_is_single_machine(clean_env):
    clean_env.setenv("TF_CONFIG", tf_config({"worker": ["127.0.0.1:12345"]}))
    assert cluster.detect() is None
    assert (cluster.task_type(), cluster.task_index(), cluster.is_chief()) == ("worker", 0, True)


@pytest.mark.parametrize(
    "spec, ttype, index, expected, chief",
    [
        (TWO_WORKERS, "worker", 0, ("tf_config", 2, 0, False, "worker", 0), True),
        (TWO_WORKERS, "worker", 1, ("tf_config", 2, 0, False, "worker", 1), False),
        ({"chief": ["127.0.0.1:12344"], **TWO_WORKERS}, "worker", 0, ("tf_config", 2, 0, True, "worker", 0), False),
        ({"chief": ["127.0.0.1:12344"], **TWO_WORKERS}, "chief", 0, ("tf_config", 2, 0, True, "chief", 0), True),
        ({"worker": ["127.0.0.1:12345"], "ps": ["127.0.0.1:12346"]}, "ps", 0, ("tf_config", 1, 1, False, "ps", 0), False),
        ({"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "evaluator", 0, ("tf_config", 1, 0, True, "evaluator", 0), False),
    ],
)
def test_detect_and_roles_from_tf_config(clean_env, spec, ttype, index, expected, chief):
    clean_env.setenv("TF_CONFIG", tf_config(spec, ttype, index))
    info = cluster.detect()
    assert info == cluster.ClusterInfo(*expected)
    assert info.is_chief is chief
    assert (cluster.task_type(), cluster.task_index(), cluster.is_chief()) == (ttype, index, chief)


def test_cluster_info_is_frozen():
    info = cluster.ClusterInfo("tf_config", 2, 0, False, "worker", 0)
    with pytest.raises(AttributeError):
        info.num_workers = 3


def test_roles_from_a_resolver(clean_env):
    spec = {"chief": ["127.0.0.1:12344"], **TWO_WORKERS}
    worker0 = cluster.resolve(spec, task_type="worker", task_id=0)
    chief = cluster.resolve(spec, task_type="chief")
    assert not cluster.is_chief(worker0) and cluster.is_chief(chief)
    assert (cluster.task_type(worker0), cluster.task_index(worker0)) == ("worker", 0)
    with pytest.raises(TypeError, match="ClusterResolver or None"):
        cluster.is_chief("tf_config")


# ---------------------------------------------------------------------------------------------
# write_path / cleanup_write_path
# ---------------------------------------------------------------------------------------------


def test_chief_writes_the_real_path(clean_env, tmp_path):
    target = tmp_path / "ckpt" / "model.keras"
    assert cluster.write_path(target) == str(target)
    cluster.cleanup_write_path(target)  # no-op on the chief
    assert not (tmp_path / "ckpt").exists()


def test_workers_write_a_temporary_sibling_that_cleanup_removes(clean_env, tmp_path):
    clean_env.setenv("TF_CONFIG", tf_config(TWO_WORKERS, "worker", 1))
    target = tmp_path / "ckpt" / "model.keras"
    path = cluster.write_path(target)
    assert path == str(tmp_path / "ckpt" / "workertemp_1" / "model.keras")
    assert os.path.isdir(os.path.dirname(path))
    with open(path, "w") as handle:
        handle.write("weights")
    cluster.cleanup_write_path(target)
    assert not (tmp_path / "ckpt" / "workertemp_1").exists()
    assert (tmp_path / "ckpt").is_dir()  # the chief's directory stays


def test_write_path_of_a_directory(clean_env, tmp_path):
    spec = {"chief": ["127.0.0.1:12344"], **TWO_WORKERS}
    clean_env.setenv("TF_CONFIG", tf_config(spec, "worker", 0))  # with a chief, worker 0 is not chief
    assert cluster.write_path(f"{tmp_path}/backup/") == str(tmp_path / "workertemp_0" / "backup")
    cluster.cleanup_write_path(f"{tmp_path}/backup/")
    assert not (tmp_path / "workertemp_0").exists()


def test_write_path_rejects_non_paths():
    with pytest.raises(TypeError, match="non-empty path string"):
        cluster.write_path(3)


# ---------------------------------------------------------------------------------------------
# local_cluster argument checks (no server is started: see test_local_cluster.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"workers": 0}, ValueError, r"Expected workers >= 1\. Received: workers=0"),
        ({"ps": -1}, ValueError, r"Expected ps >= 0\. Received: ps=-1"),
        ({"workers": "2"}, TypeError, r"Expected workers to be an int"),
        ({"ps": True}, TypeError, r"Expected ps to be an int"),
        ({"chief": "yes"}, TypeError, r"Expected chief to be a bool"),
    ],
)
def test_local_cluster_validates_before_starting_servers(kwargs, error, message):
    with pytest.raises(error, match=message):
        cluster.local_cluster(**kwargs)
    assert not _local._LOCAL_CLUSTER


def test_free_ports_are_distinct():
    ports = cluster.free_ports(5)
    assert len(set(ports)) == 5 and all(1024 < p < 65536 for p in ports)
    with pytest.raises(ValueError, match="count to be an int >= 1"):
        cluster.free_ports(0)


def test_listening_addresses_of_an_unused_port():
    port = cluster.free_ports(1)[0]
    assert cluster.listening_addresses([port]) == {port: []}


@pytest.mark.multiprocess
def test_no_tensorflow_op_at_import():
    # Virtual devices can only be configured before the TF runtime initializes.
    code = (
        "import tfpar.cluster, tfpar.launch\n"
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "print('configured', len(tf.config.list_logical_devices('CPU')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "configured 2" in result.stdout, result.stderr
