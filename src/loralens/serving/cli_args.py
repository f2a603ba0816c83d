"""Command-line arguments of ``loralens serve`` and ``loralens loadtest``.

Kept free of torch and the web stack so that building the CLI parser stays cheap.
"""

from __future__ import annotations

BACKENDS = ("ours", "peft", "merged")
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
DEFAULT_CLIENTS = (1, 8, 32)
DEFAULT_ADAPTERS = (1, 4, 16)
DEFAULT_REPEATS = 3  # runs per cell (servers interleaved): intervals need at least 2


def add_serve_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="RUN_DIR|ADAPTER_DIR|NAME=DIR",
                   help="a run directory (all its LoRA adapters), adapter directories, or "
                        "NAME=DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--backend", choices=BACKENDS, default="ours",
                   help="ours (multi-adapter batches, default), peft or merged")
    p.add_argument("--model", help="base model (default: the run's model.name, else "
                                   "smollm2-135m)")
    p.add_argument("--revision", help="hub revision of the base model (default: the run's "
                                      "model.revision when --model is the run's model)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the base model's code from the hub (default: the run's "
                        "model.trust_remote_code when --model is the run's model)")
    p.add_argument("--max-length", type=int, help="truncation in tokens (default: the run's "
                                                  "data.max_length, else the max_length the "
                                                  "adapters' cards record, else 384)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to batch with (default 5)")
    p.add_argument("--max-texts", type=int, default=64, help="inputs per request (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help=f"largest request body (default {DEFAULT_MAX_BODY})")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="POST /v1/adapters may load adapters only from below DIR (default: the "
                        "run directory served; none when only adapter directories are given)")
    p.add_argument("--max-loaded", type=int, metavar="N",
                   help="keep at most N adapters loaded (backend ours); the others are "
                        "registered and read from disk on demand, least recently used out "
                        "(default: no limit)")
    p.add_argument("--ray-replicas", type=int, metavar="K",
                   help="serve K replicas on Ray Serve behind one ingress, requests for an "
                        "adapter routed to replicas that hold it (needs pip install "
                        "'loralens[serve]'; $RAY_ADDRESS joins a running cluster)")
    p.add_argument("--ray-max-ongoing", type=int, metavar="N",
                   help="with --ray-replicas: requests a replica takes at once (Ray's "
                        "max_ongoing_requests; default: --max-batch, so that a replica can "
                        "fill a batch; Ray's own default, 5, caps its batches at 5 requests); "
                        "past it, Ray sends a request to another replica even when this one "
                        "holds its adapter")
    p.add_argument("--replicate", type=int, default=0,
                   help="load copies of the adapters until there are this many (load tests)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health, "
                        "KEY the first line of FILE (default: $LORALENS_API_KEY if set, else "
                        "no authentication); never pass a key as an argument: ps shows those")
    p.add_argument("--public-metrics", action="store_true",
                   help="GET /metrics answers without the API key (for a scraper without one)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def add_loadtest_arguments(p) -> None:
    def ints(s):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {s!r}") from None
        return v

    p.add_argument("sources", nargs="*", metavar="RUN_DIR|ADAPTER_DIR|NAME=DIR",
                   help="what the servers load (as for loralens serve); none with --synthetic")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="instead of sources: N generated rank-8 q/v adapters of the default "
                        "model (random factors at trained scale, each its own head; in a "
                        "temporary directory)")
    p.add_argument("--traffic", choices=("uniform", "zipf"),
                   help="draw each request's adapter independently, uniform or Zipf (default: "
                        "request i to adapter i mod adapters)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument("--task", help="task whose adapters and validation rows are used (default: "
                                  "the task with the most adapters; sst2 with --synthetic)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated backends (default {','.join(BACKENDS)}; ours with "
                        "--synthetic)")
    p.add_argument("--clients", type=ints, default=list(DEFAULT_CLIENTS),
                   help="concurrent clients per cell (default 1,8,32)")
    p.add_argument("--adapters", type=ints, default=None,
                   help="adapters the requests are spread over (default 1,4,16; 1,N with "
                        "--synthetic N)")
    p.add_argument("--requests", type=int, default=96, help="answered requests per cell (96)")
    p.add_argument("--seconds", type=float, help="also stop a cell after this many seconds")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help=f"runs per cell, the servers interleaved (default {DEFAULT_REPEATS}; "
                        "crossovers need intervals, hence at least 2)")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed requests per cell (at least one per client)")
    p.add_argument("--out", help="output directory (default RUN_DIR/loadtest, else ./loadtest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result")
    p.add_argument("--glue-dir", help="GLUE root (default: the run's, else $LORALENS_GLUE_DIR)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching window")
    p.add_argument("--max-batch", type=int, default=32, help="server rows per batch")
    p.add_argument("--threads", type=int, help="server torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
