"""Loopback only, by default (issue 12 part 4): a local launch runs its tasks in a private
network namespace whose only interface is loopback, so TensorFlow's unauthenticated gRPC servers
(which listen on every interface) cannot be reached from other hosts. ``--network host``
(``isolate_network=False``) opts out; where the kernel refuses namespaces the launch falls back
to the host network with a warning, unless isolation was asked for explicitly.

Real processes on 127.0.0.1; what runs is stopped by the launcher (the tests check it is gone).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tfpar import cluster
from tfpar import launch as launch_module
from tfpar.launch import _cli as launch_cli
from tfpar.launch import launch, main

SCRIPTS = Path(__file__).parent / "scripts"
TASK = str(SCRIPTS / "launch_task.py")
PY = sys.executable
LINUX = sys.platform.startswith("linux")


def _namespaces_available() -> bool:
    """Whether this kernel lets this user make a network namespace (the probe the tests trust,
    independent of the launcher's code)."""
    if not LINUX:
        return False
    probe = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "sys.exit(0 if libc.unshare(0x40000000) == 0 or libc.unshare(0x50000000) == 0 else 1)\n"
    )
    return subprocess.run([PY, "-c", probe], timeout=30).returncode == 0


NAMESPACES = _namespaces_available()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="this kernel refuses network namespaces here (the fallback tests cover it)"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def _wait_dead(pids, timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _host_addresses() -> list[str]:
    """This machine's non-loopback IPv4 interface addresses (Linux SIOCGIFADDR)."""
    import fcntl
    import struct

    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(raw[20:24])
            if not address.startswith("127."):
                addresses.append(address)
    return addresses


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def _control_listener() -> socket.socket:
    """A listener on every interface of the host (dual stack), to prove a probe can connect."""
    control = socket.socket(socket.AF_INET6)
    control.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    control.bind(("::", 0))
    control.listen()
    return control


def _network_reports(text: str) -> dict[str, dict]:
    reports = {}
    for line in text.splitlines():
        match = re.match(r"^\[([a-z]+:\d+)\] NETWORK:(.*)$", line)
        if match:
            reports[match.group(1)] = json.loads(match.group(2))
    return reports


class _Background:
    """launch(...) in a thread, so the test can probe the cluster while it runs."""

    def __init__(self, **kwargs) -> None:
        self.out = io.StringIO()
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, kwargs=kwargs)
        self.thread.start()

    def _run(self, **kwargs) -> None:
        try:
            self.result["code"] = launch(output=self.out, **kwargs)
        except BaseException as error:  # reported by wait_for / join
            self.result["error"] = error

    def wait_for(self, predicate, what: str, timeout: float = 150.0) -> None:
        end = time.monotonic() + timeout
        while not predicate(self.out.getvalue()):
            assert self.thread.is_alive(), f"the launch ended before {what}: {self.result}\n{self.out.getvalue()}"
            assert time.monotonic() < end, f"timed out waiting for {what}\n{self.out.getvalue()}"
            time.sleep(0.05)

    def join(self) -> int:
        self.thread.join(timeout=150)
        assert not self.thread.is_alive(), self.out.getvalue()
        assert "error" not in self.result, self.result
        return self.result["code"]


