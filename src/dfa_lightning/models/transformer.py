"""Decoder-only (GPT-style) Transformer language model with named DFA feedback points.

Follows the DFA paper's LM (Launay et al., 2020, §2.5 of ``reference/paper.md``): 6 blocks, 8 heads, d_model 512,
FFN 2048 with ReLU, **post-LN**, dropout 0.1, sinusoidal positions, embedding scaled by √d_model, untied decoder,
embedding and decoder initialised U(−0.1, 0.1). Layout and shape comments in the style of nanoGPT.

Feedback points (each a module whose forward output is one Tensor ``[B, T, C]``; a glob matches only these, never a
child, under ``fnmatch`` on ``model.named_modules()``):

- ``blocks.{i}.attn_out``: attention sub-layer output after residual (+ LN in post-LN): ``[B, T, d_model]``.
- ``blocks.{i}.ffn.act``: FFN hidden activation after dropout: ``[B, T, d_ff]``.
- ``blocks.{i}.out``: block output (after ``ln_2`` in post-LN): ``[B, T, d_model]``; identical to ``blocks.{i}``'s
  output (the block returns it), but a glob on the block itself would also match its children.
- ``hidden_out``: last hidden state, the input of ``decoder``: ``[B, T, d_model]`` (the paper's DFA output).

The residual stream only passes through these modules' outputs (the next sub-layer reads the marker's output), so a
forward hook that replaces an output with a detached copy cuts every path, residual included. The embedding has no
point of its own: it trains by BP from the first point above it, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dfa_lightning.errors import ConfigError

#: Feedback-point globs. "macro": one point per block (its output); "micro": 3 per block (paper's ``--dfa full``).
FEEDBACK_POINTS: dict[str, list[str]] = {
    "macro": ["blocks.*.out"],
    "micro": ["blocks.*.attn_out", "blocks.*.ffn.act", "blocks.*.out"],
}
#: Where the DFA error e is taken: before the vocabulary (paper default, e = W_decᵀ(softmax − onehot)/N) or after
#: it (``None``: the model output itself, the logits).
ERROR_AT: dict[str, str | None] = {"before_vocab": "hidden_out", "after_vocab": None}


class SinusoidalPositions(nn.Module):
    """Adds the fixed sinusoidal encoding of Vaswani et al. (2017). Shapes: ``[B, T, C]`` → ``[B, T, C]``."""

    pe: Tensor

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)  # [L, 1]
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))  # [ceil(C/2)]
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)  # [L, C], rebuilt, not checkpointed

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pe[: x.size(1)].to(x.dtype)


class LearnedPositions(nn.Module):
    """Adds a learned position embedding (GPT-2). Shapes: ``[B, T, C]`` → ``[B, T, C]``."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_len, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.emb(torch.arange(x.size(1), device=x.device))  # [T, C] broadcast over B


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``F.scaled_dot_product_attention(is_causal=True)``.

    Dropout on the attention weights and on the output projection (as ``nn.TransformerEncoderLayer``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"TransformerLM: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hs]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: [B, T, C]
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """``drop(proj(act(fc(x))))`` where ``act`` = activation + dropout, the micro-DFA point ``[B, T, d_ff]``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ConfigError(f"TransformerLM: activation must be one of {sorted(acts)}, got {activation!r}")
        self.fc = nn.Linear(d_model, d_ff)
        self.act = nn.Sequential(acts[activation](), nn.Dropout(dropout))
        self.proj = nn.Linear(d_ff, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.resid_drop(self.proj(self.act(self.fc(x))))  # [B, T, C] -> [B, T, d_ff] -> [B, T, C]


class Block(nn.Module):
    """One Transformer block; ``attn_out`` and ``out`` are identity markers naming the two residual-stream points.

    post-LN: ``a = LN1(x + Attn(x)); y = LN2(a + FFN(a))``; pre-LN: ``a = x + Attn(LN1(x)); y = a + FFN(LN2(a))``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, activation: str, norm: str):
        super().__init__()
        self.pre_ln = norm == "pre"
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.attn_out = nn.Identity()
        self.ln_2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        if self.pre_ln:
            a = self.attn_out(x + self.attn(self.ln_1(x)))
            return self.out(a + self.ffn(self.ln_2(a)))
        a = self.attn_out(self.ln_1(x + self.attn(x)))
        return self.out(self.ln_2(a + self.ffn(a)))


class TransformerLM(nn.Module):
    r"""GPT-style causal language model: ``idx [B, T]`` → ``logits [B, T, vocab_size]``.

    ``h_0 = drop(pos(√d · E[idx]))``; ``h_i = blocks.i(h_{i-1})``; ``logits = decoder(hidden_out(ln_f(h_N)))``.

    Args:
        vocab_size (int): number of tokens V.
        d_model (int, optional): residual width C. (default: ``512``)
        n_heads (int, optional): attention heads. (default: ``8``)
        d_ff (int, optional): FFN hidden width. (default: ``2048``)
        n_layers (int, optional): number of blocks. (default: ``6``)
        dropout (float, optional): dropout after embedding, on attention weights, FFN hidden and both sub-layer
            outputs. (default: ``0.1``)
        max_len (int, optional): longest sequence T. (default: ``1024``)
        norm (str, optional): ``"post"`` (paper) or ``"pre"`` (GPT-2; adds a final ``ln_f``). (default: ``"post"``)
        pos_encoding (str, optional): ``"sinusoidal"`` (paper) or ``"learned"``. (default: ``"sinusoidal"``)
        activation (str, optional): FFN non-linearity, ``"relu"`` (paper) or ``"gelu"``. (default: ``"relu"``)
        tie_embeddings (bool, optional): share the token embedding with the decoder weight. (default: ``False``)

    Shapes:
        input ``LongTensor[B, T]`` with ``T <= max_len`` → output ``[B, T, V]``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 2048,
        n_layers: int = 6,
        dropout: float = 0.1,
        max_len: int = 1024,
        norm: str = "post",
        pos_encoding: str = "sinusoidal",
        activation: str = "relu",
        tie_embeddings: bool = False,
    ):
        super().__init__()
        if norm not in ("post", "pre"):
            raise ConfigError(f"TransformerLM: norm must be 'post' or 'pre', got {norm!r}")
        positions = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions}
        if pos_encoding not in positions:
            raise ConfigError(f"TransformerLM: pos_encoding must be one of {sorted(positions)}, got {pos_encoding!r}")
        self.d_model, self.max_len = d_model, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos = positions[pos_encoding](d_model, max_len)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout, activation, norm) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.hidden_out = nn.Identity()
        self.decoder = nn.Linear(d_model, vocab_size)
        # paper (PyTorch word_language_model): embedding and decoder U(-0.1, 0.1), decoder bias 0
        nn.init.uniform_(self.tok_emb.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_embeddings:
            self.decoder.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        if T > self.max_len:
            raise ValueError(f"TransformerLM: sequence length {T} exceeds max_len {self.max_len}")
        x = self.drop(self.pos(self.tok_emb(idx) * math.sqrt(self.d_model)))  # [B, T, C]
        for block in self.blocks:
            x = block(x)  # [B, T, C]
        x = self.hidden_out(self.ln_f(x))  # [B, T, C]
        return self.decoder(x)  # [B, T, V]
