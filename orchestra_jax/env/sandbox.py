"""Run untrusted Python (a code-writer model's output) in a separate, contained process.

Layers, strongest first, picked once per process by `isolation()`:
- "bwrap": bubblewrap namespaces: no network, own pid space (everything dies with the sandbox), read-only
  root filesystem with /tmp, /root and /home replaced by empty tmpfs, only the private work dir writable.
- "unshare": util-linux `unshare` network and pid namespaces; the filesystem stays visible (writes are stopped
  by running as an unprivileged uid only).
- "rlimits": no namespaces at all, only the limits below. A loud warning says so.
In every layer: a scrubbed environment, a private temp dir as cwd, a fresh unprivileged uid when we are root
(so RLIMIT_NPROC bites: root ignores it), CPU-time, address-space, file-size, process-count and open-file
limits (set by a bootstrap inside the sandbox before the user's code runs), a wall-clock timeout that kills
the whole process group, the bootstrap as subreaper killing (and reporting) every process left behind, a sweep
of the sandbox uid's processes, and output truncated to a byte budget. Running as root without bwrap, the
interpreter under /root cannot run as another uid, so fork bombs are not contained there: use bwrap.
Set ORCHESTRA_SANDBOX_ISOLATION=bwrap|unshare|rlimits to force a layer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

LEVELS = ("bwrap", "unshare", "rlimits")
_MASKED_DIRS = ("/tmp", "/root", "/home", "/run", "/var/tmp")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space of each sandbox process."""
    file_bytes: int = 16 << 20
    max_processes: int = 32
    """RLIMIT_NPROC for the sandbox's own uid (threads count too)."""
    open_files: int = 64
    max_output_bytes: int = 64 << 10
    """stdout and stderr are each cut to this many bytes."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    error: str | None
    """None when the code ran to a zero exit; else one line saying what stopped it."""
    elapsed_s: float = 0.0
    isolation: str = "rlimits"
    truncated: bool = False


# Runs inside the sandbox, as the sandbox uid: lower the limits (hard = soft, so user code cannot raise them),
# become the subreaper of everything the user's code starts (so daemons cannot escape to init), run the
# user's file as __main__, then kill every descendant still alive and report, on the status pipe, which limit
# stopped the code and how many processes were left behind (stderr may be cut or interleaved; the pipe is not).
_BOOTSTRAP = r"""
import ctypes, errno, json, os, resource, runpy, signal, sys
spec = json.loads(sys.argv[1])
for name, soft, hard in spec["rlimits"]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
main_pid, status = os.getpid(), {}

def on_cpu_limit(signum, frame):
    status["limit"] = "cpu"
    raise SystemExit(128 + signum)

signal.signal(signal.SIGXCPU, on_cpu_limit)
sys.argv = ["main.py"]
sys.path.insert(0, os.getcwd())

def alive_descendants():
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(ppid), []).append((int(pid), state))
    found, todo = [], [main_pid]
    while todo:
        for pid, state in children.get(todo.pop(), []):
            todo.append(pid)
            if state != "Z":
                found.append(pid)
    return found

try:
    runpy.run_path("main.py", run_name="__main__")
except MemoryError:
    status["limit"] = "memory"
    raise
except BlockingIOError:
    status["limit"] = "processes"
    raise
except RuntimeError as e:
    if "can't start new thread" in str(e):
        status["limit"] = "processes"
    raise
except OSError as e:
    if e.errno == errno.EFBIG:
        status["limit"] = "file_size"
    raise
finally:
    if os.getpid() == main_pid:
        left = alive_descendants()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        status["leftovers"] = len(left)
        try:
            os.write(spec["status_fd"], json.dumps(status).encode())
        except OSError:
            pass
