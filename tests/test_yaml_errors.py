"""Broken yaml in any --params / --config: `file:line:column: what yaml says`, exit status 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BROKEN = {
    "syntax": ("model:\n  image_model: {hidden_size: 8\n  text_model: {}\n", r":\d+:\d+: "),
    "python_tag": ("model: !!python/object/apply:os.system ['true']\n", r":1:8: .*python/object/apply"),
    "not_a_mapping": ("- model\n- runconfig\n", r":1:1: the top level of .* must be a mapping"),
}


def commands(path: Path, tmp: Path) -> dict:
    return {
        "run.py": [sys.executable, "run.py", "CPU", "--mode", "train", "--params", str(path), "--model_dir",
                   str(tmp / "m")],
        "create_hdf5_dataset.py": [sys.executable, "create_hdf5_dataset.py", "LlavaPhaseOne", "--params", str(path),
                                   "--output_dir", str(tmp / "h5")],
        "convert_checkpoint.py": [sys.executable, "convert_checkpoint.py", "convert-config", "--model", "llava",
                                  "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--output-dir", str(tmp / "out"),
                                  str(path)],
    }


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("script", ["run.py", "create_hdf5_dataset.py", "convert_checkpoint.py"])
def test_broken_yaml_is_named_with_line_and_column(tmp_path, script, case):
    text, pattern = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    proc = subprocess.run(commands(path, tmp_path)[script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    import re

    assert re.search(re.escape(str(path)) + pattern, proc.stderr), proc.stderr[-2000:]
