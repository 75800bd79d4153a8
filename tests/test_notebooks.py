"""The example notebooks execute, and the numbers they print are the ones their prose states.

Each notebook is run afresh with nbclient (the committed copy, with its outputs, is left as is)
and its ``RESULT name = value`` lines are checked against the statements of the prose next to
them (notebooks/build_notebooks.py writes both). The three notebooks take about four minutes
together on two cores (NUTS on the real STAT1 state model and on the three-state model).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 300


def _results(nb) -> dict[str, str]:
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                raise AssertionError(f"cell failed: {o['ename']}: {o['evalue']}")
            if o.get("name") == "stdout":
                for line in o["text"].splitlines():
                    m = re.match(r"RESULT (.+?) = (\S+)", line.strip())
                    if m:
                        out[m.group(1)] = m.group(2)
    return out


def _execute(name: str) -> dict[str, str]:
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    committed = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") or c.source.strip().endswith(";") for c in committed), \
        f"{path.name} is committed without outputs; execute it and save"
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return _results(nb)


def _f(r: dict[str, str], key: str) -> float:
    assert key in r, f"notebook printed no RESULT {key}; printed: {sorted(r)}"
    return float(r[key])


@pytest.mark.slow
def test_quickstart_papalexi(papalexi):
    r = _execute("01_quickstart_papalexi")
    # "The knocked-out gene itself is the top-ranked gene of the STAT1 guides and among the top
    # three of the JAK2 guides. IFNGR2 ... ranks outside the top three."
    assert int(r["target_rank STAT1"]) == 1
    assert int(r["target_rank JAK2"]) <= 3
    assert int(r["target_rank IFNGR2"]) > 3
    # "the largest R-hat ... is below 1.05"
    assert _f(r, "max_rhat_posterior") < 1.05
    # "At least 95% of the genes have their observed mean count inside the replicated interval,
    # and at least 80% their fraction of zeros ... mostly too many zeros (more than half)"
    assert _f(r, "ppc_mean_inside") >= 0.95
    assert _f(r, "ppc_zero_inside") >= 0.8
    assert _f(r, "ppc_zero_missed_too_many_zeros") > 0.5
    # "right for at least 90% of these genes, and for more of them than equation 5 does"
    assert _f(r, "direction_agreement STAT1") >= 0.9
    assert _f(r, "direction_agreement STAT1") > _f(r, "direction_agreement_paper STAT1")
    # "the AUC stays at or below 0.7 on both scales ... basal cells ... at least 0.9"
    for state in ("counterfactual", "perturbed"):
        assert _f(r, f"auc_{state}") <= 0.7
        assert _f(r, f"auc_counts_{state}") <= 0.7
    assert _f(r, "auc_basal") >= 0.9
    assert _f(r, "auc_counts_basal") >= 0.9


@pytest.mark.slow
def test_posterior_diagnostics(papalexi):
    r = _execute("02_posterior_diagnostics")
    # NUTS: "largest R-hat below 1.05, smallest bulk ESS above 100, no divergent transitions"
    assert _f(r, "max_rhat_nuts") < 1.05
    assert _f(r, "min_ess_nuts") > 100
    assert int(r["divergences_nuts"]) == 0
    # Gibbs: "R-hat below 1.05, bulk ESS at least 400"; the samplers agree within 0.5 sd
    assert _f(r, "max_rhat_gibbs") < 1.05
    assert _f(r, "min_ess_gibbs") >= 400
    assert _f(r, "sampler_gap_sd") < 0.5
    # "at least one log unit less STAT1 than the controls; escaped closer to the controls"
    ctrl, pert, esc = (_f(r, f"stat1_{k}") for k in ("control", "perturbed", "escaped"))
    assert pert <= ctrl - 1
    assert abs(esc - ctrl) < abs(esc - pert)
    # the count graph: "the cut EM matches the screen's effects to within 1e-4 on all 10 genes";
    # "largest R-hat of the effects below 1.05"; STAT1 "within 2 posterior standard deviations of
    # the screen's"
    assert _f(r, "count_em_vs_screen_max_abs") <= 1e-4
    assert _f(r, "count_max_rhat_delta") < 1.05
    assert _f(r, "count_sds_from_screen") <= 2
    # LOO computed; "all Pareto k below 0.7"; "ahead by less than two standard errors"
    assert _f(r, "elpd_loo_nuts") < 0
    assert _f(r, "max_pareto_k") < 0.7
    assert abs(_f(r, "elpd_diff_in_se")) < 2
    # prior predictive: ridge wider; scaled within 10x of the observed range
    assert _f(r, "prior_ratio_scaled") <= 10
    assert _f(r, "prior_ratio_ridge") > _f(r, "prior_ratio_scaled")
    # "within 0.1 observed standard deviations"
    assert _f(r, "ppc_max_standardised_mean_gap") < 0.1
    # Hit-and-Run: "R-hat below 1.05 ... exceeds the optimal cost by less than 10%"
    assert _f(r, "coupling_rhat") < 1.05
    assert 0 <= _f(r, "cost_excess") < 0.1


@pytest.mark.slow
def test_extending_the_model():
    r = _execute("03_extending_the_model")
    acc3 = _f(r, "guide_accuracy_three_state")
    # guide cells only: "at least 0.1 more accurate than calling every guide cell perturbed, and
    # than the shared two-state model ... as well as two separate two-state fits (within 0.03)"
    assert acc3 >= _f(r, "guide_accuracy_all_perturbed") + 0.1
    assert acc3 >= _f(r, "guide_accuracy_shared_two_state") + 0.1
    assert abs(acc3 - _f(r, "guide_accuracy_separate_two_state")) <= 0.03
    # EM is the MAP of the graph
    assert _f(r, "logp_gap") < 1e-4
    # NUTS on the three-state graph; LOO
    assert _f(r, "max_rhat_three_state_nuts") < 1.05
    assert abs(_f(r, "guide_accuracy_three_state_nuts") - acc3) <= 0.05
    assert _f(r, "max_rhat_shared_gibbs") > 1.01
    assert r["loo_best"] == "three_states"
    assert _f(r, "loo_elpd_diff_in_se") > 4
    # the cloned graph with a shrinkage prior: "every shift gets shorter, none by more than 60%"
    assert _f(r, "min_shift_shrinkage") > 0
    assert _f(r, "max_shift_shrinkage") < 0.6
    # NUTS on the extension: "largest R-hat below 1.05", "shrunk by less than the MAP shrank them",
    # replicated means "within 0.1 observed standard deviations"
    assert _f(r, "max_rhat_extension_nuts") < 1.05
    assert _f(r, "max_shift_shrinkage_nuts") < _f(r, "min_shift_shrinkage")
    assert _f(r, "extension_ppc_max_standardised_mean_gap") < 0.1
    # model_config priors: scaled >= 0.75 and weight within 0.1 of the truth; ridge weight > 0.9,
    # accuracy within 0.05 of the share of truly perturbed cells
    assert _f(r, "escape_accuracy_scaled") >= 0.75
    assert abs(_f(r, "perturbed_weight_scaled") - _f(r, "true_perturbed_share")) <= 0.1
    for name in ("ridge_0.01", "ridge_0.1"):
        assert _f(r, f"perturbed_weight_{name}") > 0.9
        assert abs(_f(r, f"escape_accuracy_{name}") - _f(r, "true_perturbed_share")) <= 0.05
        assert _f(r, f"escape_accuracy_{name}") < _f(r, "escape_accuracy_scaled")
