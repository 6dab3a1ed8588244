"""Tests for write_llama_tokenizer and the synthetic_shapes demo dataset of preprocess_dataset.py.

Run: python -m pytest tests/test_preprocess_shapes.py -q
"""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import preprocess_dataset as P  # noqa: E402

SYSTEM = P.VICUNA_V1_SYSTEM_PROMPT


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [SYSTEM, "USER:", "ASSISTANT:"] + [f"What color is the shape number {i}?\nred" for i in range(300)]
    return P.write_llama_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


def test_tokenizer_folder_loads_fast_and_slow_with_llama_ids(tokenizer_dir):
    from transformers import AutoTokenizer

    assert {p.name for p in tokenizer_dir.iterdir()} >= {
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    fast = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
    slow = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)
    assert type(fast).__name__ == "LlamaTokenizerFast" and type(slow).__name__ == "LlamaTokenizer"
    for tok in (fast, slow):
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, None)
        assert tok.convert_tokens_to_ids("▁") not in (None, tok.unk_token_id)
    for text in ["USER: hi ASSISTANT:", "USER:", "ASSISTANT:", SYSTEM, "\nWhat is 42?", "Zoë  two  spaces", "red"]:
        assert fast.encode(text) == slow.encode(text), text
    ids = fast.encode("USER: hi ASSISTANT:")
    assert ids[0] == 1 and fast.decode(ids, skip_special_tokens=True) == "USER: hi ASSISTANT:"
    # Llama-2 behaviour the HDF5 stage relies on: a leading "\n" becomes "▁" + <0x0A>.
    assert fast.convert_ids_to_tokens(fast.encode("\nWhat"))[1:3] == ["▁", "<0x0A>"]


