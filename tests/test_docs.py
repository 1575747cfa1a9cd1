"""Documentation that names code must name code that exists: the failure-modes table's tests and the README's links."""

from __future__ import annotations

import re

from conftest import ROOT


def test_every_failure_mode_names_tests_that_exist():
    table = (ROOT / "docs" / "failure-modes.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(named) >= len(rows) >= 20
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"


def test_readme_and_docs_links_point_to_files_that_exist():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
