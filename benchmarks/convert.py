"""Benchmark of convert_checkpoint.py: seconds and peak RSS for hf -> cs-2.2 -> hf on a generated checkpoint.

Generates an hf-layout LLaVA checkpoint of about --params parameters in bf16 (a CLIP ViT-L/14-336 image_model in
one file + a Llama text_model with projector, 2048 wide, layers chosen to reach the size, in --shards .bin shards),
then runs, each in a fresh process whose peak RSS is read with wait4():
  reference  torch.load every shard and torch.save them as one file (the least any conversion must do)
  hf -> cs   python convert_checkpoint.py convert --src-fmt hf --tgt-fmt cs-2.2 ...
  cs -> hf   python convert_checkpoint.py convert --src-fmt cs-2.2 --tgt-fmt hf ... (--shards output shards)
and checks that the round trip gives identical tensors.

    python benchmarks/convert.py                    # ~1.5e9 parameters (~3 GB bf16), needs ~13 GB of disk
    python benchmarks/convert.py --params 2e8       # quick run
    python benchmarks/convert.py --workdir /big/disk --keep

Target: peak RSS of each conversion at most 1.3 x the checkpoint size.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VIT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
           patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, model_type="clip_vision_model")
TEXT = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu",
            tie_word_embeddings=False, model_type="llava", architectures=["LlavaLlamaForCausalLM"],
            mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
            mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False)


def vit_shapes() -> dict:
    d, f, n = VIT["hidden_size"], VIT["intermediate_size"], (VIT["image_size"] // VIT["patch_size"]) ** 2 + 1
    p = "vision_model."
    shapes = {p + "embeddings.class_embedding": (d,), p + "embeddings.patch_embedding.weight": (d, 3, 14, 14),
              p + "embeddings.position_embedding.weight": (n, d), p + "pre_layrnorm.weight": (d,),
              p + "pre_layrnorm.bias": (d,), p + "post_layernorm.weight": (d,), p + "post_layernorm.bias": (d,)}
    for i in range(VIT["num_hidden_layers"]):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{proj}.weight": (d, d), f"{layer}self_attn.{proj}.bias": (d,)})
        shapes.update({f"{layer}mlp.fc1.weight": (f, d), f"{layer}mlp.fc1.bias": (f,), f"{layer}mlp.fc2.weight": (d, f),
                       f"{layer}mlp.fc2.bias": (d,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)})
    return shapes


def text_shapes(layers: int) -> dict:
    h, f, v = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes.update({layer + f"self_attn.{p}.weight": (h, h) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({layer + "mlp.gate_proj.weight": (f, h), layer + "mlp.up_proj.weight": (f, h),
                       layer + "mlp.down_proj.weight": (h, f), layer + "input_layernorm.weight": (h,),
                       layer + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h), "model.mm_projector.0.weight": (h, 1024),
                   "model.mm_projector.0.bias": (h,), "model.mm_projector.2.weight": (h, h),
                   "model.mm_projector.2.bias": (h,)})
    return shapes


def numel(shapes: dict) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def plan(target: float) -> tuple:
    """Text layers that bring ViT + text + projector closest to `target` parameters."""
    vit = numel(vit_shapes())
    per_layer = numel(text_shapes(1)) - numel(text_shapes(0))
    layers = max(1, round((target - vit - numel(text_shapes(0))) / per_layer))
    return layers, vit + numel(text_shapes(layers))


def generate(root: Path, layers: int, shards: int) -> None:
    """Write the hf layout, one shard at a time (random bf16 values; norms 1)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def tensor(key, shape):
        if "norm" in key and key.endswith("weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    (root / "image_model").mkdir(parents=True)
    (root / "text_model").mkdir(parents=True)
    (root / "image_model" / "config.json").write_text(json.dumps(VIT))
    (root / "text_model" / "config.json").write_text(json.dumps(dict(TEXT, num_hidden_layers=layers)))
    torch.save({k: tensor(k, s) for k, s in vit_shapes().items()}, root / "image_model" / "pytorch_model.bin")
    shapes = text_shapes(layers)
    total = sum(numel({k: s}) * 2 for k, s in shapes.items())
    weight_map, part, part_bytes, index = {}, {}, 0, 1
    for key, shape in shapes.items():
        part[key] = tensor(key, shape)
        part_bytes += part[key].numel() * 2
        if part_bytes >= total / shards * index or key == list(shapes)[-1]:
            name = f"pytorch_model-{index:05d}-of-{shards:05d}.bin"
            torch.save(part, root / "text_model" / name)
            weight_map.update({k: name for k in part})
            part, index = {}, index + 1
    index_file = root / "text_model" / "pytorch_model.bin.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


REFERENCE = """
import sys, torch
from pathlib import Path
out = {}
for f in sys.argv[2:]:
    out.update(torch.load(f, map_location="cpu", weights_only=True))
torch.save(out, sys.argv[1])
"""


def measured(cmd: list) -> tuple:
    """(seconds, peak RSS bytes) of a child process, from wait4() of that very child."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def bytes_of(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def same_tensors(a_dir: Path, b_dir: Path) -> bool:
    sys.path.insert(0, str(ROOT))
    import torch

    import convert_checkpoint as cc

    for sub in ("image_model", "text_model"):
        a, b = {}, {}
        for f in cc.find_weight_files(a_dir / sub):
            a.update(cc.load_weight_file(f))
        for f in cc.find_weight_files(b_dir / sub):
            b.update(cc.load_weight_file(f))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def main() -> None:
    if sys.argv[1:2] == ["--generate"]:
        generate(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.5e9, help="approximate parameter count (default 1.5e9)")
    parser.add_argument("--shards", type=int, default=4, help="text_model shards in and out (default 4)")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, cs, back = work / "hf", work / "cs", work / "hf_back"
    for path in (src, cs, back, work / "reference.bin"):
        if path.exists():
            sys.exit(f"{path} exists; choose an empty --workdir")
    layers, params = plan(args.params)
    try:
        t = time.time()
        # In a child: this process must stay small, because a child starts with its parent's peak RSS
        # (Linux keeps ru_maxrss across fork/exec) and torch is never imported here before the measurements.
        subprocess.run([sys.executable, __file__, "--generate", str(src), str(layers), str(args.shards)], check=True)
        size = bytes_of(src, "*.bin")
        print(f"checkpoint: {params / 1e9:.2f}e9 parameters (ViT-L + {layers}-layer 2048-wide Llama + projector), "
              f"bf16, {size / 1e9:.2f} GB in 1 + {args.shards} files; generated in {time.time() - t:.0f} s")
        shard_bytes = bytes_of(src / "text_model", "*.bin") // args.shards + 1
        files = [src / "image_model" / "pytorch_model.bin"] + sorted((src / "text_model").glob("*.bin"))
        runs = {
            "reference (load + save)": [sys.executable, "-c", REFERENCE, work / "reference.bin", *files],
            "hf -> cs-2.2": [sys.executable, "convert_checkpoint.py", "convert", "--model", "llava", "--src-fmt", "hf",
                             "--tgt-fmt", "cs-2.2", "--config", src, "--output-dir", cs, "--no-progress-bar", src],
            "cs-2.2 -> hf": [sys.executable, "convert_checkpoint.py", "convert", "--model", "llava", "--src-fmt",
                             "cs-2.2", "--tgt-fmt", "hf", "--config", cs / "config_to_cs-2.2.yaml", "--output-dir",
                             back, "--hf-shard-size", str(shard_bytes), "--no-progress-bar",
                             cs / "pytorch_model_to_cs-2.2.mdl"],
        }
        results = {}
        for name, cmd in runs.items():
            results[name] = measured([str(c) for c in cmd])
            if name.startswith("reference"):
                (work / "reference.bin").unlink()
        ok = same_tensors(src, back)
        print(f"{'step':26s} {'seconds':>8s} {'x ref':>6s} {'peak RSS GB':>12s} {'RSS / checkpoint':>17s}")
        ref_seconds = results["reference (load + save)"][0]
        for name, (seconds, rss) in results.items():
            print(f"{name:26s} {seconds:8.1f} {seconds / ref_seconds:6.2f} {rss / 1e9:12.2f} {rss / size:17.2f}")
        worst = max(rss for name, (_, rss) in results.items() if not name.startswith("reference")) / size
        print(f"round trip identical: {ok}; worst conversion peak RSS = {worst:.2f} x checkpoint "
              f"(target <= 1.3: {'met' if worst <= 1.3 else 'NOT met'})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
