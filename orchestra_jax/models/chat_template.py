"""Chat templates (Qwen3, SmolLM2) rendered exactly as transformers renders them, and token-exact episode building.

`render` runs the models' own template files (package data) in a transformers-compatible jinja environment:
trim_blocks, lstrip_blocks, and `tojson` = json.dumps(ensure_ascii=False), which keeps key order and does not
HTML-escape (jinja2's own `tojson` does both, and changes the rendered tools and arguments).

`ChatTokens` builds an episode token by token: the prompt ids, then the generated ids exactly as sampled, then
the tool responses and the next generation prompt. It never re-tokenises what the model produced. For a single
user query followed by tool calls (the orchestration episodes, thinking on) its ids equal the tokenisation of
rendering the whole conversation. Qwen3's template rewrites history in two cases, and there the episode keeps
what the model actually saw: it drops the `<think>` block of assistant turns before the last user query, and it
drops the empty `<think>\\n\\n</think>\\n\\n` of earlier assistant turns (thinking off, or an empty think).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestra_jax.models.tokenizer import Tokenizer

FAMILIES = ("qwen3", "smollm2")
ROLES = ("system", "user", "assistant", "tool")
END_OF_TURN = "<|im_end|>"  # both families are ChatML: a turn closes with <|im_end|> then "\n"

# The Qwen3 template's tool preamble; SmolLM2 (whose own template knows no tools) gets the same system text, so
# one parser and one episode loop serve both families. A test checks it against the Qwen3 rendering.
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


class ChatTemplateError(ValueError):
    """Messages or tools that the chat template cannot render."""


def family_of(model_family: str) -> str:
    """The chat template a checkpoint speaks, from its model family: SmolLM2's for llama models, else Qwen3's."""
    return "smollm2" if model_family == "llama" else "qwen3"


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    family: str = "qwen3",
) -> str:
    """Render an OpenAI-shaped conversation with the family's official chat template."""
    _check_family(family)
    messages = _validate_messages(messages)
    tools = _validate_tools(tools)
    if family == "smollm2":
        messages, tools = _smollm2_messages(messages, tools), None
    try:
        return _template(family).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
    except (jinja2.TemplateError, TypeError) as exc:
        raise ChatTemplateError(f"{family} chat template: {exc}") from None


def tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` filter: key order kept, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTokens:
    """Incremental, token-exact builder of one episode's ids, loss mask and behaviour log-probs.

    The loss mask is 1 exactly on ids the policy sampled (its closing `<|im_end|>` included) and 0 on prompts,
    tool responses, and the `<|im_end|>\\n` the builder adds to close a turn the policy did not close itself.
    `messages` keeps a readable transcript whose rendering reproduces `token_ids` in the verbatim cases.
    """

    def __init__(self, tokenizer: Tokenizer, family: str = "qwen3") -> None:
        _check_family(family)
        self.tokenizer = tokenizer
        self.family = family
        self.enable_thinking = True
        self.tools: list[dict] | None = None
        self.messages: list[dict] = []
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self._end_of_turn_id = tokenizer.token_id(END_OF_TURN)
        self._newline_ids = tokenizer.encode("\n")

    def start(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = True,
    ) -> list[int]:
        """Reset to the rendered prompt plus the generation prompt; returns those ids (all loss mask 0)."""
        self.enable_thinking = enable_thinking
        self.tools = _validate_tools(tools)
        self.messages = [dict(message) for message in _validate_messages(messages)]
        self.token_ids, self.loss_mask, self.logprobs = [], [], []
        text = render(self.messages, self.tools, True, enable_thinking, self.family)
        return self._append(self.tokenizer.encode(text), mask=0)

    def append_generated(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> list[int]:
        """Append sampled ids verbatim (mask 1), then close the turn; returns every id appended."""
        ids = [int(i) for i in ids]
        if not self.token_ids:
            raise ChatTemplateError("append_generated before start(): there is no prompt yet")
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise ChatTemplateError(
                f"generated id {bad[0]} is outside the vocabulary [0, {self.tokenizer.vocab_size})"
            )
        if logprobs is not None and len(logprobs) != len(ids):
            raise ChatTemplateError(f"got {len(logprobs)} logprobs for {len(ids)} generated ids")
        closed = bool(ids) and ids[-1] == self._end_of_turn_id
        content_ids = ids[:-1] if closed else ids
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(content_ids)})
        appended = self._append(ids, mask=1, logprobs=logprobs)
        closing = self._newline_ids if closed else [self._end_of_turn_id, *self._newline_ids]
        return appended + self._append(closing, mask=0)

    def append_tool_responses(self, responses: Sequence[str]) -> list[int]:
        """Append tool responses (one turn, mask 0) and the next generation prompt; returns the ids appended."""
        if not responses:
            raise ChatTemplateError("append_tool_responses needs at least one response")
        return self._append_turn([{"role": "tool", "content": str(response)} for response in responses])

    def append_user(self, content: str) -> list[int]:
        """Append a user turn (a new query, as in tau2 dialogues) and the next generation prompt."""
        return self._append_turn([{"role": "user", "content": str(content)}])

    def _append_turn(self, new_messages: list[dict]) -> list[int]:
        if not self.token_ids:
            raise ChatTemplateError("append before start(): there is no prompt yet")
        self.messages.extend(new_messages)
        text = _render_continuation(new_messages, self.enable_thinking, self.family)
        return self._append(self.tokenizer.encode(text), mask=0)

    def _append(self, ids: list[int], mask: int, logprobs: Sequence[float] | None = None) -> list[int]:
        self.token_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend([float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids))
        return list(ids)


def _render_continuation(new_messages: list[dict], enable_thinking: bool, family: str) -> str:
    """The text a whole render adds for `new_messages` (user or tool turns) plus the generation prompt.

    Rendered after a one-message system anchor and cut off at the anchor's own rendering: user and tool turns
    render the same whatever precedes them, so the template stays the one source of truth for their bytes.
    """
    anchor = [{"role": "system", "content": "-"}]
    head = render(anchor, None, False, enable_thinking, family)
    full = render(anchor + new_messages, None, True, enable_thinking, family)
    if not full.startswith(head):
        raise ChatTemplateError(
            f"{family} chat template does not render user/tool turns independently of the past"
        )
    return full[len(head) :]


def _smollm2_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Fold tools, tool calls and tool responses into plain ChatML text, the way Qwen3 spells them.

    SmolLM2's template renders only role and content; this keeps its bytes for plain chats and gives tool
    conversations the Qwen3 layout: a `<tools>` system block, `<tool_call>` JSON in assistant turns, and runs of
    tool messages merged into one user turn of `<tool_response>` blocks.
    """
    out: list[dict] = []
    if tools:
        tool_lines = "".join("\n" + tojson(tool) for tool in tools)
        preamble = _TOOLS_HEADER + tool_lines + _TOOLS_FOOTER
        if messages and messages[0]["role"] == "system":
            preamble = _content(messages[0]) + "\n\n" + preamble
            messages = messages[1:]
        out.append({"role": "system", "content": preamble})
    for message in messages:
        role, content = message["role"], _content(message)
        if role == "assistant" and message.get("tool_calls"):
            calls = [_tool_call_text(call) for call in message["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            block = "<tool_response>\n" + content + "\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool_turn": True})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _tool_call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    arguments_text = arguments if isinstance(arguments, str) else tojson(arguments)
    return (
        '<tool_call>\n{"name": "'
        + str(function.get("name", ""))
        + '", "arguments": '
        + arguments_text
        + "}\n</tool_call>"
    )


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}]: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{index}]: role {role!r} is not one of {'|'.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{index}]: content must be a string or null, got {type(content).__name__}"
            )
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, Sequence):
                raise ChatTemplateError(
                    f"messages[{index}]: tool_calls must be a list on an assistant message"
                )
            for call_index, call in enumerate(calls):
                function = call.get("function", call) if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                    raise ChatTemplateError(
                        f"messages[{index}].tool_calls[{call_index}]: needs a function name"
                    )
        out.append(dict(message))
    return out


def _validate_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ChatTemplateError("tools must be a list of JSON-schema tool dicts")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{index}]: expected a dict, got {type(tool).__name__}")
        try:
            json.dumps(tool)
        except (TypeError, ValueError) as exc:
            raise ChatTemplateError(f"tools[{index}]: not JSON-serialisable ({exc})") from None
    return [dict(tool) for tool in tools]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ChatTemplateError(f"chat template family {family!r} is not one of {'|'.join(FAMILIES)}")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.cache
def _template(family: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    source = (
        resources.files("orchestra_jax.models").joinpath("templates", f"{family}.jinja").read_text("utf-8")
    )
    return env.from_string(source)
