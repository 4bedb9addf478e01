"""Transparent huge pages for the CLI's process, asked of glibc's malloc before Python starts.

XLA's CPU runtime maps a fresh temporary buffer for every call of a compiled step (737 MB for the 135M train step at
4 x 128) and unmaps it afterwards, so each step touches every page anew: about 235,000 minor page faults and 0.4 s
of kernel time per step. With `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages: about 900 faults, and
the 135M step ran 6 % faster in `bench train` (269.9 and 276.1 against 252.2 and 260.6 tok/s, on and off in turn, no
PyTorch side); the tiny model's step in `bench train` at 8 x 256 gained about 22 % (notes/BENCHMARKS.md, session
11). glibc reads its tunables only at start-up, so the training commands (`train`, `sft`, `bench train`) re-execute
themselves once with the tunable added. Others do not: loading 513 MiB of weights into the in-process server of
`bench rollout` took 1.62-1.64 s with huge pages against 0.93 s without, and decode did not move beyond the noise.
It leaves alone a process whose GLIBC_TUNABLES already sets it, a libc other than glibc >= 2.35, and
ORCHESTRA_JAX_HUGEPAGES=0. The kernel must allow it (/sys/kernel/mm/transparent_hugepage/enabled: `madvise` or
`always`); elsewhere it changes nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
# The GLIBC_TUNABLES the user launched with ("" for none), kept across the re-exec.
PRIOR = "ORCHESTRA_JAX_PRIOR_GLIBC_TUNABLES"
SWITCH = "ORCHESTRA_JAX_HUGEPAGES"
COMMANDS = (("train",), ("sft",), ("bench", "train"))


def helps(argv: Sequence[str]) -> bool:
    """Whether the CLI command `argv` is one that trains (where huge pages were measured to help)."""
    return any(tuple(argv[: len(command)]) == command for command in COMMANDS)


def wanted(environ: Mapping[str, str], libc: tuple[str, str] | None = None) -> bool:
    """Whether a process with this environment should re-execute with the tunable."""
    name, version = libc or platform.libc_ver()
    if name != "glibc" or _version(version) < (2, 35):
        return False
    if environ.get(SWITCH, "1") == "0" or PRIOR in environ:
        return False
    return TUNABLE not in environ.get("GLIBC_TUNABLES", "")


def with_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the tunable appended and the user's own GLIBC_TUNABLES remembered."""
    prior = environ.get("GLIBC_TUNABLES", "")
    return {**environ, PRIOR: prior, "GLIBC_TUNABLES": ":".join(filter(None, [prior, f"{TUNABLE}=1"]))}


def launch_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment as the user launched the CLI (for a process that should not inherit the huge pages)."""
    environ = dict(os.environ if environ is None else environ)
    if PRIOR not in environ:
        return environ
    prior = environ.pop(PRIOR)
    if prior:
        environ["GLIBC_TUNABLES"] = prior
    else:
        environ.pop("GLIBC_TUNABLES", None)
    return environ


def reexec(command: Sequence[str]) -> None:
    """Replace this process by `command` (the CLI's own, as `python -m orchestra_jax ...`) with huge pages, when
    `wanted`; else return."""
    if not wanted(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], list(command), with_hugepages(os.environ))


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return (0,)
