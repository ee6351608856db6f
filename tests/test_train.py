"""The training loop: a tiny character GPT learns the pydoc corpus, runs
repeat exactly, evaluation happens when promised, and AdamW's weight decay
touches matrices only (checked against its closed form)."""
import math

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported (gptcourse.viz imports it)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from gptcourse.data import load_corpus, train_val_split  # noqa: E402
from gptcourse.gpt import GPT, GPTConfig  # noqa: E402
from gptcourse.tokenizers import CharTokenizer  # noqa: E402
from gptcourse.train import (  # noqa: E402
    History,
    autocast_for,
    estimate_loss,
    learning_rate,
    lm_batches,
    pick_device,
    seed_everything,
    train,
)
from gptcourse.viz import plot_losses  # noqa: E402

STEPS, BLOCK, BATCH = 60, 32, 16


@pytest.fixture(scope="module")
def corpus():
    text = load_corpus("pydoc")
    tok = CharTokenizer(text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    train_data, val_data = train_val_split(data)
    return tok, train_data, val_data


def run(corpus, seed=0, batch_seed=0):
    tok, train_data, val_data = corpus
    torch.manual_seed(seed)  # the model's initial weights
    model = GPT(GPTConfig.from_name("course-tiny", vocab_size=tok.vocab_size))
    history = train(model, lm_batches(train_data, val_data, BLOCK, BATCH, seed=batch_seed),
                    steps=STEPS, lr=3e-3, eval_every=20, eval_batches=5, device="cpu", seed=seed,
                    progress=False)
    return model, history


@pytest.fixture(scope="module")
def trained(corpus):
    return run(corpus)


def test_tiny_gpt_learns(corpus, trained):
    tok, _, _ = corpus
    model, h = trained
    # at init the prediction is uniform: cross-entropy ln V
    assert h.val_loss[0] == pytest.approx(math.log(tok.vocab_size), abs=0.15)
    assert h.train_loss[0] == pytest.approx(math.log(tok.vocab_size), abs=0.15)
    assert h.val_loss[-1] < h.val_loss[0] - 1.0
    assert h.train_loss[-1] < h.train_loss[0] - 1.0
    assert sum(h.step_loss[-10:]) / 10 < sum(h.step_loss[:10]) / 10 - 1.0
    assert not model.training  # left in eval mode


def test_history_lengths(trained):
    _, h = trained
    assert h.eval_steps == [0, 20, 40, 60]
    assert len(h.train_loss) == len(h.val_loss) == 4
    assert len(h.step_loss) == STEPS
    assert all(math.isfinite(x) for x in h.step_loss + h.train_loss + h.val_loss)


def test_same_seed_same_run(corpus, trained):
    model_a, a = trained
    model_b, b = run(corpus)
    assert a.step_loss == b.step_loss
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name


# ---------------------------------------------------------------- cheap runs on a frozen-loss model


def zero_loss(model, x, y):
    """A loss with zero gradient: AdamW then only applies weight decay."""
    return 0.0 * sum(p.sum() for p in model.parameters())


def constant_batches(split):
    return (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=4, vocab_size=5, n_layer=1, n_head=1, n_embd=4))


@pytest.mark.parametrize("steps,eval_every,expected", [
    (25, None, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]),  # default: steps // 10
    (25, 10, [0, 10, 20, 25]),
    (10, 5, [0, 5, 10]),            # the end is not evaluated twice
    (3, None, [0, 1, 2, 3]),
    (1, 7, [0, 1]),
])
def test_eval_schedule(steps, eval_every, expected):
    h = train(tiny_model(), constant_batches, steps=steps, eval_every=eval_every, eval_batches=1,
              loss_fn=zero_loss, device="cpu", progress=False)
    assert h.eval_steps == expected
    assert len(h.train_loss) == len(h.val_loss) == len(expected)
    assert len(h.step_loss) == steps


def test_weight_decay_on_matrices_only():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, steps = 0.1, 0.5, 3
    train(model, constant_batches, steps=steps, lr=lr, weight_decay=wd, loss_fn=zero_loss,
          eval_batches=1, device="cpu", progress=False)
    # AdamW with zero gradients: p <- p * (1 - lr * wd) each step, for decayed params only
    shrink = (1 - lr * wd) ** steps
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p, before[name] * shrink, rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(p, before[name]), name


def test_learning_rate_schedule_by_hand():
    lr, min_lr = 1e-3, 1e-4
    # linear warm-up over 10 steps: step 5 -> half the rate, step 10 -> full
    assert learning_rate(5, 100, lr, warmup_steps=10) == pytest.approx(5e-4)
    assert learning_rate(10, 100, lr, warmup_steps=10) == pytest.approx(lr)
    assert learning_rate(70, 100, lr, warmup_steps=10) == pytest.approx(lr)   # constant after
    # cosine from lr (end of warm-up) to min_lr (last step); halfway: the mean
    assert learning_rate(55, 100, lr, 10, min_lr) == pytest.approx((lr + min_lr) / 2)
    assert learning_rate(100, 100, lr, 10, min_lr) == pytest.approx(min_lr)
    q = 10 + 90 * 0.25      # a quarter of the way: min + (1 + cos(pi/4)) / 2 * (lr - min)
    assert learning_rate(q, 100, lr, 10, min_lr) == pytest.approx(
        min_lr + (1 + math.sqrt(0.5)) / 2 * (lr - min_lr))


