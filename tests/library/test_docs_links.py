"""The documents that ship with the code stand alone.

A reader of this repository has its files and nothing else: no design notes kept outside it, no
issue tracker. These tests fail on

(a) a relative Markdown link, in any tracked ``*.md`` file, whose target does not exist in the
    repository (http(s)/mailto links and pure ``#anchor`` links are not checked; ``#anchor`` is
    stripped from file links);
(b) a cited document that does not exist: ``docs/X.md`` / ``bench/X.md`` / ``examples/X.md``
    paths, the bare names ``MATH.md`` and ``MODELS.md`` (both live in ``docs/``) and any
    ``X.md §n`` citation in ``*.py``, ``*.h``, ``*.cpp``, ``*.cu`` and ``*.md`` files; every other
    bare ``X.md`` in a Markdown file must name a file next to it, at the root, in ``docs/`` or in
    ``bench/``. A ``§n`` (or ``§n-m``) citation must name a numbered section (``## n.``) of
    the document;
(c) a pointer to material kept outside the repository (the forbidden words are in
    ``_OUTSIDE`` below);
(d) the phrase in ``_TRACKER`` in shipped docs and code (Markdown, ``*.py``, ``csrc/``): a
    reader has no tracker to look it up in; say what is meant instead.

``KNOWN_PENDING`` lists findings in files that are being edited elsewhere right now; they are
skipped until fixed there, and the last test fails once an entry no longer occurs, so that the
list is emptied as they are fixed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
SELF = "tests/library/test_docs_links.py"

# Findings (path, offending text) waiting for a fix in a file this change does not own. The
# text is the matched text as the failure message prints it. Empty the set as they are fixed.
KNOWN_PENDING: set[tuple[str, str]] = set()

# Spelled in pieces so that this file does not match itself.
_OUTSIDE = ("../" + "shared", "shared" + "/design", "ANCHORS" + ".md")
_TRACKER = re.compile(r"\bthe " + r"issue\b", re.IGNORECASE)

_CODE_SUFFIXES = (".py", ".h", ".cpp", ".cu")
_DOC_DIRS = ("docs", "bench", "examples")


def _tracked() -> list[str]:
    """Tracked files present in the working tree (a deletion in progress is not a file)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    paths = [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    return sorted(p for p in paths if (ROOT / p).is_file() and p != SELF)


def _text(path: str) -> str | None:
    data = (ROOT / path).read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(path: str) -> list[tuple[int, str]]:
    text = _text(path)
    return [] if text is None else list(enumerate(text.splitlines(), 1))


def _finding(path: str, line: int, text: str, why: str) -> tuple[str, int, str, str]:
    return path, line, text, why


def _report(findings: list[tuple[str, int, str, str]]) -> list[str]:
    return [f"{p}:{n}: {t!r}: {why}" for p, n, t, why in findings
            if (p, t) not in KNOWN_PENDING]


def _inside(target: Path) -> bool:
    try:
        target.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# (a) Markdown links

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(path: str) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for n, line in _lines(path):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, _INLINE_CODE.sub("", line)))
    return out


def _link_targets(path: str) -> list[tuple[int, str]]:
    found = []
    for n, line in _prose(path):
        for m in _INLINE_LINK.finditer(line):
            found.append((n, m.group(1)))
        m = _REF_DEF.match(line)
        if m:
            found.append((n, m.group(1)))
    return found


def _link_findings(files: list[str]) -> list[tuple[str, int, str, str]]:
    findings = []
    for path in files:
        if not path.endswith(".md"):
            continue
        for n, raw in _link_targets(path):
            target = raw.strip("<>")
            if not target or target.startswith("#") or _SCHEME.match(target):
                continue
            file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not file_part:
                continue
            base = ROOT if file_part.startswith("/") else (ROOT / path).parent
            resolved = base / file_part.lstrip("/")
            if not _inside(resolved):
                findings.append(_finding(path, n, raw, "links outside the repository"))
            elif not resolved.exists():
                findings.append(_finding(path, n, raw, "link target does not exist"))
    return findings


def test_markdown_links_resolve() -> None:
    bad = _report(_link_findings(_tracked()))
    assert not bad, "broken relative links:\n" + "\n".join(bad)


# --------------------------------------------------------------------------------------------
# (b) cited documents

_DIR_DOC = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*?[\w-]+\.md)\b" % "|".join(_DOC_DIRS))
_BARE_DOC = re.compile(r"(?<![\w/.-])([A-Za-z0-9][\w-]*\.md)\b")
_SECTION = re.compile(r"\s*§\s*(\d+)(?:\s*[-–]\s*§?\s*(\d+))?")
# Bare names that always mean a file in docs/.
_IN_DOCS = {"MATH.md": "docs/MATH.md", "MODELS.md": "docs/MODELS.md"}


def _resolve_bare(name: str, citing: str) -> str | None:
    if name in _IN_DOCS:
        return _IN_DOCS[name] if (ROOT / _IN_DOCS[name]).is_file() else None
    here = Path(citing).parent
    for cand in (here / name, Path(name), Path("docs") / name, Path("bench") / name):
        if (ROOT / cand).is_file():
            return cand.as_posix()
    return None


def _sections(doc: str) -> set[int]:
    """The numbers of a document's numbered headings (``## 3. KDEF`` or ``## §3 KDEF``)."""
    nums = set()
    for _, line in _lines(doc):
        m = re.match(r"^#{1,6}\s*§?\s*(\d+)[.):\s]", line)
        if m:
            nums.add(int(m.group(1)))
    return nums


