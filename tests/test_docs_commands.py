"""Every command the documentation gives, parsed by the program's real parser: a stale flag, a misspelt choice or a
wrong type in README.md, docs/*.md or a program's own --help fails here.

Running every command as written is beyond the test budget (the demo alone trains for minutes): each is parsed
exactly as written by the real ``parse_args`` of its program (``--help`` included), which is where an unknown or
removed flag, an abbreviation, a bad choice or a non-number fails. The runs themselves are tested, with tiny
settings, in test_scripts.py and test_command_line.py. Commands elided with ``...`` are checked flag by flag
(a missing required flag is then expected).
"""

import contextlib
import glob
import io
import os
import re
import shlex

import pytest

from hvae_diffusion import commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [
    "README.md",
    *sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
]
PROGRAM_OF = {
    **{f"hvae-{program.replace('_', '-')}": program for program in commands.PROGRAMS},
    **{f"scripts/{program}.py": program for program in commands.PROGRAMS},
}


def shell_lines(text):
    """Logical shell lines (continuations joined) of the fenced bash/sh/console blocks of a markdown text."""
    lines = []
    # every fenced block is matched (a yaml or python one too), so that each closing fence ends its own block
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if language in ("", "bash", "sh", "shell", "console"):
            lines += block.replace("\\\n", " ").splitlines()
    return lines


def docstring_lines(program):
    """The example commands of a program's module docstring (its --help text): indented lines that start with the
    program or ``python``/``accelerate``."""
    import importlib

    text = importlib.import_module(f"hvae_diffusion.commands.{program}").__doc__.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if re.match(r"\s+(hvae-|python |accelerate |[A-Z_]+=)", line)]


def commands_in(lines):
    """``(program, argv, elided)`` of every line that runs one of the programs (after env assignments, ``python``,
    ``accelerate launch`` and its own flags)."""
    found = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for index, word in enumerate(words):
            program = PROGRAM_OF.get(word) or PROGRAM_OF.get(word.removeprefix("./"))
            if program is not None:
                argv = words[index + 1 :]
                found.append((program, [arg for arg in argv if arg != "..."], "..." in argv, line))
                break
    return found


def all_documented_commands():
    found = []
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as handle:
            found += [(document, *command) for command in commands_in(shell_lines(handle.read()))]
    for program in commands.PROGRAMS:
        found += [(f"hvae-{program} --help", *command) for command in commands_in(docstring_lines(program))]
    return found


DOCUMENTED = all_documented_commands()


def test_the_documents_hold_commands_of_every_program():
    documented = {program for _, program, *_ in DOCUMENTED}
    assert documented == set(commands.PROGRAMS), set(commands.PROGRAMS) - documented
    assert len(DOCUMENTED) >= 15


@pytest.mark.parametrize(
    "source, program, argv, elided, line", DOCUMENTED, ids=[f"{d[0]}:{d[1]}:{i}" for i, d in enumerate(DOCUMENTED)]
)
def test_documented_command_parses_with_the_real_parser(source, program, argv, elided, line):
    import importlib

    module = importlib.import_module(f"hvae_diffusion.commands.{program}")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            module.parse_args(argv)
        except SystemExit as exit_info:
            message = stderr.getvalue()
            if exit_info.code == 0:  # --help
                return
            if elided and "the following arguments are required" in message:
                return
            pytest.fail(f"{source}: `{line.strip()}` does not parse: {message.strip().splitlines()[-1]}")


def test_accelerate_examples_start_the_processes_they_say():
    """``accelerate launch --num_processes N --cpu`` without a config starts one process (docs/training.md): every
    multi-process example names --multi_gpu."""
    lines = []
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as handle:
            lines += shell_lines(handle.read())
    for program in commands.PROGRAMS:
        lines += docstring_lines(program)
    launches = [
        line for line in lines if "accelerate launch" in line and re.search(r"--num_processes[ =]([2-9])", line)
    ]
    assert launches
    for line in launches:
        assert "--multi_gpu" in line, line


def options_of(program):
    """Every flag of a program, read from its --help."""
    import importlib

    module = importlib.import_module(f"hvae_diffusion.commands.{program}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(re.findall(r"(--[a-z][a-z0-9_]*)", out.getvalue()))


def sections_of_programs():
    """``(document, program, heading, text)`` of every ``##`` section whose heading names a program."""
    found = []
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as handle:
            text = handle.read()
        for section in re.split(r"\n(?=## )", text):
            heading = section.splitlines()[0]
            names = sorted((name for name in PROGRAM_OF if name in heading), key=len)  # hvae-train-vae, not hvae-train
            if heading.startswith("## ") and names:
                found.append((document, PROGRAM_OF[names[-1]], heading, section))
    return found


def test_every_flag_named_in_a_programs_section_is_one_of_its_flags():
    """The prose too: a section about hvae-<name> names only flags hvae-<name> has (inline code outside
    ``accelerate``/``hf`` commands and other programs' command lines)."""
    stale = []
    sections = sections_of_programs()
    assert {program for _, program, _, _ in sections} >= {"train", "sample", "evaluate", "train_classifier"}
    for document, program, heading, section in sections:
        options = options_of(program)
        prose = re.sub(r"```.*?```", "", section, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            words = span.split()
            if words and (words[0] in ("accelerate", "hf", "make", "tensorboard") or words[0] in PROGRAM_OF):
                continue  # another command's flags (a program's own command lines are parsed above)
            for flag in re.findall(r"(--[a-z][a-z0-9_]*\*?)", span):  # --adam_* names a family
                known = (
                    any(option.startswith(flag[:-1]) for option in options) if flag.endswith("*") else flag in options
                )
                if not known:
                    stale.append(f"{document} {heading}: {flag}")
    assert not stale, "\n".join(stale)
