"""``python -m benchmarks``: run the scenarios, write the JSON, the page and the plots.

    python -m benchmarks                        # everything, 3 repetitions (~25 min on 2 cores)
    python -m benchmarks --quick                # a smoke run of about a minute, for CI
    python -m benchmarks --only S1,S3 --peers poolkit,stdlib-forkserver --repeat 5

A full run writes benchmarks/results/latest.json, docs/benchmarks.md,
docs/img/bench_*.png and the figures of docs/choosing.md (all committed). A ``--quick`` run writes only
benchmarks/results/raw/quick.json (ignored by git) unless told otherwise,
so that a smoke run never overwrites the published figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .harness import ROOT, run_all
from .peers import DEFAULT_PEERS, PEERS, split_names
from .scenarios import SCENARIOS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Scenarios S1-S8 for poolkit and its peers, each run in a fresh interpreter.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer items, 1 repetition, 8 s cap: a smoke run of about a minute")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--cap", type=float,
                        help="wall-clock cap per measurement in seconds (default 60; 8 with --quick)")
    parser.add_argument("--only", help="scenarios, e.g. S1,S3 (default: all)")
    parser.add_argument("--peers", help=f"peers, e.g. poolkit,stdlib-fork (default: {','.join(DEFAULT_PEERS)}; "
                        f"also known: {','.join(p for p in PEERS if p not in DEFAULT_PEERS)})")
    parser.add_argument("--retry-hangs", action="store_true",
                        help="run a peer that hung again in later repetitions")
    parser.add_argument("--json", type=Path, help="where the raw figures go")
    parser.add_argument("--markdown", type=Path, help="where the page goes (default docs/benchmarks.md for a full run)")
    parser.add_argument("--img-dir", type=Path, help="where the plots go (default docs/img)")
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.cap is None:
        args.cap = 8.0 if args.quick else 60.0
    if args.repeat < 1 or args.cap <= 1:
        parser.error("--repeat must be at least 1 and --cap more than 1 second")
    try:
        args.scenario_list = split_names(args.only, SCENARIOS, "scenario") if args.only else list(SCENARIOS)
        args.peer_list = split_names(args.peers, PEERS, "peer") if args.peers else list(DEFAULT_PEERS)
    except ValueError as exc:
        parser.error(str(exc))
    results = ROOT / "benchmarks" / "results"
    if args.json is None:
        args.json = results / "raw" / "quick.json" if args.quick else results / "latest.json"
    if args.no_docs or (args.quick and args.markdown is None):
        args.markdown = None
    elif args.markdown is None:
        args.markdown = ROOT / "docs" / "benchmarks.md"
    if args.img_dir is None:
        args.img_dir = ROOT / "docs" / "img"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = run_all(
        args.peer_list,
        args.scenario_list,
        profile="quick" if args.quick else "full",
        repeat=args.repeat,
        cap=args.cap,
        retry_hangs=args.retry_hangs,
    )
    try:
        data["meta"]["json"] = str(args.json.resolve().relative_to(ROOT))
    except ValueError:
        data["meta"]["json"] = str(args.json)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1, default=repr) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown is not None:
        from .report import CHOOSING, DOC, write_docs

        # The figures of choosing.md follow the published page, never a page written elsewhere.
        choosing = CHOOSING if args.markdown.resolve() == DOC.resolve() else None
        for path in write_docs(data, args.markdown, args.img_dir, choosing):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
