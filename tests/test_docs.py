"""The documentation stays true to the code and to itself: docs/flags.md is what `flags.py` generates,
every relative link in the README and docs/ reaches an existing file (and heading), and the README
links every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT

from step2_reward_model import flags

REGENERATE = "python -m step2_reward_model.flags > docs/flags.md"
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_flag_reference_is_up_to_date():
    written = (REPO_ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert written == flags.flag_reference(), f"docs/flags.md is out of date with flags.py: run `{REGENERATE}`"


def test_every_flag_is_in_a_group_of_the_reference():
    names = list(flags.FLAGS)
    assert names[0] in flags.GROUPS, "the first flag of FLAGS must start a group (flags.GROUPS)"
    assert set(flags.GROUPS) <= set(flags.FLAGS)
    assert set(flags.TRAINING_FLAGS) | set(flags.EVAL_FLAGS) <= set(flags.FLAGS)
    reference = flags.flag_reference()
    for name in set(flags.TRAINING_FLAGS) | set(flags.EVAL_FLAGS):
        assert f"`--{name}" in reference


def without_code_blocks(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def without_code(text: str) -> str:
    """Markdown without code blocks or inline code: a link written there is an example, not a link."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ +(.+?) *$", without_code_blocks(page.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(without_code(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO_ROOT)}: ({target})"
            if not file.exists():
                broken.append(f"{where}: no file {path}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{where}: no heading #{anchor} in {file.relative_to(REPO_ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in relative_links(REPO_ROOT / "README.md")}
    missing = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"README.md does not link to docs/ pages {missing}"
