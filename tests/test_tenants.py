"""Tenants isolated by the NATS server itself, tried as an attacker holding tenant A's credentials.

A real nats-server runs the config `cairn nats-config` generates for a home with two tenants (one
account each). With A's most powerful credentials (its admin, allowed `>` in its account) the test
tries to read, replay, forge into, hold in, delete and flood B's part, and B's stays whole: the
server, not cairn's code, keeps them apart. The second half drives the `cairn` executable on a fresh
home with two tenants from two environments, as two teams would from two shells.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import APIError

from contracts import DataArrived, subject_for
from services.platform.bus.connection import inbox_prefix
from services.platform.bus.embedded import EmbeddedNats
from services.platform.bus.provision import provision_all
from services.platform.settings import CairnSettings
from services.tools import gc, tenants
from services.tools.nats_auth import write_nats_config
from services.tools.supervisor import adopt_global_account, free_port
from tests.test_journeys import FAST_TABLE, cairn, user_env, write_table

A, B = "team-a", "team-b"
QUOTA = 2_000_000  # A's JetStream storage, small enough to fill
ACCOUNT_LIMITS_EXCEEDED = 10002  # JetStream's "resource limits exceeded for account"


@pytest.fixture
async def accounts(tmp_path: Path) -> AsyncIterator[dict]:
    """One server, the default tenant and two more, each account provisioned by its own admin."""
    base = CairnSettings(home=tmp_path / "home")
    tenants.add(base, A, QUOTA, 4)
    tenants.add(base, B, 10 * QUOTA, 4)
    auth = tmp_path / "auth"
    write_nats_config(auth, settings=base)
    server = EmbeddedNats(tmp_path / "nats", include=auth / "auth.conf")
    server.start()
    passwords = json.loads((auth / "secrets.json").read_text())

    async def connect(user: str, password: str | None = None) -> nats.NATS:
        return await nats.connect(
            server.url,
            user=user,
            password=password or passwords[user],
            inbox_prefix=inbox_prefix(user).encode(),
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )

    opened: list[nats.NATS] = []

    async def as_user(user: str, password: str | None = None) -> nats.NATS:
        nc = await connect(user, password)
        opened.append(nc)
        return nc

    for tenant in ("default", A, B):
        own = tenants.settings_for(base, tenant)
        await provision_all((await as_user(own.nats_user_name("admin"))).jetstream(), own)
    try:
        yield {"as": as_user, "server": server, "passwords": passwords, "base": base}
    finally:
        for nc in opened:
            if not nc.is_closed:
                await nc.close()
        server.stop()


def arrival(tenant: str) -> bytes:
    """A data-arrival event as an outside system would publish it (its uri names the tenant)."""
    return json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "cairn.data.arrived.v1",
            "payload": {"uri": f"file:///data/{tenant}/houses.csv", "format": "csv", "target": "price"},
        }
    ).encode()


async def messages(nc: nats.NATS, stream: str = "CAIRN") -> list[bytes]:
    """Every message of the stream this connection's account sees under that name."""
    js = nc.jetstream()
    last = (await js.stream_info(stream)).state.last_seq
    out = []
    for seq in range(1, last + 1):
        try:
            out.append((await js.get_msg(stream, seq)).data or b"")
        except Exception:  # noqa: BLE001 - a deleted sequence
            continue
    return out


async def test_a_admin_sees_nothing_of_b_and_b_nothing_of_a(accounts: dict) -> None:
    """A's admin may subscribe to `>`: it hears its own account's traffic and not one message of B's,
    and the stream it calls CAIRN holds only A's events."""
    admin_a = await accounts["as"](f"admin@{A}")
    heard: list[str] = []

    async def hear(msg: nats.aio.msg.Msg) -> None:
        heard.append(msg.subject)

    await admin_a.subscribe(">", cb=hear)
    await admin_a.flush()
    up_a = (await accounts["as"](f"upstream@{A}")).jetstream()
    up_b = (await accounts["as"](f"upstream@{B}")).jetstream()
    subject = subject_for(DataArrived)
    own, theirs = arrival(A), arrival(B)
    await up_a.publish(subject, own)
    await up_b.publish(subject, theirs)
    admin_b = await accounts["as"](f"admin@{B}")
    for _ in range(50):
        if subject in heard:
            break
        await asyncio.sleep(0.05)
    assert subject in heard, "A's admin never heard its own arrival: the listener did not work"
    assert await messages(admin_a) == [own]
    assert await messages(admin_b) == [theirs]
    assert await messages(await accounts["as"]("admin")) == []  # the default tenant saw neither
    # A replays its whole history through an ordered consumer: only its own event comes back.
    replay = await admin_a.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy="all")
    got = await replay.next_msg(timeout=5)
    assert got.data == own
    with pytest.raises(nats.errors.TimeoutError):
        await replay.next_msg(timeout=0.5)


