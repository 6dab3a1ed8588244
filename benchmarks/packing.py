"""Sequence packing: samples/s of run.py's train step for padded static rows, trimmed rows and packed rows.

One run measures all three on the same samples (the padded one is the reference):
- padded: every sample in its own MSL row, full length (what the CSX path computes: static shapes);
- trimmed: the same rows cut to the batch's longest sample (runconfig.trim_batches, GPU/CPU);
- packed: the samples packed with create_hdf5_dataset.plan_rows / pack_row (train_input.packing).

Rows are MSL 2048 with 576 image slots (a small ViT on 48 x 48 images, 2 x 2 patches, yields the 576 tokens, so
CPU time stays sane). Two length distributions, each sample drawn independently:
- phase 1, modelled on LCS-558K: BOS + 576 image slots + a 10-60 token caption (uniform), loss on the caption;
- phase 2, modelled on mix665k: 6% text-only conversations of 300-2048 tokens (uniform); the rest a 35-token
  prompt + 576 slots + 50-1400 text tokens, heavy-tailed (a log-normal, median about 130, clipped), loss on
  about half the text.

    python benchmarks/packing.py                      # CPU, the small model, 2 threads
    python benchmarks/packing.py --phase 1 --samples 48
    python benchmarks/packing.py --device cuda        # bf16, the 7B text shape with a few layers; prints MFU

Targets: packed / padded >= 2.5x on phase 1; packed / trimmed >= 1.4x on phase 2.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MSL, SLOTS, VOCAB, CPU_VOCAB = 2048, 576, 32000, 2048
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


# ----------------------------------------------------------------------------------------------
# Samples (H5 rows as create_hdf5_dataset.py writes them)


def phase1_sample(rng) -> tuple:
    caption = int(rng.integers(10, 61))
    return 1, caption, True, caption


def phase2_sample(rng) -> tuple:
    if rng.random() < 0.06:
        n = int(rng.integers(300, 2049))
        return 35, n - 35 - SLOTS, False, n // 2  # text-only: the masked slots are not part of its length
    text = int(np.clip(rng.lognormal(np.log(130), 1.0), 50, 1400))
    return 35, text, True, text // 2


def make_row(rng, start: int, text: int, has_image: bool, loss: int) -> np.ndarray:
    """[4, MSL] int32: prefix, slots, text, right padding; text-only rows mask their slots."""
    row = np.zeros((4, MSL), np.int32)
    length = min(start + SLOTS + text, MSL)
    row[0, :length] = rng.integers(3, CPU_VOCAB, length)
    row[2, :length - 1] = row[0, 1:length]
    row[1, length - 1 - loss:length - 1] = 1
    row[3, length:] = 1
    if not has_image:
        row[3, start - 1:start + SLOTS] = 1
        row[1, start - 1:start + SLOTS] = 0
    return row


def make_samples(phase: int, n: int, seed: int = 0) -> list:
    """[(row, has_image)] * n."""
    rng = np.random.default_rng(seed)
    draw = phase1_sample if phase == 1 else phase2_sample
    out = []
    for _ in range(n):
        start, text, has_image, loss = draw(rng)
        out.append((make_row(rng, start, text, has_image, loss), has_image))
    return out


# ----------------------------------------------------------------------------------------------
# Batches for the three ways


def padded_batches(samples: list, batch: int, image_shape, torch) -> list:
    out = []
    for a in range(0, len(samples) - batch + 1, batch):
        r = np.stack([row for row, _ in samples[a:a + batch]])
        names = ("text_input_ids", "loss_mask", "labels", "key_padding_mask")
        out.append({"image_data": torch.randn(batch, *image_shape),
                    **{k: torch.from_numpy(r[:, i].copy()) for i, k in enumerate(names)}})
    return out


def packed_batches(samples: list, start: int, batch: int, image_shape, torch) -> tuple:
    """(batches of `batch` packed rows, rows planned) in the order the samples come."""
    import create_hdf5_dataset as hd

    tokens = np.array([(row[3] == 0).sum() for row, _ in samples])
    has_image = np.array([image for _, image in samples])
    max_images = MSL // SLOTS
    plan = hd.plan_rows(np.arange(len(samples)), tokens, has_image, MSL, max_images)
    packed = []
    for members in plan:
        chosen = [(samples[i][0], torch.randn(*image_shape) if has_image[i] else None) for i in members]
        packed.append(hd.pack_row(chosen, MSL, max_images, SLOTS, image_shape, torch.float32,
                                  lambda row: (start, SLOTS)))
    out = [{k: torch.stack([p[k] for p in packed[a:a + batch]]) for k in packed[0]}
           for a in range(0, len(packed) - batch + 1, batch)]
    return out, len(plan)


# ----------------------------------------------------------------------------------------------
# The model and the timed steps


def model_section(device: str, phase: int, start: int) -> dict:
    freeze = ["^image_model", "^text_model"] if phase == 1 else ["^image_model"]
    if device == "cuda":  # the 7B text shape with a few layers, a CLIP-L-wide ViT with a few layers
        image = dict(hidden_size=1024, num_hidden_layers=4, num_heads=16, filter_size=4096, image_size=[336, 336],
                     patch_size=[14, 14])
        text = dict(vocab_size=VOCAB, hidden_size=4096, num_hidden_layers=4, num_heads=32, filter_size=11008,
                    max_position_embeddings=MSL)
        width = 1024
    else:
        image = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, filter_size=256, image_size=[48, 48],
                     patch_size=[2, 2])
        # narrow and short, with a small vocabulary, so that the LM head does not outweigh the layers as it
        # never does at 7B (there it is 2% of the step): the mix of matmul and attention work stays realistic
        text = dict(vocab_size=CPU_VOCAB, hidden_size=512, num_hidden_layers=2, num_heads=8, filter_size=1376,
                    max_position_embeddings=MSL)
        width = 64
    hidden = text["hidden_size"]
    return {"image_model": image, "text_model": text, "freeze": freeze, "image_start_idx": start,
            "projector": {"image_model": dict(input_unit=width, layers_units=[hidden, hidden],
                                              layers_activation=["gelu", None])},
            "image_feature_select_layer_idx": -2}


def time_way(section, batches, trim, rt) -> float:
    """Seconds of run.train_step over batches[1:] (batches[0] warms up); trim: run.py's trim_to or None."""
    import torch

    import model as M
    import run

    torch.manual_seed(0)
    llava = M.LlavaModel(section).to(rt.device)
    optimizer = run.make_adamw([p for p in llava.parameters() if p.requires_grad], 1e-5, (0.9, 0.999), 1e-8, 0.0,
                               True)
    run.train_step(rt, llava, optimizer, batches[:1], llava.config, 1.0, trim)
    sync(rt)
    t0 = time.perf_counter()
    for batch in batches[1:]:
        run.train_step(rt, llava, optimizer, [batch], llava.config, 1.0, trim)
    sync(rt)
    return time.perf_counter() - t0


