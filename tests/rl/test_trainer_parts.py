"""Trainer pieces (scoring, masking, samples, run directories) and short test-tiny runs of the trainer."""

from types import SimpleNamespace

import numpy as np
import pytest

from orchestra_jax.config import preset
from orchestra_jax.rl.trainer import _mask_malformed_turns, rl_samples, score


def fake_trajectory(group, correct, cost, counts, answer="42", malformed=(False, False)):
    sample = SimpleNamespace(token_ids=tuple(range(1, 13)), loss_mask=(0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0),
                             behaviour_logprobs=tuple(-0.5 for _ in range(12)))
    return SimpleNamespace(
        group_id=group, correct=correct, tool_names=("python", "expert", "answer"),
        tool_counts=dict(zip(("python", "expert", "answer"), counts)), preference=(0, 0, 0, 1.0, 1.0, 0.0),
        ledger=SimpleNamespace(cost_usd=cost, tool_latency_s=1.0), has_valid_answer=answer is not None,
        samples=(sample,), malformed_turns=malformed,
    )


def test_score_prefers_the_cheaper_correct_rollout_and_filters():
    config = preset("cpu-demo")
    trajs = [fake_trajectory(0, True, 0.01, (1, 0, 1)), fake_trajectory(0, True, 0.5, (0, 1, 1)),
             fake_trajectory(0, False, 0.02, (1, 0, 1)), fake_trajectory(0, False, 0.03, (0, 0, 0), answer=None),
             fake_trajectory(1, True, 0.1, (1, 0, 1)), fake_trajectory(1, True, 0.1, (1, 0, 1))]
    rewards, advantages, keep = score(config, trajs)
    assert rewards[0] > rewards[1] > rewards[2] == 0 and rewards[3] == 0
    assert advantages[0] > 0 > advantages[2]
    np.testing.assert_array_equal(keep, [1, 1, 1, 0, 0, 0])  # no answer; group 1 is flat


def test_malformed_turns_lose_their_tokens():
    mask = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (True, False), False, 0), [0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (False, True), False, 0), [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (False, True), True, 1), np.zeros(10))
    config = preset("cpu-demo")
    traj = fake_trajectory(0, True, 0.1, (1, 0, 1), malformed=(False, True))
    (sample,) = rl_samples(config, [traj], np.array([0.7]), np.array([1.0]), np.array([True]))
    assert sample.advantage == 0.7 and sample.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert rl_samples(config, [traj], np.array([0.7]), np.array([1.0]), np.array([False])) == []


# ------------------------------------------------------------------------------------ run directories


def _run(tmp_path, **changes):
    import dataclasses

    from orchestra_jax.config import save_config
    from orchestra_jax.runlog import create_run_dir

    run = create_run_dir(tmp_path / "run")
    config = dataclasses.replace(preset("test-tiny"), run_dir=str(run.root), **changes)
    save_config(config, run.config_path)
    (run.checkpoints / "3").mkdir()  # what a finished checkpoint leaves
    return run, config


