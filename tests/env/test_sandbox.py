"""The sandbox against hostile code: each attack must be contained and come back as an error, not a crash."""

import os
import random
import secrets

import pytest

from orchestra_jax.env import sandbox
from orchestra_jax.env.sandbox import SandboxLimits, run_python

SMALL = SandboxLimits(
    cpu_s=2, memory_bytes=256 << 20, file_bytes=1 << 20, max_processes=16, max_output_bytes=4096
)


def _contains_fork_bombs(level: str) -> bool:
    return level == "bwrap" or os.geteuid() != 0 or sandbox._world_traversable(os.sys.executable)


def test_isolation_is_reported():
    assert sandbox.isolation() in sandbox.LEVELS
    result = run_python("print('hi')", timeout_s=20, limits=SMALL)
    assert result.isolation == sandbox.isolation()


@pytest.mark.parametrize("level", ["detected", "rlimits"])
def test_plain_code_runs(level):
    a, b = random.randint(1, 10**6), random.randint(1, 10**6)
    result = run_python(
        f"import sys\nprint({a} * {b})\nprint('warn', file=sys.stderr)",
        timeout_s=20,
        limits=SMALL,
        level=None if level == "detected" else level,
    )
    assert result.error is None and result.exit_code == 0 and not result.timed_out
    assert result.stdout == f"{a * b}\n" and result.stderr == "warn\n"
    assert result.elapsed_s > 0


def test_exception_is_a_one_line_error():
    result = run_python("raise ValueError('bad input 42')", timeout_s=20, limits=SMALL)
    assert result.exit_code == 1
    assert result.error == "exit code 1: ValueError: bad input 42"


def test_private_working_directory():
    result = run_python(
        "open('data.txt', 'w').write('ok')\nimport os\nprint(os.listdir('.'))", timeout_s=20, limits=SMALL
    )
    assert result.error is None and "data.txt" in result.stdout


def test_fork_bomb_is_contained():
    if not _contains_fork_bombs(sandbox.isolation()):
        pytest.skip("root without bwrap: RLIMIT_NPROC cannot bind, fork bombs are not contained here")
    result = run_python("import os\nwhile True:\n    os.fork()", timeout_s=20, limits=SMALL)
    assert not result.timed_out
    assert result.error is not None and "process limit" in result.error


def test_memory_bomb_is_contained():
    result = run_python("a = []\nwhile True:\n    a.append(bytearray(10**7))", timeout_s=20, limits=SMALL)
    assert result.error == "memory limit of 256 MiB exceeded"


def test_cpu_loop_hits_cpu_limit():
    limits = SandboxLimits(cpu_s=1, memory_bytes=256 << 20, max_processes=16)
    result = run_python("while True:\n    pass", timeout_s=30, limits=limits)
    assert result.error == "CPU time limit of 1s exceeded" and not result.timed_out


@pytest.mark.parametrize("level", ["detected", "rlimits"])
def test_wall_timeout_kills(level):
    result = run_python(
        "import time\nprint('start', flush=True)\ntime.sleep(60)",
        timeout_s=1.0,
        limits=SMALL,
        level=None if level == "detected" else level,
    )
    assert result.timed_out and result.exit_code is None
    assert result.error == "wall-clock timeout after 1s" and result.stdout == "start\n"
    assert result.elapsed_s < 30


def test_no_network():
    if sandbox.isolation() == "rlimits":
        pytest.skip("rlimits layer has no network isolation")
    code = "import socket\ns = socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', 22))"
    result = run_python(code, timeout_s=20, limits=SMALL)
    assert result.exit_code != 0 and result.error is not None
    assert "Network is unreachable" in result.error or "refused" in result.error


def test_cannot_write_outside_its_dir(tmp_path):
    target = tmp_path / f"escape-{secrets.token_hex(4)}.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('pwned')", timeout_s=20, limits=SMALL)
    assert result.exit_code != 0 and result.error is not None
    assert not target.exists()


def test_file_size_limit():
    result = run_python("open('big', 'wb').write(b'x' * (4 << 20))", timeout_s=20, limits=SMALL)
    assert result.error == f"file size limit of {SMALL.file_bytes} bytes exceeded"


def test_parent_environment_is_invisible(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("ORCHESTRA_TEST_SECRET", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in [1, os.getppid()]:\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('denied', e)\n"
    )
    result = run_python(code, timeout_s=20, limits=SMALL)
    assert result.error is None
    assert secret not in result.stdout and "ORCHESTRA_TEST_SECRET" not in result.stdout


@pytest.mark.parametrize("level", ["detected", "rlimits"])
def test_daemonised_child_is_killed_and_reported(level):
    marker = secrets.token_hex(8)
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print('parent done')\n"
    )
    result = run_python(code, timeout_s=20, limits=SMALL, level=None if level == "detected" else level)
    assert result.stdout == "parent done\n"
    assert result.error is not None and "left behind" in result.error
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            assert marker.encode() not in cmdline, "a sandboxed process survived"


def test_output_keeps_head_and_tail():
    result = run_python("print('y' * 100000)\nprint('z' * 100000)", timeout_s=20, limits=SMALL)
    assert result.error is None and result.truncated
    assert len(result.stdout) < SMALL.max_output_bytes + 100
    head, marker, tail = result.stdout.partition("[... output truncated ...]")
    assert marker and set(head.strip()) == {"y"} and set(tail.strip()) == {"z"}
    assert len(head) == SMALL.max_output_bytes - SMALL.max_output_bytes // 4 + 1  # + the marker's newline


def test_limit_report_survives_a_flood_of_stderr():
    code = (
        "import sys\nsys.stderr.write('noise ' * 50000)\na = []\nwhile True:\n    a.append(bytearray(10**7))"
    )
    result = run_python(code, timeout_s=20, limits=SMALL)
    assert result.error == "memory limit of 256 MiB exceeded" and result.truncated


def test_missing_isolation_warns_loudly(monkeypatch):
    monkeypatch.delenv("ORCHESTRA_SANDBOX_ISOLATION", raising=False)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.isolation.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="NOT isolated"):
            assert sandbox.isolation() == "rlimits"
    finally:
        sandbox.isolation.cache_clear()
    monkeypatch.setenv("ORCHESTRA_SANDBOX_ISOLATION", "chroot")
    with pytest.raises(ValueError, match="ORCHESTRA_SANDBOX_ISOLATION='chroot'"):
        sandbox.isolation()
    sandbox.isolation.cache_clear()
