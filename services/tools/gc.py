"""`cairn gc`: delete the artifacts nothing worth keeping reaches; `cairn hold`: keep something for good.

Content addressing makes every artifact a file named by its sha256, shared by every run that
produced the same bytes (a resubmission served from the step cache names the first run's files).
So what to keep is a set of hashes, computed from the whole log (archive and stream, read through
the client: every event ever published, and each artifact it names) and the model registry:

- every artifact of the runs of the current and the last `keep_champions` past champions of each
  model (from model-deployed events, and the registry's `champion` alias), so an audit of a kept
  model finds its data, features, transform and bundle;
- every artifact of the last `keep_runs` runs of each model;
- every artifact of a run, event or model version under a legal hold, and every held hash;
- every artifact of a run that has not ended (no terminal event yet: a step may be using it), and
  every file younger than the grace period (a step may be writing it before any event names it);
- the files a kept model bundle names (its estimator).

Everything else in the store (sha256/ and landing/) is deleted, and the MLflow runs whose model
was removed get the tag `cairn.gc` (time of removal). Holds live in the JetStream key-value bucket
`cairn_holds`, one key per hold, so every operator of a deployment (any home, any machine) sees and
honours the same holds; a `<home>/holds.json` of older versions is imported into it once.
The pure functions decide; `collect` and `delete` touch the store, the `*_holds` coroutines the bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec

from contracts import ModelDeployed, ModelTrained
from contracts.runs import type_ends_run

SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL_VERSION = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<version>\d+)$")
DEPLOYED: str = ModelDeployed.EVENT_TYPE  # type: ignore[attr-defined]
TRAINED: str = ModelTrained.EVENT_TYPE  # type: ignore[attr-defined]
HOLDS_FILE = "holds.json"


@dataclass
class Run:
    """One pipeline run as the lineage recorded it."""

    correlation: str
    first_seq: int
    model_name: str | None = None
    ended: bool = False
    artifacts: set[str] = field(default_factory=set)
    event_ids: set[str] = field(default_factory=set)
    deployed: list[tuple[int, int]] = field(default_factory=list)  # (seq, registry version)
    mlflow_runs: dict[str, str] = field(default_factory=dict)  # model sha256 -> MLflow run id


@dataclass(frozen=True)
class Policy:
    keep_champions: int = 3
    keep_runs: int = 5
    grace_s: float = 3600.0


@dataclass(frozen=True)
class Hold:
    """What `cairn hold ID` resolved ID to: a whole run, or one artifact."""

    id: str
    correlation: str | None = None
    sha256: str | None = None
    at: float = 0.0
    by: str = ""  # who held it (user@host), for operators who did not


@dataclass(frozen=True)
class StoredFile:
    path: str
    sha256: str
    size: int
    mtime: float


def _model_name(data: Mapping[str, Any]) -> str | None:
    context = data.get("context")
    if isinstance(context, dict) and isinstance(context.get("model_name"), str):
        return context["model_name"]
    name = data.get("model_name")
    return name if isinstance(name, str) else None


def runs_of(events: Iterable[tuple[int, Mapping[str, Any], Iterable[str]]]) -> dict[str, Run]:
    """Runs by correlation id, from (seq, event, artifact hashes it names) in stream order."""
    runs: dict[str, Run] = {}
    for seq, event, shas in events:
        correlation = event.get("correlationid")
        if not isinstance(correlation, str):
            continue
        run = runs.setdefault(correlation, Run(correlation, seq))
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        run.model_name = run.model_name or _model_name(data)
        run.artifacts.update(shas)
        run.event_ids.add(str(event.get("id")))
        event_type = str(event.get("type"))
        run.ended = run.ended or type_ends_run(event_type, data.get("passed"))
        if event_type == DEPLOYED and isinstance(data.get("version"), int):
            run.deployed.append((seq, data["version"]))
        if event_type == TRAINED and isinstance(data.get("model"), dict) and data.get("mlflow_run_id"):
            run.mlflow_runs[data["model"]["sha256"]] = data["mlflow_run_id"]
    return runs


def runs_of_log(records: Iterable[tuple[int, str, bytes]]) -> dict[str, Run]:
    """Runs from the log's raw (sequence, subject, bytes), dead letters included: a refused event
    that names artifacts keeps them, as the lineage store records it too."""
    from services.lineage.store import artifact_refs

    events = []
    for seq, _, body in records:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict):
            events.append((seq, doc, [ref["sha256"] for _, ref in artifact_refs(doc.get("data"))]))
    return runs_of(events)


def champion_runs(runs: Mapping[str, Run], keep: int) -> dict[str, str]:
    """Correlation -> why, for the runs that deployed each model's current champion or one of its
    last `keep` past ones (versions ordered by their latest deployment, newest first)."""
    by_model: dict[str, list[tuple[int, int, str]]] = {}
    for run in runs.values():
        for seq, version in run.deployed:
            by_model.setdefault(run.model_name or "?", []).append((seq, version, run.correlation))
    out: dict[str, str] = {}
    for name, deployments in by_model.items():
        versions: list[int] = []
        for _, version, _ in sorted(deployments, reverse=True):
            if version not in versions:
                versions.append(version)
        kept = versions[: keep + 1]
        for _, version, correlation in sorted(deployments, reverse=True):
            if version in kept:
                role = "champion" if version == kept[0] else "past champion"
                out.setdefault(correlation, f"{name}@{version} {role}")
    return out


def keep_set(
    runs: Mapping[str, Run],
    holds: Iterable[Hold],
    policy: Policy,
    registry_champions: Iterable[str] = (),
) -> dict[str, str]:
    """sha256 -> the first reason it is kept. Pure: the lineage, the holds and the registry decide."""
    why_run: dict[str, str] = dict(champion_runs(runs, policy.keep_champions))
    by_model: dict[str, list[Run]] = {}
    for run in runs.values():
        by_model.setdefault(run.model_name or "?", []).append(run)
        if not run.ended:
            why_run.setdefault(run.correlation, "run in progress")
    for name, model_runs in by_model.items():
        recent = sorted(model_runs, key=lambda r: r.first_seq, reverse=True)[: policy.keep_runs]
        for run in recent:
            why_run.setdefault(run.correlation, f"one of the last {policy.keep_runs} runs of {name}")
    keep: dict[str, str] = {}
    for hold in holds:
        if hold.correlation in runs:
            why_run.setdefault(hold.correlation, f"hold {hold.id}")  # type: ignore[arg-type]
        if hold.sha256:
            keep.setdefault(hold.sha256, f"hold {hold.id}")
    for sha in registry_champions:
        keep.setdefault(sha, "registry champion")
    for correlation, why in why_run.items():
        for sha in runs[correlation].artifacts:
            keep.setdefault(sha, f"{why} (run {correlation[:8]})")
    return keep


def plan(
    files: Iterable[StoredFile], keep: Mapping[str, str], now: float, grace_s: float
) -> tuple[list[StoredFile], list[tuple[StoredFile, str]]]:
    """(to delete, kept with why): kept when its hash is kept or it is younger than the grace."""
    delete, kept = [], []
    for f in files:
        if f.sha256 in keep:
            kept.append((f, keep[f.sha256]))
        elif now - f.mtime < grace_s:
            kept.append((f, f"younger than the grace period ({grace_s:g} s)"))
        else:
            delete.append(f)
    return delete, kept


# Holds ----------------------------------------------------------------------------------------
def resolve_hold(ident: str, runs: Mapping[str, Run], now: float | None = None) -> Hold:
    """An id to hold: an artifact sha256 (64 hex), `model@version`, or an event id or unique
    prefix (at least 8 characters), which holds that event's whole run (a run's id is its first
    event's). LookupError says what matched nothing or too much."""
    at = time.time() if now is None else now
    ident = ident.strip()
    if SHA256.match(ident.lower()):
        return Hold(ident, sha256=ident.lower(), at=at)
    if found := MODEL_VERSION.match(ident):
        version = int(found["version"])
        for run in runs.values():
            if run.model_name == found["name"] and any(v == version for _, v in run.deployed):
                return Hold(ident, correlation=run.correlation, at=at)
        raise LookupError(f"no deployment of {ident} in the lineage")
    if len(ident) < 8:
        raise LookupError(f"{ident!r} is too short: give at least 8 characters of an id")
    matches = {
        run.correlation
        for run in runs.values()
        for eid in run.event_ids | {run.correlation}
        if eid.startswith(ident)
    }
    if not matches:
        raise LookupError(f"no event, run, artifact or model version matches {ident!r}")
    if len(matches) > 1:
        raise LookupError(f"{ident!r} is ambiguous: it matches {len(matches)} runs; give more characters")
    return Hold(ident, correlation=matches.pop(), at=at)


