"""Regenerate the parts of docs/ that are written from the code (`make docs`).

Each generated part sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`;
tests/unit/test_docs.py fails when one differs from what this writes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime import startup, telemetry  # noqa: E402 - after the path is set


def events_table() -> str:
    rows = ["| event | reports | fields |", "|---|---|---|"]
    for name, kind in telemetry.EVENTS.items():
        says = kind.says + (" *(a startup step: also an OTel span)*" if kind.step else "")
        rows.append(f"| `{name}` | {says} | {kind.fields} |")
    return "\n".join(rows)


def controls_table() -> str:
    rows = ["| control (`harness check`) | step | enforces | settings |", "|---|---|---|---|"]
    for name, control in startup.CONTROLS.items():
        rows.append(f"| `{name}` | {control.step} | {control.enforces} | {control.settings} |")
    return "\n".join(rows)


PARTS: dict[str, tuple[str, Callable[[], str]]] = {
    "events": ("docs/events.md", events_table),
    "controls": ("docs/design.md", controls_table),
}


def render(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no generated block named {name!r}")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def stale() -> list[str]:
    """The generated parts that differ from what the code says now."""
    out = []
    for name, (path, make) in PARTS.items():
        text = (ROOT / path).read_text()
        if render(text, name, make()) != text:
            out.append(f"{path} ({name})")
    return out


def main() -> int:
    for name, (path, make) in PARTS.items():
        file = ROOT / path
        file.write_text(render(file.read_text(), name, make()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
