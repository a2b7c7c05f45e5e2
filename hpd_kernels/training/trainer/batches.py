"""The micro-batches of a step: which examples, whether the student writes their responses, and
how they are padded. Every random choice is a pure function of `(seed, step, micro-batch)`, so a
resumed run draws exactly the batches of an uninterrupted one."""

from __future__ import annotations

import random

import torch


def collate(examples, pad_id, device):
    """`(input_ids, loss_mask)`: prompt + response per row, right-padded; the mask covers responses."""
    width = max(len(prompt) + len(response) for prompt, response in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        tokens = list(prompt) + list(response)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        loss_mask[row, len(prompt): len(tokens)] = 1
    return input_ids.to(device), loss_mask.to(device)


def step_seed(config, step, micro, purpose):
    """A seed for one random choice of one micro-batch, a pure function of (seed, step, micro)."""
    return (config.seed * 1_000_003 + step * 7_919 + micro * 104_729 + purpose * 15_485_863) % 2_147_483_647


def draw_batch(config, student, examples, step, micro, pad_id, eos_id, device, rank=0, world=1):
    """`(input_ids, loss_mask, on_policy)` for this rank's share of one micro-batch: every rank
    draws the same global batch of `batch_size * world` examples and keeps its slice."""
    generator = torch.Generator().manual_seed(step_seed(config, step, micro, 1))
    picks = torch.randint(0, len(examples), (config.batch_size * world,), generator=generator).tolist()
    picks = picks[rank * config.batch_size:(rank + 1) * config.batch_size]
    batch = [examples[index] for index in picks]
    on_policy = random.Random(step_seed(config, step, micro, 2)).random() < config.on_policy_fraction
    if on_policy:
        from ...sampling import generate

        max_new = config.max_new_tokens or max(len(response) for _, response in examples)
        rollout = generate(student, [prompt for prompt, _ in batch], max_new_tokens=max_new, eos_id=eos_id,
                           pad_id=pad_id, temperature=config.rollout_temperature, top_p=config.rollout_top_p,
                           generator=torch.Generator(device=device).manual_seed(
                               step_seed(config, step, micro, 3) + 7_777 * rank))
        responses = rollout.sequences[:, rollout.prompt_width:].tolist()
        batch = [(prompt, response[:length]) for (prompt, _), response, length
                 in zip(batch, responses, rollout.response_lengths.tolist())]
    input_ids, loss_mask = collate(batch, pad_id, device)
    return input_ids, loss_mask, on_policy
