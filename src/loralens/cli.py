"""Command line: subcommands map onto stage functions; the config dataclasses are the schema.

Every subcommand takes ``--preset``, ``--config FILE`` and trailing ``key=value``
overrides (dotted keys of the config, e.g. ``train.lr=1e-4 data.train_size=512``),
layered in that order on the defaults and validated.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .config import ConfigError, StudyConfig, load_config, preset_names
from .runner import STAGES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"preset to layer on the defaults ({', '.join(preset_names())})")
    p.add_argument("--config", help="YAML file layered after the preset")
    p.add_argument("--run-dir", help="run directory (default: runs/<preset or 'default'>)")
    p.add_argument("--model", help="registry name, hub id or local directory (model.name)")
    p.add_argument("--glue-dir", help="GLUE root directory (data.glue_dir; else $LORALENS_GLUE_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate (task, method, seed) jobs")
    p.add_argument("--task", action="append", help="task (repeatable; default: the config's)")
    p.add_argument("--method", action="append", choices=["lora", "full"],
                   help="method (repeatable; default: the config's)")
    p.add_argument("--seed", action="append", type=int, help="seed (repeatable; default: config)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain jobs that already finished (their results are replaced)")
    _common(p)

    p = sub.add_parser("sanity", help="check each task and method overfits 10 training rows")
    p.add_argument("--task", action="append", help="task (repeatable; default: the config's)")
    p.add_argument("--method", action="append", choices=["lora", "full"])
    _common(p)

    p = sub.add_parser("run", help="run the whole study, resumably: " + " -> ".join(STAGES))
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in order (default: all: {','.join(STAGES)})")
    p.add_argument("--storage", help="SQLAlchemy URL shared by workers on several machines "
                                     "(search.storage), e.g. postgresql://user@host/db")
    _common(p)

    p = sub.add_parser("hpo", help="Optuna TPE search of one task and method")
    p.add_argument("--task", required=True)
    p.add_argument("--method", required=True, choices=["lora", "full"])
    p.add_argument("--storage", help="SQLAlchemy URL (search.storage); default SQLite in the run dir")
    p.add_argument("--trials", type=int, help="trials of the study (search.trials)")
    _common(p)

    p = sub.add_parser("extract", help="pooled hidden states of the base and every trained model")
    p.add_argument("--task", action="append", help="task (repeatable; default: the config's)")
    _common(p)

    p = sub.add_parser("drift", help="layer-wise similarity to the base model and Tables 3-4")
    p.add_argument("--task", action="append", help="task (repeatable; default: the config's)")
    _common(p)

    p = sub.add_parser("bench", help="serving cost: separate vs merged adapters vs full models")
    p.add_argument("--task", action="append", help="task (repeatable; default: the config's)")
    _common(p)

    p = sub.add_parser("report", help="Markdown + self-contained HTML report of a run directory")
    p.add_argument("run_dir_pos", nargs="?", metavar="RUN_DIR", help="the run directory")
    _common(p)

    from .serving import add_loadtest_arguments, add_serve_arguments

    p = sub.add_parser("serve", help="HTTP classification server for many LoRA adapters")
    add_serve_arguments(p)
    p = sub.add_parser("loadtest", help="concurrent-client load test of the serving backends")
    add_loadtest_arguments(p)

    sub.add_parser("models", help="list the model registry")
    sub.add_parser("presets", help="list the presets")
    return parser


def resolve(args: argparse.Namespace) -> tuple[StudyConfig, Path]:
    """The config: the run directory's stored one when no settings are given, else
    defaults -> preset -> file -> overrides (checked against the stored one, if any)."""
    run_dir = Path(getattr(args, "run_dir_pos", None) or args.run_dir
                   or Path("runs") / (args.preset or "default"))
    given = args.preset or args.config or args.overrides or args.model or args.glue_dir \
        or getattr(args, "storage", None) or getattr(args, "trials", None)
    if not given and (run_dir / "config.yaml").is_file():
        from .store import RunDir

        return RunDir(run_dir).load_config(), run_dir
    extra = list(args.overrides or [])
    if args.model:
        extra.append(f"model.name={args.model}")
    if getattr(args, "storage", None):
        extra.append(f"search.storage={args.storage}")
    if getattr(args, "trials", None):
        extra.append(f"search.trials={args.trials}")
    if args.glue_dir:
        extra.append(f"data.glue_dir={os.path.abspath(args.glue_dir)}")
    return load_config(args.preset, args.config, extra), run_dir


def cmd_train(args, cfg: StudyConfig, run) -> int:
    """Train jobs; under ``accelerate launch`` (or torchrun) each job is data parallel."""
    from .train import init_distributed, load_base, prepare_task, summary_line, train_job

    init_distributed()

    tasks = args.task or cfg.tasks
    methods = args.method or cfg.methods
    seeds = args.seed or cfg.seeds
    base = None
    for task in tasks:
        prepared = None
        for method in methods:
            for seed in seeds:
                if run.job_done(task, method, seed) and not args.overwrite:
                    print(summary_line(train_job(cfg, run, task, method, seed)), flush=True)
                    continue
                base = base or load_base(cfg)
                if prepared is None:
                    prepared = prepare_task(cfg, task, base[1])
                    run.record_data(task, prepared.stats())
                m = train_job(cfg, run, task, method, seed, prepared=prepared, base=base,
                              overwrite=args.overwrite, progress=not args.no_progress)
                if "rank" not in m:  # data parallel: rank 0 reports
                    print(summary_line(m), flush=True)
    return 0


def cmd_sanity(args, cfg: StudyConfig, run) -> int:
    from .sanity import run_sanity

    results = run_sanity(cfg, run, args.task or cfg.tasks, args.method or cfg.methods,
                         progress=not args.no_progress)
    failed = [f"{r['task']}/{r['method']}" for r in results if not r["passed"]]
    print(f"sanity: {len(results) - len(failed)}/{len(results)} passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_run(args, cfg: StudyConfig, run) -> int:
    from .runner import Study

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    Study(cfg, run, progress=not args.no_progress, stages=stages).run_all()
    return 0


def cmd_hpo(args, cfg: StudyConfig, run) -> int:
    from .search import run_search
    from .train import load_base

    res = run_search(cfg, run, args.task, args.method, load_base(cfg),
                     progress=not args.no_progress)
    print(f"search {args.task}/{args.method}: best {res['metric']} {res['best']['value']:.4f} "
          f"(trial {res['best']['number']}) {res['best']['params']}; trials {res['counts']}")
    return 0


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def cmd_extract(args, cfg: StudyConfig, run) -> int:
    from .extract import run_extract, summary_line

    ec = cfg.extract
    for r in run_extract(cfg, run, args.task or cfg.tasks, n_examples=ec.examples, seed=ec.seed,
                         batch_size=ec.batch_size, progress=not args.no_progress):
        print(summary_line(r))
    return 0


def cmd_drift(args, cfg: StudyConfig, run) -> int:
    from .drift import run_drift, summary_lines

    print("\n".join(summary_lines(run_drift(cfg, run, args.task or cfg.tasks,
                                            progress=not args.no_progress))))
    return 0


def cmd_bench(args, cfg: StudyConfig, run) -> int:
    from .serving.bench import run_bench, summary_lines

    bc = cfg.bench
    result = run_bench(cfg, run, args.task or cfg.tasks, bc.batch_sizes, bc.warmup, bc.requests,
                       progress=not args.no_progress, mixed_batch_size=bc.mixed_batch_size)
    print("\n".join(summary_lines(result)))
    print(f"results in {run.root / 'bench'}")
    return 0 if all(result["checks"].values()) else 1


def cmd_report(args, cfg: StudyConfig, run) -> int:
    from .report import build_report

    print(f"report: {build_report(run)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may stand anywhere among the options
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not OVERRIDE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = overrides + list(args.overrides or [])
    if args.command == "models":
        from .models import REGISTRY

        for e in REGISTRY.values():
            print(f"{e.name:16s} {e.ref}\n{'':16s} {e.note}")
        return 0
    if args.command == "presets":
        print("\n".join(preset_names()))
        return 0
    if args.command in ("serve", "loadtest"):
        return _serving_command(args)
    try:
        cfg, run_dir = resolve(args)
        from .store import RunDir

        run = RunDir(run_dir)
        if args.command != "report":  # the report only reads
            run.bind_config(cfg)
            run.record_environment(args.command)
        return {"train": cmd_train, "sanity": cmd_sanity, "run": cmd_run, "hpo": cmd_hpo,
                "extract": cmd_extract, "drift": cmd_drift, "bench": cmd_bench,
                "report": cmd_report}[args.command](args, cfg, run)
    except ConfigError as e:
        print(f"loralens: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralens: interrupted; finished jobs are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # clear one-line errors for the expected failure kinds
        from .data import DataError
        from .models import ModelNotFound
        from .store import RunDirError

        if isinstance(e, (DataError, ModelNotFound, RunDirError, KeyError)):
            print(f"loralens: error: {e}", file=sys.stderr)
            return 2
        raise


def _serving_command(args) -> int:
    """``serve`` and ``loadtest`` take adapter sources, not a study config."""
    from .serving.backends import AdapterError

    try:
        if args.command == "serve":
            from .serving.server import cli_command
        else:
            from .serving.loadtest import cli_command
        return cli_command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from .data import DataError
        from .models import ModelNotFound
        from .serving.loadtest import LoadTestError
        from .store import RunDirError

        if isinstance(e, (AdapterError, LoadTestError, DataError, ModelNotFound, RunDirError,
                          ConfigError, OSError)):
            print(f"loralens: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
