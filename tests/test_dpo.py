"""gptcourse.dpo against independent computations: the loss against its formula
on hand-picked log-probabilities with known answers, its gradient's direction,
and sequence_logprobs against a token-by-token sum."""
import math

import pytest
import torch

from gptcourse.dpo import dpo_loss, sequence_logprobs
from gptcourse.gpt import GPT, GPTConfig


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_loss_is_log_2_at_zero_margin():
    loss, chosen, rejected = dpo_loss(t(-3.0, -7.0), t(-5.0, -2.0), t(-3.0, -7.0), t(-5.0, -2.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert chosen.tolist() == [0.0, 0.0] and rejected.tolist() == [0.0, 0.0]


def test_dpo_loss_on_hand_worked_numbers():
    # pair 1: the policy moved +2 nats on the chosen answer and -1 on the rejected one:
    # margin beta * (2 - (-1)) = 0.1 * 3 = 0.3; pair 2: margin 0.1 * (-1 - 1) = -0.2
    pc, pr, rc, rr = t(-10.0, -4.0), t(-13.0, -6.0), t(-12.0, -3.0), t(-12.0, -7.0)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    by_hand = (math.log(1 + math.exp(-0.3)) + math.log(1 + math.exp(0.2))) / 2    # -log sigmoid(m) = log(1 + e^-m)
    assert loss.item() == pytest.approx(by_hand, abs=1e-12)
    torch.testing.assert_close(chosen, t(0.2, -0.1))
    torch.testing.assert_close(rejected, t(-0.1, 0.1))


def test_dpo_loss_with_the_margin_where_sigmoid_is_known():
    # beta * margin = log 3: sigmoid = 3/4, loss = log(4/3)
    loss, _, _ = dpo_loss(t(math.log(3)), t(0.0), t(0.0), t(0.0), beta=1.0)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # the same margin through beta = 2 and half the log-ratio
    loss, _, _ = dpo_loss(t(0.0), t(-math.log(3) / 2), t(0.0), t(0.0), beta=2.0)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-12)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    pc, pr = t(-5.0, -1.0).requires_grad_(), t(-4.0, -2.0).requires_grad_()
    rc, rr = t(-5.5, -1.5).requires_grad_(), t(-3.0, -2.5).requires_grad_()
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()            # descent raises pc, lowers pr
    # d loss / d pc = -beta * sigmoid(-margin) / B
    margin = 0.3 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -0.3 * torch.sigmoid(-margin) / 2)
    torch.testing.assert_close(pr.grad, -pc.grad)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_loss_checks_its_inputs():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(z, z, z, torch.zeros(2))
    with pytest.raises(ValueError, match=r"policy_chosen must be a \(B,\)"):
        dpo_loss(torch.zeros(3, 1), z, z, z)


def test_sequence_logprobs_is_the_sum_over_the_answer_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=13))
    x, y = torch.randint(0, 13, (2, 6)), torch.randint(0, 13, (2, 6))
    mask = torch.tensor([[False, False, True, True, True, False], [False, True, True, True, True, True]])
    got = sequence_logprobs(model, x, y, mask)
    for b in range(2):                                            # one prefix at a time
        by_hand = sum(torch.log_softmax(model(x[b:b + 1, :s + 1])[0][0, -1], -1)[y[b, s]]
                      for s in range(6) if mask[b, s])
        assert got[b].item() == pytest.approx(by_hand.item(), abs=1e-5)
    got.sum().backward()                                          # gradients flow
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="bool"):
        sequence_logprobs(model, x, y, mask.long())


def test_dpo_training_raises_the_margin_on_a_tiny_model():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10)
    policy, reference = GPT(config), GPT(config)
    reference.load_state_dict(policy.state_dict())
    x = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])                 # same prompt, two answers
    y = torch.tensor([[2, 3, 5, 6], [2, 3, 7, 8]])
    mask = torch.tensor([[False, False, True, True]] * 2)
    with torch.no_grad():
        ref = sequence_logprobs(reference, x, y, mask)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(30):
        logp = sequence_logprobs(policy, x, y, mask)
        loss, chosen, rejected = dpo_loss(logp[:1], logp[1:], ref[:1], ref[1:], beta=0.5)
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (chosen - rejected).item() > 1.0 and loss.item() < 0.3
