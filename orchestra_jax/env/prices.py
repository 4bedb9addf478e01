"""Dollar prices of model tokens, sandbox seconds and search queries.

Defaults are ToolOrchestra's evaluation table (NVlabs/ToolOrchestra `evaluation/eval_hle.py`, Apache-2.0),
with its two 10x typos fixed: it divides the gpt-5 and gpt-5-mini *input* prices by 10,000,000 instead of
1,000,000, which made their prompts ten times cheaper than the tools.json tables the policy reads.
Prices here are dollars per million tokens; `PriceTable.cost` is the one place that turns usage into dollars.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple


class PriceError(ValueError):
    """A missing price or a malformed price file, phrased as one line."""


class Usage(NamedTuple):
    """Tokens one model call consumed; `model` is the real backend name the price table knows."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    input_per_million: float
    output_per_million: float


# ToolOrchestra's eval table, dollars per million tokens (gpt-5 and gpt-5-mini input fixed from /1e7 to /1e6).
TOOLORCHESTRA_MODEL_PRICES: dict[str, ModelPrice] = {
    "gpt-5": ModelPrice(1.25, 10.0),
    "gpt-5-mini": ModelPrice(0.25, 2.0),
    "Qwen/Qwen3-32B": ModelPrice(0.8, 0.8),
    "Qwen/Qwen2.5-Coder-32B-Instruct": ModelPrice(0.8, 0.8),
    "Qwen/Qwen2.5-Math-72B-Instruct": ModelPrice(0.9, 0.9),
    "Qwen/Qwen2.5-Math-7B-Instruct": ModelPrice(0.2, 0.2),
    "meta-llama/Llama-3.3-70B-Instruct": ModelPrice(0.9, 0.9),
    "Qwen/Qwen3-8B": ModelPrice(0.2, 0.2),
}
TOOLORCHESTRA_SANDBOX_USD_PER_SECOND = 0.0000083
TOOLORCHESTRA_SEARCH_FEES = {"web": 0.01}
"""Per-query fees by search backend kind (ToolOrchestra paid Tavily $0.01 a search); unlisted kinds are free."""


@dataclasses.dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelPrice]
    sandbox_usd_per_second: float = TOOLORCHESTRA_SANDBOX_USD_PER_SECOND
    search_usd_per_query: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(TOOLORCHESTRA_SEARCH_FEES)
    )
    source: str = "toolorchestra-defaults"

    def price(self, model: str) -> ModelPrice:
        try:
            return self.models[model]
        except KeyError:
            raise PriceError(f"no price for model {model!r} in price table {self.source}") from None

    def call_cost(self, usage: Usage) -> float:
        """Dollars of one call; a call that used no tokens costs nothing, priced model or not."""
        if usage.prompt_tokens == 0 and usage.completion_tokens == 0:
            return 0.0
        p = self.price(usage.model)
        return (
            p.input_per_million * usage.prompt_tokens + p.output_per_million * usage.completion_tokens
        ) / 1e6

    def cost(
        self,
        usage: Iterable[Usage] = (),
        *,
        sandbox_s: float = 0.0,
        search_queries: int = 0,
        search_kind: str = "local",
    ) -> float:
        """Σ price_in·prompt + price_out·completion over calls, + sandbox seconds × $/s, + search fees."""
        total = sum(self.call_cost(u) for u in usage)
        total += sandbox_s * self.sandbox_usd_per_second
        total += search_queries * self.search_usd_per_query.get(search_kind, 0.0)
        return total

    def with_models(self, extra: Mapping[str, ModelPrice]) -> PriceTable:
        return dataclasses.replace(self, models={**self.models, **extra})

    def to_json(self) -> dict[str, Any]:
        return {
            "models": {
                name: {"input_per_million": p.input_per_million, "output_per_million": p.output_per_million}
                for name, p in self.models.items()
            },
            "sandbox_usd_per_second": self.sandbox_usd_per_second,
            "search_usd_per_query": dict(self.search_usd_per_query),
        }


def default_price_table() -> PriceTable:
    return PriceTable(models=dict(TOOLORCHESTRA_MODEL_PRICES))


def _number(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise PriceError(f"{where}: expected a non-negative number, got {value!r}")
    return float(value)


def price_table_from_json(data: Any, *, base: PriceTable | None = None, source: str = "<json>") -> PriceTable:
    """Overlay a price file's entries on `base` (the ToolOrchestra defaults unless given)."""
    base = base if base is not None else default_price_table()
    if not isinstance(data, dict):
        raise PriceError(f"{source}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"models", "sandbox_usd_per_second", "search_usd_per_query"}
    if unknown:
        raise PriceError(f"{source}: unknown key {sorted(unknown)[0]!r}")
    models = dict(base.models)
    raw_models = data.get("models", {})
    if not isinstance(raw_models, dict):
        raise PriceError(f"{source}: 'models' must be an object of name -> prices")
    for name, entry in raw_models.items():
        where = f"{source}: models[{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"input_per_million", "output_per_million"}:
            raise PriceError(
                f"{where}: expected {{'input_per_million', 'output_per_million'}}, got {entry!r}"
            )
        models[name] = ModelPrice(
            _number(entry["input_per_million"], f"{where}.input_per_million"),
            _number(entry["output_per_million"], f"{where}.output_per_million"),
        )
    sandbox = base.sandbox_usd_per_second
    if "sandbox_usd_per_second" in data:
        sandbox = _number(data["sandbox_usd_per_second"], f"{source}: sandbox_usd_per_second")
    fees = dict(base.search_usd_per_query)
    raw_fees = data.get("search_usd_per_query", {})
    if not isinstance(raw_fees, dict):
        raise PriceError(f"{source}: 'search_usd_per_query' must be an object of kind -> dollars")
    for kind, fee in raw_fees.items():
        fees[kind] = _number(fee, f"{source}: search_usd_per_query[{kind!r}]")
    return PriceTable(models=models, sandbox_usd_per_second=sandbox, search_usd_per_query=fees, source=source)


def load_price_table(path: str | Path, *, base: PriceTable | None = None) -> PriceTable:
    """Read a user's price file (same shape as `PriceTable.to_json`) and overlay it on the defaults."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PriceError(f"cannot read price file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise PriceError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return price_table_from_json(data, base=base, source=str(path))
