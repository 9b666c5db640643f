"""The documentation keeps up with the code: every command, option and config key is documented, and the
README and docs/ link only to files (and headings) that exist."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.cli import build_parser
from pipeline.utils.config import Config

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.*)$", _outside_code_blocks(_text(path)), flags=re.M)
    return {_slug(h) for h in headings}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """``{"extract": parser, "cache ls": parser, ...}``: every command and sub-command of the CLI."""

    def subparsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.items()

    out = {}
    for name, parser in subparsers(build_parser()):
        nested = dict(subparsers(parser))
        out.update({f"{name} {sub}": p for sub, p in nested.items()} if nested else {name: parser})
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(_outside_code_blocks(_text(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_the_readme_command_table_lists_every_command():
    table = [line for line in _text(REPO / "README.md").splitlines() if line.startswith("| `featcache ")]
    listed = {re.match(r"\| `featcache ([a-z ]+?)(?: [A-Z]+)?`", line).group(1) for line in table}
    assert listed == set(_commands())


def test_every_option_of_every_command_is_documented():
    docs = "\n".join(_text(p) for p in PAGES)
    missing = [
        f"featcache {name} {option}"
        for name, parser in _commands().items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and not re.search(rf"{option}(?![\w-])", docs)
    ]
    assert not missing


def test_the_configuration_page_names_every_config_key():
    page = _text(REPO / "docs" / "configuration.md")
    cfg = Config()
    keys = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
    ]
    assert keys and not [k for k in keys if f"`{k}`" not in page]
