"""Documentation that names code must name code that exists (the failure-modes table's tests, the links); the licence
and citation metadata agree with the package."""

from __future__ import annotations

import re
import tomllib

import yaml
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


def test_licence_and_citation_match_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression: the table form is deprecated by setuptools
    assert project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert (citation["license"], str(citation["version"])) == (project["license"], project["version"])
    assert citation["title"] and citation["authors"]


def test_every_bibtex_entry_of_the_citing_page_is_complete():
    page = (ROOT / "docs" / "citing.md").read_text()
    entries = re.findall(r"^@(\w+)\{([\w-]+),\n(.*?)^\}$", "\n".join(re.findall(r"```bibtex\n(.*?)```", page, re.S)),
                         re.S | re.M)
    keys = [key for _, key, _ in entries]
    assert len(keys) == len(set(keys)) >= 10
    for kind, key, body in entries:
        fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*?)\},?$", body, re.S | re.M))
        assert {"title", "author", "year"} <= fields.keys(), key
        assert body.count("{") == body.count("}"), key
        venue = {"article": "journal", "inproceedings": "booktitle", "software": "version"}[kind]
        assert venue in fields, key
    software = next(body for kind, _, body in entries if kind == "software")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"version = {{{version}}}" in software
