"""Where an inference endpoint's bearer token lives, for the endpoint (services.serving.auth) and
its clients alike: the file CAIRN_SERVE_TOKEN_FILE names, else `serve-token` in the home when there
is one. `cairn up` makes one for each added tenant (docs/TENANTS.md); the default home has none, and
its endpoint answers everyone, as before."""

from __future__ import annotations

import secrets
from pathlib import Path

from services.platform.settings import CairnSettings
from services.platform.tls import write_file

TOKEN_FILE = "serve-token"


def token_path(settings: CairnSettings) -> Path | None:
    if settings.serve_token_file is not None:
        return settings.serve_token_file
    path = settings.home_dir / TOKEN_FILE
    return path if path.exists() else None


def read_token(settings: CairnSettings) -> str | None:
    path = token_path(settings)
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: an endpoint token must not be")
    return token


def client_headers(settings: CairnSettings) -> dict[str, str]:
    """What a client of this tenant's endpoint sends (nothing when it has no token)."""
    token = read_token(settings)
    return {"authorization": f"Bearer {token}"} if token else {}


def ensure_token(home: Path) -> Path:
    """The home's token, made once (0600) and kept: its holders keep working across restarts."""
    path = home / TOKEN_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        write_file(path, secrets.token_urlsafe(32) + "\n", 0o600)
    return path
