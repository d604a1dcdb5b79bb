import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

import cdm_ood
from cdm_ood.cli import main

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
