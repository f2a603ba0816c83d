"""The ``export`` and ``predict`` subcommands (trained models leaving loralens)."""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = ("export", "predict")


def add_artifact_commands(sub) -> None:
    p = sub.add_parser("export", help="every model of a run as standard artifacts (PEFT "
                                      "adapters, sequence-classification checkpoints) with "
                                      "model cards")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--merge", action="store_true",
                   help="merge adapters (LoRA, DoRA, IA3, ...) into full checkpoints")
    p.add_argument("--method", action="append", dest="methods", metavar="NAME",
                   help="export only this method's models (repeatable; default: every "
                        "method of the run)")
    p = sub.add_parser("predict", help="batch prediction with a trained model "
                                       "(labels, label names, probabilities)")
    p.add_argument("target", metavar="RUN_DIR|MODEL_DIR")
    p.add_argument("--task", required=True, help="the task (decides the text columns and labels)")
    p.add_argument("--input", required=True, metavar="FILE",
                   help=".tsv (GLUE files, test splits included), .csv or .jsonl")
    p.add_argument("--output", required=True, metavar="FILE", help=".tsv, .csv or .jsonl")
    p.add_argument("--method", metavar="NAME",
                   help="with a RUN_DIR: which method's model (default lora, else the "
                        "run's first method)")
    p.add_argument("--seed", type=int, help="with a RUN_DIR: which seed (default the smallest)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int,
                   help="truncation in tokens (default: the run's data.max_length, else 384)")


def artifact_command(args: argparse.Namespace) -> int:
    from loralens.models.artifacts import ArtifactError
    from loralens.export.predict import PredictError

    try:
        return _run(args)
    except (ArtifactError, PredictError) as e:
        print(f"loralens: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from loralens.export.writer import export_run

        rows = export_run(args.run_dir, args.out_dir, merge=args.merge, methods=args.methods)
        print(f"exported {len(rows)} model(s) to {args.out_dir} (see export.json)")
        return 0
    from loralens.export.predict import predict_file

    summary = predict_file(args.target, args.task, args.input, args.output, args.method,
                           args.seed, args.batch_size, args.max_length)
    print(json.dumps(summary))
    return 0
