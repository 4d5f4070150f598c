"""Beyond one host, in figures: what replication costs, what a leader's death costs, and what a
second Dask worker host gives.

Three nats-server processes, each on its own host (a network namespace, harness/hosts.py), joined
by routes, every write fsynced (as in production). Figures, each side run once per round, rounds
interleaved (bench/repeat.py), medians with their spread:

- `events_per_s`: N 1 KB events published pipelined (publish_async, PubAcks gathered) into an R1
  stream and into an R3 stream on the same cluster; the R3/R1 ratio is what the copies cost.
- `trials_per_s`: the same 40-trial study (every cairn service, Dask local) on a system whose
  stream and buckets are R1 against one whose are R3, each on its own three-host cluster, both up
  at once; trials per second from the first trial-completed to the last.
- `leader_kill`: during an R3 study the stream leader is SIGKILLed once 10 trials completed (and
  started again 10 s later); `recovery_s` is the longest gap between two trial completions minus
  the median longest gap of the unharmed R3 studies: what the failover costs the study.
- `worker_hosts` (`--section worker-hosts`): the same study with its trials on Dask workers on one
  host against two (the chart's scheduler and workers on hosts of their own, harness/daskcluster.py),
  and against training's own local cluster of two workers, all up at once, rounds interleaved;
  `two_over_one` and `two_over_local` are ratios of trials per second.

    .venv/bin/python bench/cluster.py [--events 3000] [--repeats 3] [--trials 40]
    .venv/bin/python bench/cluster.py --section worker-hosts [--repeats 3] [--trials 40]

Needs root (network namespaces), as CI has. Output: JSON on stdout and bench/results/cluster.json
(`--section worker-hosts`: bench/results/cluster-worker-hosts.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repeat import column, interleave, ratio_spread, rounded, spread  # noqa: E402
from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event  # noqa: E402
from harness.daskcluster import DaskHosts  # noqa: E402
from harness.hosts import Hosts  # noqa: E402
from harness.natscluster import NatsCluster  # noqa: E402
from harness.stream import StreamLog  # noqa: E402
from harness.system import System, start_system  # noqa: E402
from harness.workloads import study_table  # noqa: E402
from services.platform.bus.connection import connect  # noqa: E402
from services.platform.cache import NO_CACHE  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402
from services.tools.client import Client  # noqa: E402

PAYLOAD = b"x" * 1024


async def publish_rate(urls: str, stream: str, events: int) -> dict[str, float]:
    """Events per second into `stream`, pipelined: every publish sent, then every PubAck awaited."""
    nc = await connect(CairnSettings(nats_url=urls))
    js = nc.jetstream()
    await js.purge_stream(stream)
    start = time.perf_counter()
    futures = [await js.publish_async(f"{stream.lower()}.e", PAYLOAD) for _ in range(events)]
    await asyncio.gather(*futures)
    took = time.perf_counter() - start
    await nc.close()
    return {"events_per_s": events / took}


async def study(system: System, csv: Path, trials: int, during: Any = None) -> dict[str, Any]:
    """One study from arrival to deployment; trial completion times; `during(log)` runs alongside."""
    spec = TuningSpec(
        trials=trials, families=[ModelFamily.xgboost], strategy=SearchStrategy.random, max_budget=60
    )
    event = new_event(
        DataArrived(uri=csv.as_uri(), target="y", model_name=f"bench-{time.monotonic_ns()}", tuning=spec),
        source="/bench/cluster",
    ).model_copy(update={NO_CACHE: "true"})  # every round computes: the same table, no cache hits
    log = StreamLog(system.settings)
    await log.poll()
    async with Client(system.settings, "bench") as client:  # sent again between stream leaders
        await client.publish(event)
    side = asyncio.create_task(during(log, event.id)) if during else None
    terminal = await log.wait(lambda lg: lg.terminal(event.id), 600, "the study's end")
    if side:
        await side
    studies = {r.data["study_id"] for r in log.run(event.id) if r.type == "cairn.tuning.requested.v1"}
    times = sorted(
        r.ts.timestamp() for r in log.of_type("cairn.trial.completed.v1") if r.data["study_id"] in studies
    )
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "deployed": terminal.type == "cairn.model.deployed.v1",
        "trials": len(times),
        "trials_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
        "max_gap_s": max(gaps, default=0.0),
        "median_gap_s": statistics.median(gaps) if gaps else 0.0,
    }


async def leader_killer(cluster: NatsCluster, system: System, after: int):
    """A `during` for `study`: once `after` trials of the run completed, SIGKILL the stream leader
    and start it again 10 s later (the fault tests/test_scale_out.py survives)."""

    async def kill(_: StreamLog, run: str) -> None:
        log = StreamLog(system.settings)  # its own reader: two polls of one StreamLog read twice

        def enough(lg: StreamLog) -> bool:
            studies = {r.data["study_id"] for r in lg.run(run) if r.type == "cairn.tuning.requested.v1"}
            return sum(r.data["study_id"] in studies for r in lg.of_type("cairn.trial.completed.v1")) >= after

        await log.wait(enough, 300, f"{after} trials")
        nc = await connect(system.settings, "bench")
        try:
            leader = (await nc.jetstream().stream_info(system.settings.stream)).cluster.leader
        finally:
            await nc.close()
        victim = cluster.server(leader)
        cluster.kill(victim)
        await asyncio.sleep(10)  # the fault's length
        await asyncio.to_thread(cluster.start_server, victim)

    return kill


async def replication(work: Path, csv: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`events_per_s`, `trials_per_s` (R1 against R3) and `leader_kill`."""
    out: dict[str, Any] = {}
    with Hosts(6) as hosts:
        # Two clusters of three hosts each: the buckets have fixed names, so an R1 system and an R3
        # system cannot share one cluster; both run at once so their studies can be interleaved.
        clusters = {
            "R1": NatsCluster(hosts, work / "nats-r1", name="r1", members=hosts.hosts[:3]).start(),
            "R3": NatsCluster(hosts, work / "nats-r3", name="r3", members=hosts.hosts[3:]).start(),
        }
        systems: dict[str, System] = {}
        try:
            urls = clusters["R3"].urls
            nc = await connect(CairnSettings(nats_url=urls))
            js = nc.jetstream()
            await js.add_stream(name="R1", subjects=["r1.>"], num_replicas=1)
            await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
            await nc.close()
            rates = await interleave(
                {r: (lambda r=r: publish_rate(urls, r, args.events)) for r in ("R1", "R3")}, args.repeats
            )
            out["events_per_s"] = {r: spread(column(rows, "events_per_s")) for r, rows in rates.items()}
            out["events_per_s"]["r3_over_r1"] = ratio_spread(
                column(rates["R3"], "events_per_s"), column(rates["R1"], "events_per_s")
            )
            for name, cluster in clusters.items():
                systems[name] = await asyncio.to_thread(
                    start_system,
                    work / f"home-{name}",
                    nats_url=cluster.urls,
                    stream_replicas=int(name[1]),
                    dask_workers=2,
                    serve=False,
                    allowed_roots=[str(work)],
                )
            runs = await interleave(
                {name: (lambda s=system: study(s, csv, args.trials)) for name, system in systems.items()},
                args.repeats,
            )
            out["trials_per_s"] = {name: spread(column(rows, "trials_per_s")) for name, rows in runs.items()}
            out["trials_per_s"]["r3_over_r1"] = ratio_spread(
                column(runs["R3"], "trials_per_s"), column(runs["R1"], "trials_per_s")
            )
            out["all_deployed"] = all(row["deployed"] for rows in runs.values() for row in rows)
            killed = await study(
                systems["R3"], csv, args.trials, await leader_killer(clusters["R3"], systems["R3"], 10)
            )
            unharmed = column(runs["R3"], "max_gap_s")
            out["leader_kill"] = {
                **killed,
                "max_gap_unharmed_s": spread(unharmed),
                "recovery_s": killed["max_gap_s"] - statistics.median(unharmed),
            }
        finally:
            for system in systems.values():
                system.stop()
            for cluster in clusters.values():
                cluster.close()
    return out


