"""Text frontend: tokenizer, reference-text fix and chunking, matching upstream F5-TTS 1.1.22.

* `Tokenizer` turns text into the model's token ids: Chinese characters become TONE3 pinyin
  syllables (each preceded by a " " token), everything else stays character by character
  (upstream `convert_char_to_pinyin(..., polyphone=True)` + `list_str_to_idx`).
* `fix_reference_text` is the punctuation upstream adds to the reference transcript before it is
  joined with the text to generate.
* `chunk_text`, `max_chunk_bytes` and `split_for_streaming` split long target texts into batches
  that each fit in one generation window; `StreamingChunker` is `split_for_streaming` with its settings, the
  chunker a streaming `pipeline.Preprocessor` is built with.

Lengths here are UTF-8 byte counts, as upstream uses them (a Chinese character counts 3).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import rjieba
import torch
from pypinyin import Style, lazy_pinyin
from torch.nn.utils.rnn import pad_sequence

from f5_triton.config import DEFAULT_STREAMING, StreamingConfig
from f5_triton.errors import CheckpointError

__all__ = [
    "Tokenizer",
    "text_to_tokens",
    "fix_reference_text",
    "chunk_text",
    "max_chunk_bytes",
    "split_for_streaming",
    "StreamingChunker",
]

PAD_ID = -1  # batch padding in `encode_batch`; the model shifts ids by +1 so padding becomes 0
UNKNOWN_ID = 0  # out-of-vocabulary tokens map to the id of " " (the vocab's first token)

# Characters the vocab lacks, replaced by ones it has (upstream's `custom_trans`).
_OOV_REPLACEMENTS = str.maketrans({";": ",", "“": '"', "”": '"', "‘": "'", "’": "'"})
# After one of these tokens no " " is inserted before a following ASCII word.
_NO_SPACE_AFTER = " :'\""


# --------------------------------------------------------------------------- pinyin conversion


def _is_cjk(char: str) -> bool:
    """Upstream's "is chinese" test: Bopomofo up to the end of CJK Unified Ideographs."""
    return "\u3100" <= char <= "\u9fff"


def _pinyin(text: str) -> list[str]:
    return lazy_pinyin(text, style=Style.TONE3, tone_sandhi=True)


def _add_ascii_segment(tokens: list[str], segment: str) -> None:
    # `in` on a string is a substring test (as upstream), so an empty previous token counts as "no space".
    if tokens and len(segment) > 1 and tokens[-1] not in _NO_SPACE_AFTER:
        tokens.append(" ")
    tokens.extend(segment)


def _add_mixed_segment(tokens: list[str], segment: str) -> None:
    for char in segment:
        if ord(char) < 256:
            tokens.append(char)
        elif _is_cjk(char):
            tokens.append(" ")
            tokens.extend(_pinyin(char))
        else:
            tokens.append(char)


def _add_wide_segment(tokens: list[str], segment: str) -> None:
    """A segment of 3-byte characters only: converted as a whole so that tone sandhi sees the word."""
    syllables = _pinyin(segment)
    if len(syllables) != len(segment):
        # pypinyin merges runs of non-Han characters into one item; upstream would raise IndexError
        # here. rjieba never yields such a segment today, but fall back to per-character conversion.
        _add_mixed_segment(tokens, segment)
        return
    for char, syllable in zip(segment, syllables):
        if _is_cjk(char):
            tokens.append(" ")
        tokens.append(syllable)


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates (e.g. from a JSON "\\ud800" escape) cannot be UTF-8 encoded and would crash
    rjieba; split surrogate pairs are joined and lone ones become U+FFFD (upstream raises here)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def text_to_tokens(text: str) -> list[str]:
    """Token strings of `text`, as upstream `convert_char_to_pinyin([text], polyphone=True)[0]`."""
    tokens: list[str] = []
    text = _replace_lone_surrogates(text).translate(_OOV_REPLACEMENTS)
    for segment in rjieba.cut(text):
        n_bytes = len(segment.encode("utf-8"))
        if n_bytes == len(segment):
            _add_ascii_segment(tokens, segment)
        elif n_bytes == 3 * len(segment):
            _add_wide_segment(tokens, segment)
        else:
            _add_mixed_segment(tokens, segment)
    return tokens


