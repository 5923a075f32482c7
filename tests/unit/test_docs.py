"""The documentation holds together: every relative link and anchor resolves, every document
is reachable from the README, the README stays short, and what the code, manifests and
profiles cite exists."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import get_args

import pytest
from pydantic import BaseModel

from runtime import startup, telemetry, vllm_options
from runtime.config import Config

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# What the code, manifests and profiles may cite: a document path, optionally with a section.
CITED = re.compile(r"\b((?:docs/[\w-]+|benchmarks/README)\.md)\b")
SOURCES = [
    path
    for folder in ("runtime", "deploy", "images", "seccomp", "apparmor", "benchmarks", "tests")
    for path in sorted((ROOT / folder).rglob("*"))
    if path.is_file()
    and path.suffix in {".py", ".toml", ".yaml", ".json", ".sh", ""}
    and "runs" not in path.parts
]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # no headings in code blocks
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_document_is_linked_from_the_readme_and_the_readme_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    unlinked = [
        str(d.relative_to(ROOT)) for d in DOCS if d != ROOT / "README.md" and d not in linked
    ]
    assert not unlinked, f"not linked from README.md: {unlinked}"
    assert len(readme.encode()) <= 15 * 1024, "README.md over 15 KB: move detail into docs/"
    assert readme.startswith("# harness\n\n```sh\nmake demo")  # the two commands come first
    assert "make test " in readme.split("```")[1]


def test_what_the_code_cites_exists() -> None:
    cited = {
        (source.relative_to(ROOT), name)
        for source in SOURCES
        for name in CITED.findall(source.read_text(errors="replace"))
    }
    assert cited, "the pattern no longer finds the code's citations"
    missing = sorted(f"{src}: {name}" for src, name in cited if not (ROOT / name).is_file())
    assert not missing, missing
    stale = [
        str(p.relative_to(ROOT))
        for p in SOURCES
        if re.search(
            r"DESIGN\.md|shared notes|configuration reference in README",
            p.read_text(errors="replace"),
        )
        and p.name != "test_docs.py"
    ]
    assert not stale, f"citations of documents that are not in the repository: {stale}"


# A path under tests/ that the docs or the code name (not one inside another project's tree,
# such as model-transparency's scripts/tests/).
CITED_TEST = re.compile(r"(?<![\w/.-])(tests/[\w./-]*\w)")


# A dotted name under tests (tests.support.container.Container): a module, then attributes.
CITED_TEST_MODULE = re.compile(r"(?<![\w.])(tests(?:\.\w+)+)")


def _module_exists(dotted: str) -> bool:
    """Whether `dotted` is a module of the suite, or a name that one of them defines."""
    parts = dotted.split(".")
    for n in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:n])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.is_file():
            if n == len(parts):
                return True
            tree = ast.parse(source.read_text())
            defined = {
                target.id if isinstance(target, ast.Name) else getattr(target, "name", "")
                for node in tree.body
                for target in (node.targets if isinstance(node, ast.Assign) else [node])
            }
            return parts[n] in defined
    return False


def test_every_test_path_the_docs_and_code_name_exists() -> None:
    texts = {p: p.read_text(errors="replace") for p in [*DOCS, *SOURCES, ROOT / "Makefile"]}
    cited = {(p, name) for p, text in texts.items() for name in CITED_TEST.findall(text)}
    dotted = {(p, name) for p, text in texts.items() for name in CITED_TEST_MODULE.findall(text)}
    assert cited and dotted, "the patterns no longer find the names under tests/"
    missing = sorted(
        f"{p.relative_to(ROOT)}: {name}" for p, name in cited if not (ROOT / name).exists()
    ) + sorted(f"{p.relative_to(ROOT)}: {name}" for p, name in dotted if not _module_exists(name))
    assert not missing, f"paths or modules under tests/ that do not exist: {missing}"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_parts_of_the_docs_are_current() -> None:
    generate = _generator()
    assert not generate.stale(), "run `make docs` and commit the result"
    # The check can fail: a registry entry that the document does not show is found.
    text = (ROOT / "docs" / "events.md").read_text()
    assert generate.render(text, "events", "| stale |") != text


def test_every_registered_event_is_emitted_by_the_code() -> None:
    code = "\n".join(
        p.read_text() for p in (ROOT / "runtime").rglob("*.py") if p.name != "telemetry.py"
    )
    unused = [name for name in telemetry.EVENTS if f'"{name}"' not in code]
    assert not unused, f"registered but never emitted: {unused}"


def _reference_keys() -> set[tuple[str, str]]:
    """(table, key) of every key docs/configuration.md's TOML block shows, commented or not."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    table, keys = "", set()
    for line in block.splitlines():
        if header := re.match(r"\[\[?([a-z_.]+)\]\]?", line):
            table = header.group(1)
            keys.add(tuple(table.rpartition(".")[::2]))  # [engine.vllm]: the key engine.vllm
        elif key := re.match(r"(?:# )?([a-z_]+) = ", line):
            keys.add((table, key.group(1)))
    return keys


def _model_keys(model: type[BaseModel], table: str) -> set[tuple[str, str]]:
    keys = set()
    for name, info in model.model_fields.items():
        nested = [
            arg
            for arg in (info.annotation, *get_args(info.annotation))
            for arg in (arg, *get_args(arg))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        keys.add((table, name))  # a table too: [front.tls] is the key tls of [front]
        if nested:
            keys |= _model_keys(nested[0], f"{table}.{name}".lstrip("."))
    return keys


def test_the_configuration_reference_shows_every_key_and_no_other() -> None:
    documented = _reference_keys()
    vllm = {key for table, key in documented if table == "engine.vllm"}
    assert vllm and vllm <= set(vllm_options.OPTIONS), vllm - set(vllm_options.OPTIONS)
    keys = _model_keys(Config, "") - {("", "source")}  # `source`: set by the loader
    assert ("engine.lora.signature", "public_key") in keys  # nested lists of tables are walked
    # An adapter's and a draft's keys are the model's: the reference says so once.
    missing = sorted(
        f"{table}.{key}".lstrip(".")
        for table, key in keys - documented
        if (re.sub(r"^engine\.(lora|draft)", "model", table), key) not in documented
    )
    assert not missing, f"keys of runtime/config.py missing from docs/configuration.md: {missing}"
    unknown = sorted(".".join(k) for k in documented - keys if k[0] != "engine.vllm")
    assert not unknown, f"docs/configuration.md shows keys that do not exist: {unknown}"


def test_every_setting_the_controls_table_names_is_a_configuration_key() -> None:
    """docs/design.md's controls table (from startup.CONTROLS) names the settings that govern
    each control: each one, or each table ending in `.*`, exists in the config models."""
    keys = {f"{table}.{key}".lstrip(".") for table, key in _model_keys(Config, "")}
    named = [
        name
        for control in startup.CONTROLS.values()
        for name in re.findall(r"`([a-z_.*]+)`", control.settings)
    ]
    assert named
    unknown = [
        name
        for name in named
        if not (
            name in keys
            or (name.endswith(".*") and name[:-2] in keys)
            or ("*" in name.removesuffix(".*") and any(fnmatch.fnmatch(k, name) for k in keys))
        )
    ]
    assert not unknown, f"startup.CONTROLS names settings that do not exist: {unknown}"
