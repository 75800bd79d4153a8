"""Write and execute the notebooks in notebooks/ (saved with outputs).

Usage: python notebooks/build_notebooks.py [name ...]

Every number a notebook's prose states is printed on a ``RESULT name = value`` line, and
tests/test_notebooks.py checks it when it runs the notebooks afresh; prose states the thresholds
those tests hold (e.g. "below 1.05"), not the exact values, which may move with the library.
"""
from pathlib import Path
import sys, time
import nbformat as nbf
from nbclient import NotebookClient

def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells = [nbf.v4.new_markdown_cell(c[1]) if isinstance(c, tuple) else nbf.v4.new_code_cell(c.strip())
               for c in cells]
    return n

def md(s): return ("md", s.strip())

SETUP = """%matplotlib inline
import warnings

warnings.simplefilter("ignore")  # quiet notebook output (the library itself sets no global filters)
"""


MODEL = md(r"""## The model

For one perturbation, cell $i$ (a control or a guide cell) has a state $z_i \in \{0 = \text{basal}, 1 = \text{perturbed}\}$
and a score vector $x_i \in \mathbb{R}^d$ (its PCA scores, or its one-dimensional perturbation signature):

$$
\begin{aligned}
w &\sim \operatorname{Dirichlet}(\alpha), \qquad
\Lambda_k \sim \operatorname{Wishart}(\nu_0, \Psi_0), \qquad
\mu_k \mid \Lambda_k \sim \mathcal{N}\big(m_0, (\kappa_0 \Lambda_k)^{-1}\big),\\
z_i &\sim \operatorname{Categorical}(w \text{ restricted to the states } A_i \text{ the cell may take}),
\qquad x_i \mid z_i = k \sim \mathcal{N}(\mu_k, \Lambda_k^{-1}),
\end{aligned}
$$

with controls pinned to $A_i = \{0\}$ and guide cells free ($A_i = \{0, 1\}$; escaped cells are
guide cells in state 0). The tied model shares one $\Lambda$. $z$ is summed out, so the
graph's observed variable is $x$ (PyMC's `X`). The count layer (`counts=True`) adds, for chosen
genes $g$, with library size $s_i$, batch $b_i$ and a plug-in dispersion $\phi_g$:

$$
y_{ig} \mid z_i = k \sim \operatorname{NB}\big(s_i \exp(\beta_g + \delta_{kg} + \gamma_{b_i g}),\ \phi_g\big),
\qquad \delta_{0g} = 0,\ \delta_{kg} \sim \mathcal{N}(0, \sigma_\delta^2),\ \beta_g \sim \mathcal{N}(m_g, \sigma_\beta^2),
\ \gamma \sim \mathcal{N}(0, \sigma_\gamma^2),
$$

($m_g$ the gene's pooled log rate; $\gamma_{0g} = 0$), and one state per cell is shared by its
scores and its counts (observed `XY`). $\delta_{1g}$ is
the gene's effect (natural-log fold change) and $\mu_1 - \mu_0$ the perturbation's shift.""")

