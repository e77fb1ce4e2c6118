"""Every relative link in README.md, CONTRIBUTING.md and docs/*.md resolves: to a file or folder of the repository,
and for ``#anchor`` links into markdown, to a heading of that file (GitHub's slugs). A moved or renamed section
otherwise leaves the front page pointing nowhere, and nothing else would notice."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of brackets; an optional "title" after the target
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The markdown pages whose links are checked."""
    files = [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]
    return [f for f in files if f.exists()]


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield i, line


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped (letters, digits, marks,
    ``-`` and ``_`` kept), each space turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = [c for c in text if c in "-_ " or c.isalnum() or unicodedata.category(c).startswith("M")]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path`` (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose of ``path``."""
    out = []
    for i, line in _prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            out.append((i, m.group(1)))
    return out


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per relative link in ``files`` that does not resolve; external links (``https:``, ``mailto:``) are
    not checked."""
    problems = []
    for f in files:
        for lineno, target in links(f):
            if SCHEME.match(target) or target.startswith("//"):
                continue
            where = f"{f.relative_to(root)}:{lineno}: {target}"
            file_part, _, anchor = target.partition("#")
            dest = (f.parent / file_part).resolve() if file_part else f
            if file_part.startswith("/") or not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}: points outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def test_the_pages_exist_and_have_links():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    assert {"README.md", "CONTRIBUTING.md", "docs/training.md", "docs/reliability.md"} <= names
    assert sum(len(links(f)) for f in doc_files()) > 50  # the parser finds the links (a regex that matched nothing
                                                        # would pass the next test vacuously)


def test_every_relative_link_resolves():
    problems = broken_links(doc_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading, slug", [
    ("The demo (`bash dev.sh demo` = `python -m dino_simpool.demo`)", "the-demo-bash-devsh-demo--python--m-dino_simpooldemo"),
    ("Training (`dino-simpool-train`, `python -m dino_simpool.train`)", "training-dino-simpool-train-python--m-dino_simpooltrain"),
    ("Part 1: 100k × 384 bank (146 MB), 10k queries, k ∈ {10, 20, 100, 200}, T = 0.07, 1000 classes",
     "part-1-100k--384-bank-146-mb-10k-queries-k--10-20-100-200-t--007-1000-classes"),
    ("SimPool, and what differs from the official `sp.py`", "simpool-and-what-differs-from-the-official-sppy"),
    ("γ and [a link](x.md)", "γ-and-a-link"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_a_broken_link_or_anchor_fails(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "x.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## A section (`code`)\n\n## A section (`code`)\n\n"
        "[ok](../tests/x.py) [ok dir](../tests) [ok anchor](#a-section-code) [ok repeated](page.md#a-section-code-1)\n"
        "[ok external](https://example.org/nowhere.md) ![ok image](../tests/x.py)\n"
        "```\n[in a fence](missing_in_fence.md)\n```\n"
        "`[in code](missing_in_code.md)`\n"
        "[missing file](../tests/y.py)\n"
        "[missing anchor](#no-such-section) [missing anchor elsewhere](other.md#nope)\n"
        "[outside](../../etc/passwd)\n",
        encoding="utf-8")
    (tmp_path / "docs" / "other.md").write_text("# Other\n", encoding="utf-8")
    problems = broken_links([page], root=tmp_path)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "docs/page.md:13: ../tests/y.py: no such file" in text
    assert "#no-such-section in docs/page.md" in text
    assert "#nope in docs/other.md" in text
    assert "../../etc/passwd: points outside the repository" in text
    assert "fence" not in text and "in_code" not in text
