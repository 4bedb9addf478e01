"""A scripted policy behind the real `RolloutEngine` interface: it emits the token ids a script chooses.

Tests drive episodes through it (the ids the episode receives are known exactly), and the SFT warm start uses
it to record demonstrations through the very code path RL episodes take. The script sees each request's prompt
ids and its request id (`trajectory.request_id`: task, group, rollout, turn) and returns text or token ids;
text is encoded with the policy's tokenizer, and `<|im_end|>` is appended unless the script ends the turn
itself. A scripted policy is deterministic, so every emitted token's behaviour log-prob is log 1 = 0 unless
`logprob_fn` says otherwise (tests use it to check that log-probs stay aligned with the loss mask).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestra_jax.env.trajectory import parse_request_id
from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.rollout.engine import Completion, GenerateRequest, RequestError

Script = Callable[[tuple[int, ...], str], "str | Sequence[int]"]
LogprobFn = Callable[[str, int, int], float]
"""(request id, position in the completion, token id) -> behaviour log-prob."""


class ScriptedEngine:
    """RolloutEngine whose completions come from `script`; records every request it served."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        script: Script,
        *,
        end_of_turn: str = "<|im_end|>",
        logprob_fn: LogprobFn | None = None,
        weight_version: str = "scripted-0",
        delay_s: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.end_of_turn_id = tokenizer.token_id(end_of_turn)
        self.logprob_fn = logprob_fn
        self.weight_version = weight_version
        self.delay_s = delay_s
        self.requests: list[GenerateRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        self.requests.extend(requests)
        self.in_flight += len(requests)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            start = time.perf_counter()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return [self._complete(request, start) for request in requests]
        finally:
            self.in_flight -= len(requests)

    def _complete(self, request: GenerateRequest, start: float) -> Completion:
        if not request.prompt_ids:
            raise RequestError(f"request {request.rid!r}: empty prompt")
        out = self.script(tuple(request.prompt_ids), request.rid)
        ids = self.tokenizer.encode(out) if isinstance(out, str) else [int(i) for i in out]
        if not ids or ids[-1] != self.end_of_turn_id:
            ids.append(self.end_of_turn_id)
        stops = set(request.sampling.stop_token_ids) | {self.end_of_turn_id}
        cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        finish = "stop"
        if cut > request.sampling.max_new_tokens:
            cut, finish = request.sampling.max_new_tokens, "length"
        ids = ids[:cut]
        logprobs = tuple(
            self.logprob_fn(request.rid, i, t) if self.logprob_fn else 0.0 for i, t in enumerate(ids)
        )
        return Completion(
            rid=request.rid,
            output_ids=tuple(ids),
            logprobs=logprobs,
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(ids),
            weight_version=self.weight_version,
            latency_s=time.perf_counter() - start,
        )

    async def update_weights(self, params: Any, version: str) -> None:
        self.weight_version = version

    async def health(self) -> bool:
        return True


def turns_script(turns: Mapping[str, Sequence[str]], fallback: str = "") -> Script:
    """A script that answers turn t of task `task_id` with `turns[task_id][t]` (else `fallback`)."""

    def script(prompt_ids: tuple[int, ...], rid: str) -> str:
        task_id, _, _, turn = parse_request_id(rid)
        outputs = turns.get(task_id, ())
        return outputs[turn] if turn < len(outputs) else fallback

    return script