# --------------------------------------------------------------------------- 01
NB1 = [
md("""# Quick start: sc-OTGM on a real CRISPR screen (Papalexi et al. 2021)

A few perturbations of the ECCITE-seq knockout screen in THP-1 cells (Papalexi et al. 2021), in
the small-sample regime sc-OTGM is built for: 300 control cells and 150 cells per guide target.
We ask which gene was knocked down, which cells escaped, how other genes respond, check the model
against the data with a posterior predictive check, and draw synthetic cells.

Every number the text below states is printed on a `RESULT` line, and the test suite
(`tests/test_notebooks.py`) reruns this notebook and checks those lines against the statements."""),
MODEL,
SETUP + """import numpy as np
import scotgm_pp as sg
from scotgm_pp import pl
from scotgm_pp.tl import observed_response, predict_response
from scotgm_pp.tl import sample_cells

adata = sg.datasets.read(sg.datasets.papalexi_path(), perturbation_key="target", control="non-targeting")
adata""",
md("Subsample: 300 controls and 150 cells for each of three targets that are measured in the panel."),
"""rng = np.random.default_rng(0)
targets = ["STAT1", "JAK2", "IFNGR2"]
labels = adata.obs["target"].astype(str).to_numpy()
keep = [rng.choice(np.flatnonzero(labels == "non-targeting"), 300, replace=False)]
keep += [rng.choice(np.flatnonzero(labels == t), 150, replace=False) for t in targets]
screen = adata[np.concatenate(keep)].copy()
screen.obs["target"].value_counts().loc[["non-targeting", *targets]]""",
md("Fit the two-state model (controls pinned basal; guide cells perturbed or escaped) with the closed-form OT coupling."),
"""sg.tl.perturbation_response(screen, "target", "non-targeting", coupling="ot", random_state=0)
summary = screen.uns["scotgm"]["summary"]   # one row per perturbation
for t in targets:
    row = summary.loc[t]
    print(f"RESULT target_rank {t} = {int(row['target_rank'])}  ({int(row['n_pcs'])} PCs, "
          f"{row['fraction_perturbed']:.0%} of guide cells perturbed)")""",
md("""The knocked-out gene itself is the top-ranked gene of the STAT1 guides and among the top three
of the JAK2 guides. IFNGR2 is harder: its own gene ranks outside the top three (rank printed
above), so on these 150 cells the ranking alone would not name it."""),
"""responses = sg.tl.get_responses(screen)   # perturbation x gene AnnData, one layer per statistic
responses""",
"""sg.tl.get_rankings(screen, "scotgm", "STAT1").head(8)""",
"""pl.perturbation_distribution(screen, "STAT1", "scotgm", n_top=12)""",
"""pl.confusion_matrix(screen, "STAT1", "scotgm")""",
"""screen.obs.loc[screen.obs["target"] == "STAT1", "scotgm_class"].value_counts()""",
md("""## Posterior draws

The fit is a MAP (EM). Its uncertainty comes as draws from the model's posterior given the cells'
state probabilities: the states' conjugate Normal-Wishart posterior, the transport coupling
recomputed per draw, and the count layer's Gaussian approximation (effect and its standard
error). They are an ArviZ `posterior` group, so `az.summary` works on them; the largest R-hat
of the weights and of the top genes' effects is below 1.05."""),
"""import arviz as az

post = sg.tl.posterior_draws(screen, "STAT1", draws=100, chains=2, random_state=0)
genes_shown = sg.tl.get_rankings(screen, "scotgm", "STAT1").head(5)["gene"].tolist()  # the top 5
summ = az.summary(post, var_names=["weights", "effect"], coords={"gene": genes_shown})
print(f"RESULT max_rhat_posterior = {summ['r_hat'].max():.3f}")
summ[["mean", "sd", "eti89_lb", "eti89_ub", "ess_bulk", "r_hat"]]""",
md("""## Posterior predictive check

Replicate the STAT1 guide cells from the posterior predictive (each cell keeps its library size;
its state is drawn from the weights; counts from the negative-binomial count layer) and compare
every gene's mean count and fraction of zeros with the observed ones (90% replicated interval)."""),
"""ppc = sg.tl.posterior_predictive(screen, "STAT1", draws=10, chains=2, random_state=0)
ppc_table = sg.tl.ppc_statistics(ppc)
print(f"RESULT ppc_mean_inside = {ppc_table['mean_inside'].mean():.3f}")
print(f"RESULT ppc_zero_inside = {ppc_table['zero_inside'].mean():.3f}")
missed = ppc_table[~ppc_table["zero_inside"]]
too_many = float(np.mean(missed["observed_zero_fraction"] < missed["zero_lower"])) if len(missed) else float("nan")
print(f"RESULT ppc_zero_missed_too_many_zeros = {too_many:.3f}  (of {len(missed)} genes whose zero fraction is missed)")
pl.posterior_predictive_check(ppc_table)""",
md("""At least 95% of the genes have their observed mean count inside the replicated interval, and at
least 80% their fraction of zeros. Where the zero fraction is missed, the replicated cells mostly
have too many zeros (more than half of those genes, printed above): consistent with a dispersion
that is estimated once per gene from the controls and is too large for these genes in the guide
cells. The check shows where the count model is approximate."""),
md("""## In-silico response prediction

`predict_response` propagates a change of STAT1 to every gene. The default predictor reads the
count layer's perturbed-state effect of every gene (as the change of log-normalised expression it
implies); `method="paper"` is the paper's equation 5, `Delta X_j = (S'_ij / S'_ii) Delta X_i` with
`S' = V Sigma_p V^T`. The 90% band comes from the posterior draws. We compare both with the
observed mean changes of the genes that differ between STAT1-guide and control cells (Wilcoxon,
BH < 0.05)."""),
"""pred = predict_response(screen, "STAT1", n_draws=100, random_state=0)
paper = predict_response(screen, "STAT1", method="paper", n_draws=0)
obs = observed_response(screen, "STAT1")
deg = obs[(obs["padj"] < 0.05) & (obs["gene"] != "STAT1")].set_index("gene")
for name, df in [("", pred), ("_paper", paper)]:
    p = df.set_index("gene").loc[deg.index]
    agree = float(np.mean(np.sign(p["delta"]) == np.sign(deg["logfc"])))
    print(f"RESULT direction_agreement{name} STAT1 = {agree:.3f} over {len(deg)} DEGs")
pred.sort_values("delta").head(6)[["gene", "delta", "lower", "upper", "delta_lognorm", "effect"]]""",
md("""The default predictor gets the direction of change right for at least 90% of these genes, and
for more of them than equation 5 does (both fractions printed above)."""),
"""pl.predicted_vs_observed(screen, "STAT1", "scotgm", prediction=pred, observed=obs)""",
md("""## Synthetic cells

`sample_cells` draws cells from the posterior predictive, with counts: negative binomial from the
count layer, library sizes from the experiment's cells, genes tied together through the cell's
PCA-space draw. Counterfactuals are real control cells moved to the perturbed state. A
cross-validated logistic regression tries to tell synthetic cells from the real perturbed STAT1
cells, on log-normalised values and on raw counts; the AUC is 0.5 when it cannot, 1 when it
always can. Synthetic *basal* cells are the positive control: they should be easy to tell apart."""),
"""from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

genes = sg.tl.get_record(screen, "STAT1")["genes"]
real = screen[(screen.obs["target"] == "STAT1") & (screen.obs["scotgm_class"] == "perturbed"), genes].X.toarray()

def lognorm(c):
    return np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4)

def cv_auc(a, b):
    X, y = np.vstack([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, solver="liblinear"))
    return cross_val_score(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="roc_auc").mean()

for state in ["counterfactual", "perturbed", "basal"]:
    synth = sample_cells(screen, "STAT1", len(real), state=state, random_state=0)
    counts = synth.layers["counts"].toarray()
    print(f"RESULT auc_{state} = {cv_auc(lognorm(real), lognorm(counts)):.3f}")
    print(f"RESULT auc_counts_{state} = {cv_auc(real, counts):.3f}")
synth.obs.head(3)""",
md("""Counterfactual and synthetic perturbed cells are hard to tell from the real perturbed cells: the
AUC stays at or below 0.7 on both scales (cross-validated AUCs a little under 0.5 are noise of
the split, not a signal). Synthetic basal cells are told apart with an AUC of at least 0.9, so
the classifier does detect a real difference when there is one."""),
]

