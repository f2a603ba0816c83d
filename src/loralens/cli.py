"""Command line: one subcommand per stage of the stage table, plus ``run`` (all of them).

Every study subcommand takes ``--preset``, ``--config FILE`` and trailing ``key=value``
overrides (dotted keys of the config, e.g. ``train.lr=1e-4 data.train_size=512``),
layered in that order on the defaults and validated. The subcommands, their
selectors (``--task``, ``--method``, ``--seed``) and their flags come from
:data:`loralens.study.stages.STAGES`: a stage is wired once.

Library code logs (``logging.getLogger(__name__)``); only the command line prints and
decides where log records go (:func:`setup_logging`): plain messages, INFO and below on
stdout, warnings and errors on stderr; ``-v`` adds DEBUG, ``-q`` keeps warnings only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from loralens.core.errors import ConfigError

from loralens.core.config import StudyConfig
from loralens.study.config import check_config, load_config
from loralens.core.config_load import preset_names
from loralens.core.version import package_version
from loralens.study.stages import (
    STAGE_NAMES, STAGES, Context, Stage, get_stage, run_stage, run_study,
)

SELECTORS = {
    "task": dict(action="append", help="task: a built-in name or a task file (.yaml) "
                                       "(repeatable; default: the config's)"),
    "method": dict(action="append",
                   help="method: a built-in name (loralens.models.methods) or one of method_defs "
                        "(repeatable; default: the config's)"),
    "seed": dict(action="append", type=int, help="seed (repeatable; default: the config's)"),
}


class TerminalHandler(logging.Handler):
    """Plain messages: INFO and below to stdout, warnings and errors to stderr.

    The streams are looked up at each record, not kept: a redirected ``sys.stdout``
    (pytest's capture, ``contextlib.redirect_stdout``) gets what a print would have."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """The command line's logging: the ``loralens`` logger (every library module's logger
    is its child) at INFO, DEBUG with ``verbose`` (-v), WARNING with ``quiet`` (-q), through
    one :class:`TerminalHandler` (format ``%(message)s``: what a print showed). Other
    libraries' loggers are left as they are. Returns the ``loralens`` logger."""
    logger = logging.getLogger("loralens")
    for h in [h for h in logger.handlers if isinstance(h, TerminalHandler)]:
        logger.removeHandler(h)
    handler = TerminalHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # a handler on the root logger would show each line twice
    return logger


@contextlib.contextmanager
def terminal_logging(verbose: bool = False, quiet: bool = False):
    """:func:`setup_logging` for the duration of one :func:`main` call; the ``loralens``
    logger is then put back as it was (main called from Python, as the tests do)."""
    logger = logging.getLogger("loralens")
    saved = list(logger.handlers), logger.level, logger.propagate
    setup_logging(verbose, quiet)
    try:
        yield logger
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def _verbosity(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``-v``/``-q`` on the ``loralens`` parser, and again on every subcommand's (where
    ``suppress``: no default there, so ``loralens -q run`` keeps the top-level value)."""
    extra = {"default": argparse.SUPPRESS} if suppress else {}
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="show debug messages too",
                   **extra)
    g.add_argument("-q", "--quiet", action="store_true",
                   help="show only warnings and errors (progress bars: --no-progress)", **extra)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"preset to layer on the defaults ({', '.join(preset_names())})")
    p.add_argument("--config", help="YAML file layered after the preset")
    p.add_argument("--run-dir", help="run directory (default: runs/<preset or 'default'>)")
    p.add_argument("--model", help="registry name, hub id or local directory (model.name)")
    p.add_argument("--glue-dir", help="GLUE root directory (data.glue_dir; else $LORALENS_GLUE_DIR)")
    p.add_argument("--storage", help="SQLAlchemy URL shared by workers on several machines "
                                     "(search.storage; else $LORALENS_STORAGE), e.g. "
                                     "postgresql+psycopg://user@host/db; stored with its "
                                     "password hidden")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-to", action="append", metavar="NAME",
                   help="experiment trackers of the training jobs (tracking.report_to; "
                        "repeatable or comma-separated): none, all (every one installed), "
                        "tensorboard, mlflow, wandb, aim, clearml, comet_ml, dvclive, "
                        "trackio, swanlab")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, "
                                          "else sqlite:///RUN_DIR/mlflow.db); never stored")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _stage_parser(sub, stage: Stage) -> None:
    p = sub.add_parser(stage.name, aliases=list(stage.aliases), help=stage.help,
                       description=stage.run.__doc__)
    p.set_defaults(stage=stage.name)
    for sel in stage.selects:
        p.add_argument(f"--{sel}", **SELECTORS[sel])
    for f in stage.flags:
        if f.type is None:
            p.add_argument(f.name, action="store_true", help=f.help)
        else:
            p.add_argument(f.name, type=f.type, help=f.help)
    if stage.read_only:
        p.add_argument("run_dir_pos", nargs="?", metavar="RUN_DIR", help="the run directory")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"loralens {package_version()}")
    _verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole study, resumably: " + " -> ".join(STAGE_NAMES))
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma-separated stages to run, in order (default: all: "
                        f"{','.join(STAGE_NAMES)})")
    p.add_argument("--task", action="append",
                   help="the study's tasks: built-in names or task files (.yaml) (repeatable; "
                        "sets the config's tasks)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's work (jobs, rows, tokens) and a wall time "
                        "estimated from throughput measured here, then exit; writes nothing")
    p.add_argument("--peak-gflops", type=float, metavar="G",
                   help="with --dry-run: plan for a machine whose float32 GEMM peak at the "
                        "model's shapes is G GFLOP/s (this machine's is measured and the "
                        "compute-bound rates scaled by G / it)")
    p.add_argument("--plan", metavar="FILE",
                   help="with --dry-run: also write the plan's estimates to FILE (JSON); "
                        "without: store FILE's plan in the run directory (plan.json, the "
                        "first kept) so the report shows estimate beside actual per stage")
    p.add_argument("--executor", choices=("local", "ray"),
                   help="run.executor: local (this process; other workers through the job "
                        "table), or ray: every unit of work a Ray task (the ray extra)")
    p.add_argument("--ray-address", help="run.ray_address: the Ray cluster to join (auto, "
                                         "host:port, ray://host:port)")
    _common(p)
    for stage in STAGES:
        _stage_parser(sub, stage)

    from loralens.serving import add_loadtest_arguments, add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="HTTP classification server for many "
                                                     "LoRA adapters"))
    add_loadtest_arguments(sub.add_parser("loadtest", help="concurrent-client load test of the "
                                                           "serving backends"))
    p = sub.add_parser("upgrade", help="rewrite an older run directory's config for this "
                                       "version (unknown keys dropped, a .bak kept)")
    p.add_argument("run_dir_pos", metavar="RUN_DIR")
    from loralens.export.commands import add_artifact_commands

    add_artifact_commands(sub)  # export, predict
    sub.add_parser("models", help="list the model registry")
    sub.add_parser("presets", help="list the presets")
    p = sub.add_parser("completion", help="print a shell completion script: "
                                          "eval \"$(loralens completion bash)\"")
    p.add_argument("shell", choices=("bash",), help="the shell (bash; zsh reads it through "
                                                   "bashcompinit)")
    for p in {id(p): p for p in sub.choices.values()}.values():  # aliases: one parser
        _verbosity(p, suppress=True)
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` items for the options that set config keys."""
    extra = []
    if args.model:
        extra.append(f"model.name={args.model}")
    storage = args.storage or os.environ.get("LORALENS_STORAGE")  # recorded redacted
    if storage:
        extra.append(f"search.storage={storage}")
    if args.glue_dir:
        extra.append(f"data.glue_dir={os.path.abspath(args.glue_dir)}")
    if args.report_to:
        names = [n.strip() for a in args.report_to for n in a.split(",") if n.strip()]
        extra.append(f"tracking.report_to=[{','.join(names)}]")
    for key in ("executor", "ray_address"):  # `run` only; quoted: host:port is no YAML number
        if getattr(args, key, None):
            extra.append(f"run.{key}={json.dumps(getattr(args, key))}")
    stage = _stage_of(args)
    for f in stage.flags if stage else ():
        value = getattr(args, _dest(f.name))
        if f.config_key and value is not None:
            extra.append(f"{f.config_key}={value}")
    return extra


def _stage_of(args: argparse.Namespace) -> Stage | None:
    """The stage of a stage subcommand; None for ``run``."""
    return get_stage(args.stage) if getattr(args, "stage", None) else None


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def resolve(args: argparse.Namespace) -> tuple[StudyConfig, Path]:
    """The config: the run directory's stored one when no settings are given, else
    defaults -> preset -> file -> overrides (checked against the stored one, if any)."""
    from loralens.core.run_dir import MACHINE_LOCAL, RunDir

    run_dir = Path(getattr(args, "run_dir_pos", None) or args.run_dir
                   or Path("runs") / (args.preset or "default"))
    extra = _flag_overrides(args)
    # --glue-dir and --storage say where this machine finds things, not what the study is
    local = [e for e in extra if e.split("=", 1)[0] in MACHINE_LOCAL]
    given = args.preset or args.config or args.overrides or [e for e in extra if e not in local]
    if not given and RunDir(run_dir).is_run_dir():
        cfg, run_dir = _stored(args, run_dir, local)
        return _with_task_files(args, cfg, stored=True), run_dir
    cfg = load_config(args.preset, args.config, list(args.overrides or []) + extra)
    return _with_task_files(args, cfg, stored=False), run_dir


def _with_task_files(args: argparse.Namespace, cfg: StudyConfig, stored: bool) -> StudyConfig:
    """``--task``: for ``run``, the study's tasks; for a stage, task files it names join the
    config's tasks (a stored config's must already be there)."""
    from loralens.core.config import merge
    from loralens.tasks.registry import is_task_file, task_key

    given = list(getattr(args, "task", None) or [])
    if not given:
        return cfg
    if _stage_of(args) is None:
        return check_config(merge(StudyConfig, cfg, {"tasks": given}))
    extra = [t for t in given if is_task_file(t) and task_key(t) not in cfg.tasks]
    if extra and stored:
        raise ConfigError(f"--task {extra[0]}: task {task_key(extra[0])!r} is not one of this "
                          f"run directory's tasks ({', '.join(cfg.tasks)})", "tasks")
    return check_config(merge(StudyConfig, cfg, {"tasks": [*cfg.tasks, *extra]})) if extra else cfg


def _stored(args: argparse.Namespace, run_dir: Path, local: list[str]):
    """The run directory's stored config (with this machine's local settings)."""
    from loralens.study.config import merge_overrides
    from loralens.core.errors import RunDirError
    from loralens.core.run_dir import RunDir

    stage = _stage_of(args)
    try:
        stored = RunDir(run_dir).load_config()
    except RunDirError:
        if stage is None or not stage.read_only:
            raise
        # the report reads the run directory's own files, whatever version wrote them
        return load_config(), run_dir
    return merge_overrides(stored, local), run_dir


def context(args: argparse.Namespace, cfg: StudyConfig, run) -> Context:
    from loralens.study.executors import make_executor

    ctx = Context(cfg, run, progress=not args.no_progress,
                  select_tasks=_selected_tasks(args),
                  select_methods=getattr(args, "method", None),
                  select_seeds=getattr(args, "seed", None), executor=make_executor(cfg))
    stage = _stage_of(args)
    for f in stage.flags if stage else ():
        if f.context_field and getattr(args, _dest(f.name)):
            setattr(ctx, f.context_field, f.value)
    return ctx


def _selected_tasks(args: argparse.Namespace) -> list[str] | None:
    """A stage's ``--task`` values as task names (a task file by its name)."""
    from loralens.tasks.registry import task_key

    given = getattr(args, "task", None)
    if not given or _stage_of(args) is None:
        return None
    return [task_key(t) for t in given]


def study_command(args: argparse.Namespace) -> int:
    """``run`` and every stage subcommand."""
    from loralens.core.run_dir import RunDir

    cfg, run_dir = resolve(args)
    if args.tracking_uri:  # read where MLflow reads it; never written to the run directory
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    stage = _stage_of(args)
    names = _stage_names(args) if stage is None else ()
    peak = getattr(args, "peak_gflops", None)
    if peak is not None and (not getattr(args, "dry_run", False) or not peak > 0):
        raise ConfigError(f"--peak-gflops {peak}: a positive GFLOP/s, with --dry-run",
                          "--peak-gflops")
    if getattr(args, "dry_run", False):  # before anything writes into the run directory
        from loralens.study.plan.dry_run import dry_run

        print(dry_run(cfg, names, run_dir, peak_gflops=peak,  # the command's result
                      plan_file=getattr(args, "plan", None)), flush=True)
        return 0
    run = RunDir(run_dir)
    if stage is None or not stage.read_only:  # the report only reads
        run.bind_config(cfg)
        run.record_environment(stage.name if stage else "run")
    if getattr(args, "plan", None):  # the plan make run printed: stored, not measured again
        from loralens.study.plan.dry_run import adopt_plan

        adopt_plan(run, args.plan)
    ctx = context(args, cfg, run)
    if stage is not None:
        return 0 if run_stage(stage, ctx, record=not stage.read_only) else 1
    run_study(ctx, names)
    return 0


def _stage_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The stages of ``run --stages``, checked."""
    names = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGE_NAMES)}")
    return names


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subs.choices)


def _option_words(p: argparse.ArgumentParser) -> list[str]:
    return [o for a in p._actions for o in a.option_strings]


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script generated from the parser: subcommand names (aliases
    included) after ``loralens``, then that subcommand's options after a ``-``, and file
    names elsewhere (run directories, configs, adapter directories)."""
    subs = _subparsers(parser)
    top = sorted(subs) + _option_words(parser)
    cases = "".join(f"    {name}) words=\"{' '.join(_option_words(p))}\" ;;\n"
                    for name, p in sorted(subs.items()))
    return (
        "# bash completion for loralens (generated by `loralens completion bash`)\n"
        "_loralens() {\n"
        "  local cur=\"${COMP_WORDS[COMP_CWORD]}\" cmd=\"\" words i\n"
        "  for ((i = 1; i < COMP_CWORD; i++)); do\n"
        "    case \"${COMP_WORDS[i]}\" in -*) ;; *) cmd=\"${COMP_WORDS[i]}\"; break ;; esac\n"
        "  done\n"
        "  if [[ -z $cmd ]]; then\n"
        f"    COMPREPLY=($(compgen -W \"{' '.join(top)}\" -- \"$cur\")); return\n"
        "  fi\n"
        "  [[ $cur == -* ]] || return  # complete -o default: file names\n"
        "  case \"$cmd\" in\n"
        f"{cases}"
        "    *) words=\"\" ;;\n"
        "  esac\n"
        "  COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n"
        "}\n"
        "complete -o default -F _loralens loralens\n"
    )


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _commands_with_overrides(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommands (aliases included) whose parser has the ``key=value`` positional."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, p in subs.choices.items()
            if any(x.dest == "overrides" for x in p._actions)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # key=value overrides may stand anywhere among the options of a command that takes
    # them (not among `serve NAME=DIR` sources)
    command = next((a for a in argv if not a.startswith("-")), None)
    takes = command in _commands_with_overrides(parser)
    overrides = [a for a in argv if takes and OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not (takes and OVERRIDE.match(a))])
    if hasattr(args, "overrides"):
        args.overrides = overrides + list(args.overrides or [])
    with terminal_logging(args.verbose, args.quiet):
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    """The parsed command, run; its exit status."""
    if args.command == "models":
        from loralens.models.registry import REGISTRY

        for e in REGISTRY.values():
            print(f"{e.name:16s} {e.ref}\n{'':16s} {e.note}")
        return 0
    if args.command == "presets":
        print("\n".join(preset_names()))
        return 0
    if args.command == "completion":
        print(bash_completion(build_parser()), end="")
        return 0
    if args.command in ("serve", "loadtest"):
        return _serving_command(args)
    try:
        if args.command == "upgrade":
            return _upgrade(args.run_dir_pos)
        if args.command in ("export", "predict"):
            from loralens.export.commands import artifact_command

            return artifact_command(args)
        return study_command(args)
    except KeyboardInterrupt:
        print("loralens: interrupted; finished jobs are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:
        return _user_error(e, args)


def _upgrade(path: str) -> int:
    from loralens.core.run_dir import RunDir

    dropped = RunDir(path).upgrade()
    print(f"upgraded {path}: " + (f"dropped unknown keys {dropped}" if dropped
                                  else "nothing to drop") + "; new keys take their defaults")
    return 0


def _database_full(e: Exception, args: argparse.Namespace) -> str | None:
    """The one-line message for SQLite running out of space (the job table or the search
    study), naming the database; None for any other error."""
    orig = getattr(e, "orig", None)
    if orig is None or "database or disk is full" not in str(orig):
        return None
    from loralens.core.redaction import redact_url, resolve_storage

    storage = resolve_storage(getattr(args, "storage", None))
    run_dir = (getattr(args, "run_dir_pos", None) or getattr(args, "run_dir", None)
               or Path("runs") / (getattr(args, "preset", None) or "default"))
    where = redact_url(storage) if storage else f"{run_dir}/{{jobs,search}}.db"
    return (f"no space left on the device writing the SQLite database {where} (database or "
            "disk is full); free some space and rerun: finished work is kept")


def _user_error(e: Exception, args: argparse.Namespace | None = None) -> int:
    """One clear line for the expected failure kinds (bad config, data, model, run
    directory); anything else is a bug and keeps its traceback."""
    from loralens.tasks.rows import DataError
    from loralens.models.registry import ModelNotFound
    from loralens.core.errors import RunDirError
    from loralens.core.errors import DiskFullError

    if isinstance(e, ConfigError):
        print(f"loralens: config error: {e}", file=sys.stderr)
        return 2
    full = _database_full(e, args) if args is not None else None
    if full:
        print(f"loralens: error: {full}", file=sys.stderr)
        return 1
    if isinstance(e, DiskFullError):
        print(f"loralens: error: {e.strerror}", file=sys.stderr)
        return 1
    if isinstance(e, (DataError, ModelNotFound, RunDirError)):
        print(f"loralens: error: {e}", file=sys.stderr)
        return 2
    raise e


def _serving_command(args) -> int:
    """``serve`` and ``loadtest`` take adapter sources, not a study config."""
    from loralens.serving.backends import AdapterError

    try:
        if args.command == "serve" and getattr(args, "ray_replicas", None) is not None:
            from loralens.serving.ray_serve import cli_command  # loralens[serve]: Ray Serve

            return cli_command(args)
        if args.command == "serve":
            from loralens.serving.server import cli_command

            return cli_command(args)
        from loralens.serving.loadtest import cli_command

        print(cli_command(args))  # the summary table: the command's result
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from loralens.serving.loadtest import LoadTestError

        if isinstance(e, (AdapterError, LoadTestError, OSError)):
            print(f"loralens: error: {e}", file=sys.stderr)
            return 2
        return _user_error(e)


if __name__ == "__main__":
    sys.exit(main())
