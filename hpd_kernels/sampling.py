"""Sampling from the student for fully on-policy batches: `generate`, batched autoregressive
rollouts with a KV cache (temperature, top-p, EOS, max new tokens; prompts of different lengths are
left-padded). HPD's approximate on-policy sample `y_hat ~ q(. | offline prefix)` needs no function
here: the loss kernels draw it in their streaming pass (`hpd_token_weights` returns it alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import output_logits


@dataclass
class Rollout:
    """`sequences`: [batch, prompt_width + new] with prompts left-padded and responses right-padded
    by `pad_id`; `attention_mask` marks real tokens; `response_lengths` counts generated tokens
    (EOS included); `prompt_width` is where responses start."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_lengths: torch.Tensor
    prompt_width: int


def _left_pad(prompts, pad_id, device):
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long, device=device)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def filter_top_p(probs, top_p):
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`; renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, eos_id=None, pad_id=0, temperature=1.0, top_p=1.0,
             generator=None, greedy=False) -> Rollout:
    """Sample continuations of `prompts` (lists of token ids) from `model` (hidden states from
    `model(input_ids, attention_mask=, cache=)`, logits from `model.lm_head`).

    A sequence stops at its first EOS (kept) or after `max_new_tokens`; finished rows are padded.
    """
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be > 0 (or pass greedy=True), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = model.lm_head.weight.device
    prompt_ids, mask = _left_pad(prompts, pad_id, device)
    batch, width = prompt_ids.shape
    cache = model.new_cache(batch, width + max_new_tokens)
    hidden = model(prompt_ids, attention_mask=mask, cache=cache)[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    generated = []
    for _ in range(max_new_tokens):
        logits = output_logits(model, hidden).float()
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = filter_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        lengths += (~finished).long()
        step_mask = (~finished).long()
        if eos_id is not None:
            finished = finished | (token == eos_id)
        mask = torch.cat([mask, step_mask[:, None]], dim=1)
        if bool(finished.all()):
            break
        hidden = model(token[:, None], attention_mask=mask, cache=cache)[:, -1]
    responses = torch.stack(generated, dim=1) if generated else prompt_ids.new_zeros((batch, 0))
    return Rollout(torch.cat([prompt_ids, responses], dim=1), mask, lengths, width)
