"""Data-parallel training on several processes (GPUs) with PyTorch's
DistributedDataParallel (DDP), launched by torchrun:

    torchrun --nproc_per_node=2 -m gptcourse.distributed --steps 2000 --batch-size 16
    python -m gptcourse.distributed --steps 2000 --batch-size 16     # one process

It trains the course's character-level GPT on the pydoc corpus, with the
same step as ``gptcourse.train.train`` (AdamW, warm-up + cosine learning
rate, gradient clipping, bf16 autocast on a GPU):

- every rank (process) holds a whole copy of the model and of the AdamW state;
- the global batch of B windows is split: rank r trains on rows
  r*B/W .. (r+1)*B/W - 1 of the very batch a one-process run would draw, so
  runs on 1 and on W processes see the same data (``shard_batch``);
- backward() averages the gradients over the ranks (DDP's all-reduce), so
  every rank takes the same AdamW step and the copies stay equal;
- rank 0 evaluates, shows the progress bar and writes checkpoints;
  ``--resume PATH`` continues a run exactly where its checkpoint left it.

Without torchrun (no RANK in the environment) it is a plain one-process run.
torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
the backend is NCCL on CUDA GPUs and gloo on the CPU.
"""
import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .data import get_batch, load_corpus, train_val_split
from .gpt import GPT, GPTConfig
from .tokenizers import CharTokenizer
from .train import (History, autocast_for, compiled, estimate_loss, learning_rate, lm_batches,
                    make_optimizer, pick_device, seed_everything, training_step)


@dataclass(frozen=True)
class Settings:
    """What defines a run (and must not change when it resumes)."""
    steps: int = 2000
    batch_size: int = 12            # global batch: summed over all ranks
    block_size: int = 64
    model: str = "course-char"      # a GPTConfig preset
    corpus: str = "pydoc"
    dropout: float = 0.0
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr: float = None            # None: constant after warm-up, else cosine to min_lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0             # 0: every steps // 10
    eval_batches: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "block_size", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in 0..steps={self.steps}, "
                             f"got {self.warmup_steps!r}")


def rank_and_world():
    """(rank, world size): (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device=None):
    """Join the process group torchrun describes in the environment and pick
    this process's device: GPU number LOCAL_RANK with NCCL, else the CPU
    with gloo. Without torchrun: no process group, `pick_device(device)`."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")   # gloo runs on the CPU (and MPS has no collective backend)
        dist.init_process_group("gloo")
    return device


def shard_batch(data, block_size, batch_size, generator, rank=0, world_size=1, device="cpu"):
    """This rank's part of a global batch: (x, y), each (batch_size / world_size, T).

    Every rank draws the same global batch of batch_size windows with its
    copy of the same seeded generator and keeps rows
    rank * b .. (rank + 1) * b - 1, b = batch_size / world_size. The ranks'
    rows are disjoint and together they are exactly the batch a one-process
    run draws (what torch's DistributedSampler does for a finite data set).
    """
    if batch_size % world_size:
        raise ValueError(f"the global batch_size={batch_size} must be divisible by "
                         f"the number of processes world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    x, y = get_batch(data, block_size, batch_size, generator=generator)          # (B, T) on CPU
    b = batch_size // world_size
    x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]                  # (B / W, T)
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------
# checkpoints: everything needed to continue exactly (loads with weights_only)
# ----------------------------------------------------------------------------

