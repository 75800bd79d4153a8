"""Issue 26: no stale results, no hangs, no formulas, an error that names the cause.

Stored results are reused only under the same settings and the same data (a digest of what is
read, not the file's name, size or time); a scheduler that does not answer is an error within
its timeout; corrupt matrices, a full disk and a busy folder are one-line errors; CSV cells
never start a formula.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp import cli
from scotgm_pp._validation import InputError
from scotgm_pp.tl import _collect, _execute

KEYS = ["--perturbation-key", "perturbation", "--control", "control", "--quiet", "--n-workers", "1"]


def _run(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.perturbation_response(adata, "perturbation", "control", copy=True, n_jobs=1,
                                           n_control_cells=80, **kw)


def _effects(path_or_adata) -> np.ndarray:
    resp = ad.read_h5ad(path_or_adata) if not isinstance(path_or_adata, ad.AnnData) else \
        sg.tl.get_responses(path_or_adata)
    return np.asarray(resp.layers["effect"], float)


def _cli(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _interrupted(argv, capsys, monkeypatch, after: int = 2) -> int:
    """Run the CLI and interrupt it (as Ctrl-C or a kill would) once ``after`` perturbations are
    finished; return how many record files it left."""
    original = _collect.Collector.add
    calls = []

    def add(self, result, **kw):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return original(self, result, **kw)

    monkeypatch.setattr(_collect.Collector, "add", add)
    code, _ = _cli(argv, capsys)
    monkeypatch.setattr(_collect.Collector, "add", original)
    assert code == 130
    out = Path(argv[argv.index("--out") + 1])
    return len(list((out / ".scotgm-run" / "records").glob("p_*.h5")))


# ----------------------------------------------------------------------------------- store=
def test_store_never_reuses_records_of_other_data_or_settings(small_sim, tmp_path, monkeypatch):
    store = tmp_path / "records"
    first = _run(small_sim, store=store)
    files = sorted(store.glob("p_*.h5"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 3 and (store / "store.json").exists()

    permuted = small_sim[np.random.default_rng(0).permutation(small_sim.n_obs)].copy()
    with pytest.raises(InputError, match="the count values") as err:
        _run(permuted, store=store)
    assert "pass another store folder" in str(err.value)
    with pytest.raises(InputError) as err:
        _run(small_sim, store=store, n_pcs=3, coupling="independent")
    assert "coupling 'ot' -> 'independent'" in str(err.value) and "preprocess.n_pcs None -> 3" in str(err.value)
    layered = small_sim.copy()
    layered.layers["counts"] = layered.X.copy()
    with pytest.raises(InputError, match="layer None -> 'counts'"):
        _run(layered, store=store, layer="counts")
    edited = small_sim.copy()
    edited.X = edited.X.copy()
    edited.X.data[7] += 1  # one count of one cell
    with pytest.raises(InputError, match="the count values"):
        _run(edited, store=store)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing was replaced

    fitted = []
    original = _execute.analyse_pair
    monkeypatch.setattr(_execute, "analyse_pair", lambda *a, **k: fitted.append(1) or original(*a, **k))
    pert = sorted(first.uns["scotgm"]["summary"].index)[1]
    again = _run(small_sim, store=store, perturbations=[pert])  # same data and settings: reused
    assert fitted == []
    np.testing.assert_array_equal(_effects(again)[0], _effects(first)[list(first.uns["scotgm"]["summary"].index)
                                                                        .index(pert)])

    # a record replaced by another run's is refused by the results that point to it
    for f in store.iterdir():
        f.unlink()
    _run(small_sim, store=store, perturbations=[pert], n_pcs=3)
    with pytest.raises(InputError, match="made by another run"):
        sg.tl.get_record(first, pert)


def test_the_content_digest_ignores_blocks_and_storage_types(small_sim):
    from scotgm_pp._fingerprint import ContentDigest
    from scotgm_pp._screen import MemoryRows, scan_counts

    digests = []
    for X, block in ((small_sim.X, 20_000), (small_sim.X.astype(np.int32), 7), (small_sim.X.toarray(), 50)):
        d = ContentDigest()
        scan_counts(MemoryRows(X), block=block, digest=d)
        digests.append(d.hexdigest())
    assert len(set(digests)) == 1
    X = small_sim.X.copy()
    X.data[0] += 1
    d = ContentDigest()
    scan_counts(MemoryRows(X), digest=d)
    assert d.hexdigest() != digests[0]


# ------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def layered_file(small_sim, tmp_path_factory):
    """The small screen with a 'counts' layer that holds other counts (its genes rolled)."""
    a = small_sim.copy()
    a.layers["counts"] = sp.csr_matrix(np.roll(small_sim.X.toarray(), 7, axis=1))
    path = tmp_path_factory.mktemp("layered") / "screen.h5ad"
    a.write_h5ad(path)
    return path


def test_resume_after_a_kill_never_reuses_records_of_another_layer(layered_file, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert _cli(["run", str(layered_file), "--out", str(reference), *KEYS], capsys)[0] == 0
    out = tmp_path / "out"
    left = _interrupted(["run", str(layered_file), "--out", str(out), "--layer", "counts", *KEYS], capsys,
                        monkeypatch)
    assert left >= 2
    code, err = _cli(["run", str(layered_file), "--out", str(out), *KEYS], capsys)
    assert code == 2 and len(err) == 1
    assert "unfinished run with other settings" in err[0] and "layer 'counts' -> None" in err[0]
    assert len(list((out / ".scotgm-run" / "records").glob("p_*.h5"))) == left  # kept for its own resume
    assert _cli(["run", str(layered_file), "--out", str(out), "--overwrite", *KEYS], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["resumed_perturbations"] == 0
    np.testing.assert_array_equal(_effects(out / "responses.h5ad"), _effects(reference / "responses.h5ad"))


def test_resume_never_reuses_records_of_an_input_edited_in_place(small_sim, tmp_path, capsys, monkeypatch):
    data = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(data)
    out = tmp_path / "out"
    assert _interrupted(["run", str(data), "--out", str(out), *KEYS], capsys, monkeypatch) >= 2
    before = data.stat()
    with h5py.File(data, "r+") as f:  # every count + 1: still raw counts, same size
        f["X/data"][...] = f["X/data"][...] + 1
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = data.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    code, err = _cli(["run", str(data), "--out", str(out), *KEYS], capsys)
    assert code == 2 and len(err) == 1 and "the count values" in err[0] and "--overwrite" in err[0]
    assert _cli(["run", str(data), "--out", str(out), "--overwrite", *KEYS], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["resumed_perturbations"] == 0
    reference = tmp_path / "reference"
    assert _cli(["run", str(data), "--out", str(reference), *KEYS], capsys)[0] == 0
    np.testing.assert_array_equal(_effects(out / "responses.h5ad"), _effects(reference / "responses.h5ad"))

    # an interrupted --overwrite run resumes when the same command is run again
    argv = ["run", str(data), "--out", str(out), "--overwrite", "--seed", "3", *KEYS]
    left = _interrupted(argv, capsys, monkeypatch)
    assert _cli(argv, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_perturbations"] == left >= 2 and summary["params"]["random_state"] == 3


# ------------------------------------------------------------------------------- the folder
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_first(small_sim, tmp_path, capsys):
    data = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(data)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scotgm_pp.io import FolderLock; "
         f"FolderLock({str(out / '.scotgm-lock')!r}).acquire('busy {{pid}}'); print('locked', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _cli(["run", str(data), "--out", str(out), *KEYS], capsys)
        assert code == 2 and len(err) == 1
        assert f"already running (pid {holder.pid})" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".scotgm-lock"]
    finally:
        holder.kill()
        holder.wait()
    assert _cli(["run", str(data), "--out", str(out), *KEYS], capsys)[0] == 0  # the lock died with its owner
    assert not (out / ".scotgm-lock").exists()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("Unable to synchronously create file (unable to open file: name = 'x', errno = 28, error message = "
            "'No space left on device', flags = 13, o_flags = 242)"),
])
def test_a_full_disk_exits_2_naming_the_folder_and_the_run_resumes(small_sim, tmp_path, capsys, monkeypatch,
                                                                   failure):
    import scotgm_pp._workflow as workflow

    data = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(data)
    out = tmp_path / "out"

    def full(*args, **kw):
        raise failure

    monkeypatch.setattr(workflow, "write_rankings", full)
    code, err = _cli(["run", str(data), "--out", str(out), *KEYS], capsys)
    assert code == 2 and len(err) == 1
    assert f"no space left on the device holding {out}" in err[0]
    monkeypatch.undo()
    assert _cli(["run", str(data), "--out", str(out), *KEYS], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["resumed_perturbations"] == 3


# --------------------------------------------------------------------------------- scheduler
def _server(reply: bytes) -> str:
    """A TCP service that is not a Dask scheduler: it says ``reply`` (or nothing) and hangs on."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        conns = []
        while True:
            conn, _ = srv.accept()
            conns.append(conn)
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return f"tcp://127.0.0.1:{srv.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["silent", "web server", "malformed", "scheme"])
def test_a_scheduler_that_is_not_one_is_a_one_line_error_within_the_timeout(small_sim, tmp_path, capsys, kind):
    data = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(data)
    address = {"silent": lambda: _server(b""),
               "web server": lambda: _server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
               "malformed": lambda: "not a scheduler", "scheme": lambda: "http://127.0.0.1:8786"}[kind]()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, err = _cli(["run", str(data), "--out", str(out), "--scheduler", address, "--scheduler-timeout", "1",
                      *KEYS[:-2]], capsys)
    assert time.perf_counter() - t0 < 10
    assert code == 2 and len(err) == 1 and f"--scheduler {address!r}" in err[0]
    expected = {"silent": "no Dask scheduler answered within 1 s", "web server": "does not speak Dask's protocol",
                "malformed": "not an address of the form", "scheme": "unknown address scheme"}[kind]
    assert expected in err[0]
    assert not out.exists()  # no run folder made, let alone claimed