def sync(rt) -> None:
    import torch

    if rt.device.type == "cuda":
        torch.cuda.synchronize()


def count_samples(batches) -> int:
    import model as M

    return sum(int(M.LlavaModel.num_samples(b)) for b in batches)


def computed_positions(batches, trim: int | None) -> int:
    import run

    return sum(run.trim_batch(b, trim)["text_input_ids"].numel() if trim else b["text_input_ids"].numel()
               for b in batches)


def real_tokens(batches) -> int:
    return sum(int((b["key_padding_mask"] == 0).sum()) for b in batches)


def train_flops(section, tokens: int, images: int) -> float:
    """6 x trainable + 2 x frozen parameters per token (plus the ViT per image); attention not counted."""
    import torch

    import model as M

    with torch.device("meta"):
        llava = M.LlavaModel(section)
    text = sum(p.numel() for n, p in llava.named_parameters() if "text_model" in n and "embedding" not in n)
    vit = sum(p.numel() for n, p in llava.named_parameters() if "image_model" in n)
    proj = sum(p.numel() for n, p in llava.named_parameters() if "projector" in n)
    text_factor = 6 if any(p.requires_grad for n, p in llava.named_parameters() if "text_model" in n) else 4
    return text_factor * text * tokens + 6 * proj * images * SLOTS + 2 * vit * images * SLOTS


