"""The documents in docs/ and the README stay in step with the code: every equation the code cites as (M#) is
defined in docs/math.md, every "math.md section N" / "design.md section N" the code cites exists, and relative
links point to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
CODE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h")
CODE_DIRS = ("flowkern", "csrc", "benchmarks", "tests", "examples", "scripts")
CITATION = re.compile(r"\bM(\d{1,3})\b")
DEFINITION = re.compile(r"\*\*\(M(\d{1,3})\)\*\*")  # a bold label "**(M12)**" opens the equation's definition
SECTION_CITATION = re.compile(r"\b(math|design)\.md,? section (\d+)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# linked from docs/ before they exist. Remove an entry once the file is in the repository (a missing file that is
# not listed here fails the test).
PENDING: set[str] = set()


def _code_files():
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in CODE_SUFFIXES and path.is_file() and "results" not in path.parts:
                yield path


def _citations() -> dict[int, set[str]]:
    """{equation number: files citing it} over the source trees."""
    cited: dict[int, set[str]] = {}
    for path in _code_files():
        for number in CITATION.findall(path.read_text(errors="ignore")):
            cited.setdefault(int(number), set()).add(str(path.relative_to(ROOT)))
    return cited


def _definitions() -> list[int]:
    return [int(n) for n in DEFINITION.findall(MATH.read_text())]


def test_every_cited_equation_is_defined_in_math_md():
    cited = _citations()
    assert len(cited) > 30, "the citation scan found almost nothing: is the regex or the tree layout wrong?"
    defined = set(_definitions())
    missing = {f"M{n}": sorted(files)[:3] for n, files in sorted(cited.items()) if n not in defined}
    assert not missing, f"cited but not defined as a bold **(M#)** label in docs/math.md: {missing}"


def test_each_equation_is_defined_once_in_order():
    numbers = _definitions()
    assert numbers == sorted(set(numbers)), "an (M#) label is defined twice or out of order in docs/math.md"
    assert numbers == list(range(1, len(numbers) + 1)), "the (M#) labels in docs/math.md skip a number"


def test_a_mention_is_not_a_definition():
    """Only the bold label counts: an equation that math.md merely mentions is still undefined."""
    text = "see (M7) and M8; **(M9)** the clip threshold"
    assert [int(n) for n in DEFINITION.findall(text)] == [9]


def test_cited_sections_exist():
    headings = {
        doc: {int(n) for n in re.findall(r"^## (\d+)\.", (ROOT / "docs" / f"{doc}.md").read_text(), re.M)}
        for doc in ("math", "design")
    }
    missing = set()
    for path in _code_files():
        for doc, number in SECTION_CITATION.findall(path.read_text(errors="ignore")):
            if int(number) not in headings[doc]:
                missing.add(f"{path.relative_to(ROOT)}: {doc}.md section {number}")
    assert not missing, sorted(missing)


def _markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_point_to_existing_files():
    broken = []
    for md in _markdown_files():
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same file
            path = (md.parent / target.split("#", 1)[0]).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING:
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_docs_exist_and_readme_links_into_them():
    readme = ROOT / "README.md"
    links = set(LINK.findall(readme.read_text()))
    for doc in ("docs/math.md", "docs/design.md", "docs/results.md"):
        assert (ROOT / doc).is_file(), doc
        assert doc in links, f"README.md does not link {doc}"
    assert len(readme.read_text().splitlines()) < 374, "the README grew back to its old length"
