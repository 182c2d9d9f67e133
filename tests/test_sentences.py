"""The MiniLM sentence path: BERT's WordPiece tokenizer (scripts/tokenizer.py) and the sentence
search example on a compiled all-MiniLM-L6 with int8 weights. The vocabulary and model come from
scripts/models.py's cache (scripts/setup.sh fetches them); without them these tests skip, except
under CI=true, where they fail."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import HERE

SCRIPTS = HERE.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import models  # noqa: E402


def _cached(name: str):
    p = models.path(name, fetch_missing=False)
    if not p.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not in the model cache; scripts/setup.sh fetches it")
        pytest.skip(f"{name} not fetched (python scripts/models.py fetch {name})")
    return p


def test_wordpiece_gives_bert_uncased_ids():
    _cached("minilm-vocab")
    import tokenizer

    tok = tokenizer.load()
    assert tok.tokenize("Hello, World! Café") == ["hello", ",", "world", "!", "cafe"]
    enc = tok.encode(["The cat sits on the mat.", "hello"], 12)
    # BERT uncased: [CLS] 101, [SEP] 102, the 1996, cat 4937, hello 7592, '.' 1012
    assert enc["input_ids"][0].tolist() == [101, 1996, 4937, 7719, 2006, 1996, 13523, 1012, 102, 0, 0, 0]
    assert enc["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 9 and enc["input_ids"][1, 1] == 7592
    assert enc["input_ids"].dtype.name == "int64" and not enc["token_type_ids"].any()
    long = tok.encode(["word " * 300], 16)["input_ids"][0]
    assert long[0] == 101 and long[-1] == 102  # truncated, still closed by [SEP]
    assert "[UNK]" in tok.tokenize("x" * 101)


def test_sentence_search_example_finds_the_paraphrases():
    _cached("minilm-vocab")
    _cached("minilm-l6-int8")
    proc = subprocess.run([sys.executable, str(HERE.parent / "examples/sentences.py")], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "-> 'What time does the pharmacy on Main Street open on Sundays?'" in out
    assert "-> 'A cat is sleeping on a sunny windowsill.'" in out
    assert "-> 'The train to the airport leaves every twenty minutes from platform four.'" in out
    diff = float(proc.stderr.rsplit("max abs difference", 1)[1].split()[0])
    assert diff < 1e-4