def run_phase(phase: int, args, rt, torch) -> dict:
    samples = make_samples(phase, args.samples, seed=phase)
    start = 1 if phase == 1 else 35
    section = model_section(args.device, phase, start)
    image_shape = (3, *section["image_model"]["image_size"])
    padded = padded_batches(samples, args.batch, image_shape, torch)
    # about as many samples per step as unpacked: phase-1 rows hold about 3 samples, phase-2 rows about 2
    packed, n_rows = packed_batches(samples, start, max(1, args.batch // (3 if phase == 1 else 2)), image_shape,
                                    torch)
    if args.device == "cuda":
        padded = [{k: v.to(rt.device) for k, v in b.items()} for b in padded]
        packed = [{k: v.to(rt.device) for k, v in b.items()} for b in packed]
    min_len = start + SLOTS + 1
    results = {}
    for name, batches, trim in (("padded", padded, None), ("trimmed", padded, min_len),
                                ("packed", packed, MSL // SLOTS * SLOTS)):
        timed = batches[1:]
        seconds = time_way(section, batches, trim, rt)
        done = count_samples(timed)
        pad = 1 - real_tokens(timed) / computed_positions(timed, trim)
        results[name] = {"samples_per_s": done / seconds, "padding": pad, "seconds": seconds}
        print(f"  phase {phase} {name:8s}: {done / seconds:8.2f} samples/s, padding {pad:5.1%} "
              f"({done} samples in {seconds:.1f} s)", flush=True)
        if args.device == "cuda":
            flops = train_flops(section, real_tokens(timed), done)
            print(f"             MFU {flops / seconds / (args.peak_tflops * 1e12):.1%} "
                  f"(6N per trainable token, peak {args.peak_tflops:.0f} TFLOPS)")
    print(f"  phase {phase}: {len(samples)} samples -> {n_rows} packed rows; packed / padded "
          f"{results['packed']['samples_per_s'] / results['padded']['samples_per_s']:.2f}x, packed / trimmed "
          f"{results['packed']['samples_per_s'] / results['trimmed']['samples_per_s']:.2f}x", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", type=int, choices=[1, 2], default=None, help="one phase only (default both)")
    ap.add_argument("--samples", type=int, default=48, help="samples per phase")
    ap.add_argument("--batch", type=int, default=6, help="samples per unpacked batch (packed: rows / 3 or / 2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak_tflops", type=float, default=PEAK_BF16_TFLOPS)
    args = ap.parse_args()

    import torch

    import run

    torch.set_num_threads(args.threads)
    rc = run.RunConfig(precision="bf16" if args.device == "cuda" else "fp32")
    rt = run.Runtime("GPU" if args.device == "cuda" else "CPU", rc, mixed_precision=args.device == "cuda",
                     fp16_type="bfloat16")
    print(f"MSL {MSL}, {SLOTS} image slots, device {args.device} ({rt.precision})")
    summary = {}
    for phase in ([args.phase] if args.phase else [1, 2]):
        summary[phase] = run_phase(phase, args, rt, torch)
    if 1 in summary:
        r = summary[1]
        print(f"phase 1: packed / padded static = {r['packed']['samples_per_s'] / r['padded']['samples_per_s']:.2f}x "
              "(target >= 2.5)")
    if 2 in summary:
        r = summary[2]
        print(f"phase 2: packed / trimmed = {r['packed']['samples_per_s'] / r['trimmed']['samples_per_s']:.2f}x "
              "(target >= 1.4)")


if __name__ == "__main__":
    main()