def test_a_new_run_never_starts_over_an_old_one(tmp_path):
    import dataclasses

    import pytest

    from orchestra_jax.config import ConfigError
    from orchestra_jax.rl.trainer import check_run_dir

    run, config = _run(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a run: pass --resume"):
        check_run_dir(config, run)
    check_run_dir(dataclasses.replace(config, resume=True, steps=config.steps + 5), run)  # a longer run: fine


def test_resume_refuses_other_settings_and_names_the_first(tmp_path):
    import dataclasses

    import pytest

    from orchestra_jax.config import ConfigError
    from orchestra_jax.rl.trainer import check_run_dir

    run, config = _run(tmp_path)
    other = dataclasses.replace(config, resume=True, seed=config.seed + 1,
                                optimizer=dataclasses.replace(config.optimizer, lr=0.5))
    with pytest.raises(ConfigError, match=rf"--resume: optimizer.lr is 0.5 here but {config.optimizer.lr!r} in "):
        check_run_dir(other, run)
    resumed = dataclasses.replace(config, resume=True, logging=dataclasses.replace(config.logging, every_steps=7),
                                  checkpoint=dataclasses.replace(config.checkpoint, keep=9))
    check_run_dir(resumed, run)


def test_a_checkpoint_directory_source_starts_from_its_weights(tmp_path, shared_data):
    """--model.source DIR (an HF checkpoint) trains from DIR's weights, not a random init."""
    import dataclasses
    import shutil

    import jax

    from orchestra_jax.models import init_params, save_pretrained
    from orchestra_jax.models.transformer_config import get_preset
    from orchestra_jax.rl.checkpoint import params_digest
    from orchestra_jax.rl.trainer import Trainer

    qwen3 = shared_data / "qwen3"
    source = tmp_path / "source"
    model = dataclasses.replace(get_preset("qwen3-tiny"), vocab_size=151936)
    params = init_params(model, jax.random.key(np.random.randint(1 << 30)))
    save_pretrained(model, params, source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3 / name, source / name)
    config = preset("test-tiny")
    config = dataclasses.replace(config, run_dir=str(tmp_path / "run"), model=dataclasses.replace(
        config.model, source=str(source)), algorithm=dataclasses.replace(config.algorithm, sft_steps=0))
    trainer = Trainer(config, echo=lambda *_: None)
    assert params_digest(trainer.initial_params()) == params_digest(params)


def test_sigterm_after_a_save_was_skipped_still_saves_that_step(tmp_path, monkeypatch):
    import dataclasses

    from orchestra_jax.rl import trainer as T
    from orchestra_jax.rl.checkpoint import Checkpointer

    tiny = preset("test-tiny")
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=3,
                                 checkpoint=dataclasses.replace(tiny.checkpoint, every_steps=10))
    trainer = T.Trainer(config, echo=lambda *_: None)
    original = Checkpointer.save

    def save(self, step, state, meta, *, force=False):
        saved = original(self, step, state, meta, force=force)
        if step == 2:  # SIGTERM lands while step 2's save is being decided (skipped: not every 10th step)
            trainer.stop.requested = True
        return saved

    monkeypatch.setattr(Checkpointer, "save", save)
    assert trainer.train() == T.TERMINATED
    checkpointer = Checkpointer(tmp_path / "run" / "ckpt", config.checkpoint)
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


def test_sigterm_during_the_warm_start_saves_it_and_resume_goes_on_exactly(tmp_path):
    """SIGTERM mid-SFT saves the SFT state; --resume finishes the warm start with bitwise the same weights."""
    import dataclasses
    import os
    import signal

    import pytest

    from orchestra_jax.config import ConfigError
    from orchestra_jax.rl import trainer as T
    from orchestra_jax.rl.checkpoint import params_digest

    tiny = preset("test-tiny")
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), algorithm=dataclasses.replace(
        tiny.algorithm, sft_steps=3, sft_demonstrations=8, sft_batch_size=4))
    whole = T.Trainer(dataclasses.replace(config, run_dir=str(tmp_path / "whole")), echo=lambda *_: None)
    expected = params_digest(whole.initial_params())

    def echo(line):
        if line.startswith("sft step 0"):  # the handler must already be in place: a real signal
            os.kill(os.getpid(), signal.SIGTERM)

    cut = T.Trainer(config, echo=echo)
    assert cut.train() == T.TERMINATED
    cut._lock.close()
    run = tmp_path / "run"
    assert not (run / "init").exists() and [p.name for p in (run / "sft_ckpt").iterdir()] == ["1"]
    with pytest.raises(ConfigError, match="already holds a run"):
        T.Trainer(config, echo=lambda *_: None)
    lines = []
    resumed = T.Trainer(dataclasses.replace(config, resume=True), echo=lines.append)
    assert params_digest(resumed.initial_params()) == expected
    assert "sft: resumed from step 1" in lines and not (run / "sft_ckpt").exists()


def test_resuming_with_other_steps_says_how_it_bends_a_cosine_schedule(tmp_path):
    import dataclasses

    from orchestra_jax.rl.trainer import Trainer

    tiny = preset("test-tiny")
    lines = []
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=20,
                                 optimizer=dataclasses.replace(tiny.optimizer, schedule="cosine", lr=0.1))
    trainer = Trainer(config, echo=lines.append)
    trainer._note_stretched_schedule(20, 10)  # same steps: nothing to say
    trainer._note_stretched_schedule(10, 10)  # began with --steps 10, resumed at 10 with --steps 20
    assert lines == ["note: --steps 20 (the run began with 10) stretches the cosine schedule: the learning rate at "
                     "step 10 goes from 0 to 0.05, so the run is not the one an uninterrupted --steps run would have "
                     "been"]


