"""Token-by-token generation for the endpoint: the same sampling as services.platform.ml.textgen.generate
(seeded torch.Generator, temperature, top-k, greedy at 0), one token at a time, so a response can
stream each token as it is produced and count the tokens really generated.

The GPT is loaded once per served model (`TextModel`), not once per request.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class TextModel:
    model: Any  # services.platform.ml.textgen.model.GPT, in eval mode on the CPU
    tokenizer: Any  # services.platform.ml.textgen.tokenizer.Tokenizer

    @classmethod
    def load(cls, checkpoint: bytes, config: Any, tokenizer: Any) -> TextModel:
        from services.platform.ml.textgen.model import load_model
        from services.platform.ml.textgen.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        model = load_model(checkpoint, config, "cpu")
        if model.cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
        return cls(model, tok)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt) or self.tokenizer.encode("\n")

    def tokens(
        self, prompt_ids: list[int], max_tokens: int, temperature: float, top_k: int | None, seed: int
    ) -> Iterator[int]:
        """New token ids, one at a time; stops early when the caller stops iterating."""
        import torch

        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        context = self.model.cfg.context
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        for _ in range(max_tokens):
            with torch.inference_mode():
                logits = self.model(ids[:, -context:])[0, -1].double()
                if temperature == 0:
                    nxt = int(torch.argmax(logits))
                else:
                    logits = logits / temperature
                    if top_k:
                        kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
            yield nxt
            ids = torch.cat([ids, torch.tensor([[nxt]], dtype=torch.long)], dim=1)


class TextDecoder:
    """Token ids -> text pieces; a character split across tokens comes out whole, with the later one."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.token_bytes(token))

    def end(self) -> str:
        return self.utf8.decode(b"", final=True)
