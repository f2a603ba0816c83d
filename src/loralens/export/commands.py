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
    p.add_argument("--push-to-hub", metavar="ORG/NAME", dest="push_to_hub",
                   help="then upload to the Hugging Face Hub: one artifact to ORG/NAME, "
                        "several to ORG/NAME-<task>-<method>-seed<seed>; the token comes from "
                        "$HF_TOKEN and is written nowhere; $HF_ENDPOINT picks another hub")
    p.add_argument("--private", action="store_true",
                   help="with --push-to-hub: create the repositories private")
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
                   help="truncation in tokens (default: the run's data.max_length, else the "
                        "max_length an artifact's card records, else 384)")
    p.add_argument("--model", help="with a bare adapter directory: its base model (default: "
                                   "base_model_name_or_path where that directory exists, else "
                                   "the base the adapter's card records)")
    p.add_argument("--revision", help="with --model or a card's hub id: the base's hub revision")


def artifact_command(args: argparse.Namespace) -> int:
    from loralens.models.artifacts import ArtifactError
    from loralens.export.hub import HubError
    from loralens.export.predict import PredictError

    try:
        return _run(args)
    except (ArtifactError, PredictError, HubError) as e:
        print(f"loralens: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from loralens.export.writer import export_run

        if args.push_to_hub:  # a bad name or a missing token fails before the export
            from loralens.export.hub import hub_token, repo_ids

            repo_ids(args.push_to_hub, [{"task": "", "method": "", "seed": 0}])
            hub_token()
        rows = export_run(args.run_dir, args.out_dir, merge=args.merge, methods=args.methods)
        print(f"exported {len(rows)} model(s) to {args.out_dir} (see export.json)")
        if args.push_to_hub:
            from loralens.export.hub import push_export

            pushed = push_export(args.out_dir, args.push_to_hub, private=args.private or None)
            print(f"pushed {len(pushed)} repositor{'y' if len(pushed) == 1 else 'ies'} to the "
                  "hub (see export.json)")
        return 0
    from loralens.export.predict import predict_file

    summary = predict_file(args.target, args.task, args.input, args.output, args.method,
                           args.seed, args.batch_size, args.max_length, args.model,
                           args.revision)
    print(json.dumps(summary))
    return 0
