"""Tests of create_hdf5_dataset.py's writer (LlavaPhaseOne / LlavaPhaseTwo) and shuffle.

Run: python -m pytest tests/test_create_hdf5_dataset.py -q
Token layouts are checked against spec 2.6 / 2.7 with a small tokenizer trained here, and token for token
against the spec's worked examples with the real Llama-2 tokenizer when ../shared/reference_data is present.
"""

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import create_hdf5_dataset as c  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_data"
LLAMA2_HF = REFERENCE / "tokenizer" / "llama2_hf"

VASE_Q = "What is the main color of the vase in the image?"
VASE_A = "The vase is blue."
TRAIN_TEXTS = [c.VICUNA_V1_SYSTEM, c.VICUNA_V0_SYSTEM, "USER: ASSISTANT:", VASE_Q, VASE_A,
               "Describe the image concisely.", "a grey watch with an army style strap",
               "What feature can be seen on the back of the bus?", "The bus is white and red."] * 4


@pytest.fixture(scope="session")
def tok(tok_dir):
    return c.load_tokenizer(tok_dir)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for name, size in [("a.jpg", (40, 30)), ("b.png", (24, 36)), ("sub/c.jpg", (32, 32))]:
        Image.new("RGB", size, (200, 30, 40)).save(d / name)
    return d


def rec(rid, image, *turns, **extra):
    """A LLaVA record; turns alternate human / gpt."""
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    r = {"id": rid, "conversations": conv, **extra}
    if image is not None:
        r["image"] = image
    return r


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # bytes records are written as they are (invalid UTF-8 cases)
        for r in records:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8"))
            f.write(b"\n")
    return path


def make_cfg(tmp_path, tok_dir, image_dir, phase, msl=256, patches=8, **over):
    raw = {
        "setup": {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "processes": 1},
        "processing": {"huggingface_tokenizer": str(tok_dir), "max_seq_length": msl, "files_per_record": 10000,
                       "display_pbar": False},
        "dataset": {"image_dir": str(image_dir), "num_patches": patches},
    }
    for key, value in over.items():
        sec, _ = c.CLI_OVERRIDES.get(key, (None, None))
        sec = sec or next(s for s, cls in c.SECTIONS.items() if key in {f.name for f in c.dataclasses.fields(cls)})
        raw[sec][key] = value
    return c.parse_config(raw, "test")


def run(tmp_path, tok_dir, image_dir, phase, records, **kw):
    write_jsonl(tmp_path / "in" / "data.jsonl", records)
    cfg = make_cfg(tmp_path, tok_dir, image_dir, phase, **kw)
    mode = "LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo"
    result = c.preprocess(mode, cfg, overwrite=True, progress=False)
    return result, read_all(Path(cfg.setup.output_dir))


def read_all(out: Path):
    """(data rows, img paths) of every H5 file in out, in file-name order."""
    datas, paths = [], []
    for p in sorted(out.glob("*.h5")):
        with h5py.File(p, "r") as f:
            datas.append(f["data"][:])
            paths.extend(x[0] for x in f["img_path"][:])
    return (np.concatenate(datas) if datas else np.zeros((0, 4, 0), np.int32)), paths


def plain(tok, text):
    return tok.encode(text, add_special_tokens=False)


def expected_rows(ids, tgt, att, msl, pad):
    """Independent statement of the row rules: shift by one, pad, invert attention."""
    ids, tgt, att = np.array(ids), np.array(tgt), np.array(att)
    n = len(ids) - 1
    rows = np.zeros((4, msl), np.int32)
    rows[0], rows[2], rows[3] = pad, pad, 1
    rows[0, :n], rows[2, :n] = ids[:-1], ids[1:]
    rows[1, :n] = tgt[1:]  # loss at t <=> labels[t] = ids[t+1] is a target
    rows[3, :n] = 1 - att[:-1]
    return rows


