"""Generate the published JSON Schemas (one per event type) and the AsyncAPI document, and guard
them against the last release.

Compatibility is judged against a release snapshot (``contracts/releases/<version>/``: the schemas
and AsyncAPI document as released, with a manifest of their sha256), never against the working
tree's files, which anyone can regenerate. Writing, checking and cutting a release all go through
``judge``; a snapshot is never rewritten. Who publishes each type is ``contracts.events.PRODUCERS``,
read off the payload classes; it is re-exported here for the importers of old.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.compat import Report, compare
from contracts.envelope import OLDER_TYPES, TYPES, envelope_model
from contracts.events import PRODUCERS
from contracts.subjects import dead_letter_subject, stream_filter, subject_for
from contracts.types import is_strict
from contracts.upcasters import split_version

PACKAGE_DIR = Path(__file__).parent
SCHEMA_DIR = PACKAGE_DIR / "schemas"
ASYNCAPI_PATH = PACKAGE_DIR / "asyncapi.json"
RELEASES_DIR = PACKAGE_DIR / "releases"
MANIFEST = "manifest.json"


def event_schema(event_type: str) -> dict[str, Any]:
    payload_cls = TYPES[event_type]
    schema = envelope_model(payload_cls).model_json_schema(mode="validation")
    if is_strict(payload_cls):
        # The strict door refuses unknown fields at every level (DataArrived's nested TuningSpec
        # is shared with the tolerant internal events, whose schema allows them).
        for definition in schema.get("$defs", {}).values():
            if definition.get("type") == "object":
                definition["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://cairn.dev/schemas/{event_type}.json"
    return schema


def schema_files() -> dict[str, str]:
    """File name -> exact text, so a test can compare with what is committed byte for byte."""
    return {f"{t}.json": json.dumps(event_schema(t), indent=2, sort_keys=True) + "\n" for t in sorted(TYPES)}


def asyncapi_document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type in sorted(TYPES):
        name = event_type.replace(".", "_")
        messages[name] = {
            "name": event_type,
            "contentType": "application/cloudevents+json",
            "payload": {"$ref": f"./schemas/{event_type}.json"},
        }
        channels[name] = {
            "address": subject_for(event_type),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "description": f"Published by {PRODUCERS[event_type]}.",
        }
        operations[f"publish_{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
        }
    channels["dead_letters"] = {
        "address": dead_letter_subject("{service}"),
        "parameters": {"service": {"description": "The service that refused the message."}},
        "description": "Original bytes of refused messages, headers carry the reason.",
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "cairn event bus",
            "version": "1.0.0",
            "description": f"Every event lives in the JetStream stream CAIRN (subjects {stream_filter()}).",
        },
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def asyncapi_text() -> str:
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n"


def check(released_dir: Path | None = None, schemas: dict[str, dict[str, Any]] | None = None) -> list[Report]:
    """Each model's schema against its released predecessor; `schemas` overrides the models.

    `released_dir` defaults to the latest release's schemas (none released: every type is new).
    A released type that no model publishes any more must be readable through an upcaster.
    """
    if released_dir is None:
        latest = latest_release()
        released_dir = latest / "schemas" if latest else RELEASES_DIR / "none"
    current = schemas if schemas is not None else {t: event_schema(t) for t in TYPES}
    reports = []
    for event_type, schema in sorted(current.items()):
        path = released_dir / f"{event_type}.json"
        if path.is_file():
            reports.append(compare(event_type, json.loads(path.read_text()), schema))
        else:
            reports.append(Report(event_type, additive=[("<type>", "new event type")]))
    for path in sorted(released_dir.glob("*.json")):
        event_type = path.name.removesuffix(".json")
        if event_type in current or event_type in OLDER_TYPES:
            continue
        base, version = split_version(event_type)
        newer = [t for t in current if split_version(t)[0] == base and split_version(t)[1] > version]
        what = f"superseded by {newer[0]} without an upcaster" if newer else "event type removed"
        what += ": events of it in the log become unreadable"
        reports.append(Report(event_type, breaking=[("<type>", what)]))
    return reports


# Releases --------------------------------------------------------------------------------------------
def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def latest_release(releases: Path = RELEASES_DIR) -> Path | None:
    """The snapshot of the highest version that has a manifest; None before the first release."""
    snapshots = [manifest.parent for manifest in releases.glob(f"*/{MANIFEST}")]
    return max(snapshots, key=lambda d: _version_key(d.name), default=None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot_files(release: Path) -> dict[str, str]:
    paths = [*sorted((release / "schemas").glob("*.json")), release / "asyncapi.json"]
    return {p.relative_to(release).as_posix(): _sha256(p) for p in paths if p.is_file()}


def edited_release(release: Path) -> list[str]:
    """What changed in a snapshot since it was cut: a release is judged as it was, so it is never edited."""
    manifest = json.loads((release / MANIFEST).read_text())
    problems = []
    if manifest.get("version") != release.name:
        problems.append(f"release {release.name}: its manifest names version {manifest.get('version')!r}")
    cut, now = manifest.get("files", {}), _snapshot_files(release)
    for name in sorted(cut.keys() | now.keys()):
        if cut.get(name) != now.get(name):
            state = "added" if name not in cut else "removed" if name not in now else "changed"
            problems.append(f"release {release.name}: {name} {state} since the release was cut")
    return problems


@dataclass
class Verdict:
    """Today's models against the latest release: what breaks it, what only adds to it."""

    release: str | None
    breaking: list[str] = field(default_factory=list)  # incompatible changes, and edits to the snapshot
    additive: list[str] = field(default_factory=list)


