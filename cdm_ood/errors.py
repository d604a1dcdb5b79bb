"""The one root of the errors a user can cause: `CdmOodError`.

Its branches: `UsageError` (an option, argument or config that cannot work; `cdm_ood.model.sections.ConfigError`),
`cdm_ood.model.checkpoint.CheckpointError` (an unsafe, broken or implausible checkpoint), `MissingExtraError`, the
per-file input errors `cdm_ood.data.errors.DataError` and the per-case `cdm_ood.jobs.ranking_cases.CaseError`. Batch
jobs report a file's or a case's error in its row and go on; one that reaches the command line (a command that cannot go
on without that input) is, like every other `CdmOodError`, one line on stderr and exit code 2, mapped in one place
(`cdm_ood.cli.main`; the codes are `cdm_ood.cli.common.ExitCode`).
"""

from __future__ import annotations


class CdmOodError(Exception):
    """Base of every error a user can cause and fix (exit 2 where one stops a command)."""


class UsageError(CdmOodError, ValueError):
    """An option or argument that cannot work: a non-finite threshold, an output that cannot be written, a report
    that another run is writing."""


class MissingExtraError(CdmOodError, ImportError):
    """An optional dependency that is not installed; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'cdm-ood[{extra}]'")
