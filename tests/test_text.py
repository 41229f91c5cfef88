"""Text frontend: parity with upstream F5-TTS 1.1.22 tokenization, chunking and reference-text fix.

`f5_tts.infer.utils_infer` cannot be imported without its heavy dependencies (pydub, transformers,
...), so the upstream statements we compare against are compiled straight from its source file.
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest
import torch

from f5_triton.errors import CheckpointError
from f5_triton.text import (
    Tokenizer,
    chunk_text,
    fix_reference_text,
    max_chunk_bytes,
    split_for_streaming,
)

from upstream import load

VOCAB_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vocab.txt"

TEXTS = {
    "english": "Some call me nature, others call me mother nature.",
    "chinese": "我们的目标是让每个人都能用上高质量的语音合成。",
    "mixed": "今天我们来聊聊 Triton Inference Server 和 TensorRT 的部署。",
    "mixed_tight": "我用iPhone15拍照,then 发给你OK?",
    "mixed_words": "我穿T恤去做B超，A股上涨，拍X光片。",  # rjieba keeps "T恤" etc. as one segment
    "digits": "The year 2024 had 366 days, 第3季度增长了12.5%.",
    "fullwidth_punct": "你好，世界！真的吗？是的；好：“引号”。",
    "emoji": "Great job 😀👍 太棒了🎉!",
    "polyphones": "银行行长说：长大了要重视重量。他还了还书，还要还钱。一个不一样的人。",
    "curly_quotes": "She said “hello” and ‘goodbye’ – it’s fine.",
    "semicolons": "First; second;third ; fourth.",
    "accents": "Café déjà vu, naïve façade — Ünïcödé.",
    "other_scripts": "カタカナ漢字 한국어 ㄅㄆㄇ ㈱ Ｈｅｌｌｏ ①② 𠮷野家 \u3000 end",
    "whitespace": "  a\tb\n c  ",
    "punct_only": "...!?,;:",
    "empty": "",
}


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    if not VOCAB_PATH.is_file():
        pytest.skip(f"official vocab not found at {VOCAB_PATH}")
    return VOCAB_PATH


@pytest.fixture(scope="module")
def tokenizer(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


@pytest.fixture(scope="module")
def lf_vocab(vocab_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = vocab_path.read_bytes()
    assert b"\r\n" in data, "the official vocab is expected to have CRLF line endings"
    path = tmp_path_factory.mktemp("vocab") / "vocab_lf.txt"
    path.write_bytes(data.replace(b"\r\n", b"\n"))
    return path


@pytest.fixture(scope="module")
def upstream_utils():
    return load("model.utils")


@pytest.fixture(scope="module")
def upstream_vocab(upstream_utils, lf_vocab: Path) -> dict[str, int]:
    vocab, size = upstream_utils.get_tokenizer(str(lf_vocab), "custom")
    assert size == len(vocab)
    return vocab


# --------------------------------------------------------------------------- upstream source snippets


def _utils_infer_source() -> tuple[str, str]:
    package_root = Path(load("model.utils").__file__).resolve().parents[1]  # skips without f5-tts
    path = package_root / "infer" / "utils_infer.py"
    return str(path), path.read_text(encoding="utf-8")


def _upstream_statement(function: str, starts_with: str) -> types.CodeType:
    """Compile the statement of upstream `function` whose source starts with `starts_with`."""
    path, source = _utils_infer_source()
    tree = ast.parse(source)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    for node in ast.walk(func):
        if isinstance(node, ast.stmt):
            if (ast.get_source_segment(source, node) or "").startswith(starts_with):
                return compile(ast.Module(body=[node], type_ignores=[]), path, "exec")
    raise AssertionError(f"upstream {function} has no statement starting with {starts_with!r}")


@pytest.fixture(scope="module")
def upstream_chunk_text():
    namespace = {"re": re}
    exec(_upstream_statement("chunk_text", "def chunk_text"), namespace)  # noqa: S102 - pinned upstream code
    return namespace["chunk_text"]


@pytest.fixture(scope="module")
def upstream_fix_reference_text():
    end_sentence = _upstream_statement("preprocess_ref_audio_text", 'if not ref_text.endswith(". ")')
    add_space = _upstream_statement("infer_batch_process", 'if len(ref_text[-1].encode("utf-8")) == 1')

    def fix(text: str) -> str:
        namespace = {"ref_text": text}
        exec(end_sentence, namespace)  # noqa: S102
        exec(add_space, namespace)  # noqa: S102
        return namespace["ref_text"]

    return fix


@pytest.fixture(scope="module")
def upstream_max_chars():
    end_sentence = _upstream_statement("preprocess_ref_audio_text", 'if not ref_text.endswith(". ")')
    formula = _upstream_statement("infer_process", "max_chars = int(")

    def max_chars(ref_text: str, n_samples: int, sr: int, speed: float) -> int:
        namespace = {"ref_text": ref_text, "audio": torch.zeros(1, n_samples), "sr": sr, "speed": speed}
        exec(end_sentence, namespace)  # noqa: S102
        exec(formula, namespace)  # noqa: S102
        return namespace["max_chars"]

    return max_chars


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_matches_upstream(name, tokenizer, upstream_utils, upstream_vocab):
    text = TEXTS[name]
    tokens = upstream_utils.convert_char_to_pinyin([text], polyphone=True)[0]
    assert tokenizer.to_tokens(text) == tokens
    expected = [upstream_vocab.get(token, 0) for token in tokens]
    assert tokenizer.encode(text) == expected
    if text:
        ids = upstream_utils.list_str_to_idx([tokens], upstream_vocab)
        assert tokenizer.encode_batch([text]).tolist() == ids.tolist()


def test_encode_batch_matches_upstream_padding(tokenizer, upstream_utils, upstream_vocab):
    texts = [TEXTS["english"], TEXTS["chinese"], TEXTS["emoji"], "a"]
    expected = upstream_utils.list_str_to_idx(upstream_utils.convert_char_to_pinyin(texts), upstream_vocab)
    batch = tokenizer.encode_batch(texts)
    assert batch.dtype == torch.long
    assert torch.equal(batch, expected.long())
    assert (batch[3, 1:] == -1).all()


def test_encode_batch_edge_cases(tokenizer):
    assert tokenizer.encode_batch([]).shape == (0, 0)
    batch = tokenizer.encode_batch(["", "ab"])
    assert batch.dtype == torch.long
    assert batch.tolist() == [[-1, -1], tokenizer.encode("ab")]


def test_known_tokens(tokenizer):
    assert tokenizer.to_tokens("你好") == [" ", "ni2", " ", "hao3"]  # tone sandhi: 3-3 -> 2-3
    assert tokenizer.to_tokens("Hi; “x”") == ["H", "i", ",", " ", '"', "x", '"']
    assert tokenizer.to_tokens("T恤") == ["T", " ", "xu4"]
    assert tokenizer.to_tokens("你好world") == [" ", "ni2", " ", "hao3", " ", "w", "o", "r", "l", "d"]
    lines = VOCAB_PATH.read_bytes().decode("utf-8").split("\r\n")
    assert tokenizer.encode("a") == [lines.index("a")]
    assert tokenizer.encode("ni2") == [lines.index("n"), lines.index("i"), lines.index("2")]
    assert tokenizer.encode("😀") == [0]  # not in the vocab -> unknown


def test_official_vocab(tokenizer):
    assert tokenizer.vocab_size == 2545
    assert tokenizer.vocab[" "] == 0
    assert tokenizer.vocab["!"] == 1
    assert all("\r" not in token and "\n" not in token for token in tokenizer.vocab)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "\n\t", "😀🎉👍", "，。！？；：“”", "0123456789", "Ａ１２３", "\x00\x7f", "\ud800", "x" * 5000],
)
def test_encode_never_crashes(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_lone_surrogates_become_replacement_character(tokenizer):
    assert tokenizer.to_tokens("a\ud800b") == ["a", "\ufffd", "b"]
    assert tokenizer.to_tokens("\ud83d\ude00") == ["\U0001f600"]  # a split pair is joined
    assert tokenizer.encode("\ud800") == [tokenizer.vocab["\ufffd"]]


def test_crlf_and_lf_vocab_give_same_ids(vocab_path, lf_vocab, upstream_utils):
    crlf, lf = Tokenizer(vocab_path), Tokenizer(lf_vocab)
    assert crlf.vocab == lf.vocab
    assert crlf.vocab_size == lf.vocab_size
    text = TEXTS["mixed"] + TEXTS["digits"]
    assert crlf.encode(text) == lf.encode(text)
    # Upstream's text-mode open() translates CRLF too, so it reads the CRLF file the same way.
    upstream_crlf, _ = upstream_utils.get_tokenizer(str(vocab_path), "custom")
    assert upstream_crlf == crlf.vocab


def test_vocab_without_final_newline_keeps_last_token(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(" \na\nbc", encoding="utf-8")
    assert Tokenizer(path).vocab == {" ": 0, "a": 1, "bc": 2}


def test_from_tokens():
    tokenizer = Tokenizer.from_tokens([" ", "a", "b", "ni2"])
    assert tokenizer.vocab_size == 4
    assert tokenizer.encode("ab c") == [1, 2, 0, 0]
    assert tokenizer.encode("泥") == [0, 3]


def test_missing_vocab_names_path(tmp_path):
    path = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        Tokenizer(path)


def test_vocab_is_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"", b"a\n \n", b"\n \n", b"  \na\n", b"\xef\xbb\xbf \na\n", b" \na\n \n"])
def test_bad_first_token_or_empty(tmp_path, content):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="vocab"):
        Tokenizer(path)


def test_invalid_utf8_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b" \n\xff\xfe\n")
    with pytest.raises(CheckpointError, match="UTF-8"):
        Tokenizer(path)


def test_from_tokens_validates():
    with pytest.raises(CheckpointError, match="vocab file <from_tokens> is empty"):
        Tokenizer.from_tokens([])
    with pytest.raises(CheckpointError, match="the first token must be a space"):
        Tokenizer.from_tokens(["a", " "])


# --------------------------------------------------------------------------- reference text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello", "Hello.  "),
        ("Hello.", "Hello.  "),
        ("Hello. ", "Hello.  "),
        ("Hello.  ", "Hello.  .  "),
        ("Hi!", "Hi!.  "),
        ("你好。", "你好。"),
        ("你好", "你好.  "),
        ("你好！", "你好！.  "),
        ("Café", "Café.  "),
        ("", ".  "),
        (" ", " .  "),
    ],
)
def test_fix_reference_text(text, expected, upstream_fix_reference_text):
    assert fix_reference_text(text) == expected
    assert upstream_fix_reference_text(text) == expected


# --------------------------------------------------------------------------- chunking

LONG_TEXTS = [
    "A Triton server batches requests dynamically. Each request carries a reference clip, its "
    "transcript and the text to say! Does the model care about punctuation? It does: pauses follow "
    "commas, semicolons; and periods. Numbers like 3.14 or 1,000 should stay whole, right?" * 3,
    "我们的目标是让每个人都能用上高质量的语音合成。今天天气很好，我们去公园散步吧！你觉得怎么样？"
    "好的；没问题：出发。" * 4,
    "今天我们来聊聊 Triton Inference Server，它支持动态批处理。Then we switch to English, for a while. "
    "然后再切回中文！Mixed text is common; 对吧？" * 3,
    "no punctuation at all just a very long run of words that never ends " * 8,
    "Short.",
    "",
    "   ",
    "Trailing spaces,   lots of   them.    And tabs,\tand\nnewlines.\n",
]


@pytest.mark.parametrize("max_chars", [-5, 0, 1, 20, 60, 135, 400])
@pytest.mark.parametrize("index", range(len(LONG_TEXTS)))
def test_chunk_text_matches_upstream(index, max_chars, upstream_chunk_text):
    text = LONG_TEXTS[index]
    assert chunk_text(text, max_chars=max_chars) == upstream_chunk_text(text, max_chars=max_chars)


def test_chunk_text_default_and_values(upstream_chunk_text):
    text = LONG_TEXTS[0]
    chunks = chunk_text(text)
    assert chunks == upstream_chunk_text(text)
    assert len(chunks) > 1
    assert all(len(chunk.encode("utf-8")) <= 135 for chunk in chunks)
    assert chunk_text("One, two. Three!", max_chars=9) == ["One, two.", "Three!"]
    assert chunk_text("你好，世界。", max_chars=9) == ["你好，", "世界。"]


@pytest.mark.parametrize(
    ("ref_text", "n_samples", "sr", "speed"),
    [
        ("Some call me nature, others call me mother nature.", 24000 * 7 + 123, 24000, 1.0),
        ("对，这就是我，万人敬仰的太乙真人。", 16000 * 5, 16000, 1.0),
        ("Hello.", 44100 * 3, 44100, 0.8),
        ("Hi", 24000 * 12, 24000, 1.3),
        ("Too long a reference.", 24000 * 25, 24000, 1.0),
    ],
)
def test_max_chunk_bytes_matches_upstream(ref_text, n_samples, sr, speed, upstream_max_chars):
    expected = upstream_max_chars(ref_text, n_samples, sr, speed)
    assert max_chunk_bytes(ref_text, n_samples / sr, speed) == expected


def test_max_chunk_bytes_value_and_errors():
    # "Hello" -> "Hello. " (7 bytes) over 2 s: 7 / 2 * 20 * 1.0 = 70
    assert max_chunk_bytes("Hello", 2.0, 1.0) == 70
    with pytest.raises(ValueError, match="ref_audio_seconds must be positive, got 0.0"):
        max_chunk_bytes("Hello", 0.0, 1.0)


def test_split_for_streaming():
    text = LONG_TEXTS[0]
    chunks = split_for_streaming(text, first_chunk_bytes=30, max_chars=135)
    regular = chunk_text(text, max_chars=135)
    assert chunks[0] == "A Triton server batches requests dynamically."  # one sentence, longer than 30
    assert len(chunks[0].encode("utf-8")) < len(regular[0].encode("utf-8"))
    assert chunks[-(len(regular) - 1) :] == regular[1:]
    assert " ".join(chunks).split() == text.split()

    # only the opening is split off: the rest of the first chunk stays one chunk (each chunk re-runs the reference)
    assert split_for_streaming("One, two, three. Four five six seven eight.", 10, 135) == [
        "One, two,",
        "three. Four five six seven eight.",
    ]
    assert split_for_streaming("你好，世界。今天很好。", first_chunk_bytes=9, max_chars=135) == [
        "你好，",
        "世界。今天很好。",
    ]
    text = "One, two. Three, four, five six. Seven eight, nine ten eleven."
    assert chunk_text(text, 30) == ["One, two. Three, four,", "five six. Seven eight,", "nine ten eleven."]
    assert split_for_streaming(text, 10, 30) == ["One, two.", "Three, four,", "five six. Seven eight,", "nine ten eleven."]
    assert split_for_streaming("", 10, 135) == []
    assert split_for_streaming("Short.", 100, 135) == ["Short."]


def test_split_for_streaming_cuts_a_long_first_sentence_at_a_word(upstream_chunk_text):
    # an unpunctuated transcript: upstream's chunk_text keeps it one chunk, so the first audio would wait for all of it
    text = "so this transcript has no punctuation at all and it simply keeps going on and on for a long while"
    assert chunk_text(text, 135) == upstream_chunk_text(text, 135) == [text]
    chunks = split_for_streaming(text, first_chunk_bytes=30, max_chars=135)
    assert chunks == ["so this transcript has no", "punctuation at all and it simply keeps going on and on for a long while"]
    assert " ".join(chunks) == text
    # a first sentence up to twice the budget keeps its prosody; a clause boundary within it still comes first
    assert split_for_streaming("A Triton server batches requests dynamically.", 30, 135) == [
        "A Triton server batches requests dynamically."]
    assert split_for_streaming("one two three four five six seven eight nine, ten.", 20, 135) == [
        "one two three four", "five six seven eight nine, ten."]
    # CJK has no spaces: the cut falls between characters, never inside one
    assert split_for_streaming("这是一个没有标点的很长很长的句子我们需要把它切开", 12, 135) == [
        "这是一个", "没有标点的很长很长的句子我们需要把它切开"]
    # accented Latin letters are inside words: the cut stays at a space
    assert split_for_streaming("résumé déjà préparé, café crème brûlée", 12, 135) == [
        "résumé", "déjà préparé, café crème brûlée"]
    # a first word longer than the budget is not cut
    assert split_for_streaming("Supercalifragilisticexpialidocious " * 2, 10, 135) == [
        "Supercalifragilisticexpialidocious Supercalifragilisticexpialidocious"]
