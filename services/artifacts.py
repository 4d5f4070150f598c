"""Content-addressed artifact store behind any fsspec URL: the sha256 is the identity.

Writes are idempotent (same bytes, same path) and atomic where the filesystem allows (write to
a temporary name, then move); reads verify the hash before anything is deserialised.
"""

from __future__ import annotations

import hashlib
import uuid

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

    def get_bytes(self, ref: ArtifactRef) -> bytes:
        return read_verified(ref.uri, ref.sha256)

    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(ref.uri)[1])


def read_verified(uri: str, sha256: str) -> bytes:
    """Read an artifact anywhere and check its hash; the only way artifacts are loaded."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"{uri}: content hash {actual} does not match expected {sha256}")
    return data
