import warnings, numpy as np, pandas as pd, scotgm_pp as sg, sys
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/tmp/pb")
from batch_dispersion import share_truth
from mixfit import mixture_effects
warnings.simplefilter("ignore")
out=[]
for seed in range(3):
    a = sg.datasets.simulate(n_genes=500, n_perturbations=6, n_control=600, n_cells_per_perturbation=150, escape_fraction=0.3, random_state=seed)
    sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1, random_state=seed)
    sim=a.uns["simulation"]; perts, truth = share_truth(a)
    X = np.asarray(a.X.toarray() if hasattr(a.X,"toarray") else a.X, float); lib = X.sum(1)
    for p, tg in sim["target_gene"].items():
        rec = sg.tl.get_record(a, p)
        genes = np.asarray(rec["genes"]).astype(str)
        r = sg.tl.get_rankings(a, perturbation=p).set_index("gene").reindex(genes)
        guide = (a.obs["perturbation"]==p).to_numpy()
        w = a.obs.loc[guide, "scotgm_p_perturbed"].to_numpy()
        cols = a.var_names.get_indexer(genes)
        alpha = 1/np.maximum(np.asarray(rec["count_dispersion"],float),1e-6)
        d, se = mixture_effects(X[guide][:, cols], lib[guide], w, np.asarray(rec["count_beta"]), alpha, r["effect"].to_numpy())
        du, seu = mixture_effects(X[guide][:, cols], lib[guide], w, np.asarray(rec["count_beta"]), alpha, r["effect"].to_numpy(), delta_sd=1e6)
        tr = truth[perts.index(p)][cols]
        de = np.isin(genes, list(sim["de_genes"][p]))
        for name, e, s_ in (("map", r["effect"].to_numpy(), r["effect_se"].to_numpy()), ("unshrunk", r["effect_unshrunk"].to_numpy(), r["effect_unshrunk_se"].to_numpy()), ("mix", d, se), ("mix_flat", du, seu)):
            z = (e - tr) / s_
            t = genes == tg
            out.append(dict(seed=seed, p=p, m=name, target_err=float((e-tr)[t][0]), target_z=float(z[t][0]),
                            de_sd_z=np.nanstd(z[de & ~t]), null_rej=np.nanmean(np.abs(z[~de & ~t])>1.96),
                            top1=float(genes[np.nanargmin(e/np.where(np.isfinite(s_),1,1))]==tg)))
o=pd.DataFrame(out)
print(o.groupby("m")[["target_err","target_z","de_sd_z","null_rej","top1"]].mean().round(3))
