"""A small gRPC load generator for the Open Inference Protocol: N calls in flight for S seconds.

Sends one ready-serialized `inference.GRPCInferenceService/ModelInfer` request over and over on one
channel (grpc.aio, N concurrent loops), so the client spends no time building messages, and
records each call's latency. Prints {requests, errors, req_s, p50_ms, p99_ms} as JSON. Run as its
own process (bench/serve.py does) so that its CPU is not the bench's:

    python bench/grpc_load.py HOST:PORT REQUEST.bin [--concurrency 8] [--seconds 10]

Needs only grpcio; any protobuf of the protocol's ModelInferRequest will do as REQUEST.bin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def load(target: str, request: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(request, timeout=60)  # warm: the connection is up before the clock starts
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                try:
                    await call(request, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "req_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT of the gRPC server")
    parser.add_argument("request", type=Path, help="a serialized ModelInferRequest")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    result = asyncio.run(load(args.target, args.request.read_bytes(), args.concurrency, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
