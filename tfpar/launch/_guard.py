"""The launcher's helper programs: the per-task guard and the network-namespace holder.

Both run as ``python -I -S -c CODE ...`` (:data:`HELPER_FLAGS`): a fresh single-threaded
interpreter without site packages or ``PYTHON*`` variables, fast to start and independent of the
task's environment, which the helpers pass on unchanged. They use only the standard library.

* :data:`GUARD_CODE`: every task runs under one; it stops the task and everything the task
  started when the task ends or the launcher dies (see the comment above it).
* :data:`HOLDER_CODE`: holds the private loopback-only network namespace the tasks join
  (``tfpar.launch._network``).
"""

from __future__ import annotations

__all__ = ["CLONE_NEWNET", "CLONE_NEWUSER", "GUARD_CODE", "HELPER_FLAGS", "HOLDER_CODE"]

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
# The interpreter flags of the launcher's helpers: no site, no PYTHON* variables (fast, and
# independent of the task's environment, which the helpers pass on unchanged).
HELPER_FLAGS = ("-I", "-S")

# The holder of the private network namespace. Runs in a fresh (single-threaded) interpreter with
# argv[1] = the launcher's pid: makes the network namespace (a plain one when the process may,
# e.g. root with CAP_SYS_ADMIN, so the tasks keep their privileges on the host's files; otherwise
# inside an unprivileged user namespace with the same uid/gid), brings its loopback interface up,
# prints READY and lives until its stdin closes or its parent is no longer the launcher (the
# launcher ended or died). Tasks join its namespaces (see GUARD_CODE).
HOLDER_CODE = f"""
import ctypes, fcntl, os, select, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
launcher = int(sys.argv[1])
uid, gid = os.geteuid(), os.getegid()
if libc.unshare({CLONE_NEWNET}) != 0:
    if libc.unshare({CLONE_NEWUSER} | {CLONE_NEWNET}) != 0:
        print("ERROR unshare(CLONE_NEWUSER | CLONE_NEWNET): " + os.strerror(ctypes.get_errno()), flush=True)
        sys.exit(1)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")):
            with open("/proc/self/" + name, "w") as handle:
                handle.write(text)
    except OSError as error:
        print("ERROR mapping the user namespace: " + str(error), flush=True)
        sys.exit(1)
try:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    request = struct.pack("16sh", b"lo", 0)
    flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, request))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
except OSError as error:
    print("ERROR bringing up loopback in the namespace: " + str(error), flush=True)
    sys.exit(1)
print("READY", flush=True)
while os.getppid() == launcher:
    if select.select([0], [], [], 1.0)[0] and not os.read(0, 4096):
        break
"""