# ----------------------------------------------------------------------------------------------------------
# Token layouts
# ----------------------------------------------------------------------------------------------------------


def test_phase1_image_sample_layout(tmp_path, tok_dir, tok, image_dir):
    res, (data, paths) = run(tmp_path, tok_dir, image_dir, 1, [rec("1", "a.jpg", "Describe.\n<image>", VASE_A)])
    cap, pad, eos = plain(tok, VASE_A), tok.eos_token_id, tok.eos_token_id
    ids = [1] + [pad] * 8 + cap + [eos]
    tgt = [0] + [0] * 8 + [1] * (len(cap) + 1)
    att = [1] * len(ids)
    np.testing.assert_array_equal(data[0], expected_rows(ids, tgt, att, 256, pad))
    assert paths == [b"a.jpg"]
    assert res["image_patch_info"]["image_patch_start_idx"] == 1


def test_phase1_text_only_has_no_loss_on_bos_and_masked_slots(tmp_path, tok_dir, tok, image_dir):
    _, (data, paths) = run(tmp_path, tok_dir, image_dir, 1, [rec("1", None, "Describe.", VASE_A)])
    row = data[0]
    assert paths == [b"None"]
    assert row[1, 0] == 0  # Cerebras bug 8: BOS predicting a pad got loss 1
    assert row[3, 1:9].tolist() == [1] * 8 and row[3, 0] == 0
    cap = plain(tok, VASE_A)
    assert row[1].sum() == len(cap)  # caption tokens after the first, plus EOS
    assert row[2, 9:9 + len(cap)].tolist() == cap[1:] + [tok.eos_token_id]


def test_phase1_multi_turn_keeps_inner_eos_attended(tmp_path, tok_dir, tok, image_dir):
    _, (data, _) = run(tmp_path, tok_dir, image_dir, 1, [rec("1", "a.jpg", "q", "a grey watch", "q2", VASE_A)])
    a1, a2, eos = plain(tok, "a grey watch"), plain(tok, VASE_A), tok.eos_token_id
    ids = [1] + [eos] * 8 + a1 + [eos] + a2 + [eos]
    np.testing.assert_array_equal(data[0], expected_rows(ids, [0] * 9 + [1] * (len(ids) - 9), [1] * len(ids), 256,
                                                         eos))


def phase2_expected(tok, turns, has_image, patches, msl, system=c.VICUNA_V1_SYSTEM, user="USER:",
                    assistant="ASSISTANT:"):
    """Phase-2 layout assembled from the spec's description (2.7) with this tokenizer."""
    pad = eos = tok.eos_token_id
    sys_ids = tok.encode(system)  # with BOS
    u, a = plain(tok, user), plain(tok, assistant)
    space = tok.convert_tokens_to_ids("▁")
    v = int(has_image)
    ids = sys_ids + u + [space] + [pad] * patches
    tgt = [0] * len(ids)
    att = [1] * (len(sys_ids) + len(u)) + [v] * (1 + patches)
    for i, (q, ans) in enumerate(turns):
        q_ids = plain(tok, q) if i == 0 else u + plain(tok, q)
        part = q_ids + a + plain(tok, ans) + [eos]
        ids += part
        tgt += [0] * len(q_ids + a) + [1] * (len(plain(tok, ans)) + 1)
        att += [1] * len(part)
    return expected_rows(ids, tgt, att, msl, pad), len(sys_ids) + len(u) + 1


def test_phase2_image_sample_layout(tmp_path, tok_dir, tok, image_dir):
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 2, [rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A)])
    rows, start = phase2_expected(tok, [("\n" + VASE_Q, VASE_A)], True, 8, 256)
    np.testing.assert_array_equal(data[0], rows)
    assert res["image_patch_info"]["image_patch_start_idx"] == start


