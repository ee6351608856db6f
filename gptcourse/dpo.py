"""Direct preference optimisation (DPO, Rafailov et al. 2023).

RLHF (InstructGPT, Ouyang et al. 2022) trains a reward model on human
preferences, then maximises that reward with PPO while a KL penalty keeps
the policy near the supervised model. DPO notices that this objective's
optimum is known in closed form, pi*(y|x) proportional to
pi_ref(y|x) exp(r(x, y) / beta), so the reward can be written through the
policy itself, r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + const, and the
Bradley-Terry likelihood of "chosen beats rejected" becomes a loss on the
policy alone: no reward model, no sampling, no RL loop.

    loss = -log sigmoid(beta * ((log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))))

Each log pi(y|x) is a whole answer's log-probability given its prompt, the
sum over its tokens (sequence_logprobs). The reference model is frozen: its
log-probabilities are numbers (computed once, under torch.no_grad), and only
the policy's carry gradients.
"""

import torch
import torch.nn.functional as F


def sequence_logprobs(model, x, y, mask):
    """The log-probability of each sequence's answer: (B,) sums over the masked tokens.

    x (B, T) input ids, y (B, T) next-token ids, mask (B, T) bool (True on
    the answer's targets; as gptcourse.sft.sft_batch returns them). model(x)
    must return (logits (B, T, V), ...). Returns, for each row b,
    sum over t with mask[b, t] of log p(y[b, t] | x[b, :t + 1]).
    Gradients flow into the model; wrap the call in torch.no_grad() for a
    reference model.
    """
    if x.dim() != 2 or y.shape != x.shape or mask.shape != x.shape:
        raise ValueError(f"x, y and mask must all be (B, T); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    logits = model(x)[0]
    if logits.shape[:2] != x.shape:
        raise ValueError(f"model(x) must return logits (B, T, V) with (B, T) = {tuple(x.shape)}, "
                         f"got {tuple(logits.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 -> float32
    logp = torch.log_softmax(logits, dim=-1)                               # (B, T, V)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)                  # (B, T)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(-1)     # (B,)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """The DPO loss on a batch of preference pairs.

    Each argument is (B,): an answer's summed log-probability
    (sequence_logprobs) under the policy being trained or the frozen
    reference model, for the chosen and the rejected answer of each pair.
    Returns (loss, chosen_rewards, rejected_rewards):

        chosen_rewards   = beta * (policy_chosen - ref_chosen)        (B,), detached
        rejected_rewards = beta * (policy_rejected - ref_rejected)    (B,), detached
        loss = -logsigmoid(chosen_rewards - rejected_rewards).mean()  (with gradients)

    The implicit rewards' margin (chosen - rejected) is what DPO raises;
    at margin 0 (policy = reference) the loss is log 2. beta (> 0) is the
    strength of the KL leash to the reference: the smaller it is, the
    further the policy must move for the same margin.

        >>> z = torch.zeros(2)
        >>> round(dpo_loss(z, z, z, z)[0].item(), 4)                  # log 2
        0.6931
    """
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    inputs = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
              "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    for name, value in inputs.items():
        if not torch.is_tensor(value) or value.dim() != 1:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name} must be a (B,) tensor of summed log-probabilities, got {shape}")
    shapes = {name: tuple(value.shape) for name, value in inputs.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-probability tensors must have the same shape, got {shapes}")
    chosen = policy_chosen - ref_chosen                    # log pi/pi_ref of the chosen answers
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, (beta * chosen).detach(), (beta * rejected).detach()