# -------------------------------------------------------------------------------- matrices
def _corrupt(path, kind):
    with h5py.File(path, "r+") as f:
        if kind == "column index out of range":
            f["X/indices"][3] = 10_000
        elif kind == "decreasing indptr":
            ip = f["X/indptr"][...]
            f["X/indptr"][10] = ip[12] + 5


@pytest.mark.parametrize("kind, message", [
    ("column index out of range", "an index (10000) lies outside the 80 genes"),
    ("decreasing indptr", "indptr decreases at row 10"),
    ("dense float16", "is stored as float16"),
    ("uint64 above 2**63", "far above any real UMI count"),
])
def test_corrupt_or_unsupported_matrices_are_one_line_errors(small_sim, tmp_path, capsys, kind, message):
    a = small_sim.copy()
    if kind == "dense float16":
        a.X = a.X.toarray().astype(np.float16)
    elif kind == "uint64 above 2**63":
        a.X = a.X.astype(np.uint64)
        a.X.data[5] = 2**63 + 5
    data = tmp_path / "screen.h5ad"
    a.write_h5ad(data)
    _corrupt(data, kind)
    out = tmp_path / "out"
    code, err = _cli(["run", str(data), "--out", str(out), *KEYS], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_corrupt_matrices_in_memory_are_refused(small_sim):
    X = small_sim.X.copy()
    X.indices[3] = small_sim.n_vars + 4
    a = ad.AnnData(X=X, obs=small_sim.obs.copy(), var=small_sim.var.copy())
    with pytest.raises(InputError, match=f"an index \\({small_sim.n_vars + 4}\\) lies outside the 80 genes"):
        _run(a)
    C = sp.csc_matrix(small_sim.X)
    C.indptr[5] = C.indptr[7] + 3
    a.X = C
    with pytest.raises(InputError, match="indptr decreases"):
        _run(a)
    b = small_sim.copy()
    b.X = b.X.toarray().astype(np.float16)
    with pytest.raises(InputError, match="float16"):
        _run(b)
    assert small_sim.X.dtype == np.int64  # the user's data untouched


# ------------------------------------------------------------------------------------- CSV
def test_csv_cells_never_start_a_formula_and_numbers_stay_numbers(small_sim, tmp_path):
    from scotgm_pp.io import write_rankings

    a = small_sim.copy()
    old = a.obs["perturbation"].astype(str).to_numpy()
    labels = ["=cmd|' /C calc'!A0", "+SUM(1,2)", "@A1"]
    mapping = dict(zip(sorted(set(old) - {"control"}), labels))
    a.obs["perturbation"] = [mapping.get(v, v) for v in old]
    a.var_names = ["-2+3", "\tTAB", *a.var_names[2:]]
    res = _run(a)
    path = tmp_path / "rankings.csv"
    write_rankings(sg.tl.get_rankings(res), path)
    table = pd.read_csv(path, keep_default_na=False)
    assert set(table["perturbation"]) == {"'" + lab for lab in labels}
    assert {"'-2+3", "'\tTAB"} <= set(table["gene"])
    assert not table["gene"].str.match(r"^[=+\-@\t\r]").any()
    # an empty cell is a missing number (e.g. effect_unshrunk where it is not reported)
    numbers = pd.read_csv(path, keep_default_na=False, na_values=[""])
    numeric = [c for c in numbers.columns if c not in ("perturbation", "gene")]
    assert all(pd.api.types.is_numeric_dtype(numbers[c]) for c in numeric)
    assert numbers["effect"].notna().all() and numbers["effect_unshrunk"].notna().any()
    assert (table["mu"] < 0).any()  # negative numbers stay numbers, unquoted
    responses = sg.tl.get_responses(res)
    responses.write_h5ad(tmp_path / "responses.h5ad")
    assert sorted(ad.read_h5ad(tmp_path / "responses.h5ad").obs_names) == sorted(labels)  # exact labels kept


# -------------------------------------------------------------------------------- smaller
@pytest.mark.parametrize("argv, message", [
    (["demo", "--figures-top", "-3"], "--figures-top: expected a number of perturbations from 0"),
    (["demo", "--n-workers", "0"], "--n-workers: expected a positive integer from 1"),
    (["demo", "--n-workers", "-1"], "--n-workers: expected a positive integer from 1"),
    (["demo", "--n-pcs", str(2**63)], "--n-pcs: expected a number of PCs from 1 to 10,000"),
    (["demo", "--scheduler-timeout", "0"], "--scheduler-timeout: expected seconds in (0, 3600]"),
    (["run", "x.h5ad"], "the following arguments are required"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0]


def test_more_workers_than_cores_are_capped_with_a_warning(capsys):
    cores = cli._cores()
    args = argparse.Namespace(command="run", n_workers=cores + 22, scheduler=None)
    cli._parallel(args)
    assert args.n_workers == cores and args.client is None
    assert f"--n-workers {cores + 22} is more than the {cores} cores" in capsys.readouterr().err


def test_figures_of_a_perturbation_not_in_the_run_are_refused_before_the_fit(small_sim, tmp_path, capsys):
    data = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(data)
    out = tmp_path / "out"
    code, err = _cli(["run", str(data), "--out", str(out), "--figures", "NOPE", *KEYS], capsys)
    assert code == 2 and len(err) == 1 and "'NOPE', which this run does not analyse" in err[0]
    assert not out.exists()


def test_the_benchmark_report_says_how_many_guide_cells_were_drawn(small_sim, tmp_path):
    from scotgm_pp.benchmark import run_benchmark

    res = run_benchmark(small_sim, "perturbation", "control", n_target=500, n_control=100, seeds=1,
                        methods=["t-test"], deg=False, out_dir=tmp_path)
    report = (tmp_path / "report.md").read_text()
    n = {p: int((small_sim.obs["perturbation"] == p).sum()) for p in res.settings["perturbations"]}
    assert res.settings["guide_cells_drawn"] == n and max(n.values()) < 500
    assert "500 guide cells (all of them where a perturbation has fewer: " in report
    assert all(f"{p} {k}" in report for p, k in n.items())


def test_large_h5ad_outputs_check_the_free_space_first(small_sim, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from scotgm_pp import io as sio

    monkeypatch.setattr(sio, "MEMORY_IMAGE_MAX", 0)  # as if the outputs were large
    sio.write_h5ad(small_sim, tmp_path / "direct.h5ad")
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "direct.h5ad").X.toarray(), small_sim.X.toarray())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InputError, match="not enough space for full.h5ad"):
        sio.write_h5ad(small_sim, tmp_path / "full.h5ad")
    assert not (tmp_path / "full.h5ad").exists()
