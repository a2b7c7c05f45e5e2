"""A toy training problem shared by the trainer's tests: prompts of random tokens, responses that
double them (mod the vocabulary) and end with EOS, and a tiny decoder."""

import torch

from hpd_kernels.models import DecoderConfig, DecoderLM

VOCAB, EOS = 11, 2


def toy_examples(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=generator)),),
                               generator=generator).tolist()
        examples.append((prompt, [(token * 2) % (VOCAB - 3) + 3 for token in prompt] + [EOS]))
    return examples


def toy_model(hidden, seed):
    torch.manual_seed(seed)
    return DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=1, num_heads=2, max_positions=32))
