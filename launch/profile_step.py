"""Where one train step's device time goes: per-op times from a profiler trace, grouped by kind and by loop.

    python launch/profile_step.py [--model qwen3-0.6b] [--steps 3] [--out DIR] [gpu_train_bench.py's step flags]
    python launch/profile_step.py --from DIR          # analyse a profile saved under DIR again

It builds the step launch/gpu_train_bench.py times (random weights, bf16 compute), compiles it once, runs it
under `jax.profiler`, and joins each traced op with the compiled HLO. It prints the step's wall time, the
device's busy time, then time per kind of op (matmul, attention, reduce, elementwise, layout copies, ...), per
loop of the program (the layer scan's forward and backward, the LM head's vocabulary chunks, ...) and the
slowest ops. On a GPU it turns off XLA's CUDA graphs so that each op is traced by name (so the step may run a
little slower than in gpu_train_bench.py). It runs on any backend; on the CPU the ops run on host threads and
may overlap, so busy time can exceed wall time. Under --out it leaves the summary as JSON, the optimised HLO
and the raw trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

# XLA's GPU runtime replays runs of ops as CUDA graphs ("command buffers"), which the trace shows as one event
# each, named after no HLO op: off, unless --keep-command-buffers (set before jax starts its backend).
if "--keep-command-buffers" not in sys.argv:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_bench import add_step_args, apply_overrides, build, model_flops_per_step  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_LAYOUT_OPS = {"copy", "transpose", "convert", "bitcast-convert", "slice", "dynamic-slice", "dynamic-update-slice",
               "concatenate", "pad", "reshape", "broadcast", "iota", "gather", "scatter", "select"}
_PLUMBING = {"fusion", "parameter", "bitcast", "get-tuple-element", "tuple", "constant"}


def parse_hlo(text: str) -> tuple[dict, dict, dict]:
    """({computation: [(name, shape, opcode, rest)]}, {instruction: (computation, shape, opcode, rest)},
    {stack frame id: "function (file:line)"}, the Python source each op's metadata points at)."""
    computations, instructions, current = {}, {}, None
    tables: dict[str, dict[int, str]] = {}
    table = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
            continue
        entry = re.match(r"^(\d+) (.*)$", line)
        if table is not None and entry:
            table[int(entry.group(1))] = entry.group(2).strip('"')
            continue
        table = None
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(2)
            computations[current] = []
            continue
        inst = _INSTRUCTION.match(line)
        if current and inst:
            name, shape, opcode, rest = inst.groups()
            computations[current].append((name, shape, opcode, rest))
            instructions[name] = (current, shape, opcode, rest)
    return computations, instructions, _frames(tables)


def _frames(tables: dict[str, dict[int, str]]) -> dict[int, str]:
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    places = {}
    for key, value in tables.get("FileLocations", {}).items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        function = functions.get(int(fields.get("function_name_id", 0)), "?")
        file = Path(files.get(int(fields.get("file_name_id", 0)), "?")).name
        places[key] = f"{function} ({file}:{fields.get('line', '?')})"
    frames = {}
    for key, value in tables.get("StackFrames", {}).items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        frames[key] = places.get(int(fields.get("file_location_id", 0)), "?")
    return frames


def source_of(name: str, instructions: dict, frames: dict) -> str:
    """The innermost Python function (file:line) an op came from, per its metadata."""
    frame = re.search(r"stack_frame_id=(\d+)", instructions[name][3]) if name in instructions else None
    return frames.get(int(frame.group(1)), "?") if frame else "?"


def _called(rest: str) -> list[str]:
    names = re.findall(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)", rest)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", rest):
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


def _opcodes(computations: dict, name: str, seen: set | None = None) -> collections.Counter:
    """Opcodes inside a computation and everything it calls."""
    seen = set() if seen is None else seen
    found = collections.Counter()
    for _, _, opcode, rest in computations.get(name, []):
        found[opcode] += 1
        for sub in _called(rest):
            if sub not in seen:
                seen.add(sub)
                found.update(_opcodes(computations, sub, seen))
    return found


