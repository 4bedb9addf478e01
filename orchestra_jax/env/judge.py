"""Is a final answer correct? Exact match, then normalised (SQuAD-style) match, then an LLM judge.

ToolOrchestra's rule (evaluation/eval_hle.py): an empty prediction or one over 500 words is wrong; a
case-insensitive exact match is right; otherwise the judge model gets EVAL_PROMPT and must reply
`<correct>True|False</correct>`. HLE's official judge (JUDGE_PROMPT) replies `correct: yes|no`. A judge reply that
does not parse is a judge error (verdict incorrect, `error` set), never a guess. The judge's tokens are priced
into `Verdict.cost_usd`, which the ledger keeps apart from the policy's spend.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence
from typing import Literal

from orchestra_jax.env.llm_tools import ChatClient
from orchestra_jax.env.prices import PriceError, PriceTable, Usage

# Exact strings: ToolOrchestra evaluation/eval_hle.py @9d34d87 (Apache-2.0) and centerforaisafety/hle
# hle_eval/run_judge_results.py @87c92ea (MIT); checked against ../shared/data/hle/judge_prompts.json in tests.
EVAL_PROMPT = (
    "Question: {problem}\n\n"
    "Student answer: {pred}\n\n"
    "Reference answer: {answer}\n\n"
    "Assume that the reference answer is correct. Output <correct>True</correct> if the student answer matches "
    "the reference answer. Output <correct>False</correct> if the student answer does not match the reference answer."
)
JUDGE_PROMPT = (
    "Judge whether the following [response] to [question] is correct or not based on the precise and unambiguous "
    "[correct_answer] below.\n\n[question]: {question}\n\n[response]: {response}\n\nYour judgement must be in the "
    "format and criteria specified below:\n\nextracted_final_answer: The final exact answer extracted from the "
    "[response]. Put the extracted answer as 'None' if there is no exact, final answer to extract from the "
    "response.\n\n[correct_answer]: {correct_answer}\n\nreasoning: Explain why the extracted_final_answer is correct "
    "or incorrect based on [correct_answer], focusing only on if there are meaningful differences between "
    "[correct_answer] and the extracted_final_answer. Do not comment on any background to the problem, do not "
    "attempt to solve the problem, do not argue for any answer different than [correct_answer], focus only on "
    "whether the answers match.\n\ncorrect: Answer 'yes' if extracted_final_answer matches the [correct_answer] "
    "given above, or is within a small margin of error for numerical problems. Answer 'no' otherwise, i.e. if "
    "there if there is any inconsistency, ambiguity, non-equivalency, or if the extracted answer is incorrect.\n\n\n"
    "confidence: The extracted confidence score between 0|\\%| and 100|\\%| from [response]. Put 100 if there is "
    "no confidence score available."
)

Method = Literal["exact", "normalized", "llm"]


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    methods: tuple[Method, ...] = ("exact", "normalized", "llm")
    """Tried in order; the first that says correct wins. 'llm' needs `backend`."""
    backend: str | None = None
    """Endpoint name of the judge model (ToolOrchestra used gpt-5 at temperature 1)."""
    prompt: Literal["toolorchestra", "hle"] = "toolorchestra"
    temperature: float | None = 1.0
    max_tokens: int = 1024
    max_answer_words: int = 500


@dataclasses.dataclass(frozen=True)
class Verdict:
    correct: bool
    method: str
    """Which test decided: 'exact', 'normalized', 'llm', 'empty' (no usable prediction) or 'none' (all said no)."""
    cost_usd: float = 0.0
    usage: tuple[Usage, ...] = ()
    error: str | None = None
    judge_reply: str = ""


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str, *, max_plain_words: int = 30) -> str:
    """The final answer in a model's reply: <answer>…</answer>, else the last \\boxed{…}, else an 'Answer:' line,
    else the whole reply when it is short (a small model's bare answer), else ''."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    lines = re.findall(r"^\s*(?:final answer|answer)\s*:\s*(.+)$", text, flags=re.IGNORECASE | re.MULTILINE)
    if lines:
        return lines[-1].strip()
    plain = text.strip()
    return plain if plain and len(plain.split()) <= max_plain_words else ""


def parse_judge_reply(reply: str, prompt: str) -> bool | None:
    """The verdict in a judge's reply, or None when it does not say (ToolOrchestra: <correct>True|False</correct>)."""
    if prompt == "toolorchestra":
        found = re.findall(r"<correct>\s*(true|false)\s*</correct>", reply, flags=re.IGNORECASE)
        return found[-1].lower() == "true" if found else None
    found = re.findall(r"^\W*correct\W*:\W*(yes|no)\b", reply, flags=re.IGNORECASE | re.MULTILINE)
    return found[-1].lower() == "yes" if found else None


def build_judge_prompt(config: JudgeConfig, question: str, prediction: str, reference: str) -> str:
    if config.prompt == "toolorchestra":
        return EVAL_PROMPT.format(problem=question, pred=prediction, answer=reference)
    return JUDGE_PROMPT.format(question=question, response=prediction, correct_answer=reference)


async def judge_answer(
    question: str,
    prediction: str,
    reference: str | Sequence[str],
    *,
    config: JudgeConfig | None = None,
    client: ChatClient | None = None,
    prices: PriceTable | None = None,
) -> Verdict:
    """Check `prediction` against the reference (or any of several aliases); never raises."""
    config = config or JudgeConfig()
    references = [reference] if isinstance(reference, str) else [r for r in reference if isinstance(r, str)]
    pred = prediction.strip()
    if not pred or len(pred.split()) > config.max_answer_words or not references:
        return Verdict(False, "empty")
    for method in config.methods:
        if method == "exact" and any(pred.lower() == r.strip().lower() for r in references):
            return Verdict(True, "exact")
        if method == "normalized" and any(normalize_answer(pred) == normalize_answer(r) for r in references):
            return Verdict(True, "normalized")
        if method == "llm":
            return await _llm_judge(question, pred, references[0], config, client, prices)
    return Verdict(False, "none")


async def _llm_judge(
    question: str,
    pred: str,
    reference: str,
    config: JudgeConfig,
    client: ChatClient | None,
    prices: PriceTable | None,
) -> Verdict:
    if client is None or config.backend is None:
        return Verdict(False, "llm", error="LLM judge requested but no judge backend is configured")
    prompt = build_judge_prompt(config, question, pred, reference)
    reply = await client.chat(
        config.backend,
        [{"role": "user", "content": prompt}],
        max_tokens=config.max_tokens,
        temperature=config.temperature,
    )
    try:
        cost = prices.call_cost(reply.usage) if prices is not None else 0.0
    except PriceError as e:
        return Verdict(False, "llm", usage=(reply.usage,), error=str(e), judge_reply=reply.text)
    if reply.error:
        return Verdict(False, "llm", cost, (reply.usage,), f"judge: {reply.error}")
    verdict = parse_judge_reply(reply.text, config.prompt)
    if verdict is None:
        snippet = " ".join(reply.text.split())[:80]
        return Verdict(
            False, "llm", cost, (reply.usage,), f"judge reply did not parse: {snippet!r}", reply.text
        )
    return Verdict(verdict, "llm", cost, (reply.usage,), None, reply.text)
