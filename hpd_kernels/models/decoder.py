"""A small decoder-only transformer in plain PyTorch, for the trainer's built-in task and tests.

Pre-norm blocks (RMSNorm), rotary positions, causal self-attention through
`scaled_dot_product_attention`, a SwiGLU MLP, and a KV cache for generation. `forward` returns the
final hidden states; the lm_head is a separate `nn.Linear` (`model.lm_head`), so that the
distillation losses can take hidden states and weights (fused-linear) and the `[tokens, vocab]`
logits never exist during training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    vocab_size: int = 64
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.75
    max_positions: int = 512
    rope_base: float = 10000.0
    tie_embeddings: bool = False

    def to_dict(self):
        return asdict(self)

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must split into num_heads ({self.num_heads}) "
                             f"heads of even size")


class RMSNorm(nn.Module):
    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden):
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return (hidden.float() * torch.rsqrt(variance + self.eps)).to(hidden.dtype) * self.weight


def _rotary_tables(head_size, max_positions, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin):
    """Rotary embedding on [batch, heads, seq, head_size] with tables [batch or 1, seq, head_size/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class KVCache:
    """Keys and values per layer, preallocated for `max_length` positions."""

    def __init__(self, config: DecoderConfig, batch_size: int, max_length: int, device, dtype):
        head_size = config.hidden_size // config.num_heads
        shape = (batch_size, config.num_heads, max_length, head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0

    def append(self, layer, keys, values):
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Block(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.attention_norm = RMSNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(config.hidden_size)
        inner = int(config.hidden_size * config.mlp_ratio)
        self.gate_up = nn.Linear(config.hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, attention_bias, cache=None, layer=0):
        batch, seq, size = hidden.shape
        q, k, v = self.qkv(self.attention_norm(hidden)).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(batch, seq, size))
        gate, up = self.gate_up(self.mlp_norm(hidden)).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)


class DecoderLM(nn.Module):
    """`forward(input_ids) -> hidden states [batch, seq, hidden]`; `lm_head` maps them to logits."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = _rotary_tables(config.hidden_size // config.num_heads, config.max_positions, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Hidden states for `input_ids` [batch, seq].

        `attention_mask` [batch, past + seq] (1 = real token) handles left padding; `position_ids`
        default to the count of real tokens before each position; with `cache`, the new keys and
        values are appended and attention covers the cached prefix.
        """
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if int(position_ids.max()) >= self.config.max_positions if position_ids.numel() else False:
            raise ValueError(f"sequence longer than max_positions={self.config.max_positions}")
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        # Causal over the cached prefix plus the new tokens, and no attention to padding.
        key_positions = torch.arange(past + seq, device=input_ids.device)
        query_positions = torch.arange(past, past + seq, device=input_ids.device)
        allowed = (key_positions[None, :] <= query_positions[:, None])[None] & attention_mask.bool()[:, None, :]
        # A padding query (left padding) would attend to nothing and give NaN: let it see itself.
        allowed = allowed | (key_positions[None, :] == query_positions[:, None])[None]
        # A boolean mask is valid for queries of any dtype (fp32, or bf16 under autocast).
        attention_bias = allowed[:, None]
        hidden = self.embed(input_ids)
        for layer, block in enumerate(self.blocks):
            hidden = block(hidden, cos, sin, attention_bias, cache, layer)
        if cache is not None:
            cache.length += seq
        return self.norm(hidden)

    def new_cache(self, batch_size, max_length):
        return KVCache(self.config, batch_size, max_length, self.embed.weight.device, self.embed.weight.dtype)