def kind_of(name: str, computations: dict, instructions: dict) -> str:
    """matmul | attention | reduce | elementwise | layout | collective | other, for one traced op."""
    if name not in instructions:
        return "other"
    _, _, opcode, rest = instructions[name]
    text = rest.lower()
    if opcode == "custom-call":
        if "cudnn" in text and ("fmha" in text or "attention" in text or "sdpa" in text):
            return "attention"
        if "gemm" in text or "matmul" in text or "cublas" in text:
            return "matmul"
        return "other"
    ops = collections.Counter({opcode: 1})
    for sub in _called(rest):
        ops.update(_opcodes(computations, sub))
    if "dot" in ops or "convolution" in ops:
        return "matmul"
    if any(op.startswith(("all-", "reduce-scatter", "collective")) for op in ops):
        return "collective"
    if "reduce" in ops or "reduce-window" in ops:
        return "reduce"
    core = set(ops) - _PLUMBING
    if core <= _LAYOUT_OPS:
        return "layout"
    return "elementwise"


def callers(computations: dict) -> dict:
    """{computation: (calling computation, instruction, opcode, rest)}."""
    parents = {}
    for comp, insts in computations.items():
        for inst, _, opcode, rest in insts:
            for sub in _called(rest):
                parents.setdefault(sub, (comp, inst, opcode, rest))
    return parents


def loop_of(name: str, instructions: dict, parents: dict) -> str:
    """The chain of while loops an op runs in, outermost first ("while.3 x28 > while.9 x128"; "top" outside
    any)."""
    chain, comp = [], instructions[name][0] if name in instructions else None
    while comp in parents:
        parent_comp, inst, opcode, rest = parents[comp]
        if opcode == "while" and re.search(r"body=%?" + re.escape(comp) + r"\b", rest):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            chain.append(f"{inst} x{trips.group(1) if trips else '?'}")
        comp = parent_comp
    return " > ".join(reversed(chain)) or "top"


def _dims(shape: str) -> list[int]:
    """[8, 256, 576] from "bf16[8,256,576]{2,1,0}" (a tuple's first array: a cuBLAS call's result)."""
    found = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def dot_flops(name: str, computations: dict, instructions: dict) -> int:
    """Multiply-add FLOPs (2 per MAC) of one call of an op: a dot, a fusion of dots, or a cuBLAS custom call,
    from the output's size and the contracted dimensions of the left operand."""
    if name not in instructions:
        return 0
    _, shape, opcode, rest = instructions[name]
    contracting = None
    if opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    elif opcode == "custom-call":
        contracting = re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', rest)
    if contracting:
        lhs = re.match(r"\s*%?([\w.\-]+)", rest)
        lhs_dims = _dims(instructions[lhs.group(1)][1]) if lhs and lhs.group(1) in instructions else []
        axes = [int(a) for a in contracting.group(1).replace('"', "").split(",") if a]
        if lhs_dims and all(a < len(lhs_dims) for a in axes):
            return 2 * math.prod(_dims(shape)) * math.prod(lhs_dims[a] for a in axes)
        return 0
    return sum(dot_flops(inner, computations, instructions)
               for sub in _called(rest) for inner, _, _, _ in computations.get(sub, []))


def concurrency(spans: list[tuple[int, int, str]], kinds: dict[str, str], steps: int) -> dict[str, float]:
    """Wall ms per step with n ops running at once, split by whether a matmul is among them ("2 (matmul)"):
    on the CPU, where ops share the cores, the time one op runs alone is where a core may sit idle."""
    edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(spans)]
                   + [(end, -1, i) for i, (_, end, _) in enumerate(spans)])
    running: set[int] = set()
    totals: collections.Counter = collections.Counter()
    last = edges[0][0] if edges else 0
    for at, change, i in edges:
        if at > last:
            matmul = any(kinds.get(spans[j][2]) == "matmul" for j in running)
            totals[f"{len(running)} ({'matmul' if matmul else 'other'})" if running else "0"] += at - last
        last = at
        running.add(i) if change > 0 else running.discard(i)
    return {k: round(v / 1e6 / steps, 2) for k, v in sorted(totals.items())}


