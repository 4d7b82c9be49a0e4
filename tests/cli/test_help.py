"""Every command's --help: it renders, every option says what it does, defaults are written one way,
and a flag that several commands share has the same metavar (and, where it means the same, the same
words) in each."""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import pytest

from imdb_lora.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command and bench's benchmarks."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, (*path, name))


def options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
            yield action


COMMANDS = list(commands(build_parser()))
DEFAULT = re.compile(r"\s*\[default: [^\]]*\]$")


def test_every_command_is_listed():
    assert sorted(" ".join(p) for p, _ in COMMANDS) == sorted(
        ["train", "evaluate", "predict", "compare", "select", "export", "serve", "score"]
        + [f"bench {b}" for b in ("train", "eval", "predict", "serve")]
    )


@pytest.mark.parametrize("words", [(), *(p for p, _ in COMMANDS)], ids=lambda w: " ".join(w) or "top")
def test_help_renders(words, capsys):
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: imdb-lora {' '.join(words)}".rstrip()) and "options:" in out


def test_every_option_says_what_it_does_and_defaults_are_written_one_way():
    problems = []
    for words, parser in COMMANDS:
        for action in options(parser):
            flag, text = f"{' '.join(words)} {action.option_strings[-1]}", action.help or ""
            if not DEFAULT.sub("", text).strip():
                problems.append(f"{flag}: no help beyond its default: {text!r}")
            if "(default" in text or "default:" in DEFAULT.sub("", text):
                problems.append(f"{flag}: a default outside the final [default: ...]: {text!r}")
            if re.search(r"\[default: (None|True|False|)\]", text):
                problems.append(f"{flag}: a default in Python's words: {text!r}")
            if action.default not in (None, False, argparse.SUPPRESS) and not DEFAULT.search(text):
                problems.append(f"{flag}: its default {action.default!r} is not shown")
    assert problems == []


def test_a_shared_flag_has_one_metavar():
    metavars = defaultdict(set)
    for words, parser in COMMANDS:
        for action in options(parser):
            if action.nargs != 0:  # flags that take a value
                shown = action.metavar or action.dest.rsplit(".", 1)[-1].upper()
                metavars[action.option_strings[-1]].add(f"{shown}  ({' '.join(words)})")
    assert {flag: sorted(m) for flag, m in metavars.items() if len({v.split()[0] for v in m}) > 1} == {}


# flags that mean the same wherever they appear: one help text
SAME_MEANING = (
    "--raw", "--window-stride", "--max-batch-tokens", "--base-model", "--max-batch", "--max-wait-ms",
    "--max-queue", "--request-timeout",
)  # fmt: skip


def test_a_flag_that_means_the_same_has_the_same_help():
    helps = defaultdict(set)
    for _, parser in COMMANDS:
        for action in options(parser):
            if action.option_strings[-1] in SAME_MEANING:
                helps[action.option_strings[-1]].add(action.help)
            if action.dest.endswith("device"):  # where it applies may differ (score: the local engine)
                helps["--device"].add(DEFAULT.sub("", action.help).split(": ")[-1])
    assert {flag: h for flag, h in helps.items() if len(h) > 1} == {}
