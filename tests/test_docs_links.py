"""The README stays a front door, every link in the docs resolves, and code cites specs inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPECS = ROOT / "docs" / "design"
SPEC_NAMES = "dp-lora|smp-lora|membership-audit|split-controlnet|weights-attack|evaluation"
NAMED_REF = re.compile(r"\b(" + SPEC_NAMES + r")(?:\.md| spec) §(\d+)")
NAMED_SPEC = re.compile(r"\b(" + SPEC_NAMES + r")(?:\.md| spec)")
BARE_REF = re.compile(r"\b[Ss]pec §(\d+)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def _code_files() -> list[Path]:
    return [p for folder in ("src", "tests", "benchmarks") for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".yaml", ".toml", ".md") and p.is_file()]


def _sections(spec: str) -> set[str]:
    text = (SPECS / f"{spec}.md").read_text()
    return set(re.findall(r"^## (\d+)\.", text, flags=re.MULTILINE))


def test_no_spec_reference_in_the_code_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _code_files() if p != Path(__file__)
               for m in re.finditer(r"(?:shared/)?(?<!design/)specs/[\w-]+\.md", p.read_text())]
    assert not outside, outside


def test_every_spec_section_cited_in_the_code_exists_in_docs_design():
    missing = []
    for path in _code_files():
        if path == Path(__file__):
            continue
        text = path.read_text()
        named = NAMED_REF.findall(text)
        missing += [f"{path.relative_to(ROOT)}: {name}.md §{n}" for name, n in named
                    if n not in _sections(name)]
        for bare in BARE_REF.finditer(text):
            if re.search(r"\b(" + SPEC_NAMES + r") $", text[:bare.start()]):
                continue  # "<spec> spec §N", checked above
            # A bare "spec §N" means the spec named last before it (or the file's only spec).
            before = NAMED_SPEC.findall(text[:bare.start()])
            named_anywhere = set(NAMED_SPEC.findall(text))
            spec = before[-1] if before else named_anywhere.pop() if len(named_anywhere) == 1 else None
            if spec is None:
                missing.append(f"{path.relative_to(ROOT)}: '{bare.group(0)}' without a spec named before it")
            elif bare.group(1) not in _sections(spec):
                missing.append(f"{path.relative_to(ROOT)}: {spec}.md §{bare.group(1)}")
    assert not missing, missing