async def worker_hosts(work: Path, csv: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`worker_hosts`: the same study on Dask workers on one host against two, and against the
    local cluster training starts by itself (two workers in its own process tree).

    Three systems up at once, each with a nats-server on a host of its own (the buckets and the Dask
    Service address have fixed names, so no two systems share hosts): `one` and `two` run the
    chart's Dask scheduler on another host and one or two of the chart's workers (one thread each)
    on hosts of their own, training reaching the scheduler over mutual TLS
    (harness/daskcluster.py); `local` runs CAIRN_DASK=local with two workers. Every cairn service
    runs on this machine.
    """
    systems: dict[str, System] = {}
    with contextlib.ExitStack() as stack:
        for name, workers in (("local", 0), ("one", 1), ("two", 2)):
            hosts = stack.enter_context(Hosts(1 + (1 + workers if workers else 0)))
            nats = stack.enter_context(NatsCluster(hosts, work / f"nats-{name}", members=[hosts[0]]))
            compute: dict[str, Any] = {"dask_workers": 2}
            if workers:
                dask = stack.enter_context(DaskHosts(hosts, work / f"dask-{name}", hosts[1], hosts.hosts[2:]))
                await asyncio.to_thread(dask.wait_workers)
                compute = {"extra_env": dask.client_env()}
            system = await asyncio.to_thread(
                start_system,
                work / f"home-{name}",
                nats_url=nats.urls,
                serve=False,
                allowed_roots=[str(work)],
                **compute,
            )
            stack.callback(system.stop)  # before its Dask and its server go
            systems[name] = system
        runs = await interleave(
            {name: (lambda s=system: study(s, csv, args.trials)) for name, system in systems.items()},
            args.repeats,
        )
    out: dict[str, Any] = {name: spread(column(rows, "trials_per_s")) for name, rows in runs.items()}
    for a, b in (("two", "one"), ("two", "local")):
        out[f"{a}_over_{b}"] = ratio_spread(column(runs[a], "trials_per_s"), column(runs[b], "trials_per_s"))
    out["all_deployed"] = all(row["deployed"] for rows in runs.values() for row in rows)
    return out


SECTIONS = {"replication": "cluster.json", "worker-hosts": "cluster-worker-hosts.json", "all": "cluster.json"}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument(
        "--section",
        choices=list(SECTIONS),
        default="replication",
        help="replication: events_per_s, trials_per_s, leader_kill; worker-hosts: worker_hosts",
    )
    args = parser.parse_args()
    out: dict[str, Any] = {"repeats": args.repeats, "trials": args.trials}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv = study_table(work)
        if args.section in ("replication", "all"):
            out["events"] = args.events
            out.update(await replication(work, csv, args))
        if args.section in ("worker-hosts", "all"):
            out["worker_hosts"] = await worker_hosts(work, csv, args)
    doc = rounded(out)
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    (results / SECTIONS[args.section]).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