def test_kl_in_reward_enters_the_group_normalisation_and_sums_the_policy_tokens():
    import dataclasses

    from orchestra_jax.rl.reward import group_advantages
    from orchestra_jax.rl.trainer import trajectory_kl

    rng = np.random.default_rng()
    config = preset("cpu-demo")
    config = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, kl_coef=0.3))
    trajs = [fake_trajectory(0, True, c, (1, 0, 1)) for c in rng.uniform(0.01, 0.5, 4)]
    refs = [[-rng.random(12).astype(np.float32)] for _ in trajs]
    kl = trajectory_kl(trajs, refs, "k1")
    mask = np.array(trajs[0].samples[0].loss_mask, bool)  # token 0 has no log-prob; it is masked anyway here
    np.testing.assert_allclose(kl, [np.sum((-0.5 - r[0])[mask]) for r in refs], rtol=1e-5)
    plain, _, keep = score(config, trajs)
    rewards, advantages, keep_kl = score(config, trajs, kl)
    np.testing.assert_array_equal(rewards, plain)  # the task's reward, logged as such
    np.testing.assert_array_equal(keep_kl, keep)
    np.testing.assert_allclose(advantages, group_advantages(plain - 0.3 * kl, np.zeros(4),
                                                            eps=config.reward.advantage_eps,
                                                            clip=config.reward.advantage_clip))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_step_with_the_kl_in_the_reward(tmp_path, algorithm):
    import dataclasses

    from orchestra_jax.rl.trainer import Trainer
    from orchestra_jax.runlog import read_scalars

    tiny = preset("test-tiny")
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=1, algorithm=dataclasses.replace(
        tiny.algorithm, name=algorithm, kl_coef=0.5, kl_in_reward=True))
    assert Trainer(config, echo=lambda *_: None).train() == 0
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert "train/kl" in scalars and np.isfinite(scalars["train/loss"][0][1])
    assert ("reward/kl_penalty" in scalars) == (algorithm == "grpo")


def _checkpoint_dir(tmp_path, shared_data):
    """qwen3-tiny with random weights and the real Qwen3 tokenizer, as an HF checkpoint directory."""
    import dataclasses
    import shutil

    import jax

    from orchestra_jax.models import init_params, save_pretrained
    from orchestra_jax.models.transformer_config import get_preset

    source = tmp_path / "source"
    model = dataclasses.replace(get_preset("qwen3-tiny"), vocab_size=151936)
    params = init_params(model, jax.random.key(np.random.randint(1 << 30)))
    save_pretrained(model, params, source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_data / "qwen3" / name, source / name)
    return source, params


def test_a_task_file_trains_on_its_domains_tools_and_their_grader(tmp_path, shared_data):
    """env.tasks = a synthesised task file: each episode gets its domain's tools, is graded by executing the
    domain's evaluator, and the step trains on it."""
    import dataclasses
    import json

    from orchestra_jax import cli
    from orchestra_jax.rl.trainer import Trainer
    from orchestra_jax.runlog import read_scalars

    assert cli.main(["synth", "--domain", "clinic", "--out", str(tmp_path / "synth"), "--num-tasks", "4"]) == 0
    source, _ = _checkpoint_dir(tmp_path, shared_data)
    tiny = preset("test-tiny")
    # The clinic's policy and its 13 tool schemas make a prompt of about 2000 tokens.
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=1,
                                 model=dataclasses.replace(tiny.model, source=str(source)),
                                 rollout=dataclasses.replace(tiny.rollout, max_context=3072, max_new_tokens=16),
                                 env=dataclasses.replace(tiny.env, tasks=str(tmp_path / "synth" / "tasks.jsonl"),
                                                         max_turns=1),
                                 algorithm=dataclasses.replace(tiny.algorithm, prompts_per_step=1, group_size=2,
                                                               kl_coef=0.0))
    assert Trainer(config, echo=lambda *_: None).train() == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "trajectories" / "step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["finish_reason"] != "context_full" for r in rows)
    assert all("find_patient_by_email" in r["tool_names"] for r in rows)  # the clinic's own tools
    assert not any(r["correct"] for r in rows)  # a random policy never completes a clinic task
    assert read_scalars(tmp_path / "run" / "tb")["train/samples"][0][1] > 0


