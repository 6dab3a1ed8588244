"""The CSX code path of run.py: train and evaluate LLaVA with cerebras.pytorch 2.10 (cstorch).

Not a script of its own: run.py calls `run(args, params, sections)` for the CSX target.

    python run.py CSX --mode train --params configs/params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml \
        --model_dir model_dir/p1 --checkpoint_path converted/pytorch_model_to_cs-2.2.mdl \
        --mgmt_address HOST:PORT --num_csx 1 --mount_dirs /data $PWD --python_paths $PWD
    python run.py CSX --mode train --params ... --model_dir ... --compile_only      # compile, run nothing
    python run.py CSX --cstorch_backend CPU --mode train_and_eval --params configs/params_llava_tiny_phase1.yaml \
        --model_dir model_dir/csx_cpu                                                # same code, no system

`--cstorch_backend CPU` runs this same code on cstorch's CPU backend (eager, no appliance): the tests use it.

Differences from the GPU/CPU path (run.run_torch), all because a CSX graph is compiled once and must be static:
- full-length batches (no trimming to the longest sequence) and full logits (LlavaModel sparse_logits=False);
- the global batch `train_input.batch_size` is one step; the compiler splits it into `micro_batch_size` pieces
  (set through cstorch.backends.csx.performance.micro_batch_size), no gradient accumulation in Python;
- evaluation runs whole batches of `eval_input.batch_size` (a last partial batch is skipped);
- the lr logged for a step is the yaml schedule's value at that step (the closed form cstorch computes).
The sample order, optimizer formula, lr schedule, loss, checkpoint names and contents, and eval metrics are the
GPU/CPU path's, so checkpoints move between the two (weights, optimizer, lr schedule, position).

Checkpoints: model_dir/checkpoint_<step>.mdl written with cstorch.save (HDF5): model (LlavaModel.state_dict(),
`model.` prefix), optimizer (cstorch AdamW state plus a `step` per parameter for the GPU/CPU path),
lr_scheduler (cstorch state plus `last_step`), global_step, dataloader {samples_streamed, seed}, grad_scaler
(CSX with loss scaling), __metadata__ [{version (cstorch.__version__), model_name, params, llava_pipeline}]
in Cerebras ModelZoo's shape; the optimizer has ModelZoo's two parameter groups (model.optimizer_param_groups).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Optional

import run as run_py  # run.py's config classes and helpers (this module's entry point is named run)

log = logging.getLogger("run")

HALF_DTYPES = ("bfloat16", "cbfloat16", "float16")

# yaml scheduler name (lower case, "LR" suffix removed) -> cstorch class and its arguments from a yaml entry
SCHEDULERS = {
    "linear": ("LinearLR", lambda e: dict(initial_learning_rate=e["init"], end_learning_rate=e["end"],
                                          total_iters=e["total"])),
    "cosinedecay": ("CosineDecayLR", lambda e: dict(initial_learning_rate=e["init"], end_learning_rate=e["end"],
                                                    total_iters=e["total"])),
    "constant": ("ConstantLR", lambda e: dict(learning_rate=e["init"], total_iters=e["total"])),
    "exponential": ("ExponentialLR", lambda e: dict(initial_learning_rate=e["init"], total_iters=e["total"],
                                                    decay_rate=e["spec"]["decay_rate"])),
}


def run(args, params: dict, sections: dict) -> dict:
    """CSX (or cstorch CPU backend): train and/or evaluate; returns the last eval metrics (if any)."""
    import cerebras.pytorch as cstorch
    import torch

    import model as M

    sections = importable_sections(sections)
    rc: run_py.RunConfig = sections["runconfig"]
    model_cfg = sections["model"]
    train_cfg: Optional[run_py.InputConfig] = sections.get("train_input")
    eval_cfg: Optional[run_py.InputConfig] = sections.get("eval_input")
    if args.mode in ("train", "train_and_eval") and train_cfg is None:
        raise SystemExit(f"--mode {args.mode} needs a train_input section in {args.params}")
    if args.mode in ("eval", "train_and_eval") and eval_cfg is None:
        raise SystemExit(f"--mode {args.mode} needs an eval_input section in {args.params}")
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    run_py.save_resolved_config(model_dir, params, args.mode)

    backend = make_backend(args, model_dir)
    on_csx = backend.is_csx
    half = set_half_dtype(train_cfg if args.mode != "eval" else eval_cfg, on_csx)

    torch.manual_seed(rc.seed)
    with backend.device:  # CSX: parameters are created lazily on the appliance
        llava = M.LlavaModel(model_cfg, sparse_logits=False)
    c = llava.parameter_counts()
    log.info("Model: %s parameters, %s trainable, %s frozen; cstorch %s backend, %s", f"{c['total']:,}",
             f"{c['trainable']:,}", f"{c['frozen']:,}", backend.backend_type.name, f"half dtype {half}" if half
             else "float32")
    compiled = cstorch.compile(llava, backend)

    ckpt, ckpt_path = load_checkpoint(args, rc, llava, model_dir)
    amp = cstorch.amp.autocast if half else contextlib.nullcontext  # autocast is a no-op on CSX
    results = {}
    try:
        if args.mode in ("train", "train_and_eval"):
            results = train(args, rc, sections, llava, compiled, amp, ckpt, ckpt_path, model_dir, on_csx, half)
        else:
            step = int(ckpt.get("global_step", 0))
            results = evaluate(args, rc, eval_cfg, model_cfg, compiled, amp, step, model_dir)
    except run_py.NonFiniteLoss as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:
        if args.compile_only or args.validate_only:
            log.debug("CSX compile/validation error", exc_info=True)  # --logging DEBUG shows where
            message = str(e).split("Stack Trace:")[0].strip()  # the C++ frames after it say nothing useful
            raise SystemExit(f"CSX {'compile' if args.compile_only else 'validation'} failed: {message}\n"
                             f"Artifacts: {model_dir / 'cerebras_logs'}") from None
        raise
    return results


def importable_sections(sections: dict) -> dict:
    """`python run.py` makes run.py `__main__`, so its config objects would pickle as __main__.InputConfig,
    which the appliance's input workers cannot import: rebuild them from the importable module `run`."""
    import dataclasses

    out = dict(sections)
    for name, cls in run_py.SECTIONS.items():
        if out.get(name) is not None and type(out[name]) is not cls:
            out[name] = cls(**dataclasses.asdict(out[name]))
    return out


