"""The episode loop: prompt → generate → parse tool calls → execute → tool responses → … → answer.

Token in, token out: the policy's sampled ids go into the episode verbatim (`ChatTokens`), tool responses and
user turns are rendered by the chat template and appended with loss mask 0, and generated text is never
re-tokenised. Every failure a policy or a tool can cause (bad JSON, unknown tool, bad arguments, too many
calls, a tool that raises or overruns, an engine that refuses the request) becomes an error observation or an
early finish recorded in the trajectory: no single episode can fail a batch (`run_episodes`).

Cost and latency (DESIGN.md §4): the orchestrator's own tokens are priced like any model call; each tool call
adds its priced cost; a turn's tool latency is the wall-clock of its calls, which run concurrently, so the
slowest call counts. The policy's generation time is booked apart as `policy_latency_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from orchestra_jax.env.catalog import ToolCallError, ToolCatalog, ToolContext, ToolResult, validate_arguments
from orchestra_jax.env.judge import JudgeConfig, judge_answer
from orchestra_jax.env.ledger import Ledger
from orchestra_jax.env.preferences import render_instruction
from orchestra_jax.env.prices import ModelPrice, PriceTable, Usage, default_price_table
from orchestra_jax.env.tool_pool import ToolPool
from orchestra_jax.env.trajectory import EpisodeConfig, Sample, Task, Trajectory, Turn, request_id
from orchestra_jax.models.chat_template import ChatTokens
from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.models.tool_parser import parse_tool_calls
from orchestra_jax.rollout.engine import GenerateRequest, RolloutEngine, SamplingParams

Grader = Callable[[str | None], Awaitable[bool]]



def system_message(system_prompt: str, preference: Any) -> dict[str, str]:
    """The system turn of every episode: the instructions, then the user's preference."""
    return {"role": "system", "content": f"{system_prompt}\n\n{render_instruction(preference)}"}

class UserSimulator(Protocol):
    """The other side of a dialogue (tau2): `reply` answers the agent's text; None means the user is done.

    A user may also have `async open() -> str`, the first user message, asked for when the task's question
    is empty.
    """

    async def reply(self, agent_text: str) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class EpisodeSetup:
    """Per-episode pieces that depend on the task (a tau2 conversation has its own tools, user and grader)."""

    catalog: ToolCatalog
    user: UserSimulator | None = None
    grader: Grader | None = None


def policy_prices(prices: PriceTable | None, config: EpisodeConfig) -> PriceTable:
    """The price table with the orchestrator's own entry added when it lacks one."""
    prices = prices if prices is not None else default_price_table()
    if config.policy_model in prices.models:
        return prices
    return prices.with_models(
        {config.policy_model: ModelPrice(config.policy_price_in, config.policy_price_out)}
    )


def offered_catalog(catalog: ToolCatalog, task: Task) -> ToolCatalog:
    if not task.tools:
        return catalog
    missing = [name for name in task.tools if catalog.get(name) is None]
    if missing:
        raise ValueError(f"task {task.id}: tool {missing[0]!r} is not in the catalog {list(catalog.names)}")
    return catalog.without(*[name for name in catalog.names if name not in task.tools])


