"""`orchestra-jax synth`: flags, up-front checks, one run of the pipeline, a short printed summary."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from orchestra_jax.data.synth import stages
from orchestra_jax.data.synth.llm import LLMError, LLMSettings, StructuredClient


class SynthUsageError(ValueError):
    """Bad flags, an unknown domain or an unusable endpoint, found before any work."""


@dataclasses.dataclass(frozen=True)
class SynthArgs:
    """Synthesise a τ²-style domain (db.json, policy.md, tasks.json) and our task JSONL, verified by execution."""

    domain: str
    """domain name: for the procedural backend one of bank, library, clinic; for llm any a-z/0-9/_ name"""
    out: pathlib.Path
    """output folder: <out>/<domain>/ (τ² files), <out>/tasks.jsonl, <out>/report.json"""
    backend: Literal["llm", "procedural"] = "procedural"
    llm: str | None = None
    """OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); required with --backend llm"""
    model: str | None = None
    """teacher model name (default: the first one the endpoint lists)"""
    api_key_env: str = "OPENAI_API_KEY"
    num_tasks: int = 24
    db_rounds: int = 3
    records_per_round: int = 4
    evolve_fraction: float = 0.5
    dedup_threshold: float = 0.8
    seed: int = 0
    max_attempts: int = 3
    temperature: float = 0.7
    max_tokens: int = 2048
    timeout_s: float = 120.0
    """seconds to wait for one teacher reply"""
    cache_dir: pathlib.Path | None = None
    """LLM reply cache (default <out>/.cache); a rerun resumes from it"""
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0


def _check(args: SynthArgs) -> stages.SynthConfig:
    try:
        stages.check_domain_name(args.domain)
    except ValueError as e:
        raise SynthUsageError(str(e)) from None
    if args.backend == "procedural":
        from orchestra_jax.data.synth.templates import TEMPLATES

        if args.domain not in TEMPLATES:
            raise SynthUsageError(f"--domain {args.domain!r}: the procedural backend knows {', '.join(TEMPLATES)}")
    elif not args.llm:
        raise SynthUsageError("--backend llm needs --llm ENDPOINT (an OpenAI-compatible base URL)")
    elif not args.llm.startswith(("http://", "https://")):
        raise SynthUsageError(f"--llm {args.llm!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    if args.out.exists() and not args.out.is_dir():
        raise SynthUsageError(f"--out {args.out}: exists and is not a folder")
    for name in ("num_tasks", "db_rounds", "records_per_round", "max_attempts", "max_tokens", "timeout_s"):
        if getattr(args, name) < 1:
            raise SynthUsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.evolve_fraction <= 1.0 or not 0.0 < args.dedup_threshold <= 1.0:
        raise SynthUsageError("--evolve-fraction must be in [0, 1] and --dedup-threshold in (0, 1]")
    return stages.SynthConfig(args.domain, args.num_tasks, args.db_rounds, args.records_per_round,
                              args.evolve_fraction, args.dedup_threshold, args.seed)


def run_synth(args: SynthArgs) -> int:
    """0 when tasks were written; 1 when a stage stopped the run (report.json says where and why)."""
    config = _check(args)
    client = None
    if args.backend == "procedural":
        from orchestra_jax.data.synth.procedural import ProceduralBackend

        backend = ProceduralBackend.for_domain(args.domain, args.seed)
    else:
        from orchestra_jax.data.synth.prompts import LLMBackend

        settings = LLMSettings(args.llm, args.model, args.api_key_env, args.temperature, args.max_tokens,
                               args.max_attempts, args.timeout_s, price_in_per_mtok=args.price_in_per_mtok,
                               price_out_per_mtok=args.price_out_per_mtok)
        client = StructuredClient(settings, args.cache_dir or args.out / ".cache")
        try:
            client.check_endpoint()
        except LLMError as e:
            client.close()
            raise SynthUsageError(str(e)) from None
        backend = LLMBackend(client, args.seed)
    try:
        result = stages.synthesize(backend, config)
    except LLMError as e:
        result = stages.SynthResult(None, (), {"domain": args.domain, "backend": args.backend,
                                                "stopped_at": {"stage": "llm", "detail": str(e)}})
    finally:
        if client is not None:
            client.close()
    report = stages.write_outputs(result, args.out, {"teacher_usage": client.report()} if client else None)
    _print_summary(report)
    return 0 if result.tasks else 1


def _print_summary(report: dict) -> None:
    db, tools, flt = report.get("database", {}), report.get("tools", {}), report.get("filter", {})
    if db:
        print(f"database: {db['accepted']} records accepted, {db['rejected']} rejected of {db['proposed']} proposed")
    if tools:
        print(f"tools: {tools['kept']} kept of {tools['proposed']} ({tools['invalid']} invalid, "
              f"{tools['never_ran']} never ran)")
    if flt:
        removed = ", ".join(f"{k} {v}" for k, v in flt["removed"].items() if v) or "none"
        print(f"tasks: {flt['kept']} kept of {flt['candidates']} candidates (removed: {removed})")
    usage = report.get("teacher_usage")
    if usage:
        total = usage["total"]
        print(f"teacher {usage['model']}: {total['calls']} calls, {total['attempts']} attempts, "
              f"{total['cache_hits']} cached, {total['failures']} failed, {total['prompt_tokens']}+"
              f"{total['completion_tokens']} tokens, ${usage['cost_usd']:.4f}")
    stopped = report.get("stopped_at")
    if stopped:
        print(f"stopped at stage {stopped['stage']}: {stopped['detail']}")
    print(f"report: {report['outputs']['report']}")