def op_times(trace_dir: str) -> tuple[dict[str, list[float]], list[tuple[str, str, int, float]], list[tuple]]:
    """{hlo op: [seconds, calls]} over the trace, from device planes when they carry ops (a GPU), else from host
    threads (the CPU); a (plane, line, events, seconds) table of what the trace holds; and each of those ops'
    (start ns, end ns, op) intervals, for `concurrency`."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        raise SystemExit(f"no trace was written under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    per_source: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    spans: dict[bool, list[tuple[int, int, str]]] = {True: [], False: []}
    lines = []
    for plane in data.planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            total, count = 0.0, 0
            for event in line.events:
                total += event.duration_ns * 1e-9
                count += 1
                if line.name in ("XLA Ops", "XLA Modules", "Launch Stats"):
                    continue  # summaries of the kernel lines
                op = next((value for key, value in event.stats if key == "hlo_op"), None)
                if op:
                    slot = per_source[on_device].setdefault(op, [0.0, 0])
                    slot[0] += event.duration_ns * 1e-9
                    slot[1] += 1
                    spans[on_device].append((event.start_ns, event.start_ns + event.duration_ns, op))
            lines.append((plane.name, line.name, count, total))
    on_device = bool(per_source[True])
    return per_source[on_device], lines, spans[on_device]


def analyse(times: dict[str, list[float]], hlo: str, steps: int, top: int, spans: list[tuple] = ()) -> dict:
    """Per-step times by kind, loop and source function, the `top` slowest ops with each matmul's achieved
    TFLOP/s, and how many ops ran at once, from op_times and the HLO."""
    computations, instructions, frames = parse_hlo(hlo)
    parents = callers(computations)
    per_kind, per_loop, per_source = collections.Counter(), collections.Counter(), collections.Counter()
    rows, kinds, matmul_flops = [], {}, 0
    for op, (seconds, calls) in times.items():
        if op in instructions and instructions[op][2] in ("while", "conditional", "call"):
            continue  # a container: the ops inside it are traced themselves
        kind, loop, source = kind_of(op, computations, instructions), loop_of(op, instructions, parents), \
            source_of(op, instructions, frames)
        per_kind[kind] += seconds / steps
        per_loop[loop] += seconds / steps
        per_source[source.split(" (")[0]] += seconds / steps
        shape = instructions[op][1] if op in instructions else "?"
        kinds[op] = kind
        flops = dot_flops(op, computations, instructions) * calls if kind == "matmul" else 0
        matmul_flops += flops
        rows.append({"op": op, "ms": round(1e3 * seconds / steps, 3), "calls": calls / steps, "kind": kind,
                     "loop": loop, "source": source, "shape": shape[:80],
                     "tflops": round(flops / seconds / 1e12, 3) if flops and seconds else None})
    at_once = concurrency(list(spans), kinds, steps)
    loop_sources = {}
    for loop in per_loop:
        inner = loop.split(" > ")[-1].split(" x")[0]
        backward = inner in instructions and "transpose(" in instructions[inner][3]
        loop_sources[loop] = "" if inner == "top" else \
            source_of(inner, instructions, frames) + (" backward" if backward else "")
    rows.sort(key=lambda r: -r["ms"])
    return {
        "busy_ms": round(1e3 * sum(per_kind.values()), 2),
        "kinds_ms": {k: round(1e3 * v, 2) for k, v in per_kind.most_common()},
        "loops_ms": {k: round(1e3 * v, 2) for k, v in per_loop.most_common()},
        "loop_sources": loop_sources,
        "functions_ms": {k: round(1e3 * v, 2) for k, v in per_source.most_common()},
        "matmul_gflop": round(matmul_flops / steps / 1e9, 2),
        "matmul_tflops": round(matmul_flops / max(per_kind["matmul"], 1e-12) / 1e12, 3),
        "matmul_wall_tflops": round(matmul_flops / steps / max(1e-3 * sum(
            v for k, v in at_once.items() if k.endswith("(matmul)")), 1e-12) / 1e12, 3) if at_once else None,
        "ops_at_once_ms": at_once,
        "top_ops": rows[:top],
    }


def profile(args: argparse.Namespace) -> dict:
    model, step, state, batch = build(args.model, args)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    arrays = step.place(batch)
    hlo = compiled.as_text()

    def run(state):
        with jax.set_mesh(step.mesh):
            state, metrics = compiled(state, arrays)
        jax.block_until_ready(metrics)
        return state

    for _ in range(args.warmup):
        state = run(state)
    trace_dir = tempfile.mkdtemp(prefix="trace_", dir=args.out)
    walls = []
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            start = time.perf_counter()
            state = run(state)
            walls.append(time.perf_counter() - start)
    times, lines, spans = op_times(trace_dir)
    wall = float(np.median(walls))
    out = Path(args.out)
    (out / "step_hlo.txt").write_text(hlo)
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        with open(path, "rb") as src, gzip.open(out / "trace.xplane.pb.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    shutil.rmtree(trace_dir, ignore_errors=True)
    return {
        "model": args.model, "device": jax.devices()[0].device_kind, "batch": args.batch, "seq_len": args.seq_len,
        "samples_per_row": args.samples_per_row,
        "remat": args.remat, "attention": args.attention, "logprob_impl": args.logprob_impl,
        "overrides": args.override, "steps": args.steps, "compile_s": round(compile_s, 1),
        "wall_ms": round(1e3 * wall, 2), "model_tflops": round(model_flops_per_step(model, args) / wall / 1e12, 1),
        **analyse(times, hlo, args.steps, args.top, spans),
        "trace_lines": [{"plane": p, "line": n, "events": c, "ms": round(1e3 * s, 1)} for p, n, c, s in lines
                        if c],
    }


def reread(folder: Path, top: int) -> dict:
    """A saved profile (summary.json, step_hlo.txt, trace.xplane.pb.gz) analysed again, e.g. on a laptop."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        hlo = (folder / "step_hlo.txt").read_text()
        with tempfile.TemporaryDirectory() as tmp:
            with gzip.open(folder / "trace.xplane.pb.gz", "rb") as src, open(f"{tmp}/t.xplane.pb", "wb") as dst:
                shutil.copyfileobj(src, dst)
            times, _, spans = op_times(tmp)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from {folder}: {e}") from None
    return {**summary, **analyse(times, hlo, summary.get("steps", 3), top, spans)}


