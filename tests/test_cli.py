import socket
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner
from processes import cdm

import cdm_ood
from cdm_ood.cli import main
from cdm_ood.cli.common import ExitCode

SCRIPT = Path(sys.executable).with_name("cdm-ood")


def all_commands(group: click.Group, prefix=()):
    yield prefix
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_console_script_prints_version():
    out = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"cdm-ood, version {cdm_ood.__version__}"


def test_every_command_has_help():
    runner = CliRunner()
    for path in all_commands(main):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_cli_is_packaged_inside_cdm_ood_only(tmp_path):
    probe = "import importlib.util as u; print(u.find_spec('cli') is None, u.find_spec('cdm_ood.cli') is not None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_module_entry_point_for_torchrun(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cdm_ood.cli", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "Usage:" in out.stdout


def test_cli_start_up_does_not_import_torch(tmp_path):
    probe = "import sys, cdm_ood.cli; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def leaf_commands():
    return [(path, main.commands[path[0]]) for path in all_commands(main) if path]


def test_every_option_is_documented_and_paths_follow_one_convention():
    """Help on every option; a list of input paths is positional; `--out` is one file, `--out-dir` a folder."""
    for path, command in leaf_commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, (path, param.opts)
            if isinstance(param, click.Argument) and param.nargs == -1:
                assert isinstance(param.type, click.Path), (path, param.name)
        options = {opt: param for param in command.params for opt in param.opts}
        assert not {"--data", "--id", "--input", "--inputs"} & set(options), path
        if "--out" in options:
            assert options["--out"].type.dir_okay is False, path
        if "--out-dir" in options:
            assert options["--out-dir"].type.file_okay is False, path


def test_tracking_options_are_the_same_on_every_command():
    tracked = {}
    for path, command in leaf_commands():
        options = {opt: param for param in command.params for opt in param.opts}
        if "--mlflow" in options:
            switch = options["--mlflow"]
            tracked[path] = (
                tuple(switch.secondary_opts),
                switch.default,
                switch.envvar,
                options["--tracking-uri"].help,
            )
    assert set(tracked) >= {("train",), ("calibrate",), ("score",), ("evaluate",)}
    assert len(set(tracked.values())) == 1 and next(iter(tracked.values()))[:3] == (("--no-mlflow",), True,
                                                                                   "CDM_OOD_MLFLOW")  # fmt: skip


def test_config_option_names_the_bundled_configs(tmp_path):
    from cdm_ood.configs import bundled_names

    assert {"mnist-cpu", "phantoms-ct"} <= set(bundled_names())
    assert all(name in CliRunner().invoke(main, ["train", "--help"]).output.replace("\n", " ") for name in
               ("mnist-cpu", "phantoms-ct"))  # fmt: skip
    result = CliRunner().invoke(main, ["train", "--config", "phantom-ct", "--dry-run"])
    assert result.exit_code == 2 and "no bundled config of that name" in result.output
    assert "phantoms-ct" in result.output


def test_every_command_that_runs_a_model_takes_the_same_device_option():
    devices = {}
    for path, command in leaf_commands():
        options = {opt: param for param in command.params for opt in param.opts}
        if "--checkpoint" in options:
            devices[path] = (options["--device"].default, options["--device"].help, options["--device"].callback)
    assert len(devices) >= 7 and len(set(devices.values())) == 1 and next(iter(devices.values()))[0] == "auto"


def test_a_process_forked_warm_runs_a_command_as_a_fresh_interpreter_does(tmp_path):
    """`processes.cdm` forks most commands from a server that has imported torch and MONAI; what a command prints
    and its exit status are those of `python -m cdm_ood.cli` in a fresh interpreter, in the same folder."""
    (tmp_path / "scans").mkdir()
    for args in (("score", "scans", "--checkpoint", "none.pt"), ("score", "missing"), ("--version",)):
        warm, fresh = (cdm(*args, cwd=tmp_path, fresh=f) for f in (False, True))
        assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr), args


def user_mistakes(checkpoint: Path, scans: Path, tmp: Path) -> dict[str, list[object]]:
    """One mistake a user can make per command: each must end in exit 2 and one `error:` line."""
    (tmp / "empty").mkdir()
    (tmp / "bad.pt").write_text("not a checkpoint")
    copy = tmp / "model.pt"  # calibrate must not touch the shared checkpoint, even when it fails
    copy.write_bytes(checkpoint.read_bytes())
    scan, empty = scans / "clean.nii.gz", tmp / "empty"
    return {
        "make-phantoms": ["--out-dir", tmp / "p", "--n", 1, "--format", "png"],
        "train": ["--config", "phantoms-ct", "--out-dir", tmp / "run", "--set", f"data.root={empty}", "--set",
                  "data.phantoms=null", "--set", "tracking.enabled=false"],
        "calibrate": [empty, "--checkpoint", copy],
        "score": [scan, "--checkpoint", checkpoint, "--threshold", "nan", "--out", tmp / "r.csv"],
        "evaluate": [scan, "--checkpoint", checkpoint, "--ood", f"x={empty}", "--out-dir", tmp / "ev", "--no-mlflow"],
        "rank-restorations": [scan, "--checkpoint", checkpoint, "--criterion", "nope"],
        "sample": ["--checkpoint", checkpoint, "--steps", 0, "--out", tmp / "s.png"],
        "denoise": [scan, "--checkpoint", checkpoint, "--sigma", -1, "--out-dir", tmp / "dn"],
        "log-model": ["--checkpoint", tmp / "bad.pt", "--tracking-uri", f"sqlite:///{tmp / 'm.db'}"],
        "serve": [tmp / "bad.pt"],
        "listen": ["--checkpoint", checkpoint, "--spool", tmp / "spool", "--forward", "PACS-without-an-address"],
    }  # fmt: skip