# ----------------------------------------------------------------------------------------------
# Backend and precision


def num_csx(args) -> int:
    return args.num_csx if args.cstorch_backend == "CSX" else 1


def make_backend(args, model_dir: Path):
    """cstorch.backend("CSX", cluster options) or, for testing without a system, cstorch.backend("CPU")."""
    import cerebras.pytorch as cstorch

    artifact_dir = str(model_dir / "cerebras_logs")
    if args.cstorch_backend == "CPU":
        if args.compile_only or args.validate_only:
            raise SystemExit("--compile_only / --validate_only need the CSX backend; drop --cstorch_backend CPU")
        return cstorch.backend("CPU", artifact_dir=artifact_dir)
    repo = str(Path(__file__).resolve().parent)
    python_paths = list(args.python_paths or [])
    if repo not in python_paths:  # the appliance workers import run_csx (input functions), run, model, ...
        python_paths.append(repo)
    try:
        cluster = cstorch.distributed.ClusterConfig(
            mgmt_address=args.mgmt_address, num_csx=args.num_csx, mount_dirs=list(args.mount_dirs or []),
            python_paths=python_paths, job_labels=list(args.job_labels or []))
    except ValueError as e:
        raise SystemExit(f"CSX cluster options (--mgmt_address/--num_csx/--mount_dirs/--python_paths/"
                         f"--job_labels): {e}") from None
    options = dict(artifact_dir=artifact_dir, compile_only=args.compile_only, validate_only=args.validate_only,
                   cluster_config=cluster)
    if args.compile_dir:
        options["compile_dir"] = args.compile_dir
    return cstorch.backend("CSX", **options)


def set_half_dtype(cfg: Optional[run_py.InputConfig], on_csx: bool) -> Optional[str]:
    """Mixed precision from the input section: cbfloat16/bfloat16/float16 on CSX, bfloat16 on the CPU backend."""
    import cerebras.pytorch as cstorch

    if cfg is None or not cfg.mixed_precision:
        return None
    name = cfg.fp16_type
    if name not in HALF_DTYPES:
        raise SystemExit(f"fp16_type: {name!r}; use one of {', '.join(HALF_DTYPES)}")
    if not on_csx and name != "bfloat16":
        log.info("fp16_type %s runs as bfloat16 on the cstorch CPU backend (CPU autocast is bfloat16 only)", name)
        name = "bfloat16"
    cstorch.amp.set_half_dtype(name)  # before the model is built
    return name