class Refused(Exception):
    """A write, check or release refused; each line names one problem."""

    def __init__(self, message: str, lines: list[str]):
        super().__init__(message)
        self.lines = lines


def judge(releases: Path = RELEASES_DIR) -> Verdict:
    latest = latest_release(releases)
    reports = check(latest / "schemas" if latest else releases / "none")
    verdict = Verdict(latest.name if latest else None, edited_release(latest) if latest else [])
    for report in reports:
        lines = report.lines()
        verdict.breaking += lines[: len(report.breaking)]
        verdict.additive += lines[len(report.breaking) :]
    return verdict


def refuse_incompatible(verdict: Verdict, also: list[str] | None = None) -> None:
    """Raise naming every breaking change (and the `also` problems); a new vN type is additive."""
    also = also or []
    if not verdict.breaking and not also:
        return
    parts = []
    if verdict.breaking:
        parts.append(
            f"{len(verdict.breaking)} backward-incompatible change(s) against release {verdict.release}: "
            "publish a new vN with an upcaster instead (docs/CONTRACTS.md)"
        )
    if also:
        parts.append(f"{len(also)} generated file(s) out of date: run `cairn schemas`")
    raise Refused("; ".join(parts), verdict.breaking + also)


def stale_files() -> list[str]:
    """The working tree's generated files that are not what today's models generate."""
    expected = {SCHEMA_DIR / name: text for name, text in schema_files().items()}
    expected[ASYNCAPI_PATH] = asyncapi_text()
    shown = PACKAGE_DIR.parent
    stale = [
        f"{path.relative_to(shown)}: {'missing' if not path.is_file() else 'not what the models generate'}"
        for path, text in expected.items()
        if not path.is_file() or path.read_text() != text
    ]
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        if path not in expected and path.stem not in OLDER_TYPES:
            stale.append(f"{path.relative_to(shown)}: no model publishes it and no upcaster reads it")
    return stale


def check_all(releases: Path = RELEASES_DIR) -> Verdict:
    """`cairn schemas --check`: compatible with the release, and the generated files current.

    No snapshot at all is refused: an install without its releases would otherwise pass anything."""
    verdict = judge(releases)
    if verdict.release is None:
        raise Refused(f"no release snapshot in {releases}: cut the first with `cairn schemas --release`", [])
    refuse_incompatible(verdict, stale_files())
    return verdict


def write_all(releases: Path = RELEASES_DIR) -> list[Path]:
    """Write the schemas of today's models, refused if they break the release; released schemas of
    superseded versions stay as they are."""
    refuse_incompatible(judge(releases))
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = SCHEMA_DIR / name
        path.write_text(text)
        written.append(path)
    for stale in SCHEMA_DIR.glob("*.json"):
        if stale.name not in schema_files() and stale.name.removesuffix(".json") not in OLDER_TYPES:
            stale.unlink()
    ASYNCAPI_PATH.write_text(asyncapi_text())
    written.append(ASYNCAPI_PATH)
    return written


def project_version() -> str:
    """The [project] version of the checkout's pyproject.toml: a release is cut from a checkout (an
    editable install's metadata would lag a version bump)."""
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if not pyproject.is_file():
        raise Refused(f"no {pyproject}: cut a release from a checkout of cairn", [])
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def cut_release(releases: Path = RELEASES_DIR) -> Path:
    """Snapshot the committed schemas as release `project_version()`: compatible with the latest
    release (if any) and current with the models, so the snapshot is what is committed."""
    version = project_version()
    target = releases / version
    if target.exists():
        raise Refused(
            f"release {version} already has a snapshot ({target}); a release is never rewritten: "
            "bump [project] version in pyproject.toml first",
            [],
        )
    latest = latest_release(releases)
    if latest and _version_key(version) < _version_key(latest.name):
        raise Refused(f"version {version} is older than the latest release {latest.name}", [])
    refuse_incompatible(judge(releases), stale_files())
    (target / "schemas").mkdir(parents=True)
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        shutil.copyfile(path, target / "schemas" / path.name)
    shutil.copyfile(ASYNCAPI_PATH, target / "asyncapi.json")
    manifest = {"version": version, "files": _snapshot_files(target)}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


def main() -> int:
    """`python -m contracts.schemas`: write, under the same refusal as `cairn schemas`."""
    try:
        for path in write_all():
            print(path)
    except Refused as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        print(f"contracts.schemas: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
