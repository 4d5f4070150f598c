"""GPU against CPU for cairn's PyTorch training, in one run: tokens/s, time to a target
validation loss, model FLOPs utilisation, and several trials packed onto one device.

Needs only torch, numpy, safetensors and services/platform/ml/textgen (no NATS, no MLflow, no data
download). The corpus is this Python's own standard library source (`*.py` under
`sysconfig.get_paths()["stdlib"]`, site-packages excluded, sorted by relative path, files that
are not UTF-8 skipped, capped in size), so every machine has it; the Python version is
recorded because the corpus differs between versions.

    .venv/bin/python bench/gpu.py                      # GPU (when present) + CPU, ~5-8 min on an H100
    .venv/bin/python bench/gpu.py --device cpu --quick # CPU only, about a minute on 2 cores

What it measures (all in one process, same corpus, tokenizer, model config and seed):
1. main run on the primary device (CUDA when available): tokens/s, MFU, validation-loss
   history, time to a target validation loss;
2. the same config on CPU for a short fixed number of steps (all cores): tokens/s, MFU, and
   its time to the target extrapolated from CPU seconds/step x the main run's steps to target
   (same seed, same batches: the trajectories agree up to precision);
3. packing: K trials (different seeds, a smaller "tuning trial" config) one after another
   in this process, against K processes training at once on the same device (the Dask
   pattern of `--nworkers K --resources GPU=1` per card), started together behind a barrier;
4. on CUDA: the deterministic mode (as cairn's services run it) twice, checking the two
   checkpoints are bit-identical, and its tokens/s.

FLOPs: training FLOPs per token = 6 * N + 12 * n_layers * d_model * context (PaLM, appendix
B), N = parameters in matrix multiplies (tied embedding once, position embedding excluded).
MFU = (FLOPs per token x tokens/s) / peak. Peaks assumed: H100/H200 SXM 989 TFLOP/s dense
BF16, H100 PCIe 756 TFLOP/s, A100 312 TFLOP/s (override with --peak-tflops); CPU estimated as
threads x clock (from /proc/cpuinfo) x FP32 FLOPs/cycle/core (64 with AVX-512 on Intel, 32
with AVX2+FMA or AMD's AVX-512, 16 otherwise), an estimate, stated as such in the output.

Results: printed and written to bench/results/gpu.json (GPU figures marked unavailable when
torch sees no GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

# cuBLAS reads this once, when it initialises: set before torch touches the GPU, so the
# deterministic check below can run in this process (and every run pays the same setting).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.platform.ml.textgen.model import GPTConfig, n_params, train_flops_per_token  # noqa: E402
from services.platform.ml.textgen.tokenizer import CorpusError, encode, train_bpe, validate_corpus  # noqa: E402
from services.platform.ml.textgen.train import shard_tokens, train_lm  # noqa: E402

GPU_PEAKS_TFLOPS = [  # (substring of torch.cuda.get_device_name, dense BF16 TFLOP/s)
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
]

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "corpus_bytes": 1_000_000,
        "bpe_bytes": 200_000,
        "vocab_size": 512,
        "model": {
            "context": 128,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_steps": 20,
            "eval_windows": 32,
            "patience": 100,
        },
        "main_steps": 200,
        "eval_every": 25,
        "cpu_steps": 20,
        "max_seconds": 60.0,
        "pack_model": {
            "context": 64,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "batch_size": 16,
            "eval_windows": 8,
        },
        "pack_steps": 200,
        "pack_k": 2,
        "det_steps": 20,
    },
    "full": {
        "corpus_bytes": 8_000_000,
        "bpe_bytes": 1_000_000,
        "vocab_size": 2048,
        "model": {
            "context": 256,
            "d_model": 384,
            "n_layers": 6,
            "n_heads": 6,
            "batch_size": 64,
            "learning_rate": 1e-3,
            "warmup_steps": 100,
            "eval_windows": 128,
            "patience": 100,
        },
        "main_steps": 4000,
        "eval_every": 100,
        "cpu_steps": 4,
        "max_seconds": 150.0,
        "pack_model": {
            "context": 128,
            "d_model": 192,
            "n_layers": 4,
            "n_heads": 4,
            "batch_size": 32,
            "eval_windows": 16,
        },
        "pack_steps": 400,
        "pack_k": 4,
        "det_steps": 100,
    },
}


# --------------------------------------------------------------------------- inputs


def stdlib_corpus(cap_bytes: int) -> tuple[str, dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (
            p
            for p in root.rglob("*.py")
            if not ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    parts: list[str] = []
    size = used = skipped = 0
    for path in files:
        if size >= cap_bytes:
            break
        try:
            data = path.read_bytes()
            text = validate_corpus(data, name=path.name)
        except (OSError, CorpusError):
            skipped += 1
            continue
        parts.append(text if text.endswith("\n") else text + "\n")
        size += len(data)
        used += 1
    text = "".join(parts)
    raw = text.encode("utf-8")[:cap_bytes].decode("utf-8", errors="ignore")
    info = {
        "root": str(root),
        "python": platform.python_version(),
        "files_seen": len(files),
        "files_used": used,
        "files_skipped_not_utf8": skipped,
        "bytes": len(raw.encode()),
        "sha256": hashlib.sha256(raw.encode()).hexdigest(),
    }
    return raw, info


def cpu_peak_estimate(threads: int) -> dict[str, Any]:
    flags, vendor, mhz, model = set(), "", None, platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "vendor_id" and not vendor:
                vendor = value
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
            elif key == "model name" and model in ("", platform.processor()):
                model = value
    except OSError:
        pass
    if "avx512f" in flags and vendor == "GenuineIntel":
        per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 16
    ghz = (mhz or 2000.0) / 1000
    return {
        "estimate": True,
        "model": model,
        "vendor": vendor,
        "threads": threads,
        "ghz": ghz,
        "fp32_flops_per_cycle_per_core": per_cycle,
        "peak_tflops": threads * ghz * per_cycle / 1000,
        "how": "threads x clock (/proc/cpuinfo 'cpu MHz') x FP32 FLOPs/cycle/core",
    }


def gpu_peak(name: str, override: float | None) -> dict[str, Any]:
    if override:
        return {"peak_tflops": override, "source": "--peak-tflops", "dtype": "bf16 dense"}
    for key, value in GPU_PEAKS_TFLOPS:
        if key in name:
            return {"peak_tflops": value, "source": f"datasheet ({key})", "dtype": "bf16 dense"}
    return {"peak_tflops": None, "source": "unknown GPU: pass --peak-tflops", "dtype": "bf16 dense"}


def summarise(metrics: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    achieved = metrics["flops_per_token"] * metrics["tokens_per_s"]
    out = {
        k: metrics[k]
        for k in (
            "device",
            "autocast",
            "deterministic",
            "steps",
            "best_step",
            "stopped",
            "train_loss",
            "val_loss",
            "val_perplexity",
            "initial_val_loss",
            "tokens_per_s",
            "train_tokens",
            "train_seconds",
            "wall_seconds",
        )
    }
    out["seconds_per_step"] = metrics["train_seconds"] / max(metrics["steps"], 1)
    out["achieved_tflops"] = achieved / 1e12
    out["mfu"] = achieved / (peak_tflops * 1e12) if peak_tflops else None
    out["history"] = metrics["history"]
    return out


def first_reaching(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    for h in history:
        if h["val_loss"] <= target:
            return h
    return None


# --------------------------------------------------------------------------- packing


def _pack_child(
    rank: int,
    tokens: np.ndarray,
    config: dict[str, Any],
    steps: int,
    device: str,
    threads: int,
    barrier: Any,
    queue: Any,
) -> None:
    try:
        # warm-up: CUDA context, cuBLAS handles, kernels; not timed
        train_lm(
            tokens,
            config,
            seed=1000 + rank,
            budget_steps=2,
            device=device,
            eval_every=2,
            deterministic=False,
            cpu_threads=threads,
        )
        barrier.wait(timeout=300)
        t0 = time.monotonic()
        r = train_lm(
            tokens,
            config,
            seed=rank,
            budget_steps=steps,
            device=device,
            eval_every=steps,
            deterministic=False,
            cpu_threads=threads,
        )
        queue.put(
            {
                "rank": rank,
                "start": t0,
                "end": time.monotonic(),
                "train_tokens": r.metrics["train_tokens"],
                "tokens_per_s": r.metrics["tokens_per_s"],
                "val_loss": r.metrics["val_loss"],
            }
        )
    except Exception:  # pragma: no cover - reported to the parent
        queue.put({"rank": rank, "error": traceback.format_exc()})


def packing(
    tokens: np.ndarray,
    config: dict[str, Any],
    steps: int,
    k: int,
    device: str,
    seq_threads: int,
    pack_threads: int,
) -> dict[str, Any]:
    # one at a time, in this (already warm) process
    train_lm(
        tokens,
        config,
        seed=999,
        budget_steps=2,
        device=device,
        eval_every=2,
        deterministic=False,
        cpu_threads=seq_threads,
    )
    seq_runs = []
    t0 = time.monotonic()
    for rank in range(k):
        r = train_lm(
            tokens,
            config,
            seed=rank,
            budget_steps=steps,
            device=device,
            eval_every=steps,
            deterministic=False,
            cpu_threads=seq_threads,
        )
        seq_runs.append(r.metrics)
    seq_wall = time.monotonic() - t0
    seq_tokens = sum(m["train_tokens"] for m in seq_runs)

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [
        ctx.Process(
            target=_pack_child, args=(rank, tokens, config, steps, device, pack_threads, barrier, queue)
        )
        for rank in range(k)
    ]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + 900
    while len(results) < k and time.monotonic() < deadline:
        try:
            results.append(queue.get(timeout=1.0))
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    if len(results) < k:
        return {
            "k": k,
            "error": f"only {len(results)} of {k} packed trials reported (a process died or timed out)",
        }
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"k": k, "error": errors[0]}
    makespan = max(r["end"] for r in results) - min(r["start"] for r in results)
    packed_tokens = sum(r["train_tokens"] for r in results)
    return {
        "k": k,
        "device": device,
        "steps_per_trial": steps,
        "config": config,
        "one_at_a_time": {
            "wall_s": seq_wall,
            "tokens_per_s": seq_tokens / seq_wall,
            "cpu_threads": seq_threads,
            "val_loss": [m["val_loss"] for m in seq_runs],
        },
        "packed_processes": {
            "makespan_s": makespan,
            "tokens_per_s": packed_tokens / makespan,
            "cpu_threads_each": pack_threads,
            "per_trial_tokens_per_s": [r["tokens_per_s"] for r in sorted(results, key=lambda r: r["rank"])],
            "val_loss": [r["val_loss"] for r in sorted(results, key=lambda r: r["rank"])],
        },
        "speedup": seq_wall / makespan,
        "note": "wall time of K trials; packed processes start together behind a barrier after a warm-up, "
        "so process start-up and CUDA initialisation are excluded from both sides",
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny model and corpus (CPU-friendly)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    ap.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="validation loss (nats/token) for time-to-target; default: 1.10 x the main run's best",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by device name)"
    )
    ap.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap on the main run")
    ap.add_argument("--pack", type=int, default=None, help="trials packed at once (default 4, quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    mode = dict(MODES["quick" if args.quick else "full"])
    cuda_ok = torch.cuda.is_available()
    primary = "cuda" if args.device in ("auto", "cuda") and cuda_ok else "cpu"
    if args.device == "cuda" and not cuda_ok:
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {
        "bench": "gpu",
        "mode": "quick" if args.quick else "full",
        "seed": args.seed,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpu_count": cores,
            "cuda_available": cuda_ok,
            "gpu": torch.cuda.get_device_name(0) if cuda_ok else None,
        },
        "flops_formula": (
            "6*N + 12*n_layers*d_model*context per training token (PaLM appx B); "
            "N excludes position embeddings, counts the tied embedding once"
        ),
    }
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    text, out["corpus"] = stdlib_corpus(mode["corpus_bytes"])
    log(f"corpus: {out['corpus']['files_used']} files, {out['corpus']['bytes']:,} bytes")
    t0 = time.perf_counter()
    tok_json = train_bpe(text[: mode["bpe_bytes"]], mode["vocab_size"])
    bpe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = encode(tok_json, text).astype(np.int64)
    enc_s = time.perf_counter() - t0
    shards = shard_tokens(tokens, 1 << 20)
    out["tokenizer"] = {
        "vocab_size": json.loads(tok_json)["vocab_size"],
        "bpe_train_bytes": mode["bpe_bytes"],
        "bpe_train_s": bpe_s,
        "encode_s": enc_s,
        "tokens": int(len(tokens)),
        "bytes_per_token": out["corpus"]["bytes"] / max(len(tokens), 1),
        "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        "shards": len(shards),
    }
    log(
        f"tokenizer: vocab {out['tokenizer']['vocab_size']}, {len(tokens):,} tokens "
        f"(BPE {bpe_s:.1f}s, encode {enc_s:.1f}s)"
    )

    config = {"vocab_size": mode["vocab_size"], **mode["model"]}
    cfg = GPTConfig.from_dict(config)
    out["model"] = {
        "config": config,
        "n_params": n_params(cfg),
        "flops_per_token": train_flops_per_token(cfg),
    }
    cpu_peak = cpu_peak_estimate(cores)
    gpu_info = gpu_peak(out["env"]["gpu"] or "", args.peak_tflops) if cuda_ok else None
    out["peaks"] = {"cpu": cpu_peak, "gpu": gpu_info}
    peak_primary = gpu_info["peak_tflops"] if primary == "cuda" else cpu_peak["peak_tflops"]
    log(
        f"model: {out['model']['n_params']:,} params, "
        f"{out['model']['flops_per_token'] / 1e6:.1f} MFLOP/token; primary device {primary}"
    )

    # 1. main run on the primary device
    max_s = args.max_seconds if args.max_seconds is not None else mode["max_seconds"]
    train_lm(
        tokens,
        {**config, "eval_windows": 1},
        seed=args.seed,
        budget_steps=2,
        device=primary,
        eval_every=2,
        deterministic=False,
        cpu_threads=cores,
    )  # warm-up
    main = train_lm(
        tokens,
        config,
        seed=args.seed,
        budget_steps=mode["main_steps"],
        device=primary,
        eval_every=mode["eval_every"],
        max_seconds=max_s,
        deterministic=False,
        cpu_threads=cores,
    )
    main_sum = summarise(main.metrics, peak_primary)
    log(
        f"main run ({primary}): {main_sum['steps']} steps, {main_sum['tokens_per_s']:,.0f} tokens/s, "
        f"val loss {main_sum['initial_val_loss']:.3f} -> {main_sum['val_loss']:.3f}, MFU {main_sum['mfu']}"
    )

    # 2. CPU, same config, short fixed number of steps (in quick mode on CPU the main run is the CPU run)
    if primary == "cpu":
        cpu_sum = main_sum
    else:
        train_lm(
            tokens,
            {**config, "eval_windows": 1},
            seed=args.seed,
            budget_steps=1,
            device="cpu",
            eval_every=1,
            deterministic=False,
            cpu_threads=cores,
        )  # warm-up
        cpu = train_lm(
            tokens,
            {**config, "eval_windows": 4},
            seed=args.seed,
            budget_steps=mode["cpu_steps"],
            device="cpu",
            eval_every=mode["cpu_steps"],
            deterministic=False,
            cpu_threads=cores,
        )
        cpu_sum = summarise(cpu.metrics, cpu_peak["peak_tflops"])
        log(f"cpu: {cpu_sum['steps']} steps, {cpu_sum['tokens_per_s']:,.0f} tokens/s, MFU {cpu_sum['mfu']}")
    cpu_sum["threads"] = cores
    out["cpu"] = cpu_sum
    out["gpu"] = (
        main_sum
        if primary == "cuda"
        else {
            "available": False,
            "reason": "torch.cuda.is_available() is False" if not cuda_ok else "--device cpu",
        }
    )

    # time to target
    target = args.target_loss if args.target_loss is not None else 1.10 * main_sum["val_loss"]
    hit = first_reaching(main_sum["history"], target)
    ttt: dict[str, Any] = {
        "target_val_loss": target,
        "target_rule": "--target-loss" if args.target_loss is not None else "1.10 x main run's best",
        primary: {"seconds": hit["elapsed_s"], "steps": hit["step"], "measured": True} if hit else None,
    }
    if primary == "cuda":
        ttt["cpu"] = (
            {
                "seconds": hit["step"] * cpu_sum["seconds_per_step"],
                "steps": hit["step"],
                "measured": False,
                "how": "GPU steps to target x CPU seconds/step (same config, seed and batches)",
            }
            if hit
            else None
        )
        if hit and ttt["cpu"]:
            ttt["gpu_speedup"] = ttt["cpu"]["seconds"] / max(hit["elapsed_s"], 1e-9)
    out["time_to_target"] = ttt
    if primary == "cuda":
        out["gpu_vs_cpu_tokens_per_s"] = main_sum["tokens_per_s"] / cpu_sum["tokens_per_s"]

    # 3. packing several trials onto one device
    k = args.pack or mode["pack_k"]
    pack_cfg = {"vocab_size": mode["vocab_size"], **mode["pack_model"]}
    try:
        if primary == "cuda":
            out["packing"] = packing(
                tokens, pack_cfg, mode["pack_steps"], k, "cuda", seq_threads=1, pack_threads=1
            )
        else:
            k = min(k, cores)
            out["packing"] = packing(
                tokens, pack_cfg, mode["pack_steps"], k, "cpu", seq_threads=cores, pack_threads=1
            )
        p = out["packing"]
        if "error" not in p:
            log(
                f"packing x{k} on {primary}: one at a time {p['one_at_a_time']['wall_s']:.1f}s, "
                f"packed {p['packed_processes']['makespan_s']:.1f}s, speedup {p['speedup']:.2f}"
            )
        else:
            log(f"packing failed: {p['error'].splitlines()[-1]}")
    except Exception:
        out["packing"] = {"k": k, "error": traceback.format_exc()}
        log("packing failed")

    # 4. deterministic mode on CUDA: bit-identical twice?
    if primary == "cuda":
        try:
            runs = [
                train_lm(
                    tokens,
                    config,
                    seed=args.seed,
                    budget_steps=mode["det_steps"],
                    device="cuda",
                    eval_every=mode["det_steps"],
                    deterministic=True,
                )
                for _ in range(2)
            ]
            digests = [hashlib.sha256(r.checkpoint).hexdigest() for r in runs]
            out["gpu_determinism"] = {
                "steps": mode["det_steps"],
                "bit_identical": digests[0] == digests[1],
                "sha256": digests,
                "tokens_per_s": runs[1].metrics["tokens_per_s"],
                "vs_nondeterministic": runs[1].metrics["tokens_per_s"] / main_sum["tokens_per_s"],
            }
            log(
                f"deterministic on GPU: bit-identical {digests[0] == digests[1]}, "
                f"{runs[1].metrics['tokens_per_s']:,.0f} tokens/s"
            )
        except Exception:
            out["gpu_determinism"] = {"error": traceback.format_exc()}
            log("deterministic GPU check failed")
    else:
        out["gpu_determinism"] = {"available": False}

    out["total_seconds"] = time.perf_counter() - started
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            out, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
        )
    )
    brief = {k: out[k] for k in ("mode", "env", "tokenizer", "model", "time_to_target") if k in out}
    brief["cpu"] = {k: v for k, v in out["cpu"].items() if k != "history"}
    brief["gpu"] = {k: v for k, v in out["gpu"].items() if k != "history"}
    brief["packing"] = {k: v for k, v in out.get("packing", {}).items() if k not in ("config",)}
    print(json.dumps(brief, indent=2, default=str))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
