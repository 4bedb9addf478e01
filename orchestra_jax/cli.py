"""The `orchestra-jax` console script: tyro subcommands over library functions.

Each subcommand is a function taking its argv; `COMMANDS` lists them. Commands built on `TrainConfig`
accept `--preset NAME` and any field as a flag (`--optimizer.lr 1e-5`). Parse errors and configuration
errors print one line naming the flag or field, and exit with status 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import tyro

from orchestra_jax import config as config_lib
from orchestra_jax import hugepages

T = TypeVar("T")


class UsageError(Exception):
    """A bad command line or configuration; main() prints it as one line."""


def parse(cls: type[T], argv: Sequence[str], prog: str, default: T | None = None) -> T:
    """tyro.cli, with its boxed error messages condensed into a one-line UsageError."""
    if any(a in ("-h", "--help") for a in argv):
        return tyro.cli(cls, args=list(argv), prog=prog, default=default)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return tyro.cli(cls, args=list(argv), prog=prog, default=default)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_one_line(captured.getvalue())) from None


def _one_line(boxed: str) -> str:
    """The message paragraph of tyro's error box (between the title and the first rule), on one line."""
    paragraphs: list[list[str]] = [[]]
    for raw in boxed.splitlines():
        row = raw.strip().strip("│╭╮╰╯|").strip()
        if row.startswith("─"):  # the title row, "─ Invalid choice ───"
            continue
        if not row.strip("─- "):  # a rule or an empty row ends a paragraph
            paragraphs.append([])
            continue
        paragraphs[-1].append(row)
    paragraphs = [p for p in paragraphs if p and not p[0].startswith(("For full helptext", "Argument helptext"))]
    # Without a terminal tyro prints its title ("Invalid choice") as a paragraph of its own.
    if len(paragraphs) > 1 and len(paragraphs[0]) == 1 and re.fullmatch(r"[A-Z][a-z ]+", paragraphs[0][0]):
        paragraphs = paragraphs[1:]
    text = " ".join(paragraphs[0]) if paragraphs else boxed.strip()
    return re.sub(r"\s+", " ", text)


def pop_preset(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take `--preset NAME` (or `--preset=NAME`) out of argv."""
    rest: list[str] = []
    name = None
    it = iter(argv)
    for arg in it:
        if arg == "--preset":
            name = next(it, None)
            if name is None:
                raise UsageError("--preset needs a name: " + ", ".join(config_lib.PRESETS))
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return name, rest


def parse_train_config(argv: Sequence[str], prog: str) -> config_lib.TrainConfig:
    """`--preset NAME` picks the defaults; every other flag overrides one field; then validate."""
    name, rest = pop_preset(argv)
    try:
        default = config_lib.preset(name or "cpu-demo")
    except config_lib.ConfigError as e:
        raise UsageError(str(e)) from None
    if any(a in ("-h", "--help") for a in rest):
        print(f"{prog}: --preset NAME selects the defaults ({', '.join(config_lib.PRESETS)}; default cpu-demo).")
    config = parse(config_lib.TrainConfig, rest, prog, default=default)
    try:
        return config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise UsageError(str(e)) from None


def cmd_config(argv: Sequence[str]) -> int:
    """Print the resolved configuration (a preset plus overrides) as JSON, validated against this host's devices."""
    import jax

    config = parse_train_config(argv, "orchestra-jax config")
    try:
        config_lib.validate(config, num_devices=jax.device_count())
    except config_lib.ConfigError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True))
    return 0


Handler = Callable[[Sequence[str]], int]

