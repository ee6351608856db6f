"""One training loop for every chapter: device pick, seeding, AdamW, periodic
evaluation of train/val loss, a progress bar, and a history to plot.

    history = train(model, batches, steps=500, lr=1e-3)

``batches(split)`` returns one batch, a tuple of tensors, for split "train"
or "val"; ``loss_fn(model, *batch)`` turns it into a scalar loss (default:
``model(*batch)`` returning ``(logits, loss)``, as ``gptcourse.gpt.GPT`` and
``gptcourse.rnn.Seq2Seq`` do).
"""
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import get_batch


def pick_device(device=None):
    """cuda > mps > cpu, unless `device` or the GPTCOURSE_DEVICE variable names one."""
    device = device or os.environ.get("GPTCOURSE_DEVICE")
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed):
    """Seed Python, NumPy and PyTorch (all devices) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # also seeds CUDA and MPS


def autocast_for(device):
    """bf16 autocast on a GPU that has it, fp16 on one that does not, none on CPU.
    Returns (context manager, needs grad scaler)."""
    device = torch.device(device)
    if device.type != "cuda":
        return nullcontext(), False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


def lm_batches(train_data, val_data, block_size, batch_size, seed=0, device="cpu"):
    """A `batches(split)` function for language modelling on two 1-D token tensors.
    Each split draws from its own seeded generator, so runs repeat."""
    data = {"train": train_data, "val": val_data}
    gens = {split: torch.Generator().manual_seed(seed + i) for i, split in enumerate(data)}

    def batches(split):
        return get_batch(data[split], block_size, batch_size, generator=gens[split], device=device)
    batches.generators = gens      # their states go into checkpoints (gptcourse.distributed)
    return batches


def learning_rate(step, steps, lr, warmup_steps=0, min_lr=None):
    """The learning rate at step 1..steps: linear warm-up over warmup_steps,
    then constant (min_lr=None) or a cosine decay that reaches min_lr at the
    last step (as nanoGPT and GPT-3 do)."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if min_lr is None:
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)     # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def _default_loss(model, *batch):
    """The model returns (output, loss) given a whole batch, as GPT(x, y) and
    Seq2Seq(src, src_lengths, tgt_in, tgt_out) do."""
    return model(*batch)[1]


def compiled(model, compile=True):
    """torch.compile(model) (compile: True or a dict of its options, e.g.
    {"mode": "max-autotune"}), or model itself when compile is falsy.
    The compiled module traces the model into fused kernels on its first
    call (seconds to a minute), then runs faster; it shares model's weights."""
    if not compile:
        return model
    return torch.compile(model, **(compile if isinstance(compile, dict) else {}))


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.99), device="cpu"):
    """AdamW with weight decay on matrices only (not on biases, LayerNorm
    gains); the fused CUDA kernel on a GPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, **({"fused": True} if torch.device(device).type == "cuda" else {}))


def training_step(model, optimizer, batch, lr, loss_fn=_default_loss, ctx=None, scaler=None,
                  grad_clip=1.0):
    """One optimisation step on one batch (a list of tensors already on the
    model's device): set the learning rate, forward under `ctx` (autocast),
    backward (through `scaler` for fp16), clip the gradient norm to
    grad_clip (0/None: no clipping), AdamW update. Returns the loss tensor.

    `model` may be wrapped (torch.compile, DistributedDataParallel): the
    distributed trainer (gptcourse.distributed) and the GPU benchmark take
    the same step as `train`.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with ctx if ctx is not None else nullcontext():
        loss = loss_fn(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss


@dataclass
class History:
    """What happened during training, for plots: losses per step and at each evaluation."""
    step_loss: list = field(default_factory=list)     # training loss of every step
    eval_steps: list = field(default_factory=list)    # steps at which we evaluated
    train_loss: list = field(default_factory=list)    # mean loss on eval_batches train batches
    val_loss: list = field(default_factory=list)      # ... and on val batches
    lr: list = field(default_factory=list)            # learning rate of every step


@torch.no_grad()
def estimate_loss(model, batches, loss_fn=_default_loss, eval_batches=20, device="cpu"):
    """Mean loss over eval_batches batches of each split: {"train": ..., "val": ...}."""
    was_training = model.training
    model.eval()
    ctx, _ = autocast_for(device)
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(eval_batches):
            batch = [t.to(device) for t in batches(split)]
            with ctx:
                losses.append(loss_fn(model, *batch).item())
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def train(model, batches, *, steps, lr=1e-3, warmup_steps=0, min_lr=None, loss_fn=_default_loss,
          weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, eval_every=None, eval_batches=20,
          device=None, seed=None, progress=True, desc="training", compile=False):
    """Train `model` in place with AdamW for `steps` steps; returns a History.

    The learning rate follows `learning_rate` (warm-up, then constant or a
    cosine decay to min_lr). Weight decay applies to matrices only (not to
    biases, LayerNorm gains).
    Evaluates train/val loss at step 0, every `eval_every` steps and at the
    end. On a GPU it trains under bf16 autocast (fp16 with a grad scaler
    where bf16 is missing) with the fused AdamW kernel; compile=True (or a
    dict of torch.compile options) runs the model through torch.compile,
    worth it on a GPU for long runs.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be an integer in 0..steps={steps}, got {warmup_steps!r}")
    if seed is not None:
        seed_everything(seed)
    device = pick_device(device)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay, betas, device)
    ctx, use_scaler = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    net = compiled(model, compile)
    eval_every = eval_every or max(1, steps // 10)
    history = History()

    def evaluate(step):
        losses = estimate_loss(net, batches, loss_fn, eval_batches, device)
        history.eval_steps.append(step)
        history.train_loss.append(losses["train"])
        history.val_loss.append(losses["val"])

    evaluate(0)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        step_lr = learning_rate(step, steps, lr, warmup_steps, min_lr)
        batch = [t.to(device, non_blocking=True) for t in batches("train")]
        loss = training_step(net, optimizer, batch, step_lr, loss_fn, ctx, scaler, grad_clip)
        history.step_loss.append(loss.item())
        history.lr.append(step_lr)
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}")
    model.eval()
    return history
