"""PyTorch's side of `bench train`, run in a process of its own.

In one process with our JAX step, PyTorch's 135M step ran 10-15 % slower than it runs alone (bf16, 4 x 128:
medians 2.33-2.45 s against 2.13-2.17 s, its kernel time per step 0.91 s against 0.54 s; a /tmp probe), which
flattered our ratio. So the reference step lives in a spawned worker that imports no JAX; the bench still takes
turns with it block by block, and the side that waits blocks on a pipe, idle.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable

import numpy as np

from orchestra_jax import hugepages


def timings(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> list[float]:
    """Seconds of each call after one untimed call (compile / warm up): `repeats` calls, and more until they add
    up to `min_seconds`, so a 15 ms step gets as many samples as a 2 s one gets time."""
    fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_flops(fn: Callable[[], object], flops: float, repeats: int) -> float:
    """FLOP/s of the fastest of `repeats` timed calls of fn, which does `flops` each."""
    return flops / min(timings(fn, repeats))


class TorchReference:
    """A transformers model from `model_dir` stepping forward + backward of the token NLL + AdamW on `ids_BT`, in
    a spawned process. Use as a context manager; each method waits for the worker's answer."""

    def __init__(self, model_dir: str, ids_BT: np.ndarray, compute_dtype: str):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, model_dir, np.asarray(ids_BT), compute_dtype),
                                    daemon=True)
        with _launch_environment():
            self._process.start()
        child.close()
        self._reply()  # the worker's "ready" (or its load error)

    def steps(self, count: int) -> None:
        """`count` untimed steps (warm-up)."""
        self._ask(("steps", count))

    def block(self, repeats: int, min_seconds: float) -> list[float]:
        """Step times of one block (see `timings`)."""
        return self._ask(("block", repeats, min_seconds))

    def gemm_flops(self, n: int, dtype: str, repeats: int) -> float:
        """PyTorch's best FLOP/s on an n x n x n matmul of `dtype` inputs, in the worker."""
        return self._ask(("gemm", n, dtype, repeats))

    def _ask(self, request):
        self._conn.send(request)
        return self._reply()

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"bench train: the PyTorch worker exited (code {self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"bench train: the PyTorch worker failed: {value}")
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def __enter__(self) -> TorchReference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _launch_environment():
    """os.environ as the user launched the CLI, while the worker starts: PyTorch's step runs with its default
    allocator, not the huge pages our CLI asks glibc for (see orchestra_jax.hugepages)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(hugepages.launch_environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _serve(conn, model_dir: str, ids_BT: np.ndarray, compute_dtype: str) -> None:
    """The worker: answer each request with ("ok", value) or ("error", one line) until it gets None or the
    parent goes away. Ctrl-C is the parent's to handle: it closes the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        step = _reference_step(model_dir, ids_BT, compute_dtype)
        conn.send(("ok", None))
    except Exception as exc:  # noqa: BLE001 -- reported to the parent as one line
        conn.send(("error", _one_line(exc)))
        return
    while (request := _receive(conn)) is not None:
        try:
            kind, *args = request
            if kind == "steps":
                for _ in range(args[0]):
                    step()
                value = None
            elif kind == "block":
                value = timings(step, *args)
            else:
                value = _gemm_flops(*args)
            conn.send(("ok", value))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", _one_line(exc)))


def _receive(conn):
    try:
        return conn.recv()
    except EOFError:  # the parent died without closing us
        return None


def _reference_step(model_dir: str, ids_BT: np.ndarray, compute_dtype: str) -> Callable[[], None]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    ids = torch.tensor(ids_BT, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def _gemm_flops(n: int, dtype: str, repeats: int) -> float:
    import torch

    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    return best_flops(lambda: a @ b, 2 * n**3, repeats)


def _one_line(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"
