"""τ²-bench adapter: tau2's domain tools in-process, an OpenAI-compatible user simulator, tau2's own evaluator.

The policy gets the domain tools minus `transfer_to_human_agents`, plus `call_expert(expert-1..3)` when an
expert endpoint is configured (ToolOrchestra's tau2 setting). A tau2 task plays as a dialogue in the episode
loop: the policy's tool calls go through the tool catalog into the session's environment; its plain-text turns
go to the user simulator, whose replies come back as user turns; tau2's evaluator on the session's message log
is the grader (correct = reward > 0).

`replay_gold_actions(domain, task)` drives that same loop with a scripted policy that emits each gold action as
a `<tool_call>`, and a scripted user that performs the user-side gold actions (telecom's phone) and ends the
call, then returns tau2's reward. The replay offers every domain tool by default: 20 of telecom's 114 tasks are
solved only by `transfer_to_human_agents` (their reward checks that action), so under ToolOrchestra's tool set
(`hidden_tools=HIDDEN_TOOLS`, which skips those gold calls) they score 0 by construction.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestra_jax.env.catalog import Tool, ToolCatalog, ToolContext, ToolResult
from orchestra_jax.env.episode import EpisodeSetup, run_episode
from orchestra_jax.env.llm_tools import make_expert_tool
from orchestra_jax.env.preferences import Preference
from orchestra_jax.env.scripted import ScriptedEngine
from orchestra_jax.env.tau2_session import (  # noqa: F401  (re-exported: the adapter's public names)
    AGENT_INSTRUCTION,
    DOMAINS,
    EXPERT_ALIASES,
    GREETING,
    HIDDEN_TOOLS,
    STOP_SIGNALS,
    Tau2Error,
    Tau2Session,
    ToolOutcome,
    check_domain,
    communicate_info,
    get_task,
    gold_actions,
    load_tasks,
    opening_user_message,
    tau2_modules,
    tool_call_text,
)
from orchestra_jax.env.trajectory import EpisodeConfig, Task, parse_request_id
from orchestra_jax.models.tool_parser import parse_tool_calls

# ------------------------------------------------------------------------------------ tools for the policy


def session_catalog(
    session: Tau2Session, expert_client: Any | None = None, expert_aliases: Mapping[str, str] | None = None
) -> ToolCatalog:
    """The policy's tools: the domain tools (minus the hidden ones) and, given a chat client, call_expert.

    Each domain tool runs `session.call_tool` on a worker thread (tau2 tools are synchronous and touch the
    database), so concurrent episodes never block the event loop.
    """
    tools = [_domain_tool(session, schema["function"]) for schema in session.domain_tool_schemas()]
    alias_map: dict[str, str] = {}
    if expert_client is not None:
        tools.append(
            make_expert_tool(
                expert_client,
                aliases=EXPERT_ALIASES,
                system_prompt=session.system_prompt(),
                description="Ask an expert model for advice on what to do next.",
            )
        )
        alias_map = dict(expert_aliases or {alias: alias for alias in EXPERT_ALIASES})
    return ToolCatalog(tuple(tools), alias_map)


def _domain_tool(session: Tau2Session, function: Mapping[str, Any]) -> Tool:
    name = function["name"]

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        outcome = await asyncio.to_thread(session.call_tool, name, arguments, "assistant")
        return ToolResult(observation=outcome.content)

    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return Tool(
        name=name, description=function.get("description", ""), parameters=parameters, execute=execute
    )


def run_user_calls(session: Tau2Session, text: str) -> list[str]:
    """Execute the `<tool_call>`s in a user-simulator message as user tools; returns observations or errors."""
    parsed = parse_tool_calls(text)
    out = [f"Error: {e}" for e in parsed.errors]
    for call in parsed.calls:
        try:
            out.append(session.call_tool(call.name, call.arguments, requestor="user").content)
        except Tau2Error as e:
            out.append(f"Error: {e}")
    return out


# ------------------------------------------------------------------------------------------ user simulator


USER_TOOL_FORMAT = (
    "\n\nTo use one of your tools, reply with only one or more calls of the form\n"
    '<tool_call>\n{"name": <tool name>, "arguments": <arguments object>}\n</tool_call>\n'
    "Your tools:\n"
)


@dataclass
class Tau2User:
    """tau2's user simulator over any OpenAI-compatible chat endpoint (`ChatClient` backend name).

    It plays the task's user scenario with tau2's own guidelines. Tools (telecom's phone) are offered as
    Qwen3-style `<tool_call>` text, so the endpoint needs no function-calling support. Its tokens are the
    environment's, not the policy's: they are not booked in the episode's ledger.
    """

    session: Tau2Session
    client: Any
    backend: str
    max_tool_rounds: int = 8

    def system_prompt(self) -> str:
        t = tau2_modules()
        tools = self.session.user_tool_schemas()
        prompt = t.user_system_prompt.format(
            global_user_sim_guidelines=t.user_guidelines(use_tools=bool(tools)),
            instructions=self.session.task.user_scenario.instructions,
        )
        if tools:
            prompt += USER_TOOL_FORMAT + "\n".join(
                json.dumps(s["function"], ensure_ascii=False) for s in tools
            )
        return prompt

    def messages(self, scratch: Sequence[str]) -> list[dict[str, str]]:
        """The conversation from the user's side: agent text is 'user', the simulator's own turns 'assistant'."""
        t = tau2_modules()
        out = [{"role": "system", "content": self.system_prompt()}]
        for m in self.session.messages:
            if isinstance(m, t.message.AssistantMessage) and m.has_text_content():
                out.append({"role": "user", "content": m.content})
            elif isinstance(m, t.message.UserMessage) and m.is_tool_call():
                calls = "\n".join(tool_call_text(c.name, c.arguments) for c in m.tool_calls)
                out.append({"role": "assistant", "content": calls})
            elif isinstance(m, t.message.UserMessage) and m.has_text_content():
                out.append({"role": "assistant", "content": m.content})
            elif isinstance(m, t.message.ToolMessage) and m.requestor == "user":
                out.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
        out += [{"role": "user", "content": note} for note in scratch]
        return out

    async def open(self) -> str:
        """The user's first message (the agent's greeting is already in the log)."""
        text = await self.turn()
        if text is None:
            raise Tau2Error(f"tau2 user simulator ended task {self.session.task.id} before saying anything")
        return text

    async def reply(self, agent_text: str) -> str | None:
        self.session.agent_says(agent_text)
        return await self.turn()

    async def turn(self) -> str | None:
        scratch: list[str] = []
        for _ in range(self.max_tool_rounds):
            reply = await self.client.chat(self.backend, self.messages(scratch))
            if reply.error:
                raise Tau2Error(f"tau2 user simulator: {reply.error}")
            parsed = parse_tool_calls(reply.text)
            if parsed.calls or parsed.errors:
                scratch = [
                    o
                    for o in await asyncio.to_thread(run_user_calls, self.session, reply.text)
                    if o.startswith("Error:")
                ]
                continue
            text = parsed.content.strip() or STOP_SIGNALS[0]
            self.session.user_says(text)
            return None if self.session.finished else text
        self.session.user_says(STOP_SIGNALS[0])
        return None


# -------------------------------------------------------------------------------------------- episodes


@functools.cache
def system_prompt(domain: str) -> str:
    """tau2's agent instructions and the domain policy (the same for every task of a domain)."""
    check_domain(domain)
    policy = tau2_modules().registry.get_env_constructor(domain)().get_policy()
    return f"<instructions>\n{AGENT_INSTRUCTION}\n</instructions>\n<policy>\n{policy}\n</policy>"


