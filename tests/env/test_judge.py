import asyncio
import json
import random

import pytest
from openai_stub import stub_app

from orchestra_jax.env import judge
from orchestra_jax.env.judge import (
    JudgeConfig,
    build_judge_prompt,
    extract_answer,
    judge_answer,
    normalize_answer,
    parse_judge_reply,
)
from orchestra_jax.env.llm_tools import ChatClient, Endpoint
from orchestra_jax.env.prices import ModelPrice, Usage, default_price_table
from orchestra_jax.env.search import BackgroundServer


def test_prompts_are_the_reference_strings(shared_data):
    ref = json.loads((shared_data / "hle" / "judge_prompts.json").read_text())
    assert judge.EVAL_PROMPT == ref["toolorchestra_judge"]["EVAL_PROMPT"]
    assert judge.JUDGE_PROMPT == ref["JUDGE_PROMPT"]
    q, p, a = "Q?", "pred", "gold"
    assert build_judge_prompt(JudgeConfig(), q, p, a) == ref["toolorchestra_judge"]["EVAL_PROMPT"].format(
        problem=q, pred=p, answer=a
    )
    assert build_judge_prompt(JudgeConfig(prompt="hle"), q, p, a) == ref["JUDGE_PROMPT"].format(
        question=q, response=p, correct_answer=a
    )


def test_normalize_answer_squad():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("<think>x</think>\n<answer>\n Paris \n</answer>", "Paris"),
        ("so \\boxed{\\frac{1}{2}} and \\boxed{42}", "42"),
        ("reasoning\nAnswer: 17 apples\nConfidence: 80%", "17 apples"),
        ("Paris", "Paris"),
        ("word " * 40, ""),
        ("", ""),
    ],
)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_parse_judge_reply():
    assert parse_judge_reply("blah <correct>True</correct>", "toolorchestra") is True
    assert parse_judge_reply("<correct> false </correct>", "toolorchestra") is False
    assert parse_judge_reply("I think it is right", "toolorchestra") is None
    assert (
        parse_judge_reply("extracted_final_answer: 3\nreasoning: same\ncorrect: yes\nconfidence: 90", "hle")
        is True
    )
    assert parse_judge_reply("**correct:** no", "hle") is False
    assert parse_judge_reply("correct answer is 3", "hle") is None


def run(coro):
    return asyncio.run(coro)


def test_exact_then_normalized_without_any_model():
    n = random.randint(1000, 9999)
    assert run(judge_answer("q", f" {n} ", str(n))).method == "exact"
    verdict = run(judge_answer("q", "the Eiffel tower.", ["Tour Eiffel", "Eiffel Tower"]))
    assert verdict.correct and verdict.method == "normalized" and verdict.cost_usd == 0
    assert run(judge_answer("q", "", "x")) == judge.Verdict(False, "empty")
    assert run(judge_answer("q", "w " * 501, "w")).method == "empty"
    wrong = run(judge_answer("q", "London", "Paris", config=JudgeConfig(methods=("exact", "normalized"))))
    assert not wrong.correct and wrong.method == "none"
    unconfigured = run(judge_answer("q", "London", "Paris"))
    assert not unconfigured.correct and "no judge backend" in unconfigured.error


@pytest.mark.parametrize("prompt", ["toolorchestra", "hle"])
def test_llm_judge_cost_and_errors(prompt):
    def reply(messages):
        text = messages[-1]["content"]
        if "garbled" in text:
            return "hmm, hard to say"
        ok = "forty-two" in text
        if prompt == "toolorchestra":
            return f"<correct>{ok}</correct>"
        return f"extracted_final_answer: x\nreasoning: r\ncorrect: {'yes' if ok else 'no'}\nconfidence: 100"

    app = stub_app(reply)
    prices = default_price_table().with_models({"judge": ModelPrice(1.0, 3.0)})
    config = JudgeConfig(backend="judge", prompt=prompt)
    with BackgroundServer(app) as server:
        client = ChatClient({"judge": Endpoint("judge", server.url + "/v1", "stub")})
        right = run(
            judge_answer("What is 6*7?", "forty-two", "42", config=config, client=client, prices=prices)
        )
        wrong = run(judge_answer("What is 6*7?", "41", "42", config=config, client=client, prices=prices))
        garbled = run(judge_answer("garbled?", "x", "42", config=config, client=client, prices=prices))
    assert right.correct and right.method == "llm" and right.error is None
    assert not wrong.correct and wrong.error is None
    assert not garbled.correct and garbled.error.startswith("judge reply did not parse")
    sent = app.state.requests[0]["messages"][0]["content"]
    assert sent == build_judge_prompt(config, "What is 6*7?", "forty-two", "42")
    (usage,) = right.usage
    assert usage.model == "judge" and usage.prompt_tokens == len(sent.split())
    assert right.cost_usd == pytest.approx((1.0 * usage.prompt_tokens + 3.0 * usage.completion_tokens) / 1e6)
    assert isinstance(usage, Usage)