def test_every_command_answers_a_users_mistake_with_exit_2_and_one_error_line(checkpoint, scans, tmp_path):
    """The exit codes of every command (README.md, "Usage"): 2 for what the user can fix, on one line, no traceback."""
    mistakes = user_mistakes(checkpoint, scans, tmp_path)
    assert set(mistakes) == set(main.commands), "a new command needs its mistake here"
    for command, args in mistakes.items():
        out = CliRunner().invoke(main, [command, *map(str, args)])
        errors = [line for line in out.stderr.splitlines() if line.lower().startswith("error")]
        assert out.exit_code == 2 and len(errors) == 1 and "Traceback" not in out.stderr, (command, out.stderr)


def finished_runs(checkpoint: Path, scans: Path, tmp: Path) -> dict[str, list[object]]:
    """One run per command that finishes (exit 0 or 1) on the shared fixtures, and writes files as it goes."""
    copy = tmp / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    scan, series = scans / "clean.nii.gz", sorted((scans / "study" / "series1").iterdir())
    return {
        "make-phantoms": ["--out-dir", tmp / "p", "--n", 1, "--format", "nifti"],
        "train": ["--config", "phantoms-ct", "--out-dir", tmp / "run", "--set", f"data.root={scans}", "--set",
                  "data.phantoms=null", "--set", "tracking.enabled=false", "--set", "train.steps=1"],
        "calibrate": [scans, "--checkpoint", copy],
        "score": [scan, "--checkpoint", checkpoint, "--out", tmp / "r.csv"],
        "evaluate": [scan, "--checkpoint", checkpoint, "--ood", f"x={scan}", "--out-dir", tmp / "ev", "--no-mlflow"],
        "rank-restorations": [*series[:2], "--checkpoint", checkpoint, "--observed", series[0], "--sigma", 0.1,
                              "--out", tmp / "k.csv"],
        "sample": ["--checkpoint", checkpoint, "--steps", 2, "--out", tmp / "s.png"],
        "denoise": [scan, "--checkpoint", checkpoint, "--sigma", 0.1, "--out-dir", tmp / "dn"],
        "log-model": ["--checkpoint", checkpoint, "--tracking-uri", f"sqlite:///{tmp / 'm.db'}"],
        "serve": [logged_model(checkpoint, tmp)],
        "listen": ["--checkpoint", checkpoint, "--spool", tmp / "spool", "--host", "127.0.0.1"],
    }  # fmt: skip


def logged_model(checkpoint: Path, tmp: Path) -> Path:
    """The folder of the MLflow model `cdm-ood log-model` logs from `checkpoint`."""
    out = cdm("log-model", "--checkpoint", checkpoint, "--tracking-uri", f"sqlite:///{tmp / 'served.db'}", cwd=tmp)
    assert out.returncode == 0, out.stderr[-2000:]
    (model,) = (tmp / "mlruns").glob("*/models/*/artifacts/MLmodel")
    return model.parent


def no_file_writes() -> None:
    """In the child: every write to a file fails (EFBIG), as on a full disk; Python ignores SIGXFSZ."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_every_command_that_cannot_finish_exits_3_with_one_error_line(checkpoint, scans, tmp_path):
    """The exit codes of every command (`cli.common.ExitCode`): a run that cannot finish (here: no file can be
    written, as on a full disk; `serve` and `listen`: their port is taken) is `FAILURE` (3), one `error:` line,
    never a decision (0 or 1) or a usage error (2)."""
    runs = finished_runs(checkpoint, scans, tmp_path)
    assert set(runs) == set(main.commands), "a new command needs its run here"
    wrong = {}
    taken = socket.create_server(("127.0.0.1", 0))
    for server in ("serve", "listen"):  # servers run until stopped: they fail to start instead
        runs[server] += ["--port", taken.getsockname()[1]]
    for command, args in runs.items():
        limit = {} if command in ("serve", "listen") else {"preexec_fn": no_file_writes}
        out = cdm(command, *args, cwd=tmp_path, timeout=300, **limit)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
        # serve names the failure; a full disk reaches the others through their libraries' words (EFBIG, SQLite's
        # "disk is full", torch's writer), so only the code and the single line are checked there
        named = command not in ("serve", "listen") or "could not start" in "".join(errors)
        if out.returncode != ExitCode.FAILURE or len(errors) != 1 or not named:
            wrong[command] = (out.returncode, out.stderr[-1500:])
    taken.close()
    assert not wrong, wrong
