"""Least-privilege NATS credentials, derived from the contracts (TLS material: services.platform.tls).

`write_nats_config(out, tls)` (behind `cairn nats-config`) writes:

- `auth.conf`: one account per tenant (`services.tools.tenants`; the `default` account when there is
  none) with, in each, one user per service, `serve`, `reader`, `admin` and `upstream`, each allowed
  exactly the subjects its role needs within its account (and a `tls` block with --tls);
- `nats-server.conf`: a complete server config (JetStream, `sync_interval: always`, 8 MB
  payloads) that includes `auth.conf`, for operators who run their own nats-server;
- `secrets.json` (mode 0600): the random password of every user;
- with --tls, `tls/`: a CA, a server certificate (SAN 127.0.0.1, ::1, localhost) and a client
  certificate for mutual TLS, generated with `cryptography`.

Nothing here is hand-copied from the services: what a service may publish comes from each payload
class's `PRODUCER` (`contracts.PRODUCERS`); which consumers it binds (durable name and filter
subject) is read off the subscribers its own code registers on a broker that is never connected.
A new route or a new event type changes the permissions the next time the config is generated.

The permission model (subjects for namespace `cairn`, stream `CAIRN`):

- publish its own event types, `cairn.event.rejected.v1` and its dead-letter subject
  `cairn.dlq.<service>` (services that consume through the consumer policy);
- consumer API only for its own durables: create with the filter subject pinned in the API
  subject (`$JS.API.CONSUMER.CREATE.CAIRN.<durable>.<filter>`, which the server checks against
  the request), info, next-message and acks (`$JS.ACK.CAIRN.<durable>.>`);
- replies only on its own inbox prefix `_INBOX_<user>` (see `services.platform.bus.connection`), so one
  service cannot read another's JetStream deliveries or API replies;
- no stream administration, no direct get and no message get on the event stream: reading the
  log is done through the consumers above; provisioning is the `admin` user's job.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from contracts import (
    PRODUCERS,
    UPSTREAM,
    EventRejected,
    ModelDeployed,
    dead_letter_subject,
    subject_for,
)
from contracts.records import record_subject
from services.platform.bus.connection import inbox_prefix
from services.platform.bus.consumer import durable_name
from services.platform.bus.provision import cache_bucket, champion_bucket, handled_bucket, study_bucket
from services.platform.settings import CairnSettings
from services.platform.tls import write_file, write_tls
from services.tools import tenants
from services.tools.tenants import Tenant

ADMIN = "admin"
SERVE = "serve"
READER = "reader"  # the CLI's read-only user (cairn events, status, lineage, submit --wait's watch)

# Grants no contract can express: the key-value bucket tuning keeps its study state in (its
# subjects and the JetStream API calls the KV client makes), and the serving process's watch on
# deployments. Each is explained where it is built.
KV_USERS = ("tuning",)
# Deployment moves the champion by compare-and-set on its record (services.deployment.lock).
CHAMPION_KV_USERS = ("deployment",)


@dataclass
class Grants:
    user: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    role: str = ""

    def add_pub(self, *subjects: str) -> None:
        for s in subjects:
            if s not in self.publish:
                self.publish.append(s)

    def add_sub(self, *subjects: str) -> None:
        for s in subjects:
            if s not in self.subscribe:
                self.subscribe.append(s)


@dataclass(frozen=True)
class ConsumerGrant:
    durable: str
    filter_subject: str
    inbox: str  # the prefix its pull deliveries arrive on, e.g. "_INBOX_training."
    routed: bool  # registered through the consumer policy (may reject and dead-letter)


def service_consumers(name: str, settings: CairnSettings) -> list[ConsumerGrant]:
    """The durable consumers a service registers, read off a broker that never connects."""
    from services.platform.runtime import ServiceRunner
    from services.tools.catalog import build_service

    runner = ServiceRunner(build_service(name, settings))
    routed = {durable_name(name, r.payload_cls, settings.namespace) for r in runner.service.routes()}
    out = []
    for sub in runner.broker.subscribers:
        config = getattr(sub, "config", None)
        durable = getattr(config, "durable_name", None)
        if not durable:
            continue
        filter_subject = config.filter_subject or str(sub.subject)
        prefix = (getattr(sub, "extra_options", None) or {}).get("inbox_prefix") or b"_INBOX."
        inbox = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        out.append(ConsumerGrant(durable, filter_subject, inbox, durable in routed))
    return out


def cache_steps(name: str, settings: CairnSettings) -> set[str]:
    """The steps whose outputs a service keeps in the step cache (its routes' `cache_version`)."""
    from services.tools.catalog import build_service

    routes = build_service(name, settings).routes()
    return {r.cache_version.step for r in routes if r.cache_version is not None}


def _jetstream_consumer_grants(g: Grants, stream: str, consumer: ConsumerGrant) -> None:
    api = "$JS.API.CONSUMER"
    # nats-py creates a durable through CREATE.<stream>.<name>.<filter>; the server refuses a
    # request whose config filter differs from the one in the subject, so the filter is pinned.
    # (A wildcard filter such as lineage's `cairn.>` acts as a wildcard here too: it reads all.)
    g.add_pub(
        f"{api}.CREATE.{stream}.{consumer.durable}.{consumer.filter_subject}",
        f"{api}.INFO.{stream}.{consumer.durable}",
        f"{api}.MSG.NEXT.{stream}.{consumer.durable}",
        f"$JS.ACK.{stream}.{consumer.durable}.>",
    )
    # Pull deliveries come to the subscriber's inbox. A subscriber left on FastStream's default
    # `_INBOX.` forces a grant on every default inbox: pass services.platform.bus.consumer.pull_inbox_prefix.
    g.add_sub(consumer.inbox.rstrip(".") + ".>")


def _kv_grants(g: Grants, bucket: str) -> None:
    """What nats-py's KeyValue client publishes: puts on $KV.<bucket>.>, gets through the API."""
    kv_stream = f"KV_{bucket}"
    g.add_pub(
        f"$KV.{bucket}.>",
        f"$JS.API.STREAM.INFO.{kv_stream}",
        f"$JS.API.DIRECT.GET.{kv_stream}.>",
        f"$JS.API.DIRECT.GET.{kv_stream}",
        f"$JS.API.STREAM.MSG.GET.{kv_stream}",
    )


def _ledger_grants(g: Grants, bucket: str, service: str) -> None:
    """The consumer policy's handled-inputs ledger (services.platform.bus.ledger): a service puts and reads
    only keys under its own name (`<service>.>`); reads are direct gets that name the key."""
    kv_stream = f"KV_{bucket}"
    g.add_pub(
        f"$KV.{bucket}.{service}.>",
        f"$JS.API.STREAM.INFO.{kv_stream}",
        f"$JS.API.DIRECT.GET.{kv_stream}.$KV.{bucket}.{service}.>",
    )


def _retention_grants(g: Grants, stream: str) -> None:
    """Lineage trims what it archived (services.lineage.archive): it lists the consumers, so as not
    to trim what one has not processed, and purges up to a sequence. Only when retention is set."""
    g.add_pub(f"$JS.API.CONSUMER.LIST.{stream}", f"$JS.API.STREAM.PURGE.{stream}")


def _reader_grants(stream: str, user: str) -> Grants:
    """Reads the log and nothing else: ordered consumers (created through the legacy ephemeral
    subject, which the server refuses for a durable name), their flow control, stream and consumer
    info. No event, no durable, no KV, no administration."""
    g = Grants(user, role="the command line's reader (cairn events, status, lineage, submit --wait)")
    g.add_pub(
        "$JS.API.STREAM.NAMES",  # nats-py's subscribe looks up the stream of the subject
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    )
    g.add_sub(f"{inbox_prefix(user)}.>")
    return g


def derive_permissions(settings: CairnSettings | None = None) -> dict[str, Grants]:
    """Every user and what it may publish and subscribe to, derived from contracts and services."""
    from services.tools.catalog import SERVICES

    base = settings or CairnSettings()
    # A URL is needed to build a broker object; nothing connects to it.
    base = base.model_copy(update={"nats_url": base.nats_url or "nats://127.0.0.1:4222"})
    ns, stream = base.namespace, base.stream
    user = base.nats_user_name  # `<role>@<tenant>`: a tenant's users, the bare role for the default's
    users: dict[str, Grants] = {}

    for name in SERVICES:
        g = Grants(user(name), role=f"the {name} service")
        g.add_sub(f"{inbox_prefix(user(name))}.>")
        g.add_pub(f"$JS.API.STREAM.INFO.{stream}")  # a service waits for the stream before it starts
        g.add_pub(*(subject_for(t, ns) for t, producer in sorted(PRODUCERS.items()) if producer == name))
        # Built as it runs under its own user, so the inboxes are the ones it will really use.
        consumers = service_consumers(name, base.model_copy(update={"nats_user": user(name)}))
        if any(c.routed for c in consumers):  # the consumer policy may reject and dead-letter
            g.add_pub(subject_for(EventRejected, ns), dead_letter_subject(name, ns))
            _ledger_grants(g, handled_bucket(ns), name)
        for consumer in consumers:
            _jetstream_consumer_grants(g, stream, consumer)
        for step in sorted(cache_steps(name, base)):
            _ledger_grants(g, cache_bucket(ns), step)  # the step cache: its own `<step>.>` keys only
        if name in KV_USERS:
            _kv_grants(g, study_bucket(ns))
        if name in CHAMPION_KV_USERS:
            _kv_grants(g, champion_bucket(ns))
        if name == "lineage" and (base.retention_max_age_s or base.retention_max_bytes):
            _retention_grants(g, stream)
        users[user(name)] = g

    # The inference endpoint: reads deployments through its own short-lived push consumers, whose
    # names are random but whose filter is pinned to the deployed subject; stream info gives it
    # the sequence to start from.
    serve = Grants(user(SERVE), role=f"the inference endpoint (reads {subject_for(ModelDeployed)} only)")
    deployed = subject_for(ModelDeployed, ns)
    serve.add_sub(f"{inbox_prefix(user(SERVE))}.>")
    serve.add_pub(f"$JS.API.CONSUMER.CREATE.{stream}.*.{deployed}", f"$JS.API.STREAM.INFO.{stream}")
    serve.add_pub(record_subject(ns))  # sampled request records, on their own stream
    # What the endpoint publishes to the log (its refusals, `model.refused`), from the contracts.
    serve.add_pub(*(subject_for(t, ns) for t, producer in sorted(PRODUCERS.items()) if producer == SERVE))
    users[user(SERVE)] = serve

    upstream = Grants(user(UPSTREAM), role="an outside system that announces data")
    upstream.add_pub(
        *(subject_for(t, ns) for t, producer in sorted(PRODUCERS.items()) if producer == UPSTREAM)
    )
    upstream.add_sub(f"{inbox_prefix(user(UPSTREAM))}.>")  # the stream's PubAck comes back here
    users[user(UPSTREAM)] = upstream

    users[user(READER)] = _reader_grants(stream, user(READER))
    # Only operator tools reach the holds bucket (services.tools.gc, bucket cairn_holds): `cairn hold` writes
    # it, `cairn gc` reads it; no service user is granted it, so a compromised service cannot
    # release a legal hold.
    # Everything, but only in its own account: a tenant's admin can name nothing of another's.
    admin = Grants(
        user(ADMIN), role="provisioning and operator tools (cairn provision, status, events, hold, gc)"
    )
    admin.add_pub(">")
    admin.add_sub(">")
    users[user(ADMIN)] = admin
    return users


# Rendering -----------------------------------------------------------------------------------
def _q(value: str) -> str:
    """A quoted string for the nats-server config (JSON quoting is valid there; no $ expansion)."""
    return json.dumps(value)


def _list(values: Iterable[str], indent: str) -> str:
    items = list(values)
    if not items:
        return "[]"
    inner = (",\n" + indent + "  ").join(_q(v) for v in items)
    return f"[\n{indent}  {inner}\n{indent}]"


def _render_users(users: dict[str, Grants], passwords: dict[str, str], ind: str) -> str:
    blocks = []
    for name, g in users.items():
        blocks.append(
            f"""{ind}# {g.role}
{ind}{{
{ind}  user: {_q(name)}
{ind}  password: {_q(passwords[name])}
{ind}  permissions: {{
{ind}    publish: {{ allow: {_list(g.publish, ind + "    ")} }}
{ind}    subscribe: {{ allow: {_list(g.subscribe, ind + "    ")} }}
{ind}  }}
{ind}}}"""
        )
    return ",\n".join(blocks)


def _jetstream_limits(tenant: Tenant) -> str:
    """`enabled` (the server's limits) for the default tenant; a tenant's own quota otherwise. Memory
    storage is not used by cairn (every stream and bucket is on file), so a tenant gets none."""
    if tenant.max_storage_bytes is None:
        return "enabled"
    return f"{{ max_file: {tenant.max_storage_bytes}, max_mem: 0 }}"


def render_auth(
    accounts: dict[str, tuple[Tenant, dict[str, Grants]]], passwords: dict[str, str], tls_dir: Path | None
) -> str:
    """One NATS account per tenant, its users inside: the server keeps each account's subjects,
    streams and buckets apart, so isolation does not rest on cairn's code (docs/TENANTS.md)."""
    blocks = []
    for account, (tenant, users) in accounts.items():
        blocks.append(
            f"""  # tenant {tenant.name}
  {_q(account)}: {{
    jetstream: {_jetstream_limits(tenant)}
    users: [
{_render_users(users, passwords, "      ")}
    ]
  }}"""
        )
    text = (
        "# Generated by `cairn nats-config`: one account per tenant and in it one user per role, least\n"
        "# privilege, derived from the contracts (contracts/schemas.py PRODUCERS) and the consumers each\n"
        "# service registers.\n"
        "authorization {\n  timeout: 5\n}\n"
        "accounts {\n" + "\n".join(blocks) + "\n}\n"
    )
    if tls_dir is not None:
        text += f"""
tls {{
  cert_file: {_q(str(tls_dir / "server-cert.pem"))}
  key_file: {_q(str(tls_dir / "server-key.pem"))}
  ca_file: {_q(str(tls_dir / "ca.pem"))}
  # Mutual TLS: clients present a certificate signed by the CA, then authenticate as their user.
  verify: true
  timeout: 5
}}
"""
    return text


def render_server(out: Path) -> str:
    return f"""# A complete nats-server config for cairn (`nats-server -c {out / "nats-server.conf"}`).
listen: "0.0.0.0:4222"
max_payload: 8MB
jetstream {{
  store_dir: {_q(str(out / "jetstream"))}
  # fsync before every PubAck: an acknowledged event survives a host crash (docs/RELIABILITY.md).
  sync_interval: always
}}
include "auth.conf"
"""


def _passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """Keep the passwords already issued (no silent rotation); make new ones for new users."""
    existing: dict[str, str] = {}
    if path.exists():
        existing = json.loads(path.read_text())
    return {u: existing.get(u) or secrets.token_urlsafe(24) for u in users}


def write_nats_config(out: Path, tls: bool = False, settings: CairnSettings | None = None) -> list[Path]:
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = settings or CairnSettings()
    accounts = {
        t.name: (t, derive_permissions(tenants.settings_for(base, t.name))) for t in tenants.every(base)
    }
    secrets_path = out / "secrets.json"
    passwords = _passwords(secrets_path, [u for _, users in accounts.values() for u in users])
    written = [write_file(secrets_path, json.dumps(passwords, indent=2) + "\n", 0o600)]
    tls_dir = out / "tls" if tls else None
    if tls_dir is not None:
        written += write_tls(tls_dir)
    written.append(write_file(out / "auth.conf", render_auth(accounts, passwords, tls_dir), 0o600))
    written.append(write_file(out / "nats-server.conf", render_server(out), 0o600))
    return written


def credentials_env(out: Path, user: str) -> dict[str, str]:
    """The CAIRN_NATS_* variables one user's processes need (TLS files when they exist)."""
    out = Path(out)
    env = {
        "CAIRN_NATS_USER": user,
        "CAIRN_NATS_PASSWORD": json.loads((out / "secrets.json").read_text())[user],
    }
    tls_dir = out / "tls"
    if (tls_dir / "ca.pem").exists():
        env |= {
            "CAIRN_NATS_TLS_CA": str(tls_dir / "ca.pem"),
            "CAIRN_NATS_TLS_CERT": str(tls_dir / "client-cert.pem"),
            "CAIRN_NATS_TLS_KEY": str(tls_dir / "client-key.pem"),
        }
    return env