def test_phase2_multi_turn_and_text_only_without_model_key(tmp_path, tok_dir, tok, image_dir):
    records = [rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A, "What is it?", "a grey watch"),
               rec("2", None, VASE_Q, VASE_A)]  # no "model" key: accepted (Cerebras asserted on it)
    res, (data, paths) = run(tmp_path, tok_dir, image_dir, 2, records)
    assert res["post-process"]["discarded_files"] == 0
    rows, _ = phase2_expected(tok, [("\n" + VASE_Q, VASE_A), ("What is it?", "a grey watch")], True, 8, 256)
    np.testing.assert_array_equal(data[0], rows)
    rows, start = phase2_expected(tok, [(VASE_Q, VASE_A)], False, 8, 256)
    np.testing.assert_array_equal(data[1], rows)
    assert data[1][3, start - 1:start + 8].tolist() == [1] * 9  # the "▁" and the slots are not attended
    assert paths == [b"a.jpg", b"None"]


def test_image_token_anywhere_in_first_turn_gives_the_same_row(tmp_path, tok_dir, image_dir):
    records = [rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A), rec("2", "a.jpg", VASE_Q + "\n<image>", VASE_A),
               rec("3", "a.jpg", VASE_Q + " <image>", VASE_A)]
    _, (data, _) = run(tmp_path, tok_dir, image_dir, 2, records)
    np.testing.assert_array_equal(data[0], data[1])
    np.testing.assert_array_equal(data[0], data[2])


def test_leading_system_turn_is_accepted(tmp_path, tok_dir, image_dir):
    r = rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A)
    r["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 2, [r, rec("2", "a.jpg", "<image>\n" + VASE_Q, VASE_A)])
    assert res["post-process"]["successful_files"] == 2
    assert res["post-process"]["system_turns_dropped"] == 1
    np.testing.assert_array_equal(data[0], data[1])  # image position unchanged


def test_roles_user_assistant_are_read(tmp_path, tok_dir, image_dir):
    r = {"id": "1", "image": "a.jpg", "conversations": [{"from": "user", "value": "<image>\n" + VASE_Q},
                                                         {"from": "assistant", "value": VASE_A}]}
    _, (data, _) = run(tmp_path, tok_dir, image_dir, 2, [r, rec("2", "a.jpg", "<image>\n" + VASE_Q, VASE_A)])
    np.testing.assert_array_equal(data[0], data[1])


def test_prompt_style_table_llava_plain_and_new_row(tmp_path, tok_dir, tok, image_dir, monkeypatch):
    records = [rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A)]
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 2, records, system_prompt_style="llava_plain")
    rows, start = phase2_expected(tok, [("\n" + VASE_Q, VASE_A)], True, 8, 256, system="", user="", assistant="")
    np.testing.assert_array_equal(data[0], rows)
    assert res["image_patch_info"]["image_patch_start_idx"] == start == 2  # BOS, "▁"
    monkeypatch.setitem(c.PROMPT_STYLES, "terse", ("Answer.", "Q:", "A:"))
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 2, records, system_prompt_style="terse")
    rows, start = phase2_expected(tok, [("\n" + VASE_Q, VASE_A)], True, 8, 256, system="Answer.", user="Q:",
                                  assistant="A:")
    np.testing.assert_array_equal(data[0], rows)


# ----------------------------------------------------------------------------------------------------------
# Real Llama-2 tokenizer: the spec's worked examples token for token
# ----------------------------------------------------------------------------------------------------------

needs_llama2 = pytest.mark.skipif(not LLAMA2_HF.is_dir(), reason="../shared/reference_data not present")


