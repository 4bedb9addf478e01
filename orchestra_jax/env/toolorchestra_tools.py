"""ToolOrchestra's three orchestrator tools: search, enhance_reasoning and answer, each taking a model alias.

The policy picks an alias (search-1..3, reasoner-1..3, answer-1..4, answer-math-1..2); the task's alias map says
which real backend (an endpoint name of `llm_tools.ChatClient`, priced by the price table) serves it. With
ToolOrchestra's map, prices and latencies, `toolorchestra_catalog(...).schemas()` equals its tools.json (with the
"$$0.2" typo fixed); with a randomised map (`random_alias_map`) the descriptions' price tables follow the swap.
The tools follow ToolOrchestra's evaluation code (NVlabs/ToolOrchestra evaluation/eval_hle.py): a query writer
then retrieval; a code writer then a sandboxed run; an answer model then the judge. The prompt sentences are
ToolOrchestra's (Apache-2.0), typos included, so that trained policies see what they were trained with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from orchestra_jax.env.catalog import Tool, ToolCatalog, ToolContext, ToolResult, error_result, resolve_alias
from orchestra_jax.env.judge import JudgeConfig, extract_answer, judge_answer
from orchestra_jax.env.llm_tools import ChatClient, ChatReply
from orchestra_jax.env.prices import PriceError, PriceTable, Usage, default_price_table
from orchestra_jax.env.sandbox import SandboxLimits, run_python
from orchestra_jax.env.search import RetrievalError, Retriever, format_documents

PASSTHROUGH = "passthrough"
"""A backend that writes no query: the search tool then searches for the question itself, at no model cost."""

ALIASES: dict[str, tuple[str, ...]] = {
    "enhance_reasoning": ("reasoner-1", "reasoner-2", "reasoner-3"),
    "answer": ("answer-1", "answer-2", "answer-3", "answer-4", "answer-math-1", "answer-math-2"),
    "search": ("search-1", "search-2", "search-3"),
}

TOOLORCHESTRA_ALIAS_MAP: dict[str, str] = {
    "search-1": "gpt-5",
    "search-2": "gpt-5-mini",
    "search-3": "Qwen/Qwen3-32B",
    "reasoner-1": "gpt-5",
    "reasoner-2": "gpt-5-mini",
    "reasoner-3": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "answer-1": "gpt-5",
    "answer-2": "gpt-5-mini",
    "answer-3": "meta-llama/Llama-3.3-70B-Instruct",
    "answer-4": "Qwen/Qwen3-32B",
    "answer-math-1": "Qwen/Qwen2.5-Math-72B-Instruct",
    "answer-math-2": "Qwen/Qwen2.5-Math-7B-Instruct",
}

# (tool, backend) -> the "average latency" column of tools.json, seconds.
TOOLORCHESTRA_LATENCY_S: dict[tuple[str, str], float] = {
    ("enhance_reasoning", "gpt-5"): 31, ("enhance_reasoning", "gpt-5-mini"): 25,
    ("enhance_reasoning", "Qwen/Qwen2.5-Coder-32B-Instruct"): 9,
    ("answer", "gpt-5"): 96, ("answer", "gpt-5-mini"): 27, ("answer", "meta-llama/Llama-3.3-70B-Instruct"): 15,
    ("answer", "Qwen/Qwen3-32B"): 11, ("answer", "Qwen/Qwen2.5-Math-72B-Instruct"): 13,
    ("answer", "Qwen/Qwen2.5-Math-7B-Instruct"): 9,
    ("search", "gpt-5"): 22, ("search", "gpt-5-mini"): 16, ("search", "Qwen/Qwen3-32B"): 8,
}  # fmt: skip

# (tool, backend) -> the sentence tools.json says about the alias serving it; "{a}" is the alias.
TOOLORCHESTRA_BLURBS: dict[tuple[str, str], str] = {
    ("enhance_reasoning", "gpt-5"): "{a} demonstrates strong understanding and reasoning capabilities, which usually provides reliable insights.",
    ("enhance_reasoning", "gpt-5-mini"): "{a} can analyze some problems, but could hallucinate and make mistakes in difficult scenarios.",
    ("enhance_reasoning", "Qwen/Qwen2.5-Coder-32B-Instruct"): "{a} can reason over the context and reveal the logic.",
    ("answer", "gpt-5"): "{a} exhibits strong functional calling abilities and performs excellent in most domains (math, physics, social science, etc.).",
    ("answer", "gpt-5-mini"): "{a} presents reasonable solutions in some tasks, but could get stuck in complex reasoning and specific domain knowledge.",
    ("answer", "meta-llama/Llama-3.3-70B-Instruct"): "{a} could solve easy to medium tasks, but is not capable of tackling tasks with strong expertise and long-horizon planning.",
    ("answer", "Qwen/Qwen3-32B"): "{a} demonstrates basic capability: it can understand basic instructions, do simple steps, yet it sometimes misreads details, mixes concepts.",
    ("answer", "Qwen/Qwen2.5-Math-72B-Instruct"): "{a} can solve moderate (middle school) math problem, though it becomes incapable in more difficult tasks.",
    ("answer", "Qwen/Qwen2.5-Math-7B-Instruct"): "{a} can follow simple instructions and perform easy (primary-level) math problems, but struggle in more complex logic.",
    ("search", "gpt-5"): "{a} usually identifies the missing information and can write concise queries for effective search.",
    ("search", "gpt-5-mini"): "{a} can reason over the context and write queries to find the missing content for answering questions.",
    ("search", "Qwen/Qwen3-32B"): "{a} can also write queries to find information.",
}  # fmt: skip

_TOOL_TEXT = {
    "enhance_reasoning": (
        "tool to enhance answer model reasoning. analyze the problem, write code, execute it and return "
        "intermidiate results that will help solve the problem",
        "The model used to reason.",
        " ",
    ),
    "answer": (
        "give the final answer. Not allowed to call if documents is empty.",
        "The model used to answer.",
        " The table below shows the pricing and latency of each model:",
    ),
    "search": (
        "Search for missing information",
        "The model used to search for missing information.",
        " The table below shows the pricing and latency:",
    ),
}

_CODE_INSTRUCTION = (
    "Instead of directly answering the question, please write additional python code that will give intermidiate "
    "results after execution. Wrap the code within ```python and ```. The code should be self-contained with all "
    "the import and initialization."
)
_QUERY_INSTRUCTION = (
    "Instead of directly answering the question, please write a query to search for a piece of relevant and "
    "missing information. The query should be a few key words about the information to search or a short "
    "sentence. Wrap the query within <query> and </query>."
)
_BOXED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
_TAGGED_SUFFIX = (
    "\nWrap the thinking process and explanation between <think> and </think> and wrap only the exact answer "
    "without any explanation within <answer> and </answer>."
)


@dataclasses.dataclass(frozen=True)
class ToolOrchestraConfig:
    topk: int = 5
    max_doc_chars: int = 1000
    """Per-document cut in prompts and observations (ToolOrchestra: 1000 for open models)."""
    max_query_chars: int = 390
    sandbox_timeout_s: float = 60.0
    sandbox_limits: SandboxLimits = dataclasses.field(default_factory=SandboxLimits)
    max_output_chars: int = 4000
    """Cut of the code output shown back to the policy."""
    writer_max_tokens: int = 2048
    answer_max_tokens: int = 4096
    writer_temperature: float | None = None
    judge: JudgeConfig = dataclasses.field(
        default_factory=lambda: JudgeConfig(methods=("exact", "normalized"))
    )


def _money(x: float) -> str:
    return f"${x:g}"


def _description(
    tool: str,
    alias_map: Mapping[str, str],
    prices: PriceTable,
    latencies: Mapping[tuple[str, str], float],
    blurbs: Mapping[tuple[str, str], str],
) -> str:
    aliases = ALIASES[tool]
    _, intro, lead = _TOOL_TEXT[tool]
    sentences = [
        blurbs[(tool, alias_map[a])].format(a=a) for a in aliases if (tool, alias_map.get(a)) in blurbs
    ]
    rows = []
    for a in aliases:
        backend = alias_map.get(a)
        try:
            p = prices.price(backend) if backend and backend != PASSTHROUGH else None
        except PriceError:
            p = None
        price_in, price_out = (_money(p.input_per_million), _money(p.output_per_million)) if p else ("?", "?")
        latency = latencies.get((tool, backend))
        rows.append(f"{a} | {price_in} | {price_out} | {f'{latency:g}s' if latency is not None else '?'}")
    head = f"{intro} Choices: {list(aliases)}. " + " ".join(sentences)
    table = "Model | price per million input tokens | price per million output tokens | average latency\n"
    return head + lead + "\n" + table + "\n".join(rows)


def random_alias_map(
    seed: int | random.Random, pools: Mapping[str, Sequence[str]] | None = None
) -> dict[str, str]:
    """A per-task alias map: each tool's aliases get backends drawn from its pool (a permutation when the pool is
    large enough). The default pools are ToolOrchestra's own backends for each tool."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    out: dict[str, str] = {}
    for tool, aliases in ALIASES.items():
        pool = (
            list(pools[tool])
            if pools and tool in pools
            else sorted({TOOLORCHESTRA_ALIAS_MAP[a] for a in aliases})
        )
        if not pool:
            raise ValueError(f"alias pool for tool {tool!r} is empty")
        drawn = (
            rng.sample(pool, len(aliases))
            if len(pool) >= len(aliases)
            else [rng.choice(pool) for _ in aliases]
        )
        out.update(zip(aliases, drawn, strict=True))
    return out


