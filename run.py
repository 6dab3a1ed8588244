"""Train and evaluate LLaVA on CSX (cerebras.pytorch), GPU (one or many through torchrun) or CPU.

    python run.py CPU --mode train --params configs/params_llava_tiny_phase1.yaml --model_dir model_dir/p1
    python run.py GPU --mode train --params configs/params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml \
        --model_dir model_dir/p1 --checkpoint_path converted/pytorch_model_to_cs-2.2.mdl
    torchrun --nproc_per_node 8 run.py GPU --mode train --params configs/...phase2_MSL2K.yaml \
        --model_dir model_dir/p2 --checkpoint_path model_dir/p1/checkpoint_2180.mdl
    python run.py CSX --mode train --params ... --model_dir ... --mgmt_address HOST:PORT --num_csx 1 \
        --mount_dirs /data --python_paths $PWD
    python run.py CPU --mode eval --params ... --model_dir model_dir/p2            # latest checkpoint
    python run.py CPU --mode train --params ... --model_dir D runconfig.max_steps=10 train_input.batch_size=8

Modes: train, eval, train_and_eval (eval every runconfig.eval_frequency steps and at the end).
Trailing KEY=VALUE arguments override yaml values (VALUE parsed as yaml). The resolved config is saved as
model_dir/params_<mode>.yaml and inside every checkpoint.

Checkpoints: model_dir/checkpoint_<step>.mdl (torch.save dict: model (CS names, `model.` prefix), optimizer,
lr_scheduler, global_step, dataloader position, __metadata__ with the config), every runconfig.checkpoint_steps
and at the end, keeping the newest runconfig.max_checkpoints (alias keep_checkpoints, default 3). A run resumes
from --checkpoint_path or the newest checkpoint in model_dir; `load_checkpoint_states: model` takes the weights
only (phase 2 from phase 1). Converted checkpoints (keys without `model.`) load into the inner Llava module.

Sequence packing: train_input.packing / eval_input.packing true packs several samples per MSL row
(create_hdf5_dataset.PackedRowSampler / PackedDataset); batch_size then counts rows, the logs count samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

log = logging.getLogger("run")

# ----------------------------------------------------------------------------------------------
# Config sections (2.2.0 grammar). IGNORED: keys Cerebras accepts that have no effect here.


@dataclass
class InputConfig:
    data_dir: Union[str, List[str]] = ""  # H5 directory (or list) from create_hdf5_dataset.py
    img_data_dir: Optional[str] = None  # image root; H5 img_path entries are relative to it
    batch_size: int = 1  # global batch per optimizer step, across all GPUs / systems
    micro_batch_size: Optional[int] = None  # per-device batch; gradient accumulation fills batch_size
    image_data_size: List[int] = field(default_factory=lambda: [3, 336, 336])  # [C, H, W] fed to the ViT
    transforms: Optional[List[dict]] = None  # image transforms (create_hdf5_dataset.build_transforms)
    mixed_precision: bool = False  # images in fp16_type (and bf16 autocast on GPU)
    fp16_type: str = "bfloat16"  # bfloat16, cbfloat16 (CSX; bfloat16 elsewhere) or float16
    shuffle: bool = False  # reshuffle every epoch (seeded by shuffle_seed + epoch)
    shuffle_seed: int = 0  # order seed; resuming checks it
    drop_last: bool = True  # accepted for compatibility: training always uses whole batches
    num_workers: int = 0  # DataLoader worker processes
    prefetch_factor: Optional[int] = None  # batches prefetched per worker
    persistent_workers: bool = True  # keep workers between epochs (only with num_workers > 0)
    on_bad_image: str = "error"  # "error" or "text_only" (count and mask a missing/corrupt image)
    packing: bool = False  # several samples per MSL row (batch_size then counts rows); off = Cerebras' rows
    max_images_per_row: Optional[int] = None  # packing: image slots per row (default MSL // image tokens)

    IGNORED = ("data_processor", "bos_token_id", "pad_token_id", "use_worker_cache", "noaugment", "sort_files",
               "vocab_size", "patch_size", "prepend_cls_token", "num_patches")
    REQUIRED_VALUES = {}


@dataclass
class OptimizerConfig:
    optimizer_type: str = "AdamW"  # AdamW (Cerebras formula) or SGD
    learning_rate: Any = 1e-3  # a number, or a list of schedules run one after another (SequentialLR)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon (Cerebras default 1e-6; the LLaVA configs set 1e-8)
    weight_decay: float = 0.0  # decoupled weight decay
    correct_bias: bool = True  # AdamW bias correction
    momentum: float = 0.0  # SGD momentum
    max_gradient_norm: Optional[float] = None  # clip the global grad norm (every backend)
    loss_scaling_factor: Any = 1.0  # float16 / CSX loss scaling: a number or "dynamic"
    log_summaries: bool = False  # log per-layer grad norms to TensorBoard

    IGNORED = ("initial_loss_scale", "steps_per_increase", "min_loss_scale", "max_loss_scale",
               "max_gradient_value", "adjust_learning_rate", "grad_accum_steps")
    REQUIRED_VALUES = {}


@dataclass
class RunConfig:
    max_steps: int = 10  # optimizer steps to train (counted from global step 0)
    log_steps: int = 10  # log every N steps
    checkpoint_steps: int = 0  # checkpoint every N steps (0: only at the end)
    eval_steps: Optional[int] = None  # eval batches per evaluation (None: one pass over eval_input)
    eval_frequency: Optional[int] = None  # train_and_eval: evaluate every N steps
    max_checkpoints: int = 3  # keep the newest N checkpoints of this run
    keep_checkpoints: Optional[int] = None  # alias of max_checkpoints
    seed: int = 1  # torch seed for initialisation
    load_checkpoint_states: Optional[str] = None  # "model" (weights only) or a comma list; None: all present
    autoload_last_checkpoint: bool = True  # resume from the newest checkpoint in model_dir
    disable_strict_checkpoint_loading: bool = False  # allow missing/unexpected keys
    check_loss_values: bool = True  # stop on NaN/inf loss
    trim_batches: bool = True  # GPU/CPU: cut every batch to its longest real sequence
    distributed_strategy: str = "ddp"  # multi-GPU/CPU: "ddp" or "fsdp" (full shard, for 7B/13B phase 2)
    activation_checkpointing: bool = False  # recompute layers in backward (less memory)
    precision: Optional[str] = None  # GPU/CPU override: "bf16", "fp16" or "fp32" (default: from mixed_precision)

    IGNORED = ("num_csx", "mgmt_address", "mount_dirs", "python_paths", "compile_only", "validate_only",
               "job_labels", "compile_dir", "num_workers_per_csx", "precision_opt_level", "logging",
               "save_initial_checkpoint", "summary_dir", "log_input_summaries", "dump_activations",
               "enable_distributed", "dist_backend", "init_method", "main_process_id", "sync_batchnorm",
               "num_epochs", "steps_per_epoch", "num_steps", "target_device", "mode", "model_dir",
               "checkpoint_path", "use_cs_grad_accum", "job_priority", "credentials_path", "wsc_log_level")
    REQUIRED_VALUES = {}


SECTIONS = {"train_input": InputConfig, "eval_input": InputConfig, "optimizer": OptimizerConfig,
            "runconfig": RunConfig}


def apply_overrides(params: dict, overrides: List[str]) -> dict:
    import yaml

    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"Override {item!r} must look like section.key=value (e.g. runconfig.max_steps=10)")
        path, value = item.split("=", 1)
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]  # numbers index lists
        node = params
        try:
            for k in keys[:-1]:
                node = node[k] if isinstance(node, list) else node.setdefault(k, {})
            node[keys[-1]] = yaml.safe_load(value)
        except (IndexError, TypeError, AttributeError):
            raise SystemExit(f"Override {item!r}: {path} does not name a value in the config") from None
    return params


def load_params(path: str, overrides: List[str]) -> dict:
    import create_hdf5_dataset as hd

    if not Path(path).is_file():
        raise SystemExit(f"--params {path}: no such file")
    try:
        params = hd.read_yaml_mapping(path, "--params")
    except hd.YamlFileError as e:
        print(f"error: {e}", file=sys.stderr)  # exit status 2, as for the other CLIs' yaml errors
        raise SystemExit(2) from None
    unknown = set(params) - set(SECTIONS) - {"model"}
    if unknown:
        raise SystemExit(f"{path}: unknown top-level section(s) {sorted(unknown)}; valid: "
                         f"{sorted(list(SECTIONS) + ['model'])}")
    return apply_overrides(params, overrides)


def parse_sections(params: dict):
    import model as M

    ignored: list = []
    out = {}
    for name, cls in SECTIONS.items():
        if name in params:
            out[name] = M._parse_section(cls, params[name], name, ignored)
    out.setdefault("runconfig", RunConfig())
    out.setdefault("optimizer", OptimizerConfig())
    out["model"] = M.parse_model_config(params.get("model"))
    for name in ("train_input", "eval_input"):
        if name in out and out[name].fp16_type not in ("bfloat16", "cbfloat16", "float16"):
            raise M.ConfigError(f"{name}.fp16_type: {out[name].fp16_type!r}; use bfloat16, cbfloat16 or float16")
        if name in out and out[name].on_bad_image not in ("error", "text_only"):
            raise M.ConfigError(f"{name}.on_bad_image: {out[name].on_bad_image!r}; use 'error' or 'text_only'")
        images = out[name].max_images_per_row if name in out else None
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise M.ConfigError(f"{name}.max_images_per_row: {images!r}; use a whole number >= 1 (or leave it "
                                "out for as many as fit: MSL // image tokens)")
    rc = out["runconfig"]
    if rc.keep_checkpoints is not None:
        rc.max_checkpoints = rc.keep_checkpoints
    if rc.distributed_strategy not in ("ddp", "fsdp"):
        raise M.ConfigError(f"runconfig.distributed_strategy: {rc.distributed_strategy!r}; use 'ddp' or 'fsdp'")
    if ignored:
        log.info("Ignored config keys (no effect here): %s", ", ".join(ignored))
    return out


# ----------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedules (Cerebras names and formulas)


def make_adamw(params, lr, betas, eps, weight_decay, correct_bias):
    import torch

    class AdamW(torch.optim.Optimizer):
        """cstorch AdamW: upd = m / (sqrt(v) + eps) [* sqrt(1-b2^t) / (1-b1^t)] + wd * p; p -= lr * upd."""

        def __init__(self, params):
            # amsgrad / l2_regularization_rate: cstorch AdamW's other group keys (always off here), kept so a
            # ModelZoo run that loads this optimizer state finds every key its AdamW reads
            super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                          correct_bias=correct_bias, amsgrad=False, l2_regularization_rate=0.0))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] += 1
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.mul_(b1).add_(p.grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    update = m / (v.sqrt() + group["eps"])
                    if group["correct_bias"]:
                        t = state["step"].item()
                        update.mul_(math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
                    if group["weight_decay"]:
                        update.add_(p, alpha=group["weight_decay"])
                    p.add_(update, alpha=-group["lr"])

    return AdamW(params)


def make_optimizer(cfg: OptimizerConfig, params):
    import torch

    base_lr = lr_schedule(cfg.learning_rate)(0)
    if cfg.optimizer_type.lower() == "adamw":
        return make_adamw(params, base_lr, cfg.betas, cfg.eps, cfg.weight_decay, cfg.correct_bias)
    if cfg.optimizer_type.lower() == "sgd":
        return torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise SystemExit(f"optimizer.optimizer_type: {cfg.optimizer_type!r}; use 'AdamW' or 'SGD'")


def _one_schedule(spec: dict, where: str):
    """lr(t) for one Cerebras scheduler entry, t local to it; returns (fn, total_iters)."""
    name = str(spec.get("scheduler", "")).lower()
    name = name[:-2] if name.endswith("lr") else name
    init = spec.get("initial_learning_rate", spec.get("learning_rate"))
    end = spec.get("end_learning_rate", 0.0)
    total = spec.get("total_iters", spec.get("decay_steps"))
    if name == "linear":
        return (lambda t: end + (init - end) * (1 - min(t, total) / total)), total
    if name == "cosinedecay":
        return (lambda t: end + (init - end) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))), total
    if name == "constant":
        return (lambda t: init), total
    if name == "exponential":
        rate = spec["decay_rate"]
        return (lambda t: init * rate ** (t / total)), total
    raise SystemExit(f"{where}.scheduler: {spec.get('scheduler')!r}; supported: Linear, CosineDecay, Constant, "
                     "Exponential (optional 'LR' suffix)")


def lr_schedule(learning_rate):
    """Step -> lr. A list runs its schedules one after another; milestones are cumulative total_iters."""
    if isinstance(learning_rate, (int, float)):
        return lambda step: float(learning_rate)
    specs = learning_rate if isinstance(learning_rate, list) else [learning_rate]
    parts = [_one_schedule(s, f"optimizer.learning_rate[{i}]") for i, s in enumerate(specs)]

    def lr_at(step):
        start = 0
        for i, (fn, total) in enumerate(parts):
            if i == len(parts) - 1 or step < start + total:
                return fn(step - start)
            start += total

    return lr_at


def schedule_milestones(learning_rate) -> list:
    """SequentialLR milestones of a learning_rate list: the cumulative total_iters of every schedule but the last
    ([] for a number or a single schedule)."""
    specs = learning_rate if isinstance(learning_rate, list) else []
    milestones, start = [], 0
    for i, spec in enumerate(specs[:-1]):
        total = spec.get("total_iters", spec.get("decay_steps"))
        if total is None:
            raise SystemExit(f"optimizer.learning_rate[{i}]: total_iters is needed on every schedule but the last")
        start += int(total)
        milestones.append(start)
    return milestones


def sub_schedule_steps(step: int, milestones: list) -> list:
    """cstorch SequentialLR's per-schedule last_epoch after `step` steps: global in the first schedule, counted
    from its milestone in the others."""
    return [step] + [max(0, step - m) for m in milestones]


class LRScheduler:
    """Sets the optimizer's lr from lr_schedule every step (after optimizer.step, as cstorch)."""

    def __init__(self, optimizer, learning_rate):
        self.optimizer, self.fn, self.last_step = optimizer, lr_schedule(learning_rate), 0
        self.learning_rate = learning_rate
        self._apply()

    def _apply(self):
        for g in self.optimizer.param_groups:
            g["lr"] = self.fn(self.last_step)

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        """{"last_step": n} for this class, plus the position in cstorch's form (its load_state_dict updates only
        the attributes given): last_epoch overall and per SequentialLR sub-schedule, as ModelZoo resumes it."""
        import torch

        state = {"last_step": self.last_step, "last_epoch": torch.tensor(self.last_step)}
        milestones = schedule_milestones(self.learning_rate)
        if milestones:
            state["_schedulers"] = [{"last_epoch": torch.tensor(t)}
                                    for t in sub_schedule_steps(self.last_step, milestones)]
        return state

    def load_state_dict(self, state):
        # ours: {"last_step": n}; cstorch's (ModelZoo, run_csx.py): last_epoch counts the steps taken
        self.last_step = int(state["last_step"] if "last_step" in state else state["last_epoch"])
        self._apply()