@needs_llama2
def test_llama2_verified_tokenizations():
    tok = c.load_tokenizer(LLAMA2_HF)
    enc = c.make_encoder(tok)
    assert tok.encode("USER:") == [1, 3148, 1001, 29901]
    assert tok.encode("ASSISTANT:") == [1, 319, 1799, 9047, 13566, 29901]
    assert tok.encode(c.VICUNA_V1_SYSTEM) == [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255,
                                              29889, 450, 20255, 4076, 8444, 29892, 13173, 29892, 322, 1248, 568,
                                              6089, 304, 278, 1404, 29915, 29879, 5155, 29889]
    for text in ["USER:", "\nWhat", VASE_A, c.VICUNA_V1_SYSTEM, ""]:
        assert enc([text])[0] == tok.encode(text)[1:]  # plain batch encoding == Cerebras' encode()[1:]


@needs_llama2
def test_llama2_phase1_worked_example(tmp_path, image_dir):
    res, (data, _) = run(tmp_path, LLAMA2_HF, image_dir, 1, [rec("1", "a.jpg", "Describe.\n<image>", VASE_A)],
                         msl=2048, patches=576)
    ids, loss, labels, kpm = data[0]
    assert ids[:583].tolist() == [1] + [2] * 576 + [450, 325, 559, 338, 7254, 29889]
    assert (ids[583:] == 2).all() and (labels[583:] == 2).all()
    assert np.flatnonzero(loss).tolist() == list(range(576, 583))
    assert labels[576:583].tolist() == [450, 325, 559, 338, 7254, 29889, 2]
    assert (kpm[:583] == 0).all() and (kpm[583:] == 1).all()
    assert res["image_patch_info"]["image_patch_start_idx"] == 1


@needs_llama2
def test_llama2_phase2_worked_example(tmp_path, image_dir):
    records = [rec("1", "a.jpg", "<image>\n" + VASE_Q, VASE_A), rec("2", None, "\n" + VASE_Q, VASE_A)]
    res, (data, _) = run(tmp_path, LLAMA2_HF, image_dir, 2, records, msl=2048, patches=576)
    ids, loss, labels, kpm = data[0]
    tok = c.load_tokenizer(LLAMA2_HF)
    assert ids[:31].tolist() == tok.encode(c.VICUNA_V1_SYSTEM)
    assert ids[31:35].tolist() == [3148, 1001, 29901, 29871]
    assert (ids[35:611] == 2).all()
    assert ids[611:626].tolist() == tok.encode("\n" + VASE_Q)[1:] and ids[611:614].tolist() == [29871, 13, 5618]
    assert ids[626:631].tolist() == [319, 1799, 9047, 13566, 29901]
    assert ids[631:637].tolist() == [450, 325, 559, 338, 7254, 29889]
    assert np.flatnonzero(loss).tolist() == list(range(630, 637))
    assert labels[630:637].tolist() == [450, 325, 559, 338, 7254, 29889, 2]
    assert (kpm[:637] == 0).all() and (kpm[637:] == 1).all()
    assert res["image_patch_info"]["image_patch_start_idx"] == 35
    np.testing.assert_array_equal(data[1][:3], data[0][:3])  # text-only: same tokens and loss,
    assert np.flatnonzero(data[1][3]).tolist() == list(range(34, 611)) + list(range(637, 2048))  # "▁"+slots masked


# ----------------------------------------------------------------------------------------------------------
# H5 layout, data_params.json, processes
# ----------------------------------------------------------------------------------------------------------


