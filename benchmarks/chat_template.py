"""Benchmark of phase-2 H5 writing with chat templates against the vicuna_v1 layout, on the same mix665k-style records.

Runs create_hdf5_dataset.py's writer in one process at MSL 2048 three times: vicuna_v1 with the Llama-2 tokenizer
(the reference), chat_template with the Llama-3.1-Instruct tokenizer and with the Qwen3 tokenizer (their own
templates), and prints samples/s and the ratio to the reference. Uses ../shared/reference_data/tokenizer/* when
present, else tokenizers trained here (SentencePiece for vicuna_v1, byte-level BPE llama3/qwen2 for the templates).

    python benchmarks/chat_template.py                 # 10,000 records
    python benchmarks/chat_template.py --records 2000  # quick run
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TOKENIZERS = ROOT.parent / "shared" / "reference_data" / "tokenizer"

import create_hdf5_dataset as c  # noqa: E402
from hdf5 import WORDS, make_images, make_phase2  # noqa: E402  (the mix665k-style record generator)
from preprocess_dataset import write_bpe_chat_tokenizer, write_llama_tokenizer  # noqa: E402

# name -> (reference tokenizer folder, family trained here when it is absent, system_prompt_style)
RUNS = {"vicuna_v1 / Llama-2": ("llama2_hf", "llama", "vicuna_v1"),
        "chat_template / Llama-3.1": ("llama3_1_hf", "llama3", "chat_template"),
        "chat_template / Qwen3": ("qwen3_hf", "qwen2", "chat_template")}


def tokenizer_dir(work: Path, name: str, family: str) -> tuple[Path, str]:
    if (TOKENIZERS / name / "tokenizer.json").is_file():
        return TOKENIZERS / name, name
    texts = [" ".join(WORDS)] * 50
    if family == "llama":
        return write_llama_tokenizer(texts, work / family, vocab_size=1000), f"{family} trained here"
    return write_bpe_chat_tokenizer(texts, work / family, family, vocab_size=1000), f"{family} trained here"


def write(work: Path, tok: Path, style: str, msl: int) -> tuple[float, int]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    raw = {"setup": {"input_dir": str(work / "in2"), "output_dir": str(out), "processes": 1},
           "processing": {"huggingface_tokenizer": str(tok), "max_seq_length": msl, "display_pbar": False},
           "dataset": {"image_dir": str(work / "images2"), "num_patches": 576, "system_prompt_style": style,
                       "use_ftfy": False}}
    cfg = c.parse_config(raw, "benchmark")
    c.load_tokenizer(tok)  # loaded once before timing, as a long run amortises it
    t0 = time.perf_counter()
    result = c.preprocess("LlavaPhaseTwo", cfg, overwrite=True, progress=False)
    return time.perf_counter() - t0, result["post-process"]["successful_files"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--msl", type=int, default=2048)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_chat_"))
    try:
        (work / "in2").mkdir()
        make_phase2(work, args.records, make_images(work / "src_images"))
        print(f"{args.records} mix665k-style records, MSL {args.msl}, 1 process")
        reference = None
        for label, (name, family, style) in RUNS.items():
            tok, source = tokenizer_dir(work, name, family)
            seconds, samples = write(work, tok, style, args.msl)
            rate = samples / seconds
            reference = reference or rate
            print(f"  {label:28s} ({source}): {samples} samples in {seconds:.1f} s = {rate:,.0f} samples/s "
                  f"({rate / reference:.2f}x the vicuna_v1 reference)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
