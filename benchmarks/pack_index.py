"""Planning cost of train_input.packing on a dataset the size of LCS-558K: the row-length index and a pack plan.

Writes N H5 rows (default 558,128, LCS-558K's size) in files of 10,000 rows exactly as create_hdf5_dataset.py
lays them out (data [n, 4, 2048] int32, gzip chunks of one row; a few distinct phase-1 rows, written as raw
compressed chunks so that writing is quick), then times, in one run:
- the index pass create_hdf5_dataset.pack_index (cold: decompresses every row, 2 processes),
- the same call again (warm: the cached pack_index.npz),
- one epoch's plan (plan_rows over a seeded permutation).

    python benchmarks/pack_index.py [--rows 558128] [--workers 2]

Target: cold index + plan under a minute on 2 cores.
"""

import argparse
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MSL, SLOTS, PER_FILE = 2048, 576, 10000


def phase1_rows(rng, n: int) -> list:
    rows = []
    for _ in range(n):
        length = 1 + SLOTS + int(rng.integers(10, 61)) + 1
        row = np.zeros((4, MSL), np.int32)
        row[0, :length] = rng.integers(3, 32000, length)
        row[0, 1:1 + SLOTS] = 0
        row[2, :length - 1] = row[0, 1:length]
        row[1, SLOTS:length - 1] = 1
        row[3, length:] = 1
        rows.append(row)
    return rows


def write_files(folder: Path, n_rows: int) -> list:
    import h5py

    rng = np.random.default_rng(0)
    chunks = [zlib.compress(r.tobytes(), 4) for r in phase1_rows(rng, 64)]
    files, written = [], 0
    while written < n_rows:
        n = min(PER_FILE, n_rows - written)
        path = folder / f"examples_{len(files)}_0.h5"
        with h5py.File(path, "w") as f:
            data = f.create_dataset("data", shape=(n, 4, MSL), dtype=np.int32, chunks=(1, 4, MSL),
                                    compression="gzip")
            for j in range(n):
                data.id.write_direct_chunk((j, 0, 0), chunks[(written + j) % len(chunks)])
            f.create_dataset("img_path", data=np.array([[b"00000/000000001.jpg"]] * n), compression="gzip")
            f.attrs["n_examples"] = n
        files.append(str(path))
        written += n
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=558128)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch

    import create_hdf5_dataset as hd

    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        files = write_files(tmp, args.rows)
        print(f"wrote {args.rows} rows in {len(files)} files ({time.perf_counter() - t0:.1f} s)", flush=True)
        t0 = time.perf_counter()
        tokens, has_image = hd.pack_index(files, progress=True, workers=args.workers)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = hd.pack_index(files, progress=False)
        warm = time.perf_counter() - t0
        assert np.array_equal(again[0], tokens) and len(tokens) == args.rows
        g = torch.Generator()
        g.manual_seed(0)
        order = torch.randperm(len(tokens), generator=g).numpy()
        t0 = time.perf_counter()
        rows = hd.plan_rows(order, tokens, has_image, MSL, MSL // SLOTS)
        plan = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fill = tokens.sum() / (len(rows) * MSL)
    print(f"index, cold ({args.workers} processes): {cold:.1f} s ({args.rows / cold:,.0f} rows/s)")
    print(f"index, cached: {warm:.2f} s")
    print(f"plan of one epoch: {plan:.1f} s -> {len(rows):,} rows, {fill:.1%} of the positions real")
    print(f"cold index + plan: {cold + plan:.1f} s (target < 60 s)")


if __name__ == "__main__":
    main()
