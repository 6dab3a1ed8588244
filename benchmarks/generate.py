"""Benchmark of generation: tokens/s of Llava.generate (static key/value cache) against transformers' generate() on
the same llava-hf weights, same prompts, greedy, at batch 1 and batch 8: after a warm-up, --repeats rounds that
run theirs then ours, the best time of each side counted (a shared machine's noise only ever slows a run).

The model is a random LlavaForConditionalGeneration (CLIP-style tower, Llama-style LM of --hidden width and --layers
layers, vocabulary 32000); our model gets its weights through convert_checkpoint's llava-hf mapping, and the two are
first checked to produce the same greedy tokens. CPU, and CUDA when present (--device).

    python benchmarks/generate.py                         # hidden 512, 8 layers, prompt 96, 64 new tokens
    python benchmarks/generate.py --hidden 1024 --layers 12 --device cuda

Target: ours >= 1.5x transformers' tokens/s at batch 1 and batch 8.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert_checkpoint as cc  # noqa: E402
import model as M  # noqa: E402
import modeling_llava as ml  # noqa: E402

IMAGE_TOKEN = 31999


def build(hidden: int, layers: int, device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                       max_position_embeddings=1024)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval().to(device)
    section = cc.llava_hf_config_to_cs(config.to_dict())
    ours = M.LlavaModel(section).eval()
    ours.model.load_state_dict(cc.llava_hf_to_cs(hf.state_dict(), num_heads=hidden // 64,
                                                 num_kv_heads=hidden // 128, vision="clip"))
    return hf, ours.model.to(device), section["image_start_idx"]


def prompts(batch: int, length: int, start: int, device: str):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, IMAGE_TOKEN, (batch, length), generator=g)
    ids[:, start:start + 64] = IMAGE_TOKEN
    pixels = torch.randn(batch, 3, 112, 112, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=96, help="prompt tokens, 64 of them image tokens")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    hf, ours, start = build(args.hidden, args.layers, args.device)
    print(f"model: LM hidden {args.hidden}, {args.layers} layers, vocab 32000; prompt {args.prompt} tokens "
          f"(64 image), {args.new_tokens} new tokens, greedy, {args.device}, torch threads {torch.get_num_threads()}")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids, mask, pixels = prompts(batch, args.prompt, start, args.device)
        starts = torch.full((batch,), start, device=args.device)
        n = args.new_tokens

        def run_theirs():
            return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)

        def run_ours():
            return ours.generate(ids, mask, pixels, starts, max_new_tokens=n)

        with torch.no_grad():
            theirs_tokens = run_theirs()[:, ids.shape[1]:].tolist()  # also the warm-up
            ours_tokens = run_ours()
            same = ours_tokens == theirs_tokens
            t_theirs = t_ours = float("inf")
            for _ in range(args.repeats):
                t_theirs = min(t_theirs, timed(run_theirs, args.device))
                t_ours = min(t_ours, timed(run_ours, args.device))
        rate_theirs, rate_ours = batch * n / t_theirs, batch * n / t_ours
        layout = ml.decoding_steps(ours.text_model, batch).layout
        print(f"  batch {batch}: ours {rate_ours:,.0f} tokens/s, transformers {rate_theirs:,.0f} tokens/s -> "
              f"{rate_ours / rate_theirs:.2f}x (same greedy tokens: {same}; our step weights: {layout})")


if __name__ == "__main__":
    main()
