"""Property-based checks of careless and hostile input (hypothesis), and a run killed while it works.

Each property either gives a correct result or an InputError naming the problem; nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scotgm_pp as sg
from scotgm_pp._labels import MAX_KEY_LENGTH, key_label, label_key
from scotgm_pp._validation import InputError

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny():
    return sg.datasets.simulate(n_genes=30, n_perturbations=3, n_control=40, n_cells_per_perturbation=20,
                                n_de_genes=3, random_state=5)


def _fit(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.perturbation_response(adata, "perturbation", "control", copy=True, n_jobs=1, **kw)


@given(st.lists(st.text(max_size=300), min_size=2, max_size=6, unique=True))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_label_keys_are_safe_unique_and_reversible(labels):
    keys = [label_key(x) for x in labels]
    assert len(set(keys)) == len(keys)
    for lab, key in zip(labels, keys):
        assert len(key) <= MAX_KEY_LENGTH and key not in (".", "..")
        assert set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-%~.")
        if "~" not in key:
            assert key_label(key) == lab


def _variants(label: str) -> list[str]:
    """A label with the labels a case-insensitive or normalising file system confuses it with."""
    forms = [label, label.lower(), label.upper(), label.swapcase(), label.casefold()]
    forms += [unicodedata.normalize(f, x) for f in ("NFC", "NFD", "NFKC") for x in list(forms)]
    return forms


def _as_a_file_system_sees_it(key: str) -> set[str]:
    return {unicodedata.normalize(f, key).casefold() for f in ("NFC", "NFD")}


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_label_keys_stay_distinct_under_case_folding_and_unicode_normalisation(seeds):
    labels = sorted({v for s in seeds for v in _variants(s)} | {"GeneA", "genea", "caf\u00e9", "cafe\u0301"})
    keys = [label_key(x) for x in labels]
    seen: dict[str, str] = {}
    for lab, key in zip(labels, keys):
        for folded in _as_a_file_system_sees_it(key):  # macOS (NFD, no case), Windows (no case)
            assert seen.setdefault(folded, lab) == lab, (lab, seen[folded], key)
    assert label_key("STAT1") == "p_STAT1"  # upper-case gene symbols keep a readable key


def test_keys_of_case_and_normalisation_twins_differ():
    pairs = [("p_GeneA", "p_genea"), ("GeneA", "genea"), ("caf\u00e9", "cafe\u0301"), ("CAFÉ", "café")]
    for a, b in pairs:
        assert label_key(a).casefold() != label_key(b).casefold()
        assert unicodedata.normalize("NFD", label_key(a)).casefold() != unicodedata.normalize("NFD", label_key(b)).casefold()


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["/", "", " ", "..", "A/B", "nan", "control"])),
                min_size=3, max_size=3))
def test_any_labels_give_results_or_a_clear_error(tiny, tmp_path_factory, labels):
    adata = tiny.copy()
    old = adata.obs["perturbation"].astype(str).to_numpy()
    mapping = dict(zip(sorted(set(old) - {"control"}), labels))
    new = np.array([mapping.get(v, v) for v in old], dtype=object)
    adata.obs["perturbation"] = new
    try:
        out = _fit(adata)
    except InputError as err:
        assert str(err)
        return
    expected = {x for x in labels if x.strip() and x != "control"}
    assert set(out.uns["scotgm"]["summary"].index) == expected
    unassigned = np.array([not str(v).strip() for v in new])
    assert (out.obs["scotgm_class"].to_numpy()[unassigned] == "unassigned").all()
    path = tmp_path_factory.mktemp("labels") / "r.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    for lab in expected:
        assert sg.tl.get_record(back, lab)["n_guide"] == sg.tl.get_record(out, lab)["n_guide"]


@FUZZ
@given(n_pcs=st.one_of(st.none(), st.integers(-3, 60)),
       variance=st.one_of(st.none(), st.floats(0.05, 1.0), st.floats(allow_nan=True, allow_infinity=True, width=32)),
       reg=st.one_of(st.floats(1e-4, 1.0), st.floats(-1, 0), st.just(float("nan"))))
def test_numeric_arguments_are_validated(tiny, n_pcs, variance, reg):
    try:
        out = _fit(tiny, perturbations=[sorted(tiny.uns["simulation"]["target_gene"])[0]], n_pcs=n_pcs,
                   variance_threshold=variance, regularization=reg)
    except InputError as err:
        assert ("n_pcs" in str(err)) or ("variance_threshold" in str(err)) or ("regularization" in str(err))
        assert (n_pcs is not None and n_pcs < 1) or (variance is not None and not 0 < variance <= 1) or \
            not (np.isfinite(reg) and reg > 0)
        return
    rec = out.uns["scotgm"]["summary"].iloc[0]
    assert 1 <= rec["n_pcs"] <= rec["pc_limit"]
    if n_pcs is not None:
        assert rec["n_pcs"] == min(n_pcs, rec["pc_limit"])


@FUZZ
@given(fmt=st.sampled_from(["csr", "csc", "dense"]),  # (AnnData itself refuses COO)
       dtype=st.sampled_from([np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64]))
def test_matrix_formats_and_dtypes_give_the_same_answer(tiny, fmt, dtype):
    reference = _fit(tiny)
    other = tiny.copy()
    X = tiny.X.astype(dtype)
    other.X = X.toarray() if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(X)
    out = _fit(other)
    np.testing.assert_array_equal(sg.tl.get_responses(out).layers["effect"], sg.tl.get_responses(reference).layers["effect"])
    assert tiny.X.dtype == np.int64 and sp.issparse(tiny.X)  # the input is never modified


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "scotgm_pp.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _readable_outputs(out) -> bool:
    if not (out / "summary.json").exists():
        return False
    summary = json.loads((out / "summary.json").read_text())
    res = ad.read_h5ad(out / "results.h5ad")
    resp = ad.read_h5ad(out / "responses.h5ad")
    assert resp.n_obs == summary["n_perturbations_analysed"] == len(res.uns["scotgm"]["summary"])
    assert len(list((out / "records").glob("p_*.h5"))) == resp.n_obs
    return True


@pytest.mark.slow
def test_a_run_killed_at_any_moment_leaves_no_broken_output_and_resumes(tmp_path):
    screen = sg.datasets.simulate(n_genes=60, n_perturbations=6, n_control=200, n_cells_per_perturbation=40,
                                  n_de_genes=4, random_state=2)
    data = tmp_path / "screen.h5ad"
    screen.write_h5ad(data)
    args = ["run", str(data), "--perturbation-key", "perturbation", "--control", "control", "--quiet",
            "--n-workers", "1"]
    reference = tmp_path / "reference"
    assert _cli([*args, "--out", str(reference)]).wait() == 0
    t0 = time.perf_counter()
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    for attempt in range(4):
        proc = _cli([*args, "--out", str(out)])
        time.sleep(float(rng.uniform(2.0, 6.0)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # whatever the moment: either no finished run, or a complete one
        if _readable_outputs(out):
            break
    code = _cli([*args, "--out", str(out)]).wait()
    assert code in (0, 2)  # 2: it had already finished ("holds a finished run")
    assert _readable_outputs(out)
    a = ad.read_h5ad(reference / "responses.h5ad")
    b = ad.read_h5ad(out / "responses.h5ad")
    np.testing.assert_array_equal(a.layers["effect"], b.layers["effect"])
    assert time.perf_counter() - t0 < 120
