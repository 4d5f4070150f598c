"""Where artifacts may be read from: the artifact store, never an address an event names.

Applied by the consumer policy to every `ArtifactRef` in an incoming event (injected by the
runtime, so the bus knows nothing of artifacts) and by model loading to registry sources.
"""

from __future__ import annotations

import re
import typing
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from contracts.types import ArtifactRef
from services.platform.settings import CairnSettings


class ArtifactLocationError(ValueError):
    """An artifact URI outside the configured store: refused before any byte is fetched."""


# NUL and the other C0 control characters, and DEL.
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def check_artifact_uri(uri: str, settings: CairnSettings) -> str:
    """Artifacts are read only from the artifact store, never from an address an event names.

    Events carry artifact URIs; without this check a forged event could make a service fetch
    `http://169.254.169.254/...` or read `/etc/passwd` before the hash check refuses the bytes.
    """
    if (refusal := _verdict(uri, store_root(settings))) is not None:
        raise ArtifactLocationError(refusal)
    return uri


def store_root(settings: CairnSettings) -> str:
    """The artifact store's URI without its trailing slash (resolving the home directory: a dozen
    system calls, so a consumer computes it once, not per message)."""
    return settings.artifacts.rstrip("/")


@lru_cache(maxsize=4096)
def _verdict(uri: str, root: str) -> str | None:
    """Why `uri` is refused, or None, remembered: every trial request names the same feature set,
    whose path was resolved again for each (a dozen system calls; within bench/scale.py's noise,
    docs/DESIGN-NOTES.md). A verdict can outlive a change on disk (a directory inside the store
    later replaced by a link out of it), but whoever can write into the store can already replace
    what it holds; bytes read are still checked against their sha256. Bounded, since events name
    the URIs."""
    try:
        _check_artifact_uri(uri, root)
    except ArtifactLocationError as exc:
        return str(exc)
    return None


def _check_artifact_uri(uri: str, root: str) -> None:
    from urllib.parse import unquote, urlsplit

    # NUL (raw or %00) and other control characters name no stored artifact, and NUL would make
    # the path resolution below raise instead of refusing.
    if CONTROL_CHARACTER.search(uri) or CONTROL_CHARACTER.search(unquote(uri)):
        raise ArtifactLocationError(f"artifact {uri[:200]!r} contains a control character (NUL, ...)")
    parts, root_parts = urlsplit(uri), urlsplit(root)
    if any(len(name.encode()) > 255 for name in unquote(parts.path).split("/")):
        # Longer than any file system's name limit: no artifact is stored there, and reading it
        # would fail as an OSError, which handlers retry as an outage.
        raise ArtifactLocationError(f"artifact {uri[:200]!r} has a path segment over 255 bytes")
    scheme = (parts.scheme or "file").lower()
    if scheme != (root_parts.scheme or "file").lower():
        raise ArtifactLocationError(f"artifact {uri[:200]!r} is not in the artifact store {root}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ArtifactLocationError(f"artifact {uri[:200]!r} names a host")
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(_store_directory(root_parts.path)):
            raise ArtifactLocationError(f"artifact {uri[:200]!r} is outside the artifact store {root}")
        return
    if parts.netloc != root_parts.netloc or not (parts.path + "/").startswith(
        root_parts.path.rstrip("/") + "/"
    ):
        raise ArtifactLocationError(f"artifact {uri[:200]!r} is outside the artifact store {root}")
    if ".." in parts.path.split("/"):
        raise ArtifactLocationError(f"artifact {uri[:200]!r} climbs out of the store")


def foreign_artifacts(payload: Any, root: str) -> list[str]:
    """Every ArtifactRef in a payload whose URI is not in the artifact store at `root` (store_root)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, ArtifactRef):
            if (refusal := _verdict(value.uri, root)) is not None:
                found.append(refusal)
        elif isinstance(value, BaseModel):
            for name in _fields_with_refs(type(value)):
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(payload)
    return found


@lru_cache(maxsize=8)
def _store_directory(path: str) -> Path:
    """The store's directory with its links resolved (a dozen system calls), once per root: the
    check runs on every message that names an artifact."""
    from urllib.parse import unquote

    return Path(unquote(path)).resolve()


@cache
def _fields_with_refs(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of a model whose type can hold an ArtifactRef, worked out once per class: the
    check runs on every message, and most payloads hold few references or none."""
    return tuple(name for name, info in model.model_fields.items() if _can_hold_ref(info.annotation, set()))


def _can_hold_ref(annotation: Any, seen: set[Any]) -> bool:
    if annotation in seen:
        return False
    seen.add(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if issubclass(annotation, ArtifactRef):
            return True
        return any(_can_hold_ref(info.annotation, seen) for info in annotation.model_fields.values())
    if annotation is Any or annotation is object:
        return True  # unknown content: walk it
    return any(_can_hold_ref(arg, seen) for arg in typing.get_args(annotation))
