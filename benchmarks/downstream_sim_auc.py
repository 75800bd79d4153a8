"""Cross-validated AUC of a classifier separating synthetic from real perturbed cells (simulated screen)."""
import time, numpy as np, warnings
warnings.simplefilter("ignore")
from scotgm_pp import datasets, tl
from scotgm_pp.tl._synthetic import sample_cells, _gene_counts
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.model_selection import cross_val_score, StratifiedKFold
t=time.time()
ad = datasets.simulate(random_state=0)
ps = list(ad.uns["simulation"]["de_genes"])[:3]
tl.perturbation_response(ad, "perturbation", "control", perturbations=ps)
print("fit", time.time()-t)
def auc(A,B):
    X=np.vstack([A,B]); y=np.r_[np.zeros(len(A)),np.ones(len(B))]
    clf=make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return cross_val_score(clf,X,y,cv=StratifiedKFold(5,shuffle=True,random_state=0),scoring="roc_auc").mean()
for p in ps:
    rec=tl.get_record(ad,p); genes=rec["genes"]
    cells=np.flatnonzero((ad.obs.perturbation==p).to_numpy() & ~ad.obs.escaped.to_numpy())
    c=_gene_counts(ad,cells,genes); real=np.log1p(c/c.sum(1,keepdims=True)*1e4)
    ctrl=np.flatnonzero((ad.obs.perturbation=="control").to_numpy())
    cc=_gene_counts(ad,ctrl,genes); realc=np.log1p(cc/cc.sum(1,keepdims=True)*1e4)
    res=[]
    for st,kw in [("perturbed",{}),("perturbed",{"counts":True}),("perturbed",{"residual":"gaussian"}),("counterfactual",{}),("counterfactual",{"perturbation_draw":"independent"}),("basal",{})]:
        s=sample_cells(ad,p,n=len(cells),state=st,**kw).X
        res.append((st,kw,round(auc(real,s),3)))
    res.append(("ctrl-vs-pert", round(auc(real,realc),3)))
    print(p,len(cells),res)
print(time.time()-t)
