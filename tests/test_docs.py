"""The documentation's links resolve, and the commands it promises are the ones that run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code spans, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page: lower-cased, every character but letters,
    digits, spaces, hyphens and underscores removed, spaces made hyphens; a repeated anchor gets ``-1``,
    ``-2``, ... in order."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchor_rules():
    text = (
        "# Accuracy: the shapes suite\n## `tome` & co.\n```\n# not a heading\n```\n## Serving\n## Serving\n"
    )
    assert github_anchors(text) == {"accuracy-the-shapes-suite", "tome--co", "serving", "serving-1"}


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # https:, mailto:, ...
    ]


def test_the_links_are_found():
    links = relative_links(ROOT / "README.md")
    assert {"docs/methods.md", "docs/performance.md#accuracy-on-the-shapes-suite"} <= set(links)
    assert "eval/results/cpu-shapes/pareto.png" in links  # images too


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(
                f"{target}: no {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}"
            )
        elif anchor and (linked.suffix != ".md" or anchor not in github_anchors(linked.read_text())):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == []


def readme_command(after: str) -> str:
    """The first line of the first shell block after the README's line starting with ``after``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(after) + r".*?```bash\n(.*?)\n```", text, re.DOTALL)
    assert block is not None, f"no command after {after!r} in README.md"
    return block.group(1)


def test_ci_runs_the_readmes_test_command():
    """``.ci/run`` runs "the test command from README.md": the README's pytest command, as it is written."""
    command = readme_command("Run the tests")
    assert command == 'pip install -e ".[dev]" && python -m pytest tests'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.split(" && ")[-1] in ci


def test_the_shapes_table_lives_between_its_markers_in_the_performance_page():
    """``tokenprune eval --page docs/performance.md`` rewrites the table there, as that page says."""
    page = (ROOT / "docs" / "performance.md").read_text()
    assert page.count("<!-- shapes-eval:start -->") == 1 and page.count("<!-- shapes-eval:end -->") == 1
    assert "--page docs/performance.md" in page
    assert "shapes-eval:start" not in (ROOT / "README.md").read_text()


def architecture_rows() -> list[tuple[list[str], list[str]]]:
    """Each table row and bullet of docs/architecture.md: the repository paths it names (inline code with a
    slash) and the names it gives in parentheses after them (``(`name`)``)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.splitlines():
        paths = re.findall(r"`((?:tokenprune|patches|tests|eval|docs)/[\w/<>.-]*)`", line)
        names = re.findall(r"\(`(\w+)`\)", line)
        if paths:
            rows.append((paths, names))
    return rows


def test_architecture_names_files_that_exist():
    rows = architecture_rows()
    assert len(rows) > 20
    missing = []
    for paths, names in rows:
        files = [ROOT / path for path in paths if "<" not in path]
        missing += [path for path, file in zip(paths, files, strict=False) if not file.exists()]
        sources = "".join(file.read_text() for file in files if file.is_file())
        missing += [
            name for name in names if not re.search(rf"^\s*(def|class) {name}\b|^{name} = ", sources, re.M)
        ]
    assert missing == []


def test_the_methods_page_lists_every_option_as_declared():
    """Each declared option of each registered method has its row in docs/methods.md's options table, with
    its default and what it accepts as the check words it; no row names an option that is not declared."""
    import tokenprune as tp
    from tokenprune.registry import get_method

    text = (ROOT / "docs" / "methods.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `([^`]*)` \| ([^|]+?) \|", text, re.MULTILINE)
    expected = {
        (name, option.name, repr(option.default), option.accepts())
        for name in tp.list_methods()
        for option in get_method(name).declared
    }
    assert set(rows) == expected