def _ports(text: str) -> list[int]:
    layout = re.search(r"starting \d+ tasks \(attempt 1 of \d+\): (.*)", text).group(1)
    return [int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", layout)]


def _assert_unreachable_from_the_host(ports: list[int]) -> None:
    # Nothing listens on these ports in the host's network namespace ...
    assert cluster.listening_addresses(ports) == {p: [] for p in ports}
    # ... so nothing can connect, on loopback or on this machine's own addresses, while a probe
    # of a host listener on the same addresses does connect.
    hosts = ["127.0.0.1", *_host_addresses()]
    with _control_listener() as control:
        for host in hosts:
            socket.create_connection((host, control.getsockname()[1]), timeout=2).close()
    for host in hosts:
        for port in ports:
            with pytest.raises(OSError):
                socket.create_connection((host, port), timeout=2).close()


# ---------------------------------------------------------------------------------------------
# The default: isolated
# ---------------------------------------------------------------------------------------------


@needs_namespaces
@pytest.mark.multiprocess
def test_a_default_launch_listens_on_loopback_only_and_has_no_other_network(tmp_path):
    done = tmp_path / "done"
    with _control_listener() as control:
        addresses = _host_addresses()
        target = f"{addresses[0]}:{control.getsockname()[1]}" if addresses else "-"
        run = _Background(command=[PY, TASK, "network", target, str(done)], workers=2, chief=True, timeout=120)
        try:
            run.wait_for(lambda text: len(_network_reports(text)) == 3, "the tasks' reports")
            text = run.out.getvalue()
            ports = _ports(text)
            _assert_unreachable_from_the_host(ports)
        finally:
            done.touch()
            code = run.join()
    text = run.out.getvalue()
    assert code == 0, text
    assert text.splitlines()[0].startswith(
        "[launch] network: isolated (loopback only, private network namespace; helper pid"
    ), text
    for name, report in _network_reports(text).items():
        # The task's namespace has one interface, loopback, with loopback addresses only ...
        assert report["interfaces"] == ["lo"], (name, report)
        assert all(_is_loopback(ip) for ips in report["addresses"].values() for ip in ips), report
        # ... it saw its own wildcard listener (so the check below inspects real sockets) ...
        assert ["::", report["port"]] in report["listeners"], report
        # ... and no LISTEN socket of the namespace is reachable other than through loopback:
        # bound to a loopback address, or to the wildcard of a namespace that only has lo.
        for ip, port in report["listeners"]:
            assert _is_loopback(ip) or (ip in ("0.0.0.0", "::") and report["interfaces"] == ["lo"]), (ip, port)
        # The host's own address (a listener there accepts the host's connections) is out of reach.
        if target != "-":
            assert report["reached"] != "connected", report
    helper = int(re.search(r"helper pid (\d+)", text).group(1))
    assert _wait_dead([helper]) == []


@needs_namespaces
@pytest.mark.multiprocess
def test_a_default_parameter_server_cluster_is_unreachable_from_the_host(tmp_path):
    """The real TensorFlow servers (tfpar.launch.serve()) of a --ps launch, default options."""
    sentinel = tmp_path / "done"
    run = _Background(
        command=[PY, str(SCRIPTS / "ps_coordinator.py"), "4", str(sentinel)], workers=2, ps=1, timeout=150
    )
    results = lambda text: re.findall(r"^\[chief:0\] RESULT:(.*)$", text, re.M)  # noqa: E731
    try:
        run.wait_for(lambda text: results(text), "the chief's result")
        inside = json.loads(results(run.out.getvalue())[0])
        assert inside["counter"] == 4
        ports = [int(a.rsplit(":", 1)[1]) for job in ("worker", "ps") for a in inside["spec"][job]]
        # Inside the namespace the servers listen (on all of its interfaces: only lo exists) ...
        assert all(inside["listening"][str(p)] for p in ports)
        # ... while the host sees no listener and cannot connect.
        _assert_unreachable_from_the_host(ports)
    finally:
        sentinel.touch()
        code = run.join()
    assert code == 0, run.out.getvalue()
    assert "network: isolated (loopback only" in run.out.getvalue()
    servers = re.findall(r"server listening on \S+ \(pid (\d+)\)", run.out.getvalue())
    assert len(servers) == 3 and _wait_dead([int(p) for p in servers]) == []


@needs_namespaces
@pytest.mark.multiprocess
def test_isolated_tasks_reach_each_other_over_loopback():
    out = io.StringIO()
    code = launch([PY, TASK, "echo"], workers=2, output=out, timeout=60)
    assert code == 0, out.getvalue()
    assert "[worker:0] received hello from worker 1" in out.getvalue()
    assert "network: isolated (loopback only" in out.getvalue()


@needs_namespaces
@pytest.mark.multiprocess
@pytest.mark.parametrize("isolate", [None, True])
def test_a_failure_under_isolation_says_how_to_give_tasks_the_network(isolate):
    out = io.StringIO()
    assert launch([PY, "-c", "raise SystemExit(4)"], workers=1, output=out, timeout=60, isolate_network=isolate) == 4
    assert (
        "note: the tasks run without network access (network: isolated, loopback only); if they "
        "need it (downloads, package index, remote storage), run with --network host "
        "(isolate_network=False)" in out.getvalue()
    )


# ---------------------------------------------------------------------------------------------
# Opting out: --network host / isolate_network=False
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_network_host_puts_the_tasks_on_the_host_network(tmp_path):
    done = tmp_path / "done"
    with _control_listener() as control:
        target = f"127.0.0.1:{control.getsockname()[1]}"  # a host service the tasks must reach
        run = _Background(
            command=[PY, TASK, "network", target, str(done)], workers=1, timeout=120, isolate_network=False
        )
        try:
            run.wait_for(lambda text: _network_reports(text), "the task's report")
            report = _network_reports(run.out.getvalue())["worker:0"]
            # The task's wildcard listener is on the host: this is the exposure isolation removes.
            assert cluster.listening_addresses([report["port"]])[report["port"]] == [f"[::]:{report['port']}"]
        finally:
            done.touch()
            code = run.join()
    text = run.out.getvalue()
    assert code == 0, text
    assert report["reached"] == "connected"
    assert text.splitlines()[0] == (
        "[launch] network: host (requested with --network host / isolate_network=False): TensorFlow's "
        "unauthenticated servers listen on all interfaces, reachable from other hosts unless a "
        "firewall blocks the cluster's ports"
    )
    assert "WARNING" not in text and "note: the tasks run without network" not in text


@pytest.mark.parametrize(
    "argv, isolate",
    [
        ([], None),
        (["--network", "auto"], None),
        (["--network", "isolated"], True),
        (["--isolate-network"], True),
        (["--isolate-network", "--network", "isolated"], True),
        (["--network", "host"], False),
    ],
)
def test_the_network_options_map_to_isolate_network(monkeypatch, argv, isolate):
    calls = []
    monkeypatch.setattr(launch_cli, "launch", lambda command, **kwargs: calls.append(kwargs) or 0)
    assert main([*argv, "--", PY, "-c", "pass"]) == 0
    assert calls[0]["isolate_network"] is isolate


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--network", "none"], "argument --network: invalid choice: 'none' (choose from 'auto', 'isolated', 'host')"),
        (["--isolate-network", "--network", "host"], "--isolate-network contradicts --network host; pass one of them"),
        (["--isolate-network", "--network", "auto"], "--isolate-network contradicts --network auto"),
    ],
)
def test_bad_network_options_exit_2_with_one_line(capsys, argv, message):
    assert main([*argv, "--", PY, "-c", "pass"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_parser_network_default_is_auto():
    args = launch_module.build_parser().parse_args([])
    assert (args.network, args.isolate_network) == (None, False)  # None: auto, or --isolate-network


# ---------------------------------------------------------------------------------------------
# Where isolation is unavailable: warn and fall back, unless it was asked for
# ---------------------------------------------------------------------------------------------


def _refusing_kernel() -> list[str]:
    """A prefix that runs a command where the kernel refuses new network and user namespaces:
    a user namespace of its own whose namespace limits are 0 (the kernel answers ENOSPC, as where
    an administrator set user.max_user_namespaces=0)."""
    if not NAMESPACES or shutil.which("unshare") is None:
        pytest.skip("needs the unshare command and user namespaces to build the refusing kernel")
    check = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=30)
    if check.returncode != 0:
        pytest.skip(f"unshare --user is refused here: {check.stderr.decode().strip()}")
    return [
        "unshare", "--user", "--map-root-user", "sh", "-c",
        "echo 0 > /proc/sys/user/max_net_namespaces && echo 0 > /proc/sys/user/max_user_namespaces && "
        'exec "$@"', "sh",
    ]


@pytest.mark.multiprocess
def test_where_the_kernel_refuses_namespaces_the_default_warns_and_uses_the_host_network():
    prefix = _refusing_kernel()
    result = subprocess.run(
        [*prefix, PY, "-m", "tfpar", "launch", "--workers", "1", "--", PY, "-c", "print('ran')"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "[launch] WARNING: network isolation is unavailable here (unshare(CLONE_NEWUSER | CLONE_NEWNET): "
        "No space left on device), so the tasks use the host network"
    ), result.stdout
    assert "Pass --network host (isolate_network=False) to choose the host network and silence this warning." in lines[0]
    assert lines[1] == "[launch] network: host (isolation unavailable)"
    assert "[worker:0] ran" in lines


@pytest.mark.multiprocess
@pytest.mark.parametrize("option", [["--network", "isolated"], ["--isolate-network"]])
def test_where_the_kernel_refuses_namespaces_explicit_isolation_is_an_error(option):
    prefix = _refusing_kernel()
    result = subprocess.run(
        [*prefix, PY, "-m", "tfpar", "launch", *option, "--workers", "1", "--", PY, "-c", "print('ran')"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(
        "tfpar launch: error: isolate_network=True (--network isolated) could not create a private "
        "network namespace: unshare(CLONE_NEWUSER | CLONE_NEWNET): No space left on device."
    ), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "ran" not in result.stdout  # no task started


@pytest.mark.multiprocess
def test_where_the_kernel_refuses_namespaces_network_host_is_quiet():
    prefix = _refusing_kernel()
    result = subprocess.run(
        [*prefix, PY, "-m", "tfpar", "launch", "--network", "host", "--workers", "1", "--", PY, "-c", "print('ran')"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout and "[worker:0] ran" in result.stdout
    assert result.stdout.startswith("[launch] network: host (requested")


@pytest.mark.multiprocess
def test_off_linux_the_default_warns_and_explicit_isolation_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    out = io.StringIO()
    assert launch([PY, "-c", "print('ran')"], workers=1, output=out, timeout=60) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(
        "[launch] WARNING: network isolation is unavailable here (network namespaces need Linux; "
        "platform='darwin'), so the tasks use the host network"
    )
    assert lines[1] == "[launch] network: host (isolation unavailable)"
    assert "[worker:0] ran" in lines
    with pytest.raises(RuntimeError, match=r"isolate_network=True uses Linux network namespaces\. Received: platform='darwin'"):
        launch([PY, "-c", "print('ran')"], workers=1, output=io.StringIO(), isolate_network=True)
