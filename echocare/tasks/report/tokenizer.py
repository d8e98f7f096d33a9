"""Report text: splitting into words, a tokenizer trained on the training reports, saved as JSON.

Text of any language is split the same way (:func:`split_text`): every CJK character
(Chinese, Japanese kana, Korean syllables) is one token, runs of letters and digits of other
scripts form one word (``1.5``, ``x-ray`` and ``don't`` stay whole), every other visible
character (punctuation, symbols, CJK full-width punctuation) is a token of its own, and white
space only separates. :class:`ReportTokenizer` keeps the words seen at least ``min_count``
times in the training reports plus four special tokens (``<pad>`` 0, ``<bos>`` 1,
``<eos>`` 2, ``<unk>`` 3); rarer words become ``<unk>``. Decoding puts spaces back between
words of space-separated scripts only, so decoding an encoded report gives the report again
up to white space (and letter case when ``lowercase``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "ReportTokenizer", "TokenizerError", "is_cjk", "split_text"]

#: Special tokens, in the order of their ids (pad 0, bos 1, eos 2, unk 3).
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# CJK unified ideographs (+ extension A, compatibility), kana, Hangul syllables.
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(
    rf"[{_CJK_RANGES}]"  # one CJK character
    rf"|(?:[^\W_{_CJK_RANGES}])+(?:[.'\-](?:[^\W_{_CJK_RANGES}])+)*"  # a word: letters/digits, inner . ' -
    r"|[^\w\s]|_",  # any other visible character on its own
    re.UNICODE,
)
_CJK = re.compile(rf"[{_CJK_RANGES}]")
# Punctuation written without a space before it (closing marks, Western and full-width).
_NO_SPACE_BEFORE = set(".,;:!?)]}%'\"") | set("。，、；：！？）」』】》")
# Opening marks written without a space after them.
_NO_SPACE_AFTER = set("([{") | set("（「『【《")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: the message names the file and the problem."""


def is_cjk(token: str) -> bool:
    """True for a single CJK character or CJK full-width punctuation (written without spaces)."""
    return len(token) == 1 and (bool(_CJK.match(token)) or "\u3000" <= token <= "\u303f" or "\uff00" <= token <= "\uffef")


def split_text(text: str, lowercase: bool = True, punctuation: bool = True) -> list[str]:
    """Split a report into tokens: CJK characters one by one, words of other scripts whole,
    punctuation separate (dropped when ``punctuation`` is false, as the text metrics do).

    >>> split_text("Liver: 1.5 cm lesion. 肝脏未见异常。")
    ['liver', ':', '1.5', 'cm', 'lesion', '.', '肝', '脏', '未', '见', '异', '常', '。']
    """
    if not isinstance(text, str):
        raise TypeError(f"report text must be a string, got {type(text).__name__}")
    tokens = _TOKEN.findall(text.lower() if lowercase else text)
    if not punctuation:
        tokens = [t for t in tokens if _CJK.match(t) or any(c.isalnum() for c in t)]
    return tokens


def join_tokens(tokens: Iterable[str]) -> str:
    """Text from tokens: a space between two words of space-separated scripts and after
    punctuation, none next to CJK characters, before closing or after opening marks."""
    out: list[str] = []
    previous = ""
    for token in tokens:
        if out:
            glued = (
                token in _NO_SPACE_BEFORE
                or previous in _NO_SPACE_AFTER
                or is_cjk(token)
                or is_cjk(previous)
            )
            if not glued:
                out.append(" ")
        out.append(token)
        previous = token
    return "".join(out)


class ReportTokenizer:
    """Word/character-level tokenizer of report text with special tokens.

    Args:
        tokens: the vocabulary after the special tokens (ids 4, 5, ...).
        lowercase: lower-case text before splitting (the vocabulary is lower case then).

    Ids: ``pad_id`` 0, ``bos_id`` 1, ``eos_id`` 2, ``unk_id`` 3.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str], lowercase: bool = True) -> None:
        words = [t for t in tokens if t not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("tokenizer vocabulary has duplicate tokens")
        self.lowercase = bool(lowercase)
        self.tokens = list(SPECIAL_TOKENS) + words
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def train(cls, reports: Iterable[str], min_count: int = 1, lowercase: bool = True) -> "ReportTokenizer":
        """Vocabulary of the words (and CJK characters) seen at least ``min_count`` times in
        ``reports``, most frequent first (ties alphabetical, so training is deterministic)."""
        counts = Counter(t for r in reports for t in split_text(r, lowercase))
        if not counts:
            raise ValueError("cannot train a tokenizer on no report text (all training reports are empty)")
        kept = sorted((t for t, c in counts.items() if c >= int(min_count)), key=lambda t: (-counts[t], t))
        return cls(kept, lowercase)

    def encode(self, text: str, add_special: bool = True, max_length: int | None = None) -> list[int]:
        """Ids of ``text`` (``<bos>`` ... ``<eos>`` when ``add_special``); ``max_length`` caps
        the number of text tokens (the end is cut, ``<eos>`` kept)."""
        ids = [self.index.get(t, self.unk_id) for t in split_text(text, self.lowercase)]
        if max_length is not None:
            ids = ids[: int(max_length)]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``: stops at ``<eos>``; pad/bos dropped (unk kept as ``<unk>``)."""
        tokens = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and skip_special:
                break
            if skip_special and i in (self.pad_id, self.bos_id):
                continue
            tokens.append(self.tokens[i] if 0 <= i < len(self.tokens) else SPECIAL_TOKENS[self.unk_id])
        return join_tokens(tokens)

    def to_dict(self) -> dict:
        return {"type": "echocare_report_tokenizer", "version": 1, "lowercase": self.lowercase, "tokens": self.tokens}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer as JSON (``tokens`` in id order, specials first)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ReportTokenizer":
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file (train the bundle first: training writes it).
            TokenizerError: not a tokenizer file (named) or special tokens out of place.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file (training writes it beside the checkpoint; or pass --tokenizer_path)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{path}: not a tokenizer JSON file ({error})") from error
        if not isinstance(data, dict) or data.get("type") != "echocare_report_tokenizer" or not isinstance(data.get("tokens"), list):
            raise TokenizerError(f"{path}: not an EchoCare report tokenizer (expected type 'echocare_report_tokenizer' and a 'tokens' list)")
        tokens = data["tokens"]
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise TokenizerError(f"{path}: the first tokens must be {list(SPECIAL_TOKENS)}, got {tokens[:4]}")
        return cls(tokens[len(SPECIAL_TOKENS) :], bool(data.get("lowercase", True)))
