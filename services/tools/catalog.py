"""Every runnable service by name: the one list `cairn run`, `cairn up` and `cairn status` share."""

from __future__ import annotations

from importlib import import_module

from services.platform.runtime import Service
from services.platform.settings import CairnSettings

SERVICES: dict[str, str] = {
    "ingestion": "services.ingestion.app:Ingestion",
    "features": "services.features.app:Features",
    "tuning": "services.tuning.app:Tuning",
    "training": "services.training.app:Training",
    "evaluation": "services.evaluation.app:Evaluation",
    "deployment": "services.deployment.app:Deployment",
    "lineage": "services.lineage.app:Lineage",
}


def service_class(name: str) -> type[Service]:
    if name not in SERVICES:
        raise KeyError(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
    module, cls = SERVICES[name].split(":")
    return getattr(import_module(module), cls)


def build_service(name: str, settings: CairnSettings) -> Service:
    return service_class(name)(settings)


def durables(name: str, settings: CairnSettings) -> list[str]:
    """The durable consumer names a service binds, without starting it."""
    from services.platform.bus.consumer import durable_name

    service = build_service(name, settings)
    routed = [durable_name(name, r.payload_cls, settings.namespace) for r in service.routes()]
    return routed + service.extra_durables()
