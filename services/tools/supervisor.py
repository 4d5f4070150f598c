"""`cairn up`: an embedded nats-server (unless CAIRN_NATS_URL is set), every service as its own
process, and the inference server; the URLs go into $CAIRN_HOME/runtime.json for other commands.

Children die with the supervisor whatever ends it: SIGTERM and SIGINT stop them in order
(`down`); SIGKILL, which cannot be caught, reaches them through the kernel's parent-death signal
(`die_with_parent`). A detached start (`cairn up --detach`) leaves them running for `cairn down`.

Least privilege on one host: the embedded nats-server runs with the users and permissions of
operator mode (`services.tools.nats_auth`), their passwords in `$CAIRN_HOME/nats-auth` (0700, files
0600); each child gets only its own user's, and health ports bind 127.0.0.1.

Stop only what we started: each child's identity (boot id, start time, command line, from /proc) is
recorded beside its pid, and nothing is signalled unless the process with that pid still has it, so
a pid the kernel reused (after a reboot, or a long time) is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from services.platform.bus.embedded import EmbeddedNats, die_with_parent
from services.platform.endpoint_token import ensure_token
from services.platform.settings import DEFAULT_TENANT, NATS_AUTH_DIR, RUNTIME_FILE, CairnSettings
from services.platform.tls import write_file
from services.tools import forks, tenants
from services.tools.catalog import SERVICES
from services.tools.nats_auth import ADMIN, SERVE, credentials_env
from services.tools.provisioning import provision_everything

LOOPBACK = "127.0.0.1"
PROC = Path("/proc")


class PortInUse(RuntimeError):
    """The inference port is taken (often by another `cairn up`)."""


def free_port(handed_out: set[int] | None = None) -> int:
    """A port free now for a child to bind right after (a health or endpoint port).

    Chosen below the kernel's ephemeral range: outgoing connections (NATS clients, Dask, MLflow)
    take their local ports from that range, and one of them took a port picked from it before the
    child bound it (a service then died with "address already in use"). `handed_out`: the ports
    already given to children not yet bound, never given twice (it gains the one returned): two
    services once drew the same one, the second died, and the first answered the second's
    readiness probe.
    """
    low = _ephemeral_range_start()
    pick = random.SystemRandom()
    taken = handed_out if handed_out is not None else set()
    for _ in range(200):
        port = pick.randrange(10_000, low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        taken.add(port)
        return port
    with socket.socket() as s:  # a crowded machine: any free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    taken.add(port)
    return port


def _ephemeral_range_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768  # Linux's default; other systems start higher
    return max(low, 10_001)


def check_port(host: str, port: int) -> None:
    """Fail before starting anything when the endpoint could not bind (it binds with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PortInUse(
                f"port {port} on {host} is in use (another `cairn up`?): set CAIRN_SERVE_PORT to a free "
                "port, or 0 for any"
            ) from None


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, tied: bool = False
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "services.tools.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so `down` stops its Dask workers with it
            preexec_fn=die_with_parent() if tied else None,  # noqa: PLW1509
        )
    finally:
        log.close()


PASSWORDS_DIR = "passwords"


def write_local_auth(settings: CairnSettings) -> Path:
    """The embedded server's users, permissions and passwords (`services.tools.nats_auth`, as `cairn
    nats-config` writes them for operators) in a folder only the home's owner can enter."""
    from services.tools.nats_auth import write_nats_config

    auth = settings.home_dir / NATS_AUTH_DIR
    auth.mkdir(mode=0o700, exist_ok=True)
    auth.chmod(0o700)  # also when an older start made it
    write_nats_config(auth, settings=settings)
    passwords = auth / PASSWORDS_DIR  # one file per user: a forked child reads its own only
    passwords.mkdir(mode=0o700, exist_ok=True)
    issued = json.loads((auth / "secrets.json").read_text())
    for user, password in issued.items():
        write_file(passwords / user, password, 0o600)
    for stale in passwords.iterdir():  # a removed tenant's users
        if stale.name not in issued:
            stale.unlink()
    return auth


