"""The CPU task family: small problems where the choice of tool matters and every tool is real and local.

A seeded `World` invents towns (names, residents, mayors, founding years) so nothing can be memorised from
pre-training; its passages form the corpus that a real BM25 index searches. Tasks are of two kinds:
- arithmetic ("What is 37 * 91?"): the `python` tool runs code in the real sandbox and is nearly free;
- facts ("Who is the mayor of Zorvik?"): `search` finds the town's passage with BM25 for a small fee.
The `expert` tool answers either kind in one call, but only the share of questions it knows (`coverage`, all of
them by default): facts about a share of the towns (a general model has not read every town's records) and a
share of the products and sums (it answers from memory, without running code); "I do not know." about the rest.
It stands in for a strong, expensive model (priced as `cpu-expert`, far above the other tools), so python and
search serve every user best once the policy has learnt them: both cheaper and, below full coverage, more often
right. Every task ends with the `answer` tool, which judges the answer against the reference.

`demonstrations` records scripted episodes (mixing the cheap tools and the expert, and trusting whatever the
tool said) through the same episode loop RL uses, for the SFT warm start of a tiny policy.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import operator
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from orchestra_jax.env.catalog import Tool, ToolCatalog, ToolContext, ToolResult, error_result
from orchestra_jax.env.episode import run_episodes, system_message
from orchestra_jax.env.judge import JudgeConfig, judge_answer
from orchestra_jax.env.llm_tools import approx_tokens
from orchestra_jax.env.preferences import PreferenceDistribution, preference_for_task
from orchestra_jax.env.prices import ModelPrice, PriceTable, Usage, default_price_table
from orchestra_jax.env.sandbox import run_python
from orchestra_jax.env.scripted import ScriptedEngine
from orchestra_jax.env.search import BM25Index, LocalRetriever, Passage, make_search_tool
from orchestra_jax.env.trajectory import EpisodeConfig, Task, Trajectory, parse_request_id
from orchestra_jax.models import chat_template
from orchestra_jax.models.tokenizer import QWEN3_ADDED_TOKENS, Tokenizer, train_small_tokenizer

TOOL_NAMES = ("python", "search", "expert", "answer")
EXPERT_MODEL = "cpu-expert"
EXPERT_PRICE = ModelPrice(30.0, 60.0)
SEARCH_KIND = "cpu-search"
SEARCH_FEE_USD = 0.0002
SYSTEM_PROMPT = "You solve problems with tools. Call one tool per turn; finish with the answer tool."

_SYLLABLES = (
    "zor",
    "vik",
    "pal",
    "en",
    "mor",
    "tas",
    "quil",
    "bra",
    "don",
    "fe",
    "lu",
    "rak",
    "sim",
    "to",
    "nar",
    "gel",
    "ith",
    "ov",
    "cra",
    "mun",
    "bel",
    "dri",
    "sa",
    "vo",
)
_FIRST = ("Tamel", "Orsa", "Bren", "Calla", "Dovik", "Essa", "Firn", "Gaela", "Hurt", "Ilse", "Joss", "Kira")
_LAST = ("Quor", "Vell", "Marn", "Tosk", "Ruen", "Pell", "Sarn", "Oddo", "Lume", "Brask", "Fenn", "Yarr")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_FACTS = {
    "residents": ("How many residents does {name} have?", "{name} residents"),
    "mayor": ("Who is the mayor of {name}?", "{name} mayor"),
    "founded": ("In which year was {name} founded?", "{name} founded"),
}


@dataclasses.dataclass(frozen=True)
class Town:
    name: str
    residents: int
    mayor: str
    founded: int

    def passage(self) -> str:
        return (
            f"{self.name} is a town with {self.residents} residents. Its mayor is {self.mayor}. "
            f"It was founded in {self.founded}."
        )

    def fact(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclasses.dataclass(frozen=True)
class World:
    """The invented towns; the search corpus is one passage per town."""

    towns: tuple[Town, ...]

    def town(self, name: str) -> Town | None:
        return next((t for t in self.towns if t.name.lower() == name.lower()), None)

    def passages(self) -> list[Passage]:
        return [Passage(str(i), t.name, t.passage()) for i, t in enumerate(self.towns)]


def make_world(seed: int = 0, n_towns: int = 200) -> World:
    rng = np.random.default_rng([seed, 7])
    names: set[str] = set()
    towns = []
    while len(towns) < n_towns:
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
        if name in names:
            continue
        names.add(name)
        towns.append(
            Town(
                name,
                int(rng.integers(1000, 99999)),
                f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                int(rng.integers(1200, 1990)),
            )
        )
    return World(tuple(towns))


def generate_tasks(
    n: int,
    seed: int = 0,
    *,
    world: World | None = None,
    kinds: Sequence[str] = ("arith", "fact"),
    preferences: PreferenceDistribution | None = None,
) -> list[Task]:
    """`n` seeded tasks alternating over `kinds`; each draws its own preference over (python, search, expert, answer)."""
    world = world or make_world(seed)
    bad = [k for k in kinds if k not in ("arith", "fact")]
    if bad or not kinds:
        raise ValueError(f"cpu task kinds {list(kinds)}: choose from 'arith', 'fact'")
    rng = np.random.default_rng([seed, 11])
    dist = preferences or PreferenceDistribution(kind="uniform", tool_keep_prob=0.0)
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        task_id = f"cpu-{seed}-{i}"
        if kind == "arith":
            op = str(rng.choice(list(_OPS)))
            a, b = int(rng.integers(11, 999)), int(rng.integers(11, 99))
            question, answer = f"What is {a} {op} {b}?", str(_OPS[op](a, b))
            meta = {"kind": "arith", "expression": f"{a}{op}{b}"}
        else:
            town = world.towns[int(rng.integers(len(world.towns)))]
            attribute = str(rng.choice(list(_FACTS)))
            question, answer = _FACTS[attribute][0].format(name=town.name), town.fact(attribute)
            meta = {"kind": "fact", "town": town.name, "attribute": attribute}
        preference = preference_for_task(task_id, TOOL_NAMES, dist, seed=seed)
        tasks.append(
            Task(task_id, question, answer, TOOL_NAMES, preference, {**meta, "system_prompt": SYSTEM_PROMPT})
        )
    return tasks


# ------------------------------------------------------------------------------------------------- tools


def cpu_prices(base: PriceTable | None = None) -> PriceTable:
    """ToolOrchestra's table plus the expert's price and the search fee of this family."""
    base = base or default_price_table()
    table = base.with_models({EXPERT_MODEL: EXPERT_PRICE})
    return dataclasses.replace(
        table, search_usd_per_query={**table.search_usd_per_query, SEARCH_KIND: SEARCH_FEE_USD}
    )


_SANDBOX_THREADS: ThreadPoolExecutor | None = None


def _sandbox_executor() -> ThreadPoolExecutor:
    """Sandbox runs block on a subprocess; they get their own threads so 64 episodes never queue behind 6."""
    global _SANDBOX_THREADS
    if _SANDBOX_THREADS is None:
        _SANDBOX_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sandbox")
    return _SANDBOX_THREADS


def make_python_tool(timeout_s: float = 5.0, max_output_chars: int = 500) -> Tool:
    """`python(code)`: run the code in the sandbox, observe what it prints; costs sandbox seconds."""

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        code = arguments["code"]
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            _sandbox_executor(), lambda: run_python(code, timeout_s=timeout_s)
        )
        output = (
            result.stdout if result.error is None else f"{result.stdout}\nError: {result.error}"
        ).strip()
        output = output[:max_output_chars] or "(no output)"
        return ToolResult(
            observation=output,
            cost_usd=context.prices.cost(sandbox_s=result.elapsed_s),
            sandbox_s=result.elapsed_s,
            code_runs=((code, output),),
            error=result.error,
        )

    return Tool(
        name="python",
        description="Run Python code; returns what it prints. Cheap ($0.0000083 per second), about 0.3 s.",
        parameters={"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        execute=execute,
    )


def _arithmetic_expression(text: str) -> str | None:
    """The first run of digits, + - * and parentheses (and spaces) in `text`."""
    match = re.search(r"[-+*\d\s()]*\d[-+*\d\s()]*", text)
    return None if match is None else match.group().strip()


def _eval_arithmetic(expression: str) -> int | None:
    """Integer + - * of literals, evaluated exactly from the syntax tree (never `eval`); None if not that."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