# The guard: every task runs under one, in a fresh single-threaded interpreter, as the leader of
# the task's own session and process group (which the launcher signals as a whole).
# argv: LAUNCHER_PID GRACE HOLDER_PID|- COMMAND...; stdin: the "lifeline", a pipe whose write end
# only the launcher holds.
#
# It forks the task's main process, which (Linux) joins the holder's namespaces, sets
# PR_SET_PDEATHSIG=SIGKILL (the guard is single-threaded, so "parent thread" = the guard), checks
# that the guard did not die before that, and execs COMMAND with stdin from /dev/null. The guard
# then waits. When the main process exits, it stops what the task left behind (its process group
# and, on Linux, every descendant: the guard is a child subreaper, so even processes that
# started their own session come back to it) and exits with the main process's status (the same
# signal when it was killed), so the launcher sees what the task did. When the launcher dies,
# however it died (lifeline EOF, or the parent pid changed: SIGKILL, a crash, the OOM killer),
# the guard stops the whole task: SIGTERM, GRACE seconds, SIGKILL. SIGTERM, SIGINT and SIGHUP do
# not stop the guard: the launcher signals the process group, so the task gets them itself, and
# the guard passes them on to the descendants that left the group (Linux). SIGUSR1 (from the
# launcher, to the guard only, before it SIGKILLs the group) makes the guard SIGKILL everything
# it would stop, so nothing that left the group survives the guard's own death.
GUARD_CODE = r"""
import os, select, signal, sys, time
launcher, grace, holder, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
me, group = os.getpid(), os.getpgid(0)
linux = sys.platform.startswith("linux")
if linux:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
pending = []
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: pending.append(signum))
signal.signal(signal.SIGCHLD, lambda *_: None)

child = os.fork()
if child == 0:
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGCHLD", "SIGPIPE", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if holder != "-":
            code = 126
            for name, flag in (("user", 0x10000000), ("net", 0x40000000)):
                target = "/proc/" + holder + "/ns/" + name
                if os.stat(target).st_ino == os.stat("/proc/self/ns/" + name).st_ino:
                    continue  # already there (a plain network namespace needs no user namespace)
                fd = os.open(target, os.O_RDONLY)
                if libc.setns(fd, flag) != 0:
                    raise OSError(ctypes.get_errno(), "cannot join the network namespace (" + name
                                  + "): " + os.strerror(ctypes.get_errno()))
                os.close(fd)
            code = 127
        if linux:
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != me:
                os._exit(137)  # the guard died before prctl took effect
        os.execvp(command[0], command)
    except BaseException as error:
        try:
            os.write(2, ("tfpar launch: could not run " + repr(command) + ": " + str(error) + "\n").encode())
        finally:
            os._exit(code)

status = None


def reap():
    global status
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child:
            status = wstatus


def tree():
    # Linux: (the members of the task's process group, the descendants of the guard).
    table, kids = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in (b"Z", b"X"):
                table[int(name)] = int(fields[2])
                kids.setdefault(int(fields[1]), []).append(int(name))
    found = {pid for pid, pgid in table.items() if pgid == group}
    todo, seen = [me], set()
    while todo:
        for pid in kids.get(todo.pop(), ()):
            if pid not in seen:
                seen.add(pid)
                todo.append(pid)
    return found, seen


def leftovers():
    members, descendants = tree()
    return (members | descendants) - {me}


def send(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def sleep(seconds):
    if select.select([wake_r], [], [], seconds)[0]:
        os.read(wake_r, 4096)
    handle_signals()


def handle_signals():
    while pending:
        signum = pending.pop(0)
        if signum == signal.SIGUSR1:  # the launcher is about to SIGKILL the group
            if not linux:
                os.killpg(group, signal.SIGKILL)
            send(leftovers(), signal.SIGKILL)
        elif linux:  # the group got it from the sender; pass it to what left the group
            members, descendants = tree()
            send(descendants - members - {me}, signum)


def stop_everything():
    # SIGTERM, up to `grace` seconds, then SIGKILL: the task's main process and all it started.
    if not linux:
        os.killpg(group, signal.SIGTERM)
        end = time.monotonic() + grace
        while status is None and time.monotonic() < end:
            sleep(0.05)
            reap()
        os.killpg(group, signal.SIGKILL)  # this guard included
    pids = leftovers()
    if not pids:
        return
    send(pids, signal.SIGTERM)
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        sleep(0.05)
        reap()
        pids = leftovers()
    send(pids, signal.SIGKILL)
    end = time.monotonic() + 10
    while pids and time.monotonic() < end:
        sleep(0.02)
        reap()
        pids = leftovers()


orphaned = False
while True:
    reap()
    if status is not None:
        break
    if os.getppid() != launcher:
        orphaned = True
        break
    ready = select.select([0, wake_r], [], [], 1.0)[0]
    if wake_r in ready:
        os.read(wake_r, 4096)
    handle_signals()
    if 0 in ready and not os.read(0, 4096):
        orphaned = True
        break

if orphaned:
    stop_everything()
    os._exit(1)
if linux:
    stop_everything()  # what the finished task left behind
if os.WIFSIGNALED(status):
    signum = os.WTERMSIG(status)
    signal.set_wakeup_fd(-1)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the task may have dumped; not us
        signal.signal(signum, signal.SIG_DFL)
    except (ImportError, OSError, ValueError):
        pass
    os.kill(me, signum)
    time.sleep(1)
    os._exit(128 + signum)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""