def reload_nats(pid: int) -> None:
    """nats-server rereads its config on SIGHUP: accounts and users added or removed take effect at
    once (a removed user's connections are closed)."""
    os.kill(pid, signal.SIGHUP)


def child_env(base: dict[str, str], credentials: dict[str, str] | None) -> dict[str, str]:
    """A child's environment: with `credentials` (the embedded server's), only those, so a NATS user,
    password or TLS file set in the caller's shell never reaches a child; else `base` as it is."""
    if credentials is None:
        return base
    kept = {k: v for k, v in base.items() if not k.startswith("CAIRN_NATS_") or k == "CAIRN_NATS_URL"}
    return {**kept, **credentials}


def up(
    settings: CairnSettings, services: list[str] | None = None, serve: bool = True, tied: bool = True
) -> dict:
    """Start everything; `tied`: children die with this process (foreground `cairn up`).

    With the embedded server, every tenant's services start (services.tools.tenants), each child as
    its own NATS user of its tenant's account (the endpoint as `serve`), provisioning as `admin`.
    With CAIRN_NATS_URL, that server's business: only CAIRN_TENANT's services start, with the
    caller's credentials, if any."""
    home = settings.root_dir
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    handed_out: set[int] = set()
    serve_port = settings.serve_port or free_port(handed_out)
    if serve:
        check_port(settings.serve_host, serve_port)
    runtime: dict = {"pids": {}, "started": time.time(), "health": {}, "identities": {}}
    if tied:
        runtime["supervisor"] = os.getpid()
        remember(runtime, os.getpid())
    path = home / RUNTIME_FILE
    with children_of(settings, runtime, tied) as start:
        auth: Path | None = None
        if settings.nats_url:
            runtime["nats_url"] = settings.nats_url
        else:
            auth = write_local_auth(settings)
            adopt_global_account(home / "nats")
            server = EmbeddedNats(home / "nats", include=auth / "auth.conf", tied_to_parent=tied)
            runtime["nats_url"] = server.start()
            runtime["nats_auth"] = str(auth)
            record(runtime, "nats-server", server.process)  # type: ignore[arg-type]
        write_runtime(path, runtime)  # `down` can stop a half-finished start
        settings = settings.model_copy(update={"nats_url": runtime["nats_url"]})
        env = {
            **os.environ,
            **settings.to_env(),
            "CAIRN_HOME": str(home),
            "CAIRN_NATS_URL": runtime["nats_url"],
            "CAIRN_ALLOWED_ROOTS": json.dumps([str(r) for r in settings.read_roots]),
            "CAIRN_HEALTH_HOST": LOOPBACK,
        }
        everyone = tenants.every(settings)
        if not auth:
            everyone = [t for t in everyone if t.name == settings.tenant]
        names = services or list(SERVICES)
        grouped = len(everyone) > 1
        start_tenant = TenantStarter(
            env, auth, runtime, path, start, names, serve, serve_port, grouped, handed_out
        )
        for tenant in everyone:
            own = tenants.settings_for(settings, tenant.name)
            asyncio.run(provision_everything(_as_user(own, auth, ADMIN) if auth else own))
            start_tenant(own, tenant)
    write_runtime(path, runtime)
    return runtime


