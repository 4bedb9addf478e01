"""The CPU task family: seeded tasks, real tools that solve them, prices that make routing matter, demos."""

import asyncio
import json
import random
import re

import pytest

from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.catalog import ToolContext
from orchestra_jax.env.episode import run_episodes
from orchestra_jax.env.preferences import PreferenceDistribution
from orchestra_jax.env.scripted import ScriptedEngine
from orchestra_jax.env.trajectory import EpisodeConfig, parse_request_id


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def world():
    return tasks_cpu.make_world(seed=random.randrange(10**6), n_towns=60)


@pytest.fixture(scope="module")
def catalog(world):
    return tasks_cpu.cpu_catalog(world)


@pytest.fixture(scope="module")
def tokenizer(world, catalog):
    tasks = tasks_cpu.generate_tasks(24, seed=5, world=world)
    return tasks_cpu.family_tokenizer(world, catalog, tasks, 700)


def test_tasks_are_seeded_and_answers_are_right(world):
    seed = random.randrange(10**6)
    a = tasks_cpu.generate_tasks(20, seed, world=world)
    assert a == tasks_cpu.generate_tasks(20, seed, world=world)
    assert a != tasks_cpu.generate_tasks(20, seed + 1, world=world)
    assert len({t.id for t in a}) == 20
    for task in a:
        if task.metadata["kind"] == "arith":
            x, op, y = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", task.question).groups()
            assert int(task.answer) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        else:
            town = world.town(task.metadata["town"])
            assert task.answer == str(getattr(town, task.metadata["attribute"]))
            assert task.answer in town.passage()
        assert task.tools == tasks_cpu.TOOL_NAMES
        assert len(task.preference.vector(task.tools)) == len(task.tools) + 3
    assert {t.metadata["kind"] for t in a} == {"arith", "fact"}
    assert len({t.preference for t in a}) > 1


def test_world_names_are_unique_and_seeded():
    seed = random.randrange(10**6)
    w = tasks_cpu.make_world(seed, 80)
    assert w == tasks_cpu.make_world(seed, 80)
    assert len({t.name for t in w.towns}) == 80


def test_bad_kind_is_refused(world):
    with pytest.raises(ValueError, match="kinds"):
        tasks_cpu.generate_tasks(3, world=world, kinds=("poetry",))


def test_every_route_solves_its_task_with_real_tools(world, catalog):
    tasks = tasks_cpu.generate_tasks(6, random.randrange(1000), world=world)
    context = ToolContext(prices=tasks_cpu.cpu_prices())
    for task in tasks:
        cheap = "python" if task.metadata["kind"] == "arith" else "search"
        for tool in (cheap, "expert"):
            call = re.search(r"\{.*\}", tasks_cpu.first_call(task, tool), re.S).group()
            payload = json.loads(call)
            result = run(catalog.execute(payload["name"], payload["arguments"], context))
            assert result.error is None, result.observation
            assert tasks_cpu.read_answer(task, tool, result.observation) == task.answer


def test_expert_costs_more_than_the_cheap_tools(world, catalog):
    (arith,) = tasks_cpu.generate_tasks(1, 1, world=world, kinds=("arith",))
    (fact,) = tasks_cpu.generate_tasks(1, 1, world=world, kinds=("fact",))
    context = ToolContext(prices=tasks_cpu.cpu_prices())
    python = run(catalog.execute("python", {"code": f"print({arith.metadata['expression']})"}, context))
    search = run(catalog.execute("search", {"query": fact.metadata["town"]}, context))
    expert = run(catalog.execute("expert", {"question": fact.question}, context))
    assert search.cost_usd == pytest.approx(tasks_cpu.SEARCH_FEE_USD)
    assert python.cost_usd == pytest.approx(python.sandbox_s * context.prices.sandbox_usd_per_second)
    assert expert.cost_usd > 2 * search.cost_usd > 0 and expert.cost_usd > 100 * python.cost_usd
    assert expert.usage[0].model == tasks_cpu.EXPERT_MODEL


def test_expert_refuses_what_it_cannot_know(catalog):
    context = ToolContext(prices=tasks_cpu.cpu_prices())
    assert run(
        catalog.execute("expert", {"question": "Who is the mayor of Atlantis?"}, context)
    ).observation == ("I do not know.")
    assert run(catalog.execute("expert", {"question": "What is 2 ** 99999?"}, context)).observation == (
        "I do not know."
    )
    assert run(catalog.execute("expert", {"question": "What is 12 * (3 + 4)?"}, context)).observation == "84"


def test_expert_knows_only_its_share_of_towns_and_sums(world):
    coverage = random.uniform(0.3, 0.7)
    known = [t for t in world.towns if tasks_cpu.expert_knows(t.name, coverage)]
    assert 0 < len(known) < len(world.towns)
    assert all(tasks_cpu.expert_knows(t.name, 1.0) for t in world.towns)
    assert not any(tasks_cpu.expert_knows(t.name, 0.0) for t in world.towns)
    catalog = tasks_cpu.cpu_catalog(world, expert_coverage=coverage)
    context = ToolContext(prices=tasks_cpu.cpu_prices())
    sums_known = []
    for task in tasks_cpu.generate_tasks(40, random.randrange(1000), world=world):
        reply = run(catalog.execute("expert", {"question": task.question}, context)).observation
        arith = task.metadata["kind"] == "arith"
        knows = tasks_cpu.expert_knows(task.metadata["expression" if arith else "town"], coverage)
        assert reply == (task.answer if knows else "I do not know."), task.question
        sums_known += [knows] if arith else []
    assert any(sums_known) and not all(sums_known)
    with pytest.raises(ValueError, match="coverage"):
        tasks_cpu.make_local_expert_tool(world, 1.5)


