"""The one root of the errors a user fixes by changing an option, a config or a checkpoint.

The command line maps every `CdmOodError` to one line on stderr and exit code 2 (usage error or unusable
checkpoint), in one place (`cdm_ood.cli.main`); exit 1 stays reserved for the gate's "OOD found" decision.
Per-file input problems are not among them: they are `cdm_ood.data.errors.DataError`s, reported per file.
"""

from __future__ import annotations


class CdmOodError(Exception):
    """Base of the errors that make a command unusable as asked (exit 2)."""


class UsageError(CdmOodError, ValueError):
    """An option or argument that cannot work: a non-finite threshold, an output that cannot be written, a report
    that another run is writing."""


class MissingExtraError(CdmOodError, ImportError):
    """An optional dependency that is not installed; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'cdm-ood[{extra}]'")