def to_task(domain: str, tau2_task: Any, preference: Preference | None = None) -> Task:
    """A tau2 task as an episode `Task`: the question comes from the user simulator's opening turn."""
    return Task(
        id=f"tau2-{domain}-{tau2_task.id}",
        question="",
        answer=None,
        preference=preference or Preference(),
        metadata={"domain": domain, "tau2_task": tau2_task, "system_prompt": system_prompt(domain)},
    )


def episode_setup(
    user_client: Any,
    user_backend: str,
    expert_client: Any | None = None,
    expert_aliases: Mapping[str, str] | None = None,
    hidden_tools: frozenset[str] = HIDDEN_TOOLS,
):
    """`run_episodes(setup=...)` for tau2 tasks: a fresh session, its tools, a user simulator and tau2's grader.

    `hidden_tools` defaults to ToolOrchestra's setting (no transfer_to_human_agents); pass frozenset() to offer
    every domain tool, as tau2-bench itself does.
    """

    async def setup(task: Task, rollout: int) -> EpisodeSetup:
        domain, tau2_task = task.metadata["domain"], task.metadata["tau2_task"]
        session = await asyncio.to_thread(Tau2Session, domain, tau2_task, frozenset(hidden_tools))
        return EpisodeSetup(
            catalog=session_catalog(session, expert_client, expert_aliases),
            user=Tau2User(session, user_client, user_backend),
            grader=_grader(session),
        )

    return setup


