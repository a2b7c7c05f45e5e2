"""The distillation set of the recipe's data regime: one response sampled from the teacher for
every training prompt (sequence-level KD's data), cached on disk like the teacher.

The samples are drawn in one CPU thread (or on the device as given), in fixed batches from one
seeded generator, so the same teacher weights give the same set on every machine of one CPU
architecture; the set's sha256 is recorded so that a rerun can tell. A sample is kept as the
teacher wrote it, right or wrong (SeqKD does not filter), ending at its EOS or, if it reached
`max_new_tokens` first, there.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

import torch

from ...sampling import generate
from ..jsonfiles import write_json_atomic
from ..locks import lock_directory

BATCH = 500  # prompts per generation batch: part of what fixes the draws


@contextmanager
def one_thread():
    """CPU work in one thread: its float reductions, hence its samples, do not depend on the
    machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weights_sha256(model):
    """The sha256 of a model's parameters and buffers (names, shapes and float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def examples_digest(examples):
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()


def sample_teacher_data(teacher, examples, tokenizer, *, seed, temperature=1.0, max_new_tokens):
    """`[(prompt ids, sampled response ids)]`: one response per prompt of `examples`."""
    device = teacher.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    with one_thread():
        for start in range(0, len(examples), BATCH):
            prompts = [prompt for prompt, _ in examples[start:start + BATCH]]
            rollout = generate(teacher, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, temperature=temperature, generator=generator)
            responses = rollout.sequences[:, rollout.prompt_width:]
            for prompt, response, length in zip(prompts, responses.tolist(), rollout.response_lengths.tolist()):
                samples.append((list(prompt), response[:length]))
    return samples


ENTROPY_SAMPLES = 2000  # the first samples of a set that its teacher's entropy is measured on


def teacher_data_file(experiment, temperature):
    """The report's file describing the teacher's samples at `temperature`: `teacher_data.json` for
    the experiment's own temperature, `teacher_data_T<t>.json` for an arm's other one."""
    return ("teacher_data.json" if temperature == experiment["teacher_data"]["temperature"]
            else f"teacher_data_T{temperature:g}.json")


def teacher_entropy_on(teacher, samples, tokenizer, limit=ENTROPY_SAMPLES):
    """The teacher's mean next-token entropy (nats per response token, T = 1) on the responses of
    the first `limit` of its own `samples`: the diversity a distilled student is held against."""
    from ...models import logit_map
    from ..criteria import shifted_labels, token_statistics
    from ..trainer.batches import collate

    device = teacher.lm_head.weight.device
    total, count = 0.0, 0
    with torch.no_grad(), one_thread():
        for start in range(0, min(limit, len(samples)), BATCH):
            batch = samples[start:min(limit, start + BATCH)]
            input_ids, loss_mask = collate(batch, tokenizer.pad_id, device)
            labels = shifted_labels(input_ids, loss_mask)
            hidden = teacher(input_ids, attention_mask=(input_ids != tokenizer.pad_id).long() | loss_mask)
            tokens = int((labels != -100).sum())
            entropy, _ = token_statistics(hidden, teacher.lm_head.weight, labels, logit_map=logit_map(teacher))
            total, count = total + float(entropy) * tokens, count + tokens
    return total / max(1, count)


def teacher_data(teacher, workload, cache_dir, *, seed, temperature, max_new_tokens, log=None):
    """`(samples, info)`: the teacher's samples for the workload's training prompts, read from
    `cache_dir` or drawn and cached there (keyed by the teacher's weights, the prompts and the
    sampling settings); `info` has the set's sha256 and what it was drawn with."""
    identity = {"teacher_sha256": weights_sha256(teacher), "prompts_sha256": examples_digest(
        [prompt for prompt, _ in workload.examples]), "seed": seed, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "batch": BATCH, "format": 1}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"teacher-samples-{key}")
    path = os.path.join(folder, "samples.json")
    with lock_directory(folder, wait=True, command="teacher sampling"):
        if os.path.isfile(path):
            with open(path) as handle:
                stored = json.load(handle)
            samples = [tuple(pair) for pair in stored["samples"]]
            if examples_digest(stored["samples"]) != stored["info"]["samples_sha256"]:
                raise ValueError(f"{path} does not match its recorded sha256; delete {folder} to draw it again")
            return samples, stored["info"]
        if log:
            log(f"teacher data: sampling {len(workload.examples)} responses (T={temperature:g}), cached in {folder}")
        samples = sample_teacher_data(teacher, workload.examples, workload.tokenizer, seed=seed,
                                      temperature=temperature, max_new_tokens=max_new_tokens)
        info = {**identity, "samples": len(samples),
                "samples_sha256": examples_digest([list(map(list, pair)) for pair in samples])}
        write_json_atomic(path, {"info": info, "samples": samples}, indent=None)
    return samples, info
