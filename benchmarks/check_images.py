"""What `dataset.check_images: true` costs in create_hdf5_dataset.py (LlavaPhaseOne, 1 process).

Writes LCS-558K-style records whose images are distinct paths (hard links to a few real-size JPEGs, so every
record opens its own file as in LCS-558K), runs the phase-1 writer with the check off (Cerebras' behaviour, the
reference) and on, in the same run, and prints samples/s of both, the ratio, and the cost per image. The images
are in the page cache (just written); on a cold network file system each header read costs a round trip more.

    python benchmarks/check_images.py                  # 20,000 records
    python benchmarks/check_images.py --records 5000   # quick run
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import hdf5 as bench  # benchmarks/hdf5.py: the same record and image generators


def run_writer(work: Path, tok: Path, check: bool) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, samples written) of one 1-process phase-1 run."""
    import create_hdf5_dataset as c

    out = work / f"out_{check}"
    cfg = c.parse_config({
        "setup": {"input_dir": str(work / "in1"), "output_dir": str(out), "processes": 1},
        "processing": {"huggingface_tokenizer": str(tok), "max_seq_length": 2048, "display_pbar": False},
        "dataset": {"image_dir": str(work / "images1"), "num_patches": 576, "check_images": check}}, "benchmark")
    cpu0, t0 = bench.cpu_seconds(), time.perf_counter()
    result = c.preprocess("LlavaPhaseOne", cfg, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - t0, bench.cpu_seconds() - cpu0
    shutil.rmtree(out)
    return wall, cpu, result["post-process"]["n_examples"]


def time_header_opens(paths: list[Path]) -> float:
    """Seconds per image of the check alone (Image.open header parse), over the given files."""
    import create_hdf5_dataset as c

    t0 = time.perf_counter()
    assert all(c.image_header_readable(str(p)) for p in paths)
    return (time.perf_counter() - t0) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in1").mkdir()
        sources = bench.make_images(work / "images1")
        bench.make_phase1(work, args.records, sources)
        tok, tok_name = bench.get_tokenizer(work)
        run_writer(work, tok, False)  # warm-up: tokenizer load, page cache
        off_wall, off_cpu, n_off = run_writer(work, tok, False)
        on_wall, on_cpu, n_on = run_writer(work, tok, True)
        assert n_on == n_off == args.records, (n_on, n_off)
        images = sorted((work / "images1").glob("*/*.jpg"))[:5000]
        per_image = time_header_opens(images)
    print(f"LlavaPhaseOne, {args.records} records with distinct image paths, MSL 2048, tokenizer {tok_name}, "
          f"1 process")
    print(f"  check_images false (reference): {args.records / off_wall:8.0f} samples/s  "
          f"({off_cpu / args.records * 1e6:.0f} CPU-us/sample)")
    print(f"  check_images true             : {args.records / on_wall:8.0f} samples/s  "
          f"({on_cpu / args.records * 1e6:.0f} CPU-us/sample)")
    print(f"  ratio on/off: {off_wall / on_wall:.2f}x throughput; cost {(on_wall - off_wall) / args.records * 1e6:.0f} "
          f"us per image in the run, {per_image * 1e6:.0f} us per header open alone")


if __name__ == "__main__":
    main()
