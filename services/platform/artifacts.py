"""Content-addressed artifact store behind any fsspec URL: the sha256 is the identity.

Writes are idempotent (same bytes, same path) and atomic where the filesystem allows (write to
a temporary name, then move); reads verify the hash before anything is deserialised.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import fsspec

from contracts.types import ArtifactRef


class IntegrityError(RuntimeError):
    """Stored bytes do not match their content hash: refuse to load them."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, digest: str, suffix: str) -> str:
        return f"{self.root}/sha256/{digest[:2]}/{digest}{suffix}"

    def put_bytes(self, data: bytes, media_type: str, suffix: str = "") -> ArtifactRef:
        digest = sha256_bytes(data)
        path = self._path(digest, suffix)
        if not self.fs.exists(path):
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        return ArtifactRef(
            uri=self.fs.unstrip_protocol(path), sha256=digest, size=len(data), media_type=media_type
        )

    @staticmethod
    def landing_url_of(store_url: str) -> str:
        """Where `cairn submit` uploads files: inside the store, so services never read the user's disk."""
        return f"{store_url.rstrip('/')}/{LANDING}"

    def put_file(self, path: Path, media_type: str, chunk_bytes: int = 1 << 20) -> ArtifactRef:
        """Stream a local file into the landing area, hashing on the way: memory stays flat for any size.

        The file lands at `landing/sha256/<hh>/<digest>/<name>`: content-addressed, yet the original
        name (and so its format suffix and the default model name derived from it) survives.
        """
        digest = hashlib.sha256()
        size = 0
        tmp = f"{self.root}/{LANDING}/tmp/{uuid.uuid4().hex}"
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        with open(path, "rb") as src, self.fs.open(tmp, "wb") as dst:
            while chunk := src.read(chunk_bytes):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        hexdigest = digest.hexdigest()
        final = f"{self.root}/{LANDING}/sha256/{hexdigest[:2]}/{hexdigest}/{landing_name(path.name)}"
        if self.fs.exists(final):
            self.fs.rm(tmp)
        else:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(tmp, final)
        uri = self.fs.unstrip_protocol(final)
        return ArtifactRef(uri=uri, sha256=hexdigest, size=size, media_type=media_type)

    def get_bytes(self, ref: ArtifactRef) -> bytes:
        return read_verified(ref.uri, ref.sha256)

    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(ref.uri)[1])


LANDING = "landing"


def landing_name(name: str) -> str:
    """A file name safe in any object store and URI: letters, digits, `._-`; never empty or hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "data"
    return cleaned[:128]


def read_verified(uri: str, sha256: str) -> bytes:
    """Read an artifact anywhere and check its hash; the only way artifacts are loaded."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"{uri}: content hash {actual} does not match expected {sha256}")
    return data