async def test_a_credentials_do_not_open_b(accounts: dict) -> None:
    """B's user names with A's passwords are refused at the door."""
    for role in ("admin", "upstream", "reader", "serve", "training"):
        with pytest.raises(Exception) as refused:  # noqa: PT011 - nats-py raises by cause
            await accounts["as"](f"{role}@{B}", accounts["passwords"][f"{role}@{A}"])
        assert "authorization" in str(refused.value).lower() or isinstance(
            refused.value, nats.errors.NoServersError
        )


async def test_a_forged_event_in_bs_name_stays_in_a(accounts: dict) -> None:
    """An event that claims to be B's (B's dataset, a B-looking id) published with A's credentials
    lands in A's log; B's log has nothing new."""
    admin_b = await accounts["as"](f"admin@{B}")
    before = await messages(admin_b)
    up_a = (await accounts["as"](f"upstream@{A}")).jetstream()
    forged = arrival(B)
    ack = await up_a.publish(subject_for(DataArrived), forged, headers={"Nats-Msg-Id": f"{B}-forged"})
    assert ack.stream == "CAIRN"
    assert await messages(admin_b) == before
    assert forged in await messages(await accounts["as"](f"admin@{A}"))


async def test_a_destroying_everything_it_can_leaves_b_whole(accounts: dict) -> None:
    """A's admin holds, deletes and purges every stream and bucket it can name: B's stream, B's holds
    and B's buckets are untouched (gc and `tenant remove` act through the same credentials)."""
    up_b = (await accounts["as"](f"upstream@{B}")).jetstream()
    theirs = arrival(B)
    await up_b.publish(subject_for(DataArrived), theirs)
    js_b = (await accounts["as"](f"admin@{B}")).jetstream()
    b_hold = gc.Hold(id="keep-b", correlation="run-b", sha256=None, at=1.0, by="auditor of B")
    assert await gc.add_hold(js_b, b_hold) is None  # made, not found
    b_streams = sorted([i.config.name for i in await js_b.streams_info()])

    js_a = (await accounts["as"](f"admin@{A}")).jetstream()
    assert await gc.read_holds(js_a) == []  # B's hold is not visible from A
    # the same id made anew in A's bucket: B's is not there to be found
    assert (
        await gc.add_hold(js_a, gc.Hold(id="keep-b", correlation="run-b", sha256=None, at=2.0, by="A"))
        is None
    )
    for info in await js_a.streams_info():
        await js_a.delete_stream(info.config.name)
    assert await js_a.streams_info() == []

    assert sorted([i.config.name for i in await js_b.streams_info()]) == b_streams
    assert [h.by for h in await gc.read_holds(js_b)] == ["auditor of B"]
    assert await messages(await accounts["as"](f"admin@{B}")) == [theirs]