def tools_file_setup(client: Any, user_backend: str, alias_map: Mapping[str, str] | None):
    """`episode_setup` offering call_expert for the expert aliases (expert-1..3) that `alias_map` defines."""
    experts = {a: alias_map[a] for a in EXPERT_ALIASES if alias_map and a in alias_map}
    return episode_setup(client, user_backend, client if experts else None, experts or None)


def _grader(session: Tau2Session):
    async def grade(answer: str | None) -> bool:
        return await asyncio.to_thread(session.reward) > 0

    return grade


# ---------------------------------------------------------------------------------------------- replay


@dataclass
class _ScriptedUser:
    """Opens with the scenario's reason for calling, performs each batch of user-side gold actions when the
    agent asks, then ends the call."""

    session: Tau2Session
    batches: list[list[Any]]

    async def open(self) -> str:
        text = opening_user_message(self.session.task)
        self.session.user_says(text)
        return text

    async def reply(self, agent_text: str) -> str | None:
        self.session.agent_says(agent_text)
        if not self.batches:
            self.session.user_says(STOP_SIGNALS[0])
            return None
        calls = "".join(tool_call_text(a.name, a.arguments) for a in self.batches.pop(0))
        errors = [
            o for o in await asyncio.to_thread(run_user_calls, self.session, calls) if o.startswith("Error:")
        ]
        text = "Done." if not errors else "I could not: " + "; ".join(errors)
        self.session.user_says(text)
        return text


def _replay_script(task: Any, hidden_tools: frozenset[str]) -> tuple[list[str], list[list[Any]]]:
    """The scripted policy's turns (gold agent calls, requests to the user, the info to communicate) and the
    user's batches of gold actions, in the gold order."""
    turns: list[str] = []
    batches: list[list[Any]] = []
    for action in gold_actions(task):
        if action.requestor == "assistant" and action.name in hidden_tools:
            continue
        if action.requestor == "assistant":
            turns.append(tool_call_text(action.name, action.arguments))
        elif batches and turns and turns[-1].startswith("Please"):
            batches[-1].append(action)
            turns[-1] += f", then {action.name}"
        else:
            batches.append([action])
            turns.append(f"Please do this on your phone: {action.name}")
    turns.append("\n".join(communicate_info(task)) or "Is there anything else I can help with?")
    return turns, batches


@functools.cache
def _replay_tokenizer():
    from orchestra_jax.models.tokenizer import train_small_tokenizer

    return train_small_tokenizer(["<tool_call> arguments name user_id reservation order"], 400)


async def replay_gold_actions_async(
    domain: str, task: Any, *, hidden_tools: frozenset[str] = frozenset()
) -> float:
    check_domain(domain)
    session = await asyncio.to_thread(Tau2Session, domain, task, frozenset(hidden_tools))
    turns, batches = _replay_script(task, session.hidden_tools)
    tokenizer = _replay_tokenizer()

    def script(prompt_ids: tuple[int, ...], rid: str) -> str:
        return turns[parse_request_id(rid)[3]]

    config = EpisodeConfig(
        max_turns=len(turns),
        max_new_tokens=4096,
        max_context=1 << 20,
        temperature=0.0,
        system_prompt=system_prompt(domain),
    )
    trajectory = await run_episode(
        ScriptedEngine(tokenizer, script, weight_version="gold"),
        tokenizer,
        session_catalog(session),
        to_task(domain, task),
        config,
        user=_ScriptedUser(session, batches),
        grader=_grader(session),
    )
    if trajectory.error is not None:
        raise Tau2Error(f"tau2 {domain} task {task.id}: replay failed: {trajectory.error}")
    return await asyncio.to_thread(session.reward)


def replay_gold_actions(domain: str, task: Any, *, hidden_tools: frozenset[str] = frozenset()) -> float:
    """tau2's reward for a conversation in which every gold action is sent as a policy (or user) tool call."""
    return asyncio.run(replay_gold_actions_async(domain, task, hidden_tools=hidden_tools))
