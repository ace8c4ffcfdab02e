"""Target selectors: a device id, `tag:NAME`, `profile:NAME` or `all`, resolved against the registry."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.sdk.fleet.errors import SelectorError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
KINDS = ("device", "tag", "profile", "all")


@dataclass(frozen=True)
class Selector:
    """A parsed selector: `kind` is device, tag, profile or all; `value` is the name (empty for all)."""

    kind: str
    value: str = ""

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        return self.value if self.kind == "device" else f"{self.kind}:{self.value}"

    def matches(self, device: Mapping[str, Any]) -> bool:
        """Whether one registry row (device_id, tags, profile) is selected."""
        if self.kind == "all":
            return True
        if self.kind == "device":
            return bool(device.get("device_id") == self.value)
        if self.kind == "tag":
            return self.value in (device.get("tags") or [])
        return bool(device.get("profile") == self.value)


def parse_selector(text: str) -> Selector:
    """Parse `DEVICE_ID`, `tag:NAME`, `profile:NAME` or `all`; raises SelectorError naming the fix."""
    text = (text or "").strip()
    if text == "all":
        return Selector("all")
    if ":" in text:
        kind, _, value = text.partition(":")
        if kind not in ("tag", "profile"):
            raise SelectorError(
                f"selector {text!r}: unknown kind {kind!r}; use a device id, tag:NAME, profile:NAME or all"
            )
        if not _NAME_RE.match(value):
            raise SelectorError(
                f"selector {text!r}: {kind} name {value!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        return Selector(kind, value)
    if not _NAME_RE.match(text):
        raise SelectorError(
            f"selector {text!r} is not a device id (letters, digits, '.', '_', '-'), tag:NAME, profile:NAME or all"
        )
    return Selector("device", text)


def resolve(selector: Selector | str, devices: Sequence[Mapping[str, Any]]) -> list[str]:
    """Device ids the selector picks from registry rows, sorted; refuses a selection that is empty."""
    sel = parse_selector(selector) if isinstance(selector, str) else selector
    picked = sorted(str(d["device_id"]) for d in devices if sel.matches(d))
    if picked:
        return picked
    known = sorted(str(d["device_id"]) for d in devices)
    if sel.kind == "device":
        shown = ", ".join(known[:20]) or "none yet"
        raise SelectorError(
            f"unknown device {sel.value!r}; known devices: {shown}. Check the id with `edgefleet devices`"
        )
    if sel.kind == "all":
        raise SelectorError(
            "the fleet has no devices yet: start an agent (edgefleet-agent) against this broker and fleet"
        )
    values = sorted(
        {t for d in devices for t in (d.get("tags") or [])}
        if sel.kind == "tag"
        else {str(d.get("profile")) for d in devices if d.get("profile")}
    )
    raise SelectorError(
        f"no device has {sel.kind} {sel.value!r}; {sel.kind}s in this fleet: {', '.join(values) or 'none'}"
    )
