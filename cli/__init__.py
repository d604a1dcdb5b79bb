"""The `cdm-ood` command line (installed as the package `cdm_ood.cli`).

Each command lives in its own module and imports heavy libraries inside the command, so that `--help`
stays fast.
"""

from __future__ import annotations

import click

from cdm_ood import __version__
from cdm_ood.errors import CdmOodError

from .common import ExitCode, report_failure


class _Commands(click.Group):
    """The command group; maps every `CdmOodError` (config, checkpoint, calibration, options) to one line on
    stderr and exit 2, and every other failure (Ctrl-C, SIGTERM of `score`, a full disk, a crashed reader process)
    to one line and exit 3, so that exit 1 always means the gate's decision. $CDM_OOD_TRACEBACK=1 also prints the
    traceback of a failure."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CdmOodError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(ExitCode.USAGE)
        except (click.ClickException, click.exceptions.Exit):
            raise
        except (Exception, KeyboardInterrupt) as err:
            ctx.exit(report_failure(err))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cdm-ood")
def main() -> None:
    """Out-of-distribution detection for medical images with Classification Diffusion Models."""


from .listen import listen_command  # noqa: E402
from .phantoms import make_phantoms_command  # noqa: E402
from .rank import rank_restorations_command  # noqa: E402
from .sample import denoise_command, sample_command  # noqa: E402
from .score import calibrate_command, evaluate_command, score_command  # noqa: E402
from .serve import log_model_command, serve_command  # noqa: E402
from .train import train_command  # noqa: E402

for command in (make_phantoms_command, train_command, calibrate_command, score_command, evaluate_command,
                rank_restorations_command, sample_command, denoise_command, log_model_command,
                serve_command, listen_command):  # fmt: skip
    main.add_command(command)

__all__ = ["main"]
