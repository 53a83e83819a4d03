"""What fine-tuning minimises: next-token cross-entropy (SFT) and the preference losses (DPO, ORPO), all from
one function that gives the log-probability of each labelled token through a frozen output layer.

The preference losses follow TRL's DPOTrainer and ORPOTrainer term by term (tests/test_preference.py checks
the losses and LoRA gradients against them on the same batch); their metrics carry TRL's names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from phikit.quantize import QuantizedLinear


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def frozen_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of an output layer that trains nothing (a plain frozen Linear, or a quantized one,
    dequantized), else None."""
    if isinstance(head, QuantizedLinear):
        weight = head.dequantized()
        return weight if head.bias is None else weight.to(head.bias.dtype), head.bias
    if type(head).__name__ == "Linear4bit":  # bitsandbytes' NF4 head (CUDA): dequantized once, as ours
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(head.weight.data, head.weight.quant_state)
        return weight, head.bias
    # nn.Linear or a backend's subclass of it (the CPU backend's DenseLinear); not bitsandbytes' int8 layer
    if (
        isinstance(head, torch.nn.Linear)
        and head.weight.is_floating_point()
        and not any(p.requires_grad for p in head.parameters())
    ):
        return head.weight, head.bias
    return None


def token_logps(
    model, ids: torch.Tensor, labels: torch.Tensor, head=None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled next token, the index of the sequence it belongs to): the labels
    are shifted, not the logits, so the full logits are not copied. With a frozen head (LoRA's usual case) the
    head is applied by ``head_token_logps`` to the labelled positions only, a chunk at a time; otherwise (a
    trained ``lm_head``) through the model as usual. ``head``: ``frozen_head``'s answer, when the caller keeps
    it across steps (a quantized head is then dequantized once). ``temperature``: of the distribution the
    tokens were sampled from (GRPO), dividing the logits."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    rows = (targets != -100).nonzero().squeeze(1)
    return scored_logps(model, {"input_ids": ids}, rows, targets[rows], head, temperature), rows // ids.shape[1]


def scored_logps(
    model, inputs: dict, rows: torch.Tensor, targets: torch.Tensor, head=None, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / temperature)[targets] at the flat positions ``rows`` of ``model(**inputs)``: with a
    frozen head (``frozen_head``'s answer, looked up when not given) through ``head_token_logps``, else (a
    trained ``lm_head``) from the model's own logits."""
    head = head or frozen_head(unwrap(model).lm_head)
    if head is None:
        logits = model(**inputs)
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows).float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    hidden = model(**inputs, hidden_only=True)
    return head_token_logps(hidden.reshape(-1, hidden.shape[-1]), *head, targets, rows, temperature)


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, head=None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions (and their count). A batch without any (with
    ``responses_only``, a packed sequence can be all prompt: a long user turn) has loss 0, not NaN."""
    logps, _ = token_logps(model, ids, labels, head)
    return -logps.sum() / max(len(logps), 1), len(logps)


def sequence_logps(model, ids, labels, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled tokens, their count), one value per row of ids."""
    logps, sequence = token_logps(model, ids, labels, head)
    sums = torch.zeros(ids.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, sequence, logps)
    counts = torch.bincount(sequence, minlength=ids.shape[0])
    return sums, counts


def head_token_logps(
    hidden, weight, bias, targets, rows, temperature: float = 1.0, chunk_bytes: int = 1 << 26
) -> torch.Tensor:
    """log_softmax((hidden[rows] @ weight.T + bias) / temperature)[targets], one value per entry of ``rows``
    (positions, which may repeat: a preference pair's last prompt position predicts both replies' first
    tokens) and of ``targets`` (the token each entry scores), fp32.

    Written by hand because the (positions, vocab) logits are the largest tensors of LoRA training on a
    small model (1,024 x 51,200 fp32 = 210 MB per sequence, held for backward, plus the softmax's): here
    they exist a chunk of ``chunk_bytes`` at a time, unlabelled positions (prompts) skip the head entirely,
    and the gradient for ``hidden`` is computed in the same pass, so backward costs no second head matmul.
    The head itself gets no gradient (it is frozen)."""
    return _HeadLogProbs.apply(
        hidden, weight.detach(), None if bias is None else bias.detach(), targets, rows, temperature, chunk_bytes
    )


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, temperature, chunk_bytes):
        want_grad = ctx.needs_input_grad[0]
        # the head's own dtype where it is 16-bit (as autocast would run it), else the hidden states'; the
        # softmax in fp32; autocast off so that every dtype here is the one written
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
        out = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(len(rows), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device) if want_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(rows), chunk):
                index = rows[start : start + chunk]
                x, t = hidden.index_select(0, index).to(dtype), targets[start : start + len(index)]
                logits = F.linear(x, weight, bias).float()  # a new tensor either way: scaled in place
                logp = torch.log_softmax(logits if temperature == 1 else logits.div_(temperature), dim=-1)
                out[start : start + len(index)] = logp.gather(1, t[:, None]).squeeze(1)
                if want_grad:  # d logp[t] / d logits = one-hot - softmax
                    probs = logp.exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    part = (probs.to(dtype) @ weight).neg_()
                    grad[start : start + len(index)] = (part if temperature == 1 else part / temperature).to(grad.dtype)
        ctx.save_for_backward(grad, rows)
        ctx.positions = hidden.shape[0]
        return out

    @staticmethod
    def backward(ctx, upstream):
        grad, rows = ctx.saved_tensors
        full = torch.zeros(ctx.positions, grad.shape[-1], dtype=grad.dtype, device=grad.device)
        full.index_add_(0, rows, grad * upstream.to(grad.dtype)[:, None])  # a position may be read twice
        return full, None, None, None, None, None, None