def hold_key(ident: str) -> str:
    """The bucket key of a hold on `ident`: its sha256, since ids like `houses@4` hold characters a
    key may not; one key per id, so holding the same id twice is one hold."""
    return hashlib.sha256(ident.strip().encode()).hexdigest()


def encode_hold(hold: Hold) -> bytes:
    return json.dumps(hold.__dict__, sort_keys=True).encode()


def decode_hold(key: str, value: bytes) -> Hold:
    """A stored hold; ValueError when it is not one, or sits under another id's key (a forged or
    damaged entry must stop gc, never be skipped: a hold gc cannot read would be a deletion)."""
    try:
        doc = json.loads(value)
        hold = Hold(**doc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"hold {key} is not a hold record: {exc}") from None
    if not isinstance(hold.id, str) or hold_key(hold.id) != key:
        raise ValueError(f"hold {key} names {hold.id!r}, whose key differs")
    if not (hold.correlation or (isinstance(hold.sha256, str) and SHA256.match(hold.sha256))):
        raise ValueError(f"hold {key} ({hold.id!r}) holds neither a run nor a sha256")
    return hold


async def holds_bucket(js: Any) -> Any:
    """The bucket; LookupError (saying what to do) when the deployment was never provisioned with it."""
    from nats.js.errors import BucketNotFoundError, NotFoundError

    from services.platform.bus.provision import HOLDS_BUCKET

    try:
        return await js.key_value(HOLDS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        raise LookupError(f"no {HOLDS_BUCKET} bucket on this NATS: run `cairn provision`") from None


# The server sends at most this many subjects in one stream-info reply (nats-server's
# JSMaxSubjectDetails); a bucket with more keys would be listed in part.
SUBJECTS_PER_REPLY = 100_000


async def hold_keys(js: Any) -> list[str]:
    """Every key the holds bucket has had, from the stream's own subject counts (one request).

    Not nats-py's `kv.keys()`: it decides that the listing is over from the consumer's pending count
    while the first key may still be on its way (about two listings in a thousand came back empty,
    and a hold missed there is an artifact gc deletes), and each listing leaves a consumer on the
    server for five minutes (the thousandth was refused)."""
    from services.platform.bus.provision import HOLDS_BUCKET

    prefix = f"$KV.{HOLDS_BUCKET}."
    info = await js.stream_info(f"KV_{HOLDS_BUCKET}", subjects_filter=f"{prefix}>")
    subjects = info.state.subjects or {}
    if len(subjects) >= SUBJECTS_PER_REPLY:
        raise ValueError(f"the holds bucket has {len(subjects)} keys or more: more than one reply lists")
    return sorted(subject[len(prefix) :] for subject in subjects)


async def read_holds(js: Any) -> list[Hold]:
    """Every hold in the bucket, oldest first; ValueError on an entry that is not a hold."""
    from nats.js.errors import KeyNotFoundError

    kv = await holds_bucket(js)
    holds = []
    for key in await hold_keys(js):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # released (its subject keeps the delete marker)
            continue
        holds.append(decode_hold(key, entry.value or b""))
    return sorted(holds, key=lambda h: (h.at, h.id))


async def add_hold(js: Any, hold: Hold) -> Hold | None:
    """Create the hold's key (compare-and-set on "no such key"): concurrent holds of different ids
    never overwrite each other. Returns the hold already there when `hold.id` was held before."""
    return await _create_hold(await holds_bucket(js), hold)


async def _create_hold(kv: Any, hold: Hold) -> Hold | None:
    """`add_hold` on the bucket already opened (an import makes many holds with one look-up)."""
    from nats.js.errors import KeyWrongLastSequenceError

    key = hold_key(hold.id)
    try:
        await kv.create(key, encode_hold(hold))
    except KeyWrongLastSequenceError:
        return decode_hold(key, (await kv.get(key)).value or b"")
    return None


async def release_hold(js: Any, ident: str) -> bool:
    """Delete the hold on `ident` at the revision read (a hold made again meanwhile stays); False
    when there is none."""
    from nats.js.errors import KeyNotFoundError

    kv = await holds_bucket(js)
    key = hold_key(ident)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return False
    await kv.delete(key, last=entry.revision)
    return True


def file_holds(home: Path) -> list[Hold]:
    """The holds of `<home>/holds.json`, where versions before the shared bucket kept them."""
    path = home / HOLDS_FILE
    if not path.exists():
        return []
    return [Hold(**doc) for doc in json.loads(path.read_text())]


async def import_file_holds(js: Any, home: Path) -> tuple[int, Path] | None:
    """Move a `holds.json` into the bucket once: each hold created (one already there is kept),
    then the file renamed to `holds.json.imported`. Returns (holds imported, new name), or None
    when there is no file."""
    path = home / HOLDS_FILE
    holds = file_holds(home)
    if not path.exists():
        return None
    kv = await holds_bucket(js)
    imported = 0
    for hold in holds:
        if await _create_hold(kv, hold) is None:
            imported += 1
    done = path.with_name(HOLDS_FILE + ".imported")
    with contextlib.suppress(FileNotFoundError):  # another command of this home imported it meanwhile
        path.replace(done)
    return imported, done


# The store ------------------------------------------------------------------------------------
def sha_of(path: str, root: str) -> str | None:
    """`sha256/<hh>/<hash><suffix>` or `landing/sha256/<hh>/<hash>/<name>` -> the hash."""
    parts = path[len(root) :].strip("/").split("/")
    if len(parts) == 3 and parts[0] == "sha256":
        candidate = parts[2][:64]
    elif len(parts) == 5 and parts[:2] == ["landing", "sha256"]:
        candidate = parts[3]
    else:
        return None
    return candidate if SHA256.match(candidate) else None


def collect(store_url: str) -> list[StoredFile]:
    """Every content-addressed file in the store (temporary upload names are not: grace covers them)."""
    fs, root = fsspec.core.url_to_fs(store_url.rstrip("/"))
    root = root.rstrip("/")
    out = []
    for prefix in (f"{root}/sha256", f"{root}/landing/sha256"):
        if not fs.exists(prefix):
            continue
        for path, info in fs.find(prefix, detail=True).items():
            sha = sha_of(path, root)
            if sha is None or path.split("/")[-1].count(".tmp-"):
                continue
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if isinstance(mtime, datetime):
                mtime = mtime.timestamp()
            out.append(StoredFile(path, sha, int(info.get("size") or 0), float(mtime)))
    return out


def bundle_references(store_url: str, kept: Iterable[StoredFile]) -> set[str]:
    """Hashes named inside kept JSON artifacts (a model bundle names its estimator file)."""
    fs, _ = fsspec.core.url_to_fs(store_url.rstrip("/"))
    found: set[str] = set()

    def walk(doc: Any) -> None:
        if isinstance(doc, dict):
            if isinstance(doc.get("sha256"), str) and SHA256.match(doc["sha256"]):
                found.add(doc["sha256"])
            for value in doc.values():
                walk(value)
        elif isinstance(doc, list):
            for value in doc:
                walk(value)

    for f in kept:
        if f.path.endswith(".json") and f.size < 16 * 1024 * 1024:
            try:
                walk(json.loads(fs.cat_file(f.path)))
            except (ValueError, OSError):
                continue
    return found


def delete(store_url: str, files: Iterable[StoredFile]) -> int:
    """Remove the files (and a landing file's now empty folder); returns the bytes freed."""
    fs, _ = fsspec.core.url_to_fs(store_url.rstrip("/"))
    freed = 0
    for f in files:
        try:
            fs.rm_file(f.path)
        except FileNotFoundError:
            continue
        freed += f.size
        if "/landing/" in f.path:
            folder = f.path.rsplit("/", 1)[0]
            try:
                if not fs.ls(folder):
                    fs.rmdir(folder)
            except OSError:
                pass
    return freed


def removed_runs(runs: Mapping[str, Run], removed: set[str]) -> dict[str, str]:
    """MLflow run id -> model sha256, for the final fits whose model bundle was removed."""
    return {run_id: sha for run in runs.values() for sha, run_id in run.mlflow_runs.items() if sha in removed}


def gc_tag_value(now: float) -> str:
    return "removed " + datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
