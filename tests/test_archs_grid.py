"""Architecture as a grid variable: per-source arch, per-arch validation and pairing."""

import pytest

from robust_transfer.errors import UserError
from robust_transfer.report.study import make_report, paired_delta, prepare
from robust_transfer.transfer.grid import demo_spec_path, run_grid, spec_text
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.spec import expand, load_spec, parse_spec

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 2, "arch": "cnn-small"},
    "sources": [{"eps": 0.0}, {"eps": 0.5},
                {"eps": 0.0, "arch": "cnn-small-wide"}, {"eps": 0.5, "arch": "cnn-small-wide"}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [2],
    "unfrozen_blocks": [0],
    "epochs": 2,
    "seeds": [0],
}


def test_two_archs_expand_with_one_natural_source_each():
    spec = parse_spec({**SPEC, "sources": [*SPEC["sources"], {"eps": 0.0, "norm": "linf"},
                                           {"eps": 0, "norm": "linf", "arch": "cnn-small-wide"}]})
    runs = expand(spec)
    assert sorted((r.source.arch, r.source.eps) for r in runs) == [
        ("cnn-small", 0.0), ("cnn-small", 0.5), ("cnn-small-wide", 0.0), ("cnn-small-wide", 0.5)]
    assert len({r.source_id for r in runs}) == 4
    # An entry without `arch` is the spec's default arch: the same source, one natural.
    same = parse_spec({**SPEC, "sources": [{"eps": 0.0}, {"eps": 0.0, "arch": "cnn-small"}]})
    assert len(same.sources) == 1
    # Unset arch is not recorded, so specs that do not use the key keep their recorded text.
    assert "arch" not in spec_text(load_spec(demo_spec_path())).split("sources:")[1]


def test_unfrozen_blocks_are_checked_against_every_source_arch():
    wide_only = {**SPEC, "source": {**SPEC["source"], "arch": "cnn-small-wide"},
                 "sources": [{"eps": 0.0}], "unfrozen_blocks": [4]}
    assert parse_spec(wide_only).unfrozen_blocks == (4,)  # the wide net has 4 blocks
    with pytest.raises(UserError, match=r"unfrozen blocks 4 is more than arch 'cnn-small' "
                                        r"has \(3\)"):
        parse_spec({**SPEC, "unfrozen_blocks": [0, 4]})
    with pytest.raises(UserError, match="unknown arch 'vgg'"):
        parse_spec({**SPEC, "sources": [{"eps": 0.0, "arch": "vgg"}]})


def test_report_pairs_each_robust_source_with_the_natural_source_of_its_arch(tmp_path):
    table = run_grid(parse_spec(SPEC), tmp_path / "g")
    df = prepare(read_results(table))
    assert set(df.source_arch) == {"cnn-small", "cnn-small-wide"}
    final = df[df.epoch == df.epochs].copy()
    # Mark each natural source's accuracy, so a robust run paired across archs would show.
    marks = {"cnn-small": 0.125, "cnn-small-wide": 0.875}
    natural = final.source_eps == 0
    final.loc[natural, "test_accuracy"] = final.loc[natural, "source_arch"].map(marks)
    delta = paired_delta(final)
    assert sorted(delta.source_arch) == ["cnn-small", "cnn-small-wide"]
    for arch, mark in marks.items():
        row = delta[delta.source_arch == arch].iloc[0]
        assert row.delta == pytest.approx(row.test_accuracy - mark)
    report = make_report(table, tmp_path / "rep")
    names = sorted(p.name for p in report.figures)
    assert names == sorted(["fig1_accuracy_vs_images_cnn-small.png",
                     "fig1_accuracy_vs_images_cnn-small-wide.png",
                     "fig2_accuracy_vs_epochs_k2_cnn-small.png",
                     "fig2_accuracy_vs_epochs_k2_cnn-small-wide.png"])
    summary = report.summary.read_text()
    assert "## synthetic-0to4 (cnn-small) → synthetic-5to9" in summary
    assert "## synthetic-0to4 (cnn-small-wide) → synthetic-5to9" in summary


def test_shipped_archs_spec_compares_two_archs():
    spec = load_spec(demo_spec_path().parent / "archs.yaml")
    assert {e.arch for e in spec.sources} == {"cnn-small", "cnn-small-wide"}
    assert len(expand(spec)) == 4 * 4 * 3 * 3
