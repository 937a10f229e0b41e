"""The docs describe the tree that exists: README's layout map names every module and nothing else, every
relative link resolves, the benchmark page stays a summary, and docs/speed.md follows the speed plan."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nested_learning"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _fenced_block_after(text: str, heading: str) -> list[str]:
    """The lines of the first fenced code block after ``heading``."""
    rest = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(rest) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(rest)) if rest[i].startswith("```"))
    return rest[start + 1:end]


def layout_map() -> dict[str, str]:
    """README's layout map as {path relative to the repository root: role}; directories end with '/'.
    Nesting is by indentation: an entry belongs to the nearest less-indented directory above it."""
    entries: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indent, directory path)
    for line in _fenced_block_after((ROOT / "README.md").read_text(), "## Development"):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name, _, role = line.strip().partition(" ")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        assert path not in entries, f"README layout map lists {path} twice"
        entries[path] = role.strip()
        if name.endswith("/"):
            parents.append((indent, path))
    return entries


def test_layout_map_parses_into_the_package():
    entries = layout_map()
    assert "nested_learning/" in entries and "nested_learning/speed/plan.py" in entries, sorted(entries)


def test_every_name_in_the_layout_map_exists_and_has_a_role():
    for path, role in layout_map().items():
        target = ROOT / path
        assert target.is_dir() if path.endswith("/") else target.is_file(), f"README layout map: {path} does not exist"
        assert role, f"README layout map: {path} has no role"


def test_every_module_and_package_appears_in_the_layout_map():
    listed = set(layout_map())
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            rel = rel.removesuffix("__init__.py")  # the package's own line stands for it
        if rel not in listed:
            missing.append(rel)
    assert not missing, f"modules missing from README's layout map: {missing}"


def test_benchmarks_page_is_a_summary():
    lines = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
    assert len(lines) <= 150, f"docs/benchmarks.md has {len(lines)} lines; history belongs in docs/dev/"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor within the page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_user_docs_name_the_speed_levers_under_speed():
    """The levers moved from `model:` to `speed:`; README and the user docs must not send anyone to the old keys
    (docs/dev/benchmarks-history.md keeps the names of its time)."""
    from nested_learning.config import MOVED_TO_SPEED

    old = re.compile(r"\bmodel\.(" + "|".join(sorted(MOVED_TO_SPEED)) + r")\b")
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        hits = old.findall(doc.read_text())
        assert not hits, f"{doc.relative_to(ROOT)} still names model.{hits[0]} (now speed.{hits[0]})"


def test_speed_doc_walks_the_levers_in_plan_order_and_shows_the_real_plan():
    import torch

    from nested_learning.config import TrainConfig
    from nested_learning.model.loading import load_model
    from nested_learning.model.lora import wrap_lora
    from nested_learning.speed.plan import LEVERS, plan_speed

    text = (ROOT / "docs" / "speed.md").read_text()
    assert re.findall(r"^### \d+\. `(\w+)`", text, flags=re.M) == list(LEVERS)
    # The CPU example: the default config with packing, on the embedded tiny Llama, as the page says.
    cfg = TrainConfig.model_validate({"model": {"device": "cpu"}, "data": {"packing": True}})
    model = wrap_lora(load_model(cfg.model), cfg.lora, seed=0)
    blocks = re.findall(r"^```text\n(.*?)^```", text, flags=re.M | re.S)
    shown = next(b for b in blocks if b.startswith("speed plan (cpu):")).rstrip("\n")
    assert shown == plan_speed(cfg, model, torch.device("cpu")).format()
