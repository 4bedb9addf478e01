"""Benchmark loaders: FRAMES, HLE, HotpotQA/MuSiQue (multihop) and our task JSONL, as plain `EvalExample`s.

Every loader names the file and line of a malformed record. With `strict=False` a bad line is reported through
`on_skip` and skipped; with `strict=True` it is fatal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchmarkError(ValueError):
    """A benchmark file problem, as one line naming the file (and line)."""


@dataclass(frozen=True)
class EvalExample:
    id: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    benchmark: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


SkipHandler = Callable[[str], None]


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    return path


def _jsonl_records(path: Path, strict: bool, on_skip: SkipHandler | None) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected an object, got {type(record).__name__}")
            except ValueError as e:
                message = f"{path}:{lineno}: malformed line ({str(e).splitlines()[0]})"
                if strict:
                    raise BenchmarkError(message) from None
                if on_skip:
                    on_skip(message)
                continue
            yield lineno, record


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {name!r} missing or not a non-empty string")
    return value


def _load_qa_jsonl(
    path: str | Path, benchmark: str, strict: bool, on_skip: SkipHandler | None, keep: tuple[str, ...] = ()
) -> list[EvalExample]:
    path = _require_file(path)
    examples = []
    for lineno, record in _jsonl_records(path, strict, on_skip):
        where = f"{path}:{lineno}"
        try:
            example = EvalExample(
                id=str(record.get("id", f"{benchmark}-{lineno}")),
                question=_field(record, "question", where),
                answer=_field(record, "answer", where),
                benchmark=benchmark,
                metadata={k: record[k] for k in keep if k in record},
            )
        except ValueError as e:
            if strict:
                raise BenchmarkError(str(e)) from None
            if on_skip:
                on_skip(str(e))
            continue
        examples.append(example)
    return examples


def load_frames(path: str | Path, *, strict: bool = False, on_skip: SkipHandler | None = None) -> list[EvalExample]:
    """FRAMES: JSONL of {id, question, answer} (824 rows in ToolOrchestra's copy)."""
    return _load_qa_jsonl(path, "frames", strict, on_skip)


def load_hle(path: str | Path, *, strict: bool = False, on_skip: SkipHandler | None = None) -> list[EvalExample]:
    """HLE (text-only items): JSONL with id, question, answer, answer_type, category."""
    return _load_qa_jsonl(path, "hle", strict, on_skip, keep=("answer_type", "category", "raw_subject"))


def load_multihop(questions_path: str | Path) -> list[EvalExample]:
    """HotpotQA or MuSiQue questions (HippoRAG's JSON list format); MuSiQue answer aliases are kept."""
    path = _require_file(questions_path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise BenchmarkError(f"{path}: expected a JSON list of questions")
    examples = []
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise BenchmarkError(f"{where}: a question needs 'question' and 'answer'")
        examples.append(
            EvalExample(
                id=str(row.get("_id") or row.get("id") or i),
                question=row["question"],
                answer=str(row["answer"]),
                aliases=tuple(str(a) for a in row.get("answer_aliases", ())),
                benchmark="multihop",
                metadata={"type": row.get("type"), "level": row.get("level")},
            )
        )
    return examples


def load_multihop_corpus(corpus_path: str | Path) -> list[Passage]:
    """A passage corpus: HotpotQA's {title: [sentences]} or MuSiQue's [{title, text}]."""
    path = _require_file(corpus_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        return [Passage(title, "".join(sentences)) for title, sentences in data.items()]
    if isinstance(data, list) and all(isinstance(p, dict) and "title" in p and "text" in p for p in data):
        return [Passage(p["title"], p["text"]) for p in data]
    raise BenchmarkError(f"{path}: expected {{title: [sentences]}} or [{{title, text}}]")
