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
    for field in ("n_guide", "n_control", "n_pcs", "em_n_iter", "em_converged", "coupling", "ks_shift_significant_pcs"):
        assert field in first
    table = pd.read_csv(out / "gene_rankings.csv")
    assert set(table.columns) >= {"perturbation", "gene", "mu", "sigma", "score", "rank"}
    res = ad.read_h5ad(out / "results.h5ad")
    assert "scotgm_p_perturbed" in res.obs and "scotgm" in res.uns


def test_run_on_an_h5ad_and_bad_control(tmp_path, small_sim, capsys):
    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    out = tmp_path / "run"
    code = main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(out), "--n-pcs", "5", "--quiet", "--seed", "2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["random_state"] == 2
    assert {p["n_pcs"] for p in summary["perturbations"].values()} == {5}
    assert main(["run", str(path), "--perturbation-key", "perturbation", "--control", "NT",
                 "--out", str(out)]) == 2
    assert "control label 'NT' not found" in capsys.readouterr().err


def test_console_script_help_is_readable():
    proc = subprocess.run([sys.executable, "-m", "scotgm_pp.cli", "run", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--perturbation-key" in proc.stdout and "non-targeting" in proc.stdout


@pytest.mark.parametrize("argv", [["run"], ["frobnicate"]])
def test_cli_usage_errors(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
