"""A small decoder-only transformer (GPT-style) and its safetensors checkpoint.

Token + learned position embeddings, `n_layers` pre-norm blocks (LayerNorm -> causal
self-attention via `F.scaled_dot_product_attention` -> residual; LayerNorm -> GELU MLP ->
residual), a final LayerNorm, and an output head tied to the token embedding (logits =
h @ E^T, so the head has no weights of its own and the checkpoint stores E once).

The configuration is a frozen dataclass that round-trips through JSON (`GPTConfig.to_json`,
`GPTConfig.from_json`); a checkpoint is a safetensors file of the `state_dict` (float32).
Loading never unpickles: `torch.load` is not used anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

CHECKPOINT_FORMAT = "cairn.gpt.v1"


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.vocab_size, self.context, self.d_model, self.n_layers, self.n_heads, self.mlp_ratio) < 1:
            raise ValueError(f"invalid GPT config {self}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring keys that are not model fields (training settings)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, s: str | bytes | dict | GPTConfig) -> GPTConfig:
        if isinstance(s, GPTConfig):
            return s
        return cls.from_dict(s if isinstance(s, dict) else json.loads(s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps({"format": CHECKPOINT_FORMAT, **asdict(self)}, sort_keys=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", ".out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(batch, time) token ids -> (batch, time, vocab) logits."""
        t = idx.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.cfg.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)  # tied head


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats), computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def n_params(cfg: GPTConfig, include_position: bool = True) -> int:
    """Parameter count (the tied head adds none)."""
    d, v, L, m = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.mlp_ratio
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d * d + m * d) + (m * d * d + d)
    total = v * d + L * per_block + 2 * d
    return total + (cfg.context * d if include_position else 0)


def train_flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 * N + 12 * n_layers * d_model * seq_len (PaLM, appendix B).

    N counts every parameter that takes part in a matrix multiply, so the tied embedding is
    counted once (it is the output head's matmul) and position embeddings (a lookup) are not.
    The attention term is the QK^T and AV matmuls, forward and backward, without the causal
    halving (as PaLM counts it, so MFU figures compare with published ones).
    """
    t = cfg.context if seq_len is None else seq_len
    return 6.0 * n_params(cfg, include_position=False) + 12.0 * cfg.n_layers * cfg.d_model * t


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A GPT state_dict (any device/dtype) -> safetensors bytes (float32, CPU)."""
    import safetensors.torch

    out = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    return bytes(safetensors.torch.save(out, metadata={"format": CHECKPOINT_FORMAT}))


def load_model(checkpoint: bytes, config: str | bytes | dict | GPTConfig, device: str = "cpu") -> GPT:
    """safetensors bytes + config -> a GPT in eval mode on `device` (strict key/shape check)."""
    import safetensors.torch

    cfg = GPTConfig.from_json(config)
    with torch.device("meta"):  # no init work and no use of the global RNG: weights come from the file
        model = GPT(cfg)
    state = safetensors.torch.load(bytes(checkpoint))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
