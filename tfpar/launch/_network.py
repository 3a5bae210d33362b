"""Where the tasks' network is: a private loopback-only network namespace, or the host network.

TensorFlow's gRPC servers have no authentication and listen on every interface, so by default the
launcher runs all tasks in a network namespace whose only interface is loopback, held by a helper
process (``HOLDER_CODE`` in ``tfpar.launch._guard``) that the tasks' guards join.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable

from tfpar.launch._guard import HELPER_FLAGS, HOLDER_CODE

__all__ = ["NETWORK_MODES", "USERNS_HINT", "NetworkNamespace", "setup_network"]

#: The values of ``tfpar launch --network``.
NETWORK_MODES = ("auto", "isolated", "host")
USERNS_HINT = (
    "Unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, "
    "user.max_user_namespaces > 0, kernel.apparmor_restrict_unprivileged_userns=0, or a "
    "container's seccomp profile)."
)
_READY_SECONDS = 30


class NetworkNamespace:
    """The helper process that holds the private network namespace the tasks join.

    ``holder`` is the running helper, or None (no namespace: the tasks use the host network).
    """

    def __init__(self) -> None:
        self.holder: subprocess.Popen | None = None

    def start(self) -> str | None:
        """Starts the helper and waits until the namespace is ready.

        Returns:
            None when the namespace is ready, else why it could not be made.
        """
        if not sys.platform.startswith("linux"):
            return f"network namespaces need Linux; platform={sys.platform!r}"
        self.holder = subprocess.Popen(
            [sys.executable, *HELPER_FLAGS, "-c", HOLDER_CODE, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()
        stdout = self.holder.stdout
        assert stdout is not None  # stdout=PIPE
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=_READY_SECONDS).decode(errors="replace").strip()
        except queue.Empty:
            line = f"no answer within {_READY_SECONDS} s"
        if line == "READY":
            return None
        self.stop()
        line = line[len("ERROR ") :] if line.startswith("ERROR ") else line
        return line or "the helper exited"

    def stop(self) -> None:
        """Ends the helper (closing its stdin), which lets the namespace go."""
        holder = self.holder
        if holder is None:
            return
        assert holder.stdin is not None and holder.stdout is not None  # stdin=PIPE, stdout=PIPE
        try:
            holder.stdin.close()
            holder.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            holder.kill()
            holder.wait(timeout=5)
        holder.stdout.close()
        self.holder = None


def setup_network(namespace: NetworkNamespace, isolate: bool | None, say: Callable[[str], None]) -> None:
    """Starts the private network namespace, or says why the tasks use the host network.

    Args:
        namespace: Started unless `isolate` is False.
        isolate: ``launch(isolate_network=...)``: None isolates where possible, True must, False
            uses the host network.
        say: Prints a ``[launch]`` line.

    Raises:
        RuntimeError: If `isolate` is True and the namespace cannot be made.
    """
    if isolate is False:
        say(
            "network: host (requested with --network host / isolate_network=False): "
            "TensorFlow's unauthenticated servers listen on all interfaces, reachable from "
            "other hosts unless a firewall blocks the cluster's ports"
        )
        return
    problem = namespace.start()
    if problem is None:
        assert namespace.holder is not None  # started
        say(
            f"network: isolated (loopback only, private network namespace; helper pid "
            f"{namespace.holder.pid}); tasks that need the network: --network host"
        )
        return
    if isolate:
        raise RuntimeError(
            f"isolate_network=True (--network isolated) could not create a private network "
            f"namespace: {problem}. {USERNS_HINT} Or pass --network host "
            "(isolate_network=False) on a trusted network or behind a firewall."
        )
    say(
        f"WARNING: network isolation is unavailable here ({problem}), so the tasks use the "
        "host network, where TensorFlow's unauthenticated servers listen on all interfaces "
        "and other hosts can reach the cluster's ports unless a firewall blocks them. "
        f"{USERNS_HINT} Pass --network host (isolate_network=False) to choose the host "
        "network and silence this warning."
    )
    say("network: host (isolation unavailable)")