"""


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10, env={}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def isolation() -> str:
    """Which layer this machine offers: 'bwrap', 'unshare' or 'rlimits' (warns loudly on the last)."""
    forced = os.environ.get("ORCHESTRA_SANDBOX_ISOLATION")
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"ORCHESTRA_SANDBOX_ISOLATION={forced!r}: expected one of {list(LEVELS)}")
        return forced
    if shutil.which("bwrap") and _probe(_bwrap_prefix(Path("/"), probe=True) + ["true"]):
        return "bwrap"
    if shutil.which("unshare") and _probe(_unshare_prefix() + ["true"]):
        return "unshare"
    message = (
        "sandbox: neither bubblewrap nor unshare namespaces work here; untrusted code runs with resource "
        "limits only (network and filesystem are NOT isolated). Install bubblewrap."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    log.warning(message)
    return "rlimits"


def _bwrap_prefix(workdir: Path, *, probe: bool = False) -> list[str]:
    cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for masked in _MASKED_DIRS:
        if os.path.isdir(masked):
            cmd += ["--perms", "1777" if "tmp" in masked else "0755", "--tmpfs", masked]
    # The interpreter may live under a masked dir (pyenv in /root): re-expose it read-only, with traversable parents.
    for prefix in sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}):
        if any(prefix.startswith(m + "/") for m in _MASKED_DIRS):
            parent, parents = Path(prefix).parent, []
            while str(parent) not in _MASKED_DIRS and str(parent) != "/":
                parents.append(str(parent))
                parent = parent.parent
            for p in reversed(parents):
                cmd += ["--perms", "0755", "--dir", p]
            cmd += ["--ro-bind", prefix, prefix]
    if not probe:
        cmd += ["--bind", str(workdir), "/tmp/sandbox", "--chdir", "/tmp/sandbox"]
    cmd += [
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
    ]
    if os.geteuid() != 0:
        cmd += ["--unshare-user"]
    return cmd


def _unshare_prefix() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-current-user"]
    return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _fresh_uid() -> int:
    """A uid no one else uses, so RLIMIT_NPROC and the leftover sweep cover exactly this run."""
    with _uid_lock:
        n = next(_uid_counter)
    return 200_000 + (os.getpid() % 4096) * 256 + n % 256


def _world_traversable(path: str) -> bool:
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


def _kill_uid(uid: int) -> int:
    killed = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
    return killed


def _drain(stream, limit: int, out: list[bytes], cut: list[bool]) -> None:
    """Keep the first limit - limit//4 bytes and the last limit//4 (an exception is at the end); drop the middle."""
    head_cap, tail_cap = limit - limit // 4, limit // 4
    head, tail = bytearray(), bytearray()
    for chunk in iter(lambda: stream.read(65536), b""):
        room = head_cap - len(head)
        head += chunk[:room]
        tail += chunk[max(room, 0) :]
        if len(tail) > tail_cap:
            del tail[: len(tail) - tail_cap]
            cut[0] = True
    stream.close()
    out.append(bytes(head) + (b"\n[... output truncated ...]\n" if cut[0] else b"") + bytes(tail))