@pytest.mark.slow  # about 100 s: two 4700-token rollouts and their step over 8 fake devices on the CPU
def test_a_tau2_domain_trains_with_its_tools_user_simulator_and_grader(tmp_path, shared_data):
    """env.tasks = tau2:airline: each episode talks to the tools file's user simulator (a chat server on
    127.0.0.1), gets the domain's tools minus transfer_to_human_agents, is graded by tau2, and the step trains."""
    import dataclasses
    import json

    from openai_stub import stub_app

    from orchestra_jax.env.search import BackgroundServer
    from orchestra_jax.rl.trainer import Trainer
    from orchestra_jax.runlog import read_scalars

    def user(messages):
        return "I need to change my flight." if len(messages) <= 2 else "Thanks, bye. ###STOP###"

    source, _ = _checkpoint_dir(tmp_path, shared_data)
    tiny = preset("test-tiny")
    app = stub_app(user)
    with BackgroundServer(app) as server:
        tools = {"endpoints": [{"name": "user", "base_url": server.url + "/v1", "model": "stub", "max_retries": 0}],
                 "tau2_user": "user"}
        (tmp_path / "tools.json").write_text(json.dumps(tools))
        # tau2's airline policy and its 13 tool schemas make a prompt of about 4700 tokens.
        config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=1,
                                     model=dataclasses.replace(tiny.model, source=str(source)),
                                     rollout=dataclasses.replace(tiny.rollout, max_context=5632, max_new_tokens=8),
                                     env=dataclasses.replace(tiny.env, tasks="tau2:airline", max_turns=1,
                                                             tools_file=str(tmp_path / "tools.json")),
                                     algorithm=dataclasses.replace(tiny.algorithm, prompts_per_step=1, group_size=2,
                                                                   kl_coef=0.0))
        assert Trainer(config, echo=lambda *_: None).train() == 0
        asked = [r["messages"][0]["content"] for r in app.state.requests]
    rows = [json.loads(line) for line in (tmp_path / "run" / "trajectories" / "step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["finish_reason"] != "context_full" and r["error"] is None for r in rows)
    assert all("get_user_details" in r["tool_names"] and "transfer_to_human_agents" not in r["tool_names"]
               for r in rows)
    assert len(asked) >= 2 and all("<scenario>" in a for a in asked)  # the user simulator was asked each episode
    assert not any(r["correct"] for r in rows)  # a random policy never completes an airline task
    assert read_scalars(tmp_path / "run" / "tb")["train/samples"][0][1] > 0


def test_tau2_plays_its_domains_tasks_with_the_tools_files_user_simulator(tmp_path, shared_data):
    import asyncio
    import dataclasses
    import json

    from orchestra_jax.config import ConfigError
    from orchestra_jax.env.tau2 import Tau2User
    from orchestra_jax.rl.environment import build_environment, task_stream

    tiny = preset("test-tiny")
    tools = {"endpoints": [{"name": "sim", "base_url": "http://127.0.0.1:9/v1", "model": "m"}], "tau2_user": "sim"}
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    source, _ = _checkpoint_dir(tmp_path, shared_data)
    config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, source=str(source)),
                                 env=dataclasses.replace(tiny.env, tasks="tau2:airline", preference_sampling="uniform",
                                                         tools_file=str(tmp_path / "tools.json")),
                                 algorithm=dataclasses.replace(tiny.algorithm, sft_steps=0))
    env = build_environment(config, tmp_path)
    assert "get_user_details" in env.tool_names and "transfer_to_human_agents" not in env.tool_names
    assert len(env.tasks) == 50 and "<policy>" in env.system_prompt  # tau2-bench v1's airline tasks
    stream = task_stream(config, env, 60)
    assert len({t.id for t in stream[:50]}) == 50 and len({t.preference for t in stream}) == 60
    parts = asyncio.run(env.setup(stream[0], 0))
    assert isinstance(parts.user, Tau2User) and parts.user.backend == "sim" and parts.grader is not None

    (tmp_path / "tools.json").write_text(json.dumps({"endpoints": []}))
    config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, source=str(tmp_path)),
                                 env=dataclasses.replace(tiny.env, tasks="tau2:airline",
                                                         tools_file=str(tmp_path / "tools.json")),
                                 algorithm=dataclasses.replace(tiny.algorithm, sft_steps=0))
    with pytest.raises(ConfigError, match=r"env.tools_file: tau2:airline needs a user simulator: set 'tau2_user'"):
        build_environment(config, tmp_path)
    with pytest.raises(ConfigError, match=r"env: unknown tau2 domain 'mars'"):
        build_environment(dataclasses.replace(config, env=dataclasses.replace(config.env, tasks="tau2:mars")), tmp_path)


