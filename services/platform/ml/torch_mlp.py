"""A PyTorch MLP model family for tables (regression and classification).

Same shape as `services.platform.ml.families`: a pure, seeded fit on arrays that returns native
non-pickle bytes, and a predictor that loads them.

- Model: `depth` hidden layers of `hidden` units (Linear -> ReLU -> Dropout), then a linear
  head (1 output for regression, `n_classes` logits for classification). Inputs are
  standardised with training-split statistics, and so is a regression target; both travel
  inside the model file, so callers pass raw feature matrices.
- Training: AdamW, mini-batches shuffled by a seeded `torch.Generator`, `budget` = maximum
  epochs, early stopping on validation loss (patience `EARLY_STOPPING_EPOCHS`), and the best
  epoch's weights are what is saved. On CUDA the forward pass runs under bf16 autocast; the
  loss, the optimiser and the saved weights stay float32.
- Reproducibility: `deterministic=True` (the default) runs under
  `placement.torch_runtime`: seeded, `torch.use_deterministic_algorithms(True)`, one intra-op
  thread on CPU. Same inputs, same hardware and same library versions give bit-identical
  safetensors bytes (tested on CPU).
- Format `torch-mlp-safetensors`: one safetensors file. Tensors `layers.{i}.weight`,
  `layers.{i}.bias`, `x_mean`, `x_std` (and `y_mean`, `y_std` for regression); the JSON config
  sits in the safetensors header metadata under the single key `cairn` (one key, so the header
  bytes cannot depend on hash-map order). Nothing is unpickled: `torch.load` is never used,
  and prediction is plain numpy, so a serving process needs safetensors + numpy, not torch.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from contracts.types import ModelFamily, Task
from services.platform.ml.fitted import FitRequest, Fitted

MLP_FAMILY = "mlp"
MLP_FORMAT = "torch-mlp-safetensors"
CONFIG_KEY = "cairn"
EARLY_STOPPING_EPOCHS = 10
_EVAL_CHUNK = 65536

DEFAULT_PARAMS: dict[str, Any] = {
    "hidden": 128,
    "depth": 2,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "dropout": 0.1,
    "batch_size": 256,
}


def _family() -> Any:
    """`ModelFamily.mlp` where the contracts define it; the plain string otherwise."""
    try:
        return ModelFamily(MLP_FAMILY)
    except ValueError:
        return MLP_FAMILY


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_mlp_params(rng: np.random.Generator) -> dict[str, Any]:
    """One configuration from the MLP search space (JSON-able, like tuning.logic.sample_params)."""
    return {
        "hidden": int(rng.choice([32, 64, 128, 256, 512])),
        "depth": int(rng.integers(1, 5)),
        "learning_rate": round(_loguniform(rng, 1e-4, 1e-2), 6),
        "weight_decay": round(_loguniform(rng, 1e-6, 1e-2), 8),
        "dropout": round(float(rng.uniform(0.0, 0.3)), 4),
        "batch_size": int(rng.choice([64, 128, 256, 512])),
    }


def _resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"unknown torch_mlp params: {sorted(unknown)}")
    p = {**DEFAULT_PARAMS, **params}
    out = {
        "hidden": int(p["hidden"]),
        "depth": int(p["depth"]),
        "learning_rate": float(p["learning_rate"]),
        "weight_decay": float(p["weight_decay"]),
        "dropout": float(p["dropout"]),
        "batch_size": int(p["batch_size"]),
    }
    if out["hidden"] < 1 or out["depth"] < 0 or out["batch_size"] < 1 or not 0 <= out["dropout"] < 1:
        raise ValueError(f"invalid torch_mlp params: {out}")
    return out


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64 = np.asarray(x, dtype=np.float64)
    mean = np.nan_to_num(np.nanmean(x64, axis=0)) if len(x64) else np.zeros(x64.shape[1])
    std = np.nan_to_num(np.nanstd(x64, axis=0)) if len(x64) else np.ones(x64.shape[1])
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _scaled(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, dtype=np.float32) - mean) / std
    return np.ascontiguousarray(np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0), dtype=np.float32)


def fit_mlp(r: FitRequest, deterministic: bool = True) -> Fitted:
    """Fit the MLP; returns `Fitted(family, safetensors bytes, "torch-mlp-safetensors", epochs)`.

    `budget` is the maximum number of epochs; `rounds_used` is the best epoch (1-based) whose
    weights were kept. `device`: "cpu", "cuda[:n]", or None (CUDA when available).
    """
    params, budget, task, n_classes, seed = r.params, r.budget, r.task, r.n_classes, r.seed
    x_train, y_train, x_valid, y_valid, device = r.x_train, r.y_train, r.x_valid, r.y_valid, r.device
    import safetensors.torch
    import torch
    from torch import nn

    from services.platform.ml.placement import resolve_device, torch_runtime

    p = _resolve_params(params)
    task = Task(task)
    if task not in (Task.regression, Task.classification):
        raise ValueError(f"the MLP family fits tables (regression or classification), not {task.value}")
    dev = resolve_device(device)
    cuda = dev.startswith("cuda")
    x_train = np.asarray(x_train)
    n_features = x_train.shape[1]
    classification = task is Task.classification
    n_out = max(int(n_classes), 2, int(np.max(y_train)) + 1 if len(y_train) else 2) if classification else 1
    x_mean, x_std = _standardise(x_train)
    y_mean = y_std = None
    if not classification:
        y64 = np.asarray(y_train, dtype=np.float64)
        y_mean, y_std = float(y64.mean()), float(y64.std()) or 1.0
    has_valid = x_valid is not None and y_valid is not None and len(y_valid) > 0

    with torch_runtime(dev, seed, deterministic=deterministic):

        def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            xt = torch.from_numpy(_scaled(x, x_mean, x_std)).to(dev)
            if classification:
                yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(dev)
            else:
                yt = torch.from_numpy(
                    ((np.asarray(y, dtype=np.float64) - y_mean) / y_std).astype(np.float32)
                ).to(dev)
            return xt, yt

        xt, yt = tensors(x_train, y_train)
        xv, yv = tensors(x_valid, y_valid) if has_valid else (xt, yt)

        linears: list[nn.Linear] = []
        modules: list[nn.Module] = []
        width_in = n_features
        for _ in range(p["depth"]):
            lin = nn.Linear(width_in, p["hidden"])
            linears.append(lin)
            modules += [lin, nn.ReLU()]
            if p["dropout"] > 0:
                modules.append(nn.Dropout(p["dropout"]))
            width_in = p["hidden"]
        head = nn.Linear(width_in, n_out)
        linears.append(head)
        modules.append(head)
        model = nn.Sequential(*modules).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], weight_decay=p["weight_decay"])

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = out.float()
            if classification:
                return nn.functional.cross_entropy(out, target)
            return nn.functional.mse_loss(out[:, 0], target)

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                return model(x)

        @torch.no_grad()
        def evaluate(x: torch.Tensor, y: torch.Tensor) -> float:
            model.eval()
            total = 0.0
            for i in range(0, len(x), _EVAL_CHUNK):
                total += float(loss_fn(forward(x[i : i + _EVAL_CHUNK]), y[i : i + _EVAL_CHUNK])) * len(
                    x[i : i + _EVAL_CHUNK]
                )
            return total / max(len(x), 1)

        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = len(xt)
        bs = min(p["batch_size"], max(n, 1))
        best_loss, best_epoch, bad = math.inf, 0, 0
        best_state: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        epochs_run = 0
        for epoch in range(max(int(budget), 1)):
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                loss = loss_fn(forward(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epochs_run = epoch + 1
            val = evaluate(xv, yv)
            if math.isfinite(val) and val < best_loss:
                best_loss, best_epoch, bad = val, epoch + 1, 0
                best_state = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
            else:
                bad += 1
                if not math.isfinite(val) or (has_valid and bad >= EARLY_STOPPING_EPOCHS):
                    break
        if best_state is None:  # diverged from the first epoch: keep what there is
            best_state = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
            best_epoch = epochs_run

        out_tensors: dict[str, torch.Tensor] = {}
        for i, (w, b) in enumerate(best_state):
            out_tensors[f"layers.{i}.weight"] = w.float().cpu().contiguous()
            out_tensors[f"layers.{i}.bias"] = b.float().cpu().contiguous()
        out_tensors["x_mean"] = torch.from_numpy(x_mean.copy())
        out_tensors["x_std"] = torch.from_numpy(x_std.copy())
        if not classification:
            out_tensors["y_mean"] = torch.tensor([y_mean], dtype=torch.float64)
            out_tensors["y_std"] = torch.tensor([y_std], dtype=torch.float64)
        config = {
            "format": MLP_FORMAT,
            "task": task.value,
            "n_features": int(n_features),
            "n_outputs": int(n_out),
            "n_layers": len(best_state),
            "activation": "relu",
            "params": p,
            "budget_epochs": int(budget),
            "epochs_run": epochs_run,
            "best_epoch": best_epoch,
            "best_valid_loss": best_loss if math.isfinite(best_loss) else None,
            "device_type": "cuda" if cuda else "cpu",
            "autocast": "bf16" if cuda else None,
            "deterministic": bool(deterministic),
            "seed": int(seed),
            "torch_version": torch.__version__,
        }
        data = safetensors.torch.save(out_tensors, metadata={CONFIG_KEY: json.dumps(config, sort_keys=True)})
    return Fitted(_family(), bytes(data), MLP_FORMAT, best_epoch)


def read_mlp_config(data: bytes) -> dict[str, Any]:
    """The JSON config stored in a `torch-mlp-safetensors` file's header (no tensor is read)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("not a safetensors file: bad header length")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if CONFIG_KEY not in meta:
        raise ValueError("safetensors file has no cairn config: not a torch-mlp model")
    config = json.loads(meta[CONFIG_KEY])
    if config.get("format") != MLP_FORMAT:
        raise ValueError(f"unexpected model format {config.get('format')!r}")
    return config


