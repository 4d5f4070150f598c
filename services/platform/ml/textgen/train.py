"""Language-model training as a pure function, plus token shards and perplexity.

`train_lm(tokens, config, seed, budget_steps, device, eval_every)` trains a `GPT` on a token
array (or a list of token shards) and returns the best checkpoint as safetensors bytes, the
model config JSON, and metrics. It needs no NATS and no MLflow: a Dask task can run it.

- Data: the last `valid_fraction` of the tokens is the validation split (contiguous, so no
  window straddles both), unless `valid_tokens` is given. Training windows of `context + 1`
  tokens start at offsets drawn from a `torch.Generator` seeded by `seed`; validation uses
  fixed non-overlapping windows (at most `eval_windows` of them), so every evaluation scores
  the same tokens.
- Optimiser: AdamW (decay on matrices only), linear warm-up then cosine decay to
  `min_lr_ratio * learning_rate` at `budget_steps`, gradient clipping.
- Early stopping: evaluated at step 0, every `eval_every` steps and at the end; stops after
  `patience` evaluations without improvement, or when `target_loss` is reached. The
  checkpoint is the best evaluation's weights.
- Precision: bf16 autocast on CUDA (weights, optimiser state and loss in float32); float32
  on CPU.
- Determinism: under `placement.torch_runtime` (seeded, deterministic algorithms, one CPU
  thread by default), the same tokens, config, seed and budget give a bit-identical
  checkpoint on the same hardware and library versions (tested on CPU). `max_seconds` is
  for benchmarks: a wall-clock stop makes the stopping step depend on machine speed.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.platform.ml.placement import resolve_device, torch_runtime
from services.platform.ml.textgen.model import (
    GPT,
    GPTConfig,
    load_model,
    loss_fn,
    n_params,
    state_to_bytes,
    train_flops_per_token,
)

#: Training settings that may appear in `config` next to the `GPTConfig` fields.
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "learning_rate": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    "patience": 5,
    "min_delta": 0.0,
    "eval_windows": 64,
}

SHARD_MAGIC = b"CTOK"
SHARD_VERSION = 1
_SHARD_HEADER = struct.Struct("<4sBBxxQ")  # magic, version, itemsize, pad, count: 16 bytes


# --------------------------------------------------------------------------- token shards


def shard_tokens(tokens: np.ndarray, shard_size: int = 1 << 20) -> list[bytes]:
    """Split a token array into self-describing shards of at most `shard_size` tokens.

    Each shard: a 16-byte header (b"CTOK", version 1, item size 2 or 4, token count as
    little-endian u64) then the ids as little-endian uint16 (vocabularies up to 65,536) or
    uint32. Deterministic bytes: content-address them in the artifact store.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
        raise ValueError("token ids must be in [0, 2**32)")
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    dtype = np.dtype("<u2") if arr.size == 0 or arr.max() < 1 << 16 else np.dtype("<u4")
    out = []
    for start in range(0, max(arr.size, 1), shard_size):
        part = arr[start : start + shard_size].astype(dtype)
        out.append(_SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, part.size) + part.tobytes())
    return out


def load_shard(data: bytes) -> np.ndarray:
    """One shard's bytes -> its token ids (uint16 or uint32 array); checks the header and size."""
    if len(data) < _SHARD_HEADER.size:
        raise ValueError("token shard too short")
    magic, version, itemsize, count = _SHARD_HEADER.unpack_from(data)
    if magic != SHARD_MAGIC or version != SHARD_VERSION or itemsize not in (2, 4):
        raise ValueError("not a cairn token shard (bad magic, version or item size)")
    if len(data) != _SHARD_HEADER.size + count * itemsize:
        raise ValueError(f"token shard size mismatch: header says {count} tokens of {itemsize} bytes")
    return np.frombuffer(
        data, dtype="<u2" if itemsize == 2 else "<u4", count=count, offset=_SHARD_HEADER.size
    )


