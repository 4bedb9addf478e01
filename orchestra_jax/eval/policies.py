"""`--policy`: what plays the orchestrator in an evaluation, always behind the `RolloutEngine` interface.

- a training run directory (or its `ckpt/` folder) of orbax checkpoints -> the embedded JAX sampler;
- a Hugging Face directory (config.json + safetensors) or a .gguf file -> the embedded JAX sampler;
- an http(s) URL of an OpenAI-compatible server -> `OpenAIEngine`, which sends the rendered prompt as text to
  /v1/completions (token-faithful chat template, any server with a completions route) or rebuilds the ChatML
  messages for /v1/chat/completions (hosted chat-only models), and tokenises the reply with our tokenizer.

The episode loop renders prompts with our tokenizer and chat template in every case, so the same tools, system
prompt and preference instruction reach a trained checkpoint and a hosted model alike. An endpoint that cannot be
reached is retried with back-off; when every attempt fails the request raises `EngineUnavailable`, which the
episode records as an engine error, and the harness as an example with status "error" (neither right nor wrong).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.rollout.engine import Completion, GenerateRequest, RequestError, RolloutEngine


class PolicyError(ValueError):
    """A `--policy` that cannot be loaded, as one line naming the path or URL."""


class EngineUnavailable(RuntimeError):
    """An OpenAI-compatible policy endpoint failed every attempt."""


@dataclasses.dataclass
class Policy:
    engine: RolloutEngine
    tokenizer: Tokenizer
    family: str
    """Chat-template family the prompts are rendered with (qwen3 or smollm2)."""
    name: str
    training: Any = None
    """The TrainConfig of a training run's checkpoint (its seed fixes the CPU family's world), else None."""

    async def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            await close()


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(<\|im_end\|>|\Z)", re.DOTALL)
_EMPTY_THINK = re.compile(r"^<think>\s*</think>\s*", re.DOTALL)


def chatml_messages(prompt: str) -> list[dict[str, str]]:
    """The messages of a rendered ChatML prompt, without its open generation prompt (for chat-only servers).

    Tool schemas stay inside the system text and tool responses inside user turns, exactly as the template
    rendered them, so a hosted model sees what a local one would.
    """
    messages = []
    for match in _CHATML.finditer(prompt):
        role, content, end = match.groups()
        if not end:  # the generation prompt the model is asked to continue
            continue
        if role == "assistant":
            content = _EMPTY_THINK.sub("", content)
        messages.append({"role": role, "content": content})
    return messages


def _tool_calls_text(tool_calls: Any) -> str:
    """OpenAI `tool_calls` back into Qwen3's `<tool_call>` text, so the episode parses them as usual."""
    parts = []
    for call in tool_calls or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(parts)


