"""QA gate over a folder of incoming studies: score every new scan, write a dated report, exit non-zero on OOD.

Run it from cron or a PACS hook (e.g. a storescp `--exec-on-eostudy` script):

    python pipelines/qa_gate.py --checkpoint runs/ct/model.pt --incoming /data/incoming --reports /data/qa

Exit 0: every study in distribution; 1: a study is OOD, flagged or unreadable (see the report); 2: unusable
checkpoint or arguments; 3: the run could not finish (Ctrl-C, SIGTERM, a full disk, ...), one `error:` line.
Each run writes `<reports>/qa-<UTC time>.csv` atomically; inputs are only read. Studies already judged in an
earlier report of the same folder are skipped, so the job can run every minute; an empty incoming folder is
"nothing new" (exit 0), where `cdm-ood score` on an empty folder fails. Files the ignore list leaves out are
`ignored` rows of each report that scores something.

For DICOM, the package's node does this job continuously and knows when a series has finished arriving:
`cdm-ood listen --watch /data/incoming` (a file share) or a storage SCP (docs/node.md). This script stays for
mixed folders (NIfTI, NRRD, PNG) gated by cron.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path

from cdm_ood.cli.common import ExitCode, exit_code, report_failure, stop_on_signals
from cdm_ood.errors import CdmOodError
from cdm_ood.model.checkpoint import load_model
from cdm_ood.ood.gate import run_gate
from cdm_ood.ood.report import AGGREGATES, IGNORED, IN
from cdm_ood.ood.scoring import ImageScorer
from cdm_ood.ood.thresholds import Thresholds
from cdm_ood.utils.io import spreadsheet_value


def already_reported(reports: Path) -> set[str]:
    """Paths of files judged in earlier reports (files the ignore list left out are reported again by each run)."""
    seen: set[str] = set()
    for report in reports.glob("qa-*.csv"):
        with open(report, newline="") as f:
            seen.update(spreadsheet_value(row["path"]) for row in csv.DictReader(f)
                        if row["level"] in ("slice", "file") and row["verdict"] != IGNORED)  # fmt: skip
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--incoming", required=True, type=Path, help="Folder of new studies (read-only).")
    parser.add_argument("--reports", required=True, type=Path, help="Folder for the dated reports.")
    parser.add_argument("--threshold", default="auto", help="auto, fpr:<x> or a number.")
    parser.add_argument("--per-volume", default="mean", choices=tuple(AGGREGATES))
    args = parser.parse_args(argv)
    try:
        scorer = ImageScorer(load_model(args.checkpoint))
        thresholds = Thresholds.resolve(scorer, args.threshold)
    except CdmOodError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    args.reports.mkdir(parents=True, exist_ok=True)
    seen = already_reported(args.reports)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = run_gate(scorer, thresholds, [args.incoming], args.reports / f"qa-{stamp}.csv", args.per_volume,
                      exclude=lambda path: str(path) in seen, nothing_new_ok=True)  # fmt: skip
    if result is None:
        print("nothing new")
        return ExitCode.PASSED
    for row in result.rows:
        if row["level"] in ("volume", "file") and row["verdict"] not in (IN, IGNORED):
            print(f"{row['verdict'].upper():<10} {row['path']}  {row['reason']}")
    print(f"report: {result.report}  passed: {result.passed}")
    return exit_code(not result.passed)


def run(argv: list[str] | None = None) -> int:
    """`main` with the exit codes of `cdm-ood score`: a run that cannot finish is one `error:` line and exit 3."""
    try:
        return main(argv)
    except (Exception, KeyboardInterrupt) as err:
        return report_failure(err)


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(run())