def make_grad_scaler(opt_cfg: run_py.OptimizerConfig, params: dict, half: Optional[str], on_csx: bool):
    """Loss scaling on CSX only (cstorch's GradScaler does not run on the CPU backend); cbfloat16 needs dynamic."""
    import cerebras.pytorch as cstorch

    factor = opt_cfg.loss_scaling_factor
    if not on_csx or half is None or (half == "bfloat16" and factor in (1, 1.0, None)):
        return None
    if half == "cbfloat16" and factor != "dynamic":
        if factor not in (1, 1.0, None):
            raise SystemExit(f"optimizer.loss_scaling_factor: {factor!r}; cbfloat16 needs 'dynamic' loss scaling")
        factor = "dynamic"
    raw = params.get("optimizer") or {}  # GradScaler settings that run.py's OptimizerConfig accepts as ignored
    options = {"init_scale": raw.get("initial_loss_scale"), "steps_per_increase": raw.get("steps_per_increase"),
               "min_loss_scale": raw.get("min_loss_scale"), "max_loss_scale": raw.get("max_loss_scale")}
    log.info("Loss scaling: %s", factor)
    return cstorch.amp.GradScaler(loss_scale=factor, **{k: v for k, v in options.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedules (cstorch classes from the yaml grammar)


def make_optimizer(opt_cfg: run_py.OptimizerConfig, params: list):
    import cerebras.pytorch as cstorch

    lr = run_py.lr_schedule(opt_cfg.learning_rate)(0)
    kind = opt_cfg.optimizer_type.lower()
    if kind == "adamw":
        return cstorch.optim.AdamW(params, lr=lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                                   weight_decay=opt_cfg.weight_decay, correct_bias=opt_cfg.correct_bias)
    if kind == "sgd":
        return cstorch.optim.SGD(params, lr=lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    raise SystemExit(f"optimizer.optimizer_type: {opt_cfg.optimizer_type!r}; use 'AdamW' or 'SGD'")


def make_scheduler(optimizer, learning_rate):
    """(scheduler, milestones): one cstorch scheduler per yaml entry, a list becomes SequentialLR whose
    milestones are the cumulative total_iters; a plain number is a ConstantLR."""
    import cerebras.pytorch as cstorch

    S = cstorch.optim.lr_scheduler
    if isinstance(learning_rate, (int, float)):
        return S.ConstantLR(optimizer, learning_rate=float(learning_rate), total_iters=None), []
    specs = learning_rate if isinstance(learning_rate, list) else [learning_rate]
    schedulers, milestones = [], run_py.schedule_milestones(specs)
    for i, spec in enumerate(specs):
        where = f"optimizer.learning_rate[{i}]"
        run_py._one_schedule(spec, where)  # validates the name with run.py's message
        name = str(spec.get("scheduler", "")).lower()
        name = name[:-2] if name.endswith("lr") else name
        entry = {"spec": spec, "init": spec.get("initial_learning_rate", spec.get("learning_rate")),
                 "end": spec.get("end_learning_rate", 0.0), "total": spec.get("total_iters", spec.get("decay_steps"))}
        cls_name, kwargs = SCHEDULERS[name]
        schedulers.append(getattr(S, cls_name)(optimizer, **kwargs(entry)))
    if len(schedulers) == 1:
        return schedulers[0], []
    return S.SequentialLR(optimizer, schedulers=schedulers, milestones=milestones), milestones


def scheduler_state_at(scheduler, step: int, milestones: list) -> dict:
    """Our scheduler's state after `step` optimizer steps: turns a GPU/CPU checkpoint's {"last_step": n} into
    cstorch's form (SequentialLR counts globally in the first schedule and from its milestone in the others)."""
    import torch

    state = scheduler.state_dict()
    state["last_epoch"] = torch.tensor(step)
    for sub, t in zip(state.get("_schedulers") or [], run_py.sub_schedule_steps(step, milestones)):
        sub["last_epoch"] = torch.tensor(t)
    return state


def load_optimizer_state(optimizer, state: dict, from_torch: bool, llava=None, ckpt_path=None) -> None:
    """Load a cstorch or a GPU/CPU (torch) optimizer state into our cstorch optimizer.

    cstorch's Adam keeps beta1_power = beta1^(t+1) after t steps (it starts at beta1); a torch state counts
    `step` = t instead. cstorch's own conversion gives beta1^t, one step behind, so convert here, from `step`
    whenever the state comes from the GPU/CPU path (beta powers it carries are stale: that path ignores them).
    In our CSX checkpoints `step` is only there for the GPU/CPU path and is dropped. Saved param-group values
    win over our optimizer's defaults (a torch group lacks cstorch keys such as amsgrad)."""
    import torch

    import model as M

    if llava is not None:  # renumber older single-group states onto ModelZoo's groups (or refuse clearly)
        state = run_py.align_param_groups(state, M.param_group_names(llava), run_py.legacy_trainable_names(llava),
                                          ckpt_path)
    groups = [{**{k: v for k, v in ours.items() if k != "params"}, **saved}
              for ours, saved in zip(optimizer.param_groups, state["param_groups"])]
    group_of = {i: g for g in groups for i in g["params"]}
    per_param = {}
    for key, s in state["state"].items():
        s = dict(s)
        step = s.pop("step", None)
        group = group_of.get(key, groups[0])
        if step is not None and (from_torch or "beta1_power" not in s) and "betas" in group:
            s.pop("beta1_power", None)
            s.pop("beta2_power", None)
            if group.get("correct_bias", True):
                b1, b2 = group["betas"]
                t = float(step) + 1
                s["beta1_power"] = torch.tensor(b1 ** t, dtype=torch.float32)
                s["beta2_power"] = torch.tensor(b2 ** t, dtype=torch.float32)
        per_param[key] = s
    optimizer.load_state_dict({**state, "state": per_param, "param_groups": groups})


def written_by_cstorch(ckpt: dict) -> bool:
    """cstorch's AdamW wrote the optimizer state (our CSX path or Cerebras ModelZoo), so its beta powers hold;
    __metadata__'s `llava_pipeline.writer` (or, in older checkpoints, the version prefix) says who wrote it."""
    return run_py.checkpoint_writer(ckpt) in ("run_csx.py", "modelzoo")


# ----------------------------------------------------------------------------------------------
# Data: the GPU/CPU path's sample order (ResumableSampler) in global batches, sharded across CSX workers


class GlobalBatches:
    """Consecutive `batch_size` indices of a (possibly endless) sampler; a last partial batch is dropped."""

    def __init__(self, sampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []


def _input_loader(cfg: run_py.InputConfig, model_cfg, start_sample: int, num_epochs: Optional[int]):
    """torch DataLoader of global batches. Runs on the appliance's input workers on CSX, where cstorch's
    ShardedSampler gives each worker its share of every global batch (and the whole batch on the user node)."""
    import cerebras.pytorch as cstorch
    import torch
    from cerebras.pytorch.utils.data.sampler import ShardedSampler


    # half dtype as set on the user node (cbfloat16 uses float16 as its proxy dtype)
    image_dtype = cstorch.amp.get_floating_point_dtype() if cfg.mixed_precision else torch.float32
    dataset = run_py.make_dataset(cfg, model_cfg, image_dtype)
    # packing: the same PackedRowSampler plan as the GPU/CPU path (one global stream, cut into global batches)
    dataset, order = run_py.make_sampler(dataset, cfg, model_cfg, 0, 1, start_sample, num_epochs)
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=ShardedSampler(GlobalBatches(order, cfg.batch_size)), num_workers=workers,
        prefetch_factor=(cfg.prefetch_factor or 2) if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0)


def train_input_fn(cfg: run_py.InputConfig, model_cfg, start_sample: int):
    """Endless training order from global sample `start_sample` (the resume position)."""
    return _input_loader(cfg, model_cfg, start_sample, num_epochs=None)


def eval_input_fn(cfg: run_py.InputConfig, model_cfg):
    """One pass over eval_input in whole batches."""
    return _input_loader(cfg, model_cfg, 0, num_epochs=1)


def host_dataset(cfg: run_py.InputConfig, model_cfg, where: str, progress: bool = False) -> int:
    """Open the data on this host to check it against the model; returns the items of one epoch (samples, or
    packed rows). Packing computes the cached length index here, which the input workers then read."""
    import torch

    import create_hdf5_dataset as hd

    dataset = run_py.make_dataset(cfg, model_cfg, torch.float32)
    run_py.check_data_against_model(dataset, model_cfg, cfg.data_dir)
    if cfg.packing:
        hd.pack_index(dataset.files, progress=progress)
    items = len(run_py.make_sampler(dataset, cfg, model_cfg, 0, 1, 0, 1)[1])
    if items < cfg.batch_size:
        what = "packed rows" if cfg.packing else "samples"
        raise SystemExit(f"{where}: {items} {what} in {cfg.data_dir} < batch_size {cfg.batch_size}")
    return items


def set_micro_batch_size(cfg: run_py.InputConfig, systems: int) -> None:
    """train/eval_input.micro_batch_size -> the CSX compiler's tiling of each system's share of the batch
    (None: cstorch's "auto"). Set before every executor: train and eval may differ."""
    import cerebras.pytorch as cstorch

    micro = cfg.micro_batch_size
    if micro is not None and (cfg.batch_size % systems or (cfg.batch_size // systems) % micro):
        raise SystemExit(f"batch_size {cfg.batch_size} over {systems} system(s) is not a multiple of "
                         f"micro_batch_size {micro}; change micro_batch_size")
    cstorch.backends.csx.performance.micro_batch_size = "auto" if micro is None else micro


# ----------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(args, rc: run_py.RunConfig, llava, model_dir: Path):
    """(states, path): weights loaded into llava; the other states chosen by load_checkpoint_states."""
    ckpt_path = Path(args.checkpoint_path) if args.checkpoint_path else None
    if ckpt_path is None and rc.autoload_last_checkpoint:
        existing = run_py.list_checkpoints(model_dir)
        ckpt_path = existing[-1] if existing else None
    if ckpt_path is None:
        return {}, None
    if not ckpt_path.is_file():
        raise SystemExit(f"--checkpoint_path {ckpt_path}: no such file")
    ckpt = run_py.modelzoo_scheduler_key(read_checkpoint(ckpt_path))
    if "model" not in ckpt:
        raise SystemExit(f"{ckpt_path} has no 'model' entry (keys: {sorted(ckpt)[:8]}); is it a LLaVA checkpoint?")
    run_py.load_model_weights(llava, ckpt["model"], not rc.disable_strict_checkpoint_loading, ckpt_path)
    chosen = run_py.states_to_load(args.load_checkpoint_states or rc.load_checkpoint_states)
    if chosen is not None:
        ckpt = {k: v for k, v in ckpt.items() if k in chosen or k == "__metadata__"}
    log.info("Loaded %s (states: %s)", ckpt_path, ", ".join(sorted(k for k in ckpt if k != "__metadata__")))
    return ckpt, ckpt_path


def read_checkpoint(path: Path) -> dict:
    """cstorch.save (HDF5) files through cstorch.load, whose tensors stay lazy until used; torch.save files
    (the GPU/CPU path, converted checkpoints) through run_py.load_checkpoint_file (weights_only)."""
    import cerebras.pytorch as cstorch
    import h5py

    if h5py.is_hdf5(path):
        return cstorch.load(str(path))
    return run_py.load_checkpoint_file(path)


def restore_training_state(ckpt: dict, ckpt_path, optimizer, scheduler, milestones, grad_scaler,
                           cfg: run_py.InputConfig, llava) -> tuple:
    """(global_step, samples_streamed) after loading optimizer / scheduler / scaler states that are present."""
    if "optimizer" in ckpt:
        load_optimizer_state(optimizer, ckpt["optimizer"], not written_by_cstorch(ckpt), llava, ckpt_path)
    global_step = int(ckpt.get("global_step", 0))
    if "lr_scheduler" in ckpt:
        state = ckpt["lr_scheduler"]
        if "last_epoch" not in state:  # a GPU/CPU checkpoint: {"last_step": n}
            state = scheduler_state_at(scheduler, int(state["last_step"]), milestones)
        scheduler.load_state_dict({k: v for k, v in state.items() if k != "last_step"})
    if grad_scaler is not None and ckpt.get("grad_scaler"):
        grad_scaler.load_state_dict(ckpt["grad_scaler"])
    return global_step, run_py.dataloader_position(ckpt, cfg, ckpt_path, global_step * cfg.batch_size)


def checkpoint_state(llava, optimizer, scheduler, grad_scaler, step: int, dataloader: dict, params: dict) -> dict:
    """What checkpoint_<step>.mdl holds (inside a checkpoint closure, where CSX tensors can be fetched)."""
    import cerebras.pytorch as cstorch
    import torch

    opt_state = optimizer.state_dict()
    # `step` per parameter lets the GPU/CPU path's AdamW continue from this checkpoint
    opt_state["state"] = {k: {**s, "step": torch.tensor(float(step))} for k, s in opt_state["state"].items()}
    state = {
        "model": llava.state_dict(),  # LlavaModel keys: `model.` + the Llava's CS names
        "optimizer": opt_state,
        "lr_scheduler": {**scheduler.state_dict(), "last_step": step},  # last_step: the GPU/CPU path's form
        "global_step": step,
        "dataloader": dataloader,
        "__metadata__": run_py.checkpoint_metadata(params, "run_csx.py", cstorch.__version__),
    }
    if grad_scaler is not None:
        state["grad_scaler"] = grad_scaler.state_dict()
    return state


def save_checkpoint(model_dir: Path, state: dict, step: int, keep: int) -> Path:
    """cstorch.save is atomic but never overwrites: write a side name, rename, then keep the newest `keep`."""
    import os

    import cerebras.pytorch as cstorch

    path = model_dir / f"checkpoint_{step}.mdl"
    side = model_dir / f".checkpoint_{step}.mdl.saving"
    if side.exists():
        side.unlink()  # left by a killed run
    cstorch.save(state, str(side))
    os.replace(side, path)
    for old in run_py.list_checkpoints(model_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)  # lazily loaded tensors keep their file open: safe on Linux
    log.info("Saved checkpoint %s", path)
    return path


def checkpoint_schedule(start: int, end: int, every: int, final: bool):
    """Executor-local (0-based) checkpoint steps for global steps start+1..end: the multiples of `every`, and
    `end` itself when it is the run's last step."""
    from cerebras.pytorch.utils.data.utils import Schedule

    n = end - start
    first = (every - start % every) - 1 if every else n  # local index of the first multiple of `every`
    if first < n:
        return Schedule([Schedule.Range(start=first, end=n, step=every, include_last=final)])
    if final:
        return Schedule([Schedule.Range(start=n - 1, end=n, step=1, include_last=True)])
    return Schedule([])


# ----------------------------------------------------------------------------------------------
# Training


def make_train_step(compiled, optimizer, scheduler, grad_scaler, params: list, max_norm: Optional[float], amp):
    """The traced step: forward, backward, clip, optimizer and lr step. Static: no values read on the host."""
    import cerebras.pytorch as cstorch
    import torch

    def grad_norm():
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    @cstorch.trace
    def train_step(batch):
        with amp():
            loss = compiled(batch)
        if grad_scaler is not None:  # cstorch.amp.optimizer_step, spelled out to keep the grad norm
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer)
            norm = grad_norm()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            norm = grad_norm()
            optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        real_tokens = (batch["key_padding_mask"] == 0).sum()
        samples = batch["num_samples"].sum() if "num_samples" in batch else torch.tensor(batch["loss_mask"].shape[0])
        # outputs in float32: a cbfloat16 tensor cannot be brought to the host
        return loss.float(), norm.float(), real_tokens, samples

    return train_step


def train(args, rc: run_py.RunConfig, sections: dict, llava, compiled, amp, ckpt: dict, ckpt_path, model_dir: Path,
          on_csx: bool, half: Optional[str]) -> dict:
    import cerebras.pytorch as cstorch
    from tqdm import tqdm

    import model as M

    cfg: run_py.InputConfig = sections["train_input"]
    opt_cfg: run_py.OptimizerConfig = sections["optimizer"]
    model_cfg = sections["model"]
    host_dataset(cfg, model_cfg, "train_input", progress=not args.no_progress)

    # ModelZoo's groups (weight decay, no decay); cstorch keeps state for every param given
    groups = M.optimizer_param_groups(llava, opt_cfg.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(opt_cfg, groups)
    scheduler, milestones = make_scheduler(optimizer, opt_cfg.learning_rate)
    grad_scaler = make_grad_scaler(opt_cfg, args.params_dict, half, on_csx)
    global_step, samples_streamed = restore_training_state(ckpt, ckpt_path, optimizer, scheduler, milestones,
                                                           grad_scaler, cfg, llava)
    if samples_streamed != global_step * cfg.batch_size:
        log.info("Resuming at sample %d (step %d x batch %d would be %d): the checkpoint's position wins",
                 samples_streamed, global_step, cfg.batch_size, global_step * cfg.batch_size)
    train_step = make_train_step(compiled, optimizer, scheduler, grad_scaler, trainable,
                                 opt_cfg.max_gradient_norm, amp)
    set_micro_batch_size(cfg, num_csx(args))
    lr_at = run_py.lr_schedule(opt_cfg.learning_rate)  # the step's lr, as cstorch computes it on the device

    logger = run_py.Logger(model_dir, "train", True)
    bar = tqdm(total=rc.max_steps, initial=global_step, disable=args.no_progress, desc="train", unit="step",
               dynamic_ncols=True)
    state = {"last_ckpt": ckpt_path, "window": time.perf_counter(), "samples": 0, "tokens": 0.0}
    start_samples = samples_streamed - global_step * cfg.batch_size  # position offset kept from the checkpoint

    @cstorch.step_closure
    def after_step(step, loss, grad_norm, real_tokens, samples):
        loss_value = float(loss)
        if rc.check_loss_values and not math.isfinite(loss_value):
            raise run_py.NonFiniteLoss(f"Loss is {loss_value} at step {step}; the last good checkpoint is "
                                       f"{state['last_ckpt'] or 'none (no checkpoint written yet)'}. Lower the "
                                       "learning rate or check the data around this step.")
        state["samples"] += float(samples)
        state["tokens"] += float(real_tokens)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % rc.log_steps == 0 or step == rc.max_steps:
            elapsed = max(time.perf_counter() - state["window"], 1e-9)
            lr, norm = lr_at(step - 1), float(grad_norm)
            values = {"loss": loss_value, "lr": lr, "grad_norm": norm, "samples_per_sec": state["samples"] / elapsed,
                      "tokens_per_sec": state["tokens"] / elapsed}
            logger.log(step, values,
                       f"| Train Step={step}, Loss={loss_value:.5f}, LR={lr:.3e}, GradNorm={norm:.3f}, "
                       f"Rate={values['samples_per_sec']:.2f} samples/s, {values['tokens_per_sec']:.0f} tokens/s")
            state.update(window=time.perf_counter(), samples=0, tokens=0.0)

    @cstorch.checkpoint_closure
    def save(step):
        samples = start_samples + step * cfg.batch_size
        st = checkpoint_state(llava, optimizer, scheduler, grad_scaler, step,
                              run_py.dataloader_state(samples, cfg.shuffle_seed, cfg), args.params_dict)
        state["last_ckpt"] = save_checkpoint(model_dir, st, step, rc.max_checkpoints)

    log.info("Training steps %d -> %d: global batch %d (micro batch %s), %s", global_step, rc.max_steps,
             cfg.batch_size, cfg.micro_batch_size or "auto", f"half dtype {half}" if half else "float32")
    results: dict = {}
    compiled.train()
    for start, end in segments(global_step, rc, args.mode):
        # a fresh loader per segment, starting where the previous one stopped
        dataloader = cstorch.utils.data.DataLoader(train_input_fn, cfg, model_cfg,
                                                   start_samples + start * cfg.batch_size)
        executor = cstorch.utils.data.DataExecutor(
            dataloader, num_steps=end - start,
            checkpoint_steps=checkpoint_schedule(start, end, rc.checkpoint_steps, end == rc.max_steps))
        step = start
        for batch in executor:
            loss, grad_norm, real_tokens, samples = train_step(batch)
            step += 1
            after_step(step, loss, grad_norm, real_tokens, samples)  # before save: a NaN loss stops the checkpoint
            save(step)
        if args.compile_only or args.validate_only:
            if args.mode == "train_and_eval":  # the eval graph too
                evaluate(args, rc, sections["eval_input"], model_cfg, compiled, amp, end, model_dir)
            log.info("%s finished; nothing was trained", "Compile" if args.compile_only else "Validation")
            bar.close()
            logger.close()
            return {}
        if args.mode == "train_and_eval":
            results = evaluate(args, rc, sections["eval_input"], model_cfg, compiled, amp, end, model_dir)
            compiled.train()
            set_micro_batch_size(cfg, num_csx(args))
    bar.close()
    logger.close()
    if args.mode == "train_and_eval" and global_step >= rc.max_steps:  # nothing left to train: evaluate once
        results = evaluate(args, rc, sections["eval_input"], model_cfg, compiled, amp, global_step, model_dir)
    log.info("Training done at step %d; checkpoint %s", max(global_step, rc.max_steps), state["last_ckpt"])
    return results


def segments(global_step: int, rc: run_py.RunConfig, mode: str) -> list:
    """[(start, end)] global step ranges, one DataExecutor each: split at eval_frequency for train_and_eval."""
    every = rc.eval_frequency if mode == "train_and_eval" and rc.eval_frequency else rc.max_steps
    bounds = [s for s in range(global_step + 1, rc.max_steps) if s % every == 0] + [rc.max_steps]
    out, start = [], global_step
    for end in bounds:
        if end > start:
            out.append((start, end))
            start = end
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation (the metrics of run.evaluate)


def make_eval_step(compiled, amp):
    """Traced: per-batch sums for loss, accuracy and first-answer-token accuracy, plus the first answer
    tokens (-1 elsewhere) for the majority baseline, counted on the host."""
    import cerebras.pytorch as cstorch
    import torch
    import torch.nn.functional as F

    @cstorch.trace
    @torch.no_grad()
    def eval_step(batch):
        with amp():
            _, logits = compiled(batch, output_logits=True)
        labels, mask = batch["labels"], batch["loss_mask"]
        mask_f = mask.float()
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.long().flatten(), reduction="none")
        hit = (logits.argmax(-1) == labels.long()).float()
        if "answer_start" in batch:  # packed rows: computed in each sample's own order
            first = batch["answer_start"]
        else:
            prev = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
            first = mask * (1 - prev)  # first position of every answer span: mask goes 0 -> 1
        first_f = first.float()
        sums = torch.stack([(ce * mask_f.flatten()).sum(), mask_f.sum(), (hit * mask_f).sum(),
                            (hit * first_f).sum(), first_f.sum()])
        first_labels = torch.where(first > 0, labels, torch.full_like(labels, -1))
        return sums, first_labels

    return eval_step


def evaluate(args, rc: run_py.RunConfig, cfg: run_py.InputConfig, model_cfg, compiled, amp, step: int,
             model_dir: Path) -> dict:
    import cerebras.pytorch as cstorch
    import torch

    batches = host_dataset(cfg, model_cfg, "eval_input") // cfg.batch_size
    if rc.eval_steps:
        batches = min(batches, rc.eval_steps)
    set_micro_batch_size(cfg, num_csx(args))
    eval_step = make_eval_step(compiled, amp)
    totals = torch.zeros(5, dtype=torch.float64)  # loss, tokens, correct, first_correct, first_total
    first_answers: dict = {}

    @cstorch.step_closure
    def accumulate(sums, first_labels):
        totals.add_(sums.detach().to("cpu", torch.float64))
        tokens = first_labels[first_labels >= 0].tolist()
        for tok in tokens:
            first_answers[tok] = first_answers.get(tok, 0) + 1

    compiled.eval()
    executor = cstorch.utils.data.DataExecutor(cstorch.utils.data.DataLoader(eval_input_fn, cfg, model_cfg),
                                               num_steps=batches)
    for batch in executor:
        accumulate(*eval_step(batch))
    if args.compile_only or args.validate_only:
        return {}
    loss_sum, tokens, correct, first_correct, first_total = totals.tolist()
    majority = float(max(first_answers.values())) if first_answers else 0.0
    loss = loss_sum / max(tokens, 1.0)
    metrics = {
        "step": step, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / max(tokens, 1.0),
        "first_answer_token_accuracy": first_correct / max(first_total, 1.0),
        "majority_first_answer_baseline": majority / max(first_total, 1.0),
        "eval_tokens": int(tokens), "eval_answers": int(first_total),
    }
    run_py.report_eval(model_dir, step, metrics, f" over {batches} batches of {cfg.batch_size}")
    return metrics
