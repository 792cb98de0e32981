"""The certify-transfer study, tiny, through the CLI: a grid with a `certify:` section certifies
every fine-tuned model and every source; the report draws and summarises it."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from robust_transfer.certify import certify_dataset
from robust_transfer.cli import certify as certify_cli
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.transfer import results as results_store
from robust_transfer.transfer.certify_eval import PREFIX, CertifySpec
from robust_transfer.transfer.certify_study import certify_sources, certify_spec_path
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.run import source_method
from robust_transfer.transfer.spec import expand, load_spec, parse_spec

TINY = {
    "name": "certify-tiny",
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 2},
    "sources": [{"eps": 0.0}, {"method": "gaussian", "sigma": 0.25}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [2],
    "unfrozen_blocks": [0, "all"],
    "noise_sigma": [0, 0.25],
    "epochs": 2,  # the certificate is on the last epoch's row, and must survive storage
    "seeds": [0, 1],
    "certify": {"sigma": 0.25, "n0": 10, "n": 40, "max_images": 12, "radii": [0, 0.1, 0.2]},
}


def test_certify_transfer_cli_tiny(cli, tmp_path, monkeypatch):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    locked = []  # certifying the sources writes into --out: under its writer lock, as the grid

    def certify_sources_locked(spec, directory, device):
        locked.append(results_store._held.get(directory.resolve(), 0) > 0)
        return certify_sources(spec, directory, device)

    monkeypatch.setattr(certify_cli, "certify_sources", certify_sources_locked)
    # the default --device auto: certifying the sources once crashed on the name 'auto'
    code, stdout, err = cli("certify-transfer", spec_file, "--out", out, "--workers", "1")
    assert code == 0, err
    df = read_results(out)
    final = df[df.epoch == df.epochs]
    assert len(final) == 2 * 2 * 2 * 2 and len(df) == 2 * len(final)
    cols = [f"{PREFIX}0", f"{PREFIX}0.1", f"{PREFIX}0.2"]
    assert final[cols + ["acr", "abstain_rate", "noise_accuracy"]].notna().all().all()
    assert (final[cols].diff(axis=1).iloc[:, 1:] <= 0).all().all()  # falls with the radius
    assert (final[cols[0]] <= 1 - final.abstain_rate + 1e-12).all()
    assert df[df.epoch < df.epochs].get("acr", pd.Series(dtype=float)).isna().all()
    trained = final[final.unfrozen_blocks == "all"]
    assert (trained.noise_accuracy > 0.3).all() and (trained.acr > 0).all()  # all classes
    # the sources' certificates equal an independent certification of their checkpoints
    sources = pd.read_csv(out / "report" / "source_certify.csv")
    assert len(sources) == 2
    for directory in (out / "sources").iterdir():
        model, card = load_checkpoint(directory)
        test = load_task("synthetic-0to4").test
        pick = slice(0, 12 * (len(test.y) // 12), len(test.y) // 12)  # every k-th image
        res = certify_dataset(model, test.x[pick], test.y[pick], [0.25], 5, 10, 40, 0.001,
                              [0, 0.1, 0.2], attack=None)
        row = sources[sources.source_method == source_method(card)]
        assert len(row) == 1 and row[cols].to_numpy().ravel().tolist() == pytest.approx(
            res.summary.certified_accuracy.tolist())
    summary = (out / "report" / "certify_summary.md").read_text()
    assert "GAUSSIAN σ=0.25" in summary and "Δ ACR vs natural" in summary
    assert "all blocks, Gaussian noise σ=0.25 in fine-tuning" in summary
    assert (out / "report" / "figC1_certified_accuracy.png").stat().st_size > 0
    assert "mean ACR at σ=0.25" in stdout.replace("\n", " ")
    assert locked == [True]
    # `report` on the study's folder recognises it: the certification report too
    again = tmp_path / "again"
    code, _, err = cli("report", out, "--out", again)
    assert code == 0, err
    assert (again / "certify_summary.md").read_text() == summary
    assert (again / "figC1_certified_accuracy.png").stat().st_size > 0


def test_certify_section_parses_validates_and_keeps_old_ids():
    plain = {k: v for k, v in TINY.items() if k != "certify"}
    with_cert = parse_spec(TINY)
    without = parse_spec(plain)
    assert with_cert.certify == CertifySpec(0.25, 10, 40, 0.001, 12, (0.0, 0.1, 0.2))
    ids = {r.run_id for r in expand(without)}
    assert ids.isdisjoint({r.run_id for r in expand(with_cert)})  # certified runs differ
    assert all(r.certify is None for r in expand(without))
    for bad, message in (({"sigma": 0}, "certify.sigma must be"), ({"n0": 50, "n": 10},
                         "must not exceed"), ({"alpha": 2}, "alpha must be"),
                         ({"max_images": 0}, "max_images"), ({"bogus": 1}, "unknown key"),
                         ({"radii": [-1]}, "radii must be")):
        with pytest.raises(UserError, match=message):
            parse_spec({**plain, "certify": bad})


def test_shipped_spec_loads():
    spec = load_spec(certify_spec_path())
    assert spec.certify is not None and spec.certify.sigma == 0.25
    assert {s.method for s in spec.sources} == {None, "gaussian", "smoothadv"}


def test_certify_transfer_needs_a_certify_section(cli, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "certify"}))
    out = tmp_path / "study"
    code, _, err = cli("certify-transfer", spec_file, "--out", out)
    assert code == 2 and "no certify: section" in err and not out.exists()


def test_certify_transfer_bad_device_writes_nothing(cli, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    code, _, err = cli("certify-transfer", spec_file, "--out", out, "--device", "gpu")
    assert code == 2 and err.startswith("error: unknown device 'gpu'") and not out.exists()