# ----------------------------------------------------------------------------------------------
# Data


def half_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "cbfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_dataset(cfg: InputConfig, model_cfg, image_dtype):
    import create_hdf5_dataset as hd

    im = model_cfg.image_model
    # The ViT's input size wins over the yaml's image_data_size, as Cerebras' set_input_defaults does.
    size = (im.num_channels, *im.image_size)
    dirs = cfg.data_dir if isinstance(cfg.data_dir, list) else [cfg.data_dir]
    for d in dirs:
        if not Path(d).is_dir():
            raise SystemExit(f"data_dir {d}: no such directory (create it with create_hdf5_dataset.py)")
    try:
        return hd.LlavaH5Dataset(cfg.data_dir, cfg.img_data_dir, cfg.transforms, image_data_size=size,
                                 dtype=image_dtype, on_bad_image=cfg.on_bad_image)
    except hd.DatasetError as e:
        raise SystemExit(f"error: {e}") from None


def check_data_against_model(dataset, model_cfg, where: str) -> None:
    """The H5 data must match the model: image slots, sequence length, vocabulary."""
    dp = dataset.data_params or {}
    patch_info = dp.get("image_patch_info") or {}
    start = patch_info.get("image_patch_start_idx")
    errors = []
    if start is not None and int(start) != model_cfg.image_start_idx:
        errors.append(f"model.image_start_idx is {model_cfg.image_start_idx} but the data in {where} places the "
                      f"image at {start} (data_params.json image_patch_start_idx): set model.image_start_idx: {start}")
    tokens = image_tokens_of(model_cfg)
    num_patches = (dp.get("dataset") or {}).get("num_patches", dp.get("num_patches", patch_info.get("num_patches")))
    if num_patches is not None and int(num_patches) != tokens:
        errors.append(f"the data in {where} has {num_patches} image slots per sample but the model produces {tokens} "
                      "image tokens (image_size/patch_size, image_feature_select_mode): regenerate the H5 with "
                      f"dataset.num_patches: {tokens} or change model.image_model")
    msl = dataset.max_sequence_length
    if msl > model_cfg.text_model.max_position_embeddings:
        errors.append(f"the data in {where} has sequence length {msl} > model.text_model.max_position_embeddings "
                      f"{model_cfg.text_model.max_position_embeddings}")
    window = model_cfg.text_model.attention_sliding_window_length
    if window is not None and window < msl:
        errors.append(f"model.text_model.attention_sliding_window_length {window} is shorter than the sequence "
                      f"length {msl} of {where}: sliding-window attention is not implemented, so use data with "
                      f"max_seq_length <= {window}")
    vocab = (dp.get("post-process") or {}).get("vocab_size", dp.get("vocab_size"))
    if vocab is not None and int(vocab) > model_cfg.text_model.vocab_size:
        errors.append(f"the tokenizer of {where} has {vocab} tokens > model.text_model.vocab_size "
                      f"{model_cfg.text_model.vocab_size}")
    if errors:
        raise SystemExit("Data/model mismatch:\n  - " + "\n  - ".join(errors))


