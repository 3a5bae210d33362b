"""A task for tests/test_launch.py, started by the launcher (no TensorFlow: starts fast).

Usage: python launch_task.py MODE [PID_DIR]

Modes:
  report      print this task's TF_CONFIG and launcher variables as one JSON line, exit 0
  fail-one    worker 1 prints two lines and exits 3 after 0.5 s; every other task starts a
              grandchild, records both pids in PID_DIR, and sleeps 60 s
  sleep       record this task's pid and a grandchild's pid in PID_DIR, sleep 60 s
  flaky       worker 1 exits 5 on the first attempt (TFPAR_LAUNCH_RESTART=0); otherwise exit 0
  ignore-term like sleep, but ignore SIGTERM (the launcher must SIGKILL after its grace period)
  echo        worker 0 listens on its TF_CONFIG port on all interfaces (as TensorFlow does);
              worker 1 connects to worker 0's address and sends a line; worker 0 prints it
"""

import json
import os
import signal
import subprocess
import sys
import time

mode = sys.argv[1]
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}:{task['index']}"


def record_pids(pid_dir):
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(pid_dir, f"{name}.pids"), "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}\n")
    print(f"{name} started grandchild {grandchild.pid}", flush=True)


if mode == "report":
    print(json.dumps({
        "task": name,
        "tf_config": json.loads(os.environ["TF_CONFIG"]),
        "launch_task": os.environ.get("TFPAR_LAUNCH_TASK"),
        "restart": os.environ.get("TFPAR_LAUNCH_RESTART"),
        "extra": os.environ.get("TFPAR_TEST_EXTRA"),
    }))
    print("second line", file=sys.stderr)
    sys.exit(0)
elif mode == "fail-one":
    if name == "worker:1":
        time.sleep(0.5)
        print("worker 1 is about to fail", flush=True)
        print("fatal: simulated failure", file=sys.stderr, flush=True)
        sys.exit(3)
    record_pids(sys.argv[2])
    time.sleep(60)
elif mode in ("sleep", "ignore-term"):
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record_pids(sys.argv[2])
    time.sleep(60)
elif mode == "flaky":
    attempt = int(os.environ["TFPAR_LAUNCH_RESTART"])
    if name == "worker:1" and attempt == 0:
        print("failing on the first attempt", flush=True)
        sys.exit(5)
    print(f"{name} succeeded on attempt {attempt}", flush=True)
    sys.exit(0)
elif mode == "echo":
    import socket

    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    if name == "worker:0":
        server = socket.socket(socket.AF_INET6)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("::", int(cluster[0].rsplit(":", 1)[1])))
        server.listen()
        server.settimeout(30)
        connection, _ = server.accept()
        print("received", connection.makefile().readline().strip(), flush=True)
    else:
        host, port = cluster[0].rsplit(":", 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = socket.create_connection((host, int(port)), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        connection.sendall(b"hello from worker 1\n")
        connection.close()
    sys.exit(0)
else:
    sys.exit(f"unknown mode {mode!r}")
