"""Every command line the documentation shows parses with the real CLI parsers, so the docs cannot
drift from the CLI: README.md, ablations/README.md and docs/*.md, in shell code blocks and in inline
code spans.  Commands are parsed only (``parser.parse_args``), never run.

Programs checked: ``m2f`` / ``python -m m2f`` / ``torchrun ... -m m2f``, ``python -m ablations``,
``python -m m2f.bench`` and ``nox -s SESSION`` (the session must exist in noxfile.py; for ablation
sessions the arguments after ``--`` are parsed as ``python -m ablations run NAME ...``).  Other programs
(pip, pytest, bash) are left alone.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "ablations/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
# Placeholders the docs write in capitals, expanded to a value the parser accepts (for arguments with
# choices); any other capitalised placeholder (ANN.json, RUN_DIR, ...) is a free string already.
PLACEHOLDERS = {"NAME": "masked_attention", "<name>": "masked_attention", "<ablation>": "masked_attention",
                "PRESET": "r50_coco_panoptic", "S": "cpu", "N": "1", "DEV": "cpu", "SPEC": "synth", "ROW": "full"}


def _code(text: str):
    """(kind, code) pieces of a markdown text: ("block", lines of a shell code block) and ("span", one
    inline code span with its line breaks collapsed)."""
    pieces, prose, lang, block = [], [], None, None
    for line in text.splitlines():
        m = re.match(r"^\s*```(\w*)\s*$", line)
        if m and block is None:
            lang, block = m.group(1), []
            prose.append("")
        elif m:
            if lang in SHELL_LANGS:
                pieces.append(("block", block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        pieces.append(("span", " ".join(span.split())))
    return pieces


def _logical_lines(lines):
    """Join backslash continuations, and a synopsis' indented ``[--option ...]`` continuation lines."""
    out = []
    for line in lines:
        if out and (out[-1].endswith("\\") or re.match(r"^\s+\[", line)):
            out[-1] = out[-1].rstrip("\\").rstrip() + " " + line.strip()
        else:
            out.append(line)
    return [l for l in out if l.strip() and not l.lstrip().startswith("#")]


def _expand_synopsis(line: str) -> str:
    """``[--scale smoke|cpu|paper]`` -> ``--scale smoke``; ``[NAME ...]`` -> ``NAME`` (first alternative,
    brackets and ellipses dropped).  Brackets inside words (``".[suite]"``) are left alone."""
    def one(m):
        inner = re.sub(r"([\w.-]+)(?:\|[\w.-]+)+", r"\1", m.group(1))
        return inner.replace("...", " ")

    return re.sub(r"(?<![\w\"'.])\[((?:--?|[A-Z])[^\]]*)\]", one, line)


