"""Bad inputs a hostile but realistic user gives the CLIs (issue 10): each ends in a message naming the file
(and line), with the documented exit status, no traceback, and nothing half-written left behind.

Run: python -m pytest tests/test_bad_inputs.py -q
(The yaml cases are in test_yaml_errors.py, the converter's in test_convert_bad_inputs.py.)
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import create_hdf5_dataset as hd
from test_create_hdf5_dataset import rec, write_jsonl
from test_run import PHASE1, data, overrides  # noqa: F401 - `data` is the module's H5 fixture

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def arxivqa_line(i: int) -> bytes:
    item = {"id": f"q{i}", "image": f"images/{i}.jpg", "options": ["A. yes", "B. no"], "question": f"Q{i}?",
            "label": "A", "rationale": "R."}
    return json.dumps(item).encode("utf-8")


def preproc_cmd(tmp_path, tok_dir, image_dir, input_dir, *more, check_images=False):
    params = tmp_path / "preproc.yaml"
    params.write_text(f"dataset:\n  check_images: {str(check_images).lower()}\n")
    return ["create_hdf5_dataset.py", "LlavaPhaseOne", "--params", params, "--input_dir", input_dir, "--output_dir", tmp_path / "out", "--huggingface_tokenizer", tok_dir,
            "--image_dir", image_dir, "--max_seq_length", 64, "--num_patches", 4, "--processes", 1,
            "--no_progress", *more]


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(d / "a.png")
    return d


# ----------------------------------------------------------------------------------------------------------
# 1. Non-UTF-8 bytes in a JSON-lines file: only that line is lost, under its own reason and true line number
# ----------------------------------------------------------------------------------------------------------


def test_invalid_utf8_line_in_arxivqa_costs_only_that_line(tmp_path):
    lines = [arxivqa_line(i) for i in range(200)]
    lines[99] = lines[99].replace(b"Q99?", b"Q99\xff?")
    src = tmp_path / "arxivqa.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, out = cli("preprocess_dataset.py", "arxivqa", "--input_file", src, "--output_jsonl_dir", tmp_path / "o",
                    "--no_progress")
    assert code == 0, out
    assert "Traceback" not in out
    written = (tmp_path / "o" / "arxivqa_llava.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in written] == [f"q{i}" for i in range(200) if i != 99]
    assert f"undecodable text: 1 (e.g. {src} line 100)" in out


def test_invalid_utf8_line_in_stage2_costs_only_that_line(tmp_path, tok_dir, image_dir):
    lines = [json.dumps(rec(f"r{i}", "a.png", "<image>\nq", f"caption {i}")).encode() for i in range(200)]
    lines[99] = lines[99].replace(b"caption 99", b"caption \xff99")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, out = cli(*preproc_cmd(tmp_path, tok_dir, image_dir, tmp_path / "in"))
    assert code == 0, out
    assert "Traceback" not in out
    pp = json.loads((tmp_path / "out" / "data_params.json").read_text())["post-process"]
    assert pp["discarded_by_reason"] == {"undecodable_text": 1}
    assert pp["discarded_examples"]["undecodable_text"] == ["r99 (data.jsonl:100)"]
    assert pp["n_examples"] == 199 and "undecodable_text" in out


# ----------------------------------------------------------------------------------------------------------
# 2. A truncated .jsonl.gz: the records before the cut are kept, the file is named and counted, exit 0
# ----------------------------------------------------------------------------------------------------------


def test_truncated_gzip_input_keeps_records_before_the_cut(tmp_path, tok_dir, image_dir):
    (tmp_path / "in").mkdir()
    good = write_jsonl(tmp_path / "in" / "a.jsonl", [rec("a0", "a.png", "<image>\nq", "fine")])
    body = "".join(json.dumps(rec(f"g{i}", "a.png", "<image>\nq", f"caption number {i}")) + "\n"
                   for i in range(3000)).encode()
    cut = tmp_path / "in" / "b.jsonl.gz"
    whole = gzip.compress(body)
    cut.write_bytes(whole[: len(whole) // 2])
    code, out = cli(*preproc_cmd(tmp_path, tok_dir, image_dir, tmp_path / "in"))
    assert code == 0, out
    assert "Traceback" not in out
    params = json.loads((tmp_path / "out" / "data_params.json").read_text())
    pp = params["post-process"]
    assert pp["truncated_input_files"] == [str(cut)] and params["dataset_complete"] is True
    assert f"{cut} is truncated or damaged" in out
    kept = pp["successful_files"] - 1  # besides a.jsonl's record
    assert 100 < kept < 3000
    assert pp["n_examples"] == pp["successful_files"] and good.is_file()
    # The kept records are exactly the ones before the cut: one partial line at most is malformed.
    assert set(pp["discarded_by_reason"]) <= {"malformed_json"} and pp["discarded_files"] <= 1
    assert pp["processed_files"] == kept + 1 + pp["discarded_files"]


# ----------------------------------------------------------------------------------------------------------
# 4. / 5. run.py on a data_dir without .h5 files, and with a truncated .h5
# ----------------------------------------------------------------------------------------------------------


def run_cmd(tmp_path, data, **extra):
    return ["run.py", "CPU", "--mode", "train", "--params", PHASE1, "--model_dir", tmp_path / "model",
            "--no_progress", *overrides(data, 1, steps=2, **extra)]


def test_run_with_a_data_dir_without_h5_files(tmp_path, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not data")
    code, out = cli(*run_cmd(tmp_path, data, **{"train_input.data_dir": empty}))
    assert code == 1, out
    assert "Traceback" not in out
    assert f"data_dir {str(empty)!r} holds no .h5 files (found: notes.txt)" in out
    assert not list((tmp_path / "model").glob("checkpoint_*"))


def test_run_with_a_truncated_h5_names_the_file(tmp_path, data):
    copy = tmp_path / "h5"
    shutil.copytree(data[(1, "train")], copy)
    victim = sorted(copy.glob("*.h5"))[0]
    victim.write_bytes(victim.read_bytes()[:4000])
    code, out = cli(*run_cmd(tmp_path, data, **{"train_input.data_dir": copy}))
    assert code == 1, out
    assert "Traceback" not in out
    assert f"{victim}: not a readable H5 file" in out and "truncated or corrupt" in out
    assert not list((tmp_path / "model").glob("checkpoint_*"))


# ----------------------------------------------------------------------------------------------------------
# 6. A corrupt image at train time with on_bad_image: error (also in DataLoader workers); stage 2's check
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_at_train_time_is_one_message_and_keeps_the_checkpoint(tmp_path, data, workers):
    code, out = cli(*run_cmd(tmp_path, data))
    assert code == 0, out
    ckpt = tmp_path / "model" / "checkpoint_2.mdl"
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    for png in images.rglob("*.png"):
        png.write_bytes(b"\x89PNG garbage")
    code, out = cli(*run_cmd(tmp_path, data, **{"runconfig.max_steps": 4, "train_input.img_data_dir": images,
                                                "train_input.num_workers": workers}))
    assert code == 1, out
    assert "Traceback" not in out and "DataLoader worker" not in out
    assert "error: image '" in out and str(images) in out and "cannot be read" in out
    assert "on_bad_image" in out
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (tmp_path / "model").glob("checkpoint_*")) == ["checkpoint_2.mdl"]


def test_stage2_check_images_skips_unreadable_images(tmp_path, tok_dir, image_dir):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (image_dir / "empty.png").write_bytes(b"")
    records = [rec("ok", "a.png", "<image>\nq", "fine"), rec("b1", "broken.jpg", "<image>\nq", "x"),
               rec("b2", "empty.png", "<image>\nq", "y"), rec("b3", "broken.jpg", "<image>\nq", "z")]
    write_jsonl(tmp_path / "in" / "data.jsonl", records)
    code, out = cli(*preproc_cmd(tmp_path, tok_dir, image_dir, tmp_path / "in", check_images=True))
    assert code == 0, out
    pp = json.loads((tmp_path / "out" / "data_params.json").read_text())["post-process"]
    assert pp["discarded_by_reason"] == {"unreadable_image": 3} and pp["n_examples"] == 1
    assert "b1 (data.jsonl:2)" in out
    # Off by default (Cerebras parity): the same records are all written.
    code, out = cli(*preproc_cmd(tmp_path, tok_dir, image_dir, tmp_path / "in", "--overwrite"))
    assert code == 0, out
    assert json.loads((tmp_path / "out" / "data_params.json").read_text())["post-process"]["n_examples"] == 4


# ----------------------------------------------------------------------------------------------------------
# 8. Leftovers of killed runs
# ----------------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_files_of_a_killed_preprocess_run_are_removed(tmp_path):
    src = tmp_path / "arxivqa.jsonl"
    src.write_bytes(b"\n".join(arxivqa_line(i) for i in range(5)) + b"\n")
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    stale = out_dir / f".arxivqa_llava.jsonl.partial-{dead_pid()}"
    stale.write_text('{"half": ')
    other = out_dir / ".other.jsonl.partial-1"  # another output's: not ours to remove
    other.write_text("x")
    code, out = cli("preprocess_dataset.py", "arxivqa", "--input_file", src, "--output_jsonl_dir", out_dir,
                    "--no_progress")
    assert code == 0, out
    assert sorted(p.name for p in out_dir.iterdir()) == [".other.jsonl.partial-1", "arxivqa_llava.jsonl"]


def test_unfinished_h5_dataset_is_refused_until_resumed(tmp_path, tok_dir, image_dir, data, monkeypatch):
    write_jsonl(tmp_path / "in" / "data.jsonl", [rec(f"r{i}", "a.png", "<image>\nq", "caption") for i in range(9)])
    args = preproc_cmd(tmp_path, tok_dir, image_dir, tmp_path / "in")[1:] + ["--files_per_record", 4]

    def killed(*_a, **_k):  # the run is killed after its first H5 file is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(hd, "_run_workers", killed)
    with pytest.raises(KeyboardInterrupt):
        hd.main([str(a) for a in args])
    monkeypatch.undo()
    out = tmp_path / "out"
    params = json.loads((out / "data_params.json").read_text())
    assert params["dataset_complete"] is False and "post-process" not in params
    shutil.copy(data[(1, "train")] / "examples_0_0.h5", out / "examples_0_0.h5")  # a finished file
    code, msg = cli(*run_cmd(tmp_path, data, **{"train_input.data_dir": out}))
    assert code == 1, msg
    assert "Traceback" not in msg
    assert f"{out}: this H5 dataset is unfinished" in msg and "--resume_from_checkpoint True" in msg
    code, msg = cli("create_hdf5_dataset.py", *args, "--resume_from_checkpoint", "True")
    assert code == 0, msg
    params = json.loads((out / "data_params.json").read_text())
    assert params["dataset_complete"] is True and params["post-process"]["n_examples"] == 9
    assert len(hd.LlavaH5Dataset(str(out), str(image_dir), None, image_data_size=(3, 8, 8))) == 9