def bench_logprob(argv: Sequence[str]) -> int:
    """Naive vs fused LM-head log-prob (kernels/bench.py): peak memory and time, one table plus JSON."""
    from orchestra_jax.kernels import bench

    args = parse(bench.LogprobBenchArgs, argv, "orchestra-jax bench logprob")
    try:
        bench.run_benchmark(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


def bench_rollout(argv: Sequence[str]) -> int:
    """Embedded sampler decode tokens/s next to transformers generate (same weights), TTFT, weight-sync time."""
    from orchestra_jax.rollout import bench

    args = parse(bench.RolloutBenchArgs, argv, "orchestra-jax bench rollout")
    try:
        bench.check_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return bench.run(args)


def bench_train(argv: Sequence[str]) -> int:
    """Train-step tokens/s (tiny and 135M shapes) next to a transformers fwd+bwd+AdamW step, same batch."""
    from orchestra_jax.rl import bench_train as bench

    args = parse(bench.TrainBenchArgs, argv, "orchestra-jax bench train")
    try:
        bench.check_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return bench.run(args)


def bench_load(argv: Sequence[str]) -> int:
    """load_pretrained of a synthetic ~1B checkpoint in a fresh process: seconds and peak host RSS."""
    from orchestra_jax.models import load_benchmark

    args = parse(load_benchmark.LoadBenchArgs, argv, "orchestra-jax bench load")
    try:
        return load_benchmark.run_benchmark(args)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def cmd_convert(argv: Sequence[str]) -> int:
    """Convert between HF directories, GGUF files (read only) and orbax params."""
    from orchestra_jax.models import convert

    args = parse(convert.ConvertArgs, argv, "orchestra-jax convert")
    try:
        return convert.run_convert(args)
    except (ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def cmd_train(argv: Sequence[str]) -> int:
    """Train with multi-objective GRPO/PPO. No flags: the cpu-demo preset (SFT warm start, then RL, on this CPU)."""
    import jax

    config = parse_train_config(argv, "orchestra-jax train")
    if config.dry_run:
        from orchestra_jax.rl import plan

        try:
            print(plan.describe(config, jax.device_count()))
            if config.dry_run_compile:
                print(plan.describe_compiled(config))
        except (ValueError, KeyError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        return 0
    try:
        config_lib.validate(config, num_devices=jax.device_count())
    except config_lib.ConfigError as e:
        raise UsageError(str(e)) from None
    from orchestra_jax.models.hf_io import CheckpointError as SourceError
    from orchestra_jax.models.tokenizer import TokenizerError
    from orchestra_jax.rl import trainer
    from orchestra_jax.rl.checkpoint import CheckpointError

    try:
        return trainer.train(config)
    except (config_lib.ConfigError, OSError, CheckpointError, SourceError, TokenizerError, trainer.RolloutFailed) as e:
        raise UsageError(str(e).splitlines()[0]) from None


def _pop_flag(argv: Sequence[str], flag: str) -> tuple[str | None, list[str]]:
    rest, value, it = [], None, iter(argv)
    for arg in it:
        if arg == flag:
            value = next(it, None)
            if value is None:
                raise UsageError(f"{flag} needs a value")
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def cmd_sft(argv: Sequence[str]) -> int:
    """Supervised training on demonstration trajectories (JSONL) with the RL train step.

    Flags: --data FILE (required), --tokenizer DIR (sizes the preset's vocabulary), any TrainConfig flag;
    --steps is the number of SFT steps, --algorithm.sft-lr the learning rate; --dry-run checks the data and
    prints the plan without initialising params or writing anything. SIGTERM saves the step reached and exits
    with 143; --resume goes on from it.
    """
    data, rest = _pop_flag(argv, "--data")
    tokenizer_dir, rest = _pop_flag(rest, "--tokenizer")
    if any(a in ("-h", "--help") for a in rest):
        print("orchestra-jax sft: --data FILE.jsonl [--tokenizer DIR] plus TrainConfig flags (below).")
    config = parse_train_config(rest, "orchestra-jax sft")
    if data is None:
        raise UsageError("--data FILE.jsonl is required (trajectories or {token_ids, loss_mask} rows)")
    from orchestra_jax.models.tokenizer import TokenizerError
    from orchestra_jax.rl import commands
    from orchestra_jax.rl.checkpoint import CheckpointError
    from orchestra_jax.rl.sft import DemonstrationError

    try:
        if config.dry_run:
            print(commands.sft_plan(config, data, tokenizer_dir))
        elif commands.run_sft(config, data, tokenizer_dir).get("terminated"):
            return 143  # SIGTERM: saved, as `train` does
    except (DemonstrationError, config_lib.ConfigError, OSError, TokenizerError, CheckpointError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return 0


def cmd_inspect(argv: Sequence[str]) -> int:
    """`inspect checkpoint RUN_DIR`: latest step, parameter count and a SHA-256 over every parameter array.
    `inspect curves RUN_DIR [OUT.png]`: draw the run's curves from its TensorBoard events (default RUN_DIR/curves.png)
    and print each curve's mean over the first and the last 10 RL steps."""
    usage = "usage: orchestra-jax inspect checkpoint RUN_DIR | inspect curves RUN_DIR [OUT.png]"
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    if len(argv) in (2, 3) and argv[0] == "curves":
        from orchestra_jax.rl.metrics import curve_summary, plot_run

        out = argv[2] if len(argv) == 3 else f"{argv[1].rstrip('/')}/curves.png"
        try:
            print(plot_run(argv[1], out))
            print("\n".join(curve_summary(argv[1])))
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        return 0
    if len(argv) != 2 or argv[0] != "checkpoint":
        raise UsageError(usage)
    from orchestra_jax.rl import commands
    from orchestra_jax.rl.checkpoint import CheckpointError

    try:
        summary = commands.checkpoint_summary(argv[1])
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    print(f"checkpoint: {summary['directory']}")
    print(f"step: {summary['step']}")
    print(f"parameters: {summary['params']}")
    print(f"sha256: {summary['sha256']}")
    return 0


def bench_episodes(argv: Sequence[str]) -> int:
    """64 concurrent CPU-family episodes (scripted policy, real tools): episodes/s and tool-pool utilisation."""
    from orchestra_jax.env import episode_bench

    args = parse(episode_bench.EpisodeBenchArgs, argv, "orchestra-jax bench episodes")
    try:
        return episode_bench.run(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


# `orchestra-jax bench NAME`: name -> (one-line help, handler). Benchmarks print ratios measured in one run.
BENCHMARKS: dict[str, tuple[str, Handler]] = {
    "load": ("load_pretrained of a synthetic 1B checkpoint: load time and peak host RSS", bench_load),
    "logprob": ("naive vs fused LM-head log-prob: peak memory and time, fwd and fwd+bwd", bench_logprob),
    "rollout": ("embedded sampler decode tok/s vs transformers generate, TTFT, weight-sync time", bench_rollout),
    "train": ("train-step tokens/s (tiny, 135M) vs a transformers fwd+bwd+AdamW step on the same batch", bench_train),
    "episodes": ("64 concurrent CPU-family episodes: episodes/s and tool-pool utilisation", bench_episodes),
}


def cmd_bench(argv: Sequence[str]) -> int:
    """Run one named benchmark."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: orchestra-jax bench {" + ",".join(BENCHMARKS) + "} [FLAGS]\n")
        for name, (help_, _) in BENCHMARKS.items():
            print(f"  {name:<10}  {help_}")
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {argv[0]!r} (choose from {', '.join(BENCHMARKS)})")
    return BENCHMARKS[argv[0]][1](argv[1:])


def cmd_synth(argv: Sequence[str]) -> int:
    """Synthesise a domain (db.json, policy.md, tasks.json) and task JSONL; every task verified by execution."""
    from orchestra_jax.data.synth import command

    args = parse(command.SynthArgs, argv, "orchestra-jax synth")
    try:
        return command.run_synth(args)
    except command.SynthUsageError as e:
        raise UsageError(str(e)) from None


def cmd_serve(argv: Sequence[str]) -> int:
    """Serve a model over SGLang's HTTP API (and OpenAI's) from the embedded JAX sampler."""
    from orchestra_jax.rollout import serve

    args = parse(serve.ServeArgs, argv, "orchestra-jax serve")
    try:
        served = serve.load_served_model(args)
    except (ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    serve.serve(args, served)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    """Evaluate a policy on a benchmark: results.jsonl, summary.json/.md and plots with accuracy, $ and seconds."""
    from orchestra_jax.eval import command

    args = parse(command.EvalArgs, argv, "orchestra-jax eval")
    try:
        return command.run_eval(args)
    except command.EvalUsageError as e:
        raise UsageError(str(e)) from None


def cmd_retrieval_server(argv: Sequence[str]) -> int:
    """Serve BM25 retrieval over a corpus on ToolOrchestra's /retrieve protocol (index cached by corpus hash)."""
    from orchestra_jax.env import search

    args = parse(search.RetrievalServerArgs, argv, "orchestra-jax retrieval-server")
    try:
        index = search.open_bm25(args.corpus, args.cache_dir)
    except search.CorpusError as e:
        raise UsageError(str(e)) from None
    search.serve_retrieval(index, host=args.host, port=args.port, max_topk=args.max_topk)
    return 0


# name -> (one-line help, handler). A subcommand is added here by the change that makes it work.
COMMANDS: dict[str, tuple[str, Handler]] = {
    "config": ("print the resolved run configuration (preset + overrides) as JSON", cmd_config),
    "train": ("multi-objective GRPO/PPO training (no flags: the CPU demo); --dry-run prints the plan", cmd_train),
    "sft": ("supervised training on demonstration trajectories (JSONL) with the RL train step", cmd_sft),
    "inspect": ("inspect checkpoint RUN_DIR (step, parameter count, SHA-256) | inspect curves RUN_DIR", cmd_inspect),
    "convert": ("convert checkpoints between HF directories, GGUF (read only) and orbax params", cmd_convert),
    "synth": ("synthesise a verified tool-use domain and its tasks (procedural or LLM teacher)", cmd_synth),
    "serve": ("serve a model over SGLang's native and OpenAI HTTP APIs (embedded JAX sampler)", cmd_serve),
    "retrieval-server": ("serve BM25 search over a corpus on ToolOrchestra's /retrieve protocol", cmd_retrieval_server),
    "eval": ("evaluate a policy on FRAMES, HLE, tau2, multihop or task files: accuracy, dollars, seconds", cmd_eval),
}
if BENCHMARKS:
    COMMANDS["bench"] = ("benchmarks: " + ", ".join(BENCHMARKS), cmd_bench)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: orchestra-jax {" + ",".join(COMMANDS) + "} ...",
        "",
        "Train small LLM orchestrators of tools and expert models with multi-objective GRPO (JAX).",
        "",
        "subcommands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "Run `orchestra-jax SUBCOMMAND --help` for its flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"orchestra-jax: error: unknown subcommand {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][1](rest)
    except (UsageError, config_lib.ConfigError) as e:
        print(f"orchestra-jax {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"orchestra-jax {name}: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The `orchestra-jax` console script: main(), for a training command in a process with huge pages for XLA
    (see hugepages)."""
    if hugepages.helps(sys.argv[1:]):
        hugepages.reexec([sys.executable, "-m", "orchestra_jax", *sys.argv[1:]])
    return main()


if __name__ == "__main__":
    sys.exit(entry())
