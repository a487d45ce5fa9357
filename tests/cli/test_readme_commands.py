"""Every `shira` command and `make` target that README.md and docs/*.md name exists: each subcommand is in the
CLI, each `--flag` is one its parser accepts, and each make target is in the Makefile. A renamed flag fails here
instead of in a reader's terminal."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from shira_cli.main import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# A command starts a line or follows a control operator or `$(`, after any environment assignments.
SHIRA = re.compile(r"(?:^|[;&|(]\s*)(?:\w+=\S*\s+)*(?:\.venv/bin/)?shira\s+(.*)")
MAKE = re.compile(r"(?:^|[;&|(]\s*)(?:\w+=\S*\s+)*make\s+(.*)")
CONTROL = {";", "&&", "||", "|", "&", ")"}  # where one command ends


def code_lines(path: Path) -> list[str]:
    """The shell lines of a markdown file: fenced blocks (continuations joined, comments dropped) and inline
    code spans that start with a command."""
    text = path.read_text(encoding="utf-8")
    lines = []
    for block in FENCE.findall(text):
        lines += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    prose = FENCE.sub("", text)
    lines += [span.strip() for span in INLINE.findall(prose)
              if re.match(r"(\S+=\S+\s+)*(\.venv/bin/)?(shira|make)\s", span.strip())]
    return [line for line in lines if line and not line.startswith("#")]


def invocations(pattern: re.Pattern[str], line: str) -> list[list[str]]:
    """The argument lists of each `pattern` command on one line, cut at the first shell control operator."""
    found = []
    for match in pattern.finditer(line):
        lexer = shlex.shlex(match.group(1), posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        args = []
        for token in lexer:
            if token in CONTROL:
                break
            args.append(token)
        found.append(args)
    return found


def documented(pattern: re.Pattern[str]) -> list[tuple[str, list[str]]]:
    return [(f"{path.name}: {line}", args) for path in DOCS for line in code_lines(path)
            for args in invocations(pattern, line)]


# Typer 0.29 builds its commands on a vendored click, so these go by attributes rather than click's classes.
def option_names(command: Any) -> dict[str, Any]:
    """Each option name that `command` accepts (both halves of --x/--no-x), mapped to its parameter."""
    names = {"--help": None}
    for param in command.params:
        if param.param_type_name == "option":
            names.update({name: param for name in (*param.opts, *param.secondary_opts)})
    return names


def check_shira(args: list[str]) -> list[str]:
    """What is wrong with one `shira ARGS` call: unknown subcommands and flags. Empty when it parses."""
    command = typer.main.get_command(app)
    path = "shira"
    problems = []
    rest = iter(args)
    for token in rest:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            options = option_names(command)
            if name not in options:
                problems.append(f"`{path}` has no option {name}")
            elif options[name] is not None and not options[name].is_flag and "=" not in token:
                next(rest, None)  # its value
        elif hasattr(command, "commands"):  # a group: the token names its subcommand
            if token == "...":  # prose's "shira bench ..."
                break
            if token not in command.commands:
                problems.append(f"`{path}` has no subcommand {token!r}")
                break
            command = command.commands[token]
            path += " " + token
        # Past the last subcommand, plain tokens are arguments (ADAPTER, A B) that the command parses itself.
    return problems


SHIRA_CALLS = documented(SHIRA)
MAKE_CALLS = documented(MAKE)


def test_the_docs_name_shira_commands_and_make_targets():
    # A parser that finds nothing would pass every check below.
    assert len(SHIRA_CALLS) >= 15, SHIRA_CALLS
    assert any(args[:1] == ["train"] for _, args in SHIRA_CALLS)
    assert any(args[:2] == ["bench", "startup"] for _, args in SHIRA_CALLS)
    assert {"run", "test"} <= {args[0] for _, args in MAKE_CALLS if args}


@pytest.mark.parametrize(("where", "args"), SHIRA_CALLS, ids=[where for where, _ in SHIRA_CALLS])
def test_documented_shira_command_exists(where, args):
    assert not check_shira(args), f"{where}: {check_shira(args)}"


def test_a_misspelt_flag_or_subcommand_is_caught():
    assert check_shira(["train", "--max-steps", "2", "--eval-limit", "16", "--no-progress"]) == []
    assert check_shira(["train", "--max-step", "2"]) == ["`shira train` has no option --max-step"]
    assert check_shira(["bench", "startups"]) == ["`shira bench` has no subcommand 'startups'"]
    assert check_shira(["inspect", "a.safetensors", "--no-rank"]) == []


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


@pytest.mark.parametrize(("where", "args"), MAKE_CALLS, ids=[where for where, _ in MAKE_CALLS])
def test_documented_make_target_exists(where, args):
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    assert targets, where
    missing = set(targets) - makefile_targets()
    assert not missing, f"{where}: the Makefile has no target {sorted(missing)}"
