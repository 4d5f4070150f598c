"""Backward compatibility of a contract: can today's model still read what the released one allowed?

The released contract is the last release's snapshot (``contracts/releases/<version>/``, judged in
contracts/schemas.py). Comparing a model's schema with its released predecessor finds the changes
that would break a reader of the log or a consumer not yet upgraded: a field removed, a required
field added, a type narrowed (a type, enum value or null dropped, a bound tightened, a pattern
changed, unknown fields no longer allowed).
Everything else (an optional field added, a type widened) is additive. docs/CONTRACTS.md has the
rules and what to do instead of a breaking change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Bounds whose larger value is narrower, and those whose smaller value is.
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_TYPE_KEYS = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "properties", "items")


@dataclass
class Report:
    """What changed between the released schema of one event type and the model's."""

    event_type: str
    breaking: list[tuple[str, str]] = field(default_factory=list)  # (field path, what changed)
    additive: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaking

    def lines(self) -> list[str]:
        out = [f"{self.event_type}: {path}: {what}" for path, what in self.breaking]
        return out + [f"{self.event_type}: {path}: {what} (compatible)" for path, what in self.additive]


def compare(event_type: str, released: dict[str, Any], current: dict[str, Any]) -> Report:
    """Every incompatible and every additive change from `released` to `current`, by field path."""
    report = Report(event_type)
    _Walk(released, current, report).node(released, current, "")
    return report


class _Walk:
    def __init__(self, old_root: dict[str, Any], new_root: dict[str, Any], report: Report):
        self.old_root, self.new_root, self.report = old_root, new_root, report

    def breaking(self, path: str, what: str) -> None:
        self.report.breaking.append((path or "<root>", what))

    def additive(self, path: str, what: str) -> None:
        self.report.additive.append((path or "<root>", what))

    def node(self, old: Any, new: Any, path: str) -> None:
        if path.count(".") + path.count("[") > _MAX_DEPTH:
            return  # a recursive model: deep enough to have seen every field once
        old, new = _resolve(old, self.old_root), _resolve(new, self.new_root)
        if not any(k in new for k in _TYPE_KEYS):
            return  # `{}` or only annotations: anything goes, nothing can be narrower than before
        if not any(k in old for k in _TYPE_KEYS):
            self.breaking(path, "type narrowed: anything was accepted")
            return
        old_alts, new_alts = _alternatives(old, self.old_root), _alternatives(new, self.new_root)
        if len(old_alts) > 1 or len(new_alts) > 1:
            self.union(old_alts, new_alts, path)
        else:
            self.single(old_alts[0], new_alts[0], path)

    def union(self, old_alts: list[dict[str, Any]], new_alts: list[dict[str, Any]], path: str) -> None:
        """Each released alternative must still be accepted: matched by JSON type, then compared."""
        for old in old_alts:
            kind = _kind(old)
            match = [n for n in new_alts if _kind(n) == kind or (kind == "integer" and _kind(n) == "number")]
            if not match:
                self.breaking(path, f"type narrowed: {kind} no longer accepted")
            elif len(match) == 1:
                self.single(old, match[0], path)
        kinds = {_kind(n) for n in new_alts} - {_kind(o) for o in old_alts}
        if kinds:
            self.additive(path, "type widened: now also " + ", ".join(sorted(kinds)))

    def single(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        old_kind, new_kind = _kind(old), _kind(new)
        if old_kind == "integer" and new_kind == "number":
            self.additive(path, "type widened: integer -> number")
        elif old_kind != new_kind and new_kind != "any":
            self.breaking(path, f"type narrowed: {old_kind} -> {new_kind}")
            return
        if "const" in new and new.get("const") != old.get("const"):
            self.breaking(path, f"type narrowed: now only {new['const']!r}")
        if "enum" in new:
            dropped = [v for v in old.get("enum", []) if v not in new["enum"]]
            if "enum" not in old and "const" not in old:
                self.breaking(path, f"type narrowed: now one of {new['enum']!r}")
            elif dropped:
                self.breaking(path, f"type narrowed: {', '.join(map(repr, dropped))} no longer accepted")
        for bound in _LOWER_BOUNDS:
            if bound in new and (bound not in old or new[bound] > old[bound]):
                self.breaking(path, f"type narrowed: {bound} {old.get(bound)} -> {new[bound]}")
        for bound in _UPPER_BOUNDS:
            if bound in new and (bound not in old or new[bound] < old[bound]):
                self.breaking(path, f"type narrowed: {bound} {old.get(bound)} -> {new[bound]}")
        if "pattern" in new and new["pattern"] != old.get("pattern"):
            self.breaking(path, "type narrowed: pattern changed")
        if _constraints(new) != _constraints(old) and _constraints(new):
            self.breaking(path, "type narrowed: the rules between fields changed")
        if "items" in old or "items" in new:
            self.node(old.get("items", {}), new.get("items", {}), f"{path}[]")
        if old_kind == "object":
            self.object(old, new, path)

    def object(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
        prefix = f"{path}." if path else ""
        for name in old_props:
            if name not in new_props:
                self.breaking(prefix + name, "field removed (a new vN with an upcaster is due)")
        for name, schema in new_props.items():
            if name not in old_props:
                if name in new_req:
                    self.breaking(prefix + name, "required field added")
                else:
                    self.additive(prefix + name, "optional field added")
                continue
            if name in new_req and name not in old_req:
                self.breaking(prefix + name, "field became required")
            self.node(old_props[name], schema, prefix + name)
        old_extra, new_extra = old.get("additionalProperties", True), new.get("additionalProperties", True)
        if old_extra is not False and new_extra is False:
            self.breaking(path, "type narrowed: unknown fields no longer accepted")
        elif old_extra is False and new_extra is not False:
            self.additive(path, "unknown fields now accepted")
        elif isinstance(old_extra, dict) and isinstance(new_extra, dict):
            self.node(old_extra, new_extra, f"{path}{{}}")


_MAX_DEPTH = 40


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s (pydantic writes `#/$defs/Name`), keeping sibling keywords."""
    seen = set()
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        if ref in seen or not ref.startswith("#/"):
            break
        seen.add(ref)
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
    return schema if isinstance(schema, dict) else {}


def _is_union(branches: list[Any]) -> bool:
    """`anyOf` of types (`X | None`), not of constraints (DataArrived's "target or text")."""
    return any(isinstance(b, dict) and any(k in b for k in _TYPE_KEYS) for b in branches)


def _constraints(schema: dict[str, Any]) -> list[Any]:
    return [schema[k] for k in ("anyOf", "oneOf") if k in schema and not _is_union(schema[k])]


def _alternatives(schema: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("anyOf", "oneOf"):
        if key in schema and _is_union(schema[key]):
            rest = {k: v for k, v in schema.items() if k not in (key, "description", "title", "default")}
            return [{**rest, **_resolve(s, root)} for s in schema[key]]
    if isinstance(schema.get("type"), list):
        return [{**schema, "type": t} for t in schema["type"]]
    return [schema]


def _kind(schema: dict[str, Any]) -> str:
    if "type" in schema and isinstance(schema["type"], str):
        return schema["type"]
    if "properties" in schema:
        return "object"
    if "const" in schema:
        return type(schema["const"]).__name__.replace("str", "string").replace("int", "integer")
    if "enum" in schema:
        return "string" if all(isinstance(v, str) for v in schema["enum"]) else "enum"
    return "any"
