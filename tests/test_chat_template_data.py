"""Phase-2 H5 data laid out by chat templates (dataset.system_prompt_style: chat_template / llama3 / qwen2 / mistral)
and phase 1 with byte-level BPE tokenizers.

    python -m pytest -q tests/test_chat_template_data.py

Token layouts are asserted against the template's own rendering, tokenized independently here, with tokenizers the
tests train themselves (always) and with the real Llama-3.1-Instruct and Qwen3 tokenizers when
../shared/reference_data is present.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import create_hdf5_dataset as c
from preprocess_dataset import write_bpe_chat_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_data" / "tokenizer"
NP = 6
TEXTS = ["What color is the shape?\n\nThe shape is red.", "How many shapes are there?", "There are two shapes.",
         "Describe the image.", "A red circle above a blue square.", "What is shown?", "A cat."] * 30
Q1, A1, Q2, A2 = "What color is the shape?", "The shape is red.", "How many shapes are there?", "There are two shapes."


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe_chat")
    return {fam: write_bpe_chat_tokenizer(TEXTS, root / fam, fam, vocab_size=400) for fam in ("llama3", "qwen2")}


def real_tokenizer(name):
    folder = REFERENCE / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not present (reference data)")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(d / "a.jpg")
    return d


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def run(tmp_path, tok_dir, image_dir, records, phase=2, msl=256, **dataset):
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    (tmp_path / "in" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {"setup": {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "processes": 1},
           "processing": {"huggingface_tokenizer": str(tok_dir), "max_seq_length": msl, "display_pbar": False},
           "dataset": {"image_dir": str(image_dir), "num_patches": NP, **dataset}}
    cfg = c.parse_config(raw, "test")
    result = c.preprocess("LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo", cfg, overwrite=True, progress=False)
    rows = []
    for p in sorted((tmp_path / "out").glob("*.h5")):
        with h5py.File(p, "r") as f:
            rows.append(f["data"][:])
    return result, (np.concatenate(rows) if rows else np.zeros((0, 4, msl), np.int32))


def reference_ids(tok, messages, pad):
    """The template's own rendering, split at the image as the processor's <image> token splits it, each side
    tokenized on its own; the image becomes NP pad slots; the text after the last end of turn is dropped."""
    text = tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    before, after = text.split("<image>")
    ids = tok.encode(before, add_special_tokens=False) + [pad] * NP + tok.encode(after, add_special_tokens=False)
    while ids[-1] != tok.eos_token_id:
        ids.pop()
    return ids


def check_row(tok, row, messages, pad, targets_text):
    ids = reference_ids(tok, messages, pad)
    n = len(ids) - 1
    np.testing.assert_array_equal(row[0, :n], ids[:-1])  # input_ids
    np.testing.assert_array_equal(row[2, :n], ids[1:])  # labels
    assert (row[0, n:] == pad).all() and (row[1, n:] == 0).all()
    assert tok.decode(row[2][row[1] == 1]) == targets_text  # loss exactly on answers + end-of-turn tokens


def image_messages(q1, a1, q2, a2):
    return [{"role": "user", "content": f"<image>\n{q1}"}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]


# ----------------------------------------------------------------------------------------------------------
# Token layouts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,eot", [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>")])
def test_two_turn_image_record_matches_the_template_token_for_token(tmp_path, bpe_dirs, image_dir, family, eot):
    tok = c.load_tokenizer(bpe_dirs[family])
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"<image>\n{Q1}", A1, Q2, A2)}]
    result, rows = run(tmp_path, bpe_dirs[family], image_dir, records, system_prompt_style="chat_template")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    check_row(tok, rows[0], image_messages(Q1, A1, Q2, A2), pad, f"{A1}{eot}{A2}{eot}")
    before = tok.apply_chat_template([{"role": "user", "content": "<image>"}], tokenize=False).split("<image>")[0]
    start = len(tok.encode(before, add_special_tokens=False))
    assert result["image_patch_info"]["image_patch_start_idx"] == start
    assert (rows[0, 3, start:start + NP] == 0).all()  # image slots attended (key_padding_mask 0)
    assert result["post-process"]["eos_id"] == tok.eos_token_id


def test_short_style_name_gives_the_same_rows_as_the_tokenizers_own_template(tmp_path, bpe_dirs, image_dir):
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"{Q1}\n<image>", A1, Q2, A2)},
               {"id": "2", "conversations": conv(Q2, A2)}]
    _, own = run(tmp_path / "own", bpe_dirs["llama3"], image_dir, records, system_prompt_style="chat_template")
    _, named = run(tmp_path / "named", bpe_dirs["llama3"], image_dir, records, system_prompt_style="llama3")
    np.testing.assert_array_equal(own, named)


def test_text_only_record_keeps_masked_slots_and_trains_only_on_answers(tmp_path, bpe_dirs, image_dir):
    tok = c.load_tokenizer(bpe_dirs["qwen2"])
    result, rows = run(tmp_path, bpe_dirs["qwen2"], image_dir, [{"id": "t", "conversations": conv(Q2, A2)}],
                       system_prompt_style="qwen2")
    start = result["image_patch_info"]["image_patch_start_idx"]
    row = rows[0]
    assert (row[3, start:start + NP] == 1).all() and (row[3, :start] == 0).all()  # slots masked
    text = tok.apply_chat_template([{"role": "user", "content": "<image>" + Q2}, {"role": "assistant", "content": A2}],
                                   tokenize=False)
    before, after = text.split("<image>")
    ids = tok.encode(before) + [tok.pad_token_id] * NP + tok.encode(after)
    ids = ids[:ids.index(tok.eos_token_id, start + NP + 2) + 1]  # up to the answer's <|im_end|>
    np.testing.assert_array_equal(row[2, :len(ids) - 1], ids[1:])
    assert tok.decode(row[2][row[1] == 1]) == f"{A2}<|im_end|>"


def test_truncation_keeps_whole_turns(tmp_path, bpe_dirs, image_dir):
    tok = c.load_tokenizer(bpe_dirs["llama3"])
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(Q1, A1, Q2 + " " + "more " * 40, A2)}]
    result, rows = run(tmp_path, bpe_dirs["llama3"], image_dir, records, msl=64, system_prompt_style="llama3")
    assert result["post-process"]["truncated_samples"] == 1
    assert tok.decode(rows[0, 2][rows[0, 1] == 1]) == f"{A1}<|eot_id|>"


# ----------------------------------------------------------------------------------------------------------
# Mismatches are skipped and counted, never trained
# ----------------------------------------------------------------------------------------------------------


def test_a_turn_boundary_inside_a_token_is_skipped_as_tokenization_mismatch(tmp_path, bpe_dirs, image_dir):
    # qwen2 keeps the answer's leading newlines: "assistant\n" + "\n\nThe..." merges newlines across the cut.
    records = [{"id": "bad", "image": "a.jpg", "conversations": conv(Q1, "\n\n" + A1)},
               {"id": "good", "image": "a.jpg", "conversations": conv(Q1, A1)}]
    result, rows = run(tmp_path, bpe_dirs["qwen2"], image_dir, records, system_prompt_style="qwen2")
    post = result["post-process"]
    assert post["discarded_by_reason"] == {"tokenization_mismatch": 1}
    assert post["discarded_examples"]["tokenization_mismatch"] == ["bad (data.jsonl:1)"]
    assert len(rows) == 1 and post["successful_files"] == 1


def test_a_template_that_changes_the_text_is_skipped_as_template_mismatch(tmp_path, bpe_dirs, image_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_dirs["qwen2"]))
    tok.chat_template = c.CHAT_TEMPLATES["qwen2"].replace("message['content']", "message['content'] | upper")
    tok.save_pretrained(str(tmp_path / "upper"))
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(Q1, A1)}]
    result, rows = run(tmp_path, tmp_path / "upper", image_dir, records, system_prompt_style="chat_template")
    assert result["post-process"]["discarded_by_reason"] == {"template_mismatch": 1}
    assert len(rows) == 0


def test_a_record_the_template_refuses_is_skipped_as_template_error(tmp_path, bpe_dirs, image_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_dirs["qwen2"]))
    tok.chat_template = ("{%- for m in messages if 'forbidden' in m['content'] -%}{{ raise_exception('no') }}"
                         "{%- endfor -%}" + c.CHAT_TEMPLATES["qwen2"])
    tok.save_pretrained(str(tmp_path / "strict"))
    records = [{"id": "1", "conversations": conv("a forbidden question", A1)},
               {"id": "2", "conversations": conv(Q1, A1)}]
    result, rows = run(tmp_path, tmp_path / "strict", image_dir, records, system_prompt_style="chat_template")
    assert result["post-process"]["discarded_by_reason"] == {"template_error": 1}
    assert len(rows) == 1


# ----------------------------------------------------------------------------------------------------------
# Configuration errors say what to change
# ----------------------------------------------------------------------------------------------------------


def test_chat_template_with_a_tokenizer_without_one_names_the_short_styles(tmp_path, tok_dir, image_dir):
    with pytest.raises(c.ConfigError, match="has no chat_template.*llama3, qwen2, mistral"):
        run(tmp_path, tok_dir, image_dir, [{"id": "1", "conversations": conv(Q1, A1)}],
            system_prompt_style="chat_template")


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(tmp_path, bpe_dirs, image_dir):
    with pytest.raises(c.ConfigError, match="no special token right after an answer"):
        run(tmp_path, bpe_dirs["qwen2"], image_dir, [{"id": "1", "conversations": conv(Q1, A1)}],
            system_prompt_style="llama3")


def test_prompt_prefix_with_a_chat_template_is_refused():
    raw = {"setup": {"input_dir": "in", "output_dir": "out"}, "processing": {"huggingface_tokenizer": "t"},
           "dataset": {"system_prompt_style": "qwen2", "prompt_prefix": "USER:"}}
    with pytest.raises(c.ConfigError, match="remove prompt_prefix"):
        c.parse_config(raw, "test")


def test_vicuna_style_with_a_byte_level_tokenizer_points_at_chat_template(tmp_path, bpe_dirs, image_dir):
    with pytest.raises(c.ConfigError, match="system_prompt_style: chat_template"):
        run(tmp_path, bpe_dirs["llama3"], image_dir, [{"id": "1", "conversations": conv(Q1, A1)}],
            system_prompt_style="vicuna_v1")


# ----------------------------------------------------------------------------------------------------------
# Phase 1 with BOS-less and BOS tokenizers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,bos", [("llama3", 1), ("qwen2", 0)])
def test_phase1_with_byte_level_tokenizers(tmp_path, bpe_dirs, image_dir, family, bos):
    tok = c.load_tokenizer(bpe_dirs[family])
    records = [{"id": "1", "image": "a.jpg", "conversations": conv("<image>\nDescribe.", A1)}]
    result, rows = run(tmp_path, bpe_dirs[family], image_dir, records, phase=1)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [tok.bos_token_id] * bos + [pad] * NP + tok.encode(A1, add_special_tokens=False) + [tok.eos_token_id]
    np.testing.assert_array_equal(rows[0, 2, :len(ids) - 1], ids[1:])
    assert result["image_patch_info"]["image_patch_start_idx"] == bos
    assert tok.decode(rows[0, 2][rows[0, 1] == 1]) == A1 + tok.eos_token


# ----------------------------------------------------------------------------------------------------------
# Real tokenizers (skipped when ../shared/reference_data is absent)
# ----------------------------------------------------------------------------------------------------------


def test_llama3_1_instruct_layout_token_for_token(tmp_path, image_dir):
    folder = real_tokenizer("llama3_1_hf")
    tok = c.load_tokenizer(folder)
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"<image>\n{Q1}", A1, Q2, A2)}]
    result, rows = run(tmp_path, folder, image_dir, records, msl=128, system_prompt_style="chat_template")
    check_row(tok, rows[0], image_messages(Q1, A1, Q2, A2), tok.eos_token_id, f"{A1}<|eot_id|>{A2}<|eot_id|>")
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n, then the image
    np.testing.assert_array_equal(rows[0, 0, :5], [128000, 128006, 882, 128007, 271])
    assert result["image_patch_info"]["image_patch_start_idx"] == 5


def test_qwen3_layout_with_its_thinking_block_only_in_the_last_turn(tmp_path, image_dir):
    folder = real_tokenizer("qwen3_hf")
    tok = c.load_tokenizer(folder)
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"<image>\n{Q1}", A1, Q2, A2)}]
    result, rows = run(tmp_path, folder, image_dir, records, msl=128, system_prompt_style="chat_template")
    check_row(tok, rows[0], image_messages(Q1, A1, Q2, A2), tok.pad_token_id, f"{A1}<|im_end|>{A2}<|im_end|>")
    text = tok.decode(rows[0, 0][rows[0, 3] == 0])
    assert text.count("<think>\n\n</think>\n\n") == 1 and text.index("<think>") > text.index(A1)
    assert result["image_patch_info"]["image_patch_start_idx"] == 3  # <|im_start|>user\n


@pytest.mark.parametrize("name", ["llama3_1_hf", "qwen3_hf"])
def test_phase1_with_the_real_tokenizers(tmp_path, image_dir, name):
    folder = real_tokenizer(name)
    tok = c.load_tokenizer(folder)
    records = [{"id": "1", "image": "a.jpg", "conversations": conv("<image>\nDescribe.", A1)}]
    result, rows = run(tmp_path, folder, image_dir, records, phase=1, msl=64)
    bos = [128000] if name == "llama3_1_hf" else []
    eos = 128009 if name == "llama3_1_hf" else 151645
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = bos + [pad] * NP + tok.encode(A1, add_special_tokens=False) + [eos]
    np.testing.assert_array_equal(rows[0, 2, :len(ids) - 1], ids[1:])
    assert result["image_patch_info"]["image_patch_start_idx"] == len(bos)


# ----------------------------------------------------------------------------------------------------------
# Inference prompts follow the training layout
# ----------------------------------------------------------------------------------------------------------


def phase2_layout(folder, image_dir, style):
    raw = {"setup": {"input_dir": "in", "output_dir": "out"},
           "processing": {"huggingface_tokenizer": str(folder), "max_seq_length": 256},
           "dataset": {"image_dir": str(image_dir), "num_patches": NP, "system_prompt_style": style}}
    return c.TokenLayout(c.load_tokenizer(folder), c.parse_config(raw, "test"), 2)


@pytest.mark.parametrize("style", ["vicuna_v1", "chat_template"])
def test_prompt_ids_are_the_tokens_before_the_first_answer(tmp_path, tok_dir, bpe_dirs, image_dir, style):
    folder = tok_dir if style == "vicuna_v1" else bpe_dirs["llama3"]
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"<image>\n{Q1}", A1)}]
    _, rows = run(tmp_path, folder, image_dir, records, system_prompt_style=style)
    layout = phase2_layout(folder, image_dir, style)
    prompt = layout.prompt_ids(f"<image>\n{Q1}")
    first_target = int(np.argmax(rows[0, 1]))  # loss position t predicts token t + 1, the first answer token
    assert prompt == rows[0, 0, :first_target + 1].tolist()


@pytest.mark.parametrize("style", ["vicuna_v1", "chat_template"])
def test_multi_turn_prompt_ids_are_the_tokens_before_the_last_answer(tmp_path, tok_dir, bpe_dirs, image_dir, style):
    folder = tok_dir if style == "vicuna_v1" else bpe_dirs["qwen2"]
    records = [{"id": "1", "image": "a.jpg", "conversations": conv(f"<image>\n{Q1}", A1, Q2, A2)}]
    _, rows = run(tmp_path, folder, image_dir, records, system_prompt_style=style)
    layout = phase2_layout(folder, image_dir, style)
    prompt = layout.prompt_ids(Q2, history=[(f"<image>\n{Q1}", A1)])
    targets = np.flatnonzero(rows[0, 1])
    second_answer = targets[np.flatnonzero(np.diff(targets) > 1)[0] + 1]  # first loss position of answer 2
    assert prompt == rows[0, 0, :second_answer + 1].tolist()


# ----------------------------------------------------------------------------------------------------------
# The fast path (pieces tokenized on their own) computes what the plain in-context check does
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer,style", [("llama3", "chat_template"), ("qwen2", "chat_template"),
                                             ("sentencepiece", "mistral")])
def test_fast_path_segments_equal_the_in_context_check(tok_dir, bpe_dirs, image_dir, tokenizer, style):
    folder = tok_dir if tokenizer == "sentencepiece" else bpe_dirs[tokenizer]
    chat = phase2_layout(folder, image_dir, style).chat
    docs = [("a.jpg", [("\n" + Q1, A1)]), ("a.jpg", [("\n" + Q1, A1), (Q2, A2)]), (None, [(Q2, " " + A2 + " ")]),
            ("a.jpg", [("\nDescribe the image.", "A red circle above a blue square."), (Q1, "")])]
    fast = chat.block_segments(docs)
    for (_, pairs), (_, segs) in zip(docs, fast):
        text, cuts = chat.cut(pairs)[1]
        full = chat.encode([text])[0]
        bounds = chat.bounds_in_context(text, cuts, full)
        plain = None if bounds is None else chat.segments(full, bounds)
        assert segs == plain
    assert sum(segs is not None for _, segs in fast) >= 3  # the records are laid out, not all skipped
