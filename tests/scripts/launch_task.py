"""A task for tests/test_launch*.py, started by the launcher (no TensorFlow: starts fast).

Usage: python launch_task.py MODE [PID_DIR | ARGS]

Modes:
  report      print this task's TF_CONFIG and launcher variables as one JSON line, exit 0
  fail-one    worker 1 prints two lines and exits 3 after 0.5 s; every other task starts a
              grandchild, records both pids in PID_DIR, and sleeps 60 s
  sleep       record this task's pid and a grandchild's pid in PID_DIR, sleep 600 s
  flaky       worker 1 exits 5 on the first attempt (TFPAR_LAUNCH_RESTART=0); otherwise exit 0
  ignore-term like sleep, but ignore SIGTERM (the launcher must SIGKILL after its grace period)
  echo        worker 0 listens on its TF_CONFIG port on all interfaces (as TensorFlow does);
              worker 1 connects to worker 0's address and sends a line; worker 0 prints it
  tree        a process tree that tries to escape: `bash -c "python ... hold; true"` (bash forks),
              a child in its own session (setsid) and a double-forked daemon; every process
              (this one included) writes its pid to PID_DIR/<task>.<label>.pids; prints nothing
              after that and sleeps 600 s. With a third argument "exit", this task exits 0 as
              soon as the whole tree is recorded (what it started stays behind). With "fail-on FILE",
              worker:1 starts no tree: it waits for FILE (at most 120 s) and exits 1, so the
              launcher stops the other tasks while they run.
              TFPAR_TEST_TERM=ignore: every process of the tree ignores SIGTERM; =record: on
              SIGTERM each writes PID_DIR/<task>.<label>.term and exits 0.
              TFPAR_TEST_TERM_TASK: the same for this task's own process only.
  hold        (used by tree) PID_DIR LABEL [daemon]: write the pid and sleep 600 s; "daemon"
              forks, the parent exits at once and the child starts its own session first
  network     listen on this task's TF_CONFIG port on every interface ([::], dual stack, as
              TensorFlow does), try to connect to ARGS[0] (HOST:PORT, or "-"), then print one
              JSON line: interfaces, their addresses, the TCP LISTEN sockets of this network
              namespace (/proc/net/tcp and tcp6), the connection result; wait until the file
              ARGS[1] exists (at most 120 s), exit 0
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

mode = sys.argv[1]
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}:{task['index']}"


def record_pids(pid_dir):
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(pid_dir, f"{name}.pids"), "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}\n")
    print(f"{name} started grandchild {grandchild.pid}", flush=True)


def term_behaviour(pid_dir, label):
    how = os.environ.get("TFPAR_TEST_TERM")
    if label == "task":
        how = os.environ.get("TFPAR_TEST_TERM_TASK", how)
    if how == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif how == "record":
        def record(signum, frame):
            with open(os.path.join(pid_dir, f"{name}.{label}.term"), "w") as handle:
                handle.write("SIGTERM\n")
            os._exit(0)

        signal.signal(signal.SIGTERM, record)


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
    time.sleep(600)
elif mode in ("sleep", "ignore-term"):
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record_pids(sys.argv[2])
    time.sleep(600)
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
elif mode == "hold":
    pid_dir, label = sys.argv[2], sys.argv[3]
    if sys.argv[4:] == ["daemon"]:
        if os.fork():
            os._exit(0)  # the parent exits: the daemon is an orphan
        os.setsid()
    term_behaviour(pid_dir, label)
    with open(os.path.join(pid_dir, f"{name}.{label}.pids"), "w") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(600)
elif mode == "tree":
    pid_dir = sys.argv[2]
    if sys.argv[3:4] == ["fail-on"] and name == "worker:1":
        deadline = time.monotonic() + 120
        while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("worker:1 fails on request", flush=True)
        sys.exit(1)
    me = [sys.executable, os.path.abspath(__file__), "hold", pid_dir]
    bash = subprocess.Popen(["bash", "-c", f"{shlex.join(me)} under-bash; true"])
    subprocess.Popen([*me, "own-session"], start_new_session=True)
    subprocess.Popen([*me, "daemon", "daemon"]).wait()
    with open(os.path.join(pid_dir, f"{name}.bash.pids"), "w") as handle:
        handle.write(f"{bash.pid}\n")
    term_behaviour(pid_dir, "task")
    with open(os.path.join(pid_dir, f"{name}.task.pids"), "w") as handle:
        handle.write(f"{os.getpid()}\n")
    if sys.argv[3:] == ["exit"]:
        # Recorded means every process of the tree wrote its pid: on a loaded machine a child may
        # not have run yet when this line is reached (then the guard stops it before it writes).
        labels = ("task", "bash", "under-bash", "own-session", "daemon")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
            os.path.exists(os.path.join(pid_dir, f"{name}.{label}.pids")) for label in labels
        ):
            time.sleep(0.05)
        sys.exit(0)
    time.sleep(600)
elif mode == "network":
    import socket

    target, done = sys.argv[2], sys.argv[3]
    port = int(json.loads(os.environ["TF_CONFIG"])["cluster"][task["type"]][task["index"]].rsplit(":", 1)[1])
    server = socket.socket(socket.AF_INET6)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", port))
    server.listen()

    def listeners():
        found = []
        for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
            with open(path) as handle:
                for line in handle.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        hex_ip, hex_port = fields[1].split(":")
                        raw = bytes.fromhex(hex_ip)
                        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                        found.append([socket.inet_ntop(family, raw), int(hex_port, 16)])
        return found

    def addresses():
        import fcntl
        import struct

        result = {}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, ifname in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
                    result.setdefault(ifname, []).append(socket.inet_ntoa(raw[20:24]))
                except OSError:  # no IPv4 address
                    result.setdefault(ifname, [])
        try:
            with open("/proc/net/if_inet6") as handle:
                for line in handle:
                    fields = line.split()
                    result.setdefault(fields[5], []).append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
        except FileNotFoundError:
            pass
        return result

    reached = None
    if target != "-":
        host, target_port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(target_port)), timeout=3).close()
            reached = "connected"
        except OSError as error:
            reached = f"{type(error).__name__}: {error}"
    print("NETWORK:" + json.dumps({
        "interfaces": [ifname for _, ifname in socket.if_nameindex()],
        "addresses": addresses(),
        "listeners": listeners(),
        "port": port,
        "reached": reached,
    }), flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(done) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)
else:
    sys.exit(f"unknown mode {mode!r}")
