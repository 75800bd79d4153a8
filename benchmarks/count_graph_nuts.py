"""The count graph in the modeller's hands: EM against the screen, NUTS against EM and the truth.

For every perturbation of simulated screens (3 perturbations, 80 guide cells with escapes, 300
controls, 200 genes; seeds given by ``--seeds``), ``sg.tl.get_model(adata, P, counts=True,
n_genes=20)`` is fitted three ways on the target and the 19 genes the screen ranked highest:

* EM with ``count_evidence="cut"`` (the screen's rule): the largest |effect - screen effect| over
  the 20 genes;
* EM with ``count_evidence="joint"`` (the mode of the joint density);
* NUTS (``--draws``/``--tune``, 2 chains) on the default graph, the cut (each gene's count
  likelihood with the cell's state integrated out over its probabilities from the scores, the
  graph the screen answers with): its time, the
  largest R-hat of ``delta``, and the target's posterior mean and sd, with its distance in
  posterior sds from the screen's effect;
* with ``--joint-nuts``, NUTS on the joint graph too (``count_evidence="joint"``): its distance
  from the screen's effect and from the joint EM's.

The last columns give the simulated truth (natural-log fold change of the target).

    python benchmarks/count_graph_nuts.py [--seeds 0 1] [--draws 300 --tune 300] [--joint-nuts] [--out FILE.csv]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import scotgm_pp as sg
from scotgm_pp.models import ConvergenceWarning


def screen(seed: int):
    adata = sg.datasets.simulate(n_genes=200, n_perturbations=3, n_control=300, n_cells_per_perturbation=80,
                                 random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(adata, "perturbation", "control", n_pcs=5, n_jobs=1)
    return adata


def nuts_fit(adata, P: str, genes: list, draws: int, tune: int, seed: int, evidence: str):
    import arviz as az

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = sg.tl.get_model(adata, P, counts=True, genes=genes, method="nuts", draws=draws, tune=tune,
                              chains=2, random_seed=seed, count_evidence=evidence)
    seconds = time.perf_counter() - t0
    rhat = float(az.rhat(fit.idata, var_names=["delta"])["delta"].max())
    row = fit.effect(P)
    return float(row["effect"]), float(row["effect_se"]), rhat, seconds


def one(adata, P: str, draws: int, tune: int, seed: int, joint_nuts: bool) -> dict:
    sim = adata.uns["simulation"]
    truth = float(sim["log_fold_change"][list(sim["perturbations"]).index(P), list(adata.var_names).index(P)])
    screen_row = sg.tl.get_responses(adata)[P].to_df(layer="effect").iloc[0]
    screen_effect = float(screen_row[P])
    screen_se = float(sg.tl.get_responses(adata)[P].to_df(layer="effect_se").iloc[0][P])
    cut = sg.tl.get_model(adata, P, counts=True, n_genes=20)
    table = cut.effects()
    genes = table["gene"].tolist()
    em_diff = float(np.max(np.abs(table["effect"].to_numpy() - screen_row.reindex(genes).to_numpy())))
    joint = float(sg.tl.get_model(adata, P, counts=True, genes=genes, count_evidence="joint").effect(P)["effect"])
    mean, sd, rhat, seconds = nuts_fit(adata, P, genes, draws, tune, seed, "cut")
    row = {"seed": seed, "perturbation": P, "em_cut_max_abs_diff": em_diff, "nuts_seconds": seconds,
           "rhat_delta_max": rhat, "nuts_target_mean": mean, "nuts_target_sd": sd, "screen_effect": screen_effect,
           "screen_se": screen_se,
           "sds_from_screen": abs(mean - screen_effect) / sd, "joint_em_effect": joint, "truth": truth}
    if joint_nuts:
        jm, jsd, jr, js = nuts_fit(adata, P, genes, draws, tune, seed, "joint")
        row.update(joint_nuts_seconds=js, joint_rhat_delta_max=jr, joint_nuts_target_mean=jm, joint_nuts_target_sd=jsd,
                   joint_sds_from_screen=abs(jm - screen_effect) / jsd, joint_sds_from_joint_em=abs(jm - joint) / jsd)
    return row


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--tune", type=int, default=300)
    ap.add_argument("--joint-nuts", action="store_true", help="also NUTS on the joint graph (count_evidence='joint')")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        adata = screen(seed)
        for P in sorted(sg.tl.get_responses(adata).obs_names):
            rows.append(one(adata, P, args.draws, args.tune, seed, args.joint_nuts))
            print(pd.DataFrame([rows[-1]]).round(4).to_string(index=False, header=len(rows) == 1), flush=True)
    df = pd.DataFrame(rows)
    print("\nsummary (mean / worst over perturbations)")
    print(f"  EM cut vs screen, max |diff| over 20 genes: mean {df.em_cut_max_abs_diff.mean():.2e}, "
          f"worst {df.em_cut_max_abs_diff.max():.2e}")
    print(f"  NUTS R-hat (delta): mean {df.rhat_delta_max.mean():.3f}, worst {df.rhat_delta_max.max():.3f}")
    print(f"  NUTS (cut graph) target vs screen: mean {df.sds_from_screen.mean():.2f} sd, worst "
          f"{df.sds_from_screen.max():.2f} sd; within 2 sd: {(df.sds_from_screen <= 2).sum()} of {len(df)}")
    if "joint_sds_from_screen" in df:
        print(f"  NUTS (joint graph) target vs screen: mean {df.joint_sds_from_screen.mean():.2f} sd, worst "
              f"{df.joint_sds_from_screen.max():.2f} sd; vs joint EM: mean {df.joint_sds_from_joint_em.mean():.2f} sd, "
              f"worst {df.joint_sds_from_joint_em.max():.2f} sd; R-hat worst {df.joint_rhat_delta_max.max():.3f}")
    print(f"  |target - truth|: screen {np.abs(df.screen_effect - df.truth).mean():.3f}, joint EM "
          f"{np.abs(df.joint_em_effect - df.truth).mean():.3f}, NUTS (cut) {np.abs(df.nuts_target_mean - df.truth).mean():.3f}")
    print(f"  NUTS posterior sd / screen effect_se (target): mean {(df.nuts_target_sd / df.screen_se).mean():.2f}, "
          f"range {(df.nuts_target_sd / df.screen_se).min():.2f}-{(df.nuts_target_sd / df.screen_se).max():.2f}")
    print(f"  NUTS seconds: mean {df.nuts_seconds.mean():.1f}, worst {df.nuts_seconds.max():.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
    return df


if __name__ == "__main__":
    main()
