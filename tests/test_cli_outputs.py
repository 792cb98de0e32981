"""Where commands write and what they print (issue 21): `--out` is checked (writable, names
within the file system's limits) before any work; small edges of input and output."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robust_transfer.cli import study as study_cli
from robust_transfer.cli.common import check_output_dir, print_table
from robust_transfer.data import load_task, shots_per_class
from robust_transfer.errors import UserError
from robust_transfer.models.checkpoint import WEIGHTS

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0}], "targets": ["synthetic-5to9"], "images_per_class": [1],
    "unfrozen_blocks": [0], "epochs": 1, "seeds": [0],
}
BAD_OUTS = {
    "not writable": ("/proc/robust-transfer-x", "not writable"),
    "300-byte name": ("{tmp}/" + "a" * 300, "name of 300 bytes"),
    "5,000-byte path": ("{tmp}/" + "/".join(["b" * 200] * 25), "bytes long"),
}


@pytest.fixture
def no_work(monkeypatch):
    """Any training, fine-tuning, grid, attack or report fails the test: the --out check
    must come first."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("work started before --out was checked")

    from robust_transfer.cli import attack as attack_cli
    from robust_transfer.cli import studies as studies_cli

    for name in ("train_source", "finetune_from_checkpoint", "make_report"):
        monkeypatch.setattr(study_cli, name, forbidden)
    monkeypatch.setattr(studies_cli, "run_study", forbidden)  # every study command's runs
    monkeypatch.setattr(attack_cli, "load_checkpoint", forbidden)


def _commands(tmp: Path, source: Path, out: str) -> dict[str, list]:
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return {
        "train": ["train", "--task", "synthetic-0to4", "--out", out],
        "finetune": ["finetune", source, "--task", "synthetic-5to9", "--out", out],
        "evaluate": ["evaluate", source, "--out", out],
        "grid": ["grid", spec, "--out", out, "--workers", "1"],
        "demo": ["demo", "--out", out, "--workers", "1"],
        "explain units": ["explain", "units", source, "--out", out],
    }


@pytest.mark.parametrize("bad", BAD_OUTS, ids=list(BAD_OUTS))
@pytest.mark.parametrize("command", ["train", "finetune", "evaluate", "grid", "demo",
                                     "explain units"])
def test_a_bad_out_is_one_line_before_any_work(cli, tmp_path, source_dir, no_work, command,
                                               bad):
    out, needle = BAD_OUTS[bad]
    out = out.format(tmp=tmp_path)
    args = _commands(tmp_path, source_dir, out)[command]
    before = sorted(tmp_path.iterdir())
    code, stdout, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --out "), err
    assert needle in lines[0] and len(lines[0]) < 400  # a long path is shortened
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_the_writability_probe_leaves_nothing(tmp_path):
    check_output_dir(tmp_path, "--out")
    check_output_dir(tmp_path / "new" / "deeper", "--out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="not writable"):
        check_output_dir(Path("/proc/self/new"), "--out")


def test_an_imported_checkpoint_without_a_task_asks_for_task(cli, tmp_path, source_dir):
    """`import` records `task: ""`; evaluate then needs --task, and says so."""
    from safetensors.torch import load_file

    state = tmp_path / "state.pt"
    torch.save(load_file(source_dir / WEIGHTS), state)
    ck = tmp_path / "imported"
    code, _, err = cli("import", state, "--format", "state-dict", "--arch", "cnn-small",
                       "--out", ck, "--num-classes", "5")
    assert code == 0, err
    code, _, err = cli("evaluate", ck, "--n", "8", "--out", tmp_path / "ev")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "records no task" in lines[0] and "--task" in lines[0] and "''" not in lines[0]
    code, _, err = cli("evaluate", ck, "--task", "synthetic-0to4", "--n", "8", "--gallery", "0",
                       "--steps", "1", "--out", tmp_path / "ev")
    assert code == 0, err


def test_too_many_shots_names_the_smallest_class():
    """digits-5to9: class 0 has 127 training images, class 3 only 122: the limit is 122."""
    labels = load_task("digits-5to9").train.y
    counts = torch.bincount(labels)
    smallest = int(counts.argmin())
    assert smallest != 0 and counts[0] > counts[smallest]
    with pytest.raises(UserError, match=rf"class {smallest} has \({int(counts.min())}, the "
                       rf"smallest class\); use at most {int(counts.min())}"):
        shots_per_class(labels, 100000, seed=0)


def test_task_help_shows_the_imagefolder_syntax(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, stdout, _ = cli("finetune", "--help")
    assert code == 0 and "imagefolder:<dir>[@<size>]" in stdout


def test_tables_off_a_terminal_never_split_a_number(capsys):
    """Piped output has no width to fit: twelve wide columns stay one line per row."""
    row = {f"test accuracy at epoch {i}": 0.0952 + i / 100 for i in range(12)}
    print_table("wide", [row, {k: 12345.678 for k in row}])
    text = capsys.readouterr().out
    for value in [*row.values(), 12345.678]:
        assert f"{value:.4f}" in text
    lines = [line for line in text.splitlines() if re.search(r"\d\.\d{4}", line)]
    assert len(lines) == 2 and all(line.count("│") == 13 for line in lines)
    assert all(f"epoch {i}" in text for i in range(12))  # headers whole too


def test_ctrl_c_while_importing_is_one_line_exit_130(tmp_path):
    """SIGINT while the CLI imports torch (sent from an import hook, so it always lands
    there): one line, exit 130, no traceback."""
    script = (
        "import importlib.abc, os, signal, sys\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from robust_transfer.cli import main\n"
        "main(['--help'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr


def test_importing_the_cli_leaves_the_sigint_handler_as_it_was():
    import signal

    import robust_transfer.cli  # noqa: F401  (already imported: the handler is restored)

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_watermark_key_is_written_0600_whatever_the_umask(tmp_path):
    from robust_transfer.backdoors.watermark import KEY_META, KEY_WEIGHTS, make_key, save_key

    old = os.umask(0o022)
    try:
        save_key(make_key(5, (1, 8, 8), n=4), tmp_path / "key")
    finally:
        os.umask(old)
    for name in (KEY_WEIGHTS, KEY_META):
        assert stat.S_IMODE((tmp_path / "key" / name).stat().st_mode) == 0o600


def test_tests_keep_only_failed_tmp_paths(pytestconfig):
    """`make test` used to leave every test's tmp_path (hundreds of MB) in /tmp."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
