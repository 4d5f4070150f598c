"""Tenants: teams sharing one deployment, each isolated by the NATS server itself (docs/TENANTS.md).

A tenant is a NATS account: its stream, buckets and consumers live there, under JetStream limits
of its own, and its users (`<role>@<tenant>`) can name nothing outside it. Its state (artifacts,
MLflow, lineage, signing and archive keys) is under `$CAIRN_HOME/tenants/<name>`. The registry is
`$CAIRN_HOME/tenants.json`; the default tenant is implicit (the home itself, the bare user names).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from pydantic import BaseModel, Field

from services.platform.settings import DEFAULT_TENANT, TENANT_NAME, CairnSettings
from services.platform.tls import write_file

REGISTRY_FILE = "tenants.json"
REMOVED_DIR = "removed-tenants"  # under home: a removed tenant's history and state, kept
UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
         "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}  # fmt: skip


class TenantError(ValueError):
    """A tenant that cannot be added or removed, and why."""


class Tenant(BaseModel):
    """A tenant; its NATS account has its name (the default tenant's: `default`). The limits' defaults
    are `cairn tenant add`'s; None: the server's own (the default tenant, as a home without tenants
    has always run)."""

    name: str = Field(pattern=TENANT_NAME)
    max_storage_bytes: int | None = Field(gt=0, description="JetStream file storage.")
    max_trials_in_flight: int | None = Field(ge=1, description="Its trial slots.")
    created: float = Field(default_factory=time.time)


def parse_size(text: str) -> int:
    """`10GB`, `512MiB`, `1e9`: bytes (GB is 10^9, GiB 2^30); the server's config gets the bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise TenantError(f"{text!r} is not a size: write e.g. 10GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * UNITS[unit])


def registry_path(settings: CairnSettings) -> Path:
    return settings.root_dir / REGISTRY_FILE


def load(settings: CairnSettings) -> list[Tenant]:
    """The tenants added to this home, in the order they were added (the default not included)."""
    path = registry_path(settings)
    if not path.exists():
        return []
    return [Tenant.model_validate(t) for t in json.loads(path.read_text())["tenants"]]


def _save(settings: CairnSettings, tenants: list[Tenant]) -> None:
    settings.root_dir.mkdir(parents=True, exist_ok=True)
    body = {"tenants": [t.model_dump() for t in tenants]}
    partial = registry_path(settings).with_suffix(".partial")
    write_file(partial, json.dumps(body, indent=2) + "\n", 0o600)
    partial.replace(registry_path(settings))


def add(settings: CairnSettings, name: str, max_storage_bytes: int, max_trials_in_flight: int) -> Tenant:
    if name == DEFAULT_TENANT:
        raise TenantError(f"{DEFAULT_TENANT!r} is the home itself and always there")
    if not re.fullmatch(TENANT_NAME, name):
        raise TenantError(
            f"{name!r} is not a tenant name: 2 to 30 characters, lower-case letters, digits and '-', "
            "starting with a letter"
        )
    tenants = load(settings)
    if any(t.name == name for t in tenants):
        raise TenantError(f"tenant {name!r} exists (`cairn tenant list`)")
    tenant = Tenant(name=name, max_storage_bytes=max_storage_bytes, max_trials_in_flight=max_trials_in_flight)
    _save(settings, [*tenants, tenant])
    return tenant


def forget(settings: CairnSettings, name: str) -> None:
    """Drop `name` from the registry (its history and state archived first: `cairn tenant remove`)."""
    tenants = load(settings)
    if not any(t.name == name for t in tenants):
        raise TenantError(f"no tenant {name!r} (`cairn tenant list`)")
    _save(settings, [t for t in tenants if t.name != name])


def every(settings: CairnSettings) -> list[Tenant]:
    """The default tenant (no limits of its own but the server's) and every added one."""
    default = Tenant(name=DEFAULT_TENANT, max_storage_bytes=None, max_trials_in_flight=None, created=0)
    return [default, *load(settings)]


def settings_for(settings: CairnSettings, name: str) -> CairnSettings:
    """The same settings acting for tenant `name` (its home, its users, its MLflow prefix)."""
    return settings.model_copy(update={"tenant": name})
