"""Equivalence tests of the stage-2 writer's fast paths: the tokenizer cache (WriterTokenizer), the ftfy skip for
text ftfy leaves unchanged, and the phase-2 memo of repeated texts. Each fast path must give exactly what the
plain path gives: the same ids, the same cleaned text, the same H5 rows.

Run: python -m pytest tests/test_hdf5_speed_paths.py -q
The real Llama-2 tokenizer is used when ../shared/reference_data is present (skipped otherwise).
"""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import create_hdf5_dataset as c  # noqa: E402
from test_create_hdf5_dataset import (  # noqa: E402
    LLAMA2_HF, VASE_A, VASE_Q, image_dir, make_cfg, read_all, rec, write_jsonl)  # noqa: F401 (image_dir: fixture)

needs_llama2 = pytest.mark.skipif(not LLAMA2_HF.is_dir(), reason="needs ../shared/reference_data/tokenizer")

TEXTS = ["", "a", " a", "a ", "  two  spaces", "\n", "\nWhat is this?", VASE_Q, VASE_A, "USER:", "ASSISTANT:",
         "line one\nline two\n", "tab\tseparated", "Ünïcödé wörds, naïve café", "日本語のテキスト", "emoji 🙂 here",
         "<s> literal special </s>", "</s>", "<unk>", "a&amp;b", "numbers 1234567890 3.14", "▁ already marked",
         "x" * 300, "Mixed CASE and punctuation!?;:'\"()[]{}", " leading space", "trailing space ", "\r\nCRLF"]


def fresh_load(folder):
    c._TOKENIZERS.clear()  # the per-process memo, so the next load goes to the cache or the plain load
    return c.load_writer_tokenizer(folder)


def assert_same_tokenizer(fast, hf):
    assert isinstance(fast, c.WriterTokenizer)
    enc_fast, enc_hf = c.make_encoder(fast), c.make_encoder(hf)
    assert enc_fast(TEXTS) == enc_hf(TEXTS)
    assert [fast.encode(t) for t in TEXTS] == [hf.encode(t) for t in TEXTS]
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(fast, name) == getattr(hf, name), name
    assert len(fast) == len(hf)
    assert fast.get_added_vocab() == hf.get_added_vocab()
    for token in ("▁", "</s>", "<s>", "no-such-token-xyz"):
        assert fast.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token)


def forbid_plain_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded with transformers, not from the cache")

    monkeypatch.setattr(c, "_load_tokenizer", refuse)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer cache
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "llama2"])
def test_cached_tokenizer_tokenizes_like_the_plain_load(which, tok_dir, tmp_path, monkeypatch):
    folder = tok_dir if which == "trained" else LLAMA2_HF
    if not folder.is_dir():
        pytest.skip("needs ../shared/reference_data/tokenizer")
    monkeypatch.setenv(c.TOKENIZER_CACHE_ENV, str(tmp_path / "cache"))
    hf = c.load_tokenizer(folder)
    first = fresh_load(folder)  # the plain load, saved as a cache entry
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    forbid_plain_load(monkeypatch)
    cached = fresh_load(folder)
    assert cached._tokenizer is not first._tokenizer
    assert_same_tokenizer(first, hf)
    assert_same_tokenizer(cached, hf)


def test_a_changed_file_invalidates_the_entry(tok_dir, tmp_path, monkeypatch):
    folder = tmp_path / "tok"
    shutil.copytree(tok_dir, folder)
    cache = tmp_path / "cache"
    monkeypatch.setenv(c.TOKENIZER_CACHE_ENV, str(cache))
    fresh_load(folder)
    (old,) = cache.glob("*.json")
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token": "</s>"', '"eos_token": "<s>"'))
    loads = []
    real = c._load_tokenizer
    monkeypatch.setattr(c, "_load_tokenizer", lambda *a: loads.append(a) or real(*a))
    tok = fresh_load(folder)
    assert len(loads) == 1  # loaded again from the files, not from the old entry
    assert tok.eos_token_id == tok.bos_token_id  # and the edit is seen
    (new,) = cache.glob("*.json")  # the folder's older entry is removed
    assert new != old