async def test_a_flood_stops_at_its_quota_and_b_keeps_writing(accounts: dict) -> None:
    """A's account has QUOTA bytes of JetStream storage: past it the server refuses A's writes, and
    B's go on."""
    js_a = (await accounts["as"](f"admin@{A}")).jetstream()
    info = await js_a.account_info()
    assert info.limits.max_storage == QUOTA
    up_a = (await accounts["as"](f"upstream@{A}")).jetstream()
    chunk = b"x" * 60_000
    with pytest.raises(APIError) as full:
        for _ in range(2 * QUOTA // len(chunk)):
            await up_a.publish(subject_for(DataArrived), chunk)
    assert full.value.err_code == ACCOUNT_LIMITS_EXCEEDED, full.value
    up_b = (await accounts["as"](f"upstream@{B}")).jetstream()
    ack = await up_b.publish(subject_for(DataArrived), arrival(B))
    assert ack.seq >= 1


def test_a_home_from_before_tenants_keeps_its_streams(tmp_path: Path) -> None:
    """Streams a server made in its global account (a home from before tenants) become the default
    account's: the folder moves whole, and nothing else is touched."""
    store = tmp_path / "nats" / "jetstream" / "jetstream"
    (store / "$G" / "streams" / "CAIRN").mkdir(parents=True)
    adopt_global_account(tmp_path / "nats")
    assert (store / "default" / "streams" / "CAIRN").is_dir()
    assert not (store / "$G").exists()
    (store / "$G").mkdir()  # both there: nothing is overwritten
    adopt_global_account(tmp_path / "nats")
    assert (store / "$G").is_dir() and (store / "default" / "streams" / "CAIRN").is_dir()


def test_sizes_and_names() -> None:
    assert tenants.parse_size("10GB") == 10_000_000_000
    assert tenants.parse_size("512MiB") == 512 * 1024**2
    assert tenants.parse_size("1000") == 1000
    with pytest.raises(tenants.TenantError, match="not a size"):
        tenants.parse_size("ten gigs")


@pytest.mark.slow
def test_two_teams_on_one_home_through_the_cli(tmp_path: Path) -> None:
    """Two shells: the operator adds team-b and starts cairn; team-b trains and is served in its own
    account; the default team sees none of it; removing team-b is refused while it holds a model,
    then archives its history and state, and team-b's users are gone from the server."""
    home = tmp_path / "home"
    env = user_env(home, CAIRN_SERVE_PORT="0", CAIRN_DASK_WORKERS="1", CAIRN_SERVE_GRPC_PORT=str(free_port()))
    team_b = {**env, "CAIRN_TENANT": B}
    table = write_table(tmp_path / "data")

    added = cairn(
        "tenant", "add", B, "--max-storage", "200MB", "--max-trials-in-flight", "2", env=env, cwd=tmp_path
    )
    assert added.returncode == 0, added.stderr
    unknown = cairn("--tenant", "nobody", "events", env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "no tenant 'nobody'" in unknown.stderr
    up = cairn("up", "--detach", "--timeout", "240", env=env, cwd=tmp_path, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        check_one_session_per_tenant(json.loads((home / "runtime.json").read_text())["pids"])
        run = cairn(
            "submit",
            str(table),
            "--target",
            "price",
            *FAST_TABLE,
            "--wait",
            env=team_b,
            cwd=tmp_path,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "cairn.model.deployed.v1" in cairn("events", env=team_b, cwd=tmp_path).stdout
        others = cairn("events", env=env, cwd=tmp_path)
        assert others.returncode == 0 and "cairn.data.arrived.v1" not in others.stdout, others.stdout
        row = json.dumps([{"x1": 0.1, "x2": 5.0, "colour": "red"}])
        assert cairn("predict", "--model", "houses-price", row, env=team_b, cwd=tmp_path).returncode == 0
        refused = cairn("predict", "--model", "houses-price", row, env=env, cwd=tmp_path)
        assert refused.returncode != 0  # the default team's endpoint has no such model
        assert cairn("audit", "verify", "--tenant", B, env=env, cwd=tmp_path).returncode == 0
        check_endpoint_token(
            json.loads((home / "tenants" / B / "runtime.json").read_text()), home / "tenants" / B
        )
        listed = cairn("tenant", "list", env=env, cwd=tmp_path)
        assert "200.0MB" in listed.stdout and B in listed.stdout, listed.stdout

        assert cairn("hold", "houses-price@1", env=team_b, cwd=tmp_path).returncode == 0
        assert cairn("hold", "--list", env=env, cwd=tmp_path).stdout.strip() == ""  # not the default's
        blocked = cairn("tenant", "remove", B, env=env, cwd=tmp_path)
        assert blocked.returncode == 1 and "holds" in blocked.stderr, blocked.stderr
        assert cairn("hold", "--release", "houses-price@1", env=team_b, cwd=tmp_path).returncode == 0
        removed = cairn("tenant", "remove", B, env=env, cwd=tmp_path, timeout=120)
        assert removed.returncode == 0, removed.stderr
        archive = next((home / tenants.REMOVED_DIR).iterdir())
        history = [json.loads(line) for line in (archive / "history.jsonl").read_text().splitlines()]
        assert any(r["subject"].endswith("model.deployed.v1") for r in history)
        assert (archive / "state" / "mlflow.db").exists()
        assert B not in json.loads((home / "nats-auth" / "secrets.json").read_text()).__repr__()
        gone = cairn("events", env=team_b, cwd=tmp_path)
        assert gone.returncode == 2 and "no tenant" in gone.stderr
    finally:
        cairn("down", env=env, cwd=tmp_path, timeout=60)


def check_endpoint_token(runtime: dict, home: Path) -> None:
    """team-b's endpoint answers team-b's token only, over HTTP and gRPC (tritonclient, as its users
    call it); its probes stay open."""
    import httpx
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, token = runtime["serve_url"], (home / "serve-token").read_text().strip()
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    for headers in ({}, {"authorization": "Bearer " + "x" * len(token)}, {"authorization": token}):
        refused = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
        assert refused.status_code == 401, refused.text
        refused = httpx.post(f"{url}/v2/models/houses-price/infer", headers=headers, json={}, timeout=5)
        assert refused.status_code == 401, refused.text
    mine = {"authorization": f"Bearer {token}"}
    assert "houses-price" in httpx.get(f"{url}/v1/models", headers=mine, timeout=5).json()
    with grpcclient.InferenceServerClient(url=runtime["grpc_address"]) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata("houses-price")
        assert "UNAUTHENTICATED" in str(refused.value.status())
        assert client.get_model_metadata("houses-price", headers=mine).name == "houses-price"


def check_one_session_per_tenant(pids: dict[str, int]) -> None:
    """Each tenant's processes share one session, so one scheduling autogroup: the kernel shares CPU
    between tenants, not between processes (bench/tenants.py); each still leads its own process group,
    so a group signal stops one service with its Dask workers and nothing else."""
    sessions: dict[str, set[int]] = {}
    for name, pid in pids.items():
        if name == "nats-server":
            continue
        assert os.getpgid(pid) == pid, f"{name} does not lead its own process group"
        tenant = name.split("/")[0] if "/" in name else "default"
        sessions.setdefault(tenant, set()).add(os.getsid(pid))
    assert set(sessions) == {"default", B}
    assert all(len(s) == 1 for s in sessions.values()), sessions
    assert sessions["default"] != sessions[B]