def test_train_follows_the_schedule():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = train(model, constant_batches, steps=20, lr=0.01, warmup_steps=4, min_lr=0.001,
              weight_decay=0.5, loss_fn=zero_loss, eval_batches=1, device="cpu", progress=False)
    # the optimizer used these rates: with zero gradients AdamW only decays,
    # p <- p * (1 - lr_t * wd) at each step t
    shrink = math.prod(1 - learning_rate(s, 20, 0.01, 4, 0.001) * 0.5 for s in range(1, 21))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p, before[name] * shrink, rtol=1e-5, atol=0, msg=name)
    assert h.lr == [learning_rate(s, 20, 0.01, 4, 0.001) for s in range(1, 21)]
    assert h.lr[0] == pytest.approx(0.0025) and h.lr[-1] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="warmup_steps"):
        train(model, constant_batches, steps=5, warmup_steps=6, loss_fn=zero_loss, progress=False)


def test_custom_loss_fn_fits_a_line():
    # y = 3 x - 1: a Linear(1, 1) trained with MSE must find weight 3, bias -1
    gen = torch.Generator().manual_seed(0)

    def batches(split):
        x = torch.randn(64, 1, generator=gen)
        return x, 3 * x - 1

    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    h = train(model, batches, steps=300, lr=0.05, weight_decay=0.0,
              loss_fn=lambda m, x, y: nn.functional.mse_loss(m(x), y),
              eval_batches=2, device="cpu", progress=False)
    assert model.weight.item() == pytest.approx(3.0, abs=0.02)
    assert model.bias.item() == pytest.approx(-1.0, abs=0.02)
    assert h.val_loss[-1] < 1e-3


@pytest.mark.parametrize("steps", [0, -1, 2.5, None])
def test_train_bad_steps(steps):
    with pytest.raises(ValueError, match=f"steps must be a positive integer, got {steps!r}"):
        train(tiny_model(), constant_batches, steps=steps, progress=False)


# ---------------------------------------------------------------- helpers


def test_estimate_loss_restores_mode_and_averages():
    model = tiny_model()
    calls = []

    def loss_fn(m, x, y):
        calls.append(m.training)
        return torch.tensor(float(len(calls)))

    model.train()
    out = estimate_loss(model, constant_batches, loss_fn, eval_batches=4)
    assert model.training and calls == [False] * 8
    assert out == {"train": (1 + 2 + 3 + 4) / 4, "val": (5 + 6 + 7 + 8) / 4}


def test_lm_batches(corpus):
    _, train_data, val_data = corpus
    a, b = lm_batches(train_data, val_data, 8, 4, seed=3), lm_batches(train_data, val_data, 8, 4, seed=3)
    xa, ya = a("train")
    xb, yb = b("train")
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (4, 8) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(a("train")[0], xa)  # the next batch is another one
    xv, _ = a("val")
    # every val window is a slice of the val data
    for row in xv:
        windows = val_data.unfold(0, 8, 1)
        assert (windows == row).all(-1).any()


def test_pick_device(monkeypatch):
    monkeypatch.setenv("GPTCOURSE_DEVICE", "meta")
    assert pick_device() == torch.device("meta")
    assert pick_device("cpu") == torch.device("cpu")          # an explicit argument wins
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("GPTCOURSE_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")               # cuda > mps
    monkeypatch.setenv("GPTCOURSE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_train_uses_env_device(monkeypatch):
    # the meta device has no data: training there fails, which shows it was chosen
    monkeypatch.setenv("GPTCOURSE_DEVICE", "meta")
    model = tiny_model()
    with pytest.raises(Exception):
        train(model, constant_batches, steps=1, eval_batches=1, progress=False)
    assert model.wte.weight.is_meta


def test_autocast_for_cpu_is_a_no_op():
    ctx, scaler = autocast_for("cpu")
    assert scaler is False
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_seed_everything_repeats():
    import random

    import numpy as np
    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------- loss plot (viz)


def test_plot_losses_draws_three_lines():
    h = History(step_loss=[4.0, 3.5, 3.0, 2.8], eval_steps=[0, 2, 4], train_loss=[4.6, 3.4, 2.9],
                val_loss=[4.6, 3.6, 3.1])
    ax = plot_losses(h, title="tiny")
    try:
        lines = ax.get_lines()
        assert len(lines) == 3
        assert [line.get_label() for line in lines] == ["train (per step)", "train (eval)", "val (eval)"]
        assert list(lines[0].get_xdata()) == [1, 2, 3, 4] and list(lines[0].get_ydata()) == h.step_loss
        assert list(lines[1].get_xdata()) == [0, 2, 4] and list(lines[1].get_ydata()) == h.train_loss
        assert list(lines[2].get_ydata()) == h.val_loss
        assert ax.get_title() == "tiny"
        assert ax.get_legend() is not None
    finally:
        plt.close(ax.figure)
    # without per-step losses only the two evaluation curves
    ax = plot_losses(History(eval_steps=[0], train_loss=[1.0], val_loss=[1.1]))
    assert len(ax.get_lines()) == 2
    plt.close(ax.figure)