class OpenAIEngine:
    """RolloutEngine over an OpenAI-compatible server. Behaviour log-probs are not available (reported as 0)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Tokenizer,
        *,
        api: Literal["completions", "chat"] = "completions",
        api_key: str | None = None,
        timeout_s: float = 300.0,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.tokenizer = tokenizer
        self.api = api
        self.weight_version = f"endpoint:{model}"
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def update_weights(self, params: Any, version: str) -> None:
        raise RequestError("an OpenAI-compatible endpoint policy cannot take new weights")

    async def health(self) -> bool:
        try:
            response = await self._http().get(f"{self.base_url}/models", headers=self._headers)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    def _body(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        sampling = request.sampling
        prompt = self.tokenizer.decode(request.prompt_ids)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed % 2**31
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if self.api == "completions":
            return "/completions", dict(body, prompt=prompt)
        return "/chat/completions", dict(body, messages=chatml_messages(prompt))

    async def _post(self, route: str, body: dict[str, Any], rid: str) -> dict[str, Any]:
        url = f"{self.base_url}{route}"
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._http().post(url, json=body, headers=self._headers)
            except httpx.HTTPError as e:
                last = type(e).__name__
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                detail = " ".join(response.text.split())[:160]
                raise RequestError(f"request {rid!r}: {url} answered HTTP {response.status_code}: {detail}")
            try:
                return response.json()
            except ValueError:
                raise RequestError(f"request {rid!r}: {url} answered non-JSON") from None
        raise EngineUnavailable(f"{url} unreachable after {self.max_attempts} attempts ({last})")

    async def _one(self, request: GenerateRequest) -> Completion:
        start = time.perf_counter()
        route, body = self._body(request)
        data = await self._post(route, body, request.rid)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RequestError(f"request {request.rid!r}: reply has no choices") from None
        if self.api == "completions":
            text = choice.get("text") or ""
        else:
            message = choice.get("message") or {}
            text = "\n".join(t for t in (message.get("content") or "", _tool_calls_text(message.get("tool_calls"))) if t)
        ids = self.tokenizer.encode(text)[: request.sampling.max_new_tokens]
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        if finish == "stop" and request.sampling.stop_token_ids:
            ids.append(request.sampling.stop_token_ids[0])  # the turn ended: close it as the template expects
        usage = data.get("usage") or {}
        return Completion(
            rid=request.rid,
            output_ids=tuple(ids),
            logprobs=(0.0,) * len(ids),
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens") or len(request.prompt_ids)),
            completion_tokens=int(usage.get("completion_tokens") or len(ids)),
            weight_version=self.weight_version,
            latency_s=time.perf_counter() - start,
        )


def _family(config: Any, chat_template: str | None) -> str:
    from orchestra_jax.models.chat_template import family_of

    return chat_template or family_of(getattr(config, "family", ""))


def _tokenizer(path: str | os.PathLike | None, where: str) -> Tokenizer:
    from orchestra_jax.models.tokenizer import TokenizerError

    if path is None:
        raise PolicyError(f"{where}: no tokenizer found; pass --tokenizer PATH (tokenizer.json or its directory)")
    try:
        return Tokenizer.from_file(path)
    except TokenizerError as e:
        raise PolicyError(f"{where}: {e}") from None


def _checkpoint_dir(path: Path) -> Path | None:
    """The orbax step folder's parent: `<run>/ckpt`, or `path` itself when it holds numbered step folders."""
    for candidate in (path / "ckpt", path):
        if candidate.is_dir() and any(p.name.isdigit() and p.is_dir() for p in candidate.iterdir()):
            return candidate
    return None


def _load_run(path: Path, tokenizer_path: str | None) -> tuple[Any, Any, Tokenizer, str, Any]:
    """A training run's latest checkpoint, with the model config and tokenizer the trainer itself rebuilds
    (`rl.environment`): the run's saved tokenizer and the preset sized to it."""
    from orchestra_jax import config as config_lib
    from orchestra_jax.rl import environment
    from orchestra_jax.rl.checkpoint import CheckpointError, load_params

    ckpt = _checkpoint_dir(path)
    run_dir = ckpt.parent if ckpt.name == "ckpt" else path
    try:
        train = config_lib.load_config(run_dir / "config.json")
    except config_lib.ConfigError as e:
        raise PolicyError(f"--policy {path}: not a training run ({e})") from None
    try:
        step, params = load_params(ckpt)
    except CheckpointError as e:
        raise PolicyError(f"--policy {path}: {e}") from None
    if tokenizer_path is not None:
        tok = _tokenizer(tokenizer_path, str(path))
    elif (run_dir / "tokenizer" / "tokenizer.json").is_file() or train.model.source not in environment.MODEL_PRESETS:
        try:
            tok = environment.build_environment(train, run_dir).tokenizer
        except (ValueError, OSError) as e:
            raise PolicyError(f"--policy {path}: {str(e).splitlines()[0]}") from None
    else:
        raise PolicyError(f"--policy {path}: the run has no tokenizer/ folder; pass --tokenizer")
    try:
        model = environment.model_config(train, tok)
    except ValueError as e:
        raise PolicyError(f"--policy {path}: {e}") from None
    return model, params, tok, f"{run_dir.name}@step{step}", train


