"""Dask transport security with real processes: who cannot present a certificate runs nothing.

Dask moves pickled tasks, so a client that reaches a scheduler runs code on its workers. Here a
`dask scheduler` and a `dask worker` (the venv's CLIs, as compose and the chart start them) run
with certificates from `services.platform.dask_tls.write_dask_tls`; the client cairn's compute code builds
from settings runs a task over tls://, and clients without the cluster's certificate are refused
by the scheduler. The training service's own LocalCluster is started the way the service starts
it and must listen on loopback only, over TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client
from distributed.security import Security

from services.platform.compute import LOCAL_HEARTBEAT_S, open_compute
from services.platform.dask_tls import CA, CERT, KEY, DaskTLSError, kube_scheduler_address, write_dask_tls
from services.platform.settings import CairnSettings
from tests.conftest import wait_for

DASK = str(Path(sys.executable).with_name("dask"))
REFUSAL_TIMEOUT = "5s"  # how long a refused client may keep retrying before it gives up


def tls_settings(folder: Path, home: Path, **overrides: Any) -> CairnSettings:
    return CairnSettings(
        home=home,
        dask_tls_ca=folder / CA,
        dask_tls_cert=folder / CERT,
        dask_tls_key=folder / KEY,
        **overrides,
    )


def tls_flags(folder: Path) -> list[str]:
    return [
        "--tls-ca-file",
        str(folder / CA),
        "--tls-cert",
        str(folder / CERT),
        "--tls-key",
        str(folder / KEY),
    ]


def _env() -> dict[str, str]:
    """The CLIs' environment without any DASK_ configuration that could loosen them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A TLS scheduler and one TLS worker as processes: (certificate folder, scheduler file)."""
    certs = tmp_path / "dask-tls"
    write_dask_tls(certs)
    scheduler_file = tmp_path / "scheduler.json"
    logs = (tmp_path / "scheduler.log").open("wb"), (tmp_path / "worker.log").open("wb")
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(scheduler_file), *tls_flags(certs)],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    worker = subprocess.Popen(
        [DASK, "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1"]
        + ["--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path / "worker")]
        + tls_flags(certs),
        stdout=logs[1],
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    try:
        yield certs, scheduler_file
    finally:
        for proc in (worker, scheduler):  # the worker first, so it is not left reconnecting
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


async def refused(address: str, security: Security | None = None) -> Exception:
    """The exception a client gets from `address`; fails the test if it connects."""
    try:
        client = await Client(address, security=security, asynchronous=True, timeout=REFUSAL_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - which error depends on where the refusal happens
        return exc
    await client.close()
    raise AssertionError(f"a client without the cluster's certificate connected to {address}")


def handshake_without_certificate(address: str, ca: Path) -> str:
    """A TLS client that trusts the CA but shows no certificate: the scheduler must end it."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        try:
            # TLS 1.3 finishes the client's side of the handshake before the server has checked
            # the client's certificate; the server's verdict arrives with the first read.
            tls.do_handshake()
            tls.sendall(b"\0" * 8)
            data = tls.recv(1)
        except (ssl.SSLError, ConnectionError) as exc:
            return f"{type(exc).__name__}: {exc}"
    assert data == b"", f"the scheduler answered a client without a certificate: {data!r}"
    return "closed"


async def test_tls_scheduler_runs_tasks_for_cairn_and_refuses_clients_without_a_certificate(
    tls_cluster: tuple[Path, Path], tmp_path: Path
) -> None:
    certs, scheduler_file = tls_cluster
    await wait_for(scheduler_file.exists, timeout=60, what="the TLS scheduler to write its address")
    address = await wait_for(
        lambda: json.loads(scheduler_file.read_text() or "{}").get("address"), timeout=10
    )
    assert address.startswith("tls://127.0.0.1:"), address

    compute = await open_compute(tls_settings(certs, tmp_path, dask=address))
    try:
        client = compute.client
        await asyncio.wait_for(client.wait_for_workers(1), timeout=60)
        workers = (await client.scheduler.identity())["workers"]
        assert workers and all(w.startswith("tls://127.0.0.1:") for w in workers), workers
        pid = await asyncio.wait_for(client.submit(os.getpid, pure=False), timeout=60)
        assert pid != os.getpid()  # it ran in the worker process, over TLS

        # A plain client, as anyone on the network would write it: no certificate, so no TLS.
        plain = await refused(address)
        assert isinstance(plain, TypeError | OSError), repr(plain)
        # The same port spoken to in plain TCP: the scheduler only speaks TLS.
        assert isinstance(await refused(address.replace("tls://", "tcp://")), OSError)
        # A client that trusts the scheduler but holds another CA's certificate: rejected by
        # the scheduler's own check of client certificates.
        other = tmp_path / "other-ca"
        write_dask_tls(other)
        foreign = Security(
            tls_ca_file=str(certs / CA),
            tls_client_cert=str(other / CERT),
            tls_client_key=str(other / KEY),
            require_encryption=True,
        )
        assert isinstance(await refused(address, foreign), OSError)
        # TLS that trusts the CA but shows no certificate of its own: ended by the scheduler.
        await asyncio.to_thread(handshake_without_certificate, address, certs / CA)

        # None of them got a session; cairn's client still runs tasks.
        clients = await client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.clients))
        assert clients == sorted({client.id, "fire-and-forget"} & set(clients)) and client.id in clients
        assert await client.submit(pow, 2, 10, pure=False) == 1024
    finally:
        await compute.close()


def _listeners(proc: psutil.Process) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in proc.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


async def test_local_cluster_listens_on_loopback_only_over_tls(tmp_path: Path) -> None:
    me = psutil.Process()
    before = _listeners(me)
    # As the training service does (services/training/app.py: open_compute(self.settings)).
    compute = await open_compute(CairnSettings(home=tmp_path, dask="local", dask_workers=2))
    try:
        client = compute.client
        await asyncio.wait_for(client.wait_for_workers(2), timeout=120)
        # The client shares the scheduler's process and reaches it in memory; everything else
        # reaches it over TLS on loopback.
        assert client.scheduler.address.startswith("inproc://"), client.scheduler.address
        identity = await client.scheduler.identity()
        scheduler = identity["address"]
        assert scheduler.startswith("tls://127.0.0.1:"), scheduler
        workers = identity["workers"]
        assert len(workers) == 2
        for address, worker in workers.items():
            assert address.startswith("tls://127.0.0.1:"), address
            assert worker["nanny"].startswith("tls://127.0.0.1:"), worker["nanny"]

        # Every socket that accepts connections, in this process (scheduler, nannies) and in
        # each worker process (comm and HTTP endpoints), is bound to loopback.
        opened = _listeners(me) - before
        assert opened, "open_compute opened no listening socket in this process"
        worker_pids = set((await client.run(os.getpid)).values())
        for pid in worker_pids:
            assert _listeners(psutil.Process(pid)), f"worker {pid} listens nowhere?"
        everything = opened | {s for pid in worker_pids for s in _listeners(psutil.Process(pid))}
        assert {ip for ip, _ in everything} == {"127.0.0.1"}, everything

        # Loopback is shared by every user of the host: without the cluster's throwaway
        # certificate, a client on the same machine is refused.
        await refused(scheduler)
        assert isinstance(await refused(scheduler.replace("tls://", "tcp://")), OSError)
        assert await client.submit(pow, 3, 3, pure=False) == 27
    finally:
        await compute.close()


async def _heartbeat_ms(dask_worker: Any) -> float:
    """One heartbeat now, then the interval its reply set for the next."""
    await dask_worker.heartbeat()
    return dask_worker.periodic_callbacks["heartbeat"].callback_time


async def test_local_workers_report_at_the_paced_heartbeat(tmp_path: Path) -> None:
    """Dask asks a small cluster's workers for a heartbeat every 0.5 s; the local cluster paces them
    to LOCAL_HEARTBEAT_S (each reply names the next interval), and tasks still run."""
    compute = await open_compute(CairnSettings(home=tmp_path, dask="local", dask_workers=2))
    try:
        client = compute.client
        await asyncio.wait_for(client.wait_for_workers(2), timeout=120)
        workers = client.scheduler_info()["workers"]
        assert await client.run(_heartbeat_ms) == {address: 1000 * LOCAL_HEARTBEAT_S for address in workers}
        assert await client.submit(pow, 2, 5, pure=False) == 32
    finally:
        await compute.close()


async def test_tls_settings_that_cannot_work_fail_before_connecting(tmp_path: Path) -> None:
    certs = tmp_path / "dask-tls"
    write_dask_tls(certs)
    with pytest.raises(DaskTLSError, match="not tls://"):
        await open_compute(tls_settings(certs, tmp_path, dask="tcp://127.0.0.1:8786"))
    with pytest.raises(DaskTLSError, match="CAIRN_DASK_TLS_CA"):
        await open_compute(CairnSettings(home=tmp_path, dask="tls://127.0.0.1:8786"))
    with pytest.raises(DaskTLSError, match="CAIRN_DASK_TLS_KEY"):
        await open_compute(
            CairnSettings(
                home=tmp_path, dask="tls://127.0.0.1:8786", dask_tls_ca=certs / CA, dask_tls_cert=certs / CERT
            )
        )
    with pytest.raises(DaskTLSError, match="not found"):
        await open_compute(tls_settings(tmp_path / "nowhere", tmp_path, dask="tls://127.0.0.1:8786"))
    # The chart's DaskCluster scheduler Service, as the operator names it.
    settings = tls_settings(
        certs, tmp_path, dask="kubernetes", dask_k8s_cluster="cairn-dask", dask_k8s_namespace="ml"
    )
    assert kube_scheduler_address(settings) == "tls://cairn-dask-scheduler.ml.svc:8786"


def test_generated_certificates_serve_every_dask_role(tmp_path: Path) -> None:
    """One certificate for scheduler, workers and clients: each Dask process listens and connects."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    files = write_dask_tls(tmp_path)
    assert {p.name for p in files} == {CA, "ca.key", CERT, KEY}
    assert (tmp_path / KEY).stat().st_mode & 0o077 == 0 and (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    issued = (tmp_path / CERT).read_bytes()
    cert = x509.load_pem_x509_certificate(issued)
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ca_before = (tmp_path / CA).read_bytes()
    write_dask_tls(tmp_path)  # reissuing keeps the CA, so running members keep trusting it
    assert (tmp_path / CA).read_bytes() == ca_before
    assert (tmp_path / CERT).read_bytes() != issued
