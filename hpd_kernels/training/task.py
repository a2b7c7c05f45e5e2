"""The embedded default task: multi-step addition with worked solutions, made in code.

A prompt is a sum such as `17+4+9=`; a response works it out one partial sum per step and ends
with the answer after `#`, then EOS. Each problem has two valid worked solutions (left to right,
or right to left), so a teacher trained on both is bimodal: mode covering versus mode seeking
matters. Character-level tokenizer; the metric is exact match of the final answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAD, EOS = 0, 1
ALPHABET = "0123456789+=;#"


@dataclass(frozen=True)
class CharTokenizer:
    alphabet: str = ALPHABET

    @property
    def vocab_size(self):
        return len(self.alphabet) + 2

    def encode(self, text):
        unknown = set(text) - set(self.alphabet)
        if unknown:
            raise ValueError(f"characters outside the tokenizer's alphabet: {sorted(unknown)}")
        return [self.alphabet.index(char) + 2 for char in text]

    def decode(self, ids):
        chars = []
        for token in ids:
            if token == EOS:
                break
            if token >= 2:
                chars.append(self.alphabet[token - 2])
        return "".join(chars)


def worked_solution(terms, reverse=False):
    """`a+b=s1;s1+c=s2;...#answer` accumulating left to right (or right to left)."""
    order = list(reversed(terms)) if reverse else list(terms)
    steps, total = [], order[0]
    for term in order[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return ";".join(steps) + f"#{total}"


def make_problems(count, seed, min_terms=3, max_terms=4, max_value=20):
    """(prompt, response, answer) triples; responses alternate between the two solution orders."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        terms = [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        prompt = "+".join(map(str, terms)) + "="
        problems.append((prompt, worked_solution(terms, reverse=rng.random() < 0.5), sum(terms)))
    return problems


def final_answer(text):
    """The integer after the last `#`, or None when the response has none."""
    if "#" not in text:
        return None
    digits = text.rsplit("#", 1)[1]
    return int(digits) if digits.isdigit() else None


def encode_examples(problems, tokenizer):
    return [(tokenizer.encode(prompt), tokenizer.encode(response) + [EOS]) for prompt, response, _ in problems]


def answer_accuracy(model, problems, tokenizer, *, greedy=True, temperature=1.0, max_new_tokens=40, seed=0,
                    batch_size=128):
    """Exact-match accuracy of the final answer over `problems`, greedy or sampled."""
    import torch

    from ..sampling import generate

    generator = torch.Generator().manual_seed(seed)
    correct = 0
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rollout = generate(model, [tokenizer.encode(prompt) for prompt, _, _ in chunk], max_new_tokens=max_new_tokens,
                           eos_id=EOS, pad_id=PAD, temperature=temperature, greedy=greedy, generator=generator)
        for row, (_, _, answer) in enumerate(chunk):
            text = tokenizer.decode(rollout.sequences[row, rollout.prompt_width:].tolist())
            correct += final_answer(text) == answer
    model.train()
    return correct / max(1, len(problems))