def test_demonstrations_keep_the_experts_failures(world, tokenizer):
    catalog = tasks_cpu.cpu_catalog(world, expert_coverage=0.0)
    tasks = tasks_cpu.generate_tasks(16, random.randrange(1000), world=world)
    demos = run(tasks_cpu.demonstrations(tasks, tokenizer, world, catalog=catalog, expert_share=1.0, seed=2))
    assert len(demos) == len(tasks)
    kinds = {t.id: t.metadata["kind"] for t in tasks}
    assert not any(d.correct for d in demos) and {kinds[d.task_id] for d in demos} == {"arith", "fact"}
    assert all(d.answer == "unknown" for d in demos)


def test_answer_tool_judges_against_the_reference(catalog):
    context = ToolContext(question="q", reference_answer="Tamel Quor", prices=tasks_cpu.cpu_prices())
    ok = run(catalog.execute("answer", {"answer": "tamel quor."}, context))
    bad = run(catalog.execute("answer", {"answer": "Orsa Vell"}, context))
    empty = run(catalog.execute("answer", {"answer": "  "}, context))
    assert ok.correct is True and ok.answer == "tamel quor."
    assert bad.correct is False and empty.error is not None and empty.answer is None


def test_demonstrations_are_correct_and_mix_routes(world, tokenizer, catalog):
    tasks = tasks_cpu.generate_tasks(24, random.randrange(1000), world=world)
    demos = run(tasks_cpu.demonstrations(tasks, tokenizer, world, catalog=catalog, expert_share=0.4, seed=1))
    assert len(demos) == len(tasks)
    assert all(d.correct and d.finish_reason == "answer" and d.format_errors == 0 for d in demos)
    used = {name for d in demos for name, n in d.tool_counts.items() if n and name != "answer"}
    assert used == {"python", "search", "expert"}
    for d in demos:
        assert sum(d.loss_mask) > 0 and len(d.loss_mask) == len(d.token_ids) == len(d.behaviour_logprobs)


def test_cost_preferring_route_is_cheaper_in_real_episodes(world, tokenizer, catalog):
    tasks = tasks_cpu.generate_tasks(
        8, random.randrange(1000), world=world, preferences=PreferenceDistribution(kind="uniform")
    )

    def rollouts(route):
        def script(prompt_ids, rid):
            task_id, _, _, turn = parse_request_id(rid)
            task = next(t for t in tasks if t.id == task_id)
            tool = (
                route if route == "expert" else ("python" if task.metadata["kind"] == "arith" else "search")
            )
            return (
                tasks_cpu.first_call(task, tool)
                if turn == 0
                else tasks_cpu.tool_call_text("answer", {"answer": task.answer})
            )

        config = EpisodeConfig(max_turns=2, system_prompt=tasks_cpu.SYSTEM_PROMPT)
        return run(
            run_episodes(
                ScriptedEngine(tokenizer, script),
                tokenizer,
                catalog,
                tasks,
                config,
                prices=tasks_cpu.cpu_prices(),
            )
        )

    cheap, expert = rollouts("cheap"), rollouts("expert")
    for c, e in zip(cheap, expert, strict=True):
        assert c.correct and e.correct
        assert c.ledger.cost_usd < e.ledger.cost_usd


def test_tokenizer_texts_cover_the_calls(world):
    tasks = tasks_cpu.generate_tasks(4, 0, world=world)
    texts = tasks_cpu.tokenizer_texts(world, tasks)
    assert any("<tool_call>" in t and '"answer"' in t for t in texts)
    assert len(texts) >= len(world.towns) + 4


def test_family_prompts_are_short_and_exact(world, catalog, tokenizer):
    """The constant system text (instructions, tool schemas) costs a few phrase tokens, not hundreds."""
    from orchestra_jax.env.episode import system_message
    from orchestra_jax.models import chat_template

    for task in tasks_cpu.generate_tasks(8, seed=random.randrange(10**6), world=world):
        messages = [system_message(tasks_cpu.SYSTEM_PROMPT, task.preference), {"role": "user", "content": task.question}]
        prompt = chat_template.render(messages, tools=catalog.schemas(), add_generation_prompt=True,
                                      enable_thinking=False)
        ids = tokenizer.encode(prompt)
        assert tokenizer.decode(ids) == prompt
        assert len(ids) < 120, len(ids)  # ~450 tokens without the phrases
    assert len(tokenizer.encode(json.dumps(catalog.schemas()[0]))) > 20  # the schema alone is long


def test_constant_phrases_skip_varying_lines_and_special_tokens():
    rendered = ["<|im_start|>system\nfixed line one is long enough\nvaries 1\nfixed tail line, also long\n<|im_end|>",
                "<|im_start|>system\nfixed line one is long enough\nvaries 2\nfixed tail line, also long\n<|im_end|>"]
    assert tasks_cpu.constant_phrases(rendered) == ["system\nfixed line one is long enough\n",
                                                    "fixed tail line, also long\n"]
