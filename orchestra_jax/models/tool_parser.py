"""Pull Qwen3-style tool calls out of generated text, reporting every format problem instead of raising.

The expected shape of one assistant turn (what the Qwen3 template renders and the model is trained to emit):

    <think>\\n reasoning \\n</think>\\n\\n optional text
    <tool_call>\\n{"name": "search", "arguments": {"query": "..."}}\\n</tool_call>
    <tool_call>\\n{...}\\n</tool_call>

Anything else (bad JSON, a missing name, unclosed or stray tags, text after the calls) becomes one line in
`errors`, the calls that did parse are still returned, and `well_formed` is False. The RL filter drops turns
that are not well formed; the episode feeds the errors back to the model as the tool response.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_TAG = re.compile(r"<tool_call>|</tool_call>")
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)

    def to_message(self) -> dict:
        """The OpenAI `tool_calls` entry the chat template renders back into `<tool_call>` text."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedTurn:
    content: str
    calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]
    well_formed: bool
    reasoning: str = ""


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split one generated assistant turn into reasoning, free text and tool calls; never raises."""
    if not isinstance(text, str):
        return ParsedTurn("", (), (f"generated text is {type(text).__name__}, not a string",), False)
    errors: list[str] = []
    reasoning, rest = _split_reasoning(_strip_end_tokens(text), errors)
    content, calls = _split_calls(rest, errors)
    return ParsedTurn(content, tuple(calls), tuple(errors), not errors, reasoning)


def _strip_end_tokens(text: str) -> str:
    """Drop the end-of-turn tokens a decode may leave at the end (linear time, unlike a backtracking regex)."""
    text = text.rstrip()
    while text.endswith(_END_TOKENS):
        text = text[: text.rfind("<")].rstrip()
    return text


def _split_reasoning(text: str, errors: list[str]) -> tuple[str, str]:
    """Reasoning is what precedes the first `</think>` (after `<think>`, if present), as the template reads it."""
    if "</think>" in text:
        head, rest = text.split("</think>", 1)
        if head.count("<think>") > 1:
            errors.append("more than one <think> before </think>")
        before, _, reasoning = head.rpartition("<think>")
        if before.strip():
            errors.append("text before <think>")
        if "<think>" in rest or "</think>" in rest:
            errors.append("a second <think> block after the reasoning")
            rest = rest.replace("<think>", "").replace("</think>", "")
        return reasoning.strip("\n"), rest
    if "<think>" in text:
        before, _, reasoning = text.partition("<think>")
        errors.append("<think> is not closed by </think>")
        return reasoning.strip("\n"), before
    return "", text


def _split_calls(text: str, errors: list[str]) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    pieces: list[str] = []
    open_at: int | None = None  # index just after the current unclosed <tool_call>
    cursor = 0
    seen_call = False
    for match in _TAG.finditer(text):
        if match.group() == "<tool_call>":
            if open_at is not None:
                errors.append(
                    f"tool call {len(calls) + 1}: <tool_call> is not closed before the next <tool_call>"
                )
            else:
                _text_piece(text[cursor : match.start()], seen_call, pieces, errors)
            open_at, seen_call = match.end(), True
        elif open_at is None:
            errors.append("</tool_call> without a matching <tool_call>")
            _text_piece(text[cursor : match.start()], seen_call, pieces, errors)
        else:
            call = _parse_call(text[open_at : match.start()], len(calls) + 1, errors)
            if call is not None:
                calls.append(call)
            open_at = None
        cursor = match.end()
    if open_at is not None:
        errors.append(f"tool call {len(calls) + 1}: <tool_call> is not closed")
    else:
        _text_piece(text[cursor:], seen_call, pieces, errors, last=True)
    return "".join(pieces).strip(), calls


def _text_piece(
    piece: str, seen_call: bool, pieces: list[str], errors: list[str], last: bool = False
) -> None:
    if seen_call and piece.strip():
        errors.append("text after the last tool call" if last else "text between tool calls")
    pieces.append(piece)


def _parse_call(body: str, number: int, errors: list[str]) -> ToolCall | None:
    where = f"tool call {number}"
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        errors.append(f"{where}: invalid JSON ({exc.msg} at char {exc.pos})")
        return None
    except RecursionError:
        errors.append(f"{where}: JSON nested too deeply")
        return None
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a JSON object with name and arguments, got {type(value).__name__}")
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: missing or empty string field 'name'")
        return None
    arguments = _arguments(value.get("arguments", {}))
    if arguments is None:
        errors.append(f"{where} ({name}): 'arguments' must be a JSON object")
        return None
    return ToolCall(name, arguments)


def _arguments(value: Any) -> dict | None:
    """Arguments are an object; a JSON string holding an object is accepted too (some models double-encode)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
    return value if isinstance(value, dict) else None