def test_tokenizer_is_deterministic(tokenizer_dir, tmp_path):
    texts = [SYSTEM, "USER:", "ASSISTANT:"] + [f"What color is the shape number {i}?\nred" for i in range(300)]
    again = P.write_llama_tokenizer(texts, tmp_path / "again", vocab_size=400)
    assert (again / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------------------------- synthetic_shapes

N_TRAIN, N_EVAL, SIZE = 240, 24, 48


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "demo"
    rc = P.main(["synthetic_shapes", "--output_dir", str(out), "--num_train", str(N_TRAIN), "--num_eval",
                 str(N_EVAL), "--image_size", str(SIZE), "--seed", "3", "--vocab_size", "1000", "--no_progress"])
    assert rc == 0
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_shapes_layout_and_manifest_counts(shapes):
    manifest = json.loads((shapes / "manifest.json").read_text())
    for phase in ("phase1", "phase2"):
        for split in ("train", "eval"):
            assert manifest["files"][phase][split] == f"{phase}/{split}/data.jsonl"
    c = manifest["counts"]
    assert (c["train"]["images"], c["eval"]["images"]) == (N_TRAIN, N_EVAL)
    assert len(read_jsonl(shapes / "phase1/train/data.jsonl")) == N_TRAIN == c["train"]["phase1_records"]
    assert len(read_jsonl(shapes / "phase2/eval/data.jsonl")) == c["eval"]["phase2_records"]
    assert len(list((shapes / "images/train").glob("*.png"))) == N_TRAIN
    assert manifest["seed"] == 3 and manifest["image_size"] == SIZE and manifest["image_root"] == "images"
    for qtype, entry in manifest["question_types"].items():
        assert len(entry["answers"]) >= 4, qtype
    assert not list(shapes.rglob(".*partial*"))


def test_shapes_held_out_questions_in_llava_eval_format(shapes):
    """phase2/eval/questions.jsonl: each held-out image's first phase-2 question, as the LLaVA repo's evaluation
    question files hold them (no <image> in the text), with the question type and the phase-2 record's answer."""
    manifest = json.loads((shapes / "manifest.json").read_text())
    questions = read_jsonl(shapes / manifest["questions"])
    records = [r for r in read_jsonl(shapes / "phase2/eval/data.jsonl") if "image" in r]
    assert len(questions) == len(records) == N_EVAL
    for q, r in zip(questions, records):
        assert (q["question_id"], q["image"]) == (r["id"], r["image"])
        assert q["text"] == r["conversations"][0]["value"].replace("<image>\n", "")
        assert q["answer"] == r["conversations"][1]["value"]
        assert q["text"].split("\n")[0] in P.QUESTIONS[q["category"]]
        assert q["answer"] in manifest["question_types"][q["category"]]["answers"]


def test_shapes_records_follow_llava_formats(shapes):
    for split in ("train", "eval"):
        for r in read_jsonl(shapes / f"phase1/{split}/data.jsonl"):
            img = Image.open(shapes / "images" / r["image"])
            assert img.size == (SIZE, SIZE) and r["image"].startswith(f"{split}/")
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            request = human["value"].replace("<image>", "").strip()
            assert request in P.CAPTION_QUESTIONS
            assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        text_only = multi = 0
        for r in read_jsonl(shapes / f"phase2/{split}/data.jsonl"):
            conv = r["conversations"]
            assert len(conv) % 2 == 0 and [t["from"] for t in conv[:2]] == ["human", "gpt"]
            if "image" not in r:
                text_only += 1
                assert r["model"] == "" and "<image>" not in conv[0]["value"]
            else:
                assert conv[0]["value"].startswith("<image>\n")
                assert all("<image>" not in t["value"] for t in conv[1:])
                multi += len(conv) > 2
        assert text_only >= 2 and multi >= 1


def question_type(question: str) -> str:
    q = question.replace("<image>\n", "").split("\n")[0]
    return next(t for t, qs in P.QUESTIONS.items() if q in qs)


def test_shapes_answers_are_short_and_need_the_image(shapes):
    """Every answer is one word of its type's vocabulary, and each question text has >= 4 answers with none
    near half of the cases (checked on 3000 sampled scenes): the text alone cannot answer it."""
    for r in read_jsonl(shapes / "phase2/train/data.jsonl"):
        if "image" in r:
            conv = r["conversations"]
            for human, gpt in zip(conv[::2], conv[1::2]):
                assert gpt["value"] in P.ANSWERS[question_type(human["value"])]
    import random

    rng = random.Random(0)
    by_question = defaultdict(Counter)
    for _ in range(3000):
        conv = P.phase2_conversation(P.sample_scene(rng, 16, np), rng)
        for human, gpt in zip(conv[::2], conv[1::2]):
            by_question[human["value"].replace("<image>\n", "").split("\n")[0]][gpt["value"]] += 1
    assert set(by_question) == {q for qs in P.QUESTIONS.values() for q in qs}
    for question, answers in by_question.items():
        assert len(answers) >= 4, (question, answers)
        assert max(answers.values()) / sum(answers.values()) < 0.35, (question, answers)


def saturated_pixels(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    sat = rgb.max(-1) - rgb.min(-1)
    return rgb, sat > 90


def test_shapes_pixels_match_colour_and_position_answers(shapes):
    palette = {name: np.array(c, np.float32) for name, c in P.COLORS.items()}
    checked = Counter()
    for r in read_jsonl(shapes / "phase2/train/data.jsonl"):
        if "image" not in r:
            continue
        rgb, mask = saturated_pixels(shapes / "images" / r["image"])
        conv = r["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            qtype = question_type(human["value"])
            if qtype == "color":
                mean = rgb[mask].mean(0)
                nearest = min(palette, key=lambda n: np.abs(palette[n] - mean).sum())
                assert nearest == gpt["value"], r["id"]
                checked["color"] += 1
            elif qtype == "position":
                ys, xs = np.nonzero(mask)
                cell = (int(xs.mean() * 3 // SIZE), int(ys.mean() * 3 // SIZE))
                assert cell == P.POSITIONS[gpt["value"]], r["id"]
                checked["position"] += 1
    assert checked["color"] >= 10 and checked["position"] >= 5


def test_shapes_deterministic_and_eval_is_a_different_stream(shapes, tmp_path):
    out = tmp_path / "again"
    P.make_synthetic_shapes(out, num_train=N_TRAIN, num_eval=N_EVAL, image_size=SIZE, seed=3, vocab_size=1000,
                            progress=False)
    for rel in ("phase1/train/data.jsonl", "phase2/eval/data.jsonl", "images/train/000007.png",
                "tokenizer/tokenizer.model"):
        assert (out / rel).read_bytes() == (shapes / rel).read_bytes(), rel
    train0 = read_jsonl(shapes / "phase1/train/data.jsonl")[:N_EVAL]
    eval0 = read_jsonl(shapes / "phase1/eval/data.jsonl")
    assert [r["conversations"][1]["value"] for r in train0] != [r["conversations"][1]["value"] for r in eval0]
    other = tmp_path / "seed4"
    P.make_synthetic_shapes(other, num_train=20, num_eval=2, image_size=SIZE, seed=4, progress=False)
    assert (other / "images/train/000000.png").read_bytes() != (shapes / "images/train/000000.png").read_bytes()


def test_shapes_tokenizer_covers_the_texts(shapes):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shapes / "tokenizer")
    # Trained on the dataset's texts, the answer words are short pieces (no byte fallback).
    for word in [w for answers in P.ANSWERS.values() for w in answers]:
        pieces = tok.tokenize(word)
        assert len(pieces) <= 2 and not any(p.startswith("<0x") for p in pieces), (word, pieces)
    ids = tok.encode(SYSTEM)
    assert tok.unk_token_id not in ids and len(ids) < 60