def test_a_damaged_entry_is_replaced(tok_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(c.TOKENIZER_CACHE_ENV, str(cache))
    fresh_load(tok_dir)
    (entry,) = cache.glob("*.json")
    entry.write_text(entry.read_text()[:1000])  # e.g. a disk that filled up
    hf = c.load_tokenizer(tok_dir)
    assert_same_tokenizer(fresh_load(tok_dir), hf)
    forbid_plain_load(monkeypatch)
    assert_same_tokenizer(fresh_load(tok_dir), hf)  # the rewritten entry is whole


def test_unwritable_or_disabled_cache_loads_normally(tok_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(c.TOKENIZER_CACHE_ENV, str(blocker / "cache"))  # mkdir fails, even for root
    assert_same_tokenizer(fresh_load(tok_dir), c.load_tokenizer(tok_dir))
    assert blocker.read_text() == "not a folder"
    monkeypatch.setenv(c.TOKENIZER_CACHE_ENV, "off")
    assert c.tokenizer_cache_dir() is None
    assert_same_tokenizer(fresh_load(tok_dir), c.load_tokenizer(tok_dir))


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(c.TOKENIZER_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert c.tokenizer_cache_dir() == tmp_path / "llava-pipeline" / "tokenizers"


# ----------------------------------------------------------------------------------------------------------
# ftfy skip
# ----------------------------------------------------------------------------------------------------------


def test_ftfy_skip_returns_what_ftfy_returns():
    ftfy = pytest.importorskip("ftfy")
    cfg = c.parse_config({}, "test")
    clean = c._make_cleaner(cfg)
    texts = list(TEXTS) + [f"a{chr(i)}b" for i in range(128)] + [
        "&lt;b&gt; bold", "AT&T", "fish &amp; chips", "P&EACUTE;REZ", "\x1b[36mblue\x1b[0m", "a\rb", "a\r\nb",
        "null\x00char", "del\x7fchar", "form\x0cfeed", "vt\x0bhere", "mojibake: sÃ³ âœ”", "ﬁne ligature",
        "ＷＩＤＥ", "“curly” ‘quotes’", "e\u0301 combining", "<tag> &amp; </tag>", "line\u2028sep"]
    for t in texts:
        assert clean(t) == ftfy.fix_text(t, normalization="NFC"), repr(t)
        if c.FTFY_UNCHANGED.fullmatch(t):
            assert ftfy.fix_text(t, normalization="NFC") == t, repr(t)


# ----------------------------------------------------------------------------------------------------------
# Whole runs: fast paths against the plain path, row for row
# ----------------------------------------------------------------------------------------------------------


def records(n=60):
    """Phase-2-like records whose questions and short answers repeat, with text that ftfy does change."""
    out = []
    questions = ["What is it?", VASE_Q, "Is the bus white?\nAnswer the question using a single word or phrase.",
                 "fish &amp; chips?", "Ünïcödé question", "CR\r\nline"]
    for i in range(n):
        turns = []
        for t in range(1 + i % 3):
            q = questions[(i + t) % len(questions)]
            turns += [("<image>\n" + q) if t == 0 and i % 4 else q,
                      ["Yes", "No", VASE_A, f"answer {i} with &lt;b&gt;", "a grey watch " * (i % 7)][(i + t) % 5]]
        out.append(rec(str(i), "a.jpg" if i % 4 else None, *turns))
    return out


def run_both(tmp_path, tok_dir, image_dir, phase, monkeypatch, msl=256, patches=8, n=60):
    write_jsonl(tmp_path / "in" / "data.jsonl", records(n))
    mode = "LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo"
    outs = []
    for plain in (False, True):
        with monkeypatch.context() as mp:
            if plain:  # the HF tokenizer, ftfy on every text, every text tokenized
                mp.setattr(c, "load_writer_tokenizer", c.load_tokenizer)
                mp.setattr(c, "FTFY_UNCHANGED", re.compile(r"(?!)"))
                mp.setattr(c.TokenLayout, "encode_repeated", lambda self, texts: self.encode(texts))
            else:  # blocks of 16 records: later blocks take texts from the memo, which is also cleared
                mp.setattr(c, "RECORDS_PER_BLOCK", 16)
                mp.setattr(c, "MEMO_TEXTS", 40)
            c._TOKENIZERS.clear()
            cfg = make_cfg(tmp_path, tok_dir, image_dir, phase, msl=msl, patches=patches,
                           output_dir=str(tmp_path / f"out_{plain}"))
            c.preprocess(mode, cfg, overwrite=True, progress=False)
            outs.append(read_all(tmp_path / f"out_{plain}"))
    (fast_rows, fast_paths), (plain_rows, plain_paths) = outs
    assert len(fast_rows) == n
    np.testing.assert_array_equal(fast_rows, plain_rows)
    assert fast_paths == plain_paths


@pytest.mark.parametrize("phase", [1, 2])
def test_fast_paths_write_the_rows_of_the_plain_path(phase, tmp_path, tok_dir, image_dir, monkeypatch):
    run_both(tmp_path, tok_dir, image_dir, phase, monkeypatch)


@needs_llama2
def test_fast_paths_write_the_rows_of_the_plain_path_llama2(tmp_path, image_dir, monkeypatch):
    run_both(tmp_path, LLAMA2_HF, image_dir, 2, monkeypatch, msl=2048, patches=576)