def test_h5_layout_file_split_and_data_params(tmp_path, tok_dir, image_dir):
    records = [rec(str(i), "a.jpg" if i % 2 else None, "q", "a grey watch") for i in range(5)]
    res, _ = run(tmp_path, tok_dir, image_dir, 1, records, files_per_record=2)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["data_params.json", "examples_0_0.h5", "examples_1_0.h5",
                                                     "examples_2_0.h5"]
    with h5py.File(out / "examples_0_0.h5", "r") as f:
        d, p = f["data"], f["img_path"]
        assert d.shape == (2, 4, 256) and d.dtype == np.dtype("<i4")
        assert d.chunks == (1, 4, 256) and d.compression == "gzip"
        assert p.shape == (2, 1) and p.dtype.kind == "S" and p.compression == "gzip"
        assert p[:, 0].tolist() == [b"None", b"a.jpg"]
        assert f.attrs["n_examples"] == 2
    with h5py.File(out / "examples_2_0.h5", "r") as f:  # write_remainder
        assert f.attrs["n_examples"] == 1 and f["data"].shape[0] == 1
    params = json.loads((out / "data_params.json").read_text())
    assert params == res
    assert set(params) == {"setup", "processing", "dataset", "post-process", "h5_dataset_stats",
                           "image_patch_info", "dataset_complete"}
    assert params["dataset_complete"] is True and params["post-process"]["truncated_input_files"] == []
    pp = params["post-process"]
    assert (pp["processed_files"], pp["successful_files"], pp["discarded_files"], pp["n_examples"]) == (5, 5, 0, 5)
    assert pp["eos_id"] == 2 and pp["pad_id"] == 2 and pp["vocab_size"] > 100
    stats = params["h5_dataset_stats"]
    assert stats["num_sequences"] == 5 and stats["num_tokens"] == 5 * 256
    data, _ = read_all(out)
    assert stats["loss_valid_tokens"] == int(data[:, 1].sum())
    assert params["processing"]["max_seq_length"] == 256 and params["dataset"]["num_patches"] == 8


def test_set_of_samples_does_not_depend_on_process_count(tmp_path, tok_dir, image_dir):
    words = ["blue", "red", "a grey watch", "The bus is white and red.", "strap"]
    records = [rec(str(i), ["a.jpg", "b.png", "sub/c.jpg", None][i % 4], "<image>\nq", " ".join(words[: i % 5 + 1]),
                   *(["more?", words[i % 3]] if i % 7 == 0 else [])) for i in range(600)]
    records[100] = "{bad json"
    results = {}
    for n in (1, 2):
        res, (data, paths) = run(tmp_path / f"p{n}", tok_dir, image_dir, 2, records, processes=n,
                                 files_per_record=128)
        rows = sorted(bytes(p) + d.tobytes() for d, p in zip(data, paths))
        results[n] = (rows, res["image_patch_info"], res["post-process"]["discarded_by_reason"],
                      res["h5_dataset_stats"])
    assert len(results[1][0]) == 599
    assert results[1] == results[2]
    assert any(p.name.endswith("_1.h5") for p in (tmp_path / "p2" / "out").glob("*.h5"))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_every_bad_input_is_skipped_and_counted(tmp_path, tok_dir, image_dir, capsys):
    long_answer = " ".join(["watch"] * 400)
    good = rec("good", "a.jpg", "<image>\nq", "blue")
    records = [
        good,
        "{not json",                                                     # malformed_json
        "[1, 2]",                                                        # not_an_object
        {"id": "nc", "image": "a.jpg"},                                  # no_conversations
        {"id": "bt", "conversations": [{"value": "x"}, {"from": "gpt", "value": "y"}]},  # bad_turn
        rec("ns", "a.jpg", "<image>\nq", 5),                             # non_string_value (answer)
        {**rec("ni", None, "q", "a"), "image": 7},                       # non_string_value (image)
        {"id": "ur", "conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},  # unknown
        rec("odd", "a.jpg", "<image>\nq", "a", "q2"),                    # not_alternating (unanswered)
        {"id": "uu", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]},
        rec("esc", "../images/a.jpg", "<image>\nq", "a"),                # image_outside_root
        rec("abs", str(image_dir / "a.jpg"), "<image>\nq", "a"),         # image_outside_root (absolute)
        rec("miss", "nope.jpg", "<image>\nq", "a"),                      # missing_image
        rec("long", "a.jpg", "<image>\nq", long_answer),                 # too_long (phase 1 no longer crashes)
        rec("trunc", "a.jpg", "<image>\nq", "blue", "q2", long_answer),  # truncated to its first turn
        '{"id": "sur", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x\\ud800"}]}',
        b'{"id": "ff", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x\xff"}]}',
        rec("bad", "broken.jpg", "<image>\nq", "a"),                     # unreadable_image (check_images)
    ]
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 1, records, check_images=True)
    pp = res["post-process"]
    assert pp["discarded_by_reason"] == {"malformed_json": 1, "not_an_object": 1, "no_conversations": 1,
                                         "bad_turn": 1, "non_string_value": 2, "unknown_role": 1,
                                         "not_alternating": 2, "image_outside_root": 2, "missing_image": 1,
                                         "too_long": 1, "invalid_unicode": 1, "undecodable_text": 1,
                                         "unreadable_image": 1}
    # every reason has a case here, except the chat-template ones (tests/test_chat_template_data.py)
    chat_reasons = {"template_error", "template_mismatch", "tokenization_mismatch"}
    assert set(pp["discarded_by_reason"]) == set(c.SKIP_REASONS) - chat_reasons
    assert pp["discarded_files"] == 16 and pp["successful_files"] == 2 and pp["truncated_samples"] == 1
    assert pp["discarded_examples"]["undecodable_text"] == ["ff (data.jsonl:17)"]
    assert pp["discarded_examples"]["missing_image"] == ["miss (data.jsonl:13)"]
    np.testing.assert_array_equal(data[0], data[1])  # truncated sample == the one-turn sample
    printed = capsys.readouterr().out
    assert "missing_image" in printed and "too_long" in printed and "long (data.jsonl:14)" in printed