def test_a_task_files_own_preferences_are_kept_and_the_rest_drawn(tmp_path, shared_data):
    import dataclasses
    import json

    from orchestra_jax.rl.environment import build_environment, task_stream

    own = {"tools": {}, "outcome": 0.25, "cost": 1.0, "latency": 0.5}
    lines = [{"id": "mine", "question": "2+2?", "answer": "4", "preference": own},
             {"id": "drawn", "question": "3+3?", "answer": "6"}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    source, _ = _checkpoint_dir(tmp_path, shared_data)
    tiny = preset("test-tiny")
    config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, source=str(source)),
                                 env=dataclasses.replace(tiny.env, tasks=str(tmp_path / "tasks.jsonl"),
                                                         preference_sampling="uniform"),
                                 algorithm=dataclasses.replace(tiny.algorithm, sft_steps=0))
    env = build_environment(config, tmp_path)
    kept = task_stream(config, env, 6)
    mine = [t.preference for t in kept if t.id == "mine"]
    assert len(mine) == 3 and all((p.outcome, p.cost, p.latency) == (0.25, 1.0, 0.5) for p in mine)
    assert len({t.preference for t in kept if t.id == "drawn"}) == 3  # uniform draws differ
    draw = dataclasses.replace(config, env=dataclasses.replace(config.env, task_preferences="draw"))
    drawn = task_stream(draw, env, 6)
    assert [t.id for t in drawn] == [t.id for t in kept]  # the same seeded order either way
    assert not any((t.preference.outcome, t.preference.cost) == (0.25, 1.0) for t in drawn)
    assert [t.preference for t in drawn if t.id == "drawn"] == [t.preference for t in kept if t.id == "drawn"]


def test_a_checkpoint_policy_speaks_its_familys_chat_template_whatever_its_folder_is_called(tmp_path, shared_data):
    """A llama checkpoint gets SmolLM2's template, as `orchestra-jax serve` and eval give it, not Qwen3's."""
    import dataclasses
    import json
    import shutil

    import jax

    from orchestra_jax.models import init_params, save_pretrained
    from orchestra_jax.models.transformer_config import get_preset
    from orchestra_jax.rl.environment import build_environment

    (tmp_path / "tasks.jsonl").write_text(json.dumps({"id": "a", "question": "2+2?", "answer": "4"}) + "\n")
    tiny = preset("test-tiny")
    for family, template in (("llama", "smollm2"), ("qwen3", "qwen3")):
        source = tmp_path / f"policy-{template[::-1]}"  # the folder's name says nothing
        model = dataclasses.replace(get_preset(f"{family}-tiny"), vocab_size=151936)
        save_pretrained(model, init_params(model, jax.random.key(0)), source)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(shared_data / "qwen3" / name, source / name)
        config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, source=str(source)),
                                     env=dataclasses.replace(tiny.env, tasks=str(tmp_path / "tasks.jsonl")),
                                     algorithm=dataclasses.replace(tiny.algorithm, sft_steps=0))
        assert build_environment(config, tmp_path).template_family == template


def test_a_task_file_needs_a_checkpoint_directory_and_no_warm_start(tmp_path):
    import dataclasses

    from orchestra_jax.config import ConfigError
    from orchestra_jax.rl.environment import build_environment

    tiny = preset("test-tiny")
    config = dataclasses.replace(tiny, env=dataclasses.replace(tiny.env, tasks=str(tmp_path / "tasks.jsonl")))
    with pytest.raises(ConfigError, match="played with the policy's own tokenizer"):
        build_environment(config, tmp_path)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, source=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"env: .*tasks.jsonl"):
        build_environment(config, tmp_path)
    config = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, sft_steps=5))
    with pytest.raises(ConfigError, match="algorithm.sft_steps: the warm start's scripted demonstrations"):
        build_environment(config, tmp_path)
