"""Documentation that names code must name code that exists (the failure-modes table's tests, the links, one API page
per module); the site builds with no warning; the licence and citation metadata agree with the package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser

import pytest
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


# The documentation site (mkdocs.yml): built here so that the README's single test command covers it.
DOCS_EXTRA = "the docs extra is not installed: pip install -c requirements/constraints.txt -e '.[dev,docs]'"
# Every element the site's pages use. A name outside this set is text such as "<class>" outside backticks, which
# Markdown passes through as an HTML tag and the browser then hides.
HTML_TAGS = {"a", "abbr", "article", "aside", "b", "blockquote", "body", "br", "button", "code", "dd", "del",
             "details", "div", "dl", "dt", "em", "footer", "form", "g", "h1", "h2", "h3", "h4", "h5", "h6", "head",
             "header", "hr", "html", "i", "img", "input", "kbd", "label", "li", "link", "main", "mark", "meta", "nav",
             "noscript", "ol", "p", "path", "pre", "script", "section", "small", "span", "strong", "style", "sub",
             "summary", "sup", "svg", "table", "tbody", "td", "th", "thead", "title", "tr", "ul"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if ROOT.name == "mutants":
        pytest.skip("a mutation-testing copy of the checkout (bench/mutation.py): the site is not what it tests")
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=DOCS_EXTRA)
    out = tmp_path_factory.mktemp("site")
    # --strict: a broken link or anchor, a page left out of the nav, a module mkdocstrings cannot collect or a
    # docstring it cannot parse is an error, not a warning in a log nobody reads.
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def test_the_site_builds_strictly_with_the_api_reference_from_docstrings(site):
    config_page = (site / "api" / "config" / "index.html").read_text()
    assert "load_config" in config_page
    assert "Every stage calls" in config_page  # the module's docstring, rendered
    assert (site / "citing" / "index.html").exists()


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.unknown = set()

    def handle_starttag(self, tag, attrs):
        if tag not in HTML_TAGS:
            self.unknown.add(tag)


def test_no_text_of_the_site_is_swallowed_as_an_unknown_html_tag(site):
    for page in sorted(site.rglob("*.html")):
        tags = _Tags()
        tags.feed(page.read_text())
        assert not tags.unknown, (f"{page.relative_to(site)} shows {sorted(tags.unknown)} as HTML tags: put the text "
                                  "in backticks or write &lt; and &gt; (a real HTML element: add it to HTML_TAGS)")


def test_every_module_has_an_api_page():
    pages = "\n".join(page.read_text() for page in (ROOT / "docs" / "api").glob("*.md"))
    modules = [path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
               for path in sorted((ROOT / "biovlm").rglob("*.py")) if path.name != "__init__.py"]
    for module in modules:
        assert re.search(rf"^::: {re.escape(module)}$", pages, re.M), \
            f"{module} has no API page: add '::: {module}' to a page of docs/api/ (and a new page to mkdocs.yml's nav)"


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


def test_no_file_holds_a_merge_conflict_marker():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    marked = [f for f in files if (ROOT / f).is_file() and (ROOT / f).suffix in (".md", ".py", ".yaml", ".yml", ".toml")
              and re.search(r"^(<{7} |>{7} |={7}$)", (ROOT / f).read_text(errors="replace"), re.M)]
    assert marked == []


def test_the_readmes_disk_figure_is_what_the_data_registry_computes():
    from biovlm import data

    total = sum(data.extracted_bytes(name, 224) for name in data.DATASETS) / 1e9
    assert f"{total:.1f} GB of arrays once extracted" in (ROOT / "README.md").read_text()
