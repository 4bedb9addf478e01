"""Tool-call parser: round trips with the Qwen3 template, structured errors, and fuzzing (never raises)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestra_jax.models.chat_template import render
from orchestra_jax.models.tool_parser import ParsedTurn, ToolCall, parse_tool_calls

TAGS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
safe_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30).filter(
    lambda s: not any(tag in s for tag in TAGS)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | safe_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(safe_text, children, max_size=3),
    max_leaves=8,
)
calls_strategy = st.lists(
    st.builds(
        ToolCall,
        name=st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True),
        arguments=st.dictionaries(safe_text, json_values, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def assistant_turn(calls, content="", reasoning="Let me think.") -> str:
    """What the model is trained to emit: the assistant turn of a Qwen3 rendering, without its framing."""
    message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [call.to_message() for call in calls],
    }
    text = render([{"role": "user", "content": "q"}, message])
    return text.split("<|im_start|>assistant\n", 1)[1]


@settings(max_examples=40, deadline=None)
@given(calls=calls_strategy, content=safe_text.map(str.strip))
def test_round_trip_through_the_qwen3_template(calls, content):
    parsed = parse_tool_calls(assistant_turn(calls, content))
    assert parsed.errors == ()
    assert parsed.well_formed
    assert list(parsed.calls) == calls
    assert parsed.content == content
    assert parsed.reasoning == "Let me think."


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(TAGS + ("<|im_end|>", "{", "}", '"name"', ":", '"arguments"', "\n", "[1]", '"x"'))
        | st.text(max_size=12),
        max_size=25,
    ).map("".join)
)
def test_fuzzed_text_never_raises_and_reports_consistently(text):
    parsed = parse_tool_calls(text)
    assert isinstance(parsed, ParsedTurn)
    assert parsed.well_formed == (not parsed.errors)
    assert all(isinstance(e, str) and "\n" not in e for e in parsed.errors)
    for call in parsed.calls:
        assert isinstance(call.name, str) and call.name.strip()
        assert isinstance(call.arguments, dict)
    assert "<tool_call>" not in parsed.content or not parsed.well_formed


def test_several_calls_with_text_before_them():
    text = (
        "<think>\nplan\n</think>\n\nI will search twice.\n"
        '<tool_call>\n{"name": "search", "arguments": {"query": "a", "model": "search-1"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"b\\"}"}\n</tool_call><|im_end|>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.well_formed and parsed.errors == ()
    assert parsed.reasoning == "plan"
    assert parsed.content == "I will search twice."
    assert parsed.calls == (
        ToolCall("search", {"query": "a", "model": "search-1"}),
        ToolCall("search", {"query": "b"}),
    )


def test_plain_answer_without_calls_is_well_formed():
    parsed = parse_tool_calls("<think>\neasy\n</think>\n\nParis.")
    assert parsed == ParsedTurn("Paris.", (), (), True, "easy")


@pytest.mark.parametrize(
    "text, expected_error, n_calls",
    [
        ('<tool_call>\n{"name": "a", "arguments": {}\n</tool_call>', "tool call 1: invalid JSON", 0),
        ('<tool_call>\n{"name": "a", "arguments": {}}', "tool call 1: <tool_call> is not closed", 0),
        ('<tool_call>{"name": "a"}</tool_call> and then more', "text after the last tool call", 1),
        (
            '<tool_call>{"name": "a"}</tool_call> x <tool_call>{"name": "b"}</tool_call>',
            "text between tool calls",
            2,
        ),
        ('<tool_call>{"name": "a"} <tool_call>{"name": "b"}</tool_call>', "not closed before the next", 1),
        ('{"name": "a"}</tool_call>', "</tool_call> without a matching <tool_call>", 0),
        ('<tool_call>["a", {}]</tool_call>', "expected a JSON object", 0),
        ('<tool_call>{"arguments": {}}</tool_call>', "missing or empty string field 'name'", 0),
        (
            '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
            "tool call 1 (a): 'arguments' must be a JSON object",
            0,
        ),
        ('<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>', "'arguments' must be a JSON object", 0),
        ("<think>\nstill thinking when the length limit hit", "<think> is not closed by </think>", 0),
        ("<think>a</think>b<think>c</think>", "a second <think> block", 0),
        ('<tool_call>{"name": "a"}</tool_call><tool_call>' + "[" * 5000 + "</tool_call>", "tool call 2", 1),
    ],
)
def test_format_problems_become_structured_errors(text, expected_error, n_calls):
    parsed = parse_tool_calls(text)
    assert not parsed.well_formed
    assert any(expected_error in error for error in parsed.errors), parsed.errors
    assert len(parsed.calls) == n_calls


def test_pathological_text_stays_linear():
    parsed = parse_tool_calls("answer" + " \n" * 200_000 + "x" + "<tool_call>" * 20_000)
    assert not parsed.well_formed and parsed.calls == ()
    assert parse_tool_calls("Paris. <|im_end|>\n<|endoftext|> ").content == "Paris."


def test_missing_arguments_mean_no_arguments_and_non_strings_are_reported():
    assert parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>').calls == (ToolCall("ping", {}),)
    parsed = parse_tool_calls(None)  # type: ignore[arg-type]
    assert not parsed.well_formed and "not a string" in parsed.errors[0]


def test_to_message_renders_back_to_the_same_text():
    call = ToolCall("answer", {"model": "answer-1", "note": "ü <&>"})
    turn = assistant_turn([call], reasoning="r")
    assert '{"name": "answer", "arguments": ' + json.dumps(call.arguments, ensure_ascii=False) + "}" in turn
    assert parse_tool_calls(turn).calls == (call,)