class MLPPredictor:
    """A loaded `torch-mlp-safetensors` model; `predict` mirrors `registry.Model.predict`.

    Regression: (n,) values. Classification: (n, n_classes) probabilities. Numpy only.
    """

    def __init__(self, data: bytes, task: Task | None = None, n_classes: int | None = None):
        import safetensors.numpy

        self.config = read_mlp_config(data)
        self.task = Task(self.config["task"])
        if task is not None and Task(task) is not self.task:
            raise ValueError(f"model was trained for {self.task.value}, asked for {Task(task).value}")
        arrays = safetensors.numpy.load(bytes(data))
        self.layers = [
            (arrays[f"layers.{i}.weight"].astype(np.float64), arrays[f"layers.{i}.bias"].astype(np.float64))
            for i in range(self.config["n_layers"])
        ]
        self.x_mean, self.x_std = arrays["x_mean"], arrays["x_std"]
        self.y_mean = float(arrays["y_mean"][0]) if "y_mean" in arrays else 0.0
        self.y_std = float(arrays["y_std"][0]) if "y_std" in arrays else 1.0
        self.n_classes = (
            max(int(n_classes or 0), self.config["n_outputs"]) if self.task is Task.classification else 0
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = _scaled(x, self.x_mean, self.x_std).astype(np.float64)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                np.maximum(h, 0.0, out=h)
        if self.task is Task.regression:
            return h[:, 0] * self.y_std + self.y_mean
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        probs = e / e.sum(axis=1, keepdims=True)
        if probs.shape[1] < self.n_classes:
            probs = np.pad(probs, ((0, 0), (0, self.n_classes - probs.shape[1])))
        return probs
