"""Tiny random Hugging Face models for the trainer-integration tests (built here, no downloads)."""

import torch
import transformers

VOCAB = 64


def _sharpened(model, sharpness):
    """`sharpness` scales the lm_head: a random one at the usual init is near uniform."""
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def tiny_llama(hidden=32, layers=2, vocab=VOCAB, seed=0, sharpness=1.0):
    """A random Llama."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _sharpened(transformers.LlamaForCausalLM(config), sharpness)


def tiny_gemma2(hidden, seed, softcap, sharpness=1.0, vocab=VOCAB):
    """A random Gemma 2, whose logits are `softcap * tanh(lm_head(hidden) / softcap)`."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, max_position_embeddings=64, final_logit_softcapping=softcap,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _sharpened(transformers.Gemma2ForCausalLM(config), sharpness)


def tiny_tokenizer(padding_side="right"):
    """A word-level tokenizer of `VOCAB` ids: `<pad>`, `<s>`, `</s>`, then `t3` ... `t63`."""
    import tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", padding_side=padding_side)