def join_shards(shards: Sequence[bytes]) -> np.ndarray:
    """Shards in order -> one token array (int64)."""
    parts = [load_shard(s).astype(np.int64) for s in shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _as_tokens(tokens: np.ndarray | Sequence[bytes]) -> np.ndarray:
    if isinstance(tokens, list | tuple) and tokens and isinstance(tokens[0], bytes | bytearray | memoryview):
        return join_shards([bytes(s) for s in tokens])
    return np.asarray(tokens, dtype=np.int64)


def split_tokens(tokens: np.ndarray, valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: the first `1 - valid_fraction` for training, the tail for validation."""
    if not 0 < valid_fraction < 1:
        raise ValueError("valid_fraction must be in (0, 1)")
    cut = int(round(len(tokens) * (1 - valid_fraction)))
    return tokens[:cut], tokens[cut:]


def split_config(config: dict[str, Any]) -> tuple[GPTConfig, dict[str, Any]]:
    """A flat config dict -> (model config, training settings with defaults filled in)."""
    model_keys = set(GPTConfig.__dataclass_fields__)
    unknown = set(config) - model_keys - set(TRAIN_DEFAULTS) - {"format"}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    train = {**TRAIN_DEFAULTS, **{k: v for k, v in config.items() if k in TRAIN_DEFAULTS}}
    return GPTConfig.from_dict(config), train


# --------------------------------------------------------------------------- evaluation


def _windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"need at least {seq_len + 1} tokens to evaluate, got {len(tokens)}")
    idx = torch.arange(n, device=tokens.device)[:, None] * seq_len + torch.arange(
        seq_len + 1, device=tokens.device
    )
    return tokens[idx]


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, cuda: bool) -> float:
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    count = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(w[:, :-1])
        total += loss_fn(logits, w[:, 1:]).double() * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was_training)
    return float(total) / count


def perplexity(
    checkpoint: bytes,
    config: str | bytes | dict | GPTConfig,
    tokens: np.ndarray | Sequence[bytes],
    device: str | None = None,
    batch_size: int = 16,
    max_windows: int | None = None,
) -> float:
    """exp(mean next-token loss) over non-overlapping context-length windows of `tokens`."""
    dev = resolve_device(device)
    model = load_model(checkpoint, config, dev)
    data = torch.from_numpy(_as_tokens(tokens)).to(dev)
    windows = _windows(data, min(model.cfg.context, len(data) - 1), max_windows)
    return math.exp(_mean_loss(model, windows, batch_size, dev.startswith("cuda")))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LMResult:
    checkpoint: bytes  # safetensors, float32 weights of the best evaluation
    config_json: str  # GPTConfig JSON: what `load_model` / `generate` need
    metrics: dict[str, Any] = field(default_factory=dict)


def _lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(
    tokens: np.ndarray | Sequence[bytes],
    config: dict[str, Any],
    seed: int,
    budget_steps: int,
    device: str | None = None,
    eval_every: int = 50,
    *,
    valid_tokens: np.ndarray | Sequence[bytes] | None = None,
    valid_fraction: float = 0.1,
    target_loss: float | None = None,
    max_seconds: float | None = None,
    deterministic: bool = True,
    cpu_threads: int | None = 1,
    compile_model: bool = False,
) -> LMResult:
    """Train a GPT; returns `LMResult(checkpoint, config_json, metrics)`.

    `config`: `GPTConfig` fields (vocab_size, context, d_model, n_layers, n_heads, mlp_ratio,
    dropout) plus any of `TRAIN_DEFAULTS`. `tokens`: an int array or a list of shard bytes.
    metrics: steps, best_step, train_loss (mean over the last evaluation interval), val_loss
    (best), val_perplexity, initial_val_loss, tokens_per_s (training steps only, evaluation
    excluded), train_tokens, train_seconds, wall_seconds, stopped ("budget",
    "early_stopping", "target", "time_limit"), time_to_target_s, history, device, autocast,
    n_params, flops_per_token.
    """
    cfg, tc = split_config(config)
    dev = resolve_device(device)
    cuda = dev.startswith("cuda")
    all_tokens = _as_tokens(tokens)
    if valid_tokens is not None:
        train_np, valid_np = all_tokens, _as_tokens(valid_tokens)
    else:
        train_np, valid_np = split_tokens(all_tokens, valid_fraction)
    if train_np.size and int(max(train_np.max(), valid_np.max() if valid_np.size else 0)) >= cfg.vocab_size:
        raise ValueError(f"token id out of range for vocab_size {cfg.vocab_size}")
    seq = cfg.context
    if len(train_np) < seq + 2:
        raise ValueError(f"need more than {seq + 1} training tokens, got {len(train_np)}")
    batch = int(tc["batch_size"])
    budget_steps = max(int(budget_steps), 1)
    eval_every = max(int(eval_every), 1)

    with torch_runtime(dev, seed, deterministic=deterministic, cpu_threads=cpu_threads):
        train_t = torch.from_numpy(train_np).to(dev)
        valid_t = torch.from_numpy(valid_np).to(dev)
        val_windows = _windows(valid_t, min(seq, len(valid_np) - 1), int(tc["eval_windows"]))
        model = GPT(cfg).to(dev)
        run_model = torch.compile(model) if compile_model else model
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(tc["weight_decay"])},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(tc["learning_rate"]),
            betas=(float(tc["beta1"]), float(tc["beta2"])),
        )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        offsets_range = torch.arange(seq + 1, device=dev)
        n_starts = len(train_np) - seq  # windows of seq + 1 tokens

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(dev)

        history: list[dict[str, Any]] = []
        wall0 = time.perf_counter()
        eval_seconds = 0.0

        def evaluate(step: int, train_loss: float | None) -> float:
            nonlocal eval_seconds
            sync()
            t0 = time.perf_counter()
            val = _mean_loss(run_model, val_windows, batch, cuda)
            eval_seconds += time.perf_counter() - t0
            history.append(
                {
                    "step": step,
                    "train_loss": train_loss,
                    "val_loss": val,
                    "elapsed_s": round(time.perf_counter() - wall0, 4),
                }
            )
            return val

        initial = evaluate(0, None)
        best_loss, best_step, bad = initial, 0, 0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stopped = "budget"
        time_to_target = None
        if target_loss is not None and initial <= target_loss:
            time_to_target, stopped = 0.0, "target"
        running = torch.zeros((), dtype=torch.float32, device=dev)
        running_n = 0
        last_train_loss: float | None = None
        step = 0
        model.train()
        while step < budget_steps and stopped == "budget":
            lr = _lr_at(
                step,
                float(tc["learning_rate"]),
                int(tc["warmup_steps"]),
                budget_steps,
                float(tc["min_lr_ratio"]),
            )
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, n_starts, (batch,), generator=gen)
            if cuda:  # pinned + non_blocking: no host/device sync per step
                starts = starts.pin_memory().to(dev, non_blocking=True)
            w = train_t[starts[:, None] + offsets_range]
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = run_model(w[:, :-1])
            loss = loss_fn(logits, w[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
            opt.step()
            running += loss.detach()
            running_n += 1
            step += 1
            if step % eval_every == 0 or step == budget_steps:
                last_train_loss = float(running) / running_n
                running.zero_()
                running_n = 0
                if not math.isfinite(last_train_loss):
                    stopped = "diverged"
                    break
                val = evaluate(step, last_train_loss)
                if val < best_loss - float(tc["min_delta"]):
                    best_loss, best_step, bad = val, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                if target_loss is not None and best_loss <= target_loss:
                    time_to_target = history[-1]["elapsed_s"]
                    stopped = "target"
                elif bad >= int(tc["patience"]):
                    stopped = "early_stopping"
            if max_seconds is not None and stopped == "budget" and time.perf_counter() - wall0 > max_seconds:
                stopped = "time_limit"
        sync()
        wall = time.perf_counter() - wall0
        checkpoint = state_to_bytes(best_state)

    train_seconds = max(wall - eval_seconds, 1e-9)
    train_tokens = step * batch * seq
    metrics = {
        "steps": step,
        "best_step": best_step,
        "train_loss": last_train_loss,
        "val_loss": best_loss,
        "val_perplexity": math.exp(best_loss) if best_loss < 700 else math.inf,
        "initial_val_loss": initial,
        "tokens_per_s": train_tokens / train_seconds,
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "stopped": stopped,
        "target_loss": target_loss,
        "time_to_target_s": time_to_target,
        "history": history,
        "device": dev,
        "autocast": "bf16" if cuda else None,
        "deterministic": deterministic,
        "n_params": n_params(cfg),
        "flops_per_token": train_flops_per_token(cfg),
        "train_settings": tc,
        "train_tokens_available": int(len(train_np)),
        "valid_tokens_available": int(len(valid_np)),
    }
    return LMResult(checkpoint, cfg.to_json(), metrics)