def make_loader(dataset, batch_size: int, sampler, cfg: InputConfig, drop_last: bool):
    import torch

    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
        prefetch_factor=(cfg.prefetch_factor or 2) if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0, pin_memory=torch.cuda.is_available())


SEQ_FEATURES = ("text_input_ids", "loss_mask", "labels", "key_padding_mask", "position_ids", "segment_ids",
                "answer_start")


def image_tokens_of(model_cfg) -> int:
    """Image tokens the model writes per image: (image_size / patch_size)^2, plus CLS in cls_patch mode."""
    im = model_cfg.image_model
    tokens = (im.image_size[0] // im.patch_size[0]) * (im.image_size[1] // im.patch_size[1])
    return tokens + (model_cfg.image_feature_select_mode == "cls_patch" and im.prepend_cls_token)


def make_sampler(dataset, cfg: InputConfig, model_cfg, rank: int, world_size: int, start: int,
                 num_epochs: Optional[int]) -> tuple:
    """(dataset, sampler) for the loader: samples in ResumableSampler order, or packed rows (train_input.packing)
    in PackedRowSampler order. `start` counts the global items already consumed: samples, or packed rows."""
    import create_hdf5_dataset as hd

    if not cfg.packing:
        return dataset, hd.ResumableSampler(len(dataset), shuffle=cfg.shuffle, seed=cfg.shuffle_seed, rank=rank,
                                            world_size=world_size, start_sample=start, num_epochs=num_epochs)
    image_tokens = image_tokens_of(model_cfg)
    images = cfg.max_images_per_row or dataset.max_sequence_length // image_tokens
    if images * image_tokens > dataset.max_sequence_length:
        raise SystemExit(f"max_images_per_row {images} x {image_tokens} image tokens > the data's MSL "
                         f"{dataset.max_sequence_length}; lower max_images_per_row")
    tokens, has_image = hd.pack_index(dataset.files, progress=False)
    sampler = hd.PackedRowSampler(tokens, has_image, dataset.max_sequence_length, images, shuffle=cfg.shuffle,
                                  seed=cfg.shuffle_seed, rank=rank, world_size=world_size, start_row=start,
                                  num_epochs=num_epochs)
    return hd.PackedDataset(dataset, images, image_tokens), sampler


def prepare_pack_index(dataset, cfg: InputConfig, rt, progress: bool) -> None:
    """Packing: the main process computes (or validates) the cached row-length index, the others then read it."""
    import create_hdf5_dataset as hd

    if cfg.packing and rt.is_main:
        hd.pack_index(dataset.files, progress=progress)
    rt.barrier()


def min_trim_length(dataset, llava) -> int:
    """Batches are never trimmed below the image slots (packed rows: all K image blocks, fixed positions)."""
    import create_hdf5_dataset as hd

    if isinstance(dataset, hd.PackedDataset):
        return dataset.max_images * dataset.image_tokens
    return llava.config.image_start_idx + llava.model.num_image_tokens + 1


def trim_batch(batch: dict, min_len: int, multiple: int = 8) -> dict:
    """Cut sequence features to the longest real sequence (rounded up), never below the image slots."""
    import torch

    kpm = batch["key_padding_mask"]
    seq = kpm.shape[1]
    positions = (kpm == 0).int() * (1 + torch.arange(seq, device=kpm.device))
    length = max(int(positions.max()), min_len)
    length = min(seq, -(-length // multiple) * multiple)
    if length == seq:
        return batch
    return {k: (v[:, :length] if k in SEQ_FEATURES else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoints


CKPT_RE = re.compile(r"^checkpoint_(\d+)(?:_\d{8}_\d{6})?\.mdl$")


def list_checkpoints(model_dir: Path) -> list:
    found = [(int(m.group(1)), p) for p in model_dir.glob("checkpoint_*.mdl") if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, key=lambda x: (x[0], x[1].stat().st_mtime))]


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename: a killed run never leaves a half checkpoint."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cstorch H5 checkpoints, or a pickle that is not plain tensors
        import h5py

        if h5py.is_hdf5(path):
            try:
                import cerebras.pytorch as cstorch
            except ImportError:
                raise SystemExit(f"{path} was written by cerebras.pytorch (HDF5). Load it in the Cerebras environment "
                                 "(pip install -r requirements-csx.txt) or convert it there: python "
                                 "convert_checkpoint.py convert --model llava --src-fmt cs-2.2 --tgt-fmt cs-2.2 ...")
            return cstorch.load(str(path), map_location="cpu")
        raise SystemExit(f"Cannot load checkpoint {path}: {e}. Only torch.save/cstorch.save files with plain tensors "
                         "are accepted (weights_only=True).") from None


def modelzoo_scheduler_key(ckpt: dict) -> dict:
    """ModelZoo's Trainer (2.3+) stores a list `schedulers` where its 2.2 flow and this project store one
    `lr_scheduler`; a one-scheduler list is read as `lr_scheduler` so load_checkpoint_states selects it the same."""
    schedulers = ckpt.get("schedulers")
    if "lr_scheduler" in ckpt or not schedulers:
        return ckpt
    if len(schedulers) != 1:
        raise SystemExit(f"the checkpoint holds {len(schedulers)} learning-rate schedulers; this project drives one "
                         "(SequentialLR over optimizer.learning_rate): use load_checkpoint_states: model")
    out = {k: v for k, v in ckpt.items() if k != "schedulers"}
    out["lr_scheduler"] = schedulers[0]
    return out


def model_state_for(state: dict) -> dict:
    """Checkpoint weights for LlavaModel: converted checkpoints (no `model.` prefix) go to the inner Llava."""
    if state and not all(k.startswith("model.") for k in state):
        return {f"model.{k}": v for k, v in state.items()}
    return state


def load_model_weights(module, state: dict, strict: bool, path) -> None:
    state = model_state_for(state)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise SystemExit(f"Checkpoint {path} does not fit the model of --params: {str(e).strip()[:1500]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise SystemExit(f"Checkpoint {path} does not match the model: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Check that "
                         "--params describes the checkpoint's model, or set "
                         "runconfig.disable_strict_checkpoint_loading: true")


def dataloader_position(ckpt: dict, cfg: InputConfig, ckpt_path, default: int) -> int:
    """Global items already consumed (samples, or packed rows), from a checkpoint's dataloader state; its order
    seed and packing must match this run's."""
    if "dataloader" not in ckpt:
        return default
    state = ckpt["dataloader"]
    if int(state.get("seed", cfg.shuffle_seed)) != cfg.shuffle_seed:
        raise SystemExit(f"{ckpt_path} was trained with train_input.shuffle_seed {state['seed']}, the config says "
                         f"{cfg.shuffle_seed}: use the same seed to resume, or load_checkpoint_states: model")
    position = int(state["samples_streamed"])
    if position and bool(state.get("packing", False)) != cfg.packing:
        was = "with" if state.get("packing") else "without"
        raise SystemExit(f"{ckpt_path} was trained {was} train_input.packing; its data position does not carry "
                         f"over: resume with packing: {str(bool(state.get('packing'))).lower()}, or start a new "
                         "run from its weights with load_checkpoint_states: model")
    return position


def dataloader_state(samples_streamed: int, seed: int, cfg: InputConfig) -> dict:
    """A checkpoint's dataloader entry (ModelZoo's keys). With packing, samples_streamed counts packed rows, the
    dataloader's items, as batch_size does."""
    state = {"samples_streamed": samples_streamed, "seed": seed}
    if cfg.packing:
        state["packing"] = True
    return state


def states_to_load(spec: Optional[str]) -> Optional[set]:
    if spec is None:
        return None
    valid = {"model", "optimizer", "lr_scheduler", "global_step", "dataloader", "grad_scaler"}
    chosen = {s.strip() for s in str(spec).split(",") if s.strip()}
    if chosen - valid:
        raise SystemExit(f"load_checkpoint_states: unknown {sorted(chosen - valid)}; valid: {sorted(valid)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# GPU / CPU training (plain PyTorch, DDP or FSDP through torchrun)


class Runtime:
    """Device, process group and precision for the GPU/CPU path."""

    def __init__(self, target: str, rc: RunConfig, mixed_precision: bool, fp16_type: str):
        import torch
        import torch.distributed as dist

        if target == "GPU" and not torch.cuda.is_available():
            raise SystemExit("GPU requested but CUDA is not available (torch.cuda.is_available() is False); "
                             "use `python run.py CPU ...` or install a CUDA build of torch")
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if target == "GPU":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if target == "GPU" else "gloo")
        precision = rc.precision or ("bf16" if mixed_precision and target == "GPU" else "fp32")
        if precision == "bf16" and fp16_type == "float16" and not rc.precision:
            precision = "fp16"
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def all_reduce(self, values: list) -> list:
        """Sum floats across ranks (float64 on CPU tensors for gloo, on device for nccl)."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return values
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()


def wrap_model(llava, rt: Runtime, rc: RunConfig):
    """DDP, FSDP (full shard, layers as units) or the bare module."""
    import torch

    llava.to(rt.device)
    if rt.world_size == 1:
        return llava
    if rc.distributed_strategy == "fsdp":
        # FSDP2 (per-parameter sharding): works on CPU with gloo too, and mixes frozen and trainable parameters.
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.4
            from torch.distributed._composable.fsdp import fully_shard

        import modeling_llava as ml

        for m in llava.modules():
            if isinstance(m, (ml.LlamaDecoderLayer, ml.ViTEncoderLayer)):
                fully_shard(m)
        fully_shard(llava)
        return llava
    return torch.nn.parallel.DistributedDataParallel(
        llava, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def trainable_names(wrapped) -> list:
    """Names of the optimizer's parameters in its state_dict order: its groups (model.param_group_names) in turn."""
    import model as M

    return [n for group in M.param_group_names(getattr(wrapped, "module", wrapped)) for n in group]


# ----------------------------------------------------------------------------------------------
# Optimizer-state interchange (ours, older ours, Cerebras ModelZoo's)

CS_CHECKPOINT_VERSION = "2.10.0"  # cerebras.pytorch release whose checkpoint layout run.py's checkpoints follow


def checkpoint_metadata(params: dict, writer: str, version: str) -> list:
    """__metadata__ in ModelZoo's shape: `version` must parse as a PEP 440 version (ModelZoo's compatibility check
    and --src-fmt cs-auto read it); what this project needs lives under its own key `llava_pipeline`."""
    import torch

    return [{"version": version, "model_name": "LlavaModel", "params": params,
             "llava_pipeline": {"writer": writer, "torch": str(torch.__version__)}}]


def checkpoint_writer(ckpt: dict) -> str:
    """"run.py", "run_csx.py" (this project, any age) or "modelzoo" (a cstorch checkpoint written elsewhere)."""
    meta = (ckpt.get("__metadata__") or [{}])[-1]
    ours = meta.get("llava_pipeline") or {}
    if ours.get("writer"):
        return ours["writer"]
    version = str(meta.get("version", ""))
    if version.startswith("llava-torch-"):  # before the ModelZoo-shaped metadata
        return "run.py"
    return "run_csx.py" if version.startswith("cstorch-") else "modelzoo"


def align_param_groups(state: dict, group_names: list, legacy_names: list, ckpt_path) -> dict:
    """The saved optimizer state renumbered onto our groups (`group_names`: names per group, in order).

    Same group sizes: taken as is (ours, or ModelZoo's, which groups the same way). One saved group holding all
    parameters: a checkpoint from before the grouping (indices in `legacy_names` order), moved onto our groups.
    Anything else cannot be matched safely and is an error."""
    saved = [len(g["params"]) for g in state["param_groups"]]
    ours = [len(g) for g in group_names]
    if saved == ours:
        return state
    if len(saved) == 1 and saved[0] == sum(ours) == len(legacy_names):
        new_index = {n: i for i, n in enumerate(n for g in group_names for n in g)}
        old_to_new = {i: new_index[n] for i, n in enumerate(legacy_names)}
        per_param = {old_to_new[int(i)]: v for i, v in state["state"].items()}
        groups, start = [], 0
        for size in ours:
            groups.append(dict(state["param_groups"][0], params=list(range(start, start + size))))
            start += size
        groups[1]["weight_decay"] = 0.0  # the no-decay group
        log.info("%s: optimizer state from a single parameter group, mapped onto the %s groups", ckpt_path, ours)
        return {**state, "state": per_param, "param_groups": groups}
    raise SystemExit(f"{ckpt_path}: its optimizer has parameter groups of {saved} tensors, this run's "
                     f"{ours} (weight decay, no decay); they do not line up, so the optimizer state cannot be "
                     "resumed. Check that --params trains the same parameters (model.freeze), or take the weights "
                     "only with load_checkpoint_states: model")


def with_cstorch_beta_powers(opt_state: dict) -> dict:
    """AdamW states gain cstorch's beta1_power/beta2_power (beta^(t+1) after t steps, where cstorch starts at
    beta), so cstorch's AdamW (ModelZoo, run_csx.py) continues the bias correction from this checkpoint."""
    import torch

    if not opt_state:
        return opt_state
    group_of = {i: g for g in opt_state["param_groups"] for i in g["params"]}
    per_param = {}
    for i, s in opt_state["state"].items():
        group = group_of[i]
        if "exp_avg" in s and group.get("correct_bias", True):
            b1, b2 = group["betas"]
            t = float(s["step"]) + 1
            s = {**s, "beta1_power": torch.tensor(b1 ** t, dtype=torch.float32),
                 "beta2_power": torch.tensor(b2 ** t, dtype=torch.float32)}
        per_param[i] = s
    return {**opt_state, "state": per_param}


def legacy_trainable_names(wrapped) -> list:
    """The single-group order of checkpoints written before the ModelZoo grouping."""
    module = getattr(wrapped, "module", wrapped)
    return [n for n, p in module.named_parameters() if p.requires_grad]


def full_state(wrapped, optimizer, rc: RunConfig, rt: Runtime):
    """(model_state, optimizer_state) as full, unsharded, CPU dicts (called on every rank).

    The optimizer state is always stored as torch's index-keyed state_dict, so a checkpoint resumes under any
    strategy and process count (FSDP's full state is keyed by parameter name and is converted)."""
    if rt.world_size > 1 and rc.distributed_strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(wrapped, options=opts)
        by_name = get_optimizer_state_dict(wrapped, optimizer, options=opts)
        if not by_name:  # with cpu_offload only rank 0 receives the full state
            return model_state, {}
        index = {name: i for i, name in enumerate(trainable_names(wrapped))}
        opt_state = {"state": {index[n]: v for n, v in by_name["state"].items()},
                     "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]}
        return model_state, opt_state
    module = getattr(wrapped, "module", wrapped)
    return module.state_dict(), optimizer.state_dict()


def set_optimizer_state(wrapped, optimizer, state, rc: RunConfig, rt: Runtime, global_step: int, ckpt_path):
    """Load an optimizer state from any of our checkpoints or from Cerebras ModelZoo's (cstorch AdamW).

    cstorch's AdamW state carries beta1_power/beta2_power and no `step`; ours counts `step` and derives the powers,
    so keep only what this optimizer uses (a stale copy would otherwise travel on into our own checkpoints) and
    take the step count from the checkpoint's global step where `step` is missing (every trainable parameter
    is updated at every step)."""
    import torch

    import model as M

    state = align_param_groups(state, M.param_group_names(getattr(wrapped, "module", wrapped)),
                               legacy_trainable_names(wrapped), ckpt_path)
    kept = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")
    per_param = {}
    for i, s in state.get("state", {}).items():
        s = {k: v for k, v in s.items() if k in kept}
        if "exp_avg" in s and "step" not in s:
            s["step"] = torch.tensor(float(global_step))
        per_param[i] = s
    defaults = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "weight_decay")}
    groups = [{**defaults, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()}}
              for g in state["param_groups"]]
    state = dict(state, state=per_param, param_groups=groups)
    if rt.world_size > 1 and rc.distributed_strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = trainable_names(wrapped)
        by_name = {"state": {names[int(i)]: v for i, v in state["state"].items()},
                   "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]]}
        set_optimizer_state_dict(wrapped, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def grad_norm_and_clip(wrapped, max_norm: Optional[float]):
    import torch

    params = [p for p in wrapped.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor over shards


class Logger:
    """Console + TensorBoard + a jsonl of every logged step (model_dir/<mode>/metrics.jsonl)."""

    def __init__(self, model_dir: Path, name: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.path = model_dir / name / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(model_dir / name))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events")

    def log(self, step: int, values: dict, console: str):
        if not self.enabled:
            return
        for k, v in values.items():
            if self.writer is not None and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        log.info(console)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class NonFiniteLoss(RuntimeError):
    pass


def run_torch(args, params: dict, sections: dict) -> dict:
    """GPU/CPU: train and/or evaluate; returns the last eval metrics (if any)."""
    import torch

    import model as M

    rc: RunConfig = sections["runconfig"]
    model_cfg = sections["model"]
    if rc.activation_checkpointing:
        model_cfg.activation_checkpointing = True
    train_cfg: Optional[InputConfig] = sections.get("train_input")
    eval_cfg: Optional[InputConfig] = sections.get("eval_input")
    any_input = train_cfg or eval_cfg
    rt = Runtime(args.target, rc, bool(any_input and any_input.mixed_precision), any_input.fp16_type
                 if any_input else "bfloat16")
    model_dir = Path(args.model_dir)
    if rt.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(model_dir, params, args.mode)

    torch.manual_seed(rc.seed)
    llava = M.LlavaModel(model_cfg, sparse_logits=True)
    if rt.is_main:
        c = llava.parameter_counts()
        log.info("Model: %s parameters, %s trainable, %s frozen", f"{c['total']:,}", f"{c['trainable']:,}",
                 f"{c['frozen']:,}")

    # ---- what to load
    ckpt_path, resuming = choose_checkpoint(args, rc, model_dir, rt)
    ckpt, checkpoint_step = {}, 0
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise SystemExit(f"--checkpoint_path {ckpt_path}: no such file")
        ckpt = modelzoo_scheduler_key(load_checkpoint_file(ckpt_path))
        if "model" not in ckpt:
            raise SystemExit(f"{ckpt_path} has no 'model' entry (keys: {sorted(ckpt)[:8]}); is it a LLaVA checkpoint?")
        # The yaml's load_checkpoint_states (phase 2: "model") selects what to take from the checkpoint a run
        # starts from; resuming this run's own checkpoint always restores everything. The CLI option always applies.
        chosen = states_to_load(args.load_checkpoint_states or (None if resuming else rc.load_checkpoint_states))
        load_model_weights(llava, ckpt["model"], not rc.disable_strict_checkpoint_loading, ckpt_path)
        checkpoint_step = int(ckpt.get("global_step", 0))
        if chosen is not None:
            ckpt = {k: v for k, v in ckpt.items() if k in chosen}
        if rt.is_main:
            log.info("Loaded %s (states: %s)", ckpt_path, ", ".join(sorted(k for k in ckpt if k != "__metadata__")))

    wrapped = wrap_model(llava, rt, rc)
    results = {}
    if args.mode in ("train", "train_and_eval"):
        if train_cfg is None:
            raise SystemExit(f"--mode {args.mode} needs a train_input section in {args.params}")
        results = train_loop(args, rt, rc, sections, llava, wrapped, ckpt, ckpt_path, model_dir)
    if args.mode == "eval":
        if eval_cfg is None:
            raise SystemExit(f"--mode eval needs an eval_input section in {args.params}")
        results = evaluate(rt, rc, eval_cfg, model_cfg, llava, wrapped, checkpoint_step, model_dir)
    if args.mode == "predict":
        results = predict(args, rt, sections, llava.to(rt.device), checkpoint_step, model_dir)
    if args.mode == "chat":
        results = chat(args, rt, sections, llava.to(rt.device))
    rt.barrier()
    return results


def choose_checkpoint(args, rc: RunConfig, model_dir: Path, rt) -> tuple:
    """(checkpoint to load or None, whether it is a resume of this model_dir's own run).

    Re-running the same command after a crash continues from model_dir's newest checkpoint even when the command
    names a starting --checkpoint_path (e.g. phase 1's), so progress is never thrown away."""
    own = list_checkpoints(model_dir) if rc.autoload_last_checkpoint else []
    given = Path(args.checkpoint_path) if args.checkpoint_path else None
    if given is not None and given.resolve().parent == model_dir.resolve():
        return given, True
    if own and args.mode != "eval":
        if given is not None and rt.is_main:
            log.warning("%s already holds %s: resuming from it instead of --checkpoint_path %s (use a new "
                        "--model_dir to start over)", model_dir, own[-1].name, given)
        return own[-1], True
    if given is not None:
        return given, False
    return (own[-1], True) if own else (None, False)


def save_resolved_config(model_dir: Path, params: dict, mode: str):
    import yaml

    tmp = model_dir / f".params_{mode}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(params, sort_keys=False))
    os.replace(tmp, model_dir / f"params_{mode}.yaml")


def train_loop(args, rt: Runtime, rc: RunConfig, sections: dict, llava, wrapped, ckpt: dict, ckpt_path, model_dir):
    import torch
    from tqdm import tqdm

    cfg: InputConfig = sections["train_input"]
    opt_cfg: OptimizerConfig = sections["optimizer"]
    model_cfg = sections["model"]

    # ---- batch geometry: global batch = world_size x micro batch x accumulation steps
    micro = cfg.micro_batch_size or cfg.batch_size // rt.world_size
    if micro < 1 or cfg.batch_size % (micro * rt.world_size):
        raise SystemExit(f"train_input.batch_size {cfg.batch_size} must be a multiple of world_size "
                         f"{rt.world_size} x micro_batch_size {micro}; change train_input.micro_batch_size")
    accum = cfg.batch_size // (micro * rt.world_size)

    image_dtype = half_dtype(cfg.fp16_type) if rt.autocast_dtype is not None else torch.float32
    dataset = make_dataset(cfg, model_cfg, image_dtype)
    check_data_against_model(dataset, model_cfg, cfg.data_dir)
    if len(dataset) < cfg.batch_size:
        raise SystemExit(f"train_input: {len(dataset)} samples in {cfg.data_dir} < batch_size {cfg.batch_size}")

    import model as M

    optimizer = make_optimizer(opt_cfg, M.optimizer_param_groups(getattr(wrapped, "module", wrapped),
                                                                 opt_cfg.weight_decay))
    scheduler = LRScheduler(optimizer, opt_cfg.learning_rate)
    global_step, samples_streamed = 0, 0
    if "optimizer" in ckpt:
        set_optimizer_state(wrapped, optimizer, ckpt["optimizer"], rc, rt, int(ckpt.get("global_step", 0)),
                            ckpt_path)
    if "lr_scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    if "global_step" in ckpt:
        global_step = int(ckpt["global_step"])
    samples_streamed = dataloader_position(ckpt, cfg, ckpt_path, samples_streamed)

    prepare_pack_index(dataset, cfg, rt, not args.no_progress)
    dataset, sampler = make_sampler(dataset, cfg, model_cfg, rt.rank, rt.world_size, samples_streamed, None)
    loader = make_loader(dataset, micro, sampler, cfg, drop_last=True)
    batches = iter(loader)
    min_len = min_trim_length(dataset, llava)

    logger = Logger(model_dir, "train", rt.is_main)
    if rt.is_main:
        log.info("Training steps %d -> %d: global batch %d = %d process(es) x %d x %d accumulation; %s precision",
                 global_step, rc.max_steps, cfg.batch_size, rt.world_size, micro, accum, rt.precision)
    wrapped.train()
    last_ckpt = ckpt_path
    results = {}
    bar = tqdm(total=rc.max_steps, initial=global_step, disable=not rt.is_main or args.no_progress,
               desc="train", unit="step", dynamic_ncols=True)
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    while global_step < rc.max_steps:
        micro_batches = [next(batches) for _ in range(accum)]
        loss_value, grad_norm, real_tokens, samples = train_step(rt, wrapped, optimizer, micro_batches, model_cfg,
                                                                 opt_cfg.max_gradient_norm,
                                                                 min_len if rc.trim_batches else None)
        if rc.check_loss_values and not math.isfinite(loss_value):
            raise NonFiniteLoss(f"Loss is {loss_value} at step {global_step + 1}; the last good checkpoint is "
                                f"{last_ckpt or 'none (no checkpoint written yet)'}. Lower the learning rate or "
                                "check the data around this step.")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        global_step += 1
        samples_streamed += cfg.batch_size  # rows of the stream (samples, or packed rows)
        window_samples += samples
        window_tokens += real_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")

        if global_step % rc.log_steps == 0 or global_step == rc.max_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "samples_per_sec": window_samples / elapsed, "tokens_per_sec": window_tokens / elapsed}
            logger.log(global_step, values,
                       f"| Train Step={global_step}, Loss={loss_value:.5f}, LR={lr:.3e}, GradNorm={grad_norm:.3f}, "
                       f"Rate={values['samples_per_sec']:.2f} samples/s, {values['tokens_per_sec']:.0f} tokens/s")
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0

        if (rc.checkpoint_steps and global_step % rc.checkpoint_steps == 0) or global_step == rc.max_steps:
            last_ckpt = write_checkpoint(model_dir, wrapped, optimizer, scheduler, global_step,
                                         dataloader_state(samples_streamed, cfg.shuffle_seed, cfg), args.params_dict,
                                         rc, rt)
        if (args.mode == "train_and_eval" and rc.eval_frequency and global_step % rc.eval_frequency == 0
                and global_step != rc.max_steps):
            results = evaluate(rt, rc, sections["eval_input"], model_cfg, llava, wrapped, global_step, model_dir)
            wrapped.train()
    bar.close()
    logger.close()
    if args.mode == "train_and_eval":
        results = evaluate(rt, rc, sections["eval_input"], model_cfg, llava, wrapped, global_step, model_dir)
    if rt.is_main:
        log.info("Training done at step %d; checkpoint %s", global_step, last_ckpt)
    return results


def train_step(rt: Runtime, wrapped, optimizer, micro_batches: list, model_cfg,
               max_gradient_norm: Optional[float], trim_to: Optional[int]) -> tuple:
    """One optimizer step over this rank's micro-batches: (global loss, grad norm, real tokens, samples).

    The loss is normalised over the whole global batch (loss tokens, or samples: packed rows count the samples
    they hold, summed over micro-batches and ranks), so DDP, gradient accumulation and packing give exactly the
    gradient of one big batch of the same samples. A non-finite loss skips the update."""
    import model as M

    local_tokens = float(sum(int(b["loss_mask"].sum()) for b in micro_batches))
    local_real = float(sum(int((b["key_padding_mask"] == 0).sum()) for b in micro_batches))
    local_samples = float(sum(int(M.LlavaModel.num_samples(b)) for b in micro_batches))
    total_tokens, real_tokens, samples = rt.all_reduce([local_tokens, local_real, local_samples])
    normalizer = (max(total_tokens, 1.0) if model_cfg.loss_scaling == "num_tokens"
                  else max(samples, 1.0) / model_cfg.loss_weight)
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        if trim_to is not None:
            batch = trim_batch(batch, trim_to)
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        ctx = wrapped.no_sync() if not last and hasattr(wrapped, "no_sync") else _null()  # DDP: sync once
        with ctx, rt.autocast():
            # DDP/FSDP average gradients over ranks, so scale by world_size to get the global sum / normalizer
            loss = wrapped(batch, loss_normalizer=normalizer / rt.world_size)
        (rt.scaler.scale(loss) if rt.scaler else loss).backward()
        loss_sum += float(loss.detach()) / rt.world_size
    loss_value = rt.all_reduce([loss_sum])[0]
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return loss_value, float("nan"), real_tokens, samples
    if rt.scaler:
        rt.scaler.unscale_(optimizer)
    grad_norm = grad_norm_and_clip(wrapped, max_gradient_norm)
    if rt.scaler:
        rt.scaler.step(optimizer)
        rt.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm, real_tokens, samples


def _null():
    import contextlib

    return contextlib.nullcontext()


def write_checkpoint(model_dir, wrapped, optimizer, scheduler, step, dataloader: dict, params, rc, rt):
    model_state, opt_state = full_state(wrapped, optimizer, rc, rt)
    opt_state = with_cstorch_beta_powers(opt_state)
    path = model_dir / f"checkpoint_{step}.mdl"
    if rt.is_main:
        state = {
            "model": model_state, "optimizer": opt_state, "lr_scheduler": scheduler.state_dict(),
            "global_step": step, "dataloader": dataloader,
            "__metadata__": checkpoint_metadata(params, "run.py", CS_CHECKPOINT_VERSION),
        }
        save_checkpoint(path, state)
        # keep the newest N of this run's checkpoints
        keep = max(1, rc.max_checkpoints)
        for old in list_checkpoints(model_dir)[:-keep]:
            old.unlink(missing_ok=True)
        log.info("Saved checkpoint %s", path)
    rt.barrier()
    return path


def answer_starts(batch: dict, mask):
    """The first loss position of every answer span (mask goes 0 -> 1 along the sample). Packed rows carry it
    as `answer_start`, computed in each sample's own order (its tokens are not contiguous in the row)."""
    import torch

    if "answer_start" in batch:
        return batch["answer_start"].bool()
    return mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)


def evaluate(rt: Runtime, rc: RunConfig, cfg: Optional[InputConfig], model_cfg, llava, wrapped, step, model_dir):
    """Loss, perplexity and answer-token accuracy over eval_input; also the accuracy of each answer's first token
    (the first loss position of every answer span) against the majority-answer baseline."""
    import torch

    if cfg is None:
        raise SystemExit("evaluation needs an eval_input section")
    image_dtype = half_dtype(cfg.fp16_type) if rt.autocast_dtype is not None else torch.float32
    dataset = make_dataset(cfg, model_cfg, image_dtype)
    check_data_against_model(dataset, model_cfg, cfg.data_dir)
    prepare_pack_index(dataset, cfg, rt, False)
    dataset, sampler = make_sampler(dataset, cfg, model_cfg, rt.rank, rt.world_size, 0, 1)
    batch_size = max(1, (cfg.micro_batch_size or cfg.batch_size // rt.world_size))
    loader = make_loader(dataset, batch_size, sampler, cfg, drop_last=False)
    min_len = min_trim_length(dataset, llava)
    was_training = wrapped.training
    wrapped.eval()
    sums = {"loss": 0.0, "tokens": 0.0, "correct": 0.0, "first_correct": 0.0, "first_total": 0.0}
    first_answers: dict = {}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if rc.eval_steps and i >= rc.eval_steps:
                break
            if rc.trim_batches:
                batch = trim_batch(batch, min_len)
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with rt.autocast():
                _, logits = wrapped(batch, output_logits=True)
            labels, mask = batch["labels"].long(), batch["loss_mask"].bool()
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            sums["loss"] += float(ce[mask.flatten()].sum())
            sums["tokens"] += float(mask.sum())
            pred = logits.argmax(-1)
            sums["correct"] += float(((pred == labels) & mask).sum())
            first = answer_starts(batch, mask)
            sums["first_correct"] += float(((pred == labels) & first).sum())
            sums["first_total"] += float(first.sum())
            for tok in labels[first].tolist():
                first_answers[tok] = first_answers.get(tok, 0) + 1
    keys = list(sums)
    reduced = dict(zip(keys, rt.all_reduce([sums[k] for k in keys])))
    # majority baseline: how often the most common first answer token occurs (local counts, summed)
    majority = rt.all_reduce([float(max(first_answers.values()) if first_answers else 0.0)])[0]
    tokens = max(reduced["tokens"], 1.0)
    loss = reduced["loss"] / tokens
    metrics = {
        "step": step, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": reduced["correct"] / tokens,
        "first_answer_token_accuracy": reduced["first_correct"] / max(reduced["first_total"], 1.0),
        "majority_first_answer_baseline": majority / max(reduced["first_total"], 1.0),
        "eval_tokens": int(reduced["tokens"]), "eval_answers": int(reduced["first_total"]),
    }
    if rt.is_main:
        report_eval(model_dir, step, metrics)
    if was_training:
        wrapped.train()
    return metrics


def report_eval(model_dir: Path, step: int, metrics: dict, detail: str = "") -> None:
    """Eval metrics to the console, TensorBoard (model_dir/eval) and model_dir/eval_<step>.json (atomically)."""
    logger = Logger(model_dir, "eval", True)
    logger.log(step, {k: v for k, v in metrics.items() if k != "step"},
               f"| Eval Step={step}, Loss={metrics['loss']:.5f}, Perplexity={metrics['perplexity']:.3f}, "
               f"Accuracy={metrics['accuracy']:.4f}, FirstAnswerTokenAccuracy="
               f"{metrics['first_answer_token_accuracy']:.4f} (majority baseline "
               f"{metrics['majority_first_answer_baseline']:.4f}){detail}")
    logger.close()
    write_text_atomically(model_dir / f"eval_{step}.json", json.dumps(metrics, indent=2))


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a hidden temporary file renamed over it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def json_lines(records: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------
# Answers: --mode predict (benchmark questions in the LLaVA repo's format -> its answer format)

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation: lower case, punctuation dropped (a decimal point kept), articles
    dropped, number words as digits."""
    text = text.lower().replace("\n", " ").strip()
    text = re.sub(r"(?<!\d)\.(?!\d)|[^\w\s.]", " ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def answer_scores(prediction: str, references: list[str]) -> tuple[float, float]:
    """(exact match, VQA accuracy) after normalize_answer. VQA accuracy = min(1, matching references / 3) as for
    VQAv2's 10 human answers; with fewer than 3 references the divisor is their number (one reference: exact)."""
    pred = normalize_answer(prediction)
    matches = sum(pred == normalize_answer(r) for r in references)
    return float(matches > 0), min(1.0, matches / min(3, max(len(references), 1)))


def read_questions(path: Path) -> tuple[list[dict], int]:
    """Questions (json lines with question_id, text, optional image / category / answer(s)); bad lines counted."""
    questions, bad = [], 0
    if not path.is_file():
        raise SystemExit(f"--questions {path}: no such file")
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                q = None
            if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("text"), str):
                log.warning("%s:%d: not a question (json with question_id and text): skipped", path, line_no)
                bad += 1
                continue
            questions.append(q)
    return questions, bad


def read_answers(path: Path) -> list[dict]:
    """Answer records of a partial file; a line cut short by a killed run is dropped (its question is redone)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else ():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "question_id" in rec:
            records.append(rec)
    return records


def references_of(q: dict) -> Optional[list[str]]:
    refs = q.get("answers", q.get("answer"))
    if refs is None:
        return None
    refs = refs if isinstance(refs, list) else [refs]
    return [r["answer"] if isinstance(r, dict) else str(r) for r in refs]


def answer_input(sections: dict) -> Optional[InputConfig]:
    """The input section predict and chat take images (transforms, img_data_dir) and data_params.json from:
    eval_input, else train_input."""
    return sections.get("eval_input") or sections.get("train_input")


def check_generation_args(args) -> None:
    """Flag values generation cannot use, as messages naming the flag."""
    for flag, value, ok, need in (("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                  ("--predict_batch_size", args.predict_batch_size, args.predict_batch_size >= 1,
                                   ">= 1"),
                                  ("--top_k", args.top_k, args.top_k >= 0, ">= 0 (0 = all tokens)"),
                                  ("--top_p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)")):
        if not ok:
            raise SystemExit(f"{flag} {value}: must be {need}")


def prompt_layout(args, sections: dict):
    """The phase-2 data's TokenLayout (tokenizer, prompt style, image slots) from its data_params.json."""
    import create_hdf5_dataset as hd

    cfg = answer_input(sections)
    where = Path(args.data_params) if args.data_params else None
    if where is None and cfg is not None:
        where = Path(cfg.data_dir if isinstance(cfg.data_dir, str) else cfg.data_dir[0]) / "data_params.json"
    if where is None or not where.is_file():
        raise SystemExit(f"--mode predict builds prompts as the phase-2 data did and reads its data_params.json "
                         f"({where} not found): pass --data_params PATH")
    try:
        params = json.loads(where.read_text())
        pre = hd.parse_config({k: params[k] for k in ("setup", "processing", "dataset") if k in params}, str(where))
        tok = hd.load_tokenizer(pre.processing.huggingface_tokenizer, f"{where}: processing.huggingface_tokenizer")
        return hd.TokenLayout(tok, pre, 2), tok
    except (json.JSONDecodeError, hd.ConfigError) as e:
        raise SystemExit(f"--mode {args.mode}: cannot build prompts from {where}: {e}") from None


def load_question_image(q: dict, image_root: Optional[str], transform):
    """The question's image as a CHW tensor, or None for a text-only question; raises ValueError with why."""
    import create_hdf5_dataset as hd
    import torch
    from PIL import Image

    rel = q.get("image")
    if rel is None:
        return None
    if not isinstance(rel, str) or image_root is None or not hd.safe_relative_path(rel):
        raise ValueError(f"image {rel!r} is not a relative path under img_data_dir")
    path = os.path.join(image_root, rel)
    try:
        with Image.open(path) as im:
            return torch.from_numpy(transform(im.convert("RGB")))
    except OSError as e:
        raise ValueError(f"image {path}: {e}") from None


def predict(args, rt: Runtime, sections: dict, llava, step: int, model_dir: Path) -> dict:
    """Answer every question once (resumable, split across ranks), write the answers in question order, and score
    them when the questions carry reference answers."""
    import create_hdf5_dataset as hd
    from tqdm import tqdm

    if not args.questions or not args.answers:
        raise SystemExit("--mode predict needs --questions FILE and --answers OUT")
    layout, tok = prompt_layout(args, sections)
    cfg = answer_input(sections)
    transform = hd.build_transforms(cfg.transforms if cfg else None)
    questions, bad_lines = read_questions(Path(args.questions))
    out = Path(args.answers)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-rank{rt.rank}")
    kept = read_answers(partial)
    if partial.is_file():  # rewrite without a line a killed run cut short, so appended answers stay whole lines
        write_text_atomically(partial, json_lines(kept))
    answered = {rec["question_id"] for rec in kept}
    mine = [q for i, q in enumerate(questions) if i % rt.world_size == rt.rank and q["question_id"] not in answered]
    counts = {"bad_lines": bad_lines, "bad_image": 0, "too_long": 0}
    limit = llava.config.text_model.max_position_embeddings
    llava.eval()
    with open(partial, "a", encoding="utf-8") as f:
        for start in tqdm(range(0, len(mine), args.predict_batch_size), desc="predict", unit="batch",
                          disable=args.no_progress or not rt.is_main):
            batch = []
            for q in mine[start:start + args.predict_batch_size]:
                try:
                    image = load_question_image(q, cfg.img_data_dir if cfg else None, transform)
                except ValueError as e:
                    log.warning("question %s: %s: skipped", q["question_id"], e)
                    counts["bad_image"] += 1
                    continue
                ids = layout.prompt_ids(q["text"])
                if len(ids) + args.max_new_tokens > limit:
                    counts["too_long"] += 1
                    continue
                batch.append((q, ids, image))
            for q, text in zip([b[0] for b in batch], answer_batch(rt, llava, layout, tok, batch, args)):
                record = {"question_id": q["question_id"], "prompt": q["text"], "text": text,
                          "answer_id": f"{q['question_id']}-{step}", "model_id": str(model_dir.name),
                          "metadata": {"step": step}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    counts = dict(zip(counts, (int(v) for v in rt.all_reduce([float(v) for v in counts.values()]))))
    rt.barrier()
    if not rt.is_main:
        return {}
    return finish_predictions(questions, out, rt.world_size, counts, model_dir, step)


def answer_batch(rt: Runtime, llava, layout, tok, batch: list, args) -> list[str]:
    """Generated answer texts of (question, prompt ids, image or None) triples, left-padded into one batch.
    A text-only row's image slots are masked as in its training rows (and still count as positions)."""
    import torch

    import modeling_llava as ml

    if not batch:
        return []
    width = max(len(ids) for _, ids, _ in batch)
    ids = torch.full((len(batch), width), layout.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    images = [img for _, _, img in batch]
    some_image = next((img for img in images if img is not None), None)
    slots_end = layout.image_start_idx + layout.np_slots
    for row, (_, p, image) in enumerate(batch):
        pad = width - len(p)
        ids[row, pad:] = torch.tensor(p)
        mask[row, pad:] = 1
        if image is None:
            mask[row, pad + layout.text_only_mask_start:pad + slots_end] = 0
    pixels = None
    if some_image is not None:  # a text-only row gets zeros, whose features land on its masked slots
        pixels = torch.stack([img if img is not None else torch.zeros_like(some_image) for img in images])
        pixels = pixels.to(rt.device)
    starts = torch.tensor([width - len(p) + layout.image_start_idx for _, p, _ in batch], device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(args.seed) if args.temperature > 0 else None

    def decode(tokens: list) -> str:
        return tok.decode(tokens, skip_special_tokens=True)

    with torch.no_grad(), rt.autocast():
        tokens = llava.model.generate(ids.to(rt.device), mask.to(rt.device), pixels, starts,
                                      max_new_tokens=args.max_new_tokens, eos_token_ids=[layout.eos_id],
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      generator=generator, stop_strings=args.stop, decode=decode)
    return [ml.cut_at_stop_string(decode(t), args.stop).strip() for t in tokens]


def chat(args, rt: Runtime, sections: dict, llava) -> dict:
    """A console conversation about one image (--prompt: one answer, printed alone, then exit)."""
    import create_hdf5_dataset as hd
    import torch
    from PIL import Image

    if not args.image:
        raise SystemExit("--mode chat needs --image IMG (and --prompt TEXT to answer once)")
    layout, tok = prompt_layout(args, sections)
    cfg = answer_input(sections)
    try:
        with Image.open(args.image) as im:
            image = torch.from_numpy(hd.build_transforms(cfg.transforms if cfg else None)(im.convert("RGB")))
    except OSError as e:
        raise SystemExit(f"--image {args.image}: cannot read it as an image ({e})") from None
    limit = llava.config.text_model.max_position_embeddings
    history: list = []
    llava.eval()

    def reply(question: str) -> Optional[str]:
        ids = layout.prompt_ids(question, history)
        if len(ids) + args.max_new_tokens > limit:
            print(f"The conversation ({len(ids)} tokens + {args.max_new_tokens} new) no longer fits the model's "
                  f"{limit} positions: start a new chat or lower --max_new_tokens.", file=sys.stderr)
            return None
        text = answer_batch(rt, llava, layout, tok, [(None, ids, image)], args)[0]
        history.append((question, text))
        return text

    if args.prompt:
        answer = reply(args.prompt)
        if answer is None:
            raise SystemExit(1)
        print(answer)
        return {"answer": answer}
    print(f"Chat about {args.image} (empty line or Ctrl-D to end)")
    while True:
        try:
            question = input("USER: ")
        except EOFError:
            break
        if not question.strip():
            break
        answer = reply(question)
        if answer is None:
            break
        print(f"ASSISTANT: {answer}", flush=True)
    return {"turns": len(history)}


def finish_predictions(questions: list, out: Path, world: int, counts: dict, model_dir: Path, step: int) -> dict:
    """Merge the ranks' partial files in question order into `out` (atomically), score, remove the partials."""
    partials = [out.with_name(f".{out.name}.partial-rank{r}") for r in range(world)]
    by_id = {rec["question_id"]: rec for p in partials for rec in read_answers(p)}
    ordered = [by_id[q["question_id"]] for q in questions if q["question_id"] in by_id]
    write_text_atomically(out, json_lines(ordered))
    for p in partials:
        p.unlink(missing_ok=True)
    metrics = {"step": step, "questions": len(questions), "answered": len(ordered), "skipped": counts}
    scored = [(q, by_id[q["question_id"]]["text"]) for q in questions
              if q["question_id"] in by_id and references_of(q) is not None]
    if scored:
        per_category: dict = {}
        for q, text in scored:
            em, vqa = answer_scores(text, references_of(q))
            for key in {"all", str(q.get("category", "all"))}:
                c = per_category.setdefault(key, [0, 0.0, 0.0])
                c[0] += 1
                c[1] += em
                c[2] += vqa
        metrics["accuracy"] = {k: {"questions": n, "exact_match": em / n, "vqa_accuracy": vqa / n}
                               for k, (n, em, vqa) in sorted(per_category.items())}
    print(f"predict: {len(ordered)} answers written to {out} ({len(questions)} questions; skipped: "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())})")
    for k, m in metrics.get("accuracy", {}).items():
        print(f"  {k}: exact match {m['exact_match']:.1%}, VQA accuracy {m['vqa_accuracy']:.1%} over "
              f"{m['questions']} questions")
    write_text_atomically(model_dir / f"predict_{step}.json", json.dumps(metrics, indent=2))
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True, metavar="{CSX,GPU,CPU}")
    for target in ("CSX", "GPU", "CPU"):
        p = sub.add_parser(target, help=f"run on {target}")
        p.add_argument("-p", "--params", required=True, help="yaml config (train_input, eval_input, model, ...)")
        p.add_argument("-m", "--mode", required=True, choices=["train", "eval", "train_and_eval", "predict", "chat"])
        p.add_argument("-o", "--model_dir", default="model_dir", help="checkpoints, logs, resolved config")
        p.add_argument("--checkpoint_path", help="checkpoint to start from (default: newest in model_dir)")
        p.add_argument("--load_checkpoint_states", help='"model" for weights only, or a comma list of states')
        p.add_argument("--max_steps", type=int, help="overrides runconfig.max_steps")
        p.add_argument("--eval_steps", type=int, help="overrides runconfig.eval_steps")
        p.add_argument("--disable_strict_checkpoint_loading", action="store_true")
        p.add_argument("--logging", default="INFO", help="log level")
        p.add_argument("--no_progress", action="store_true", help="no progress bar")
        if target != "CSX":
            g = p.add_argument_group("--mode predict / chat")
            g.add_argument("--image", help="chat: the image to talk about")
            g.add_argument("--prompt", help="chat: answer this one question and exit")
            g.add_argument("--questions", help="questions, json lines (question_id, image, text[, category, answer])")
            g.add_argument("--answers", help="answers file to write (the LLaVA repo's answer format)")
            g.add_argument("--data_params", help="the phase-2 data's data_params.json (default: eval_input's)")
            g.add_argument("--max_new_tokens", type=int, default=128)
            g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            g.add_argument("--top_p", type=float, default=1.0)
            g.add_argument("--top_k", type=int, default=0)
            g.add_argument("--seed", type=int, default=0, help="sampling seed")
            g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                           help="end an answer at this text, which is left out (repeatable); answers always end "
                                "at the data's EOS / end-of-turn token")
            g.add_argument("--predict_batch_size", type=int, default=8)
        if target == "CSX":
            p.add_argument("--num_csx", type=int, default=1)
            p.add_argument("--mgmt_address", help="cluster management address HOST:PORT")
            p.add_argument("--mount_dirs", nargs="*", default=[], help="paths the appliance must mount")
            p.add_argument("--python_paths", nargs="*", default=[], help="paths added to the workers' PYTHONPATH")
            p.add_argument("--job_labels", nargs="*", default=[], help="KEY=VALUE labels for the job")
            p.add_argument("--compile_dir", default=None, help="compile artifact directory on the cluster")
            group = p.add_mutually_exclusive_group()
            group.add_argument("--compile_only", action="store_true", help="compile, do not run")
            group.add_argument("--validate_only", action="store_true", help="validate the graph, do not compile")
            p.add_argument("--cstorch_backend", choices=["CSX", "CPU"], default="CSX",
                           help="run the CSX code path on cerebras.pytorch's CPU backend (testing without a system)")
        p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="yaml overrides")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.logging).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    params = load_params(args.params, args.overrides)
    rc_section = params.setdefault("runconfig", {})
    for key in ("max_steps", "eval_steps"):
        if getattr(args, key) is not None:
            rc_section[key] = getattr(args, key)
    if args.disable_strict_checkpoint_loading:
        rc_section["disable_strict_checkpoint_loading"] = True
    args.params_dict = params
    try:
        sections = parse_sections(params)
    except ValueError as e:
        raise SystemExit(f"Config error in {args.params}: {e}") from None
    if args.target == "CSX" and args.mode in ("predict", "chat"):
        raise SystemExit(f"--mode {args.mode} runs on GPU or CPU (python run.py GPU|CPU --mode {args.mode} ...); "
                         f"checkpoints written on CSX load there too")
    if args.mode in ("predict", "chat"):
        check_generation_args(args)  # before the model is built
    if args.target == "CSX":
        try:
            import cerebras.pytorch  # noqa: F401
        except ImportError:
            raise SystemExit("CSX needs cerebras.pytorch: create the Cerebras environment with "
                             "`pip install -r requirements-csx.txt` (or run on GPU/CPU)") from None
        import run_csx

        with input_errors_as_messages():
            return run_csx.run(args, params, sections)
    with input_errors_as_messages():
        try:
            return run_torch(args, params, sections)
        except NonFiniteLoss as e:
            raise SystemExit(str(e)) from None


@contextlib.contextmanager
def input_errors_as_messages():
    """A bad image or H5 file met while training ends the run with its message only (exit 1), also when a
    DataLoader worker met it. Checkpoints are only written between steps, so the last one stays as it was."""
    import create_hdf5_dataset as hd

    try:
        yield
    except (hd.ImageReadError, hd.DatasetError) as e:
        raise SystemExit(f"error: {input_error_message(e)}") from None


def input_error_message(err: Exception) -> str:
    """The error's own message; a DataLoader worker's re-raised error carries the worker's whole traceback in
    its text ("Caught X in DataLoader worker process N. Original Traceback ..."): keep its last line only."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]


if __name__ == "__main__":
    main()