def context_text(context: ToolContext, max_doc_chars: int) -> str:
    """ToolOrchestra's context: 'Documents:' with 'Doc i: …', then the code runs as ```python``` / ```output```."""
    docs = "".join(f"Doc {i + 1}: {d[:max_doc_chars]}\n\n" for i, d in enumerate(context.documents))
    code = "".join(f"```python\n{c}\n```\n\n```output\n{o}\n```\n\n" for c, o in context.code_runs)
    return ("Documents:\n" if docs else "") + docs + code


def _answer_style(backend: str) -> str:
    return "boxed" if "math" in backend.lower() or "qwen" in backend.lower() else "tagged"


def _reply_cost(reply: ChatReply, context: ToolContext) -> float:
    return context.prices.call_cost(reply.usage)


@dataclasses.dataclass(frozen=True)
class _Runtime:
    client: ChatClient | None
    retriever: Retriever | None
    config: ToolOrchestraConfig

    async def ask(
        self, backend: str, messages: list[dict[str, str]], max_tokens: int, temperature: float | None = None
    ) -> ChatReply:
        if self.client is None:
            return ChatReply("", Usage(backend, 0, 0), 0.0, "no model endpoints are configured")
        return await self.client.chat(backend, messages, max_tokens=max_tokens, temperature=temperature)

    async def search(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        backend = resolve_alias(arguments["model"], context, ALIASES["search"])
        if self.retriever is None:
            return error_result("search: no retriever is configured")
        usage: tuple[Usage, ...] = ()
        cost = 0.0
        query = context.question
        if backend != PASSTHROUGH:
            prompt = context_text(context, self.config.max_doc_chars).strip() + "\n\n"
            prompt += f"Question: {context.question}\n{_QUERY_INSTRUCTION}"
            reply = await self.ask(
                backend,
                [{"role": "user", "content": prompt}],
                self.config.writer_max_tokens,
                self.config.writer_temperature,
            )
            usage, cost = (reply.usage,), _reply_cost(reply, context)
            written = re.findall(r"<query>(.*?)</query>", reply.text, flags=re.DOTALL)
            if not reply.error and written and len(written[-1].strip()) >= 3:
                query = written[-1].strip()
        query = query[: self.config.max_query_chars]
        kind = getattr(self.retriever, "kind", "local")
        try:
            (hits,) = await self.retriever.retrieve([query], self.config.topk)
        except RetrievalError as e:
            return dataclasses.replace(error_result(str(e)), cost_usd=cost, usage=usage, backend=backend)
        cost += context.prices.cost(search_queries=1, search_kind=kind)
        start = len(context.documents) + 1
        observation = f"Query: {query}\n\n" + (
            format_documents(hits, self.config.max_doc_chars, start) if hits else "No documents found."
        )
        return ToolResult(
            observation=observation,
            cost_usd=cost,
            usage=usage,
            search_queries=1,
            documents=tuple(p.contents for p in hits),
            backend=backend,
        )

    async def enhance_reasoning(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        backend = resolve_alias(arguments["model"], context, ALIASES["enhance_reasoning"])
        prompt = context_text(context, self.config.max_doc_chars).strip() + "\n\n"
        prompt += f"Question: {context.question}\n{_CODE_INSTRUCTION}"
        reply = await self.ask(
            backend,
            [{"role": "user", "content": prompt}],
            self.config.writer_max_tokens,
            self.config.writer_temperature,
        )
        cost, usage = _reply_cost(reply, context), (reply.usage,)
        if reply.error:
            return dataclasses.replace(
                error_result(f"enhance_reasoning: {reply.error}"), cost_usd=cost, usage=usage, backend=backend
            )
        code = reply.text.split("```python")[-1].split("```")[0].strip() if "```python" in reply.text else ""
        if not code:
            return dataclasses.replace(
                error_result("enhance_reasoning: the code writer wrote no ```python block"),
                cost_usd=cost,
                usage=usage,
                backend=backend,
            )
        run = await asyncio.to_thread(
            run_python, code, timeout_s=self.config.sandbox_timeout_s, limits=self.config.sandbox_limits
        )
        output = run.stdout[: self.config.max_output_chars].rstrip("\n")
        if run.error:
            tail = run.stderr.strip().splitlines()[-1:] if run.stderr.strip() else []
            output += ("\n" if output else "") + f"Error: {run.error}" + (f"\n{tail[0]}" if tail else "")
        cost += context.prices.cost(sandbox_s=run.elapsed_s)
        observation = f"```python\n{code}\n```\n\n```output\n{output}\n```"
        return ToolResult(
            observation=observation,
            cost_usd=cost,
            usage=usage,
            error=run.error,
            sandbox_s=run.elapsed_s,
            code_runs=((code, output),),
            backend=backend,
        )

    async def answer(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        backend = resolve_alias(arguments["model"], context, ALIASES["answer"])
        prompt = (
            context_text(context, self.config.max_doc_chars).strip() + "\n\nProblem:\n" + context.question
        )
        if _answer_style(backend) == "boxed":
            messages = [{"role": "system", "content": _BOXED_SYSTEM}, {"role": "user", "content": prompt}]
        else:
            messages = [{"role": "user", "content": prompt + _TAGGED_SUFFIX}]
        reply = await self.ask(backend, messages, self.config.answer_max_tokens)
        cost, usage = _reply_cost(reply, context), (reply.usage,)
        if reply.error:
            return dataclasses.replace(
                error_result(f"answer: {reply.error}"), cost_usd=cost, usage=usage, backend=backend
            )
        prediction = extract_answer(reply.text)
        correct, judge_cost = None, 0.0
        if context.reference_answer is not None:
            verdict = await judge_answer(
                context.question,
                prediction,
                context.reference_answer,
                config=self.config.judge,
                client=self.client,
                prices=context.prices,
            )
            correct, judge_cost = verdict.correct, verdict.cost_usd
        return ToolResult(
            observation=f"Answer: {prediction}",
            cost_usd=cost,
            usage=usage,
            answer=prediction,
            correct=correct,
            judge_cost_usd=judge_cost,
            backend=backend,
        )


def toolorchestra_catalog(
    client: ChatClient | None,
    retriever: Retriever | None,
    *,
    alias_map: Mapping[str, str] | None = None,
    prices: PriceTable | None = None,
    latencies: Mapping[tuple[str, str], float] | None = None,
    blurbs: Mapping[tuple[str, str], str] | None = None,
    config: ToolOrchestraConfig | None = None,
) -> ToolCatalog:
    """The three tools, described for `alias_map` (ToolOrchestra's by default) with its prices and latencies."""
    alias_map = dict(TOOLORCHESTRA_ALIAS_MAP if alias_map is None else alias_map)
    missing = [a for aliases in ALIASES.values() for a in aliases if a not in alias_map]
    if missing:
        raise ValueError(f"alias map has no backend for {missing[0]!r}")
    prices = prices or default_price_table()
    latencies = TOOLORCHESTRA_LATENCY_S if latencies is None else latencies
    blurbs = TOOLORCHESTRA_BLURBS if blurbs is None else blurbs
    runtime = _Runtime(client, retriever, config or ToolOrchestraConfig())
    tools = []
    for name in ("enhance_reasoning", "answer", "search"):
        parameters = {
            "properties": {
                "model": {
                    "description": _description(name, alias_map, prices, latencies, blurbs),
                    "type": "string",
                }
            },
            "required": ["model"],
            "title": "parameters",
            "type": "object",
        }
        tools.append(Tool(name, _TOOL_TEXT[name][0], parameters, getattr(runtime, name)))
    return ToolCatalog(tuple(tools), alias_map)