def _seed(config: EpisodeConfig, rid: str) -> int | None:
    if config.seed is None:
        return None
    digest = hashlib.sha256(f"{config.seed}/{rid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _one_line(text: Any, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " ...(truncated)"


def context_prompt(
    task: Task, documents: Sequence[str], code_runs: Sequence[tuple[str, str]], notes: Sequence[str]
) -> str:
    """ToolOrchestra's context-mode user message: the problem plus everything gathered so far."""
    parts = [f"Problem: {task.question}"]
    if documents:
        parts.append("Documents:\n" + "\n".join(f"Doc {i + 1}: {d}" for i, d in enumerate(documents)))
    if code_runs:
        parts.append("Code results:\n" + "\n".join(f"```python\n{c}\n```\nOutput: {o}" for c, o in code_runs))
    if notes:
        parts.append("Notes:\n" + "\n".join(notes))
    return "\n\n".join(parts)


class _Episode:
    """The mutable state of one running episode; `run_episode` turns it into a frozen Trajectory."""

    def __init__(
        self, engine, tokenizer, catalog, task, config, group_id, rollout, prices, user, grader, pool
    ):
        self.engine: RolloutEngine = engine
        self.tokenizer: Tokenizer = tokenizer
        self.catalog: ToolCatalog = catalog
        self.task: Task = task
        self.config: EpisodeConfig = config
        self.group_id, self.rollout = group_id, rollout
        self.prices: PriceTable = prices
        self.user: UserSimulator | None = user
        self.grader: Grader | None = grader
        self.pool: ToolPool = pool
        self.ledger = Ledger()
        self.samples: list[Sample] = []
        self.turns: list[Turn] = []
        self.malformed: list[bool] = []
        self.versions: list[str] = []
        self.documents: list[str] = []
        self.code_runs: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.answer: str | None = None
        self.correct: bool | None = None
        self.finish = "max_turns"
        self.error: str | None = None
        self.chat = ChatTokens(tokenizer, family=config.family)
        self.spans: list[tuple[int, int]] = []
        self.span_turns: list[int] = []
        self.eos_ids = tuple(tokenizer.eos_token_ids)

    def system_message(self) -> dict[str, str]:
        return system_message(self.task.metadata.get("system_prompt", self.config.system_prompt), self.task.preference)

    async def start_history(self) -> None:
        question = self.task.question
        if not question and self.user is not None and hasattr(self.user, "open"):
            question = await self.user.open()  # a dialogue task: the user speaks first (tau2)
        messages = [self.system_message(), {"role": "user", "content": question}]
        self.chat.start(messages, self.catalog.schemas() or None, self.config.enable_thinking)

    def start_context_turn(self) -> None:
        user = context_prompt(self.task, self.documents, self.code_runs, self.notes)
        self.chat = ChatTokens(self.tokenizer, family=self.config.family)
        self.chat.start(
            [self.system_message(), {"role": "user", "content": user}],
            self.catalog.schemas() or None,
            self.config.enable_thinking,
        )

    def close_sample(self) -> None:
        if any(self.chat.loss_mask):
            self.samples.append(
                Sample(
                    tuple(self.chat.token_ids),
                    tuple(self.chat.loss_mask),
                    tuple(self.chat.logprobs),
                    self.versions[-1],
                    tuple(self.spans),
                    tuple(self.span_turns),
                )
            )
        self.spans, self.span_turns = [], []

    async def generate(self, turn: int):
        prompt = tuple(self.chat.token_ids)
        room = self.config.max_context - len(prompt)
        if room < 2:
            self.finish = "context_full"
            return None
        rid = request_id(self.task.id, self.group_id, self.rollout, turn)
        sampling = SamplingParams(
            max_new_tokens=min(self.config.max_new_tokens, room - 1),
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            top_k=self.config.top_k,
            min_p=self.config.min_p,
            stop_token_ids=self.eos_ids,
            seed=_seed(self.config, rid),
        )
        try:
            (completion,) = await self.engine.generate([GenerateRequest(prompt, sampling, rid)])
        except Exception as e:  # an engine refusal or crash ends this episode, not the batch
            self.finish, self.error = "engine_error", f"engine: {type(e).__name__}: {_one_line(e)}"
            return None
        self.versions.append(completion.weight_version)
        usage = Usage(self.config.policy_model, completion.prompt_tokens, completion.completion_tokens)
        self.ledger = self.ledger.charge(self.prices, usage=[usage], policy_latency_s=completion.latency_s)
        start = len(self.chat.token_ids)
        self.chat.append_generated(completion.output_ids, completion.logprobs)
        self.spans.append((start, start + len(completion.output_ids)))
        self.span_turns.append(turn)
        ids = [i for i in completion.output_ids if i not in self.eos_ids]
        return self.tokenizer.decode(ids)

    def tool_context(self) -> ToolContext:
        return ToolContext(
            task_id=self.task.id,
            question=self.task.question,
            reference_answer=self.task.answer,
            documents=tuple(self.documents),
            code_runs=tuple(self.code_runs),
            alias_map=dict(self.task.metadata.get("alias_map", {})),
            prices=self.prices,
            metadata=self.task.metadata,
        )

    async def execute(self, calls) -> tuple[list[ToolResult], list[str]]:
        """Run the well-formed calls concurrently; return results and the calls' format errors."""
        errors: list[str] = []
        runnable = []
        for call in calls:
            tool = self.catalog.get(call.name)
            try:
                if tool is None:
                    raise ToolCallError(
                        f"unknown tool {call.name!r:.60}; available: {list(self.catalog.names)}"
                    )
                validate_arguments(call.arguments, tool.parameters)
                runnable.append(call)
            except ToolCallError as e:
                errors.append(f"{call.name}: {e}" if tool is not None else str(e))
        context = self.tool_context()
        results = await asyncio.gather(
            *(self.pool.run(self.catalog.execute(c.name, c.arguments, context)) for c in runnable)
        )
        for call, result in zip(runnable, results, strict=True):
            self.ledger = self.ledger.add(
                cost_usd=result.cost_usd,
                usage=result.usage,
                tool=call.name,
                sandbox_s=result.sandbox_s,
                search_queries=result.search_queries,
                judge_cost_usd=result.judge_cost_usd,
            )
            self.documents.extend(result.documents)
            self.code_runs.extend(result.code_runs)
            if not result.documents and not result.code_runs and result.answer is None:
                self.notes.append(
                    f"{call.name}: {_clip(result.observation, self.config.max_observation_chars)}"
                )
        if results:
            self.ledger = self.ledger.add(tool_latency_s=max(r.latency_s or 0.0 for r in results))
        return list(results), errors

    async def play(self) -> None:
        history = self.config.mode == "history"
        if history:
            await self.start_history()
        for turn in range(self.config.max_turns):
            if not history:
                self.start_context_turn()
            text = await self.generate(turn)
            if text is None:
                break
            parsed = parse_tool_calls(text)
            calls = list(parsed.calls)
            errors = list(parsed.errors)
            if len(calls) > self.config.max_calls_per_turn:
                errors.append(f"too many tool calls ({len(calls)} > {self.config.max_calls_per_turn})")
                calls = calls[: self.config.max_calls_per_turn]
            results, call_errors = await self.execute(calls)
            errors += call_errors
            observations = [_clip(r.observation, self.config.max_observation_chars) for r in results]
            if errors:
                observations.append("Error: " + "; ".join(errors))
            self.malformed.append(bool(errors))
            calls_made = tuple((c.name, c.arguments) for c in calls)
            if not history:
                self.close_sample()
                self.notes.extend(o for o in observations[len(results) :])
            answered = next((r for r in results if r.answer is not None), None)
            if answered is not None:
                self.answer, self.correct, self.finish = answered.answer, answered.correct, "answer"
                self.turns.append(Turn(text, calls_made, tuple(observations), tuple(errors)))
                break
            if not calls and not errors:
                reply = await self.user.reply(parsed.content) if self.user is not None else None
                self.turns.append(Turn(text, (), (), (), reply))
                if self.user is None:
                    self.answer, self.finish = parsed.content.strip(), "final_text"
                    break
                if reply is None:
                    self.finish = "user_stop"
                    break
                if history and turn + 1 < self.config.max_turns:
                    self.chat.append_user(reply)
                continue
            self.turns.append(Turn(text, calls_made, tuple(observations), tuple(errors)))
            if history and turn + 1 < self.config.max_turns:
                self.chat.append_tool_responses(observations)
        if history:
            self.close_sample()

    async def grade(self) -> bool:
        if self.correct is not None:
            return bool(self.correct)
        if self.grader is not None:
            return bool(await self.grader(self.answer))
        if self.answer is None or self.task.answer is None:
            return False
        verdict = await judge_answer(
            self.task.question,
            self.answer,
            self.task.answer,
            config=JudgeConfig(methods=("exact", "normalized")),
        )
        return verdict.correct

    def trajectory(self, correct: bool) -> Trajectory:
        names = self.catalog.names
        return Trajectory(
            task_id=self.task.id,
            group_id=self.group_id,
            samples=tuple(self.samples),
            weight_version=self.versions[0] if self.versions else getattr(self.engine, "weight_version", ""),
            ledger=self.ledger,
            correct=correct,
            answer=self.answer,
            tool_counts={name: self.ledger.tool_calls.get(name, 0) for name in names},
            turns=tuple(self.turns),
            format_errors=sum(self.malformed),
            malformed_turns=tuple(self.malformed),
            preference=tuple(float(x) for x in self.task.preference.vector(names)),
            tool_names=names,
            finish_reason=self.finish,
            error=self.error,
            weight_versions=tuple(self.versions),
        )


async def run_episode(
    engine: RolloutEngine,
    tokenizer: Tokenizer,
    catalog: ToolCatalog,
    task: Task,
    config: EpisodeConfig,
    *,
    group_id: int = 0,
    rollout: int = 0,
    prices: PriceTable | None = None,
    user: UserSimulator | None = None,
    grader: Grader | None = None,
    pool: ToolPool | None = None,
) -> Trajectory:
    """Play one episode of `task`; never raises for anything the policy, a tool, the user or the engine does."""
    if config.mode == "context" and user is not None:
        raise ValueError(
            "context mode rebuilds a single-question prompt each turn; a user dialogue needs history"
        )
    episode = _Episode(
        engine,
        tokenizer,
        offered_catalog(catalog, task),
        task,
        config,
        group_id,
        rollout,
        policy_prices(prices, config),
        user,
        grader,
        pool or ToolPool(),
    )
    try:
        await episode.play()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug or a template error must not take the batch down
        episode.finish, episode.error = "engine_error", f"episode: {type(e).__name__}: {_one_line(e)}"
    try:
        correct = await episode.grade() if episode.error is None else False
    except Exception as e:
        correct, episode.error = False, f"grader: {type(e).__name__}: {_one_line(e)}"
    return episode.trajectory(correct)


async def run_episodes(
    engine: RolloutEngine,
    tokenizer: Tokenizer,
    catalog: ToolCatalog,
    tasks: Sequence[Task],
    config: EpisodeConfig,
    *,
    group_size: int = 1,
    concurrency: int = 64,
    prices: PriceTable | None = None,
    pool: ToolPool | None = None,
    setup: Callable[[Task, int], EpisodeSetup | Awaitable[EpisodeSetup]] | None = None,
) -> list[Trajectory]:
    """`group_size` rollouts of each task, at most `concurrency` in flight; ordered task-major.

    Task i's rollouts carry group_id i. `setup(task, rollout)` (plain or async) gives per-episode tools, user
    and grader (tau2); without it every episode uses `catalog` and the reference-answer judge. A setup that
    fails becomes that episode's error, like any other failure.
    """
    if concurrency < 1 or group_size < 1:
        raise ValueError(f"run_episodes: concurrency={concurrency} and group_size={group_size} must be >= 1")
    gate = asyncio.Semaphore(concurrency)
    pool = pool or ToolPool()

    async def one(group_id: int, task: Task, rollout: int) -> Trajectory:
        async with gate:
            try:
                parts = setup(task, rollout) if setup is not None else EpisodeSetup(catalog)
                parts = await parts if inspect.isawaitable(parts) else parts
            except Exception as e:
                return await run_episode(
                    _FailingEngine(f"episode setup: {type(e).__name__}: {_one_line(e)}"),
                    tokenizer,
                    catalog,
                    task,
                    config,
                    group_id=group_id,
                    rollout=rollout,
                    prices=prices,
                    pool=pool,
                )
            return await run_episode(
                engine,
                tokenizer,
                parts.catalog,
                task,
                config,
                group_id=group_id,
                rollout=rollout,
                prices=prices,
                user=parts.user,
                grader=parts.grader,
                pool=pool,
            )

    jobs = [one(g, task, r) for g, task in enumerate(tasks) for r in range(group_size)]
    return list(await asyncio.gather(*jobs))


class _FailingEngine:
    """Stands in for an episode whose setup failed, so the failure is recorded like an engine error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.weight_version = ""

    async def generate(self, requests):
        raise RuntimeError(self.reason)

    async def update_weights(self, params: Any, version: str) -> None:
        return None

    async def health(self) -> bool:
        return False
