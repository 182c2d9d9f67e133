#!/usr/bin/env python3
"""BERT's uncased WordPiece tokenizer in plain Python, for the MiniLM models' inputs.

The sentence-transformers MiniLM models (paraphrase-MiniLM-L3-v2, all-MiniLM-L6-v2) share BERT's
uncased vocabulary (`scripts/models.py fetch minilm-vocab`). This does what their
tokenizer.json says (BertNormalizer: clean text, CJK characters apart, lowercase and strip
accents; BertPreTokenizer: whitespace and punctuation; WordPiece, '##' continuations, 100
characters a word at most), then [CLS] … [SEP], truncated and padded to ``length``.

    python scripts/tokenizer.py "The cat sits on the mat."
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import numpy as np


class WordPiece:
    def __init__(self, vocab: str | Path):
        tokens = Path(vocab).read_text(encoding="utf-8").splitlines()
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.cls, self.sep, self.pad, self.unk = (self.ids[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def tokenize(self, text: str) -> list[str]:
        out = []
        for word in _basic(text):
            out += self._wordpiece(word)
        return out

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.ids:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def encode(self, texts: list[str], length: int = 128) -> dict[str, np.ndarray]:
        """input_ids, attention_mask, token_type_ids: int64 [len(texts), length]."""
        ids = np.full((len(texts), length), self.pad, np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        for i, text in enumerate(texts):
            toks = [self.cls] + [self.ids.get(t, self.unk) for t in self.tokenize(text)][: length - 2] + [self.sep]
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _basic(text: str) -> list[str]:
    """BertNormalizer + BertPreTokenizer: the words and punctuation marks of ``text``."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        if _is_cjk(cp):
            chars += [" ", ch, " "]
        else:
            chars.append(" " if ch.isspace() else ch)
    text = unicodedata.normalize("NFD", "".join(chars).lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")  # accents stripped
    words = []
    for tok in text.split():
        cur = ""
        for ch in tok:
            if _is_punct(ch):
                if cur:
                    words.append(cur)
                words.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
    return words


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                         (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def load() -> WordPiece:
    """The MiniLM vocabulary from scripts/models.py's cache (fetched if missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models

    return WordPiece(models.path("minilm-vocab"))


if __name__ == "__main__":
    tok = load()
    for text in sys.argv[1:] or ["The cat sits on the mat."]:
        print(tok.tokenize(text), tok.encode([text], 16)["input_ids"][0].tolist())
