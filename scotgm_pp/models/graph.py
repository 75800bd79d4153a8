"""The sc-OTGM generative graph declared in PyMC: the source of truth of the model.

Per perturbation experiment, in an ``d``-dimensional PCA space, with ``K`` states:

* ``weights ~ Dirichlet(alpha)``: state weights (dims ``state``);
* ``precision_k ~ Wishart(nu0, V = Psi0^{-1})``, one per state (dims ``pc, pc_bis``), or one
  shared ``precision`` with ``covariance="tied"``;
* ``mean_k | precision_k ~ N(m0, (kappa0 precision_k)^{-1})`` (dims ``pc``);
* every cell ``i`` has a set of allowed states ``A_i`` (the ``allowed_states`` data, dims
  ``cell, state``): its state is drawn from the weights renormalised over ``A_i`` and
  ``x_i | z_i ~ N(mean_z, precision_z^{-1})``. The state is marginalised in the observed
  variable ``X`` (dims ``cell, pc``)::

      log p(x_i) = logsumexp_{k in A_i} [log w_k - log sum_{j in A_i} w_j + log N(x_i | k)]

  A free cell allows every state (a plain mixture), a pinned cell one state (no weight term:
  e.g. non-targeting controls in state 0), and a cell may allow any subset in between (guide
  cells of perturbation ``g`` allowed ``{basal, g}`` in a model of several perturbations).

``X`` is one :class:`pymc.CustomDist` over all cells, whatever the options: its ``logp`` is
the marginal above (``pm.compute_log_likelihood`` gives it per cell, for ``az.loo``) and its
generative ``dist`` draws the state and then the scores, so ``pm.sample_prior_predictive`` and
``pm.sample_posterior_predictive`` draw cells from the graph.

Given ``counts``, the count observation layer joins the graph (:mod:`scotgm_pp.models.count_graph`):
every cell's counts are negative binomial with a state-specific log rate and share the cell's
state with its PCA scores; the observed variable is then ``XY`` (dims ``cell, feature``: the
PCs, then the genes), with the same marginal over the allowed states.

Two options change the graph (the default, ``mean_parametrization="state"`` without a design, is
the one above):

* ``mean_parametrization="shift"``: the reference state's mean is ``mean_0`` as above, and every
  other state's mean is ``mean_0 + shift_k`` with ``shift_k ~ Normal(0, shift_sd)`` (dims ``pc``,
  independent of the precisions); ``mean_{k}`` (k >= 1) is then a deterministic. A prior on the
  perturbation itself, seen by ``pm.sample_prior_predictive``.
* ``design`` (cells x covariates, dims ``cell, covariate``): ``design_coef ~ Normal(0, design_sd)``
  (dims ``covariate, pc``) moves every cell's mean, whatever its state: cell ``i`` in state ``k``
  has mean ``means[k] + design_i @ design_coef``; with counts also
  ``design_count_coef ~ Normal(0, design_count_sd)`` (dims ``covariate, gene``) is added to every
  cell's log rate. The state means are those of a cell whose covariates are all 0 (the reference
  levels of one-hot columns, the mean of centred ones).

No variable carries an ``initval``: starting points go to ``pm.sample(initvals=...)`` or
``pm.find_MAP(initvals=...)`` (:func:`initial_values`, :func:`model_point`), so
``pm.model.fgraph.clone_model`` and ``pm.compute_log_likelihood`` work on the model.

The EM backends maximise exactly these densities in the untransformed space
(``model.compile_logp(jacobian=False)``): :func:`scotgm_pp.inference.fit_em` the Gaussian graph,
:func:`scotgm_pp.inference.joint_em.fit_joint_em` (``evidence="joint"``) the joint one;
``tests/test_em_pymc.py`` and ``tests/test_count_graph.py`` hold them to each other.

Notes on :class:`pymc.Wishart` in PyMC 5.28
--------------------------------------------
* its ``logp`` is not batched (it uses ``V.shape[0]`` and ``X.T``), so one precision is
  declared per state and the states are stacked into the ``precisions`` deterministic;
* it casts ``nu`` to an integer, so a non-integer prior ``dof`` would silently be truncated:
  :func:`build_model` refuses one;
* it has no default transform and its ``logp`` is ``-inf`` unless the value is exactly
  symmetric, so no gradient method could move it. :class:`LogCholeskyTransform` is attached
  instead: the value variable is the packed lower Cholesky factor with a log diagonal, and
  the back-transform is exactly symmetric. This makes :func:`pymc.find_MAP` usable.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pymc.logprob.transforms import Transform
from pytensor.tensor.type_other import NoneTypeT

from ..inference.count_layer import CountPrior, default_count_prior
from ..inference.joint_em import COUNT_LIKELIHOODS
from ..inference.em import NormalWishartPrior, default_prior, validate_allowed_states, validate_scores
from .count_graph import add_count_layer, cells_joint, count_coords

__all__ = [
    "LogCholeskyTransform",
    "MEAN_PARAMETRIZATIONS",
    "build_model",
    "check_design",
    "data_scale_sd",
    "state_log_terms_function",
    "initial_values",
    "known_free_variables",
    "default_contrasts",
    "default_state_names",
    "model_point",
]


MEAN_PARAMETRIZATIONS = ("state", "shift")
"""``"state"``: a Normal-Wishart mean per state (the default graph); ``"shift"``: ``mean_0`` and a
shift ``shift_k`` per other state, ``mean_k = mean_0 + shift_k``."""


class LogCholeskyTransform(Transform):
    """Positive-definite ``(d, d)`` matrix <-> packed lower Cholesky factor with log diagonal.

    ``forward(A)`` returns the ``d (d + 1) / 2`` entries of ``L = chol(A)`` (row-major lower
    triangle) with the diagonal entries replaced by their logarithm; ``backward`` rebuilds
    ``L`` and returns the exactly symmetric ``(L L^T + (L L^T)^T) / 2``.
    """

    name = "logchol"
    ndim_supp = 2

    def __init__(self, d: int):
        self.d = int(d)
        rows, cols = np.tril_indices(self.d)
        self._rows, self._cols = rows, cols
        self._is_diag = (rows == cols).astype("float64")
        # 0-based row of each diagonal entry in packed order
        self._diag_pos = np.flatnonzero(rows == cols)

    def forward(self, value, *inputs):
        L = pt.linalg.cholesky(pt.as_tensor(value), lower=True)
        packed = L[self._rows, self._cols]
        return pt.where(self._is_diag > 0, pt.log(packed), packed)

    def backward(self, value, *inputs):
        value = pt.as_tensor(value)
        entries = pt.where(self._is_diag > 0, pt.exp(value), value)
        L = pt.zeros((self.d, self.d), dtype=value.dtype)
        L = pt.set_subtensor(L[self._rows, self._cols], entries)
        A = L @ L.T
        return 0.5 * (A + A.T)

    def log_jac_det(self, value, *inputs):
        # A = L L^T has |dA/dL| = 2^d prod_i L_ii^(d - i) (0-based i); L_ii = exp(y_ii) adds y_ii.
        value = pt.as_tensor(value)
        y_diag = value[self._diag_pos]
        powers = np.arange(self.d, 0, -1, dtype="float64") + 1.0
        return self.d * np.log(2.0) + pt.sum(powers * y_diag)

    def forward_numpy(self, A: np.ndarray) -> np.ndarray:
        """NumPy version of :meth:`forward` (to build starting points without compiling)."""
        L = np.linalg.cholesky(np.asarray(A, float))
        packed = L[self._rows, self._cols].copy()
        packed[self._diag_pos] = np.log(packed[self._diag_pos])
        return packed

    def backward_numpy(self, y: np.ndarray) -> np.ndarray:
        """NumPy version of :meth:`backward`."""
        y = np.asarray(y, float)
        entries = np.where(self._is_diag > 0, np.exp(y), y)
        L = np.zeros((self.d, self.d))
        L[self._rows, self._cols] = entries
        A = L @ L.T
        return 0.5 * (A + A.T)


def default_state_names(n_states: int) -> list[str]:
    """``["basal", "perturbed"]`` for two states, ``["state_0", ...]`` otherwise."""
    if n_states == 2:
        return ["basal", "perturbed"]
    return [f"state_{k}" for k in range(n_states)]


def default_contrasts(n_states: int) -> list[tuple[int, int]]:
    """Every state against state 0: ``[(1, 0), (2, 0), ...]`` as ``(state, reference)``."""
    return [(k, 0) for k in range(1, n_states)]


def _check_prior(prior: NormalWishartPrior, d: int, n_states: int) -> None:
    if np.shape(prior.mean) != (d,) or np.shape(prior.scale_inv) != (d, d):
        raise ValueError(
            f"prior is for {np.shape(prior.mean)[0]} features but X has {d}; build it with "
            "default_prior(X, n_states)."
        )
    if np.shape(prior.dirichlet) != (n_states,):
        raise ValueError(
            f"prior.dirichlet has {np.size(prior.dirichlet)} entries but n_states={n_states}."
        )
    if float(prior.dof) != round(float(prior.dof)):
        raise ValueError(
            f"prior.dof={prior.dof} is not an integer; pm.Wishart truncates nu to an integer, so "
            "the PyMC graph would not be the model EM fits. Use an integer extra_dof in default_prior."
        )


def data_scale_sd(X: np.ndarray) -> np.ndarray:
    """The standard deviation of the scores along every PC over all cells, ``(d,)``: the default
    prior SD of the shifts and of the design coefficients (a PC without spread gets the mean SD
    of the others, or 1)."""
    X = np.asarray(X, float)
    sd = X.std(axis=0) if X.shape[0] > 1 else np.ones(X.shape[1])
    fallback = float(np.mean(sd[sd > 0])) if np.any(sd > 0) else 1.0
    return np.where(sd > 0, sd, fallback)


def _prior_sd(value, d: int, name: str, X: np.ndarray) -> np.ndarray:
    """A positive SD per PC from ``None`` (:func:`data_scale_sd`), a number or ``d`` numbers."""
    if value is None:
        return data_scale_sd(X)
    sd = np.broadcast_to(np.asarray(value, float), (d,)) if np.ndim(value) == 0 else np.asarray(value, float)
    if sd.shape != (d,) or not np.all(np.isfinite(sd)) or not np.all(sd > 0):
        raise ValueError(f"{name} must be None (the scores' SD per PC), a positive number or {d} positive numbers "
                         f"(one per PC), got {value!r}.")
    return np.array(sd, float)


def check_design(design, n: int) -> np.ndarray:
    """A per-cell design matrix as a float ``(n, q)`` array, checked: finite, one row per cell, no
    constant column and no column that the others and a constant reproduce (the state means carry
    the intercept, so an intercept column, or every level of a one-hot factor, would leave the
    coefficients to the prior alone)."""
    D = np.asarray(design, dtype=float)
    if D.ndim == 1:
        D = D[:, None]
    if D.ndim != 2 or D.shape[0] != n or D.shape[1] < 1:
        raise ValueError(f"design must be a cells x covariates matrix with one row per cell ({n}), got shape "
                         f"{np.shape(design)}.")
    if not np.all(np.isfinite(D)):
        raise ValueError("design contains non-finite values; impute or drop those cells first.")
    constant = np.flatnonzero(np.ptp(D, axis=0) == 0)
    if constant.size:
        raise ValueError(f"design column(s) {constant.tolist()} are constant: the state means carry the intercept, so "
                         "drop intercept columns (and columns of a level no cell has).")
    with_intercept = np.column_stack([np.ones(n), D])
    if np.linalg.matrix_rank(with_intercept) < D.shape[1] + 1:
        raise ValueError("design columns are collinear with each other or with an intercept (e.g. every level of a "
                         "one-hot factor): drop the reference level of each factor and any redundant column.")
    return D


def build_model(
    X: np.ndarray,
    *,
    fixed_state: np.ndarray | None = None,
    allowed_states: np.ndarray | None = None,
    n_states: int = 2,
    prior: NormalWishartPrior | None = None,
    state_names: Sequence[str] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    contrasts: Sequence[tuple[int, int]] | None = None,
    covariance: str = "full",
    counts=None,
    size_factors: np.ndarray | None = None,
    dispersion: np.ndarray | None = None,
    batch: np.ndarray | None = None,
    count_prior: CountPrior | None = None,
    loadings: np.ndarray | None = None,
    mean_parametrization: str = "state",
    shift_sd=None,
    design=None,
    design_sd=None,
    design_count_sd: float = 1.0,
    count_evidence: str = "joint",
    state_probability: np.ndarray | None = None,
    count_likelihood: str = "marginal",
) -> pm.Model:
    """Declare the sc-OTGM mixture as a PyMC model, optionally with the count observation layer.

    Parameters
    ----------
    X
        Cells x PCs, shape ``(n, d)``.
    fixed_state
        Length-``n`` integers: ``-1`` for a free cell, ``k`` for a cell observed in state ``k``
        (e.g. non-targeting controls in state 0). ``None``: every cell is free.
    allowed_states
        Instead of ``fixed_state``: a boolean ``(n, n_states)`` mask of the states each cell
        may take (see the module docstring).
    n_states
        Number of states ``K >= 1`` (e.g. 2: basal and perturbed; 4: two cell types x condition).
    prior
        Normal-Wishart-Dirichlet prior; ``default_prior(X, n_states)`` when ``None``.
        Its ``dof`` must be an integer (``pm.Wishart`` truncates it otherwise).
    state_names
        Labels of the ``state`` coordinate; default :func:`default_state_names`.
    coords
        Optional coordinate values for ``"cell"`` (length ``n``), ``"pc"`` (length ``d``) and
        ``"gene"`` (with counts).
    contrasts
        Pairs ``(state, reference)`` for the perturbation deterministics; default every state
        against state 0.
    covariance
        ``"full"``: a Wishart precision per state. ``"tied"``: one Wishart precision
        ``precision`` shared by all states (states differ only by their means), the model the
        escape detection of :func:`scotgm_pp.tl.perturbation_response` uses to assign cells.
    counts
        Optional cells x genes raw counts of the same cells (dense or sparse): adds the count
        layer (:mod:`scotgm_pp.models.count_graph`), sharing each cell's state. Needs
        ``size_factors`` (library size per cell) and ``dispersion`` (plug-in NB dispersion per
        gene, or per batch and gene: ``(B, G)`` in the order of
        :func:`~scotgm_pp.inference.count_layer.batch_codes`); ``batch`` (label per cell) adds batch offsets; ``count_prior`` defaults to
        :func:`~scotgm_pp.inference.count_layer.default_count_prior`.
    loadings
        Optional genes x PCs PCA loadings ``V`` (e.g. ``adata.varm["PCs"]``), without counts:
        adds the data ``loadings`` (dims ``gene, pc``) and the deterministic
        ``perturbation_gene_mean`` (``contrast, gene``) ``= V (mean_a - mean_b)``, the paper's
        gene-level mean shift. ``coords["gene"]`` names the genes.
    mean_parametrization
        ``"state"`` (default): ``mean_k | precision_k ~ N(m0, (kappa0 precision_k)^{-1})`` for every
        state. ``"shift"``: that prior for ``mean_0`` only, and ``shift_k ~ Normal(0, shift_sd)``
        (dims ``pc``) for ``k >= 1`` with the deterministic ``mean_k = mean_0 + shift_k``.
    shift_sd
        Prior SD of every shift coordinate with ``"shift"``: ``None`` (default) for the scores'
        SD along each PC over all cells (:func:`data_scale_sd`), a number, or one per PC.
    design
        Optional cells x covariates floats (e.g. one-hot batches without the reference level, or
        centred covariates), checked by :func:`check_design`; ``coords["covariate"]`` names the
        columns. Adds the data ``design`` (``cell, covariate``) and ``design_coef ~ Normal(0,
        design_sd)`` (``covariate, pc``): cell ``i`` in state ``k`` has scores
        ``N(means[k] + design_i @ design_coef, Sigma_k)``. With counts also
        ``design_count_coef ~ Normal(0, design_count_sd)`` (``covariate, gene``) on every cell's
        log rate.
    design_sd
        Prior SD of ``design_coef``: ``None`` (default) for :func:`data_scale_sd` per PC (a unit
        change of a covariate moves the mean by about one SD of the scores a priori), a number,
        or one per PC.
    design_count_sd
        Prior SD of ``design_count_coef`` (natural-log rate per unit of a covariate).
    count_evidence
        With counts: ``"joint"`` (default here) declares the joint density, the counts informing
        every cell's state; ``"cut"`` declares the cut the screen answers with: the scores'
        mixture density times, for every gene, the counts' likelihood with the cell's state
        integrated out gene by gene over its fixed state probabilities,
        ``sum_g log sum_k r_ik NB(y_ig | k)`` (``count_likelihood="marginal"``), with ``r`` the
        data ``state_probability`` (``cell, state``). The counts then inform the count layer's
        parameters and not the states; EM's cut (:func:`~scotgm_pp.inference.count_fit.fit_marginal`
        given ``r``) is this graph's MAP, and NUTS samples it.
    state_probability
        ``(n, K)`` state probabilities of the cut (rows summing to 1, zero where a state is not
        allowed); default: the allowed states in equal shares (set the EM's responsibilities
        with ``pm.set_data`` before sampling, as :meth:`scotgm_pp.models.ScOTGM.fit` does).
    count_likelihood
        The cut's count density: ``"marginal"`` (default) ``sum_g log sum_k r_ik NB(y_ig | k)``;
        ``"weighted"`` ``sum_k r_ik sum_g log NB(y_ig | k)`` (each state's log-likelihood
        weighted by the cell's probability of it; escaped cells then keep weight in the
        perturbed state and a knock-down's effect is estimated too weak). Ignored by the joint.

    Returns
    -------
    pymc.Model
        Free variables ``weights`` (dims ``state``), ``mean_{k}`` (``pc``) and
        ``precision_{k}`` (``pc, pc_bis``, log-Cholesky transformed; ``precision`` when tied);
        data ``allowed_states`` (``cell, state``); observed ``X`` (``cell, pc``);
        deterministics ``means`` (``state, pc``), ``precisions`` and ``covariances``
        (``state, pc, pc_bis``), ``perturbation_mean`` (``contrast, pc``) = ``mean_a - mean_b``
        and ``perturbation_cov_independent`` (``contrast, pc, pc_bis``) = ``Sigma_a + Sigma_b``
        (the independent coupling). With counts, also ``beta`` (``gene``), ``delta``
        (``effect_state, gene``), ``gamma`` (``batch_offset, gene``, with batches),
        ``state_log_rate`` (``state, gene``), and the observed ``XY`` (``cell, feature``: the
        PCs, then the genes) in place of ``X``; with ``count_evidence="cut"`` also the data
        ``state_probability`` (``cell, state``). With ``"shift"``: ``shift_{k}`` (``pc``) free
        and ``mean_{k}`` deterministic for ``k >= 1``. With a design: data ``design``, free
        ``design_coef`` (and ``design_count_coef`` with counts).
    """
    X = validate_scores(X)
    n, d = X.shape
    if int(n_states) != n_states or n_states < 1:
        raise ValueError(f"n_states must be a positive integer, got {n_states!r}.")
    n_states = int(n_states)
    if covariance not in ("full", "tied"):
        raise ValueError(f"covariance must be 'full' or 'tied', got {covariance!r}.")
    if mean_parametrization not in MEAN_PARAMETRIZATIONS:
        raise ValueError(f"mean_parametrization must be one of {MEAN_PARAMETRIZATIONS}, got {mean_parametrization!r}.")
    shift_prior_sd = _prior_sd(shift_sd, d, "shift_sd", X) if mean_parametrization == "shift" else None
    D = None if design is None else check_design(design, n)
    design_prior_sd = None if D is None else _prior_sd(design_sd, d, "design_sd", X)
    if D is not None and not float(design_count_sd) > 0:
        raise ValueError(f"design_count_sd must be > 0, got {design_count_sd!r}.")
    _, mask = validate_allowed_states(allowed_states, fixed_state, n, n_states)
    prior = default_prior(X, n_states) if prior is None else prior
    _check_prior(prior, d, n_states)

    names = list(state_names) if state_names is not None else default_state_names(n_states)
    if len(names) != n_states or len(set(map(str, names))) != n_states:
        raise ValueError(f"state_names must be {n_states} distinct labels, got {names!r}.")
    names = [str(s) for s in names]
    pairs = [tuple(map(int, c)) for c in (contrasts if contrasts is not None else default_contrasts(n_states))]
    for a, b in pairs:
        if not (0 <= a < n_states and 0 <= b < n_states) or a == b:
            raise ValueError(f"contrast {(a, b)} must name two different states in 0..{n_states - 1}.")

    coords = dict(coords or {})
    genes = coords.pop("gene", None)
    cells = [str(c) for c in coords.pop("cell", [f"cell_{i}" for i in range(n)])]
    pcs = [str(c) for c in coords.pop("pc", [f"PC{j + 1}" for j in range(d)])]
    covariates = coords.pop("covariate", None)
    if len(cells) != n or len(pcs) != d:
        raise ValueError(f"coords['cell'] needs {n} labels and coords['pc'] {d}; got {len(cells)}, {len(pcs)}.")
    if covariates is not None and D is None:
        raise ValueError("coords['covariate'] names the columns of design; pass design= too.")
    if D is not None:
        covariates = [str(c) for c in (covariates if covariates is not None else
                                        [f"covariate_{j}" for j in range(D.shape[1])])]
        if len(covariates) != D.shape[1] or len(set(covariates)) != D.shape[1]:
            raise ValueError(f"coords['covariate'] needs {D.shape[1]} distinct labels (the columns of design), got "
                             f"{covariates!r}.")
    if coords:
        raise ValueError(f"coords may only set 'cell', 'pc', 'gene' and 'covariate'; unexpected keys {sorted(coords)}.")
    Y = _check_counts(counts, n, size_factors, dispersion)
    if count_evidence not in ("joint", "cut"):
        raise ValueError(f"count_evidence must be 'joint' or 'cut', got {count_evidence!r}.")
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    R_cut = None
    if Y is not None and count_evidence == "cut":
        R_cut = check_state_probability(state_probability, mask)
    elif state_probability is not None:
        raise ValueError("state_probability belongs to the cut count layer: pass counts= and count_evidence='cut'.")
    pca_loadings = None
    if loadings is not None:
        if Y is not None:
            raise ValueError("pass loadings or counts, not both (the count layer names the genes by its own columns).")
        pca_loadings = np.asarray(loadings, float)
        if pca_loadings.ndim != 2 or pca_loadings.shape[1] != d or not np.all(np.isfinite(pca_loadings)):
            raise ValueError(f"loadings must be a finite genes x {d} matrix (one column per PC), got shape "
                             f"{pca_loadings.shape}.")
        n_genes = pca_loadings.shape[0]
        genes = [str(g) for g in (genes if genes is not None else [f"gene_{j}" for j in range(n_genes)])]
        if len(genes) != n_genes:
            raise ValueError(f"coords['gene'] needs {n_genes} labels (the rows of loadings), got {len(genes)}.")
    if Y is not None:
        genes = [str(g) for g in (genes if genes is not None else [f"gene_{j}" for j in range(Y.shape[1])])]
        if len(genes) != Y.shape[1]:
            raise ValueError(f"coords['gene'] needs {Y.shape[1]} labels, got {len(genes)}.")
        if count_prior is None:
            count_prior = default_count_prior(Y, np.asarray(size_factors, float))
    model_coords = {"cell": cells, "pc": pcs, "pc_bis": pcs, "state": names}
    if pairs:
        model_coords["contrast"] = [f"{names[a]} - {names[b]}" for a, b in pairs]
    if Y is not None:
        model_coords.update(count_coords(n, batch, names, genes, pcs))
    if pca_loadings is not None:
        model_coords["gene"] = genes
    if D is not None:
        model_coords["covariate"] = covariates
    m0 = np.asarray(prior.mean, float)
    V = prior.scale
    V = 0.5 * (V + V.T)
    nu = int(round(float(prior.dof)))
    kappa = float(prior.kappa)

    with pm.Model(coords=model_coords) as model:
        allowed = pm.Data("allowed_states", mask.astype("int8"), dims=("cell", "state"))
        weights = pm.Dirichlet("weights", a=np.asarray(prior.dirichlet, float), dims="state")
        means, precisions = [], []

        def wishart(name):
            with warnings.catch_warnings():
                # pm.Wishart warns that NUTS cannot sample it; the transform below handles that.
                warnings.filterwarnings("ignore", message="The Wishart distribution", category=UserWarning)
                return pm.Wishart(name, nu=nu, V=V, dims=("pc", "pc_bis"), default_transform=LogCholeskyTransform(d))

        shared = wishart("precision") if covariance == "tied" else None
        for k in range(n_states):
            lam = shared if shared is not None else wishart(f"precision_{k}")
            if mean_parametrization == "shift" and k > 0:
                shift = pm.Normal(f"shift_{k}", mu=0.0, sigma=shift_prior_sd, shape=(d,), dims="pc")
                means.append(pm.Deterministic(f"mean_{k}", means[0] + shift, dims="pc"))
            else:
                means.append(pm.MvNormal(f"mean_{k}", mu=m0, tau=kappa * lam, dims="pc"))
            precisions.append(lam)
        means_t = pm.Deterministic("means", pt.stack(means), dims=("state", "pc"))
        precisions_t = pm.Deterministic("precisions", pt.stack(precisions), dims=("state", "pc", "pc_bis"))
        covs = pt.stack([pt.linalg.inv(lam) for lam in precisions])
        covs = pm.Deterministic("covariances", 0.5 * (covs + covs.transpose(0, 2, 1)), dims=("state", "pc", "pc_bis"))
        if pairs:
            a_idx = np.array([a for a, _ in pairs])
            b_idx = np.array([b for _, b in pairs])
            pm.Deterministic("perturbation_mean", means_t[a_idx] - means_t[b_idx], dims=("contrast", "pc"))
            pm.Deterministic(
                "perturbation_cov_independent", covs[a_idx] + covs[b_idx], dims=("contrast", "pc", "pc_bis")
            )
            if pca_loadings is not None:
                V_t = pm.Data("loadings", pca_loadings, dims=("gene", "pc"))
                pm.Deterministic("perturbation_gene_mean", (means_t[a_idx] - means_t[b_idx]) @ V_t.T,
                                 dims=("contrast", "gene"))
        log_w = cell_log_weights(weights, allowed)
        design_t = cell_shift = None
        if D is not None:
            design_t = pm.Data("design", D, dims=("cell", "covariate"))
            coef = pm.Normal("design_coef", mu=0.0, sigma=np.broadcast_to(design_prior_sd, (D.shape[1], d)),
                             shape=(D.shape[1], d), dims=("covariate", "pc"))
            cell_shift = design_t @ coef  # (n, d): every cell's offset of its state mean
        if Y is None and cell_shift is None:
            pm.CustomDist(
                "X", means_t, precisions_t, log_w,
                logp=_gaussian_logp(n_states), dist=_gaussian_dist(d),
                signature="(k,d),(k,d,d),(k)->(d)", observed=X, dims=("cell", "pc"),
            )
        elif Y is None:
            pm.CustomDist(
                "X", means_t, precisions_t, log_w, cell_shift,
                logp=_gaussian_logp(n_states, shifted=True), dist=_gaussian_dist(d, shifted=True),
                signature="(k,d),(k,d,d),(k),(d)->(d)", observed=X, dims=("cell", "pc"),
            )
        else:
            layer = add_count_layer(Y, size_factors=size_factors, dispersion=dispersion, batch=batch,
                                    count_prior=count_prior, state_names=names, genes=genes, design=design_t,
                                    design_count_sd=float(design_count_sd))
            r_t = None if R_cut is None else pm.Data("state_probability", R_cut, dims=("cell", "state"))
            cells_joint("XY", means=means_t, precisions=precisions_t, log_weights=log_w, layer=layer,
                        observed=np.hstack([X, Y]), d=d, n_states=n_states, dims=("cell", "feature"),
                        cell_shift=cell_shift, state_probability=r_t, count_likelihood=count_likelihood)
    return model


def check_state_probability(state_probability, mask: np.ndarray) -> np.ndarray:
    """The cut's ``(n, K)`` state probabilities, checked against the allowed states ``mask``;
    ``None``: the allowed states in equal shares."""
    mask = np.asarray(mask, bool)
    if state_probability is None:
        return mask / mask.sum(axis=1, keepdims=True)
    R = np.asarray(state_probability, float)
    if R.shape != mask.shape:
        raise ValueError(f"state_probability must be cells x states {mask.shape}, got shape {R.shape}.")
    if not np.all(np.isfinite(R)) or (R < 0).any() or not np.allclose(R.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("state_probability must hold finite non-negative rows that sum to 1 (each cell's state "
                         "probabilities, e.g. an EM fit's responsibilities).")
    if np.any(R[~mask] > 0):
        raise ValueError("state_probability gives weight to a state a cell may not take (see allowed_states).")
    return R


def cell_log_weights(weights, allowed):
    """``(n, K)`` log prior state probabilities of each cell: ``log w_k - log sum_{j in A_i} w_j``
    for the allowed states, ``-inf`` for the others (``allowed``: the 0/1 ``(n, K)`` mask)."""
    allowed = pt.as_tensor(allowed)
    norm = pt.log(pt.sum(weights[None, :] * allowed, axis=-1, keepdims=True))
    return pt.switch(pt.eq(allowed, 1), pt.log(weights)[None, :] - norm, -np.inf)


def gaussian_log_densities(x, means, precisions, n_states: int):
    """``(n, K)`` log N(x_i | mean_k, precision_k^{-1}) by one Cholesky factor per state and
    matrix products (``x' Lambda x = |x' L|^2`` for ``Lambda = L L'``), so that the gradient
    stays a few matrix products rather than a solve per cell."""
    d = x.shape[-1]
    comps = []
    for k in range(n_states):
        L = pt.linalg.cholesky(precisions[k], lower=True)
        z = (x - means[k]) @ L
        half_logdet = pt.sum(pt.log(pt.diagonal(L)))
        comps.append(half_logdet - 0.5 * pt.sum(z**2, axis=-1) - 0.5 * d * np.log(2.0 * np.pi))
    return pt.stack(comps, axis=-1)


def gaussian_state_terms(value, means, precisions, log_w, n_states: int, cell_shift=None):
    """``(n, K)``: ``log N(x_i | mean_k + shift_i, precision_k^{-1}) + log_w[i, k]``, the terms whose
    ``logsumexp`` over the states is a cell's marginal log density (``cell_shift``: the ``(n, d)``
    design offsets of the cells' means, or ``None``)."""
    x = value if cell_shift is None else value - cell_shift
    return gaussian_log_densities(x, means, precisions, n_states) + log_w


def _gaussian_logp(n_states: int, shifted: bool = False):
    if shifted:
        def logp_shifted(value, means, precisions, log_w, cell_shift):
            return pt.logsumexp(gaussian_state_terms(value, means, precisions, log_w, n_states, cell_shift), axis=-1)

        return logp_shifted

    def logp(value, means, precisions, log_w):
        return pt.logsumexp(gaussian_log_densities(value, means, precisions, n_states) + log_w, axis=-1)

    return logp


def _gaussian_dist(d: int, shifted: bool = False):
    def dist(means, precisions, log_w, size):
        n = log_w.shape[0] if size is None or isinstance(size.type, NoneTypeT) else size[0]
        z = pm.Categorical.dist(logit_p=log_w, shape=(n,))
        chol = pt.linalg.cholesky(pt.linalg.inv(precisions))  # (K, d, d), Sigma_k = L L^T
        eps = pm.Normal.dist(0.0, 1.0, shape=(n, d))
        return means[z] + (chol[z] @ eps[..., None])[..., 0]

    if shifted:
        def dist_shifted(means, precisions, log_w, cell_shift, size):
            return dist(means, precisions, log_w, size) + cell_shift

        return dist_shifted
    return dist


def state_log_terms_function(model: pm.Model):
    """A NumPy function of the free variables' values (untransformed, keyed by name) returning the
    ``(n, K)`` per-state log terms of the model's observed cells (``X`` or ``XY``): the prior
    state probability plus the cell's log density in that state (of its scores alone in the cut
    count graph, whose states the counts do not inform), read from the observed
    variable's own inputs (the design offsets and the count layer included), so that a softmax
    over the states gives the cells' state probabilities under the graph."""
    import pytensor
    from pytensor.graph.replace import clone_replace

    from .count_graph import joint_state_terms

    name = "XY" if "XY" in model.named_vars else "X"
    rv = model[name]
    params = rv.owner.op.dist_params(rv.owner)
    observed = model.rvs_to_values[rv]
    K = len(model.coords["state"])
    if name == "X":
        shift = params[3] if len(params) > 3 else None
        terms = gaussian_state_terms(observed, params[0], params[1], params[2], K, shift)
    elif "state_probability" in model.named_vars:  # the cut: the states see the scores only
        d = len(model.coords["pc"])
        shift = params[7] if len(params) > 7 else None
        terms = gaussian_state_terms(observed[..., :d], params[0], params[1], params[2], K, shift)
    else:
        d = len(model.coords["pc"])
        shift = params[6] if len(params) > 6 else None
        terms = joint_state_terms(observed, *params[:6], d=d, n_states=K, cell_shift=shift)
    free = list(model.free_RVs)
    inputs = [rv.type(name=rv.name) for rv in free]
    terms = clone_replace(terms, replace=dict(zip(free, inputs)))
    fn = pytensor.function(inputs, terms, on_unused_input="ignore")
    names = [rv.name for rv in free]

    def evaluate(values: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(fn(*[np.asarray(values[v], dtype=rv.dtype) for v, rv in zip(names, free)]))

    return evaluate


def known_free_variables(n_states: int) -> set[str]:
    """Names of the free variables :func:`build_model` may declare for ``n_states`` states (the
    ones EM, Gibbs and :func:`initial_values` know)."""
    names = {"weights", "precision", "beta", "delta", "gamma", "design_coef", "design_count_coef"}
    for k in range(n_states):
        names |= {f"mean_{k}", f"precision_{k}"}
        if k > 0:
            names.add(f"shift_{k}")
    return names


def initial_values(model: pm.Model, weights: np.ndarray, means: np.ndarray, precisions: np.ndarray,
                   counts=None, unknown: str = "raise", design_coefs: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """Starting values of :func:`build_model`'s free variables, keyed by variable name, in
    the constrained space: what ``pm.sample(initvals=...)`` takes.

    Parameters
    ----------
    model
        A model from :func:`build_model`.
    weights, means, precisions
        ``(K,)``, ``(K, d)`` and ``(K, d, d)`` (precisions, i.e. inverse covariances).
    counts
        The count layer's :class:`~scotgm_pp.inference.count_layer.CountParams` (for a model
        built with counts).
    unknown
        ``"raise"``: a free variable :func:`build_model` does not declare is an error naming it;
        ``"skip"``: it is left out (PyMC then uses its own initial point).
    design_coefs
        Starting ``design_coef`` and ``design_count_coef`` (for a model with a design); a missing
        one starts at zero. A ``shift_{k}`` starts at ``means[k] - means[0]``.
    """
    weights = np.asarray(weights, float)
    means = np.asarray(means, float)
    precisions = np.asarray(precisions, float)
    out: dict[str, np.ndarray] = {}
    for rv in model.free_RVs:
        name = rv.name
        if name == "weights":
            out[name] = weights
        elif name.startswith("mean_"):
            out[name] = means[int(name.split("_")[1])]
        elif re.fullmatch(r"shift_[1-9][0-9]*", name) and int(name[6:]) < len(means):
            out[name] = means[int(name[6:])] - means[0]
        elif name in ("design_coef", "design_count_coef"):
            value = (design_coefs or {}).get(name)
            out[name] = np.zeros(_static_shape(model, rv)) if value is None else np.asarray(value, float)
        elif name.startswith("precision_"):
            lam = precisions[int(name.split("_")[1])]
            out[name] = 0.5 * (lam + lam.T)
        elif name == "precision":  # the tied model's shared precision
            out[name] = 0.5 * (precisions[0] + precisions[0].T)
        elif name in ("beta", "delta", "gamma"):
            if counts is None:
                raise ValueError("the model has a count layer: pass counts=CountParams(...).")
            out[name] = {"beta": counts.beta, "delta": counts.delta[1:], "gamma": counts.gamma[1:]}[name]
        elif unknown == "skip":
            continue
        else:
            raise KeyError(
                f"free variable {name!r} is not one build_model declares; give its starting value yourself "
                "(pm.sample(initvals={...})) or pass unknown='skip' to let PyMC choose one."
            )
    return out


def _static_shape(model: pm.Model, rv) -> tuple[int, ...]:
    shape = rv.type.shape
    if all(s is not None for s in shape):
        return tuple(int(s) for s in shape)
    return tuple(int(s) for s in rv.shape.eval())


def _check_counts(counts, n: int, size_factors, dispersion) -> np.ndarray | None:
    if counts is None:
        return None
    Y = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=float)
    if Y.ndim != 2 or Y.shape[0] != n:
        raise ValueError(f"counts must be cells x genes with {n} cells (the rows of X), got shape {Y.shape}.")
    if not np.all(np.isfinite(Y)) or (Y < 0).any() or np.any(Y != np.round(Y)):
        raise ValueError("counts must be finite non-negative integers (raw UMI counts).")
    if size_factors is None or dispersion is None:
        raise ValueError("the count layer needs size_factors (library size per cell) and dispersion (per gene).")
    if np.shape(size_factors) != (n,):
        raise ValueError(f"size_factors must have one value per cell ({n}), got shape {np.shape(size_factors)}.")
    if np.ndim(dispersion) == 2 and np.shape(dispersion)[1] == Y.shape[1]:
        return Y  # one per batch and gene (add_count_layer checks the batches)
    if np.shape(dispersion) not in ((Y.shape[1],), ()):
        raise ValueError(f"dispersion must have one value per gene ({Y.shape[1]}) or per batch and gene, got shape "
                         f"{np.shape(dispersion)}.")
    return Y


def _simplex_forward_numpy(w: np.ndarray) -> np.ndarray:
    logw = np.log(np.asarray(w, float))
    return logw[:-1] - logw.mean()


def model_point(
    model: pm.Model,
    weights: np.ndarray,
    means: np.ndarray,
    precisions: np.ndarray,
    counts=None,
    unknown: str = "raise",
    design_coefs: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The value-variable point of :func:`build_model`'s model at given parameters.

    Parameters
    ----------
    model
        A model from :func:`build_model`.
    weights, means, precisions
        ``(K,)``, ``(K, d)`` and ``(K, d, d)`` (precisions, i.e. inverse covariances).
    counts
        The count layer's :class:`~scotgm_pp.inference.count_layer.CountParams` (for a model
        built with counts).
    unknown
        As in :func:`initial_values` (``"skip"`` leaves other variables out of the point).
    design_coefs
        As in :func:`initial_values`.

    Returns
    -------
    dict
        ``{value variable name: value in the transformed space}``, ready for
        ``model.compile_logp(jacobian=False)``, ``compile_dlogp`` or ``pm.find_MAP(initvals=...)``.
    """
    raw_values = initial_values(model, weights, means, precisions, counts, unknown, design_coefs)
    point: dict[str, np.ndarray] = {}
    for rv in model.free_RVs:
        if rv.name not in raw_values:
            continue
        value = model.rvs_to_values[rv]
        transform = model.rvs_to_transforms.get(rv)
        raw = raw_values[rv.name]
        if transform is None:
            point[value.name] = raw
        elif isinstance(transform, LogCholeskyTransform):
            point[value.name] = transform.forward_numpy(raw)
        elif rv.name == "weights":
            point[value.name] = _simplex_forward_numpy(raw)
        else:  # pragma: no cover
            point[value.name] = transform.forward(pt.as_tensor(raw)).eval()
    return point