def _rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state, rank=0):
    """Write `state` to path atomically (a temporary file, then os.replace:
    an interrupted write never leaves a broken checkpoint). Only rank 0
    writes; other ranks return False."""
    if rank != 0:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return True


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint; plain tensors, numbers and
    lists only, so it loads with weights_only=True (runs no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------
# the training run
# ----------------------------------------------------------------------------

def _settings_for(settings, ckpt, resume):
    """The run's settings: the checkpoint's when resuming (given ones must be the same)."""
    if ckpt is None:
        return settings or Settings()
    saved = Settings(**ckpt["settings"])
    if settings is not None and settings != saved:
        diff = {f.name: (getattr(settings, f.name), getattr(saved, f.name)) for f in fields(Settings)
                if getattr(settings, f.name) != getattr(saved, f.name)}
        raise ValueError(f"settings differ from the checkpoint's {resume} (given, saved): {diff}")
    return saved


def _restore(ckpt, model, optimizer, scaler, train_gen, eval_data, rank, device):
    """Put a checkpoint's weights, optimizer, data streams and this rank's RNG state
    back; returns (history, step)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    train_gen.set_state(ckpt["data"]["train"])
    for split, gen in eval_data.generators.items():
        gen.set_state(ckpt["data"]["eval_" + split])
    if rank < len(ckpt["rng"]):           # resumed on as many ranks or more: rank r's own state
        _set_rng_state(ckpt["rng"][rank], device)
    return History(**ckpt["history"]), ckpt["step"]


def _gather_rng_states(world, device):
    """Every rank's RNG state, gathered on all ranks (a list, one per rank)."""
    if world == 1:
        return [_rng_state(device)]
    rngs = [None] * world
    dist.all_gather_object(rngs, _rng_state(device))
    return rngs


@dataclass
class _Run:
    """What one rank's training holds: the model and its optimizer, the data
    streams, the history so far and the step it starts after."""
    config: GPTConfig
    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: object                            # a GradScaler (CUDA float16) or None
    ctx: object                               # the autocast context of the device
    train_data: torch.Tensor
    train_gen: torch.Generator
    eval_data: object                         # lm_batches(...): evaluation batches and their generators
    history: History
    start: int = 0


def _start(s, rank, device, ckpt):
    """Build the run of settings s on this rank, from a checkpoint when resuming."""
    text = load_corpus(s.corpus)
    tok = CharTokenizer(text)
    train_data, val_data = train_val_split(torch.tensor(tok.encode(text)))
    config = GPTConfig.from_name(s.model, vocab_size=tok.vocab_size, block_size=s.block_size,
                                 dropout=s.dropout)
    seed_everything(s.seed)
    model = GPT(config)                       # the same initial weights on every rank
    seed_everything(s.seed + rank)            # dropout: each rank its own stream
    model.to(device)
    optimizer = make_optimizer(model, s.lr, s.weight_decay, device=device)
    ctx, use_scaler = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    train_gen = torch.Generator().manual_seed(s.seed)          # identical on every rank
    eval_data = lm_batches(train_data, val_data, s.block_size, s.batch_size, s.seed + 1)
    run = _Run(config, model, optimizer, scaler, ctx, train_data, train_gen, eval_data, History())
    if ckpt is not None:
        run.history, run.start = _restore(ckpt, model, optimizer, scaler, train_gen, eval_data, rank, device)
    return run


def _evaluate(run, s, device, step):
    """Rank 0: the losses on the training and validation text, into the history."""
    losses = estimate_loss(run.model, run.eval_data, eval_batches=s.eval_batches, device=device)
    run.history.eval_steps.append(step)
    run.history.train_loss.append(losses["train"])
    run.history.val_loss.append(losses["val"])


def _checkpoint_state(run, s, step, world, device):
    """Everything a resumed run needs, every rank's RNG state included."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "step": step, "settings": asdict(s), "config": asdict(run.config),
            "history": asdict(run.history), "world_size": world, "rng": _gather_rng_states(world, device),
            "data": {"train": run.train_gen.get_state(),
                     **{"eval_" + k: g.get_state() for k, g in run.eval_data.generators.items()}}}


def train_ddp(settings=None, *, device=None, out_dir=None, ckpt_every=0, resume=None,
              stop_at=None, compile=False, progress=True):
    """Train on every rank of the running process group (or alone); returns
    the History (train/val losses from rank 0's evaluations; step_loss is
    the loss on the global batch: the ranks' losses averaged).

    out_dir: rank 0 writes out_dir/ckpt.pt every ckpt_every steps and at the
        end, and out_dir/history.json at the end.
    resume: a checkpoint path; the run continues from its step with its
        settings (passing different settings is an error).
    stop_at: stop after this step, as if interrupted (for tests and demos).
    """
    rank, world = rank_and_world()
    device = pick_device(device)
    ckpt = load_checkpoint(resume) if resume else None
    s = _settings_for(settings, ckpt, resume)
    if s.batch_size % world:
        raise ValueError(f"the global batch_size={s.batch_size} must be divisible by "
                         f"the number of processes world_size={world}")
    run = _start(s, rank, device, ckpt)
    history = run.history
    net = compiled(run.model, compile)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    eval_every = s.eval_every or max(1, s.steps // 10)
    end = min(s.steps, stop_at) if stop_at else s.steps

    if run.start == 0 and rank == 0:
        _evaluate(run, s, device, 0)
    run.model.train()
    bar = tqdm(range(run.start + 1, end + 1), desc=f"training on {world} process{'es' * (world > 1)}",
               disable=not progress or rank != 0, mininterval=0.5)
    for step in bar:
        lr = learning_rate(step, s.steps, s.lr, s.warmup_steps, s.min_lr)
        batch = shard_batch(run.train_data, s.block_size, s.batch_size, run.train_gen, rank, world, device)
        loss = training_step(net, run.optimizer, batch, lr, ctx=run.ctx, scaler=run.scaler,
                             grad_clip=s.grad_clip).detach()
        if world > 1:                         # the loss on the global batch, for the log
            dist.all_reduce(loss)
            loss /= world
        history.step_loss.append(loss.item())
        history.lr.append(lr)
        if (step % eval_every == 0 or step == s.steps) and rank == 0:
            _evaluate(run, s, device, step)
            bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}")
        if out_dir and ((ckpt_every and step % ckpt_every == 0) or step == end):
            save_checkpoint(Path(out_dir) / "ckpt.pt", _checkpoint_state(run, s, step, world, device), rank)
    if out_dir and rank == 0:
        (Path(out_dir) / "history.json").write_text(json.dumps(asdict(history)))
    run.model.eval()
    return history


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m gptcourse.distributed",
        description="Train the course GPT with DistributedDataParallel; launch with "
                    "torchrun --nproc_per_node=N -m gptcourse.distributed ...")
    defaults = Settings()
    for f in fields(Settings):         # every setting is a flag; None means "not given"
        kind = float if f.name in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout") else \
            str if f.name in ("model", "corpus") else int
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"default {getattr(defaults, f.name)}")
    p.add_argument("--out-dir", default=None, help="where rank 0 writes ckpt.pt and history.json")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step, as if interrupted")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None}
    first = 1
    if args.resume:                       # the checkpoint's settings, unless told otherwise
        ckpt = load_checkpoint(args.resume)
        settings, first = Settings(**{**ckpt["settings"], **given}), ckpt["step"] + 1
    else:
        settings = Settings(**given)
    device = setup(args.device)
    rank, world = rank_and_world()
    try:
        if rank == 0:
            print(f"{world} process{'es' * (world > 1)} on {device}"
                  f"{' (' + dist.get_backend() + ')' if world > 1 else ''}; global batch "
                  f"{settings.batch_size} = {settings.batch_size // world} per rank x {world}", flush=True)
        start = time.perf_counter()
        h = train_ddp(settings, device=device, out_dir=args.out_dir, ckpt_every=args.ckpt_every,
                      resume=args.resume, stop_at=args.stop_at, compile=args.compile,
                      progress=not args.no_progress)
        if rank == 0:
            print(f"steps {first}..{len(h.step_loss)} in {time.perf_counter() - start:.1f} s; "
                  f"last step loss {h.step_loss[-1]:.4f}; val loss at steps {h.eval_steps}: "
                  + ", ".join(f"{v:.3f}" for v in h.val_loss), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