@dataclass
class TenantStarter:
    """What every tenant's start shares: the base environment, the server's users (None: an outside
    server's), the runtime record (and its file) and the function that starts a child."""

    base: dict[str, str]
    auth: Path | None
    runtime: dict
    runtime_path: Path
    start: Start
    services: list[str]
    serve: bool
    serve_port: int
    grouped: bool  # several tenants: each one's processes share a session (fair CPU between tenants)
    handed_out: set[int]  # ports given to children (free_port)

    def __call__(self, settings: CairnSettings, tenant: tenants.Tenant) -> None:
        """One tenant's services and endpoint, as its own NATS users, with its state under its home.
        The default tenant's are named as they always were (`training`); another's `<tenant>/training`."""
        home, auth, runtime = settings.home_dir, self.auth, self.runtime
        (home / "logs").mkdir(parents=True, exist_ok=True)
        default = tenant.name == DEFAULT_TENANT
        env = {**self.base, "CAIRN_TENANT": tenant.name}  # its home, its user names, its MLflow prefix
        if tenant.max_trials_in_flight is not None:
            env["CAIRN_TRIAL_CONCURRENCY"] = str(tenant.max_trials_in_flight)
        own: dict = {"tenant": tenant.name, "nats_url": runtime["nats_url"], "pids": {}, "health": {}}
        if auth is not None:
            own["nats_auth"] = str(auth)

        def child(role: str, args: list[str], extra: dict[str, str], log: str) -> None:
            user = settings.nats_user_name(role)
            credentials = credentials_env(auth, user) if auth else None
            name = role if default else f"{tenant.name}/{role}"
            password = auth / PASSWORDS_DIR / user if auth else None
            group = tenant.name if self.grouped else None
            self.start(
                name, args, {**child_env(env, credentials), **extra}, home / "logs" / log, password, group
            )
            own["pids"][role] = runtime["pids"][name]
            write_runtime(self.runtime_path, runtime)  # `down` can stop a half-finished start

        for name in self.services:
            port = free_port(self.handed_out)
            child(name, ["run", name], {"CAIRN_HTTP_PORT": str(port)}, f"{name}.log")
            own["health"][name] = f"http://{LOOPBACK}:{port}"
            runtime["health"][name if default else f"{tenant.name}/{name}"] = own["health"][name]
        if self.serve:
            if not default:  # a tenant's endpoint answers its own token's holders only
                ensure_token(home)
            # `serving start`: the endpoint with its CAIRN_SERVE_WORKERS worker processes
            port = self.serve_port if default else free_port(self.handed_out)
            extra = {}
            if settings.serve_grpc_port and not default:  # the configured port is the default's
                extra["CAIRN_SERVE_GRPC_PORT"] = str(free_port(self.handed_out))
                own["grpc_address"] = f"{settings.serve_host}:{extra['CAIRN_SERVE_GRPC_PORT']}"
            child(SERVE, ["serving", "start", "--port", str(port)], extra, "serve.log")
            own["serve_url"] = f"http://{settings.serve_host}:{port}"
            if default:
                runtime["serve_url"] = own["serve_url"]
            else:
                runtime["health"][f"{tenant.name}/serve"] = own["serve_url"]
        if not default:
            own["identities"] = {str(p): runtime["identities"].get(str(p)) for p in own["pids"].values()}
            write_runtime(home / RUNTIME_FILE, own)


def adopt_global_account(workdir: Path) -> None:
    """Streams made before tenants existed live in the server's global account (`$G`), which has no
    JetStream once accounts are defined: its store folder becomes the `default` account's, whole."""
    store = workdir / "jetstream" / "jetstream"
    legacy, default = store / "$G", store / DEFAULT_TENANT
    if legacy.is_dir() and not default.exists():
        legacy.rename(default)


