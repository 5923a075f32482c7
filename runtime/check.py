"""`harness check`: validate the config and report every control that `serve` would put in
force, without starting anything. The JSON form is audit evidence.

It prepares exactly as `serve` does (runtime/startup.py), up to the engine's start, binding
nothing and changing no limit, and reports what each part describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime import __version__, startup
from runtime import config as config_mod
from runtime.sandbox import front as front_sandbox
from runtime.sandbox.seccomp import configured


def report(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = config_mod.load(config_path, overrides)
    configured.check_config(cfg)  # as serve does: a broken profile is exit 2
    container = front_sandbox.container_profile(cfg)  # likewise
    prepared = startup.prepare(cfg, startup.Site.planned(cfg), container, bind=False)
    return {
        "harness_version": __version__,
        "config": str(cfg.source),
        "model": {"dir": str(cfg.model.dir), "served_name": cfg.model.served_name},
        "served_names": list(cfg.served_names),
        "controls": prepared.describe(),
        "engine": prepared.describe_engine(),
    }


def render(rep: dict[str, Any]) -> str:
    lines = [f"harness {rep['harness_version']}: {rep['config']}", ""]
    width = max(len(name) for name in rep["controls"])
    for name, control in rep["controls"].items():
        detail = {k: v for k, v in control.items() if k != "status"}
        brief = ", ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, list | dict))
        lines.append(f"  {name:<{width}}  {control['status']:<10} {brief}")
    return "\n".join(lines)
