"""The embedded default task: multi-step addition with worked solutions, made in code.

A prompt is a sum such as `17+4+9=`; a response works it out one partial sum per step and ends
with the answer after `#`, then EOS. With `orders="two"` each problem has two valid worked
solutions (left to right, or right to left), so a teacher trained on both is bimodal at the first
token only. With `orders="any"` the terms are added in a uniformly random order: at every step any
remaining term may come next (24 solutions of a 4-term sum), so the data are multi-modal at every
step, and a model must track which terms are left. Character-level tokenizer; the metric is exact
match of the final answer, whatever the order.
"""

from __future__ import annotations

import random

from .data import EOS, PAD, CharTokenizer  # noqa: F401  (the task's special ids)

ALPHABET = "0123456789+=;#"


def task_tokenizer():
    return CharTokenizer(ALPHABET)


ORDERS = ("two", "any")  # the task's `orders`: see the module's docstring


def worked_solution(terms, reverse=False):
    """`a+b=s1;s1+c=s2;...#answer` accumulating `terms` left to right (or right to left)."""
    order = list(reversed(terms)) if reverse else list(terms)
    steps, total = [], order[0]
    for term in order[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return ";".join(steps) + f"#{total}"


def make_problems(count, seed, min_terms=3, max_terms=4, max_value=20, orders="two"):
    """(prompt, response, answer) triples; each response takes one of the valid orders at random
    (`orders`: "two", left to right or right to left; "any", a uniformly random permutation)."""
    if orders not in ORDERS:
        raise ValueError(f"orders must be one of {ORDERS}, got {orders!r}")
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        terms = [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        prompt = "+".join(map(str, terms)) + "="
        if orders == "two":
            response = worked_solution(terms, reverse=rng.random() < 0.5)
        else:
            response = worked_solution(rng.sample(terms, len(terms)))
        problems.append((prompt, response, sum(terms)))
    return problems


def final_answer(text):
    """The integer after the last `#`, or None when the response has none."""
    if "#" not in text:
        return None
    digits = text.rsplit("#", 1)[1]
    return int(digits) if digits.isdigit() else None


def encode_examples(problems, tokenizer):
    return [(tokenizer.encode(prompt, prompt=True), tokenizer.encode(response) + [tokenizer.eos_id])
            for prompt, response, _ in problems]


def answer_accuracy(model, problems, tokenizer, *, greedy=True, temperature=1.0, top_p=1.0, max_new_tokens=40,
                    seed=0, batch_size=256, score=None):
    """Fraction of `problems` (prompt, response, answer) solved, greedy or sampled (at
    `temperature`, from the nucleus of mass `top_p`). By default a response is right when its final
    answer (after `#`) equals `answer`; `score(text, problem)` replaces that rule."""
    import torch

    from ..sampling import generate

    score = score or (lambda text, problem: final_answer(text) == problem[2])
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    correct = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rollout = generate(model, [tokenizer.encode(problem[0], prompt=True) for problem in chunk],
                           max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           temperature=temperature, top_p=top_p, greedy=greedy, generator=generator)
        responses = rollout.sequences[:, rollout.prompt_width:].tolist()
        for problem, response in zip(chunk, responses):
            correct += bool(score(tokenizer.decode(response), problem))
    model.train(was_training)
    return correct / max(1, len(problems))
