"""``fedseal``: operator utilities around training runs.

    fedseal data check [--root DIR] [--download]
    fedseal summary RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _data_check(args: argparse.Namespace) -> int:
    """Verify every registered dataset file under the data root; exit 1 if any is missing or corrupt."""
    from scenarios.datasets import FILES, ChecksumError, DatasetError, ensure_file, resolve_data_root

    root = resolve_data_root(args.root)
    print(f"data root: {root}")
    failed = 0
    for key in sorted(FILES):
        try:
            path = ensure_file(key, root, allow_download=args.download)
            print(f"  ok       {key:32s} {path}")
        except DatasetError as error:
            failed += 1
            first_line = str(error).splitlines()[0]
            status = "invalid" if isinstance(error, ChecksumError) else "missing"
            print(f"  {status:8s} {key:32s} {first_line}")
    if failed:
        print(f"{failed} file(s) not usable. The fraud scenario needs only one of fraud/full and fraud/sub50k.")
    return 1 if failed else 0


def _summary(args: argparse.Namespace) -> int:
    """Print the final table of a finished run directory."""
    from server.summary import print_table

    path = Path(args.run_dir) / "summary.json"
    if not path.exists():
        print(f"error: {path} not found; pass a run directory written by fedseal-train.", file=sys.stderr)
        return 2
    print_table(json.loads(path.read_text(encoding="utf-8")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="fedseal", description="fedseal operator utilities.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="dataset files")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="verify the SHA-256 of every dataset file")
    check.add_argument("--root", help="data root (default: $FEDSEAL_DATA_DIR, then ~/.cache/fedseal/datasets)")
    check.add_argument("--download", action="store_true", help="download missing files from their canonical URL")
    check.set_defaults(handler=_data_check)

    summary = commands.add_parser("summary", help="print the final table of a run directory")
    summary.add_argument("run_dir", help="a folder containing summary.json")
    summary.set_defaults(handler=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
