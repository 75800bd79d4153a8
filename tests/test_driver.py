"""The screen driver: results do not depend on workers, scheduler, order or storage; controls are
sampled per perturbation; files are read lazily; runs resume; labels are keys, never paths."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._labels import key_label, label_key
from scotgm_pp._validation import InputError
from scotgm_pp.tl import _execute
from scotgm_pp.tl._plan import sample_controls, task_seed


def _run(adata, **kw):
    kw.setdefault("n_jobs", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.perturbation_response(adata, "perturbation", "control", copy=True, **kw)


def _layers_equal(a, b, atol=0.0):
    ra, rb = sg.tl.get_responses(a), sg.tl.get_responses(b)
    assert list(ra.obs_names) == list(rb.obs_names)
    for name in ra.layers:
        x, y = np.asarray(ra.layers[name], float), np.asarray(rb.layers[name], float)
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        assert np.nanmax(np.abs(x - y)) <= atol, name
    np.testing.assert_array_equal(a.obs["scotgm_p_perturbed"].to_numpy(), b.obs["scotgm_p_perturbed"].to_numpy())


@pytest.fixture(scope="module")
def serial(small_sim):
    return _run(small_sim, n_control_cells=80)


def test_local_cluster_gives_the_serial_results(small_sim, serial, tmp_path):
    """1 worker in this process, 2 local Dask workers (writing their own record files), and a
    LocalCluster named by its address."""
    from dask.distributed import Client, LocalCluster

    two = _run(small_sim, n_control_cells=80, n_jobs=2, store=tmp_path / "records")
    _layers_equal(serial, two)
    assert len(list((tmp_path / "records").glob("p_*.h5"))) == 3
    pert = serial.uns["scotgm"]["summary"].index[0]
    np.testing.assert_array_equal(sg.tl.get_record(two, pert)["covariances"],
                                  sg.tl.get_record(serial, pert)["covariances"])
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, processes=True) as cluster, \
            Client(cluster) as client:
        remote = _run(small_sim, n_control_cells=80, client=client.scheduler.address,
                      perturbations=sorted(serial.uns["scotgm"]["summary"].index)[:2])
    sub = serial.uns["scotgm"]["summary"].index[:2]
    r_all, r_two = sg.tl.get_responses(serial)[sub], sg.tl.get_responses(remote)
    for name in r_all.layers:
        if name != "qval_screen":  # screen-wide q-values depend on which perturbations were run
            np.testing.assert_array_equal(r_all.layers[name], r_two.layers[name])


def test_seeds_come_from_names_not_positions(small_sim, serial):
    perts = list(serial.uns["scotgm"]["summary"].index)
    alone = _run(small_sim, n_control_cells=80, perturbations=[perts[-1], perts[0]])
    assert list(alone.uns["scotgm"]["summary"].index) == [perts[-1], perts[0]]
    for p in (perts[0], perts[-1]):
        np.testing.assert_array_equal(sg.tl.get_responses(alone)[p].layers["effect"],
                                      sg.tl.get_responses(serial)[p].layers["effect"])
        assert alone.uns["scotgm"]["summary"].loc[p, "seed"] == task_seed(0, p)
    assert task_seed(0, "A") != task_seed(0, "B") and task_seed(0, "A") != task_seed(1, "A")


def test_each_perturbation_meets_a_bounded_sample_of_controls(small_sim, serial):
    summary = serial.uns["scotgm"]["summary"]
    assert (summary["n_control"] == 80).all()  # of 120 controls
    rng = np.random.default_rng(0)
    rows = np.arange(1000)
    batches = np.where(rows < 700, "a", "b")
    guide = np.array(["a"] * 30 + ["b"] * 70)
    picked, reason = sample_controls(rows, guide, batches, 200, rng)
    assert reason is None and len(picked) == 200
    assert (batches[picked] == "a").sum() == 60 and (batches[picked] == "b").sum() == 140
    _, reason = sample_controls(rows, np.array(["a", "c"]), batches, 200, rng)
    assert "batch 'c'" in reason and "no control cell" in reason


def test_a_batch_without_controls_skips_only_that_perturbation(small_sim):
    adata = small_sim.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    first = sorted(set(labels) - {"control"})[0]
    adata.obs["rep"] = np.where(labels == first, "lonely", "shared")
    with pytest.warns(UserWarning, match="skipped 1 perturbation"):
        out = sg.tl.perturbation_response(adata, "perturbation", "control", batch_key="rep", n_jobs=1, copy=True)
    skipped = out.uns["scotgm"]["skipped"].set_index("perturbation")["reason"]
    assert "batch 'lonely'" in skipped[first]
    assert len(out.uns["scotgm"]["summary"]) == 2 and len(skipped) == 1
    resp = sg.tl.get_responses(out)
    assert resp.n_obs == 2 and first not in resp.obs_names and np.isfinite(resp.layers["effect"]).all()
    assert (out.obs.loc[labels == first, "scotgm_class"] == "not analysed").all()


def test_backed_file_and_store_give_the_in_memory_results(small_sim, serial, tmp_path):
    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    out = _run(backed, n_control_cells=80, store=tmp_path / "records")
    _layers_equal(serial, out)
    assert "records" not in out.uns["scotgm"]
    pert = out.uns["scotgm"]["summary"].index[0]
    rec = sg.tl.get_record(out, pert)
    np.testing.assert_array_equal(rec["covariances"], sg.tl.get_record(serial, pert)["covariances"])
    # a dense matrix, a CSC matrix and a float dtype are the same counts
    for X in (small_sim.X.toarray(), sp.csc_matrix(small_sim.X), small_sim.X.astype(np.float32)):
        other = small_sim.copy()
        other.X = X
        _layers_equal(serial, _run(other, n_control_cells=80))


def test_workers_started_early_read_their_own_rows_of_a_file(small_sim, serial, tmp_path):
    """A file-backed screen on 2 local workers started before the plan (as ``scotgm run`` does):
    the tasks carry only row numbers, each worker reads its cells from the file, and the results
    are those of the serial in-memory run."""
    from scotgm_pp._screen import screen_from_h5ad
    from scotgm_pp._workers import WORKER_HEAP, LocalWorkers
    from scotgm_pp.tl._plan import RunSettings
    from scotgm_pp.tl._response import _Payloads, annotate, execute_plan, plan_screen, start_workers

    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    screen = screen_from_h5ad(path)
    settings = RunSettings(perturbation_key="perturbation", control="control", n_control_cells=80)
    plan = plan_screen(screen, settings)
    task = next(t for t in plan.tasks if t.skip_reason is None)
    pool_rows = np.unique(np.concatenate([t.control_rows for t in plan.tasks if t.skip_reason is None]))
    for in_workers in (False, True):
        payloads = _Payloads(screen, plan.batch, pool_rows, plan.n_detected, in_workers=in_workers)
        ctx = payloads.context(_execute.ScreenContext(settings=settings, var_names=screen.var_names.to_numpy()))
        payload = payloads(task)
        assert (payload.guide_counts is None) == in_workers and payload.counts is None
        rows, _ = _execute.screen_order(task)
        got = _execute.assemble_counts(payload, ctx)
        assert (got != sp.csr_matrix(small_sim.X[rows])).nnz == 0

    assert start_workers(screen, settings, n_jobs=1) is None
    assert start_workers(screen, settings, n_jobs=2, client="tcp://127.0.0.1:1") is None
    with start_workers(screen, settings, n_jobs=2) as workers:
        assert isinstance(workers, LocalWorkers)
        run = execute_plan(plan, n_jobs=2, client=workers)
        assert len(workers.client.scheduler_info()["workers"]) == 2
        # the workers run with the heap policy of WORKER_HEAP (a value set in this process wins)
        heap = workers.client.run(lambda: {k: os.environ.get(k) for k in WORKER_HEAP})
        expected = {k: os.environ.get(k, v) for k, v in WORKER_HEAP.items()}
        assert list(heap.values()) == [expected, expected]
    out = ad.AnnData(obs=screen.obs.copy(), var=pd.DataFrame(index=screen.var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotate(out, run, "scotgm")
    _layers_equal(serial, out)


def test_a_killed_run_resumes_from_its_finished_perturbations(small_sim, serial, tmp_path, monkeypatch):
    store = tmp_path / "records"
    _run(small_sim, n_control_cells=80, store=store)
    files = sorted(store.glob("p_*.h5"))
    assert len(files) == 3
    files[1].unlink()  # as if the run had been killed before this perturbation was written
    (store / ".p_half.123.tmp").write_bytes(b"partial")  # and while writing another
    fitted = []
    original = _execute.analyse_pair
    monkeypatch.setattr(_execute, "analyse_pair", lambda *a, **k: fitted.append(1) or original(*a, **k))
    again = _run(small_sim, n_control_cells=80, store=store)
    assert len(fitted) == 1
    assert not list(store.glob(".*.tmp"))
    _layers_equal(serial, again)


@pytest.mark.parametrize("labels", [["A/B", "A_B", "/"], ["..", ".", "~x"], ["ñandú 1", "a b", "%2F"]])
def test_labels_are_keys_never_paths(small_sim, labels, tmp_path):
    adata = small_sim.copy()
    old = adata.obs["perturbation"].astype(str).to_numpy()
    mapping = dict(zip(sorted(set(old) - {"control"}), labels))
    adata.obs["perturbation"] = [mapping.get(v, v) for v in old]
    out = _run(adata, n_control_cells=80)
    assert sorted(out.uns["scotgm"]["summary"].index) == sorted(labels)
    keys = out.uns["scotgm"]["summary"]["key"]
    assert keys.is_unique and all("/" not in k and k not in (".", "..") for k in keys)
    out.write_h5ad(tmp_path / "r.h5ad")
    back = ad.read_h5ad(tmp_path / "r.h5ad")
    assert sorted(back.uns["scotgm"]["summary"].index) == sorted(labels)
    for lab in labels:
        np.testing.assert_array_equal(sg.tl.get_record(back, lab)["means"], sg.tl.get_record(out, lab)["means"])
        assert key_label(label_key(lab)) == lab


def test_missing_labels_are_unassigned_cells(small_sim):
    adata = small_sim.copy()
    labels = np.array(adata.obs["perturbation"].astype(object))
    labels[:5] = None  # controls without a label
    labels[-3:] = np.nan
    labels[-6:-3] = "  "
    adata.obs["perturbation"] = labels
    with pytest.warns(UserWarning, match="11 cells have no label"):
        out = sg.tl.perturbation_response(adata, "perturbation", "control", n_jobs=1, copy=True)
    assert "nan" not in out.uns["scotgm"]["summary"].index and "None" not in out.uns["scotgm"]["summary"].index
    assert (out.obs["scotgm_class"].iloc[:5] == "unassigned").all()
    assert (out.obs["scotgm_class"].iloc[-6:] == "unassigned").all()
    assert np.isnan(out.obs["scotgm_p_perturbed"].iloc[:5]).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"perturbations": "G0030"}, "single string 'G0030'; pass \\['G0030'\\]"),
    ({"perturbations": ["control"]}, "control label 'control' cannot be analysed"),
    ({"n_pcs": 0}, "n_pcs must be an integer from 1 to 10,000"),
    ({"n_pcs": -3}, "n_pcs must be an integer from 1 to 10,000"),
    ({"n_pcs": 2**63}, "n_pcs must be an integer from 1 to 10,000"),
    ({"variance_threshold": float("nan")}, "variance_threshold must be a finite number in \\(0, 1\\]"),
    ({"variance_threshold": 7}, "variance_threshold must be a finite number in \\(0, 1\\]"),
    ({"regularization": -1.0}, "regularization must be a finite number > 0"),
    ({"random_state": 10**24}, "random_state must be between 0 and"),
    ({"n_control_cells": 3}, "n_control_cells must be between 10 and"),
    ({"n_control_cells": 2**63}, "n_control_cells must be between 10 and"),
    ({"n_jobs": 0}, "n_jobs must be a positive integer or None"),
    ({"key_added": "a/b"}, "key_added must be a non-empty name without '/'"),
])
def test_bad_arguments_name_the_fix(small_sim, kwargs, message):
    with pytest.raises(InputError, match=message):
        sg.tl.perturbation_response(small_sim, "perturbation", "control", **kwargs)


def test_duplicated_perturbations_are_analysed_once(small_sim):
    pert = sorted(set(small_sim.obs["perturbation"].astype(str)) - {"control"})[0]
    out = _run(small_sim, perturbations=[pert, pert])
    assert list(out.uns["scotgm"]["summary"].index) == [pert]
    assert len(sg.tl.get_rankings(out)) == small_sim.n_vars


def test_whole_matrix_count_checks(small_sim):
    adata = small_sim.copy()
    X = adata.X.toarray().astype(float)
    X[-1, :] = X[-1, :] * 0.37  # a normalised cell after every raw one
    adata.X = sp.csr_matrix(X)
    with pytest.raises(InputError, match="non-integer values.*rows from 0"):
        sg.tl.perturbation_response(adata, "perturbation", "control")
    norm = small_sim.copy()
    counts = norm.X.toarray().astype(float)
    norm.X = sp.csr_matrix(np.round(counts / counts.sum(1, keepdims=True) * 1e4))
    with pytest.raises(InputError, match="looks normalised to a common total and rounded"):
        sg.tl.perturbation_response(norm, "perturbation", "control")


def test_responses_and_rankings_tables(serial):
    resp = sg.tl.get_responses(serial)
    assert resp.obs["key"].tolist() == [label_key(p) for p in resp.obs_names]
    tab = sg.tl.get_rankings(serial, top=5)
    assert len(tab) == 5 * resp.n_obs
    assert pd.api.types.is_integer_dtype(tab["rank"])


@pytest.mark.parametrize("dense", [False, True])
def test_file_rows_read_in_any_order_with_repeats(tmp_path, dense):
    from scotgm_pp._screen import H5adRows

    rng = np.random.default_rng(0)
    X = sp.random(400, 30, density=0.3, format="csr", random_state=1)
    X.data = np.round(X.data * 10)
    path = tmp_path / "rows.h5ad"
    ad.AnnData(X=X.toarray() if dense else X).write_h5ad(path)
    reader = H5adRows(path)
    cases = [rng.choice(400, 60, replace=False), rng.integers(0, 400, 200), np.arange(50, 150),
             np.array([399, 0, 399, 5]), np.array([], dtype=int)]
    for rows in cases:
        got = reader.read(rows)
        assert got.shape == (rows.size, 30)
        np.testing.assert_array_equal(got.toarray(), X.toarray()[rows])
    reader.close()


def test_a_screen_run_and_its_workers_load_no_modelling_stack():
    """What a run and each local worker import (the fork server's preload) leaves out PyMC,
    ArviZ, scanpy and matplotlib: their imports took 1.6-2 s of each process's start."""
    import subprocess
    import sys

    from scotgm_pp._workers import WORKER_PRELOAD

    code = ("import sys, distributed, scotgm_pp._workflow, scotgm_pp._screen\n"
            f"for m in {list(WORKER_PRELOAD)!r}: __import__(m)\n"
            "print(' '.join(sorted(m for m in ('pymc', 'arviz', 'pytensor', 'scanpy', 'matplotlib', 'sklearn')"
            " if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_tl_names_load_on_first_access():
    import importlib

    tl = importlib.import_module("scotgm_pp.tl")
    for name in tl.__all__:
        obj = getattr(tl, name)
        assert obj is getattr(importlib.import_module(f"scotgm_pp.tl.{tl._WHERE[name]}"), name)
    assert set(tl.__all__) <= set(dir(tl))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl.nope  # noqa: B018


def test_the_whole_task_runs_with_the_blas_threads_asked_for(small_sim, monkeypatch):
    """``blas_threads`` holds for all of a task, the resampling calls after the fit included
    (they used to run with the default BLAS pools)."""
    from threadpoolctl import threadpool_info

    from scotgm_pp.tl import _pair

    seen = []
    test = _pair.resampling_test

    def spy(*args, **kwargs):
        seen.extend(d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas")
        return test(*args, **kwargs)

    monkeypatch.setattr(_pair, "resampling_test", spy)
    pert = min(set(small_sim.obs["perturbation"].astype(str)) - {"control"})
    _run(small_sim, n_control_cells=80, perturbations=[pert], blas_threads=1)
    assert seen and set(seen) == {1}
