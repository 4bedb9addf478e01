"""The seed table's rows as toolsets of one harness: the same episodes, judge and ledger, different tools.

- `none`: a model answers alone (ToolOrchestra's monolithic-LLM rows); its reply text is the answer.
- `basic`: the model may search the corpus and run Python (the "basic tools" rows); it answers in text.
- `orchestrator`: ToolOrchestra's full tool set (search, enhance_reasoning, answer, each over priced model
  aliases) with its system prompt and context-mode prompts: an untrained model here is the prompted-orchestrator
  row, a trained checkpoint the Orchestrator row.
- `cpu`: the CPU task family's tools (python, search, expert, answer), for checkpoints trained on that family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.catalog import ToolCatalog
from orchestra_jax.env.llm_tools import ChatClient
from orchestra_jax.env.prices import PriceTable
from orchestra_jax.env.search import Retriever, make_search_tool
from orchestra_jax.env.toolorchestra_tools import toolorchestra_catalog
from orchestra_jax.env.trajectory import PromptMode

TOOLSETS = ("none", "basic", "orchestrator", "cpu")

NO_TOOLS_PROMPT = (
    "Answer the question. Reason briefly, then give only the final answer within <answer> and </answer>."
)
BASIC_PROMPT = (
    "You can search a document collection and run Python code with the tools. When you know the answer, reply "
    "without a tool call and give only the final answer within <answer> and </answer>."
)
ORCHESTRATOR_PROMPT = "You are good at using tools."
"""ToolOrchestra's orchestrator system prompt (evaluation/eval_hle.py)."""


class ToolsetError(ValueError):
    """A toolset that cannot be built from what was given (say, search without a retriever)."""


@dataclasses.dataclass(frozen=True)
class Toolset:
    name: str
    catalog: ToolCatalog
    system_prompt: str
    mode: PromptMode = "history"


def no_tools() -> Toolset:
    return Toolset("none", ToolCatalog(()), NO_TOOLS_PROMPT)


def basic_tools(retriever: Retriever | None, *, topk: int = 5, sandbox_timeout_s: float = 10.0) -> Toolset:
    """Search (when a retriever is given) and a sandboxed Python interpreter."""
    tools = [make_search_tool(retriever, topk=topk)] if retriever is not None else []
    tools.append(tasks_cpu.make_python_tool(sandbox_timeout_s, max_output_chars=2000))
    return Toolset("basic", ToolCatalog(tuple(tools)), BASIC_PROMPT)


def orchestrator_tools(
    client: ChatClient | None,
    retriever: Retriever | None,
    *,
    alias_map: Mapping[str, str] | None = None,
    prices: PriceTable | None = None,
) -> Toolset:
    catalog = toolorchestra_catalog(client, retriever, alias_map=alias_map, prices=prices)
    return Toolset("orchestrator", catalog, ORCHESTRATOR_PROMPT, mode="context")


def cpu_tools(world: tasks_cpu.World, expert_coverage: float = 1.0) -> Toolset:
    return Toolset("cpu", tasks_cpu.cpu_catalog(world, expert_coverage=expert_coverage), tasks_cpu.SYSTEM_PROMPT)


def build_toolset(
    name: str,
    *,
    client: ChatClient | None = None,
    retriever: Retriever | None = None,
    alias_map: Mapping[str, str] | None = None,
    prices: PriceTable | None = None,
    world: tasks_cpu.World | None = None,
    expert_coverage: float = 1.0,
) -> Toolset:
    """`world` and `expert_coverage` (the CPU family's expert) apply to the 'cpu' toolset only."""
    if name == "none":
        return no_tools()
    if name == "basic":
        return basic_tools(retriever)
    if name == "orchestrator":
        if client is None:
            raise ToolsetError("toolset 'orchestrator' needs model endpoints: pass --tools FILE with 'endpoints'")
        try:
            return orchestrator_tools(client, retriever, alias_map=alias_map, prices=prices)
        except ValueError as e:
            raise ToolsetError(f"toolset 'orchestrator': {e}") from None
    if name == "cpu":
        return cpu_tools(world or tasks_cpu.make_world(0), expert_coverage)
    raise ToolsetError(f"unknown toolset {name!r} (choose from {', '.join(TOOLSETS)})")
