"""Content-keyed step cache: never compute the same thing twice.

A step's cache key is the sha256 of a canonical JSON of what determines its output: the step's
name, its code version, its input payload (parameters, the sha256 of every input artifact, the
seed) and the versions of the libraries that compute it. The outputs a step published for a key
are kept in a JetStream key-value bucket (`cairn_cache`, one per namespace); a later input with
the same key gets them again as new events of its own run, each marked with the CloudEvents
extension `cachedfrom` (the id of the event that first produced it), and the step runs nothing.

Code version: the sha256 of the step's package sources and of every project module (`services`,
`contracts`) they import, transitively (found from the import statements in the source), not a
hand-bumped constant. A constant is forgotten on the edit that matters; a hash of the source
changes with every edit, so the worst case is a needless recompute after a comment change, never
a stale hit.

Off: CAIRN_CACHE=false for a whole deployment, or `cairn submit --no-cache` for one run (the
`nocache` extension on the data-arrived event, carried to every event of that run by the
runtime). A run without the cache still stores what it computed. Replays (any namespace that is
not the live one) never use the cache: a replay recomputes every step, which is what it proves.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fsspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from contracts import TYPES, Envelope, derive_id, envelope_model
from contracts.subjects import is_live
from contracts.types import ArtifactRef
from services.platform.bus.provision import cache_bucket, provision_cache_bucket  # noqa: F401 - re-exported
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)

CACHED_FROM = "cachedfrom"  # extension: id of the event that first produced this output
NO_CACHE = "nocache"  # extension: this run neither reads the cache (it still writes it)
SERVICES_DIR = Path(__file__).resolve().parents[1]  # services/, above platform/
PROJECT_ROOT = SERVICES_DIR.parent
PROJECT_PACKAGES = ("services", "contracts")  # what a code hash covers: the project's own modules


def module_imports(name: str, source: str | bytes, is_package: bool = False) -> set[str]:
    """Absolute names a module's source may import, anywhere in it (function bodies, `if
    TYPE_CHECKING`, `importlib.import_module("literal")`), relative imports resolved against `name`.

    Over-inclusive on purpose: `from a import b` yields `a` and `a.b` (b may be a submodule), so a
    step's code hash can only cover too much (a needless recompute), never too little (a stale hit)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):
                    continue  # beyond the top-level package: an ImportError when run
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> `a`, `a.b`, `a.b.c`: importing a submodule runs every enclosing `__init__`."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(starts: Iterable[str], imports: Mapping[str, set[str]]) -> set[str]:
    """Every module in `imports` (module -> names it imports) reached from `starts`, parents included.
    `imports` may compute its values on first access (code_hash parses only the modules reached)."""
    seen: set[str] = set()
    todo = [parent for start in starts for parent in with_parents(start)]
    while todo:
        name = todo.pop()
        if name in seen or name not in imports:
            continue
        seen.add(name)
        todo.extend(parent for imported in imports[name] for parent in with_parents(imported))
    return seen


class _ParsedImports(dict):
    """module -> the names it imports, each module parsed when first asked for: a step's closure is
    part of the project, and parsing every module cost each caching service about half a second of
    CPU at start."""

    def __init__(self, sources: Mapping[str, tuple[str, bytes]]):
        super().__init__()
        self.sources = sources

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __missing__(self, name: str) -> set[str]:
        path, source = self.sources[name]
        self[name] = found = module_imports(name, source, path.endswith("/__init__.py"))
        return found


def project_sources(root: Path, packages: Sequence[str] = PROJECT_PACKAGES) -> dict[str, tuple[str, bytes]]:
    """Module name -> (path relative to `root`, bytes), for every module of the project's packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = (path.relative_to(root).as_posix(), path.read_bytes())
    return modules


def code_hash(packages: Sequence[str], sources: Mapping[str, tuple[str, bytes]]) -> str:
    """sha256 over `services/<package>` (a package or a module) and every project module it
    imports, transitively, each as its path and bytes, in path order."""
    starts = [
        name
        for name in sources
        for package in packages
        if name == f"services.{package}" or name.startswith(f"services.{package}.")
    ]
    if not starts:
        raise ValueError(f"no project module named by {list(packages)}")
    imports = _ParsedImports(sources)
    digest = hashlib.sha256()
    for path, source in sorted(sources[name] for name in import_closure(starts, imports)):
        digest.update(path.encode() + b"\0" + source + b"\0")
    return digest.hexdigest()


@functools.cache
def code_version(*packages: str, root: Path = PROJECT_ROOT) -> str:
    """The code hash of a step's packages (`code_hash`), computed once per process.

    A step computes with more than its own package (ingestion with `services.platform.ml.transform`, text
    ingestion with the tokenizer): a hash of the package alone served outputs of code since changed."""
    return code_hash(packages, project_sources(root))


def library_versions(dists: Iterable[str], override: Mapping[str, str] | None = None) -> dict[str, str]:
    """Installed versions of `dists` ("absent" when not installed); `override` (CAIRN_CACHE_LIBRARIES)
    replaces some, to see what an upgrade would recompute without installing it."""
    out = {}
    for dist in sorted(dists):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
        if override and dist in override:
            out[dist] = override[dist]
    return out


def cache_key(step: str, code: str, inputs: Any, libraries: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of everything that determines a step's output.

    `inputs` is the step's input payload as JSON (its parameters, seed and artifact hashes)."""
    doc = {"step": step, "code": code, "inputs": inputs, "libraries": dict(libraries)}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class StepVersion:
    """What a step computes with, besides its input: its code and its libraries."""

    step: str
    code: str
    libraries: dict[str, str]

    @classmethod
    def of(
        cls, step: str, packages: Sequence[str], dists: Iterable[str], settings: CairnSettings
    ) -> StepVersion:
        return cls(step, code_version(*packages), library_versions(dists, settings.cache_libraries))

    def key(self, inputs: Any) -> str:
        return cache_key(self.step, self.code, inputs, self.libraries)


def wants_cache(event: Envelope[Any]) -> bool:
    """False for a run submitted with --no-cache."""
    return not (event.model_extra or {}).get(NO_CACHE)


def carry_no_cache(cause: Envelope[Any], outputs: Sequence[Envelope[Any]]) -> list[Envelope[Any]]:
    """The outputs of an input that came with `nocache`, carrying it on (the rest of the run too)."""
    if wants_cache(cause):
        return list(outputs)
    flag = (cause.model_extra or {})[NO_CACHE]
    return [out if not wants_cache(out) else out.model_copy(update={NO_CACHE: flag}) for out in outputs]


def entry_of(outputs: Sequence[Envelope[Any]]) -> dict[str, Any]:
    """What is kept for a key: each output's type, subject, payload and original id."""
    return {
        "at": time.time(),
        "outputs": [
            {
                "type": out.type,
                "subject": out.subject,
                "data": out.data.model_dump(mode="json"),
                "id": (out.model_extra or {}).get(CACHED_FROM) or out.id,
            }
            for out in outputs
        ],
    }


def served(entry: Mapping[str, Any] | None, cause: Envelope[Any], source: str) -> list[Envelope[Any]]:
    """The kept outputs as new events of the cause's run: new ids (derived from the cause, so a
    redelivery republishes the same), this run's correlation and causation, and `cachedfrom`.

    Empty (a miss) when nothing is kept, or what is kept no longer fits the contracts (an event
    type retired or changed since): the step computes instead."""
    try:
        return _served(entry, cause, source) if entry else []
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning("%s: cache entry unusable, computing: %s: %s", source, type(exc).__name__, exc)
        return []


def _served(entry: Mapping[str, Any], cause: Envelope[Any], source: str) -> list[Envelope[Any]]:
    out = []
    for i, kept in enumerate(entry["outputs"]):
        payload_cls = TYPES[kept["type"]]
        event = envelope_model(payload_cls).model_validate(
            {
                "id": derive_id(cause.id, kept["type"], f"cache:{i}"),
                "source": source,
                "type": kept["type"],
                "time": datetime.now(UTC),
                "subject": kept.get("subject"),
                "correlationid": cause.correlationid,
                "causationid": cause.id,
                "data": kept["data"],
                CACHED_FROM: kept["id"],
            }
        )
        out.append(event)
    return out


def artifact_refs(value: Any) -> list[ArtifactRef]:
    """Every ArtifactRef in a payload (nested models, lists, dicts)."""
    if isinstance(value, ArtifactRef):
        return [value]
    if isinstance(value, BaseModel):
        return [ref for name in type(value).model_fields for ref in artifact_refs(getattr(value, name))]
    if isinstance(value, list | tuple):
        return [ref for item in value for ref in artifact_refs(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in artifact_refs(item)]
    return []


def missing_artifacts(outputs: Sequence[Envelope[Any]]) -> list[str]:
    """URIs the kept outputs name that are no longer stored (`cairn gc` removed them): such an
    entry is a miss, so a hit never hands downstream a reference to nothing."""
    missing = []
    for out in outputs:
        for ref in artifact_refs(out.data):
            fs, path = fsspec.core.url_to_fs(ref.uri)
            if not fs.exists(path):
                missing.append(ref.uri)
    return missing


class StepCache:
    """The cache as one service sees it: the KV bucket is opened (or made) on first use."""

    def __init__(self, js_of: Any, settings: CairnSettings):
        self._js_of = js_of  # () -> JetStreamContext, known once the broker has connected
        self.settings = settings
        self.enabled = settings.cache and is_live(settings.namespace)
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._js_of()
            await provision_cache_bucket(js, self.settings)
            self._kv = await js.key_value(cache_bucket(self.settings.namespace))
        return self._kv

    @staticmethod
    def _name(step: str, key: str) -> str:
        return f"{step}.{key}"

    async def get(self, step: str, key: str) -> dict[str, Any] | None:
        """The kept outputs, or None. A cache that cannot be read (no permission on the bucket, a
        server hiccup) is a miss: the step computes, which is never wrong."""
        try:
            entry = await (await self._bucket()).get(self._name(step, key))
        except KeyNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: cache not readable, computing: %s: %s", step, type(exc).__name__, exc)
            return None
        return json.loads(entry.value) if entry.value else None

    async def put(self, step: str, key: str, outputs: Sequence[Envelope[Any]]) -> None:
        """Keep a step's outputs; too large for one KV value means not cached (logged, not fatal)."""
        if not outputs:
            return
        value = json.dumps(entry_of(outputs)).encode()
        try:
            await (await self._bucket()).put(self._name(step, key), value)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot write only costs a recompute
            log.warning(
                "%s: outputs of cache key %s not kept: %s: %s", step, key[:12], type(exc).__name__, exc
            )