def write_runtime(path: Path, runtime: dict) -> None:
    """Replace the file whole: a service starting reads it for the NATS URL while `up` still adds
    to it, and a file being rewritten in place reads empty for a moment."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(runtime, indent=2))
    partial.replace(path)


# start(name, args, env, log, password file, group): one child, recorded in the runtime
Start = Callable[[str, list[str], dict[str, str], Path, Path | None, str | None], None]


@contextlib.contextmanager
def children_of(settings: CairnSettings, runtime: dict, tied: bool) -> Iterator[Start]:
    """`start(...)`: a child recorded in the runtime, forked from one launcher that has imported the
    services' libraries once (`services.tools.cli.launcher`; CAIRN_PRELOAD=false or not Linux: its own
    interpreter each, and no group: each its own session). The launcher starts importing on
    entry, so its imports overlap the NATS start and provisioning."""
    if not (settings.preload and forks.available()):

        def spawn_each(
            name: str, args: list[str], child: dict[str, str], log: Path, _: Path | None, group: str | None
        ) -> None:
            record(runtime, name, spawn(args, child, log, tied))

        yield spawn_each
        return
    logs = settings.root_dir / "logs"
    launcher = forks.Launcher.start(child_env(dict(os.environ), {}), logs / "launcher.log", tied)
    runtime["launcher"] = launcher.process.pid  # `down` waits for it too, so nothing outlives `down`
    argv = [str(a) for a in launcher.process.args]  # type: ignore[union-attr]
    remember(runtime, launcher.process.pid, argv)
    try:

        def fork_each(
            name: str,
            args: list[str],
            child: dict[str, str],
            log: Path,
            password: Path | None,
            group: str | None,
        ) -> None:
            # The password goes by file, never through the launcher: what the launcher's memory
            # held, every later fork would inherit.
            if password is not None:
                child = {k: v for k, v in child.items() if k != forks.PASSWORD_VARIABLE}
            pid = launcher.spawn(args, child, log, tied, password, group)
            runtime["pids"][name] = pid
            remember(runtime, pid)

        yield fork_each
    finally:
        launcher.close()


def _as_user(settings: CairnSettings, auth: Path, role: str) -> CairnSettings:
    """`role`'s user of the settings' tenant, with its password."""
    user = settings.nats_user_name(role)
    password = credentials_env(auth, user)["CAIRN_NATS_PASSWORD"]
    return settings.model_copy(update={"nats_user": user, "nats_password": SecretStr(password)})


def wait_ready(runtime: dict, timeout: float = 120.0) -> dict[str, str]:
    """Poll every /readyz until all answer 200, each service as itself (a port another service
    holds answers too); returns what is still not ready on timeout."""
    urls = {n: u + "/readyz" for n, u in runtime.get("health", {}).items()}
    if "serve_url" in runtime:
        urls["serve"] = runtime["serve_url"] + "/readyz"
    pending = dict(urls)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while pending and time.monotonic() < deadline:
            for name, url in list(pending.items()):
                if (gone := exited(runtime, name)) is not None:
                    return {name: gone}
                try:
                    answer = client.get(url)
                    if answer.status_code == 200 and answers_as(answer, name, runtime):
                        del pending[name]
                except (httpx.HTTPError, ValueError):
                    pass
            if pending:
                time.sleep(0.25)
    return {n: "not ready" for n in pending}


def answers_as(answer: httpx.Response, name: str, runtime: dict) -> bool:
    """Whether a service's readiness answer comes from that service (`tenant/role` or `role`); the
    endpoint's is not checked."""
    if name not in runtime.get("health", {}):
        return True
    return answer.json().get("service") == name.rsplit("/", 1)[-1]


def exited(runtime: dict, name: str) -> str | None:
    """Why a child is gone (for the supervisor's report), or None while it runs."""
    pid = runtime["pids"].get(name)
    if pid is None or alive(pid):
        return None
    return f"process exited (see logs/{name}.log)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


