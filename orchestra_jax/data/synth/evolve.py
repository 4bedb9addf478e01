"""The evolve stage: make verified tasks harder (more constraints, more tools, more steps).

An evolved draft replaces its original only when it passes the same verification and really is longer (more
gold actions); otherwise the original stays. Only drafts that already verify are evolved, so the stage can
never turn a good task into a dropped one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from orchestra_jax.data.synth import verify
from orchestra_jax.env.domain import Domain


def evolve_drafts(backend: Any, domain: Domain, drafts: Sequence[tuple[str, Any]], fraction: float,
                  seed: int) -> tuple[list[tuple[str, Any]], dict]:
    """Returns the drafts (some replaced by harder versions) and counts: attempted, accepted, rejected by reason."""
    from orchestra_jax.data.synth.stages import StageFailed  # stages imports this module

    rng = random.Random(seed)
    eligible = [i for i, (_, d) in enumerate(drafts) if d is not None and verify.check_task(domain, d).reason is None]
    chosen = sorted(rng.sample(eligible, round(len(eligible) * fraction))) if eligible and fraction > 0 else []
    stats: dict[str, Any] = {"eligible": len(eligible), "attempted": len(chosen), "accepted": 0,
                             "rejected": {}, "examples": []}
    out = list(drafts)
    for index in chosen:
        task_id, draft = drafts[index]
        try:
            harder = backend.evolve(domain, draft, index)
            verdict = verify.check_task(domain, harder)
            reason = verdict.reason or (None if len(harder["actions"]) > len(draft["actions"]) else "not_harder")
            detail = verdict.detail or "no more gold actions than the original"
        except StageFailed as e:
            reason, detail = "generation_failed", e.detail
        if reason is None:
            out[index] = (task_id, {**harder, "evolved": True, "parent_actions": len(draft["actions"])})
            stats["accepted"] += 1
        else:
            stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
            if len(stats["examples"]) < 3:
                stats["examples"].append(f"{task_id}: {detail}"[:200])
    return out, stats
