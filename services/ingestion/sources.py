"""Where ingestion may read, and how: the policy that keeps an event from turning it on anything else.

- The landing area of the artifact store (`cairn submit` uploads there) is always readable.
- Anything else must use an allowed scheme and sit under an allowed root, judged after
  percent-decoding and path resolution (`..`, symlinks), never inside cairn's own home (secrets,
  MLflow and lineage databases, other artifacts) whatever the roots say.
- http(s) sources reach public addresses only: every address the host name resolves to is checked
  (not just IP literals), and redirects are refused rather than followed to an unchecked place.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import fsspec

from contracts import DataArrived, DataFormat
from services.artifacts import ArtifactStore
from services.ingestion.problems import DataProblem
from services.settings import CairnSettings

DATA_SUFFIXES = {
    ".csv": DataFormat.csv,
    ".parquet": DataFormat.parquet,
    ".pq": DataFormat.parquet,
    ".jsonl": DataFormat.jsonl,
    ".ndjson": DataFormat.jsonl,
}


@dataclass(frozen=True)
class Source:
    uri: str
    scheme: str
    path: str
    format: DataFormat


def resolve_source(event: DataArrived, settings: CairnSettings) -> Source:
    """Allow-listed schemes and roots only; `..`, symlinks and encoded tricks resolve first."""
    decoded = unquote(event.uri)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise DataProblem("the URI contains a control character (NUL, newline, ...); refusing it")
    try:
        parts = urlsplit(event.uri)
        parts.port  # noqa: B018 - parsed lazily: a bad port raises only when read
    except ValueError as exc:
        raise DataProblem(f"the URI cannot be parsed: {exc}") from None
    scheme = (parts.scheme or "file").lower()
    if len(scheme) == 1:  # a Windows drive letter is not a scheme
        scheme = "file"
    landed = _in_landing_area(event.uri, settings)
    if landed is not None:
        location = landed
    elif scheme not in settings.allowed_schemes:
        raise DataProblem(
            f"scheme '{scheme}' is not allowed; allowed schemes: {', '.join(settings.allowed_schemes)}"
        )
    elif scheme == "file":
        location = str(_local_path(event.uri, parts, settings))
    else:
        location = event.uri
        # Judged on the decoded path: `%2e%2e` is `..` to the server that receives it. A root is a
        # prefix up to a "/" boundary: root "s3://data" must not admit "s3://data-evil/...".
        decoded_path = unquote(parts.path)
        if ".." in decoded_path.split("/") or not any(
            _under_root(f"{scheme}://{parts.netloc}{decoded_path}", root) for root in settings.allowed_roots
        ):
            raise DataProblem(f"{event.uri} is outside the allowed roots")
        if scheme in ("http", "https") and not settings.allow_private_hosts:
            refuse_internal_host(parts.hostname or "", parts.port or (443 if scheme == "https" else 80))
    fmt = event.format or format_from_name(PurePosixPath(parts.path or event.uri).name)
    return Source(event.uri, scheme, location, fmt)


def _local_path(uri: str, parts, settings: CairnSettings) -> Path:
    raw = unquote(parts.path) if parts.scheme else uri
    if parts.netloc not in ("", "localhost"):
        raise DataProblem(f"file URL with a host ({parts.netloc!r}) is not allowed")
    path = Path(raw).expanduser()
    resolved = path.resolve() if path.is_absolute() else (Path.cwd() / path).resolve()
    if not any(resolved.is_relative_to(root) for root in settings.read_roots):
        roots = ", ".join(str(r) for r in settings.read_roots)
        raise DataProblem(f"{resolved} is outside the allowed roots ({roots})")
    refuse_own_state(resolved, settings)
    return resolved


def is_own_state(path: Path, settings: CairnSettings) -> bool:
    """cairn's home and a local artifact store are never data, whatever the allowed roots say."""
    own = [settings.home_dir]
    store = urlsplit(settings.artifacts)
    if store.scheme in ("", "file"):
        own.append(Path(unquote(store.path)).resolve())
    return any(path.is_relative_to(p) for p in own)


def refuse_own_state(path: Path, settings: CairnSettings) -> None:
    if is_own_state(path, settings):
        raise DataProblem(f"{path} is inside cairn's own state ({settings.home_dir}); refusing to read it")


def _in_landing_area(uri: str, settings: CairnSettings) -> str | None:
    """The readable location of a file `cairn submit` uploaded into the store's landing area, else None."""
    landing = ArtifactStore.landing_url_of(settings.artifacts)
    parts, root = urlsplit(uri), urlsplit(landing)
    if (parts.scheme or "file").lower() != (root.scheme or "file").lower() or parts.netloc != root.netloc:
        return None
    if parts.query or parts.fragment or ".." in unquote(parts.path).split("/"):
        return None
    if (parts.scheme or "file").lower() == "file":
        resolved = Path(unquote(parts.path)).resolve()
        return str(resolved) if resolved.is_relative_to(Path(unquote(root.path)).resolve()) else None
    return uri if _under_root(uri, landing) else None


def _under_root(location: str, root: str) -> bool:
    root = root.rstrip("/")
    return location == root or location.startswith(root + "/")


def refuse_internal_host(host: str, port: int) -> None:
    """Never fetch from loopback, link-local (cloud metadata at 169.254.169.254), private or other
    non-public addresses: a host name is judged by every address it resolves to now."""
    if not host:
        raise DataProblem("the URL names no host")
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            raise DataProblem(f"host {host!r} does not resolve") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not address.is_global:
            raise DataProblem(f"{host} resolves to {address}, not a public address; refusing to fetch")


def format_from_name(name: str) -> DataFormat:
    lowered = name.lower()
    for suffix, fmt in DATA_SUFFIXES.items():
        if lowered.endswith(suffix):
            return fmt
    raise DataProblem(f"cannot tell the format of {name!r}: name it .csv, .parquet or .jsonl, or set format")


def read_bytes(source: Source, settings: CairnSettings) -> bytes:
    if source.scheme in ("http", "https"):
        return _read_http(source.uri, settings)
    try:
        fs, path = fsspec.core.url_to_fs(source.path if source.scheme == "file" else source.uri)
        size = fs.size(path)
    except FileNotFoundError:
        raise DataProblem(f"{source.uri} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataProblem(f"{source.uri} cannot be read: {type(exc).__name__}") from None
    if size is not None and size > settings.max_dataset_bytes:
        raise DataProblem(f"{source.uri} is {size} bytes; the limit is {settings.max_dataset_bytes}")
    with fs.open(path, "rb") as f:
        data = f.read(settings.max_dataset_bytes + 1)
    if len(data) > settings.max_dataset_bytes:
        raise DataProblem(f"{source.uri} exceeds the limit of {settings.max_dataset_bytes} bytes")
    return data


def _read_http(uri: str, settings: CairnSettings) -> bytes:
    """One GET, no redirects followed (a redirect could point anywhere the checks above refused)."""
    import httpx

    limit = settings.max_dataset_bytes
    try:
        with httpx.stream("GET", uri, follow_redirects=False, timeout=30) as response:
            if response.is_redirect:
                raise DataProblem(
                    f"{uri} redirects ({response.status_code}): redirects are not followed"
                )
            if response.status_code != 200:
                raise DataProblem(f"{uri} answered {response.status_code}")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limit:
                    raise DataProblem(f"{uri} exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise DataProblem(f"{uri} cannot be read: {type(exc).__name__}") from None
    return b"".join(chunks)
