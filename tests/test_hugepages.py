"""The CLI's huge-pages re-exec: when it applies, what it sets, and what a reference process gets back."""

import platform
import subprocess
import sys

import pytest

from orchestra_jax import hugepages

GLIBC = ("glibc", "2.36")


def test_wanted_only_once_and_only_on_a_recent_glibc():
    assert hugepages.wanted({}, GLIBC)
    assert not hugepages.wanted({}, ("glibc", "2.31"))
    assert not hugepages.wanted({}, ("", ""))
    assert not hugepages.wanted({"ORCHESTRA_JAX_HUGEPAGES": "0"}, GLIBC)
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC)  # the user's choice stands
    assert not hugepages.wanted(hugepages.with_hugepages({}), GLIBC)  # no loop after the re-exec


def test_only_training_commands_ask_for_huge_pages():
    assert hugepages.helps(["train"]) and hugepages.helps(["sft", "--steps", "3"])
    assert hugepages.helps(["bench", "train", "--models", "qwen3-tiny"])
    assert not hugepages.helps(["bench", "rollout"]) and not hugepages.helps(["serve"]) and not hugepages.helps([])


@pytest.mark.parametrize("prior", [None, "glibc.malloc.arena_max=2"])
def test_the_user_environment_comes_back_for_a_reference_process(prior):
    user = {"HOME": "/h"} | ({} if prior is None else {"GLIBC_TUNABLES": prior})
    ours = hugepages.with_hugepages(user)
    assert ours["GLIBC_TUNABLES"].split(":")[-1] == "glibc.malloc.hugetlb=1"
    assert ours["GLIBC_TUNABLES"].startswith(prior or "glibc.malloc.hugetlb")
    assert hugepages.launch_environment(ours) == user
    assert hugepages.launch_environment(user) == user


@pytest.mark.skipif(not hugepages.wanted({}), reason=f"needs glibc >= 2.35, this is {platform.libc_ver()}")
def test_reexec_runs_the_command_with_the_tunable(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("ORCHESTRA_JAX_HUGEPAGES", raising=False)
    show = "import os; print(os.environ['GLIBC_TUNABLES'], repr(os.environ['ORCHESTRA_JAX_PRIOR_GLIBC_TUNABLES']))"
    script = f"import sys; from orchestra_jax import hugepages; hugepages.reexec([sys.executable, '-c', {show!r}])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["glibc.malloc.hugetlb=1", "''"]
