"""Direction accuracy of equation-5 predictions (60 target vs 300 control cells) against full-data DEGs.

Usage: python benchmarks/downstream_papalexi_direction.py [coupling] [n_seeds]
"""
import time, numpy as np, pandas as pd, warnings, sys
warnings.simplefilter("ignore")
from scipy.stats import mannwhitneyu, false_discovery_control
import scipy.sparse as sp
from scotgm_pp import datasets, tl
from scotgm_pp.tl._predict import predict_response
t=time.time()
ad = datasets.read(datasets.papalexi_path(), "target", "non-targeting")
targets=["CMTM6","IFNGR2","JAK2","NFKBIA","STAT1","STAT2","STAT3","TNFRSF14","UBE2L6"]
lab=ad.obs["target"].astype(str).to_numpy()
X=ad.X.tocsr().astype(float)
lib=np.asarray(X.sum(1)).ravel(); lib[lib==0]=1
L=sp.diags(1e4/lib)@X; L.data=np.log1p(L.data); L=L.toarray()
ctrl=lab=="non-targeting"
deg={}
for g in targets:
    A,B=L[lab==g],L[ctrl]
    p=mannwhitneyu(A,B,axis=0).pvalue; p=np.where(np.isfinite(p),p,1)
    q=false_discovery_control(p); lfc=A.mean(0)-B.mean(0)
    deg[g]=pd.Series(lfc,index=ad.var_names)[(q<0.05)&(ad.var_names!=g)]
    print(g, "n DEGs", len(deg[g]))
rows=[]
coupling=sys.argv[1] if len(sys.argv)>1 else "ot"
for seed in range(int(sys.argv[2]) if len(sys.argv)>2 else 3):
    rng=np.random.default_rng(seed)
    c_idx=rng.choice(np.flatnonzero(ctrl),300,replace=False)
    for g in targets:
        g_idx=rng.choice(np.flatnonzero(lab==g),60,replace=False)
        sub=ad[np.r_[c_idx,g_idx]].copy()
        tl.perturbation_response(sub,"target","non-targeting",coupling=coupling,random_state=seed)
        rec=tl.get_record(sub,g) if g in sub.uns["scotgm"]["summary"].index else None
        if rec is None or g not in set(rec["genes"]) or len(deg[g])==0: continue
        pr=predict_response(sub,g,n_draws=100,random_state=seed).set_index("gene")
        d=deg[g]; d=d[d.index.isin(pr.index)]
        acc=np.mean(np.sign(pr.loc[d.index,"delta"])==np.sign(d))
        accmu=np.mean(np.sign(pr.loc[d.index,"fitted_mu"])==np.sign(d))
        band=(np.sign(pr.loc[d.index,"lower"])==np.sign(pr.loc[d.index,"upper"]))
        acc_conf=np.mean((np.sign(pr.loc[d.index,"delta"])==np.sign(d))[band]) if band.any() else np.nan
        rows.append(dict(seed=seed,target=g,n_deg=len(d),acc=acc,acc_fitted_mu=accmu,frac_band_excl0=band.mean(),acc_band_excl0=acc_conf,target_rank=rec.get("target_rank"),delta_i=pr.attrs["delta_i"]))
        print(rows[-1], round(time.time()-t), flush=True)
df=pd.DataFrame(rows); print(df.groupby("target").mean(numeric_only=True).round(3)); print(df.mean(numeric_only=True).round(3))
# DEG-weighted
print("pooled acc", (df.acc*df.n_deg).sum()/df.n_deg.sum())
df.to_csv(f"/tmp/pap_measure_{coupling}.csv")
