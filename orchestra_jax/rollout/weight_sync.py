"""Weight sync to SGLang servers, once per RL step: HF safetensors on a shared path, then an HTTP handshake.

The handshake per server: pause generation, /update_weights_from_disk (with the new weight_version and a cache
flush), /flush_cache, continue generation, then check /get_weight_version. ToolOrchestra re-synced every turn;
syncing once per step is what makes a step's samples carry one version tag.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import time
from dataclasses import dataclass
from typing import Any

import httpx


class WeightSyncError(RuntimeError):
    """A server refused or failed the update, or reports another version afterwards."""


@dataclass(frozen=True)
class SyncReport:
    version: str
    path: str
    bytes_written: int
    export_s: float
    update_s: float  # the slowest server's handshake

    @property
    def total_s(self) -> float:
        return self.export_s + self.update_s

    def summary(self) -> str:
        size = self.bytes_written / 2**20
        return (
            f"weight sync {self.version}: {size:.1f} MiB exported in {self.export_s:.2f}s, "
            f"servers updated in {self.update_s:.2f}s (total {self.total_s:.2f}s)"
        )


def default_sync_root() -> pathlib.Path:
    """/dev/shm when it exists (RAM, visible to servers on this host), else the temp dir."""
    shm = pathlib.Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"orchestra-jax-weights-{os.getuid()}"


def export_weights(
    config: Any, params: Any, root: str | os.PathLike, version: str, keep: int = 2
) -> pathlib.Path:
    """Write `params` as an HF checkpoint under root/weights-<version> and drop all but the newest `keep`.

    models.save_pretrained streams one tensor at a time into size-bounded shards and renames a finished
    directory into place, so a server never reads a half-written checkpoint.
    """
    from orchestra_jax import models

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in version)
    out = models.save_pretrained(config, params, root / f"weights-{safe}")
    exports = sorted((p for p in root.glob("weights-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in exports[:-keep]:
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return pathlib.Path(out)


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def sync_server(
    client: httpx.AsyncClient, url: str, model_path: str, version: str, *, pause_mode: str = "retract"
) -> float:
    """The update handshake with one server; returns its duration in seconds. Raises WeightSyncError."""
    start = time.perf_counter()

    async def post(route: str, body: dict | None = None) -> httpx.Response:
        try:
            return await client.post(url + route, json=body or {})
        except httpx.HTTPError as e:
            raise WeightSyncError(f"{url}{route}: {type(e).__name__}: {e}") from None

    response = await post("/pause_generation", {"mode": pause_mode})
    if response.status_code != 200:
        raise WeightSyncError(f"{url}/pause_generation: HTTP {response.status_code}: {response.text[:200]}")
    try:
        body = {
            "model_path": model_path,
            "weight_version": version,
            "flush_cache": True,
            "abort_all_requests": False,
        }
        response = await post("/update_weights_from_disk", body)
        result = _json(response)
        if response.status_code != 200 or not result.get("success", False):
            raise WeightSyncError(
                f"{url}/update_weights_from_disk: {result.get('message') or response.text[:200]}"
            )
        await post("/flush_cache")  # 400 while requests run (paused in place): the update already flushed
    finally:
        await post("/continue_generation")
    try:
        response = await client.get(url + "/get_weight_version")
    except httpx.HTTPError as e:
        raise WeightSyncError(f"{url}/get_weight_version: {type(e).__name__}: {e}") from None
    served = _json(response).get("weight_version")
    if served != version:
        raise WeightSyncError(f"{url}: serves weight_version {served!r} after updating to {version!r}")
    return time.perf_counter() - start


async def sync_servers(
    urls: list[str],
    config: Any,
    params: Any,
    version: str,
    *,
    root: str | os.PathLike | None = None,
    pause_mode: str = "retract",
    timeout_s: float = 600.0,
    client: httpx.AsyncClient | None = None,
) -> SyncReport:
    """Export once, then update every server concurrently."""
    start = time.perf_counter()
    path = await asyncio.to_thread(export_weights, config, params, root or default_sync_root(), version)
    export_s = time.perf_counter() - start
    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout_s)
    try:
        durations = await asyncio.gather(
            *(sync_server(client, url, str(path), version, pause_mode=pause_mode) for url in urls)
        )
    finally:
        if own:
            await client.aclose()
    return SyncReport(version, str(path), directory_bytes(path), export_s, max(durations, default=0.0))


def _json(response: httpx.Response) -> dict:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
