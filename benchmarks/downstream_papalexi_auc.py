"""Cross-validated AUC of a classifier separating synthetic from real perturbed cells (Papalexi STAT1)."""
import numpy as np, warnings
warnings.simplefilter("ignore")
import scotgm_pp as sg
from scotgm_pp.tl._synthetic import sample_cells
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
adata = sg.datasets.read(sg.datasets.papalexi_path(), perturbation_key="target", control="non-targeting")
rng = np.random.default_rng(0)
targets = ["STAT1"]
labels = adata.obs["target"].astype(str).to_numpy()
keep = [rng.choice(np.flatnonzero(labels == "non-targeting"), 300, replace=False)]
keep += [rng.choice(np.flatnonzero(labels == t), 150, replace=False) for t in targets]
screen = adata[np.concatenate(keep)].copy()
sg.tl.perturbation_response(screen, "target", "non-targeting")
genes = sg.tl.get_record(screen, "STAT1")["genes"]
real_cells = screen[(screen.obs["target"] == "STAT1") & (screen.obs["scotgm_class"] == "perturbed"), genes]
c = real_cells.X.toarray().astype(float); real = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
def cv_auc(a, b):
    X, y = np.vstack([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return cross_val_score(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="roc_auc").mean()
for st,kw in [("perturbed",{}),("perturbed",{"residual":"gaussian"}),("perturbed",{"counts":True}),("counterfactual",{}),("counterfactual",{"perturbation_draw":"independent"}),("counterfactual",{"parameter_uncertainty":False}),("basal",{})]:
    print(st,kw,len(real), round(cv_auc(real, sample_cells(screen,"STAT1",n=len(real),state=st,**kw).X),3))
# full data version
sg.tl.perturbation_response(adata, "target", "non-targeting", perturbations=["STAT1"])
genes = sg.tl.get_record(adata, "STAT1")["genes"]
rc = adata[(adata.obs["target"] == "STAT1") & (adata.obs["scotgm_class"] == "perturbed"), genes]
c = rc.X.toarray().astype(float); real = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
for st,kw in [("perturbed",{}),("counterfactual",{}),("basal",{})]:
    print("full", st,kw,len(real), round(cv_auc(real, sample_cells(adata,"STAT1",n=len(real),state=st,**kw).X),3))