def _commands(line: str):
    """The simple commands of a shell line (split at ``&&``, ``||``, ``|`` and ``;``), as argv lists."""
    for k, v in PLACEHOLDERS.items():  # <name> before lexing: '<' is shell punctuation
        if k.startswith("<"):
            line = line.replace(k, v)
    lex = shlex.shlex(_expand_synopsis(line), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in ("&&", "||", "|", ";", "&"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c for c in cmds if c]


def _expand(tok: str) -> str:
    return PLACEHOLDERS.get(tok, tok)


def _target(argv):
    """(program, argv for its parser) or None for a program these docs do not own."""
    argv = [t for t in argv if t != "..."]
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # OMP_NUM_THREADS=1 m2f ...
        argv = argv[1:]
    if not argv:
        return None
    prog, rest = argv[0], argv[1:]
    if prog == "m2f":
        return "m2f", rest
    if prog in ("python", "python3", "torchrun") and "-m" in rest:
        i = rest.index("-m")
        if prog.startswith("python") and i != 0:
            return None
        module, rest = rest[i + 1], rest[i + 2:]
        if module in ("m2f", "ablations", "m2f.bench"):
            return module, rest
        return None
    if prog == "nox":
        return "nox", rest
    return None


PROGRAMS = re.compile(r"(?:^|&&|\|\||;)\s*(?:[A-Z_]+=\S+\s+)*(?:m2f|python3?|torchrun|nox)(?:\s|$)")


def _collect():
    found = []
    for doc in DOCS:
        for kind, code in _code((ROOT / doc).read_text()):
            lines = _logical_lines(code) if kind == "block" else [code]
            for line in lines:
                if not PROGRAMS.search(line):  # prose in backticks, other tools
                    continue
                for argv in _commands(line):
                    t = _target(argv)
                    if t is not None:
                        found.append((doc, line.strip(), t[0], [_expand(a) for a in t[1]]))
    return found


COMMANDS = _collect()


def _parsers():
    from ablations.cli import build_parser as ablations_parser
    from m2f.bench.cli import build_parser as bench_parser
    from m2f.cli import build_parser

    return {"m2f": build_parser(), "ablations": ablations_parser(), "m2f.bench": bench_parser()}


PARSERS = _parsers()


@functools.lru_cache(maxsize=None)
def _nox_sessions():
    """name -> session function, from nox's registry after importing noxfile.py (once)."""
    from nox import registry

    spec = importlib.util.spec_from_file_location("_m2f_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(registry.get()), module


def _subcommands(parser):
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


class _Refused(Exception):
    pass


def _parse(parser, argv):
    """parse_args without exiting: ``--help`` counts as parsed; a refusal raises _Refused with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:
            return None
        raise _Refused(err.getvalue().strip().splitlines()[-1]) from None


def check(program: str, argv):
    """Raise _Refused when ``argv`` does not parse as ``program``'s command line."""
    if program == "nox":
        sessions, module = _nox_sessions()
        if "-s" not in argv and "--session" not in argv:
            raise _Refused(f"nox {' '.join(argv)}: no -s SESSION")
        i = argv.index("-s") if "-s" in argv else argv.index("--session")
        name = argv[i + 1]
        if name not in sessions:
            raise _Refused(f"nox session {name!r} is not in noxfile.py (sessions: {sorted(sessions)})")
        if "--" in argv and name in module.ABLATIONS:  # posargs go to python -m ablations run NAME
            _parse(PARSERS["ablations"], ["run", module.ABLATIONS[name], *argv[argv.index("--") + 1:]])
        return
    parser = PARSERS[program]
    if len(argv) <= 1 and not any(a.startswith("-") for a in argv):  # a mention such as `m2f score`
        if argv and argv[0] not in _subcommands(parser):
            raise _Refused(f"{argv[0]!r} is not a command of {program}")
        return
    _parse(parser, argv)


@pytest.mark.parametrize("doc,line,program,argv", COMMANDS, ids=[f"{d}:{l[:60]}" for d, l, _, _ in COMMANDS])
def test_documented_command_parses(doc, line, program, argv):
    try:
        check(program, argv)
    except _Refused as e:
        pytest.fail(f"{doc}: `{line}` does not parse: {e}")


def test_the_docs_show_the_commands_a_user_types():
    """The extraction finds the commands (a broken extractor would make the test above vacuous)."""
    by_program = {}
    for doc, line, program, argv in COMMANDS:
        by_program.setdefault(program, []).append(argv)
    assert {"m2f", "ablations", "nox"} <= set(by_program)
    assert len(by_program["m2f"]) >= 12 and len(by_program["nox"]) >= 8
    m2f_cmds = {a[0] for a in by_program["m2f"] if a}
    assert {"info", "flops", "data", "train", "eval", "predict", "score", "convert"} <= m2f_cmds
    score = [a for a in by_program["m2f"] if a[:1] == ["score"] and len(a) > 1]
    assert score and all("--task" in a for a in score)
    # the synopsis in ablations/README.md expands to a parseable run command with every option
    run = [a for a in by_program["ablations"] if a[:1] == ["run"] and "--jobs" in a]
    assert run and run[0][:4] == ["run", "masked_attention", "--scale", "smoke"]


def test_the_checker_refuses_what_the_cli_refuses():
    with pytest.raises(_Refused, match="--task"):
        check("m2f", ["score", "panoptic", "--task"])
    with pytest.raises(_Refused, match="unrecognized"):
        check("m2f", ["train", "--preset", "tiny", "--out", "r", "--bogus"])
    with pytest.raises(_Refused, match="not in noxfile"):
        check("nox", ["-s", "no_such_session"])
    with pytest.raises(_Refused, match=r"--scale .huge.: valid choices"):
        check("nox", ["-s", "ablation_masked_attention", "--", "--scale", "huge"])
    assert _commands('pip install -e ".[test]" && python -m m2f info --preset tiny | head') == [
        ["pip", "install", "-e", ".[test]"], ["python", "-m", "m2f", "info", "--preset", "tiny"], ["head"]]
    assert _expand_synopsis("run NAME [--scale smoke|cpu|paper] [--row ROW ...]") == "run NAME --scale smoke --row ROW  "
