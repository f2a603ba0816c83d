"""Library code logs; only the command line prints (docs: "Library code logs; only the CLI
prints"). The CLI's logging (``loralens.cli.setup_logging``): plain messages, INFO and below
on stdout, warnings and errors on stderr, ``-q`` keeps warnings only, ``-v`` adds DEBUG."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import loralens
from loralens import cli

PACKAGE = Path(loralens.__file__).parent
# the command line and its argument glue may print: they are the terminal
CLI_MODULES = {"cli.py", "serving/cli_args.py", "export/commands.py"}


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.relative_to(PACKAGE).as_posix() not in CLI_MODULES)


def print_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id == "print"]


def test_no_library_module_prints():
    assert len(library_modules()) > 50  # the package itself, not an empty glob
    found = {p.relative_to(PACKAGE).as_posix(): lines
             for p in library_modules() if (lines := print_calls(p))}
    assert found == {}, f"print() in library modules (log through logging instead): {found}"


def test_library_loggers_are_named_after_their_module():
    """``log = logging.getLogger(__name__)``: the CLI's handler on ``loralens`` sees them.
    One exception configures rather than logs: a Ray worker process, which the CLI does not
    set up, gives the package logger the CLI's handler (study/executors.py worker_logging)."""
    configures = {("study/executors.py", "worker_logging")}
    for p in library_modules():
        tree = ast.parse(p.read_text())
        allowed = {id(c) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and (str(p.relative_to(PACKAGE)), f.name) in configures for c in ast.walk(f)}
        for n in ast.walk(tree):
            if id(n) in allowed:
                continue
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr == "getLogger" and isinstance(n.func.value, ast.Name)
                    and n.func.value.id == "logging"):
                assert [ast.unparse(a) for a in n.args] == ["__name__"], (
                    f"{p.relative_to(PACKAGE)}:{n.lineno}")


@pytest.fixture
def package_logger():
    """The ``loralens`` logger, put back as it was after the test."""
    logger = logging.getLogger("loralens")
    saved = list(logger.handlers), logger.level, logger.propagate
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def emit_all(name: str = "loralens.study.stages") -> None:
    log = logging.getLogger(name)
    log.debug("a debug message")
    log.info("an info message")
    log.warning("a warning message")


def test_default_level_info_plain_messages_info_on_stdout_warnings_on_stderr(
        package_logger, capsys):
    cli.setup_logging()
    emit_all()
    out, err = capsys.readouterr()
    assert out == "an info message\n"            # no level or logger prefix: as print showed it
    assert err == "a warning message\n"


def test_quiet_suppresses_info(package_logger, capsys):
    cli.setup_logging(quiet=True)
    emit_all()
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "a warning message\n"


def test_verbose_enables_debug(package_logger, capsys):
    cli.setup_logging(verbose=True)
    emit_all("loralens.training.loop")
    out, err = capsys.readouterr()
    assert out == "a debug message\nan info message\n"
    assert err == "a warning message\n"


def test_setup_twice_keeps_one_handler(package_logger, capsys):
    cli.setup_logging()
    cli.setup_logging(quiet=True)
    cli.setup_logging()
    assert sum(isinstance(h, cli.TerminalHandler) for h in package_logger.handlers) == 1
    emit_all()
    assert capsys.readouterr().out == "an info message\n"


def test_other_libraries_loggers_are_left_alone(package_logger, capsys):
    cli.setup_logging(verbose=True)
    logging.getLogger("some_dependency").debug("not ours")
    assert "not ours" not in capsys.readouterr().out


def test_terminal_logging_puts_the_logger_back(package_logger):
    before = list(package_logger.handlers), package_logger.level, package_logger.propagate
    with cli.terminal_logging(quiet=True):
        assert package_logger.level == logging.WARNING
    assert (list(package_logger.handlers), package_logger.level,
            package_logger.propagate) == before


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["presets"], False, False),
    (["-v", "presets"], True, False),
    (["--quiet", "presets"], False, True),
    (["presets", "-q"], False, True),                  # after the subcommand too
    (["-q", "report", "--run-dir", "r"], False, True),
])
def test_verbosity_flags_are_global(argv, verbose, quiet):
    args = cli.build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-v", "-q", "presets"])
    assert "not allowed with argument" in capsys.readouterr().err
