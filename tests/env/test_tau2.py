"""τ²-bench adapter: gold replays through the episode loop score 1.0; tools, user simulator and grader are real."""

import asyncio
import random

import pytest
from openai_stub import stub_app

from orchestra_jax.env import tau2
from orchestra_jax.env.catalog import ToolCatalog
from orchestra_jax.env.episode import run_episodes
from orchestra_jax.env.llm_tools import ChatClient, Endpoint
from orchestra_jax.env.scripted import ScriptedEngine
from orchestra_jax.env.search import BackgroundServer
from orchestra_jax.env.trajectory import EpisodeConfig, parse_request_id

EXPERT = "Qwen/Qwen3-32B"  # a backend the default price table knows
WRITES = ("book_", "cancel_", "update_", "exchange_", "return_", "modify_", "send_certificate")


def _client(url: str) -> ChatClient:
    endpoint = lambda name: Endpoint(name=name, base_url=url + "/v1", model="stub-model", max_retries=0)  # noqa: E731
    return ChatClient({"user": endpoint("user"), EXPERT: endpoint(EXPERT)})


@pytest.mark.parametrize("domain", tau2.DOMAINS)
def test_gold_replay_through_the_episode_loop_scores_one(domain):
    task = random.choice(tau2.load_tasks(domain))
    assert tau2.replay_gold_actions(domain, task) == 1.0, task.id


def test_transfer_only_tasks_need_the_tool_toolorchestra_withholds():
    tasks = [
        t
        for t in tau2.load_tasks("telecom")
        if [a.name for a in tau2.gold_actions(t)] == ["transfer_to_human_agents"]
    ]
    assert len(tasks) == 20
    task = random.choice(tasks)
    assert tau2.replay_gold_actions("telecom", task) == 1.0
    assert tau2.replay_gold_actions("telecom", task, hidden_tools=tau2.HIDDEN_TOOLS) == 0.0


def test_task_counts_are_tau2_bench_v1():
    assert [len(tau2.load_tasks(d)) for d in tau2.DOMAINS] == [50, 114, 114]


def _replay(domain, task, skip=None):
    """Run the gold actions (all but index `skip`) in a fresh session; returns the session and the observations."""
    session = tau2.Tau2Session(domain, task)
    catalog = tau2.session_catalog(session)
    actions = [a for a in tau2.gold_actions(task) if a.name not in tau2.HIDDEN_TOOLS]
    session.user_says(tau2.opening_user_message(task))
    observations = {}
    for i, action in enumerate(actions):
        if i != skip:
            result = asyncio.run(catalog.execute(action.name, action.arguments))
            assert result.error is None
            observations[i] = result.observation
    return session, actions, observations


def test_a_missing_write_leaves_the_database_wrong_and_scores_zero():
    domain = random.choice(["airline", "retail"])
    tasks = [
        t for t in tau2.load_tasks(domain) if any(a.name.startswith(WRITES) for a in tau2.gold_actions(t))
    ]
    random.shuffle(tasks)
    for task in tasks:  # some gold writes fail on purpose (retail 12, 105); dropping those changes nothing
        _, actions, observations = _replay(domain, task)
        dropped = max(i for i, a in enumerate(actions) if a.name.startswith(WRITES))
        if not observations[dropped].startswith("Error"):
            break
    session, _, _ = _replay(domain, task, skip=dropped)
    session.agent_says("\n".join(tau2.communicate_info(task)) or "Done.")
    session.user_says("###STOP###")
    assert session.reward() == 0.0, (domain, task.id)


def test_policy_tools_hide_transfer_and_refuse_bad_calls():
    task = random.choice(tau2.load_tasks("airline"))
    session = tau2.Tau2Session("airline", task)
    catalog = tau2.session_catalog(session)
    assert "transfer_to_human_agents" not in catalog.names and "call_expert" not in catalog.names
    assert {"book_reservation", "get_user_details"} <= set(catalog.names)
    before = len(session.messages)
    hidden = asyncio.run(catalog.execute("transfer_to_human_agents", {"summary": "x"}))
    wrong_type = asyncio.run(catalog.execute("get_user_details", {"user_id": 7}))
    assert hidden.error and wrong_type.error and len(session.messages) == before
    missing = asyncio.run(catalog.execute("get_user_details", {"user_id": "nobody_0000"}))
    assert missing.error is None and "Error" in missing.observation and len(session.messages) == before + 2
    with pytest.raises(tau2.Tau2Error, match="no tool"):
        session.call_tool("toggle_airplane_mode", {}, requestor="user")


