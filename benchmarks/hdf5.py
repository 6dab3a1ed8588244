"""Benchmark of create_hdf5_dataset.py: writer start-up and samples/s (LlavaPhaseOne, LlavaPhaseTwo), reader images/s.

Generates LCS-558K-style (phase 1) and mix665k-style (phase 2) LLaVA jsonl records whose images exist on disk
(hard links to a few real-size JPEGs), and runs the writer command as a user does (`python create_hdf5_dataset.py
LlavaPhaseOne|LlavaPhaseTwo --params ...`, a fresh Python process) at MSL 2048 with 576 patches and the Llama-2
tokenizer (../shared/reference_data/tokenizer/llama2_hf when present, else one trained here with sentencepiece),
with 1 and 2 processes. Per phase it reports:
  start-up: the same command on a single record (imports + tokenizer load + one record), with the tokenizer cache
            empty (the first run ever) and filled (every later run);
  whole command: wall and CPU seconds of the process tree (threads and worker processes included);
  net: samples / (whole - start-up), per CPU-second and per wall-second.
Then the reader (H5 row + JPEG decode + the LLaVA 336 transform chain) in one process.

    python benchmarks/hdf5.py                      # 20,000 records per phase (the issue's size)
    python benchmarks/hdf5.py --records 5000       # quick run
    python benchmarks/hdf5.py --profile 2          # cProfile of a 1-process phase-2 run, in this process

Targets: start-up under 3 s; phase 2 >= 2,000 samples per CPU-second net of start-up; phase 1 >= 1,500 samples/s
per process (LCS-558K in under 4 minutes on 2 cores).
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLAMA2 = ROOT.parent / "shared" / "reference_data" / "tokenizer" / "llama2_hf"

from preprocess_dataset import CAPTION_QUESTIONS as CAPTION_PROMPTS  # noqa: E402  (LCS-558K's caption prompts)
WORDS = ("a the of with in on and grey watch army style strap luxury furniture memory foam mattress topper floral "
         "watercolor rose flower border pink bus street people vehicles crowded white red blue green cat couch "
         "living room back positioned top book author title instruction wisdom humor happy life rewarding dog "
         "man woman child playing running sitting standing table kitchen window light dark large small old new "
         "beautiful city river mountain beach sunset tree field road car bicycle train station").split()
QUESTIONS = ["What are the colors of the bus in the image?", "What feature can be seen on the back of the bus?",
             "Where is the cat positioned in the image?", "Who is the author of this book?",
             "What is the title of this book?", "Is the bus driving down the street or pulled off to the side?",
             "What is the man doing in the picture?", "How many people are visible?"]
SHORT = "\nAnswer the question using a single word or phrase."
IMAGE_SIZES = [(640, 480), (500, 375), (480, 640), (336, 448), (640, 427), (500, 500)]


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_images(img_root: Path, n_distinct: int = 12) -> list[Path]:
    """A few distinct JPEGs of typical dataset sizes (gradients + shapes + noise, q=90)."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    rng = np.random.default_rng(0)
    src = img_root / "_src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n_distinct):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h)) + 60], -1).astype(np.int16)
        arr = np.clip(arr + rng.integers(-25, 25, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            draw.ellipse((x, y, x + 60, y + 40), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = src / f"{i}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_phase1(work: Path, n: int, sources: list[Path]) -> None:
    rng = random.Random(1)
    with open(work / "in1" / "lcs.jsonl", "w") as f:
        for i in range(n):
            rid = f"{i:09d}"
            rel = f"{rid[:5]}/{rid}.jpg"
            link(sources[i % len(sources)], work / "images1" / rel)
            prompt = rng.choice(CAPTION_PROMPTS)
            prompt = prompt + "\n<image>" if rng.random() < 0.5 else "<image>\n" + prompt
            f.write(json.dumps({"id": rid, "image": rel, "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": sentence(rng, 6, 22)}]}) + "\n")


def make_phase2(work: Path, n: int, sources: list[Path]) -> None:
    rng = random.Random(2)
    with open(work / "in2" / "mix.jsonl", "w") as f:
        for i in range(n):
            kind = rng.random()
            if kind < 0.1:  # text-only ShareGPT-style conversation
                turns = []
                for _ in range(rng.randint(1, 3)):
                    turns += [{"from": "human", "value": sentence(rng, 10, 40) + "?"},
                              {"from": "gpt", "value": sentence(rng, 80, 250) + "."}]
                f.write(json.dumps({"id": f"t{i}", "model": "", "conversations": turns}) + "\n")
                continue
            rel = f"coco/train2017/{i:012d}.jpg" if kind < 0.7 else f"ocr_vqa/images/{i:010d}X.jpg"
            link(sources[i % len(sources)], work / "images2" / rel)
            turns = []
            for t in range(rng.randint(1, 6)):
                q = rng.choice(QUESTIONS) + (SHORT if kind >= 0.7 else "")
                a = sentence(rng, 1, 3) if kind >= 0.7 else sentence(rng, 5, 60) + "."
                turns += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"id": f"{i:012d}", "image": rel, "conversations": turns}) + "\n")