def load_policy(
    spec: str,
    *,
    tokenizer_path: str | None = None,
    model_name: str | None = None,
    api: Literal["completions", "chat"] = "completions",
    api_key_env: str | None = None,
    chat_template: str | None = None,
    max_slots: int = 16,
    max_context: int = 4096,
    seed: int = 0,
) -> Policy:
    """Build the policy engine for `--policy SPEC`; call inside the event loop that will use it."""
    if spec.startswith(("http://", "https://")):
        key = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise PolicyError(f"--policy {spec}: environment variable {api_key_env} is not set")
        tok = _tokenizer(tokenizer_path, f"--policy {spec}")
        name = model_name or "default"
        engine = OpenAIEngine(spec, name, tok, api=api, api_key=key)
        return Policy(engine, tok, chat_template or "qwen3", f"{name}@{urlsplit(spec).netloc}")

    import jax

    from orchestra_jax import models
    from orchestra_jax.rollout.sampler import EmbeddedEngine

    path = Path(spec)
    training = None
    if not path.exists():
        raise PolicyError(f"--policy {spec}: no such checkpoint, model directory or .gguf file (or give an http(s) URL)")
    if path.suffix == ".gguf" or (path / "config.json").is_file() and any(path.glob("*.safetensors*")):
        try:
            config, params = models.load_pretrained(path)
        except models.CheckpointError as e:
            raise PolicyError(f"--policy {spec}: {e}") from None
        tok = _tokenizer(tokenizer_path or (str(path) if path.suffix == ".gguf" or (path / "tokenizer.json").is_file() else None), spec)
        name = path.name
    elif path.is_dir() and _checkpoint_dir(path) is not None:
        config, params, tok, name, training = _load_run(path, tokenizer_path)
        params = jax.tree.map(jax.numpy.asarray, params)
    else:
        raise PolicyError(f"--policy {spec}: neither an HF model directory, a .gguf file nor a run with orbax checkpoints")
    engine = EmbeddedEngine(
        config, params, max_slots=max_slots, max_context=max_context, weight_version=name,
        detokenize=tok.decode, seed=seed,
    )  # fmt: skip
    return Policy(engine, tok, _family(config, chat_template), name, training)


async def warm_up(policy: Policy, system: str, question: str, tools: Sequence[Any] | None) -> None:
    """Compile the embedded sampler on a real prompt before the clock runs, so the first examples' latency is
    generation, not XLA compilation (other prompt-length buckets still compile when first met)."""
    from orchestra_jax.models import chat_template
    from orchestra_jax.rollout.engine import SamplingParams
    from orchestra_jax.rollout.sampler import EmbeddedEngine

    if not isinstance(policy.engine, EmbeddedEngine):
        return
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = chat_template.render(messages, tools or None, True, False, family=policy.family)
    ids = tuple(policy.tokenizer.encode(text)[: policy.engine.max_context - 4])
    await policy.engine.generate([GenerateRequest(ids, SamplingParams(max_new_tokens=2, temperature=0.0), "warm-up")])


# ------------------------------------------------------------------------------------- τ²-bench gold replay


def tau2_gold_policy(tasks: Sequence[Any]) -> Policy:
    """A scripted policy that plays each τ² task's gold actions (`env.tau2`'s replay script): run through the
    harness, it checks the whole pipeline (tools, user turns, tau2's evaluator, ledger, results) at 100%."""
    from orchestra_jax.env import tau2
    from orchestra_jax.env.scripted import ScriptedEngine
    from orchestra_jax.env.trajectory import parse_request_id

    turns = {task.id: tau2._replay_script(task.metadata["tau2_task"], frozenset())[0] for task in tasks}

    def script(prompt_ids: tuple[int, ...], rid: str) -> str:
        task_id, _, _, turn = parse_request_id(rid)
        return turns[task_id][turn] if turn < len(turns[task_id]) else "Goodbye."

    tokenizer = tau2._replay_tokenizer()
    return Policy(ScriptedEngine(tokenizer, script, weight_version="tau2-gold"), tokenizer, "qwen3", "tau2-gold")


async def tau2_gold_setup(task: Any, rollout: int) -> Any:
    """The episode pieces of a gold replay: a fresh session, its tools, a user who performs the user-side gold
    actions, and tau2's own grader."""
    from orchestra_jax.env import tau2
    from orchestra_jax.env.episode import EpisodeSetup

    # every domain tool is offered, as in env.tau2.replay_gold_actions (some gold answers are a transfer)
    domain, tau2_task = task.metadata["domain"], task.metadata["tau2_task"]
    session = await asyncio.to_thread(tau2.Tau2Session, domain, tau2_task, frozenset())
    _, batches = tau2._replay_script(tau2_task, session.hidden_tools)
    return EpisodeSetup(tau2.session_catalog(session), tau2._ScriptedUser(session, batches), tau2._grader(session))