# --------------------------------------------------------------------------- 02
NB2 = [
md("""# Posterior diagnostics with ArviZ, on a real screen

The state model of one perturbation of the Papalexi et al. (2021) ECCITE-seq screen, sampled two
ways: NUTS on its PyMC graph (`method="nuts"`) and the conjugate Gibbs sampler
(`method="mcmc"`). Both return an `xarray.DataTree` (ArviZ 1) with a per-cell `log_likelihood`, so R-hat,
ESS, trace plots, LOO and predictive checks come from ArviZ. Then the prior predictive and the
posterior predictive against the observed cells, and the Hit-and-Run sampler of transport plans
between the fitted states.

The screen's default state model is fitted on one score per cell, the perturbation's signature
(`state_space="signature"`). To show the diagnostics of a multi-dimensional Gaussian state model,
this notebook runs the paper's PCA state space instead (`state_space="pca"`), with 5 PCs per
perturbation so that sampling takes seconds (the screen's default keeps far more; NUTS then has
thousands of covariance entries to sample). Numbers the text states are printed on `RESULT`
lines, which `tests/test_notebooks.py` checks."""),
MODEL,
SETUP + """import json
import numpy as np
import arviz as az
import scotgm_pp as sg
from scotgm_pp import pl
from scotgm_pp.models import ScOTGM, ConvergenceWarning
from scotgm_pp.inference.hit_and_run import sample_coupling

adata = sg.datasets.read(sg.datasets.papalexi_path(), perturbation_key="target", control="non-targeting")
rng = np.random.default_rng(0)
targets = ["STAT1", "IFNGR2", "CMTM6"]
labels = adata.obs["target"].astype(str).to_numpy()
keep = [rng.choice(np.flatnonzero(labels == "non-targeting"), 300, replace=False)]
keep += [rng.choice(np.flatnonzero(labels == t), 150, replace=False) for t in targets]
screen = adata[np.concatenate(keep)].copy()
sg.tl.perturbation_response(screen, "target", "non-targeting", n_pcs=5, state_space="pca", random_state=0)
screen.uns["scotgm"]["summary"][["n_guide", "n_control", "n_pcs", "state_covariance", "fraction_perturbed", "target_rank"]]""",
md("""## The STAT1 state model, sampled by NUTS

`sg.tl.get_model` rebuilds the screen's state model of one perturbation (its cells' PCA scores,
controls pinned to the basal state, the screen's prior and covariance type) as a `ScOTGM`, and
refits it with any method. Here the screen chose a *tied* covariance for STAT1 (one `precision`
shared by both states). `fit` warns (`ConvergenceWarning`) when the chains miss its own
thresholds, R-hat <= 1.01 and bulk ESS >= 400; we print any such warning rather than hide it."""),
"""def fit_and_report(**kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = sg.tl.get_model(screen, "STAT1", **kwargs)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            print("ConvergenceWarning:", w.message)
    return model

def convergence(idata, names=("weights", "means", "covariances")):
    rhat = az.rhat(idata, var_names=list(names))
    ess = az.ess(idata, var_names=list(names), method="bulk")
    return (float(max(np.nanmax(rhat[v].values) for v in names)),
            float(min(np.nanmin(ess[v].values) for v in names)))

nuts = fit_and_report(method="nuts", draws=300, tune=300, chains=2)
print(nuts.model.str_repr())
rhat, ess = convergence(nuts.idata)
print(f"RESULT max_rhat_nuts = {rhat:.3f}")
print(f"RESULT min_ess_nuts = {ess:.0f}")
print(f"RESULT divergences_nuts = {int(nuts.idata.sample_stats['diverging'].sum())}")
az.summary(nuts.idata, var_names=["weights", "perturbation_mean"])""",
md("""Over the weights, means and covariances, the largest R-hat is below 1.05 and the smallest bulk
ESS above 100 from 2 x 300 draws, with no divergent transitions."""),
"""az.plot_trace_dist(nuts.idata, var_names=["weights", "perturbation_mean"], compact=True, backend="matplotlib");""",
md("""## The same model by Gibbs sampling

The Gibbs sampler draws the same posterior from its conjugate conditionals: four chains of 500
draws take a few seconds. Its largest R-hat is below 1.05 and its smallest bulk ESS at least 400
(the package's own bar). The two samplers agree: no posterior mean of the weights or of the
perturbation mean differs between them by more than half a posterior standard deviation."""),
"""gibbs = fit_and_report(method="mcmc", draws=500, tune=200, chains=4)
rhat, ess = convergence(gibbs.idata)
print(f"RESULT max_rhat_gibbs = {rhat:.3f}")
print(f"RESULT min_ess_gibbs = {ess:.0f}")
gap = 0.0
for v in ("weights", "perturbation_mean"):
    a, b = nuts.idata.posterior[v], gibbs.idata.posterior[v]
    z = np.abs(a.mean(("chain", "draw")) - b.mean(("chain", "draw"))) / b.std(("chain", "draw"))
    gap = max(gap, float(z.max()))
print(f"RESULT sampler_gap_sd = {gap:.3f}")""",
md("""## Do the states mean what they say?

The data cannot tell us which guide cells escaped, but the knocked-out gene can: a cell in the
perturbed state should have lost STAT1 mRNA. Mean log-normalised STAT1 expression (counts per
10,000) of the controls, of the STAT1-guide cells the NUTS fit calls perturbed and of those it
calls escaped (posterior probability of the perturbed state above or below 0.5):"""),
"""cells = nuts.idata.observed_data["cell"].values
sub = screen[cells]
stat1 = sub[:, "STAT1"].X.toarray().ravel()
lognorm = np.log1p(stat1 / np.asarray(sub.X.sum(1)).ravel() * 1e4)
guide = sub.obs["target"].astype(str).to_numpy() == "STAT1"
called = nuts.responsibilities[:, 1] > 0.5
for name, rows in [("control", ~guide), ("perturbed", guide & called), ("escaped", guide & ~called)]:
    print(f"RESULT stat1_{name} = {lognorm[rows].mean():.2f}  ({rows.sum()} cells)")""",
md("""Cells called perturbed have at least one log unit less STAT1 than the controls; cells called
escaped are closer to the controls than to the perturbed cells: the perturbed state is the
knockout, found without looking at STAT1's own expression in the model."""),
md("""## The count graph: STAT1's effect on 10 genes, sampled by NUTS

`get_model(..., counts=True)` adds the negative-binomial count layer for the target and the 9
genes the screen ranked highest, with the screen's library sizes and dispersions. By default
(`count_evidence="cut"`, the screen's rule) the graph is the cut: the states come from the
scores, and each gene's count likelihood integrates the cell's state out over its probabilities
of the states, `sum_g log sum_k r_ik NB(y_ig | k)`, so the counts inform the effects and not the
states. EM of this graph reproduces the
screen's effects, and NUTS samples the same graph. With `count_evidence="joint"` the graph is
the joint density instead, in which each cell's counts inform its state too; its EM mode is
printed beside it."""),
"""cut = sg.tl.get_model(screen, "STAT1", counts=True, n_genes=10)
genes = cut.effects()["gene"].tolist()
screen_effect = sg.tl.get_responses(screen)["STAT1"].to_df(layer="effect").iloc[0]
print(f"RESULT count_em_vs_screen_max_abs = {np.abs(cut.effects()['effect'].to_numpy() - screen_effect.reindex(genes).to_numpy()).max():.1e}")
joint = sg.tl.get_model(screen, "STAT1", counts=True, genes=genes, count_evidence="joint")
count_nuts = fit_and_report(counts=True, genes=genes, method="nuts", draws=300, tune=300, chains=2)
row = count_nuts.effect("STAT1")
print(f"RESULT count_max_rhat_delta = {float(az.rhat(count_nuts.idata, var_names=['delta'])['delta'].max()):.3f}")
print(f"RESULT count_nuts_stat1 = {row['effect']:.3f}  (posterior sd {row['effect_se']:.3f})")
print(f"RESULT count_screen_stat1 = {screen_effect['STAT1']:.3f}")
print(f"RESULT count_joint_em_stat1 = {joint.effect('STAT1')['effect']:.3f}")
print(f"RESULT count_sds_from_screen = {abs(row['effect'] - screen_effect['STAT1']) / row['effect_se']:.2f}")
count_nuts.effects().head(8).round(3)""",
md("""The cut EM matches the screen's effects to within 1e-4 on all 10 genes. NUTS converges (the
largest R-hat of the effects is below 1.05), and its STAT1 effect lies within 2 posterior
standard deviations of the screen's: the graph sampled is the graph the screen answers with. The
distance is printed above, with the joint graph's mode for comparison."""),
md("""## LOO and a model comparison

Every fit carries the per-cell log-likelihood of `X`, so `az.loo` and `az.compare` apply. All
Pareto k values are below 0.7 (the LOO estimate is reliable). That is not a given: PSIS-LOO is
unreliable when many cells have k above 0.7, as happened with the screen's default 30-65 PCs per
perturbation. Then fit fewer PCs (as here), use the one-dimensional signature state model (the
screen's default), or use K-fold cross-validation (`az.loo_kfold`, which refits the model). We then ask whether each state
needs its own covariance: the same model with `covariance="full"` (its `model_config` otherwise
the screen's, read from `idata.attrs`), fitted by Gibbs on the same cells."""),
"""loo = az.loo(nuts.idata, pointwise=True)
print(f"RESULT elpd_loo_nuts = {loo.elpd:.1f}")
print(f"RESULT max_pareto_k = {float(loo.pareto_k.max()):.3f}")
config = json.loads(gibbs.idata.attrs["model_config"])
print(config)
full = ScOTGM(model_config={**config, "covariance": "full"}, draws=500, tune=200, chains=4, random_state=0)
full.fit(gibbs.idata.observed_data["X"].values,
         allowed_states=gibbs.idata.constant_data["allowed_states"].values.astype(bool), method="mcmc")
cmp = az.compare({"tied (the screen's)": gibbs.idata, "full": full.idata})
row = cmp.iloc[1]
print(f"RESULT elpd_diff_in_se = {abs(row['elpd_diff']) / row['dse']:.2f}  ({cmp.index[0]!r} ahead)")
cmp""",
md("""The better-ranked variant is ahead by less than two standard errors of the difference: these
cells do not clearly favour separate covariances over the screen's tied one."""),
md("""## Prior predictive

Cells drawn from the prior alone, against the range of the observed cells: the 99th percentile of
|X| over prior predictive draws divided by the largest observed |X|. The screen's `"ridge"` prior
(the paper's Tikhonov ridge, whose scale grows with the number of cells) is the wider one; the
`ScOTGM` default, `"scaled"`, is weakly informative on the data's scale and stays within ten times
the observed range."""),
"""X_obs = nuts.idata.observed_data["X"].values
mask = nuts.idata.constant_data["allowed_states"].values.astype(bool)
prior_ridge = nuts.sample_prior_predictive(draws=500)
scaled = ScOTGM(random_state=0)
scaled.build_model(X_obs, allowed_states=mask)   # the graph only; no fit needed for the prior
prior_scaled = scaled.sample_prior_predictive(draws=500)
for name, pp in [("ridge", prior_ridge), ("scaled", prior_scaled)]:
    ratio = np.percentile(np.abs(pp.prior_predictive["X"].values), 99) / np.abs(X_obs).max()
    print(f"RESULT prior_ratio_{name} = {ratio:.2f}")
az.plot_ppc_dist(prior_scaled, group="prior_predictive", var_names=["X"], num_samples=50, backend="matplotlib");""",
md("""## Posterior predictive

Replicate the cells from 50 NUTS draws (controls stay basal, guide cells draw their state from the
weights) and compare replicated and observed score distributions (`az.plot_ppc_dist`, pooled over
cells and PCs). The replicated mean of every PC is within 0.1 observed standard deviations of the
observed mean."""),
"""ppc = nuts.sample_posterior_predictive(draws=50, random_state=0)
rep = ppc.posterior_predictive["X"].values  # (chain, draw, cell, pc)
gap = np.abs(rep.mean((0, 1, 2)) - X_obs.mean(0)) / X_obs.std(0)
print(f"RESULT ppc_max_standardised_mean_gap = {gap.max():.3f}")
az.plot_ppc_dist(ppc, var_names=["X"], num_samples=50, backend="matplotlib");""",
md("""## The transport-plan sampler (Hit-and-Run) between the fitted states

Given the two states' posterior means and covariances, the Hit-and-Run sampler draws transport
plans between them. Its chains agree (R-hat below 1.05), and the mean cost of the sampled plans
exceeds the optimal (W2) cost by less than 10%."""),
"""post = nuts.idata.posterior
mu = post["means"].mean(("chain", "draw")).values
S = post["covariances"].mean(("chain", "draw")).values
res = sample_coupling(S[0], S[1], mu_x=mu[0], mu_y=mu[1], n_steps=1000, n_chains=4, random_state=0)
print(f"RESULT coupling_rhat = {res.rhat:.3f}")
print(f"RESULT coupling_ess = {res.ess:.0f}")
print(f"RESULT cost_excess = {np.mean(res.cost_draws) / res.w2_squared - 1:.4f}")
az.summary(res.idata, var_names=["transport_cost"])""",
"""pl.coupling_diagnostics(res.idata)""",
]