def test_phase2_too_long_is_dropped_or_truncated(tmp_path, tok_dir, image_dir):
    long_answer = " ".join(["watch"] * 400)
    records = [rec("long", "a.jpg", "<image>\nq", long_answer),
               rec("trunc", "a.jpg", "<image>\nq", "blue", "again?", long_answer),
               rec("one", "a.jpg", "<image>\nq", "blue")]
    res, (data, _) = run(tmp_path, tok_dir, image_dir, 2, records)
    assert res["post-process"]["discarded_by_reason"] == {"too_long": 1}
    assert res["post-process"]["truncated_samples"] == 1
    np.testing.assert_array_equal(data[0], data[1])


def test_existing_output_needs_overwrite(tmp_path, tok_dir, image_dir):
    run(tmp_path, tok_dir, image_dir, 1, [rec("1", "a.jpg", "q", "blue")])
    cfg = make_cfg(tmp_path, tok_dir, image_dir, 1)
    with pytest.raises(c.ConfigError, match="--overwrite"):
        c.preprocess("LlavaPhaseOne", cfg, overwrite=False, progress=False)
    c.preprocess("LlavaPhaseOne", cfg, overwrite=True, progress=False)
    assert len(list((tmp_path / "out").glob("*.h5"))) == 1


def test_resume_after_interruption_has_no_duplicates(tmp_path, tok_dir, image_dir, monkeypatch):
    records = [rec(str(i), "a.jpg", "q", f"caption {i} " + "blue " * (i % 5)) for i in range(700)]
    _, (ref, ref_paths) = run(tmp_path / "ref", tok_dir, image_dir, 1, records, files_per_record=100)

    write_jsonl(tmp_path / "in" / "data.jsonl", records)
    cfg = make_cfg(tmp_path, tok_dir, image_dir, 1, files_per_record=100)
    real_close = c.H5FileWriter._close_file
    closed = []

    def crash_after_three(self, next_record):
        if len(closed) == 3:
            raise KeyboardInterrupt("simulated interruption")
        closed.append(next_record)
        real_close(self, next_record)

    monkeypatch.setattr(c.H5FileWriter, "_close_file", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        c.preprocess("LlavaPhaseOne", cfg, overwrite=True, progress=False)
    monkeypatch.setattr(c.H5FileWriter, "_close_file", real_close)
    out = tmp_path / "out"
    assert len(list(out.glob("*.h5"))) == 3 and list(out.glob("*.tmp"))  # a half file under its temporary name
    cfg = make_cfg(tmp_path, tok_dir, image_dir, 1, files_per_record=100, resume_from_checkpoint=True)
    res = c.preprocess("LlavaPhaseOne", cfg, progress=False)
    data, paths = read_all(out)
    np.testing.assert_array_equal(data, ref)
    assert paths == ref_paths and res["post-process"]["processed_files"] == 700
    assert not list(out.glob("*.tmp"))


def test_resume_refuses_changed_settings(tmp_path, tok_dir, image_dir):
    run(tmp_path, tok_dir, image_dir, 1, [rec("1", "a.jpg", "q", "blue")])
    params_path = tmp_path / "out" / "data_params.json"
    params = json.loads(params_path.read_text())
    del params["post-process"]  # as an interrupted run leaves it
    params_path.write_text(json.dumps(params))
    cfg = make_cfg(tmp_path, tok_dir, image_dir, 1, msl=64, resume_from_checkpoint=True)
    with pytest.raises(c.ConfigError, match="max_seq_length"):
        c.preprocess("LlavaPhaseOne", cfg, progress=False)


# ----------------------------------------------------------------------------------------------------------
# Configuration and command line
# ----------------------------------------------------------------------------------------------------------


def test_both_config_spellings_are_accepted(tmp_path, tok_dir, image_dir):
    a = c.parse_config({"processing": {"max_seq_length": 99}}).processing.max_seq_length
    b = c.parse_config({"processor": {"max_sequence_length": 99}}).processing.max_seq_length
    assert a == b == 99
    with pytest.raises(c.ConfigError, match="processor.max_sequence_length"):
        c.parse_config({"processor": {"max_sequence_length": "long"}})
    with pytest.raises(c.ConfigError, match="both"):
        c.parse_config({"processing": {"max_seq_length": 1, "max_sequence_length": 2}})
    with pytest.raises(c.ConfigError, match="both"):
        c.parse_config({"processing": {}, "processor": {}})


def test_unknown_key_error_suggests_the_closest(tmp_path):
    with pytest.raises(c.ConfigError, match="Did you mean 'image_dir'"):
        c.parse_config({"dataset": {"img_dir": "x"}})


def test_shipped_yamls_parse_and_overrides_win_only_when_given():
    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = c.load_config(root / "llava_phase_2_preproc.yaml", "LlavaPhaseTwo", {"output_dir": None})
    assert cfg.setup.output_dir == "path/to/llava_phase_2_h5" and not os.path.isabs(cfg.setup.output_dir)
    assert cfg.dataset.system_prompt_style == "vicuna_v1" and cfg.processing.max_seq_length == 2048
    cfg = c.load_config(root / "llava_phase_1_preproc.yaml", "LlavaPhaseOne", {"max_seq_length": 512})
    assert cfg.processing.max_seq_length == 512 and cfg.dataset.num_patches == 576
    with pytest.raises(c.ConfigError, match="LlavaPhaseTwoPreprocessor"):
        c.load_config(root / "llava_phase_2_preproc.yaml", "LlavaPhaseOne")


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(c.ConfigError, match="not found.*nothing is downloaded"):
        c.load_tokenizer(tmp_path / "no_such_tokenizer")


def test_cli_end_to_end_and_error_exit(tmp_path, tok_dir, image_dir, capsys):
    write_jsonl(tmp_path / "in" / "d.jsonl", [rec("1", "a.jpg", "<image>\nq", "blue")])
    params = tmp_path / "p.yaml"
    params.write_text(f"setup:\n  input_dir: {tmp_path / 'in'}\n  output_dir: {tmp_path / 'out'}\n"
                      f"processing:\n  huggingface_tokenizer: {tok_dir}\n  max_sequence_length: 160\n"
                      f"dataset:\n  image_dir: {image_dir}\n  num_patches: 4\n")
    assert c.main(["LlavaPhaseTwo", "--params", str(params), "--no_progress"]) == 0
    assert c.main(["LlavaPhaseTwo", "--params", str(params), "--no_progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert c.main(["LlavaPhaseTwo", "--params", str(params), "--no_progress", "--overwrite",
                   "--max_seq_length", "180"]) == 0
    with h5py.File(tmp_path / "out" / "examples_0_0.h5", "r") as f:
        assert f["data"].shape == (1, 4, 180)


# ----------------------------------------------------------------------------------------------------------
# Shuffle
# ----------------------------------------------------------------------------------------------------------


def _shuffle_input(tmp_path, tok_dir, image_dir):
    records = [rec(str(i), ["a.jpg", "b.png", None][i % 3], "<image>\nq", f"caption {i}") for i in range(90)]
    run(tmp_path / "src", tok_dir, image_dir, 2, records, files_per_record=25)
    return tmp_path / "src" / "out"


def test_shuffle_is_deterministic_and_keeps_rows_with_paths(tmp_path, tok_dir, image_dir):
    src = _shuffle_input(tmp_path, tok_dir, image_dir)
    in_data, in_paths = read_all(src)
    outs = {}
    for name, workers, seed in [("a", 1, 3), ("b", 2, 3), ("c", 1, 4)]:
        assert c.shuffle(src, tmp_path / name, num_chunks=3, num_workers=workers, seed=seed, progress=False) == 90
        outs[name] = read_all(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["data-00000.h5", "data-00001.h5",
                                                                        "data-00002.h5", "data_params.json"]
    np.testing.assert_array_equal(outs["a"][0], outs["b"][0])  # same seed: same files, any worker count
    assert outs["a"][1] == outs["b"][1]
    assert not np.array_equal(outs["a"][0], outs["c"][0])
    assert not np.array_equal(outs["a"][0], in_data)
    pairs_in = sorted(bytes(p) + d.tobytes() for d, p in zip(in_data, in_paths))
    pairs_out = sorted(bytes(p) + d.tobytes() for d, p in zip(*outs["a"]))
    assert pairs_in == pairs_out  # every data row still carries its own img_path
    with h5py.File(tmp_path / "a" / "data-00000.h5", "r") as f:
        assert f.attrs["n_examples"] == f["data"].shape[0] and f["data"].chunks == (1, 4, 256)
        assert f["img_path"].shape == (f["data"].shape[0], 1)
    assert json.loads((tmp_path / "a" / "data_params.json").read_text())["image_patch_info"][
        "image_patch_start_idx"] > 1


def test_shuffle_cli_refuses_existing_output(tmp_path, tok_dir, image_dir, capsys):
    src = _shuffle_input(tmp_path, tok_dir, image_dir)
    args = ["shuffle", str(src), str(tmp_path / "s"), "--num_chunks", "2", "--no_progress"]
    assert c.main(args) == 0
    assert c.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert c.main(args + ["--overwrite", "--num_workers", "2"]) == 0


def test_shuffle_copies_other_chunk_layouts_row_by_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = np.arange(10 * 4 * 6, dtype=np.int32).reshape(10, 4, 6)
    with h5py.File(src / "x.h5", "w") as f:  # several rows per chunk, no compression: no raw-chunk copy
        f.create_dataset("data", data=data, chunks=(5, 4, 6))
        f.create_dataset("img_path", data=np.array([[f"{i}.jpg".encode()] for i in range(10)]))
    assert c.shuffle(src, tmp_path / "out", num_chunks=2, seed=1, progress=False) == 10
    rows, paths = read_all(tmp_path / "out")
    assert sorted(r.tobytes() for r in rows) == sorted(r.tobytes() for r in data)
    for r, p in zip(rows, paths):  # row k of the input is still paired with k.jpg
        assert p == f"{r[0, 0] // 24}.jpg".encode()
