"""convert_checkpoint.py on inputs a user really meets: a truncated weight shard (an interrupted download or copy)
and an export that is moved (--vision-tower).

Every test runs the command line in a subprocess, as a user does: exit status, the one-paragraph message naming
the file, no traceback, and what is left in the output folder. Tiny random models, offline, CPU, seconds.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_convert_checkpoint import hf_to_cs, make_hf_dir, tiny_projector
from test_convert_llava_hf import tiny_llava_hf

ROOT = Path(__file__).resolve().parents[1]
HUB_CLIP = "openai/clip-vit-large-patch14-336"

# Stops a cs -> hf conversion with a ConversionError after its second shard is on disk (a failure midway).
STOP_AFTER_TWO_SHARDS = """
import sys
import convert_checkpoint as cc
flush = cc.ShardedWriter._flush
def stop(self):
    flush(self)
    if len(self.written) == 2:
        raise cc.ConversionError("stopped by the test after two shards")
cc.ShardedWriter._flush = stop
sys.exit(cc.main(sys.argv[1:]))
"""


def cli(*args, code=None):
    command = [sys.executable, "convert_checkpoint.py"] if code is None else [sys.executable, "-c", code]
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def convert(src_fmt, tgt_fmt, checkpoint, *extra, code=None):
    return cli("convert", "--model", "llava", "--src-fmt", src_fmt, "--tgt-fmt", tgt_fmt, "--no-progress-bar",
               *extra, checkpoint, code=code)


def files(folder: Path) -> dict:
    """{relative path: bytes} of every file below `folder` (empty when it does not exist)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def assert_failed_naming(result, name: str):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]  # one paragraph, the last thing printed
    assert message.startswith("Conversion failed: ") and name in message, result.stderr
    assert "truncated or damaged" in message and "download or copy it again" in message, message


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The LLaVA-repo layout with 3 text shards, once as .safetensors and once as .bin."""
    root = tmp_path_factory.mktemp("hf")
    return {fmt: make_hf_dir(root / fmt, projector=tiny_projector(), text_shards=3, text_safetensors=fmt == "st")
            for fmt in ("st", "bin")}


@pytest.fixture(scope="module")
def cs_ckpt(hf_dirs, tmp_path_factory):
    """A converted cs-2.2 checkpoint and its yaml."""
    out = tmp_path_factory.mktemp("cs")
    hf_to_cs(hf_dirs["bin"], out)
    return out / "pytorch_model_to_cs-2.2.mdl", out / "config_to_cs-2.2.yaml"


# ----------------------------------------------------------------------------------------------
# Item 7: a truncated shard


@pytest.mark.parametrize("fmt,shard", [("st", "model-00002-of-00003.safetensors"),
                                       ("bin", "pytorch_model-00002-of-00003.bin")])
def test_truncated_hf_shard_names_the_file_and_writes_nothing(hf_dirs, tmp_path, fmt, shard):
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs[fmt], src)
    path = src / "text_model" / shard
    truncate(path)
    out = tmp_path / "new" / "cs"  # neither folder exists, and neither may be left behind
    result = convert("hf", "cs-2.2", src, "--output-dir", out)
    assert_failed_naming(result, str(path))
    assert not (tmp_path / "new").exists()


def test_truncated_llava_hf_shard_leaves_the_source_folder_as_it_was(tmp_path):
    src = tmp_path / "llava-hf"
    tiny_llava_hf(128, 126, 127).save_pretrained(src, max_shard_size="200KB")
    shards = sorted(src.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    truncate(shards[-1])
    before = files(src)
    result = convert("llava-hf", "cs-2.2", src)  # default --output-dir: the source folder itself
    assert_failed_naming(result, str(shards[-1]))
    assert files(src) == before


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_truncated_cs_checkpoint_leaves_its_folder_as_it_was(cs_ckpt, tmp_path, legacy):
    folder = tmp_path / "model_dir"
    ckpt, config = folder / "checkpoint_100.mdl", folder / "params.yaml"
    folder.mkdir()
    # torch.save's pre-1.6 format is a bare pickle: no cheap completeness test, it fails inside torch.load
    torch.save(torch.load(cs_ckpt[0], weights_only=True), ckpt, _use_new_zipfile_serialization=not legacy)
    shutil.copy(cs_ckpt[1], config)
    (folder / "text_model").mkdir()  # an earlier convert-config: configs, no weights
    (folder / "text_model" / "config.json").write_text("{}")
    truncate(ckpt)
    before = files(folder)
    result = convert("cs-2.2", "hf", ckpt, "--config", config)  # default --output-dir: the checkpoint's folder
    assert_failed_naming(result, str(ckpt))
    assert files(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_100.mdl", "params.yaml", "text_model"]


def test_diff_of_a_truncated_safetensors_file_names_it(hf_dirs, tmp_path):
    """diff reads a file directly (no completeness test first): the safetensors reader's own error is caught."""
    path = tmp_path / "model-00001-of-00003.safetensors"
    shutil.copy(hf_dirs["st"] / "text_model" / path.name, path)
    truncate(path)
    result = cli("diff", path, hf_dirs["st"] / "text_model" / path.name)
    assert_failed_naming(result, str(path))
    assert "SafetensorError" in result.stderr


