import json
import subprocess
import sys

import anndata as ad
import pandas as pd
import pytest

from scotgm_pp.cli import main


def test_demo_writes_outputs_and_ranks_targets(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "true target ranked first" in printed
    summary = json.loads((out / "summary.json").read_text())
    ranks = [p["target_rank"] for p in summary["perturbations"].values()]
    assert len(ranks) == 8 and sum(r == 1 for r in ranks) >= 7
    first = next(iter(summary["perturbations"].values()))
    for field in ("key", "n_guide", "n_control", "n_pcs", "em_n_iter", "em_converged", "coupling",
                  "ks_shift_significant_pcs", "escape_model", "state_space", "escape_test_pvalue"):
        assert field in first
    status = [p["escape_model"] for p in summary["perturbations"].values()]
    escape = summary["escape_model"]
    assert escape["fitted"] == status.count("on") and escape["fitted"] + escape["fallback"] == 8
    assert escape["fallback_share"] == pytest.approx(escape["fallback"] / 8)
    assert sum(escape["fallback_reasons"].values()) == escape["fallback"]
    assert sorted(summary["outputs"]) == sorted(["figures", "gene_rankings.csv", "records", "responses.h5ad",
                                                 "results.h5ad", "summary.json"])
    table = pd.read_csv(out / "gene_rankings.csv")
    assert set(table.columns) >= {"perturbation", "gene", "mu", "sigma", "score", "rank"}
    assert (table.groupby("perturbation").size() == 50).all()  # the top 50 genes of each by default
    res = ad.read_h5ad(out / "results.h5ad")
    assert "scotgm_p_perturbed" in res.obs and "scotgm" in res.uns and res.X is None
    resp = ad.read_h5ad(out / "responses.h5ad")
    assert resp.shape == (8, 200) and "rank" in resp.layers
    assert len(list((out / "records").glob("p_*.h5"))) == 8
    # the demo's figures: screen-level, plus every perturbation's
    assert (out / "figures" / "screen_summary.png").exists()
    assert len(list((out / "figures").glob("*_confusion.png"))) == 8
    assert not (out / ".scotgm-run").exists()
    # a second demo replaces the first one's outputs
    assert main(["demo", "--out", str(out), "--quiet", "--seed", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["params"]["random_state"] == 1


def test_run_on_an_h5ad_and_output_folder_rules(tmp_path, small_sim, capsys):
    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    out = tmp_path / "run"
    code = main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(out), "--n-pcs", "5", "--quiet", "--seed", "2", "--all-genes"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["random_state"] == 2
    assert {p["n_pcs"] for p in summary["perturbations"].values()} == {5}
    assert len(pd.read_csv(out / "gene_rankings.csv")) == 3 * small_sim.n_vars
    # a figure per perturbation only when asked: run draws the screen-level figures
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["screen_summary.png", "target_ranks.png"]
    before = (out / "results.h5ad").read_bytes()
    capsys.readouterr()
    # a finished run is never overwritten without --overwrite, and the check comes first
    assert main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(out), "--quiet"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (out / "results.h5ad").read_bytes() == before
    assert main(["run", str(path), "--perturbation-key", "perturbation", "--control", "NT",
                 "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "control label 'NT' not found" in capsys.readouterr().err
    assert main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(out), "--quiet", "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["params"]["random_state"] == 3


@pytest.mark.parametrize("case", ["file", "under_file", "input_is_output"])
def test_unusable_output_locations_fail_before_fitting(tmp_path, small_sim, capsys, case):
    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"file": blocker, "under_file": blocker / "sub", "input_is_output": tmp_path}[case]
    data = path if case != "input_is_output" else tmp_path / "results.h5ad"
    if case == "input_is_output":
        small_sim.write_h5ad(data)
    code = main(["run", str(data), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert {"file": "is a file", "under_file": "is a file", "input_is_output": "lies where the run writes"}[case] in err


def test_console_script_help_is_readable():
    proc = subprocess.run([sys.executable, "-m", "scotgm_pp.cli", "run", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--perturbation-key" in proc.stdout and "non-targeting" in proc.stdout
    assert "--n-workers" in proc.stdout and "--scheduler" in proc.stdout


@pytest.mark.parametrize("argv", [["run"], ["frobnicate"], ["demo", "--n-pcs", "-3"], ["demo", "--n-pcs", "0"],
                                  ["demo", "--variance-threshold", "nan"], ["demo", "--variance-threshold", "7"],
                                  ["demo", "--seed", "100000000000000000000000"], ["demo", "--seed", "-1"],
                                  ["demo", "--n-workers", "0"]])
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unexpected_errors_keep_the_traceback_and_ask_for_a_report(monkeypatch, capsys):
    import scotgm_pp.cli as cli

    def boom(args):
        raise RuntimeError("internal failure")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(func=boom)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: internal failure" in err and "bug in scotgm_pp" in err


def test_the_console_script_exits_with_mains_code_and_skips_the_last_collection(monkeypatch):
    import gc

    from scotgm_pp import cli

    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    try:
        assert cli.entry_point() == 7
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