def expert_knows(subject: str, coverage: float) -> bool:
    """Whether the expert knows a subject (a town's name, or an arithmetic expression written without spaces):
    a fixed share `coverage` of them, chosen by hash."""
    return zlib.crc32(subject.encode()) % 10_000 < round(coverage * 10_000)


def make_local_expert_tool(world: World, coverage: float = 1.0) -> Tool:
    """`expert(question)`: the family's strong model, and costly. It knows the share `coverage` of the towns
    and of the arithmetic questions (answering those exactly) and says "I do not know." about the rest."""
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"expert coverage {coverage}: must be in [0, 1]")

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        question = arguments["question"]
        reply = "I do not know."
        for attribute, (template, _) in _FACTS.items():
            pattern = re.escape(template).replace(re.escape("{name}"), r"([A-Za-z]+)")
            match = re.search(pattern, question)
            town = world.town(match.group(1)) if match else None
            if town is not None:
                reply = town.fact(attribute) if expert_knows(town.name, coverage) else reply
                break
        else:
            expression = _arithmetic_expression(question)
            number = None if expression is None else _eval_arithmetic(expression)
            known = number is not None and expert_knows(re.sub(r"\s", "", expression), coverage)
            reply = str(number) if known else reply
        usage = Usage(EXPERT_MODEL, approx_tokens(question) + 16, approx_tokens(reply))
        return ToolResult(
            observation=reply, cost_usd=context.prices.call_cost(usage), usage=(usage,), backend=EXPERT_MODEL
        )

    return Tool(
        name="expert",
        description="Ask a strong expert model. Answers most questions; expensive ($30/$60 per M tokens).",
        parameters={
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
        execute=execute,
    )


def make_answer_tool() -> Tool:
    """`answer(answer)`: the final answer; ends the episode and is judged against the reference."""

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        answer = str(arguments["answer"]).strip()
        if not answer:
            return error_result("answer: the answer is empty")
        correct = None
        if context.reference_answer is not None:
            verdict = await judge_answer(
                context.question,
                answer,
                context.reference_answer,
                config=JudgeConfig(methods=("exact", "normalized")),
            )
            correct = verdict.correct
        return ToolResult(observation=f"Final answer: {answer}", answer=answer, correct=correct)

    return Tool(
        name="answer",
        description="Give the final answer. Ends the task.",
        parameters={"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
        execute=execute,
    )


def cpu_catalog(
    world: World, *, sandbox_timeout_s: float = 5.0, topk: int = 2, expert: Tool | None = None,
    expert_coverage: float = 1.0,
) -> ToolCatalog:
    """python, search (BM25 over the world's passages), expert (or a given one, e.g. an LLM endpoint), answer."""
    retriever = LocalRetriever(BM25Index.build(world.passages()), kind=SEARCH_KIND)
    search = make_search_tool(
        retriever,
        topk=topk,
        max_doc_chars=300,
        description="Search documents about towns. Small fee ($0.0002 a query), fast.",
    )
    return ToolCatalog(
        (
            make_python_tool(sandbox_timeout_s),
            search,
            expert or make_local_expert_tool(world, expert_coverage),
            make_answer_tool(),
        )
    )


# ----------------------------------------------------------------------------------------- demonstrations


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call exactly as the Qwen3 template renders it."""
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )


def first_call(task: Task, tool: str) -> str:
    """The demonstration's first move on `task` with `tool` (python or search; expert for either kind)."""
    if tool == "expert":
        return tool_call_text("expert", {"question": task.question})
    if tool == "python" and task.metadata["kind"] == "arith":
        return tool_call_text("python", {"code": f"print({task.metadata['expression']})"})
    if tool == "search" and task.metadata["kind"] == "fact":
        query = _FACTS[task.metadata["attribute"]][1].format(name=task.metadata["town"])
        return tool_call_text("search", {"query": query})
    raise ValueError(f"task {task.id}: no demonstration for tool {tool!r} on a {task.metadata['kind']} task")


_READERS = {
    "residents": r"{name} is a town with (\d+) residents",
    "mayor": r"{name} is a town .*?Its mayor is ([A-Z][a-z]+ [A-Z][a-z]+)",
    "founded": r"{name} is a town .*?founded in (\d+)",
}


def read_answer(task: Task, tool: str, observation: str) -> str | None:
    """What a careful reader takes from the tool's observation (None when it does not say)."""
    if tool in ("python", "expert"):
        text = observation.strip()
        return text if text and not text.startswith("Error") and text != "I do not know." else None
    pattern = _READERS[task.metadata["attribute"]].format(name=re.escape(task.metadata["town"]))
    match = re.search(pattern, observation)
    return match.group(1) if match else None


def _last_tool_response(text: str) -> str:
    start = text.rfind("<tool_response>")
    end = text.rfind("</tool_response>")
    return text[start + len("<tool_response>") : end].strip() if 0 <= start < end else ""


def demonstration_engine(
    tasks: Sequence[Task], tokenizer: Any, *, expert_share: float = 0.3, seed: int = 0
) -> ScriptedEngine:
    """A scripted policy: a tool call, then the answer read from that tool's observation in the prompt.

    Each task uses the expert with probability `expert_share` and the cheap tool otherwise, whatever its
    preference, so the warm-started policy has seen both routes and RL has something to choose between.
    """
    rng = np.random.default_rng([seed, 13])
    cheap = {"arith": "python", "fact": "search"}
    choice = {t.id: "expert" if rng.uniform() < expert_share else cheap[t.metadata["kind"]] for t in tasks}
    by_id = {t.id: t for t in tasks}

    def script(prompt_ids: tuple[int, ...], rid: str) -> str:
        task_id, _, _, turn = parse_request_id(rid)
        task, tool = by_id[task_id], choice[task_id]
        if turn == 0:
            return first_call(task, tool)
        answer = read_answer(task, tool, _last_tool_response(tokenizer.decode(list(prompt_ids))))
        return tool_call_text("answer", {"answer": answer if answer is not None else "unknown"})

    return ScriptedEngine(tokenizer, script, weight_version="demonstration")


async def demonstrations(
    tasks: Sequence[Task],
    tokenizer: Any,
    world: World,
    *,
    config: EpisodeConfig | None = None,
    expert_share: float = 0.3,
    seed: int = 0,
    catalog: ToolCatalog | None = None,
    concurrency: int = 64,
) -> list[Trajectory]:
    """Scripted episodes (`demonstration_engine`) through the RL episode loop. Every finished episode is kept:
    the demonstrator trusts its tools, so when one fails it (the expert not knowing a town) the wrong answer is
    part of the behaviour being cloned, and RL's to correct."""
    config = config or EpisodeConfig(max_turns=2, temperature=1.0, system_prompt=SYSTEM_PROMPT)
    if config.mode != "history":
        raise ValueError("demonstrations are recorded in history mode")
    engine = demonstration_engine(tasks, tokenizer, expert_share=expert_share, seed=seed)
    trajectories = await run_episodes(
        engine,
        tokenizer,
        catalog or cpu_catalog(world),
        tasks,
        config,
        concurrency=concurrency,
        prices=cpu_prices(),
    )
    return [t for t in trajectories if t.error is None]


def tokenizer_texts(world: World, tasks: Sequence[Task]) -> list[str]:
    """Text to train the family's small BPE on: passages, questions, tool calls and answers."""
    texts = [t.passage() for t in world.towns]
    for task in tasks:
        texts.append(task.question)
        texts.append(tool_call_text("answer", {"answer": task.answer}))
        tools = ["expert", "python" if task.metadata["kind"] == "arith" else "search"]
        texts.extend(first_call(task, tool) for tool in tools)
    return texts


def family_tokenizer(
    world: World, catalog: ToolCatalog, tasks: Sequence[Task], vocab_size: int, *, prompts: int = 16,
    repeats: int = 8, out_dir: Any = None, digits_per_token: int = 3,
) -> Tokenizer:
    """The family's small BPE: its texts plus whole rendered prompts (tool schemas, preference lines), repeated
    so the BPE learns their frequent words. The prompts' constant stretches become one token each
    (`constant_phrases`): a Qwen3 system turn with four tool schemas is ~450 BPE tokens, which would dominate
    a tiny policy's compute and attention. Numbers split into runs of up to 3 digits, which a tiny policy
    copies from a question or a tool output far more reliably than digit by digit."""
    texts = tokenizer_texts(world, tasks)
    rendered = []
    for task in tasks[:prompts]:
        messages = [system_message(SYSTEM_PROMPT, task.preference), {"role": "user", "content": task.question}]
        rendered.append(chat_template.render(messages, tools=catalog.schemas(), add_generation_prompt=True,
                                             enable_thinking=False))
    texts += rendered * repeats
    return train_small_tokenizer(texts, vocab_size, out_dir=out_dir, phrases=constant_phrases(rendered),
                                 digits_per_token=digits_per_token)


def constant_phrases(rendered: Sequence[str], min_chars: int = 24) -> list[str]:
    """Runs of whole lines that every rendered prompt contains, split at special tokens (which keep their own
    ids). Each run ends with its newline, so the text after it tokenizes as it would at a line start."""
    specials = re.compile("|".join(re.escape(name) for name, _ in QWEN3_ADDED_TOKENS))
    common = set.intersection(*(set(text.splitlines(keepends=True)) for text in rendered)) if rendered else set()
    phrases, run = [], ""
    for line in (rendered[0].splitlines(keepends=True) if rendered else []):
        pieces = specials.split(line)
        if line in common and len(pieces) == 1:
            run += line
            continue
        # A line with special tokens: its text before the first one may close the run.
        if line in common and pieces[0]:
            run += pieces[0]
        phrases.append(run)
        run = pieces[-1] if line in common and len(pieces) > 1 else ""
    phrases.append(run)
    return [p for p in dict.fromkeys(phrases) if len(p) >= min_chars]