def test_unknown_domain_and_task_are_one_line_errors():
    with pytest.raises(tau2.Tau2Error, match="unknown tau2 domain 'bank'"):
        tau2.load_tasks("bank")
    with pytest.raises(tau2.Tau2Error, match="no task 'nope'"):
        tau2.get_task("retail", "nope")


def test_dialogue_with_an_openai_compatible_user_and_expert():
    """A scripted policy solves a retail task by talking to a user simulator served over HTTP on 127.0.0.1."""
    task = random.choice([t for t in tau2.load_tasks("retail") if not tau2.communicate_info(t)])
    opening = tau2.opening_user_message(task)

    def simulated(messages):
        if messages[0]["role"] == "system" and "<scenario>" in messages[0]["content"]:
            return opening if len(messages) <= 2 else "Thanks, that is all. ###STOP###"
        return "Look the user up first."  # the expert

    actions = [a for a in tau2.gold_actions(task) if a.name not in tau2.HIDDEN_TOOLS]
    turns = [tau2.tool_call_text("call_expert", {"model": "expert-1", "question": "What first?"})]
    turns += [tau2.tool_call_text(a.name, a.arguments) for a in actions] + ["Your request is complete."]

    with BackgroundServer(stub_app(simulated)) as server:
        client = _client(server.url)
        tokenizer = tau2._replay_tokenizer()
        engine = ScriptedEngine(tokenizer, lambda ids, rid: turns[parse_request_id(rid)[3]])
        config = EpisodeConfig(max_turns=len(turns), max_new_tokens=4096, max_context=1 << 20)
        setup = tau2.episode_setup(client, "user", expert_client=client, expert_aliases={"expert-1": EXPERT})
        (traj,) = asyncio.run(
            run_episodes(
                engine, tokenizer, ToolCatalog(()), [tau2.to_task("retail", task)], config, setup=setup
            )
        )
    assert traj.error is None and traj.finish_reason == "user_stop" and traj.correct
    assert traj.tool_counts["call_expert"] == 1
    assert traj.ledger.prompt_tokens.get(EXPERT, 0) > 0 and traj.ledger.cost_usd > 0
    assert sum(traj.tool_counts.values()) == len(actions) + 1
    first_prompt = tokenizer.decode(engine.requests[0].prompt_ids)
    assert opening in first_prompt and "<policy>" in first_prompt
    assert (
        '"name": "transfer_to_human_agents"' not in first_prompt and '"name": "call_expert"' in first_prompt
    )


def test_an_unreachable_user_simulator_fails_the_episode_not_the_batch():
    task = random.choice(tau2.load_tasks("airline"))
    client = ChatClient({"user": Endpoint("user", "http://127.0.0.1:9/v1", "m", max_retries=0, timeout_s=2)})
    tokenizer = tau2._replay_tokenizer()
    engine = ScriptedEngine(tokenizer, lambda ids, rid: "Hello")
    (traj,) = asyncio.run(
        run_episodes(
            engine,
            tokenizer,
            ToolCatalog(()),
            [tau2.to_task("airline", task)],
            EpisodeConfig(max_context=1 << 20),
            setup=tau2.episode_setup(client, "user"),
        )
    )
    assert traj.error is not None and "unreachable" in traj.error and not traj.correct


@pytest.mark.slow
@pytest.mark.parametrize("domain", tau2.DOMAINS)
def test_gold_replay_scores_one_on_every_task(domain):
    failures = [t.id for t in tau2.load_tasks(domain) if tau2.replay_gold_actions(domain, t) != 1.0]
    assert failures == []


def test_user_simulator_uses_its_phone_tools_through_text_calls():
    task = random.choice(tau2.load_tasks("telecom"))
    session = tau2.Tau2Session("telecom", task)
    replies = iter(
        [
            '<tool_call>\n{"name": "check_status_bar", "arguments": {}}\n</tool_call>',
            '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>',
            "My phone shows no service.",
        ]
    )
    seen = []

    class Client:
        async def chat(self, backend, messages):
            seen.append(messages)
            return type("Reply", (), {"text": next(replies), "error": None})()

    user = tau2.Tau2User(session, Client(), "user")
    assert asyncio.run(user.open()) == "My phone shows no service."
    kinds = [(type(m).__name__, getattr(m, "requestor", None)) for m in session.messages[1:]]
    assert kinds == [("UserMessage", None), ("ToolMessage", "user"), ("UserMessage", None)]
    assert session.messages[1].tool_calls[0].name == "check_status_bar"
    assert "<scenario>" in seen[0][0]["content"] and "check_status_bar" in seen[0][0]["content"]
    assert seen[1][-1]["content"].startswith("<tool_response>")
    assert "no tool 'no_such_tool'" in seen[2][-1]["content"]  # the error is fed back, not logged
    assert not session.finished
