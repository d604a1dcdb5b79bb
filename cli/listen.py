"""`cdm-ood listen`: the QA gate as a DICOM node (`cdm_ood.node`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .common import (
    checkpoint_option,
    device_option,
    mlflow_option,
    precision_option,
    setup_logging,
    stop_on_signals,
    tracking_uri_option,
)
from .score import _require_maps, _scorer, _threshold_source, batch_option, detector_option


@click.command("listen")
@checkpoint_option
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The node's folder: received instances, batches being gated, the outbox, the quarantine, what "
                   "was sent, and decisions.jsonl (docs/node.md).")  # fmt: skip
@click.option("--ae-title", default="CDMOOD", show_default=True, help="The node's AE title.")
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True, help="Port to listen on.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--allow", "allowed", multiple=True, metavar="AET",
              help="A calling AE title to accept (repeat it; others are refused). Default: any.")  # fmt: skip
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="TLS: the node's certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="TLS: its private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="TLS: accept only senders with a certificate this CA signed.")  # fmt: skip
@click.option("--receivers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Processes that receive C-STORE on the port (each stores into the spool; the node's own process "
                   "gates).")  # fmt: skip
@click.option("--quiet", "quiet_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds without a new instance after which a series is complete and gated.")  # fmt: skip
@click.option("--by-study", is_flag=True, help="Wait for the whole study to be quiet before gating its series.")
@click.option("--forward", "destination", metavar="AET@HOST:PORT",
              help="Where passed series go (C-STORE, with their SR); without it they wait in the outbox.")  # fmt: skip
@click.option("--forward-held", is_flag=True,
              help="Forward held series too, with their SR and map, for a person to decide (they stay in the "
                   "quarantine).")  # fmt: skip
@click.option("--watch", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder to take DICOM files from (a file share; repeat it): each file is copied into the spool "
                   "once it held still for a poll; the folder is only read.")  # fmt: skip
@click.option("--dicomweb", metavar="URL",
              help="A DICOMweb service root to poll (QIDO-RS) and fetch new series from (WADO-RS); each decided "
                   "series' SR (and a held one's map) goes back to it (STOW-RS). Needs cdm-ood[dicomweb].")  # fmt: skip
@click.option("--dicomweb-filter", "dicomweb_filters", multiple=True, metavar="KEY=VALUE",
              help="A QIDO-RS query key for the series to fetch, e.g. Modality=CT (repeat it).")  # fmt: skip
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between two polls of --watch folders and --dicomweb.")  # fmt: skip
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    help="'auto' (the checkpoint's calibrated threshold), 'fpr:<rate>' or a number, as for `score`.",
)
@detector_option
@click.option("--per-volume", default="mean", show_default=True, help="Aggregate of a volume's slice scores.")
@device_option
@precision_option(None, " [default: the precision of the checkpoint's calibration]")
@batch_option
@mlflow_option
@tracking_uri_option
def listen_command(
    checkpoint: Path, spool: Path, ae_title: str, port: int, host: str, allowed: tuple[str, ...],
    tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str], receivers: int, quiet_s: float,
    by_study: bool, destination: Optional[str], forward_held: bool, watch: tuple[Path, ...], dicomweb: Optional[str],
    dicomweb_filters: tuple[str, ...], poll_s: float, threshold: str, detector: Optional[str], per_volume: str,
    device: str, precision: Optional[str], batch_size: int, mlflow: bool, tracking_uri: Optional[str],
) -> None:  # fmt: skip
    """Receive DICOM (C-STORE; files dropped in --watch folders; series of a --dicomweb server), gate each series
    once it has been quiet for --quiet seconds with the rules of `cdm-ood score`, and forward it (--forward) when
    every volume of it passed, or hold it in the spool's quarantine with its report, SR and anomaly map. Every
    instance is on disk before its C-STORE is acknowledged; a node stopped at any moment (even killed) resumes from
    its spool. Runs until SIGTERM or Ctrl-C (exit 0)."""
    from cdm_ood.node.dicomweb import DicomWebSource
    from cdm_ood.node.forward import Destination
    from cdm_ood.node.node import Node, NodeSettings
    from cdm_ood.node.receive import Receivers, ScpSettings
    from cdm_ood.node.spool import Spool
    from cdm_ood.node.watch import FolderSource
    from cdm_ood.ood.report import aggregate

    from .common import Stopped

    setup_logging()
    stop_on_signals()
    aggregate(per_volume)
    target = Destination.parse(destination, ae_title) if destination else None
    scorer, thresholds = _scorer(checkpoint, detector, batch_size, threshold, device, precision)
    _require_maps(scorer, checkpoint)
    settings = NodeSettings(
        quiet_s, by_study, target, forward_held, per_volume, threshold_source=_threshold_source(threshold, scorer.fpr)
    )
    filters = dict(_key_value(f) for f in dicomweb_filters)
    spooled = Spool(spool)
    web = DicomWebSource(dicomweb, spooled, filters) if dicomweb else None
    sources = [*([FolderSource(watch, spooled)] if watch else []), *([web] if web else [])]
    node = Node(spooled, scorer, thresholds, settings, sources, web, poll_s)
    tracker = None
    if mlflow:
        from cdm_ood.integrations.tracking import NodeRun

        tracker = NodeRun({"checkpoint": str(checkpoint), "detector": scorer.name, "threshold": thresholds.score,
                           "ae_title": ae_title, "quiet_s": quiet_s, "forward": str(target), "dicomweb": dicomweb},
                          tracking_uri, scorer.model)  # fmt: skip
        spooled.listeners.append(tracker)
    node.recover()
    server = Receivers(spooled, ScpSettings(ae_title, port, host, allowed, tls_cert, tls_key, tls_ca), receivers)
    try:
        node.run(server.check)
    except Stopped as stop:
        click.echo(f"stopped ({stop}): the spool keeps what was not decided or sent", err=True)
    finally:
        server.shutdown()
        if tracker is not None:
            tracker.close(spooled.log_path)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE (a QIDO-RS query key, e.g. Modality=CT)",
                                 param_hint="--dicomweb-filter")  # fmt: skip
    return key.strip(), value.strip()
