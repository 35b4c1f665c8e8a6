"""The documentation cannot drift from the code: the plugin hooks documented in
docs/extending.md are exactly LearnerPlugin's, every relative link resolves, and the
README's architecture map names every source file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cl_lightning.plugins import LearnerPlugin
from tests.conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SOURCE_DIRS = ("cl_lightning", "callbacks", "datamodules")


def section(text: str, heading: str) -> str:
    """The body of the markdown section ``heading`` (a whole line, e.g. ``## Usage``), up to
    the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1  # ValueError: the heading is missing
    end = next((i for i in range(start, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def without_code(text: str) -> str:
    """The markdown without fenced code blocks (their contents are not links or headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_code(page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_plugin_hooks_documented_are_exactly_learner_plugins():
    """The hook table of docs/extending.md lists every public hook and attribute of
    LearnerPlugin, and nothing else."""
    table = section((DOCS / "extending.md").read_text(), "## The plugin protocol")
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    public = {name for name in vars(LearnerPlugin) if not name.startswith("_")}
    assert public, "LearnerPlugin defines no public hooks?"
    assert documented == public, (
        f"docs/extending.md 'The plugin protocol' is out of date: missing "
        f"{sorted(public - documented)}, not in LearnerPlugin {sorted(documented - public)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Every relative link (and image) points to an existing file, and an ``#anchor`` into
    a markdown page to one of its headings."""
    text = without_code(page.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page.name != "README.md", "the README links to the docs pages"
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_architecture_map_names_every_source_file():
    """Each Python and C++ file of the packages, of benchmarks/ and train.py has its line in
    the README's architecture map."""
    block = section((ROOT / "README.md").read_text(), "## Architecture map")
    mapped = {line.split()[0] for line in block.splitlines() if line.strip()
              and not line.startswith("```")}
    files = {str(p.relative_to(ROOT)) for d in SOURCE_DIRS for pattern in ("*.py", "*.cpp", "*.h")
             for p in (ROOT / d).rglob(pattern)}
    files |= {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py")}
    files.add("train.py")
    missing = sorted(files - mapped)
    assert not missing, f"README 'Architecture map' lacks: {missing}"
    gone = sorted(p for p in mapped
                  if p.endswith((".py", ".cpp", ".h")) and not (ROOT / p).exists())
    assert not gone, f"README 'Architecture map' names files that do not exist: {gone}"


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_esmer_section_that_code_docstrings_point_to_exists():
    body = section((DOCS / "usage.md").read_text(), "## ESMER")
    for term in ("l_s", "mu", "min(1 - 1/(step + 1), alpha)", "warm", "0.999"):
        assert term in body, f"docs/usage.md '## ESMER' no longer explains {term!r}"


def test_docs_use_no_machine_local_paths():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PAGES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "shared/" in line]
    assert not offenders, f"machine-local paths in the docs: {offenders}"


def test_code_and_configs_point_only_inside_the_repository():
    """Docstrings and config comments cite the project's own docs, never a document or
    folder outside the repository."""
    files = [ROOT / "train.py", *ROOT.glob("benchmarks/**/*.md")]
    for folder in ("cl_lightning", "callbacks", "datamodules", "benchmarks", "configs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "shared/" in line or "DESIGN.md" in line]
    assert not offenders, f"references outside the repository: {offenders}"
