"""Sampling text from a checkpoint: seeded, with temperature and top-k; safetensors only.

`generate(checkpoint, config, tokenizer, prompt, max_tokens, temperature, top_k, seed)` is a
pure function: the same arguments give the same text on the same hardware and versions.
Sampling draws from a `torch.Generator` seeded by `seed` (CPU, float64 probabilities), so it
never touches or depends on the global RNG. `temperature == 0` is greedy decoding (ties go to
the lowest id); `top_k` keeps the k most likely tokens before sampling.
"""

from __future__ import annotations

from typing import Any

import torch

from services.platform.ml.placement import resolve_device, torch_runtime
from services.platform.ml.textgen.model import GPT, GPTConfig, load_model
from services.platform.ml.textgen.tokenizer import Tokenizer, load_tokenizer


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Exactly `max_tokens` new ids after `prompt_ids` (the prompt is not included).

    The model sees at most its last `context` tokens. `prompt_ids` must be non-empty.
    """
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k is not None and top_k < 0:
        raise ValueError("top_k must be >= 0 (0 or None: no filtering)")
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    device = next(model.parameters()).device
    context = model.cfg.context
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out: list[int] = []
    model.eval()
    for _ in range(max_tokens):
        logits = model(ids[:, -context:])[0, -1].double().cpu()
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k:
                k = min(int(top_k), logits.numel())
                kth = torch.topk(logits, k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
    return out


def generate(
    checkpoint_bytes: bytes,
    config: str | bytes | dict[str, Any] | GPTConfig,
    tokenizer: str | bytes | dict[str, Any] | Tokenizer,
    prompt: str,
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str | None = "cpu",
    cpu_threads: int | None = 1,
) -> str:
    """The continuation of `prompt` (prompt not included): `max_tokens` tokens, decoded.

    An empty prompt starts from a newline. Bytes cut mid-character decode as U+FFFD.
    """
    tok = load_tokenizer(tokenizer)
    dev = resolve_device(device)
    with torch_runtime(dev, seed, deterministic=True, cpu_threads=cpu_threads):
        model = load_model(checkpoint_bytes, config, dev)
        if model.cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
        prompt_ids = tok.encode(prompt) or tok.encode("\n")
        ids = generate_ids(model, prompt_ids, max_tokens, temperature, top_k, seed)
    return tok.decode(ids)