# Process identity: a pid alone names whatever process has it now -----------------------------
def start_ticks(stat: str) -> int:
    """Field 22 of /proc/PID/stat (start time, clock ticks after boot). The command name (field 2)
    may hold spaces and parentheses, so fields are counted from its closing parenthesis."""
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def identity(pid: int) -> dict | None:
    """What tells this process apart from a later one given the same pid: the boot it runs in, when
    it started, its command line. None when no process has the pid (or it is a zombie)."""
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()
        stat = (PROC / str(pid) / "stat").read_text()
        boot = (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except (OSError, ValueError):
        return None
    if not cmdline:  # a zombie: it has exited
        return None
    return {
        "boot": boot,
        "start": start_ticks(stat),
        "cmdline": cmdline.rstrip(b"\0").decode(errors="replace").split("\0"),
    }


def same_process(recorded: dict | None, current: dict | None) -> bool:
    """Signal only on a full match: no record (a file from an older cairn) is no proof either."""
    return recorded is not None and current == recorded


def remember(runtime: dict, pid: int, argv: list[str] | None = None, timeout: float = 5.0) -> None:
    """Record `pid`'s identity; with `argv`, once its command line is that: right after the exec the
    kernel can show none (or the parent's) for a moment, and that record would never match again."""
    deadline = time.monotonic() + timeout
    current = identity(pid)
    while argv is not None and (current is None or current["cmdline"] != argv):
        if time.monotonic() > deadline or not (PROC / str(pid)).exists():
            break
        time.sleep(0.005)
        current = identity(pid)
    runtime.setdefault("identities", {})[str(pid)] = current


def record(runtime: dict, name: str, proc: subprocess.Popen) -> None:
    """A child's pid and identity, to check before `down` signals it."""
    runtime["pids"][name] = proc.pid
    remember(runtime, proc.pid, [str(a) for a in proc.args])  # type: ignore[union-attr]


def is_ours(runtime: dict, pid: int) -> bool:
    """Whether `pid` is still the process this runtime record started (without /proc, not Linux,
    there is nothing to compare: whether it runs)."""
    if not (PROC / "self" / "stat").exists():
        return alive(pid)
    return same_process(runtime.get("identities", {}).get(str(pid)), identity(pid))


def still_running(settings: CairnSettings) -> list[str]:
    """What a previous `cairn up` from this home left running (an empty list for a stale record)."""
    runtime = settings.runtime()
    return [name for name, pid in runtime.get("pids", {}).items() if is_ours(runtime, pid)]


def running_supervisor(settings: CairnSettings) -> int | None:
    """The pid of a foreground `cairn up` still running from this home, if any."""
    runtime = settings.runtime()
    pid = runtime.get("supervisor")
    return pid if pid and pid != os.getpid() and is_ours(runtime, pid) else None


def stop_tenant(settings: CairnSettings, tenant: str, timeout: float = 12.0) -> list[str]:
    """Stop one tenant's services and endpoint (`<tenant>/...` in the home's record), leaving the rest."""
    path = settings.root_dir / RUNTIME_FILE
    if not path.exists():
        return []
    runtime = json.loads(path.read_text())
    names = [n for n in runtime.get("pids", {}) if n.startswith(f"{tenant}/")]
    ours = {n: runtime["pids"][n] for n in names if is_ours(runtime, runtime["pids"][n])}
    stopped = _stop_groups(ours, timeout, runtime)
    for name in names:
        runtime["pids"].pop(name, None)
        runtime["health"].pop(name, None)
    write_runtime(path, runtime)
    return stopped


@dataclass
class Stopped:
    stopped: list[str] = field(default_factory=list)  # were running, signalled
    gone: list[str] = field(default_factory=list)  # recorded, but their pid is not (or no longer) ours


def down(settings: CairnSettings, timeout: float = 12.0) -> list[str]:
    """Stop what `cairn up` started from this home (see `stop_recorded`); returns who was running."""
    return stop_recorded(settings, timeout).stopped


def stop_recorded(settings: CairnSettings, timeout: float = 12.0) -> Stopped:
    """Services and endpoint together, then NATS last (so they can still ack and publish while they
    stop). Each group gets `timeout` s, then SIGKILL. A pid whose process is not the one recorded is
    left alone and reported gone."""
    path = settings.root_dir / RUNTIME_FILE
    if not path.exists():
        return Stopped()
    runtime = json.loads(path.read_text())
    pids: dict[str, int] = runtime.get("pids", {})
    ours = {n: p for n, p in pids.items() if is_ours(runtime, p)}
    result = Stopped(gone=[f"{n} (pid {p})" for n, p in pids.items() if n not in ours])
    services = {n: p for n, p in ours.items() if n != "nats-server"}
    result.stopped = _stop_groups(services, timeout, runtime)
    if (launcher := runtime.get("launcher")) and is_ours(runtime, launcher):
        _stop_groups({"launcher": launcher}, timeout, runtime)  # its children gone, it is leaving too
    if "nats-server" in ours:
        result.stopped += _stop_groups({"nats-server": ours["nats-server"]}, timeout, runtime)
    for tenant in tenants.load(settings):
        (tenants.settings_for(settings, tenant.name).home_dir / RUNTIME_FILE).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return result


def _stop_groups(pids: dict[str, int], timeout: float, runtime: dict) -> list[str]:
    """SIGTERM each process group at once, wait for all, SIGKILL what is left; returns who was running."""
    signalled = {}
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            signalled[name] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in signalled.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in signalled.values():
        if alive(pid) and is_ours(runtime, pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    return list(signalled)
