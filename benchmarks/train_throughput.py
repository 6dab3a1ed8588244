"""Training throughput of run.py's train_step with batch trimming on vs off, phase-1-like data, one run.

Model: the foundation benchmark config (ViT 256 x 4 layers, image 224 / patch 14 = 256 image tokens; Llama 512 x 4
layers, vocab 32000), phase-1 freezing (projector trains). Data: MSL 2048 rows with about 600 real tokens
(BOS + 256 image slots + a ~340-token text, the caption's last 32 tokens carry loss) and right padding, as the
phase-1 H5 files hold. Trimming cuts each batch to its longest real sequence; off computes all 2048 positions.

    python benchmarks/train_throughput.py [--steps 4] [--batch 4] [--threads 2]

Prints samples/s for both and the ratio (target >= 3).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MSL = 2048


def phase1_batch(batch_size, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (batch_size, MSL), generator=g, dtype=torch.int32)
    loss_mask = torch.zeros_like(ids)
    kpm = torch.ones_like(ids)
    for b in range(batch_size):
        real = int(torch.randint(560, 641, (1,), generator=g))
        kpm[b, :real] = 0
        loss_mask[b, real - 33:real - 1] = 1
    return {"image_data": torch.randn(batch_size, 3, 224, 224, generator=g), "text_input_ids": ids,
            "loss_mask": loss_mask, "labels": torch.roll(ids, -1, dims=1), "key_padding_mask": kpm}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import model as M
    import run
    from model_step import our_section

    torch.set_num_threads(args.threads)
    section = dict(our_section(), freeze=["^image_model", "^text_model"])
    section["text_model"] = dict(section["text_model"], max_position_embeddings=MSL)
    rc = run.RunConfig()
    rt = run.Runtime("CPU", rc, mixed_precision=False, fp16_type="bfloat16")
    results = {}
    for trim in (False, True):
        torch.manual_seed(0)
        llava = M.LlavaModel(section)
        optimizer = run.make_adamw([p for p in llava.parameters() if p.requires_grad], 1e-3, (0.9, 0.999), 1e-8,
                                   0.0, True)
        min_len = llava.config.image_start_idx + llava.model.num_image_tokens + 1
        batches = [phase1_batch(args.batch, seed) for seed in range(args.steps + 1)]
        times = []
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            loss, _, _, _ = run.train_step(rt, llava, optimizer, [batch], llava.config, 1.0,
                                        min_len if trim else None)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        rate = args.batch / statistics.median(times)
        results[trim] = rate
        print(f"trimming {'on ' if trim else 'off'}: {rate:.2f} samples/s (median of {len(times)} steps, "
              f"last loss {loss:.4f})", flush=True)
    print(f"ratio on/off: {results[True] / results[False]:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
