"""The README and docs/ hold together: every relative link reaches a file and, where it names one, a
heading (by GitHub's anchor rules); every page is reachable from the README; and every
`deformable-detr` command they show is one the CLI's own parser accepts (parsed, never run); and the
output of `deformable-detr info` they show has the command's topics."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from deformable_detr.cli import build_parser
from deformable_detr.environment import report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

_FENCE = re.compile(r"^ {0,3}(```|~~~)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_SHELL_BLOCKS = {"console", "bash", "sh", "shell"}
_ELISION = "..."


def split_markdown(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each code block as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if block is None and fence:
            block = (fence.group(2).lower(), [])
        elif block is not None and fence and not fence.group(2):
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>|[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in split_markdown(text)[0]:
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str) -> list[str]:
    """The targets of the links and images written in the prose (not in code)."""
    prose = _INLINE_CODE.sub("code", "\n".join(split_markdown(text)[0]))
    return _LINK.findall(prose)


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


def shell_commands(text: str) -> list[str]:
    """The commands in a page's shell blocks, continuation lines joined: in console blocks the lines
    after a `$` prompt (the others are output), in bash blocks every line."""
    commands = []
    for language, lines in split_markdown(text)[1]:
        if language not in _SHELL_BLOCKS:
            continue
        command = None
        for line in lines:
            if command is None:
                if language == "console" and not line.startswith("$ "):
                    continue
                command = line.removeprefix("$ ")
            else:
                command += " " + line.strip()
            if command.endswith("\\"):
                command = command[:-1]
            else:
                commands.append(command)
                command = None
    return commands


def cli_arguments(command: str) -> list[str] | None:
    """What a command line passes to `deformable-detr` (or `python -m deformable_detr.cli`), up to the
    first shell operator; None when it runs something else."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token == "deformable-detr":
            start = i + 1
        elif token == "-m" and tokens[i + 1 : i + 2] == ["deformable_detr.cli"]:
            start = i + 2
        else:
            continue
        rest = tokens[start:]
        end = next((j for j, t in enumerate(rest) if set(t) <= set("&|;<>()")), len(rest))
        return rest[:end]
    return None


def parse_error(argv: list[str]) -> str | None:
    """The CLI parser's complaint about ``argv``, or None where it parses."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exit:
        if exit.code:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def unknown_flags(argv: list[str]) -> list[str]:
    """For a command with elided arguments (``train ... --resume``): its subcommand if unknown, and
    every flag its subcommand does not take."""
    command = subcommands().get(argv[0]) if argv else None
    if command is None:
        return argv[:1] or ["(no command)"]
    flags = (token.partition("=")[0] for token in argv[1:] if token.startswith("-"))
    return [flag for flag in flags if flag not in command._option_string_actions]


def test_slug_follows_github() -> None:
    assert slug("Deployment on a CPU") == "deployment-on-a-cpu"
    assert slug("Memory traffic, not arithmetic, is the CPU's limit") == "memory-traffic-not-arithmetic-is-the-cpus-limit"
    assert slug("`deformable-detr explore`: where the model looks") == "deformable-detr-explore-where-the-model-looks"
    assert slug("Recording the sampling: `capture_attention`") == "recording-the-sampling-capture_attention"
    assert slug("Several processes: torchrun") == "several-processes-torchrun"
    assert anchors("# A\n## B b\n```\n# not a heading\n```\n## B b\n### B  b\n") == {"a", "b-b", "b-b-1", "b--b"}


def test_links_are_found_outside_code_only() -> None:
    text = "[a](a.md) and ![b](b.png#x) and `[c](c.md)`\n```\n[d](d.md)\n```\n[e](https://e.org)\n"
    assert links(text) == ["a.md", "b.png#x", "https://e.org"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def test_readme_commands_parse() -> None:
    commands = [argv for argv in map(cli_arguments, shell_commands(README.read_text())) if argv is not None]
    # The quick start covers what users come for: detect, train on their data, load and convert.
    assert {"detect", "check-data", "train", "evaluate", "inspect", "convert"} <= {argv[0] for argv in commands}
    failures = [f"deformable-detr {shlex.join(argv)}: {error}" for argv in commands if (error := parse_error(argv))]
    assert failures == []


def test_readme_lists_every_command() -> None:
    listed = re.findall(r"^\| `deformable-detr ([\w-]+)` \|", README.read_text(), flags=re.M)
    commands = subcommands()
    assert {"missing": sorted(set(commands) - set(listed)), "not commands": sorted(set(listed) - set(commands))} == {
        "missing": [], "not commands": []}


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_docs_commands_use_real_flags(page: Path) -> None:
    """Complete commands parse; those with elided arguments (`...`) name a real command and real flags."""
    failures = []
    for command in shell_commands(page.read_text()):
        argv = cli_arguments(command)
        if argv is None:
            continue
        if _ELISION in argv:
            problem = ", ".join(unknown_flags([token for token in argv if token != _ELISION])) or None
        else:
            problem = parse_error(argv)
        if problem:
            failures.append(f"{command.strip()}: {problem}")
    assert failures == []


def test_info_samples_show_what_info_prints() -> None:
    """A page's `deformable-detr info` output lists the topics the command prints, in its order."""
    samples = [lines[1:] for page in PAGES for language, lines in split_markdown(page.read_text())[1]
               if language == "console" and lines[:1] == ["$ deformable-detr info"]]
    assert samples, "no page shows the output of deformable-detr info"
    topics = [topic for topic, _ in report()]
    assert [[re.split(r"\s{2,}", line)[0] for line in sample] for sample in samples] == [topics] * len(samples)


def test_source_points_to_existing_pages() -> None:
    """The help texts, docstrings and comments that point to a page point to one that exists."""
    problems = []
    for source in sorted((ROOT / "src").rglob("*.py")):
        for target in re.findall(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?", source.read_text()):
            path, _, anchor = target.partition("#")
            page = ROOT / path
            if not page.exists() or (anchor and anchor not in anchors(page.read_text())):
                problems.append(f"{source.relative_to(ROOT)}: {target}")
    assert problems == []
