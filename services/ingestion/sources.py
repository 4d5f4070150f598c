"""Where ingestion may read, and how: the policy that keeps an event from turning it on anything else.

- The landing area of the artifact store (`cairn submit` uploads there) is always readable.
- Anything else must use an allowed scheme and sit under an allowed root, judged after
  percent-decoding and path resolution (`..`, symlinks), never inside cairn's own home (secrets,
  MLflow and lineage databases, other artifacts) whatever the roots say.
- http(s) sources reach public addresses only (or the networks CAIRN_ALLOWED_HOST_NETWORKS names):
  the host name is resolved once, every address it resolves to is checked (not just IP literals),
  and the fetch connects to a checked address, never to a second lookup's answer (DNS rebinding);
  redirects are refused rather than followed to an unchecked place.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import fsspec

from contracts import DataArrived, DataFormat
from services.ingestion.problems import DataProblem
from services.platform.artifacts import ArtifactStore
from services.platform.settings import CairnSettings

if TYPE_CHECKING:
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

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
    # http(s): the addresses the host resolved to when checked; the fetch connects to these only.
    addresses: tuple[str, ...] = ()


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
    addresses: list[IPAddress] = []
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
        if scheme in ("http", "https"):
            host = parts.hostname or ""
            addresses = host_addresses(host, parts.port or (443 if scheme == "https" else 80))
            refuse_internal_addresses(host, addresses, settings)
    fmt = event.format or format_from_name(PurePosixPath(parts.path or event.uri).name)
    return Source(event.uri, scheme, location, fmt, tuple(str(a) for a in addresses))


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
    own = [settings.root_dir]  # every tenant's state, not only this one's
    store = urlsplit(settings.artifacts)
    if store.scheme in ("", "file"):
        own.append(Path(unquote(store.path)).resolve())
    return any(path.is_relative_to(p) for p in own)


def refuse_own_state(path: Path, settings: CairnSettings) -> None:
    if is_own_state(path, settings):
        raise DataProblem(f"{path} is inside cairn's own state ({settings.root_dir}); refusing to read it")


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


def host_addresses(host: str, port: int) -> list[IPAddress]:
    """The addresses of `host`: an IP literal as written, a name resolved once, here. The fetch uses
    these, so the name is never looked up again between the check and the connection."""
    if not host:
        raise DataProblem("the URL names no host")
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise DataProblem(f"host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise DataProblem(f"host {host!r} does not resolve")
    return addresses


def refuse_internal_addresses(host: str, addresses: Sequence[IPAddress], settings: CairnSettings) -> None:
    """Never fetch from loopback, link-local (cloud metadata at 169.254.169.254), private or other
    non-public addresses, unless CAIRN_ALLOW_PRIVATE_HOSTS or a network in
    CAIRN_ALLOWED_HOST_NETWORKS admits them. One refused address refuses the host: a name is judged
    by every address it resolves to."""
    if settings.allow_private_hosts:
        return
    for address in addresses:
        if any(address in net for net in settings.allowed_host_networks):
            continue
        if not address.is_global or not all(inner.is_global for inner in embedded_ipv4(address)):
            raise DataProblem(f"{host} resolves to {address}, not a public address; refusing to fetch")


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 one carries (mapped, 6to4, Teredo, NAT64, IPv4-compatible): a
    public-looking `64:ff9b::a9fe:a9fe` is 169.254.169.254 to a gateway that translates it."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if address in NAT64 or address in IPV4_COMPATIBLE:
        inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [a for a in inner if a is not None]


def pinned_request(uri: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """(URL naming `address`, headers, httpx extensions) for a GET of `uri` that connects to that
    checked address only: the Host header and, for https, the TLS server name (SNI and certificate
    verification) stay the URL's host name, so the server and its certificate are judged as usual."""
    import httpx

    url = httpx.URL(uri)
    host = url.raw_host.decode("ascii")
    pinned = url.copy_with(host=address)  # a URL object: never re-parsed from text
    extensions = {"sni_hostname": host.strip("[]")} if url.scheme == "https" else {}
    return pinned, {"Host": url.netloc.decode("ascii")}, extensions


def format_from_name(name: str) -> DataFormat:
    lowered = name.lower()
    for suffix, fmt in DATA_SUFFIXES.items():
        if lowered.endswith(suffix):
            return fmt
    raise DataProblem(f"cannot tell the format of {name!r}: name it .csv, .parquet or .jsonl, or set format")


def read_bytes(source: Source, settings: CairnSettings) -> bytes:
    if source.scheme in ("http", "https"):
        return _read_http(source, settings)
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


def _read_http(source: Source, settings: CairnSettings) -> bytes:
    """One GET to an address checked by `resolve_source` (the next one if it refuses the connection),
    no redirects followed (a redirect could point anywhere the checks refused).

    Direct, never through HTTP(S)_PROXY/ALL_PROXY (a proxy resolves the name itself: unchecked), and
    no .netrc credentials; the CA bundle is certifi's, or SSL_CERT_FILE / SSL_CERT_DIR."""
    import httpx

    tls = httpx.create_ssl_context()
    if not source.addresses:
        raise DataProblem(f"{source.uri} has no checked address to fetch from")
    uri, limit = source.uri, settings.max_dataset_bytes
    for i, address in enumerate(source.addresses):
        url, headers, extensions = pinned_request(uri, address)
        try:
            with (
                httpx.Client(follow_redirects=False, timeout=30, trust_env=False, verify=tls) as client,
                client.stream("GET", url, headers=headers, extensions=extensions) as response,
            ):
                if response.is_redirect:
                    raise DataProblem(f"{uri} redirects ({response.status_code}): redirects are not followed")
                if response.status_code != 200:
                    raise DataProblem(f"{uri} answered {response.status_code}")
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > limit:
                        raise DataProblem(f"{uri} exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if i + 1 < len(source.addresses):
                continue
            raise DataProblem(f"{uri} cannot be read: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise DataProblem(f"{uri} cannot be read: {type(exc).__name__}") from None
    raise AssertionError("unreachable")