def test_failure_after_shards_were_written_leaves_the_output_folder_as_it_was(cs_ckpt, tmp_path):
    out = tmp_path / "out"
    (out / "image_model").mkdir(parents=True)
    (out / "notes.txt").write_text("kept")
    (out / "image_model" / "config.json").write_text("{}")
    before = files(out)
    result = convert("cs-2.2", "hf", cs_ckpt[0], "--config", cs_ckpt[1], "--output-dir", out,
                     "--hf-shard-size", "20KB", code=STOP_AFTER_TWO_SHARDS)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "Conversion failed: stopped by the test after two shards"
    assert files(out) == before and sorted(p.name for p in out.iterdir()) == ["image_model", "notes.txt"]


# ----------------------------------------------------------------------------------------------
# Item 9: --vision-tower


def test_default_vision_tower_is_the_absolute_path_of_the_written_image_model(cs_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    result = convert("cs-2.2", "hf", cs_ckpt[0], "--config", cs_ckpt[1], "--output-dir", out)
    assert result.returncode == 0, result.stderr
    tower = json.loads((out / "text_model" / "config.json").read_text())["mm_vision_tower"]
    assert tower == str((out / "image_model").resolve()) and Path(tower).is_absolute()
    assert (Path(tower) / "config.json").is_file() and (Path(tower) / "pytorch_model.bin").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["image_model", "notes.txt", "text_model"]  # no staging left


def test_given_vision_tower_is_written_verbatim_by_convert_and_convert_config(cs_ckpt, tmp_path):
    result = convert("cs-2.2", "hf", cs_ckpt[0], "--config", cs_ckpt[1], "--output-dir", tmp_path / "a",
                     "--vision-tower", HUB_CLIP)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "a" / "text_model" / "config.json").read_text())["mm_vision_tower"] == HUB_CLIP
    result = cli("convert-config", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--output-dir",
                 tmp_path / "b", "--vision-tower", "../image_model", cs_ckpt[1])
    assert result.returncode == 0, result.stderr
    text = json.loads((tmp_path / "b" / "text_model" / "config.json").read_text())
    assert text["mm_vision_tower"] == "../image_model"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["image_model", "text_model"]


@pytest.mark.parametrize("command,src_fmt,tgt", [("convert", "hf", "cs-2.2"), ("convert", "cs-2.2", "llava-hf"),
                                                 ("convert-config", "cs-2.2", "llava-hf")])
def test_vision_tower_is_refused_where_the_target_has_no_such_field(hf_dirs, cs_ckpt, tmp_path, command, src_fmt,
                                                                     tgt):
    src = {"hf": hf_dirs["bin"], "cs-2.2": cs_ckpt[0] if command == "convert" else cs_ckpt[1]}[src_fmt]
    result = cli(command, "--model", "llava", "--src-fmt", src_fmt, "--tgt-fmt", tgt, "--output-dir",
                 tmp_path / "out", "--vision-tower", HUB_CLIP, src)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Conversion failed: --vision-tower only applies to --tgt-fmt hf"), message
    assert f"--tgt-fmt {tgt} output has no such field" in message and "drop the option" in message
    assert not (tmp_path / "out").exists()