# --------------------------------------------------------------------------- 03
NB3 = [
md("""# Extending the generative model

`ScOTGM` declares its model as a PyMC graph (`.model`), which can be printed, extended and sampled.
On a simulated screen, where we know which guide cells escaped, we

1. declare a model with **one perturbed state per perturbation** (three states: basal, A, B), in
   which a guide cell of A may only be basal or A (an allowed-state mask built from the guide
   labels), fit it by EM and by NUTS, and score it on the guide cells only;
2. ask with LOO (`az.compare`) whether the extra state is worth it;
3. extend the graph by hand (`pm.model.fgraph.clone_model`): a hierarchical prior that shrinks the
   perturbation shifts, fitted by `pm.find_MAP`;
4. change the prior through `model_config`.

Numbers the text states are printed on `RESULT` lines, which `tests/test_notebooks.py` checks."""),
MODEL,
SETUP + """import numpy as np
import pandas as pd
import pymc as pm
import arviz as az
import scotgm_pp as sg
from scotgm_pp.models import ScOTGM, ConvergenceWarning, model_point
from scotgm_pp.pp import PreprocessParams, ks_check, preprocess

adata = sg.datasets.simulate(random_state=0)
A, B = sorted(adata.uns["simulation"]["target_gene"])[:2]
perturbation = adata.obs["perturbation"].astype(str)
rng = np.random.default_rng(0)
rows = np.r_[rng.choice(np.flatnonzero(perturbation == "control"), 200, replace=False),
             np.flatnonzero(perturbation.isin([A, B]))]
pre = preprocess(adata[np.sort(rows)].copy(), params=PreprocessParams(n_pcs=20))
lab = pre.obs["perturbation"].astype(str).to_numpy()
ctrl = lab == "control"
pcs = set()
for p in (A, B):  # the 2 PCs that carry each perturbation's shift most clearly
    r = ctrl | (lab == p)
    pcs |= set(ks_check(pre.obsm["X_pca"][r], ctrl[r]).nsmallest(2, "ks_shift_pvalue")["pc"])
X = pre.obsm["X_pca"][:, sorted(pcs)]
escaped = pre.obs["escaped"].to_numpy()
guide = ~ctrl
truth = np.where(escaped, "basal", lab)   # the state each guide cell is really in
print(f"perturbations {A}, {B}; cells x PCs {X.shape}; escaped guide cells {escaped[guide].mean():.0%}")""",
md("""## 1. One state per perturbation

`labels` and `control` give the allowed-state mask: controls are pinned to `basal`; with
`state_names=["basal", A, B]` a guide cell of A may be `basal` or `A`, never `B`. The graph:"""),
"""three = ScOTGM(n_states=3, state_names=["basal", A, B], random_state=0, draws=300, tune=300, chains=2)
graph = three.build_model(X, labels=lab, control="control")
print(graph.str_repr())
print()
print("dims:", {k: len(v) for k, v in graph.coords.items() if v is not None})
mask = pd.DataFrame(three.allowed_from_labels(lab, "control"), columns=three.state_names).astype(int)
mask.groupby(lab).mean()   # share of cells of each label allowed in each state""",
md("""Fit by EM and call each guide cell's state (the most probable allowed state). Accuracy counts
**guide cells only**: controls are pinned, so counting them would only inflate it. Baselines on the
same guide cells: calling every guide cell perturbed; the two-state model in which both
perturbations share one perturbed state; and two separate two-state models, one per perturbation."""),
"""three.fit(X, labels=lab, control="control")
call = np.array(three.state_names)[three.responsibilities.argmax(1)]
acc3 = np.mean(call[guide] == truth[guide])

shared = ScOTGM(random_state=0).fit(X, labels=lab, control="control")
call2 = np.where(shared.responsibilities[:, 1] > 0.5, lab, "basal")   # perturbed -> its own label
acc_shared = np.mean(call2[guide] == truth[guide])

call_sep = call.copy()
for p in (A, B):
    r = ctrl | (lab == p)
    sep = ScOTGM(random_state=0).fit(X[r], labels=lab[r], control="control")
    call_sep[r] = np.where(sep.responsibilities[:, 1] > 0.5, p, "basal")
acc_sep = np.mean(call_sep[guide] == truth[guide])

print(f"RESULT guide_accuracy_three_state = {acc3:.3f}")
print(f"RESULT guide_accuracy_all_perturbed = {np.mean(truth[guide] != 'basal'):.3f}")
print(f"RESULT guide_accuracy_shared_two_state = {acc_shared:.3f}")
print(f"RESULT guide_accuracy_separate_two_state = {acc_sep:.3f}")
pd.crosstab(pd.Series(truth[guide], name="truth"), pd.Series(call[guide], name="called (three states)"))""",
md("""On the guide cells the three-state model is at least 0.1 more accurate than calling every guide
cell perturbed, and at least 0.1 more accurate than the shared two-state model, which cannot
place two shifts in different directions in one state. It does as well as two separate
two-state fits (within 0.03): one joint model of both perturbations, with a shared basal
state, loses nothing.

The EM fit is the MAP of this very graph: the graph's compiled log density (untransformed space)
at the EM point equals the value EM reports."""),
"""point = three.idata.map_estimate
logp = graph.compile_logp(jacobian=False)
x0 = model_point(graph, point["weights"].values, point["means"].values, point["precisions"].values)
print(f"RESULT logp_gap = {abs(float(logp(x0)) - float(point['lp'])):.2e}")""",
md("""## 2. Is the third state worth it? NUTS and LOO

The mask makes the weights non-conjugate, so the three-state model is sampled by NUTS
(`pm.sample` on the graph, started from the EM fit); the shared two-state model by Gibbs. Both
carry the per-cell log-likelihood of the same observed cells, so `az.compare` ranks them by
expected log predictive density (LOO)."""),
"""with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConvergenceWarning)
    three_nuts = ScOTGM(n_states=3, state_names=["basal", A, B], random_state=0, draws=300, tune=300, chains=2)
    three_nuts.fit(X, labels=lab, control="control", method="nuts")
    shared_gibbs = ScOTGM(random_state=0, draws=500, tune=200, chains=4)
    shared_gibbs.fit(X, labels=lab, control="control", method="mcmc")
for w in caught:
    if issubclass(w.category, ConvergenceWarning):
        print("ConvergenceWarning:", w.message)
names = ["weights", "means", "covariances"]
rhat = max(float(np.nanmax(az.rhat(three_nuts.idata, var_names=names)[v].values)) for v in names)
print(f"RESULT max_rhat_three_state_nuts = {rhat:.3f}")
rhat2 = max(float(np.nanmax(az.rhat(shared_gibbs.idata, var_names=names)[v].values)) for v in names)
print(f"RESULT max_rhat_shared_gibbs = {rhat2:.3f}")
call_nuts = np.array(three_nuts.state_names)[three_nuts.responsibilities.argmax(1)]
print(f"RESULT guide_accuracy_three_state_nuts = {np.mean(call_nuts[guide] == truth[guide]):.3f}")
cmp = az.compare({"three states": three_nuts.idata, "two states, shared": shared_gibbs.idata})
print(f"RESULT loo_best = {cmp.index[0].replace(' ', '_').replace(',', '')}")
print(f"RESULT loo_elpd_diff_in_se = {abs(cmp['elpd_diff'].iloc[1]) / cmp['dse'].iloc[1]:.1f}")
cmp""",
md("""The three-state model's largest R-hat under NUTS is below 1.05 (the `ConvergenceWarning`
above, if it names `method='nuts'`, reports the package's stricter bar of 1.01 and a bulk ESS of
400: longer chains would be needed for that), and its guide-cell accuracy is within 0.05 of EM's.
The shared two-state model's Gibbs chains do not mix (R-hat above 1.01, the warning above): its
one perturbed state is pulled between two shifts in different directions, a symptom of a
misspecified model. LOO prefers the three-state model, by more than four standard errors of the
difference (with unmixed chains for the shared model the size of the gap is approximate, its
sign is not in doubt)."""),
"""az.plot_forest(three_nuts.idata, var_names=["perturbation_mean"], combined=True, backend="matplotlib");""",
md("""## 3. Extending the graph by hand

`pm.model.fgraph.clone_model` copies the graph; inside the copy we can add variables. Here: a
hierarchical prior on the perturbation shifts, `mean_k - mean_basal ~ Normal(0, shift_scale)`
with `shift_scale ~ HalfNormal(1)`, added as a `Potential`. We fit it by `pm.find_MAP` from the
EM point (the new variable starts at 1) and compare its shifts with EM's."""),
"""ext = pm.model.fgraph.clone_model(graph)
with ext:
    shift_scale = pm.HalfNormal("shift_scale", sigma=1.0)
    pm.Potential("shift_shrinkage", pm.logp(pm.Normal.dist(0.0, shift_scale), ext["perturbation_mean"]).sum())
print(ext.str_repr())
start = dict(x0, shift_scale_log__=np.array(0.0))
fit_ext = pm.find_MAP(initvals=start, model=ext, jitter=False, return_inferencedata=True,
                      progressbar=False).posterior.isel(chain=0, draw=0)
shift_em = point["perturbation_mean"].values
shrink = 1 - np.linalg.norm(fit_ext["perturbation_mean"], axis=1) / np.linalg.norm(shift_em, axis=1)
print(f"RESULT shift_scale_map = {float(fit_ext['shift_scale']):.3f}")
print(f"RESULT max_shift_shrinkage = {shrink.max():.3f}")
print(f"RESULT min_shift_shrinkage = {shrink.min():.3f}")
pd.DataFrame({"EM": np.linalg.norm(shift_em, axis=1), "with shrinkage prior": np.linalg.norm(fit_ext["perturbation_mean"], axis=1)},
             index=three.state_names[1:]).rename_axis("shift length")""",
md("""Every shift gets shorter, none by more than 60% (fractions printed above). Part of that is the
prior, part the point estimate: the MAP of a hierarchical scale is pulled towards zero (the
density of `shift_scale` grows as the shifts and their scale shrink together), so
`pm.sample(model=ext, initvals=...)`, which samples the clone like any PyMC model, is the fit to
trust for the size of the shrinkage. The same clone could take another likelihood or more
variables."""),
md("""The same clone, sampled by NUTS through `ScOTGM.fit(..., method="nuts", model=ext)`: the built
graph's variables start from EM, `shift_scale` from PyMC's initial point. What the package computes
with its own formulas for the built graph (`responsibilities`, `predict_proba`) it refuses for an
extended one, saying what to call instead; `sample_posterior_predictive` goes through
`pm.sample_posterior_predictive` on the clone."""),
"""with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConvergenceWarning)
    ext_nuts = ScOTGM(n_states=3, state_names=["basal", A, B], random_state=0).fit(
        X, labels=lab, control="control", method="nuts", model=ext, draws=300, tune=300, chains=2)
for w in caught:
    if issubclass(w.category, ConvergenceWarning):
        print("ConvergenceWarning:", w.message)
rhat = az.rhat(ext_nuts.idata, var_names=["shift_scale", "perturbation_mean"])
print(f"RESULT max_rhat_extension_nuts = {max(float(rhat[v].max()) for v in rhat.data_vars):.3f}")
shift_nuts = np.linalg.norm(ext_nuts.idata.posterior["perturbation_mean"].mean(("chain", "draw")).values, axis=1)
shrink_nuts = 1 - shift_nuts / np.linalg.norm(shift_em, axis=1)
print(f"RESULT max_shift_shrinkage_nuts = {shrink_nuts.max():.3f}")
try:
    ext_nuts.responsibilities
except ValueError as err:
    print("refused:", err)
rep = ext_nuts.sample_posterior_predictive(draws=50, random_seed=0).posterior_predictive["X"].values
print(f"RESULT extension_ppc_max_standardised_mean_gap = {(np.abs(rep.mean((0, 1, 2)) - X.mean(0)) / X.std(0)).max():.3f}")""",
md("""NUTS on the extension converges (largest R-hat below 1.05), and its posterior mean shifts are
shrunk by less than the MAP shrank them (printed above), as expected of a hierarchical scale
whose mode sits nearer zero than its mass. The replicated cells' mean of every PC is within 0.1
observed standard deviations of the observed mean."""),
md("""## 4. Changing the prior through `model_config`

The prior is part of the model: `model_config` chooses it, it is stored with the fit
(`idata.attrs["model_config"]`, so `ScOTGM.save` / `ScOTGM.load` rebuild the same model). On
perturbation A alone, the default weakly informative `"scaled"` prior, the screen pipeline's
`"ridge"` prior with the paper's ridge (0.01), and one ten times stronger."""),
"""rA = ctrl | (lab == A)
truly = ~escaped[rA][~ctrl[rA]]
print(f"RESULT true_perturbed_share = {truly.mean():.3f}")
for name, config in [("scaled", {}), ("ridge_0.01", {"prior": "ridge", "regularization": 0.01}),
                     ("ridge_0.1", {"prior": "ridge", "regularization": 0.1})]:
    m = ScOTGM(model_config=config, random_state=0).fit(X[rA], labels=lab[rA], control="control")
    hit = m.responsibilities[~ctrl[rA], 1] > 0.5
    w = float(m.idata.map_estimate["weights"].sel(state="perturbed"))
    print(f"RESULT escape_accuracy_{name} = {np.mean(hit == truly):.3f}")
    print(f"RESULT perturbed_weight_{name} = {w:.3f}")
print(m.idata.attrs["model_config"])""",
md("""The scaled prior separates escaped from perturbed guide cells (accuracy at least 0.75, and its
perturbed-state weight within 0.1 of the true share printed above). The ridge prior, at either
strength, widens the states until the perturbed state takes nearly all guide cells (weight above
0.9), and its accuracy falls to about the share of truly perturbed cells (within 0.05): on these
few PCs and 350 cells it does not find the escaped cells. The prior is a modelling choice, not a
detail."""),
]

books = {"01_quickstart_papalexi": NB1, "02_posterior_diagnostics": NB2, "03_extending_the_model": NB3}
which = sys.argv[1:] or list(books)
for name in which:
    n = nb(books[name])
    t = time.time()
    NotebookClient(n, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(Path(__file__).resolve().parent)}}).execute()
    nbf.write(n, str(Path(__file__).resolve().parent / f"{name}.ipynb"))
    print(name, f"{time.time() - t:.1f}s")
    for c in n.cells:
        for o in c.get("outputs", []):
            if o.get("name") == "stdout" and ("RESULT" in o.get("text", "") or "Warning" in o.get("text", "")):
                print("  ", "\n   ".join(l for l in o["text"].splitlines() if "RESULT" in l or "Warning" in l))
