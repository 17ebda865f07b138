"""The ``fedseal report`` subcommand."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``report DIR --out OUTDIR`` on the ``fedseal`` command's subparsers."""
    report = commands.add_parser("report", help="write an offline HTML report (index.html and PNG figures) of a run or multirun folder")
    report.add_argument("source", metavar="DIR", help="a run folder or a multirun folder; searched recursively for runs")
    report.add_argument("--out", required=True, metavar="OUTDIR", help="folder for index.html and the figures (created if missing)")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    """Build the report; exit 1 with the reason when the folder contains no run."""
    from reporting import build_report

    try:
        index = build_report(Path(args.source), Path(args.out))
    except FileNotFoundError as error:
        logger.error("%s", error)
        return 1
    logger.info("Open %s in a browser; the folder is self-contained and can be shared as is.", index.resolve())
    return 0