# ---- preference losses: inputs are per-pair summed log-probs (chosen, rejected) and completion lengths ----


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss (mean over pairs) and TRL's metrics. ``sigmoid``: -log sigmoid(beta * margin) of the log-ratio
    margin (Rafailov et al. 2023); with ``label_smoothing`` e, the conservative form that takes a share e of the
    pairs as flipped (cDPO: (1 - e) * that - e * log sigmoid(-beta * margin)); ``robust``: the unbiased form of
    the same (Chowdhury et al. 2024: divided by 1 - 2e, the flipped term subtracted); ``ipo``: (margin per
    completion token - 1 / (2 beta))^2 (Azar et al. 2023; per token as TRL does, with the authors' agreement)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * margin) + e * F.logsigmoid(-beta * margin)) / (1 - 2 * e)
    else:
        e = label_smoothing
        losses = -(1 - e) * F.logsigmoid(beta * margin) - e * F.logsigmoid(-beta * margin)
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses.mean(), _pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO's loss (Hong et al. 2024): the chosen replies' cross-entropy (over all their tokens in the batch)
    minus beta times the mean log sigmoid of the log odds ratio between the chosen and rejected replies'
    mean token log-probs. No reference model. Metrics as TRL's ORPOTrainer (rewards: beta x mean log-prob)."""
    nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)
    chosen_mean = chosen.float() / chosen_tokens.clamp(min=1)
    rejected_mean = rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    metrics = _pair_metrics(beta * chosen_mean.detach(), beta * rejected_mean.detach(), chosen_mean, rejected_mean)
    metrics.update(
        nll_loss=float(nll.detach()),
        log_odds_ratio=float(ratio.detach().mean()),
        log_odds_chosen=float(log_odds.detach().mean()),
    )
    return loss, metrics


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, float]:
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": float(chosen_logps.detach().mean()),
        "logps/rejected": float(rejected_logps.detach().mean()),
    }


# ---- GRPO: inputs are per-token log-probs of sampled completions, flat, with each token's sequence ----


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's (``batch``: the batch's)
    standard deviation with Bessel's correction + 1e-4 (``none``: not divided), as TRL's GRPOTrainer; rows
    come in groups of ``group`` consecutive completions of one prompt."""
    grouped = rewards.view(-1, group)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(group) + 1e-4)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if rewards.numel() > 1 else torch.zeros(())) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_loss(
    logps: torch.Tensor,
    sequence: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    loss_type: str = "dapo",
    beta: float = 0.0,
    reference: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    step_tokens: int | None = None,
    sampled: torch.Tensor | None = None,
    correction: str = "sequence_mask",
    correction_max: float = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate (Shao et al. 2024) with one update per sample, so the old policy is the
    current one detached (TRL's default num_iterations 1): per token -min(r A, clip(r, 1 - e, 1 + e) A), plus
    beta x the k3 estimate of KL to ``reference`` x r where beta > 0 (r is 1 but carries the gradient that
    makes it the unbiased reverse-KL gradient: DeepSeek-V3.2, TRL's default). Summed per ``loss_type`` as TRL: ``grpo``
    mean over each sequence's tokens then over sequences; ``bnpo`` over this batch's tokens; ``dr_grpo`` over
    sequences x ``max_completion_length``; ``dapo`` over ``step_tokens``, the tokens of every micro-batch of
    the optimizer step (so their sum is a mean over the step's tokens).

    ``sampled``: each token's log-probability under the model that sampled it, where that was not the policy
    (a 16-bit copy: ``phikit.train.sampler``); the policy's own over the sampler's is then an importance
    weight on each token's loss, as TRL weighs vLLM's samples: ``correction`` ``token_*`` per token,
    ``sequence_*`` one weight per completion (the product over its tokens); ``*_truncate`` caps the weight at
    ``correction_max``, ``*_mask`` zeroes weights above it; ``off``: no weight."""
    ratio = torch.exp(logps - logps.detach())
    a = advantages[sequence].to(logps.dtype)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    metrics: dict[str, float] = {}
    if sampled is not None and correction != "off":
        weights = sampling_weights(logps.detach() - sampled.to(logps.dtype), sequence, len(advantages), correction)
        if correction.endswith("truncate"):
            weights = weights.clamp(max=correction_max)
        else:
            weights = weights.masked_fill(weights > correction_max, 0.0)
        per_token = per_token * (weights[sequence] if correction.startswith("sequence") else weights)
        if len(weights):
            name = "sampling/importance_sampling_ratio"
            metrics = {f"{name}/min": float(weights.min()), f"{name}/mean": float(weights.mean())}
            metrics[f"{name}/max"] = float(weights.max())
    if beta:
        delta = reference - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl * ratio  # x ratio (1, differentiable): the unbiased reverse-KL gradient
        metrics["kl"] = float(kl.detach().mean()) if len(kl) else 0.0
    sequences = len(advantages)
    if loss_type == "grpo":
        sums = torch.zeros(sequences, dtype=per_token.dtype, device=per_token.device).index_add(0, sequence, per_token)
        counts = torch.bincount(sequence, minlength=sequences).clamp(min=1)
        loss = (sums / counts).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (sequences * max_completion_length)
    elif loss_type == "dapo" and step_tokens:
        loss = per_token.sum() / max(step_tokens, 1)
    else:  # bnpo
        loss = per_token.sum() / max(len(per_token), 1)
    return loss, metrics


def sampling_weights(difference: torch.Tensor, sequence: torch.Tensor, sequences: int, correction: str) -> torch.Tensor:
    """exp of each token's log-probability difference (policy - sampler), or (``sequence_*``) of each
    completion's summed difference, one value per completion."""
    if correction.startswith("sequence"):
        difference = difference.new_zeros(sequences).index_add(0, sequence, difference)
    return torch.exp(difference)
