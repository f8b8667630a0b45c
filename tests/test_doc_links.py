"""Every relative link and ``#anchor`` of README.md and docs/*.md resolves."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
  """``text`` without fenced blocks and inline code, where brackets are not links."""
  return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """Every heading anchor of a markdown file (``-1``, ``-2`` for repeated headings)."""
  seen: dict[str, int] = {}
  out = set()
  for line in _FENCE.sub("", path.read_text()).splitlines():
    m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    base = slug(m.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def links(path: pathlib.Path) -> list[str]:
  return _LINK.findall(_prose(path.read_text()))


def _relative(target: str) -> bool:
  return not re.match(r"[a-z][a-z0-9+.-]*:", target)  # no scheme: http:, mailto:, ...


CASES = [(p, t) for p in PAGES for t in links(p) if _relative(t)]


def test_the_pages_link_to_each_other():
  assert (ROOT / "docs").is_dir()
  readme = {t.split("#")[0] for t in links(ROOT / "README.md")}
  for page in sorted((ROOT / "docs").glob("*.md")):
    assert f"docs/{page.name}" in readme, f"README.md does not link to docs/{page.name}"
  assert len(CASES) > 40, CASES


@pytest.mark.parametrize(
  ("page", "target"), CASES, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in CASES]
)
def test_link_resolves(page, target):
  file, _, anchor = target.partition("#")
  dest = (page.parent / file).resolve() if file else page
  assert dest.exists(), f"{page.relative_to(ROOT)}: {target}: no file {file}"
  if anchor:
    assert dest.suffix == ".md", f"{page.relative_to(ROOT)}: {target}: an anchor into a non-page"
    assert anchor in anchors(dest), (
      f"{page.relative_to(ROOT)}: {target}: no heading with anchor #{anchor} in "
      f"{dest.relative_to(ROOT)} (has: {sorted(anchors(dest))})"
    )


@pytest.mark.parametrize(
  ("heading", "anchor"),
  [
    (
      "Your own flax model, with `tj.find_symmetries`",
      "your-own-flax-model-with-tjfind_symmetries",
    ),
    ("Time to target on the seed's problems", "time-to-target-on-the-seeds-problems"),
    ("Back-ends and teleporting without a group", "back-ends-and-teleporting-without-a-group"),
  ],
)
def test_slug_follows_github(heading, anchor):
  assert slug(heading) == anchor