def _section_finding(path: str, n: int, cite: str, doc: str, rest: str):
    m = _SECTION.match(rest)
    if not m:
        return None
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    have = _sections(doc)
    missing = [s for s in range(lo, max(lo, hi) + 1) if s not in have]
    if missing:
        return _finding(path, n, cite + m.group(0),
                        f"{doc} has no section {', '.join(f'§{s}' for s in missing)}")
    return None


def _citation_findings(files: list[str]) -> list[tuple[str, int, str, str]]:
    findings = []
    for path in files:
        is_md = path.endswith(".md")
        if not (is_md or path.endswith(_CODE_SUFFIXES)):
            continue
        for n, line in _lines(path):
            for m in _DIR_DOC.finditer(line):
                doc = m.group(1)
                if not (ROOT / doc).is_file():
                    findings.append(_finding(path, n, doc, "cited document does not exist"))
                    continue
                f = _section_finding(path, n, doc, doc, line[m.end():])
                if f:
                    findings.append(f)
            for m in _BARE_DOC.finditer(line):
                name = m.group(1)
                if name == _OUTSIDE[2]:
                    continue  # (c) reports it
                cites_section = bool(_SECTION.match(line[m.end():]))
                if not (is_md or name in _IN_DOCS or cites_section):
                    continue  # a bare file name in code: an output file, not a citation
                doc = _resolve_bare(name, path)
                if doc is None:
                    where = _IN_DOCS.get(name, "next to it, at the root, in docs/ or bench/")
                    findings.append(_finding(path, n, name,
                                             f"cited document does not exist ({where})"))
                    continue
                f = _section_finding(path, n, name, doc, line[m.end():])
                if f:
                    findings.append(f)
    return findings


def test_cited_documents_exist() -> None:
    bad = _report(_citation_findings(_tracked()))
    assert not bad, "citations of documents that do not exist:\n" + "\n".join(bad)


# --------------------------------------------------------------------------------------------
# (c) material outside the repository, (d) the issue tracker

def _outside_findings(files: list[str]) -> list[tuple[str, int, str, str]]:
    findings = []
    for path in files:
        for n, line in _lines(path):
            for word in _OUTSIDE:
                if word in line:
                    findings.append(_finding(path, n, word,
                                             "points at material outside the repository"))
    return findings


def test_no_pointers_outside_the_repository() -> None:
    bad = _report(_outside_findings(_tracked()))
    assert not bad, "pointers to material outside the repository:\n" + "\n".join(bad)


def _shipped(path: str) -> bool:
    return path.endswith((".md", ".py")) or path.startswith("csrc/")


def _tracker_findings(files: list[str]) -> list[tuple[str, int, str, str]]:
    findings = []
    for path in files:
        if not _shipped(path):
            continue
        for n, line in _lines(path):
            for m in _TRACKER.finditer(line):
                findings.append(_finding(path, n, m.group(0),
                                         "readers of the repository have no issue tracker: "
                                         "say what is meant"))
    return findings


def test_no_issue_tracker_references() -> None:
    bad = _report(_tracker_findings(_tracked()))
    assert not bad, "references to the issue tracker:\n" + "\n".join(bad)


def test_known_pending_entries_still_occur() -> None:
    """An entry of KNOWN_PENDING that no longer occurs has been fixed: remove it."""
    files = _tracked()
    found = {(p, t) for p, _, t, _ in (_link_findings(files) + _citation_findings(files)
                                       + _outside_findings(files) + _tracker_findings(files))}
    stale = sorted(KNOWN_PENDING - found)
    assert not stale, f"fixed, remove from KNOWN_PENDING: {stale}"


# --------------------------------------------------------------------------------------------
# the checker itself

def test_checker_catches_what_it_should(tmp_path, monkeypatch) -> None:
    """Each check fires on a planted case and stays quiet on the allowed forms."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "csrc").mkdir()
    (docs / "MATH.md").write_text("# Math\n\n## 1. One\n\n## 2. Two\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/MATH.md#1-one) [web](https://example.com/x.md) [top](#math)\n"
        "[gone](docs/NOPE.md) [out](../elsewhere.md)\n"
        "```\n[in code](docs/NOPE2.md)\n```\n"
        "See MATH.md §1-2 and MATH.md §3; MODELS.md; STUDY.md.\n")
    (tmp_path / "csrc" / "k.h").write_text(
        "// MATH.md §2, docs/MATH.md §1, docs/GONE.md, RESULTS.md (an output file)\n"
        "// " + _OUTSIDE[1] + " and " + "The " + "issue's target\n")
    files = ["README.md", "csrc/k.h", "docs/MATH.md"]
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    links = {t for _, _, t, _ in _link_findings(files)}
    assert links == {"docs/NOPE.md", "../elsewhere.md"}
    cites = {(p, t) for p, _, t, _ in _citation_findings(files)}
    assert cites == {("README.md", "MATH.md §3"), ("README.md", "MODELS.md"),
                     ("README.md", "STUDY.md"), ("README.md", "docs/NOPE.md"),
                     ("README.md", "docs/NOPE2.md"), ("csrc/k.h", "docs/GONE.md")}
    assert [t for _, _, t, _ in _outside_findings(files)] == [_OUTSIDE[1]]
    assert [t for _, _, t, _ in _tracker_findings(files)] == ["The " + "issue"]