def _describe_failure(
    exit_code: int, stderr: str, level: str, limits: SandboxLimits, limit: str | None
) -> str:
    """One line: which limit stopped the code (from the bootstrap's status, else the signal), or its last error."""
    messages = {
        "memory": f"memory limit of {limits.memory_bytes >> 20} MiB exceeded",
        "processes": f"process limit of {limits.max_processes} reached",
        "cpu": f"CPU time limit of {limits.cpu_s}s exceeded",
        "file_size": f"file size limit of {limits.file_bytes} bytes exceeded",
    }
    if limit in messages:
        return messages[limit]
    sig = -exit_code if exit_code < 0 else (exit_code - 128 if level == "bwrap" and exit_code > 128 else 0)
    if sig in (signal.SIGXCPU, signal.SIGXFSZ):
        return messages["cpu" if sig == signal.SIGXCPU else "file_size"]
    if sig in set(signal.Signals):
        return f"killed by {signal.Signals(sig).name}"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    return f"exit code {exit_code}: {last[:200]}" if last else f"exit code {exit_code}"


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    level: str | None = None,
) -> SandboxResult:
    """Run `code` as a script in a fresh sandbox; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    level = level or isolation()
    python = python or sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="orchestra-sandbox-"))
    status_read, status_write = os.pipe()
    drop = os.geteuid() == 0 and (level == "bwrap" or _world_traversable(python))
    uid = _fresh_uid() if drop else os.getuid()
    try:
        (workdir / "main.py").write_text(code)
        if drop:
            os.chown(workdir, uid, uid)
            os.chown(workdir / "main.py", uid, uid)
        workdir.chmod(0o700)
        nproc = limits.max_processes if drop else limits.max_processes + _count_uid(uid)
        spec = {
            "rlimits": [
                ["RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1],
                ["RLIMIT_AS", limits.memory_bytes, limits.memory_bytes],
                ["RLIMIT_FSIZE", limits.file_bytes, limits.file_bytes],
                ["RLIMIT_NPROC", nproc, nproc],
                ["RLIMIT_NOFILE", limits.open_files, limits.open_files],
                ["RLIMIT_CORE", 0, 0],
            ],
            "status_fd": status_write,
        }
        cwd = "/tmp/sandbox" if level == "bwrap" else str(workdir)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": cwd,
            "TMPDIR": cwd,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        prefix = {
            "bwrap": lambda: _bwrap_prefix(workdir) + ["--clearenv"] + _setenv_args(env),
            "unshare": _unshare_prefix,
            "rlimits": list,
        }[level]()
        setpriv = (
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
            if drop
            else []
        )
        cmd = prefix + setpriv + [python, "-I", "-c", _BOOTSTRAP, json.dumps(spec)]
        return _execute(
            cmd, env, workdir, timeout_s, limits, level, uid if drop else None, status_read, status_write
        )
    except OSError as e:
        return SandboxResult("", "", None, False, f"sandbox failed to start: {e}", isolation=level)
    finally:
        for fd in (status_read, status_write):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


def _setenv_args(env: dict[str, str]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("--setenv", key, value)]


def _count_uid(uid: int) -> int:
    return sum(1 for e in os.scandir("/proc") if e.name.isdigit() and _safe_uid(e) == uid)


def _safe_uid(entry: os.DirEntry) -> int | None:
    try:
        return entry.stat().st_uid
    except OSError:
        return None


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536)
        status = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _execute(
    cmd: list[str],
    env: dict[str, str],
    workdir: Path,
    timeout_s: float,
    limits: SandboxLimits,
    level: str,
    sweep_uid: int | None,
    status_read: int,
    status_write: int,
) -> SandboxResult:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
        start_new_session=True,
        pass_fds=(status_write,),
    )
    outs: tuple[list[bytes], list[bytes]] = ([], [])
    cuts = ([False], [False])
    readers = [
        threading.Thread(target=_drain, args=(s, limits.max_output_bytes, o, c), daemon=True)
        for s, o, c in zip((proc.stdout, proc.stderr), outs, cuts, strict=True)
    ]
    for r in readers:
        r.start()
    timed_out = False
    try:
        exit_code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    elapsed = time.perf_counter() - start
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    swept = _kill_uid(sweep_uid) if sweep_uid is not None else 0
    if timed_out:
        exit_code = proc.wait()
    for r in readers:
        r.join(timeout=2.0)
    status = _read_status(status_read)
    stdout, stderr = (b"".join(o).decode("utf-8", "replace") for o in outs)
    left = swept + int(status.get("leftovers", 0) or 0)
    if timed_out:
        error = f"wall-clock timeout after {timeout_s:g}s"
    elif exit_code != 0:
        error = _describe_failure(exit_code, stderr, level, limits, status.get("limit"))
    elif left:
        error = f"killed {left} process(es) left behind"
    else:
        error = None
    truncated = cuts[0][0] or cuts[1][0]
    return SandboxResult(
        stdout, stderr, None if timed_out else exit_code, timed_out, error, elapsed, level, truncated
    )