def get_tokenizer(work: Path) -> tuple[Path, str]:
    if LLAMA2.is_dir():
        return LLAMA2, "Llama-2 (reference_data)"
    from preprocess_dataset import write_llama_tokenizer

    rng = random.Random(3)
    texts = [sentence(rng, 5, 30) for _ in range(2000)] + QUESTIONS + CAPTION_PROMPTS
    return write_llama_tokenizer(texts, work / "tok", vocab_size=1000), "trained here (vocab 1000)"


def child_cpu_seconds() -> float:
    """CPU time of the finished (waited-for) child processes of this process and their own children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def write_config(work: Path, tok: Path, phase: int, procs: int, msl: int, input_dir: Path, out: Path) -> Path:
    import yaml

    path = work / f"phase{phase}_{procs}_{input_dir.name}.yaml"
    path.write_text(yaml.safe_dump({
        "setup": {"input_dir": str(input_dir), "output_dir": str(out), "processes": procs},
        "processing": {"huggingface_tokenizer": str(tok), "max_seq_length": msl, "display_pbar": False},
        "dataset": {"image_dir": str(work / f"images{phase}"), "num_patches": 576}}))
    return path


def run_command(work: Path, tok: Path, phase: int, procs: int, msl: int, input_dir: Path) -> tuple[float, float, dict]:
    """(wall s, CPU s of the process tree, data_params.json) of one writer command in a fresh Python process."""
    out = work / f"out{phase}_{procs}_{input_dir.name}"
    params = write_config(work, tok, phase, procs, msl, input_dir, out)
    mode = "LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo"
    cmd = [sys.executable, str(ROOT / "create_hdf5_dataset.py"), mode, "--params", str(params), "--overwrite",
           "--no_progress"]
    c0, t0 = child_cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - t0, child_cpu_seconds() - c0
    return wall, cpu, json.loads((out / "data_params.json").read_text())


def first_record_input(work: Path, phase: int) -> Path:
    """A folder holding the first record of the phase's input only (the start-up run's input)."""
    d = work / f"one{phase}"
    d.mkdir(exist_ok=True)
    src = next((work / f"in{phase}").glob("*.jsonl"))
    with open(src) as f:
        (d / src.name).write_text(f.readline())
    return d


def profile_writer(work: Path, tok: Path, phase: int, msl: int) -> None:
    import cProfile
    import pstats

    import create_hdf5_dataset as c

    params = write_config(work, tok, phase, 1, msl, work / f"in{phase}", work / f"prof{phase}")
    mode = "LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo"
    cfg = c.load_config(params, mode)
    prof = cProfile.Profile()
    prof.runcall(c.preprocess, mode, cfg, True, False)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def run_reader(work: Path, n: int) -> tuple[float, float, float]:
    """(images/s, images per CPU-second, text-only rows/s) of LlavaH5Dataset.__getitem__ in one process."""
    import torch

    import create_hdf5_dataset as c

    transforms = [{"name": "expand_to_square", "background_color": [122, 116, 104]},
                  {"name": "resize", "size": 336, "interpolation": "bicubic"}, {"name": "center_crop", "size": 336},
                  {"name": "to_tensor"},
                  {"name": "normalize", "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711]}]
    ds = c.LlavaH5Dataset(str(work / "out1_1_in1"), str(work / "images1"), transforms, (3, 336, 336), torch.bfloat16)
    idx = random.Random(4).sample(range(len(ds)), min(n, len(ds)))
    torch.set_num_threads(1)  # as in a DataLoader worker
    ds[idx[0]]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in idx:
        ds[i]
    img_rate = len(idx) / (time.perf_counter() - t0)
    img_cpu_rate = len(idx) / (time.process_time() - c0)
    text = c.LlavaH5Dataset(str(work / "out2_1_in2"), None, transforms, (3, 336, 336), torch.bfloat16)
    files = text.files
    import h5py

    rows = []
    for k, path in enumerate(files):
        with h5py.File(path, "r") as f:
            rows += [int(text._starts[k]) + j for j, p in enumerate(f["img_path"][:, 0]) if p == b"None"]
    rows = rows[:2000]
    t0 = time.perf_counter()
    for i in rows:
        text[i]
    return img_rate, img_cpu_rate, len(rows) / max(time.perf_counter() - t0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000, help="records per phase")
    ap.add_argument("--msl", type=int, default=2048)
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--reader_images", type=int, default=300)
    ap.add_argument("--workdir", help="keep the generated data here (default: a temporary folder, removed)")
    ap.add_argument("--profile", type=int, choices=(1, 2), help="only cProfile a 1-process run of this phase")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # per-process figures: one core per process

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hdf5_bench_"))
    # the writer's tokenizer cache starts empty here, so the first start-up is the one of a first run ever
    os.environ["LLAVA_TOKENIZER_CACHE"] = str(work / "tokenizer_cache")
    shutil.rmtree(work / "tokenizer_cache", ignore_errors=True)
    try:
        for d in ("in1", "in2"):
            (work / d).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sources = make_images(work / "images_src")
        make_phase1(work, args.records, sources)
        make_phase2(work, args.records, sources)
        tok, tok_name = get_tokenizer(work)
        print(f"generated {args.records} records per phase in {time.perf_counter() - t0:.1f} s; tokenizer: "
              f"{tok_name}; MSL {args.msl}; {os.cpu_count()} CPUs")
        if args.profile:
            profile_writer(work, tok, args.profile, args.msl)
            return
        procs = [int(p) for p in args.processes.split(",")]
        print(f"{'phase':>5} {'procs':>5} {'start-up s':>11} {'(1st run)':>9} {'samples':>8} {'whole s':>8} "
              f"{'CPU s':>6} {'samples/s':>10} {'net /CPU-s':>11} {'net /s':>7} {'net /s/proc':>11}  skipped/truncated")
        for phase in (1, 2):
            one = first_record_input(work, phase)
            for p in procs:
                cold = "-"
                if p == procs[0]:  # the first run ever: the tokenizer cache is built
                    shutil.rmtree(work / "tokenizer_cache", ignore_errors=True)
                    cold = f"{run_command(work, tok, phase, p, args.msl, one)[0]:.2f}"
                starts = [run_command(work, tok, phase, p, args.msl, one)[:2] for _ in range(3)]
                s_wall, s_cpu = min(w for w, _ in starts), min(c for _, c in starts)
                wall, cpu, res = run_command(work, tok, phase, p, args.msl, work / f"in{phase}")
                pp = res["post-process"]
                n = pp["successful_files"]
                net_wall = n / max(wall - s_wall, 1e-9)
                print(f"{phase:>5} {p:>5} {s_wall:>11.2f} {cold:>9} {n:>8} {wall:>8.1f} "
                      f"{cpu:>6.1f} {n / wall:>10.0f} {n / max(cpu - s_cpu, 1e-9):>11.0f} {net_wall:>7.0f} "
                      f"{net_wall / p:>11.0f}  {pp['discarded_files']}/{pp['truncated_samples']}", flush=True)
        print("(start-up: best of 3 runs on one record, tokenizer cache filled; 1st run: the same with the cache "
              "empty; whole: the command on all records as a user waits for it; net: samples / (whole - start-up); "
              "CPU s: the process tree's, on otherwise idle cores)")
        img_rate, img_cpu_rate, text_rate = run_reader(work, args.reader_images)
        print(f"reader, one process (= one DataLoader worker): {img_rate:.0f} images/s wall, {img_cpu_rate:.0f} "
              f"images/CPU-s (H5 row + JPEG decode + expand_to_square, resize 336 bicubic, center_crop, normalize, "
              f"bf16); {text_rate:.0f} text-only rows/s")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
