"""Forward+backward step time and peak memory: our LlavaModel vs transformers' LlavaForConditionalGeneration.

Same weights (HF -> CS mapping of convert_checkpoint.py), same batch, same machine, one run; fp32 on CPU.
Config: ViT 256 wide x 4 layers x 4 heads (FFN 1024), image 224, patch 14; 2-layer GELU projector; Llama 512 wide
x 4 layers x 8 heads (FFN 1376), vocab 32000; batch 4 x 512 tokens; loss on the last 64 positions per sample.
Each model runs in its own subprocess so peak RSS is measured cleanly (VmHWM reset after setup).

    python benchmarks/model_step.py [--steps 5] [--threads 2]

Prints median step seconds and peak step memory (MiB above the post-setup RSS) for both, and ours/HF ratios
(targets: time <= 0.8, memory <= 0.9).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, LOSS_TOKENS, VOCAB, IMAGE_TOKEN = 4, 512, 64, 32000, 31999


def our_section():
    return {
        "image_model": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, filter_size=1024, image_size=[224, 224],
                            patch_size=[14, 14]),
        "text_model": dict(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4, num_heads=8, filter_size=1376,
                           max_position_embeddings=SEQ),
        "projector": {"image_model": dict(input_unit=256, layers_units=[512, 512], layers_activation=["gelu", None])},
        "image_feature_select_layer_idx": -2,
        "image_start_idx": 1,
    }


def build(which):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=224, patch_size=14, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                num_attention_heads=8, max_position_embeddings=SEQ, rms_norm_eps=1e-5),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=256)
    hf = LlavaForConditionalGeneration(config)
    hf.config._attn_implementation = "sdpa"
    hf.train()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, IMAGE_TOKEN, (BATCH, SEQ), generator=g)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=g)
    num_patches, start = 256, 1
    if which == "hf":
        hf_ids = ids.clone()
        hf_ids[:, start:start + num_patches] = IMAGE_TOKEN
        labels = torch.full_like(ids, -100)
        labels[:, -LOSS_TOKENS:] = ids[:, -LOSS_TOKENS:]  # HF shifts: logits[t] predicts labels[t + 1]
        return hf, lambda: hf(input_ids=hf_ids, pixel_values=pixels, labels=labels).loss

    import convert_checkpoint as cc
    import model as M

    ours = M.LlavaModel(our_section())
    ours.model.load_state_dict(cc.llava_hf_to_cs(hf.state_dict(), num_heads=8))
    del hf
    ours.train()
    loss_mask = torch.zeros(BATCH, SEQ, dtype=torch.int32)
    loss_mask[:, SEQ - LOSS_TOKENS - 1:SEQ - 1] = 1  # position t predicts ids[t + 1]: the same 64 targets
    batch = {"image_data": pixels, "text_input_ids": ids.int(), "loss_mask": loss_mask,
             "labels": torch.roll(ids, -1, dims=1).int(), "key_padding_mask": torch.zeros_like(loss_mask)}
    return ours, lambda: ours(batch)


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(which, steps, threads):
    import gc

    import torch

    torch.set_num_threads(threads)
    module, step = build(which)
    loss = step()  # warm-up (allocator, kernels)
    loss.backward()
    module.zero_grad(set_to_none=True)
    del loss
    gc.collect()
    base = rss_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the VmHWM high-water mark
        f.write("5")
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        module.zero_grad(set_to_none=True)
        del loss
    peak = rss_kib("VmHWM:") - base
    print(json.dumps({"median_s": statistics.median(times), "peak_mib": peak / 1024, "loss": losses[0]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker(args.worker, args.steps, args.threads)
        return
    results = {}
    for which in ("hf", "ours"):
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[which]
        print(f"{which:>4}: median step {r['median_s']:.3f} s, peak step memory {r['peak_mib']:.0f} MiB, "
              f"loss {r['loss']:.5f}")
    print(f"ratio ours/HF: time {results['ours']['median_s'] / results['hf']['median_s']:.2f} (target <= 0.8), "
          f"peak memory {results['ours']['peak_mib'] / results['hf']['peak_mib']:.2f} (target <= 0.9)")
    print(f"loss difference (same weights and targets): {abs(results['ours']['loss'] - results['hf']['loss']):.2e}")


if __name__ == "__main__":
    main()