# --------------------------------------------------------------------------- tokenizer


def _read_vocab_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as file:
            content = file.read().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"vocab file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"vocab file {path} is not valid UTF-8: {error}") from None
    except OSError as error:
        raise CheckpointError(f"cannot read vocab file {path}: {error}") from None
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file's final newline
    # CRLF and LF files give the same tokens (as upstream, whose text-mode open() translates "\r\n").
    # Unlike upstream's `line[:-1]`, a last line without a newline keeps its final character.
    return [line[:-1] if line.endswith("\r") else line for line in lines]


class Tokenizer:
    """Maps text to vocab ids; built from a vocab.txt with one token per line, " " first."""

    def __init__(self, vocab_path: str | os.PathLike[str]):
        path = os.fspath(vocab_path)
        self._set_tokens(_read_vocab_lines(path), source=path)

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> Tokenizer:
        """A tokenizer whose vocab is `tokens` in order (mainly for tests)."""
        tokenizer = cls.__new__(cls)
        tokenizer._set_tokens(list(tokens), source="<from_tokens>")
        return tokenizer

    def _set_tokens(self, tokens: list[str], source: str) -> None:
        if not tokens:
            raise CheckpointError(f"vocab file {source} is empty")
        if tokens[0] != " ":
            raise CheckpointError(
                f"vocab file {source}: the first token must be a space (id 0 is used for unknown "
                f"characters), got {tokens[0]!r}"
            )
        # A repeated token keeps its last line index and vocab_size counts distinct tokens, as upstream.
        self.vocab: dict[str, int] = {token: index for index, token in enumerate(tokens)}
        self.vocab_size: int = len(self.vocab)
        if self.vocab[" "] != 0:
            raise CheckpointError(f"vocab file {source}: the space token is repeated at line {self.vocab[' '] + 1}")

    def to_tokens(self, text: str) -> list[str]:
        """Pinyin / character tokens of `text` (before the vocab lookup)."""
        return text_to_tokens(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; tokens missing from the vocab become 0."""
        return [self.vocab.get(token, UNKNOWN_ID) for token in text_to_tokens(text)]

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        """[batch, longest] int64 ids, shorter rows padded with -1 (upstream `list_str_to_idx`)."""
        rows = [torch.tensor(self.encode(text), dtype=torch.long) for text in texts]
        if not rows:
            return torch.empty((0, 0), dtype=torch.long)
        return pad_sequence(rows, batch_first=True, padding_value=PAD_ID)


# --------------------------------------------------------------------------- reference text


def _end_reference_sentence(text: str) -> str:
    """Upstream `preprocess_ref_audio_text`: make the transcript end with ". " or "。"."""
    if text.endswith(". ") or text.endswith("。"):
        return text
    return text + (" " if text.endswith(".") else ". ")


def fix_reference_text(text: str) -> str:
    """The reference transcript exactly as upstream prepends it to the text to generate.

    Upstream first ends it with a sentence mark (`preprocess_ref_audio_text`) and then, in
    `infer_batch_process`, adds a space after a final one-byte character. So "Hello" and
    "Hello." both become "Hello.  " (two spaces), while "你好。" is unchanged.
    """
    text = _end_reference_sentence(text)
    if len(text[-1].encode("utf-8")) == 1:
        text += " "
    return text


# --------------------------------------------------------------------------- chunking

# Split after ASCII punctuation followed by whitespace (which is dropped), or right after
# full-width punctuation.
_SENTENCE_BREAK = re.compile(r"(?<=[;:,.!?])\s+|(?<=[；：，。！？])")


def _with_separator(sentence: str) -> str:
    """A sentence ending in a one-byte character gets a trailing space before the next one."""
    return sentence + " " if len(sentence[-1].encode("utf-8")) == 1 else sentence


def chunk_text(text: str, max_chars: int = 135) -> list[str]:
    """Greedily pack sentences into chunks of at most `max_chars` UTF-8 bytes (upstream `chunk_text`).

    A sentence longer than `max_chars` becomes a chunk of its own; chunks are stripped.
    """
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_BREAK.split(text):
        if not sentence:
            continue
        # Upstream compares the byte length of the sentence without its separator space.
        fits = len(current.encode("utf-8")) + len(sentence.encode("utf-8")) <= max_chars
        if fits:
            current += _with_separator(sentence)
        else:
            if current:
                chunks.append(current.strip())
            current = _with_separator(sentence)
    if current:
        chunks.append(current.strip())
    return chunks


def max_chunk_bytes(ref_text: str, ref_audio_seconds: float, speed: float) -> int:
    """Upstream `infer_process`'s `max_chars`: the bytes of text that fit in a ~22 s window.

    `ref_text` is the user's transcript: the sentence mark upstream adds before this formula is
    added here (so do not pass `fix_reference_text(...)`). `ref_audio_seconds` is the length of
    the reference audio. The result is not clamped: it is <= 0 for references of 22 s or more,
    and `chunk_text` then makes one chunk per sentence.
    """
    if ref_audio_seconds <= 0:
        raise ValueError(f"ref_audio_seconds must be positive, got {ref_audio_seconds}")
    ref_bytes = len(_end_reference_sentence(ref_text).encode("utf-8"))
    # Same operation order as upstream so that int() truncates identically.
    return int(ref_bytes / ref_audio_seconds * (22 - ref_audio_seconds) * speed)


def split_for_streaming(text: str, first_chunk_bytes: int, max_chars: int = 135) -> list[str]:
    """Chunks for streaming: `chunk_text` with `max_chars`, then the first chunk's opening sentences, up to
    `first_chunk_bytes`, split off so that the first audio comes back sooner.

    Upstream's socket server re-splits the whole first chunk into pieces of that size; here the rest of it stays
    one chunk, because every chunk runs the reference through the DiT again (as many frames as the reference).
    Sentence and clause boundaries are used first, so a first sentence up to twice `first_chunk_bytes` stays whole
    (its prosody is worth a little wait); a longer one (an unpunctuated transcript, say) is cut at its last word
    boundary within `first_chunk_bytes` (`_opening_words`), so that no text makes the first audio wait for it all.
    """
    chunks = chunk_text(text, max_chars=max_chars)
    if not chunks:
        return []
    first = chunk_text(chunks[0], max_chars=first_chunk_bytes)[0]
    if len(first.encode("utf-8")) > 2 * first_chunk_bytes:
        first = _opening_words(first, first_chunk_bytes)
    rest = chunks[0][len(first):].strip()  # `first` is a prefix of the first chunk
    return [first] + chunk_text(rest, max_chars=max_chars) + chunks[1:]


@dataclass(frozen=True)
class StreamingChunker:
    """A stream's chunker (`pipeline.Chunker`): `split_for_streaming` with `config`'s first chunk, each chunk within
    the request's `max_bytes`. A streaming `pipeline.Preprocessor` is built with one; its repr names what it cuts by
    (the streaming output cache keys on it), not `config`'s other settings."""

    config: StreamingConfig = DEFAULT_STREAMING

    def __post_init__(self):
        if self.config.first_chunk_bytes < 1:
            raise ValueError(f"first_chunk_bytes must be >= 1, got {self.config.first_chunk_bytes}")

    def __repr__(self) -> str:
        return f"StreamingChunker(first_chunk_bytes={self.config.first_chunk_bytes})"

    def __call__(self, text: str, max_bytes: int) -> list[str]:
        return split_for_streaming(text, self.config.first_chunk_bytes, max_chars=max_bytes)


def _opening_words(sentence: str, max_bytes: int) -> str:
    """The longest prefix of `sentence` of at most `max_bytes` UTF-8 bytes that ends at a word boundary: before a
    space, or after a letter of a script written without spaces (Unicode category Lo: CJK, kana, Thai; not accented
    Latin letters). The whole sentence if its first word is longer than that."""
    cut = size = 0
    for i in range(1, len(sentence)):
        size += len(sentence[i - 1].encode("utf-8"))  # bytes of sentence[:i]
        if size > max_bytes:
            break
        if sentence[i].isspace() or unicodedata.category(sentence[i - 1]) == "Lo":
            cut = i
    return sentence[:cut].rstrip() if cut else sentence