def report(summary: dict) -> str:
    wall, busy = summary["wall_ms"], max(summary["busy_ms"], 1e-9)
    if not summary["kinds_ms"]:  # no event named its HLO op: show what the trace holds instead
        return "\n".join(f"{t['plane']} | {t['line']}: {t['events']} events, {t['ms']} ms"
                         for t in summary["trace_lines"])
    lines = [f"{summary['model']} on {summary['device']}: {summary['batch']} x {summary['seq_len']}, remat "
             f"{summary['remat']}, {summary['model_tflops']} model TFLOP/s; step {wall:.1f} ms wall, ops busy "
             f"{busy:.1f} ms ({busy / wall:.0%} of wall)", "", "kind          ms/step  share"]
    lines += [f"{k:<12}{v:9.2f}  {v / busy:5.1%}" for k, v in summary["kinds_ms"].items()]
    wall_rate = summary["matmul_wall_tflops"]
    lines += ["", f"matmuls: {summary['matmul_gflop']:.1f} GFLOP a step, {summary['matmul_tflops']:.3f} TFLOP/s over "
              "their summed times" + (f", {wall_rate:.3f} over the wall time while one runs" if wall_rate else ""),
              "ops at once, wall ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["ops_at_once_ms"].items())]
    lines += ["", f"{'loop (outermost first)':<44}ms/step  share  the innermost loop's source"]
    lines += [f"{k[:43]:<44}{v:7.2f}  {v / busy:5.1%}  {summary['loop_sources'][k]}"
              for k, v in summary["loops_ms"].items()]
    lines += ["", "function (innermost)            ms/step  share"]
    lines += [f"{k[:31]:<32}{v:7.2f}  {v / busy:5.1%}" for k, v in list(summary["functions_ms"].items())[:15]]
    lines += ["", f"{'op':<30}{'ms/step':>8}{'calls':>6}  {'kind':<12}{'TFLOP/s':>8}  {'source':<40}shape"]
    lines += [f"{r['op'][:29]:<30}{r['ms']:8.3f}{r['calls']:6.0f}  {r['kind']:<12}"
              f"{'' if r.get('tflops') is None else format(r['tflops'], '.3f'):>8}  {r['source'][:39]:<40}{r['shape']}"
              for r in summary["top_ops"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=30, help="slowest ops listed")
    parser.add_argument("--out", default="profile_out", help="folder for summary.json, the HLO and the trace")
    parser.add_argument("--keep-command-buffers", action="store_true",
                        help="leave XLA's CUDA graphs on (the trace then cannot name their ops)")
    parser.add_argument("--from", dest="source", type=Path, metavar="DIR",
                        help="analyse a profile saved under DIR instead of running one")
    add_step_args(parser)
    args = parser.parse_args(argv)
    if args.source:
        print(report(reread(args.source, args.top)), flush=True)
        return 0
    apply_overrides(args.override)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = profile(args)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
