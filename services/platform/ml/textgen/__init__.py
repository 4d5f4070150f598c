"""Text generation as pure functions: tokenizer, a small GPT, training, sampling.

- `tokenizer`: byte-level base + trained BPE (`train_bpe`, `encode`, `decode`), corpus checks.
- `model`: `GPTConfig` (JSON), `GPT`, safetensors checkpoints, FLOPs per token.
- `train`: `train_lm` -> `LMResult(checkpoint, config_json, metrics)`, token shards,
  `perplexity`.
- `generate`: `generate(checkpoint, config, tokenizer, prompt, max_tokens, temperature,
  top_k, seed) -> str`.

Every artifact is bytes or JSON (no pickle), so each is content-addressed by
`services.platform.artifacts.ArtifactStore`. torch is imported by `model`, `train` and `generate`
only; `tokenizer` needs numpy alone.
"""
