"""README.md and docs/*.md: relative links resolve (anchors included), every `sge-repro` command
they name exists in the real CLI, and the README stays short."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "sge-repro"
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
# A code span may wrap onto the next line of its paragraph (never across a blank line).
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# `sge-repro`, then global options (--debug), then the words that may name a command path.
COMMAND = re.compile(r"(?<![\w-])sge-repro((?:[ \t]+--?[\w-]+)*)((?:[ \t]+[A-Za-z][\w-]*)*)")
WORD = re.compile(r"^[a-z][a-z0-9_-]*$")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]


def split_code(text: str) -> tuple[str, list[str]]:
    """The prose (fenced blocks and inline code removed) and the code (blocks and inline spans)."""
    outside, code, block, in_block = [], [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if in_block:
                code.append("\n".join(block))
                block = []
            in_block = not in_block
            outside.append("")
            continue
        if in_block:
            block.append(line)
            outside.append("")
        else:
            outside.append(line)
    if block:
        code.append("\n".join(block))
    text = "\n".join(outside)
    code.extend(" ".join(m.group(2).split()) for m in INLINE_CODE.finditer(text))
    return INLINE_CODE.sub("", text), code


def github_anchor(heading: str) -> str:
    """GitHub's rule: markup dropped, lowercase, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    in_block = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_block = not in_block
        m = None if in_block else HEADING.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def broken_links(path: Path) -> list[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def command_candidates(code: str) -> set[tuple[str, ...]]:
    """The words after each `sge-repro` in code: the command path is a prefix of them."""
    out = set()
    for m in COMMAND.finditer(code):
        words = []
        for word in m.group(2).split():
            if not WORD.match(word):
                break
            words.append(word)
        if words:
            out.add(tuple(words))
    return out


def run_help(path: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [str(CLI), *path, "--help"], capture_output=True, text=True, env=env, timeout=120
    )


@functools.cache
def help_of(path: tuple[str, ...]) -> tuple[int, bool]:
    """Exit status of `sge-repro PATH --help`, and whether PATH is a group (takes a COMMAND)."""
    result = run_help(path)
    usage = next((line for line in result.stdout.splitlines() if "Usage:" in line), "")
    return result.returncode, "COMMAND" in usage


def command_path(words: tuple[str, ...]) -> tuple[str, ...]:
    """The words that name the command: a word is a sub-command only while the path is a group.
    `run all` is the command `run` with its argument; `data prepare imagenet` is three levels."""
    path: tuple[str, ...] = ()
    for word in words:
        code, is_group = help_of(path)
        if code != 0 or not is_group:
            break
        path = (*path, word)
    return path


def commands_named() -> dict[tuple[str, ...], set[str]]:
    """Each distinct candidate word sequence, with the files that name it."""
    found: dict[tuple[str, ...], set[str]] = {}
    for path in markdown_files():
        _, code = split_code(path.read_text(encoding="utf-8"))
        for snippet in code:
            for words in command_candidates(snippet):
                found.setdefault(words, set()).add(str(path.relative_to(REPO)))
    return found


# --- the checks -------------------------------------------------------------------------------


def test_docs_exist():
    assert (REPO / "README.md").is_file()
    assert len(markdown_files()) > 1, "docs/*.md missing"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_sge_repro_command_named_exists():
    assert CLI.exists(), f"{CLI} not installed"
    named = commands_named()
    assert named, "no `sge-repro ...` command found in README.md / docs"
    paths: dict[tuple[str, ...], set[str]] = {}
    for words, files in named.items():
        paths.setdefault(command_path(words), set()).update(files)
    missing = [
        f"sge-repro {' '.join(path)} (in {', '.join(sorted(files))})"
        for path, files in sorted(paths.items())
        if help_of(path)[0] != 0
    ]
    assert missing == []
    # The documented commands cover the main ones (guards the extraction against matching nothing).
    assert {("run",), ("status",), ("report",), ("data", "prepare"), ("bench", "sge")} <= set(paths)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


# --- the checks can fail ----------------------------------------------------------------------


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## What \"equal\" means: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#what-equal-means-here) [ok](#page) [web](https://example.org/x)\n"
        "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n"
        "[missing](nowhere.md) [bad anchor](other.md#no-such-heading) [bad local](#nope)\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("nowhere.md: no such file" in p for p in problems)
    assert any("#no-such-heading" in p for p in problems)
    assert any("#nope" in p for p in problems)


def test_github_anchor_rule():
    assert github_anchor("Every GPU of a node: the `launch` params") == "every-gpu-of-a-node-the-launch-params"
    assert github_anchor("Datasets at ImageNet / COCO scale") == "datasets-at-imagenet--coco-scale"
    assert github_anchor("train_cls and sge-repro") == "train_cls-and-sge-repro"


def test_command_extraction_and_a_made_up_command_fails():
    code = "sge-repro --debug run all --profile smoke\n.venv/bin/sge-repro data prepare imagenet --source X\n~/.cache/sge-repro/kernels"
    assert command_candidates(code) == {("run", "all"), ("data", "prepare", "imagenet")}
    assert command_path(("run", "all")) == ("run",)
    assert command_path(("data", "prepare", "imagenet")) == ("data", "prepare", "imagenet")
    assert help_of(("no-such-command",))[0] != 0
    assert help_of(command_path(("bench", "no-such-benchmark")))[0] != 0
