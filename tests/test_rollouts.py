"""The built-in decoder and the batched rollout sampler (groundwork of the trainer)."""

import torch
from scipy import stats

from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.sampling import filter_top_p, generate


def _model(vocab=7, seed=0):
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=2, max_positions=64))
    with torch.no_grad():  # sharper than the 0.02 init, so that EOS and the modes actually occur
        model.lm_head.weight.mul_(60)
    return model.eval()


def test_kv_cache_and_left_padding_do_not_change_hidden_states():
    model = _model().double()
    ids = torch.randint(0, 7, (2, 9))
    full = model(ids)
    cache = model.new_cache(2, 16)
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:7], cache=cache), model(ids[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-12, atol=1e-12)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], full, rtol=1e-12, atol=1e-12)


def test_rollout_tokens_follow_the_model_distribution():
    model = _model()
    prompt = [3, 5, 1]
    with torch.no_grad():
        logits = model.lm_head(model(torch.tensor([prompt]))[:, -1])[0].double()
    temperature, draws = 1.7, 4000
    probs = torch.softmax(logits / temperature, -1)
    rollout = generate(model, [prompt] * draws, max_new_tokens=1, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(rollout.sequences[:, -1], minlength=7).double()
    assert stats.chisquare(counts.numpy(), (probs * draws).numpy()).pvalue > 1e-3
    # The same data rejects a wrong temperature: the check has power.
    wrong = torch.softmax(logits, -1) * draws
    assert stats.chisquare(counts.numpy(), wrong.numpy()).pvalue < 1e-6


def test_rollouts_respect_eos_and_max_length():
    model, eos, pad = _model(seed=1), 2, 0
    prompts = [[1, 3], [4], [5, 6, 3, 1], [6]] * 8
    rollout = generate(model, prompts, max_new_tokens=12, eos_id=eos, pad_id=pad,
                       generator=torch.Generator().manual_seed(1))
    responses = rollout.sequences[:, rollout.prompt_width:]
    assert responses.shape[1] <= 12
    saw_eos = 0
    for row, length in zip(responses, rollout.response_lengths.tolist()):
        hits = (row == eos).nonzero()
        if len(hits):
            saw_eos += 1
            assert length == int(hits[0]) + 1  # stops at the first EOS, which is kept
            assert (row[length:] == pad).all()
        else:
            assert length == responses.shape[1] == 12
    assert saw_eos > 0
    # The mask marks exactly the real prompt and response tokens.
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    assert torch.equal(rollout.attention_mask.sum(1), prompt_lengths + rollout.response_lengths)


def test_greedy_rollout_is_the_same_alone_or_left_padded_in_a_batch():
    model = _model(seed=2).double()
    prompts = [[1, 2, 3, 4, 5], [6], [3, 3]]
    batched = generate(model, prompts, max_new_tokens=6, greedy=True)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=6, greedy=True)
        assert torch.equal(alone.sequences[0, alone.prompt_width:], batched.sequences[row, batched.prompt_width:])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(filter_top_p(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(filter_top_p(probs, 0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(filter_top_p(probs, 1.0), probs)
