"""Every careless or hostile input listed in issues 15 and 26, run through the CLI or the API; one line each.

    python benchmarks/hostile_inputs.py [--workdir DIR] [--only 26]

Each case prints its outcome: the exit code and the one-line message for the CLI, or the
exception or the checked result for the API. ``--only 26`` runs the cases of issue 26 alone
(stale results, schedulers, bounds, corrupt matrices, formulas, keys, locks); its disk-full case
mounts a 400 KiB tmpfs and needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._validation import InputError
from scotgm_pp.cli import main as cli


def run_cli_lines(argv):
    """Exit code and the non-empty lines the CLI wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli(argv)
        except SystemExit as e:
            code = e.code
    return code, [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]


def run_cli(argv):
    code, lines = run_cli_lines(argv)
    return code, (lines[-1] if lines else "")


def api(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok: " + str(fn())
    except (InputError, ValueError, KeyError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def screen(tmp: Path, labels=None, name="s.h5ad", X=None) -> Path:
    a = sg.datasets.simulate(n_genes=60, n_perturbations=3, n_control=150, n_cells_per_perturbation=50,
                             n_de_genes=4, random_state=1)
    if labels is not None:
        old = a.obs["perturbation"].astype(str).to_numpy()
        mapping = dict(zip(sorted(set(old) - {"control"}), labels))
        a.obs["perturbation"] = [mapping.get(v, v) for v in old]
    if X is not None:
        a.X = X(a.X)
    path = tmp / name
    a.write_h5ad(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only", choices=["26"], default=None, help="only the cases of this issue")
    args = ap.parse_args()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="scotgm_hostile_"))
    tmp.mkdir(parents=True, exist_ok=True)
    base = ["--perturbation-key", "perturbation", "--control", "control", "--quiet", "--n-workers", "1"]
    cases = []

    def case(name, outcome):
        cases.append((name, outcome))
        print(f"- {name}: {outcome}", flush=True)

    if args.only != "26":
        issue15(tmp, base, case)
    issue26(tmp / "issue26", base, case)
    print(f"\n{len(cases)} cases; files in {tmp}")


def issue15(tmp: Path, base: list, case) -> None:
    # labels that are paths
    p = screen(tmp, ["A/B", "A_B", "A"], "slash.h5ad")
    code, msg = run_cli(["run", str(p), "--out", str(tmp / "slash"), *base])
    res = ad.read_h5ad(tmp / "slash" / "results.h5ad")
    case("labels 'A/B', 'A_B', 'A'", f"exit {code}; results.h5ad reloads with perturbations "
                                     f"{sorted(res.uns['scotgm']['summary'].index)}; records "
                                     f"{sorted(x.name for x in (tmp / 'slash' / 'records').iterdir())}")
    p = screen(tmp, ["/", "..", "x"], "root.h5ad")
    code, msg = run_cli(["run", str(p), "--out", str(tmp / "root"), *base])
    res = ad.read_h5ad(tmp / "root" / "results.h5ad")
    case("labels '/', '..'", f"exit {code}; reloads with {sorted(res.uns['scotgm']['summary'].index)}")
    p = screen(tmp, ["", "B", "C"], "empty.h5ad")
    code, msg = run_cli(["run", str(p), "--out", str(tmp / "empty"), *base])
    res = ad.read_h5ad(tmp / "empty" / "results.h5ad")
    case("empty label ''", f"exit {code}; {int((res.obs['scotgm_class'] == 'unassigned').sum())} cells 'unassigned', "
                           f"analysed {sorted(res.uns['scotgm']['summary'].index)}")
    a = ad.read_h5ad(screen(tmp, name="nan.h5ad"))
    lab = a.obs["perturbation"].astype(object).to_numpy().copy()  # pandas 3: to_numpy() may be read-only
    lab[:30] = None
    lab[-10:] = np.nan
    a.obs["perturbation"] = lab
    case("NaN / None labels (30 controls None)", api(lambda: (
        sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1),
        sorted(a.uns["scotgm"]["summary"].index), a.obs["scotgm_class"].value_counts().to_dict())[1:]))

    # outputs
    p = screen(tmp, name="plain.h5ad")
    out = tmp / "plain"
    code, _ = run_cli(["run", str(p), "--out", str(out), *base])
    code2, msg2 = run_cli(["run", str(p), "--out", str(out), *base])
    case("output folder holding a finished run", f"exit {code2}: {msg2}")
    code, msg = run_cli(["run", str(p), "--out", str(out), "--seed", "100000000000000000000000", *base])
    case("--seed 100000000000000000000000", f"exit {code}: {msg}")
    (tmp / "afile").write_text("x")
    for label, target in (("output is a file", tmp / "afile"), ("output under a file", tmp / "afile" / "sub")):
        code, msg = run_cli(["run", str(p), "--out", str(target), *base])
        case(label, f"exit {code}: {msg}")
    ro = tmp / "readonly"
    ro.mkdir(exist_ok=True)
    os.chmod(ro, 0o500)
    code, msg = run_cli(["run", str(p), "--out", str(ro / "out"), *base])
    os.chmod(ro, 0o700)
    case("unwritable output location", f"exit {code}: {msg}" + (" (running as root: writable)" if code == 0 else ""))
    inside = tmp / "inside"
    inside.mkdir(exist_ok=True)
    src = inside / "results.h5ad"
    src.write_bytes(p.read_bytes())
    code, msg = run_cli(["run", str(src), "--out", str(inside), *base])
    case("input file where an output goes", f"exit {code}: {msg}")

    # silently wrong before
    a = ad.read_h5ad(screen(tmp, name="null.h5ad"))
    lab = a.obs["perturbation"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(0).choice(np.flatnonzero(lab == "control"), 60, replace=False)] = "NULL"
    a.obs["perturbation"] = lab
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1)
    cls = a.obs.loc[lab == "NULL", "scotgm_class"].value_counts().to_dict()
    case("null perturbation (control cells relabelled)", f"classes {cls}; effect_detected "
                                                           f"{bool(a.uns['scotgm']['summary'].loc['NULL', 'effect_detected'])}")
    X = a.X.toarray().astype(float)
    X[-1] = X[-1] * 0.37
    b = a.copy()
    b.X = sp.csr_matrix(X)
    case("normalised cell after the first 10^6 values", api(lambda: sg.tl.perturbation_response(
        b, "perturbation", "control", n_jobs=1)))
    c = a.copy()
    counts = c.X.toarray().astype(float)
    c.X = sp.csr_matrix(np.round(counts / counts.sum(1, keepdims=True) * 1e4))
    case("normalised then rounded to integers", api(lambda: sg.tl.perturbation_response(
        c, "perturbation", "control", n_jobs=1)))
    for argv, label in ((["--n-pcs", "-3"], "--n-pcs -3"), (["--n-pcs", "0"], "--n-pcs 0"),
                        (["--variance-threshold", "nan"], "--variance-threshold nan"),
                        (["--variance-threshold", "-1"], "--variance-threshold -1"),
                        (["--variance-threshold", "7"], "--variance-threshold 7")):
        code, msg = run_cli(["run", str(p), "--out", str(tmp / "x"), *argv, *base])
        case(label, f"exit {code}: {msg}")
    pert = sorted(set(lab) - {"control", "NULL"})[0]
    code, msg = run_cli(["run", str(p), "--out", str(tmp / "dup"), "--perturbations", pert, pert, *base])
    n_rows = len(json.loads((tmp / "dup" / "summary.json").read_text())["perturbations"])
    case("duplicated --perturbations", f"exit {code}; {n_rows} perturbation analysed once")
    case("perturbations='STAT1' (a string)", api(lambda: sg.tl.perturbation_response(
        a, "perturbation", "control", perturbations="STAT1", n_jobs=1)))
    code, msg = run_cli(["benchmark", str(p), "--perturbation-key", "perturbation", "--control", "control",
                         "--seeds", "0", "--out", str(tmp / "b")])
    case("benchmark --seeds 0", f"exit {code}: {msg}")
    d = a.copy()
    d.obs["rep"] = np.where(lab == pert, "lonely", "shared")
    case("a batch whose guide cells have no controls", api(lambda: (
        sg.tl.perturbation_response(d, "perturbation", "control", batch_key="rep", n_jobs=1),
        d.uns["scotgm"]["skipped"].to_dict("records"))[1]))
    from scotgm_pp.models import ScOTGM

    X2 = np.random.default_rng(0).normal(size=(80, 3))
    model = ScOTGM(random_state=0).fit(X2, fixed_state=np.r_[np.zeros(40, int), -np.ones(40, int)])
    path = model.save(tmp / "model.nc")
    import h5py

    with h5py.File(path, "r+") as f:
        s = json.loads(f.attrs["model_config"])
        s["state_names"] = s["state_names"][::-1]
        f.attrs["model_config"] = json.dumps(s, sort_keys=True)
    case("saved model with state names swapped", api(lambda: ScOTGM.load(path)))

    # messages
    good = p.read_bytes()
    (tmp / "trunc.h5ad").write_bytes(good[: len(good) // 2])
    (tmp / "zero.h5ad").write_bytes(b"")
    (tmp / "corrupt.h5ad").write_bytes(b"garbage" * 100)
    (tmp / "folder.h5ad").mkdir(exist_ok=True)
    for name in ("trunc", "zero", "corrupt", "folder"):
        code, msg = run_cli(["run", str(tmp / f"{name}.h5ad"), "--out", str(tmp / f"o_{name}"), *base])
        case(f"{name} .h5ad", f"exit {code}: {msg}")
    (tmp / "notnc.nc").write_bytes(b"hello")
    case("ScOTGM.load on a non-HDF5 file", api(lambda: ScOTGM.load(tmp / "notnc.nc")))
    backed = ad.read_h5ad(p, backed="r")
    case("backed AnnData", api(lambda: (sg.tl.perturbation_response(backed, "perturbation", "control", n_jobs=1,
                                                                     copy=True).uns["scotgm"]["summary"].shape)))
    one = ad.read_h5ad(p)[:, :1].copy()
    case("one gene", api(lambda: sg.tl.perturbation_response(one, "perturbation", "control", n_jobs=1)))


# ------------------------------------------------------------------------------------ issue 26
def cli_process(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scotgm_pp.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def killed_run(argv, out: Path, after: int = 2) -> int:
    """Start the CLI, kill -9 it once ``after`` perturbations are finished; return the records left."""
    proc = cli_process(argv)
    records = out / ".scotgm-run" / "records"
    t0, start = time.perf_counter(), time.time_ns()

    def written():  # by this process (an earlier run's records do not count)
        return sum(1 for p in records.glob("p_*.h5") if p.stat().st_mtime_ns >= start)

    while proc.poll() is None and time.perf_counter() - t0 < 300:
        if written() >= after:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return written()


def effects(path: Path) -> np.ndarray:
    return np.asarray(ad.read_h5ad(path).layers["effect"], float)


def not_a_scheduler(reply: bytes) -> str:
    """A TCP service that is no Dask scheduler: it answers ``reply`` (or nothing) and hangs on."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        held = []
        while True:
            conn, _ = srv.accept()
            held.append(conn)
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return f"tcp://127.0.0.1:{srv.getsockname()[1]}"


def timed_cli(argv):
    t0 = time.perf_counter()
    code, msg = run_cli(argv)
    return code, msg, time.perf_counter() - t0


def issue26(tmp: Path, base: list, case) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    a = sg.datasets.simulate(n_genes=60, n_perturbations=8, n_control=200, n_cells_per_perturbation=40,
                             n_de_genes=4, random_state=3)
    a.layers["counts"] = sp.csr_matrix(np.roll(a.X.toarray(), 11, axis=1))
    data = tmp / "screen.h5ad"
    a.write_h5ad(data)
    small = ad.read_h5ad(screen(tmp, name="small.h5ad"))

    # 1. store= with other data or settings
    store = tmp / "store"
    quiet = dict(n_jobs=1, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = sg.tl.perturbation_response(small, "perturbation", "control", store=store, **quiet)
    stamps = {p.name: p.stat().st_mtime_ns for p in store.glob("p_*.h5")}
    permuted = small[np.random.default_rng(0).permutation(small.n_obs)].copy()
    case("store= on the screen with its rows permuted", api(lambda: sg.tl.perturbation_response(
        permuted, "perturbation", "control", store=store, **quiet)))
    case("store= with n_pcs=3, coupling='independent'", api(lambda: sg.tl.perturbation_response(
        small, "perturbation", "control", store=store, n_pcs=3, coupling="independent", **quiet)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = sg.tl.perturbation_response(small, "perturbation", "control", store=store, **quiet)
    same = {p.name: p.stat().st_mtime_ns for p in store.glob("p_*.h5")} == stamps
    diff = np.nanmax(np.abs(np.asarray(sg.tl.get_responses(again).layers["effect"], float)
                            - np.asarray(sg.tl.get_responses(first).layers["effect"], float)))
    case("store= with the same data and settings", f"reused {len(stamps)} records (files untouched: {same}); "
                                                   f"effects differ by {diff:g}")

    # 2. a run killed mid-way, resumed with another layer / after an edit that keeps the mtime
    ref = tmp / "reference"
    run_cli(["run", str(data), "--out", str(ref), *base])
    out = tmp / "layer"
    left = killed_run(["run", str(data), "--out", str(out), "--layer", "counts", *base], out)
    code, msg = run_cli(["run", str(data), "--out", str(out), *base])
    case(f"killed with --layer counts ({left} records), rerun without --layer", f"exit {code}: {msg}")
    code, msg = run_cli(["run", str(data), "--out", str(out), "--overwrite", *base])
    resumed = json.loads((out / "summary.json").read_text())["resumed_perturbations"]
    case("  ... the same with --overwrite", f"exit {code}; resumed {resumed}; effects - a fresh run's: max "
                                           f"{np.nanmax(np.abs(effects(out / 'responses.h5ad') - effects(ref / 'responses.h5ad'))):g}")
    edited = tmp / "edited.h5ad"
    edited.write_bytes(data.read_bytes())
    out = tmp / "edited"
    left = killed_run(["run", str(edited), "--out", str(out), *base], out)
    st = edited.stat()
    import h5py

    with h5py.File(edited, "r+") as f:
        f["X/data"][...] = f["X/data"][...] + 1
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    kept = (edited.stat().st_size, edited.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    code, msg = run_cli(["run", str(edited), "--out", str(out), *base])
    case(f"killed ({left} records), input edited in place (size and mtime restored: {kept}), rerun",
         f"exit {code}: {msg}")
    argv = ["run", str(edited), "--out", str(out), "--overwrite", "--seed", "4", *base]
    left = killed_run(argv, out)
    code, msg = run_cli(argv)
    resumed = json.loads((out / "summary.json").read_text())["resumed_perturbations"]
    case(f"--overwrite run killed ({left} records), rerun", f"exit {code}; resumed {resumed} perturbations")

    # 3. schedulers that are not
    web = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, cwd=tmp)
    port = web.stdout.readline().split("port ")[1].split()[0]
    try:
        for label, address in ((f"--scheduler at an HTTP server (python -m http.server)", f"tcp://127.0.0.1:{port}"),
                               ("--scheduler at a closed port", "tcp://127.0.0.1:1"),
                               ("--scheduler 'not a scheduler'", "not a scheduler"),
                               ("--scheduler whose reply reads as a 3 EiB frame",
                                not_a_scheduler(b"HTTP/1.1 400 Bad Request\r\n\r\n")),
                               ("--scheduler http://... (a URL)", f"http://127.0.0.1:{port}")):
            out = tmp / "sched"
            code, msg, sec = timed_cli(["run", str(data), "--out", str(out), "--scheduler", address,
                                        "--scheduler-timeout", "5", *base[:-2]])
            case(label, f"exit {code} after {sec:.1f} s (timeout 5 s), run folder left: {out.exists()}: {msg}")
    finally:
        web.kill()
        web.wait()

    # 4. numeric arguments
    out = tmp / "npcs"
    code, msg, sec = timed_cli(["run", str(data), "--out", str(out), "--n-pcs", str(2**63), *base])
    case("--n-pcs 2**63", f"exit {code} after {sec:.2f} s: {msg}")
    case("n_pcs=2**63 (API)", api(lambda: sg.tl.perturbation_response(small, "perturbation", "control",
                                                                         n_pcs=2**63, **quiet)))
    t0 = time.perf_counter()
    code, lines = run_cli_lines(["run", str(data), "--out", str(tmp / "workers"), *base[:-2], "--n-workers", "24"])
    case(f"--n-workers 24 ({os.cpu_count()} cores)", f"exit {code} in {time.perf_counter() - t0:.1f} s; "
                                                     f"{lines[0] if lines else 'no warning'}")
    for argv in (["--n-workers", "0"], ["--n-workers", "-1"], ["--figures-top", "-3"]):
        code, lines = run_cli_lines(["run", str(data), "--out", str(tmp / "x"), *base[:-2], *argv])
        case(" ".join(argv), f"exit {code}, {len(lines)} line(s): {lines[-1]}")
    code, lines = run_cli_lines(["run", str(data)])
    case("run without its required options", f"exit {code}, {len(lines)} line(s): {lines[-1]}")
    code, msg = run_cli(["run", str(data), "--out", str(tmp / "nope"), "--figures", "NOPE", *base])
    case("--figures NOPE", f"exit {code}, run folder left: {(tmp / 'nope').exists()}: {msg}")

    # 5. a full disk (a 400 KiB file system)
    mount = tmp / "tiny_fs"
    mount.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                      capture_output=True).returncode == 0:
        try:
            proc = cli_process(["run", str(data), "--out", str(mount / "out"), *base])
            _, err = proc.communicate()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            case("disk full (400 KiB tmpfs)", f"exit {proc.returncode}, {len(lines)} line(s): "
                                              f"{lines[-1] if lines else ''}")
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    else:
        case("disk full (400 KiB tmpfs)", "not run: mounting a tmpfs needs root")

    # 6. corrupt or unsupported matrices
    import h5py

    for label, make in (("CSR column index out of range", "indices"), ("CSR indptr decreasing", "indptr"),
                        ("dense float16 X", "float16"), ("uint64 count >= 2**63", "uint64")):
        b = small.copy()
        if make == "float16":
            b.X = b.X.toarray().astype(np.float16)
        elif make == "uint64":
            b.X = b.X.astype(np.uint64)
            b.X.data[5] = 2**63 + 5
        path = tmp / f"{make}.h5ad"
        b.write_h5ad(path)
        with h5py.File(path, "r+") as f:
            if make == "indices":
                f["X/indices"][3] = 1000
            elif make == "indptr":
                f["X/indptr"][10] = f["X/indptr"][12] + 5
        code, msg = run_cli(["run", str(path), "--out", str(tmp / f"o_{make}"), *base])
        case(label, f"exit {code}: {msg}")

    # 7. formulas in CSV cells; keys under case folding and normalisation
    p = screen(tmp, ["=cmd|' /C calc'!A0", "+SUM(1,2)", "@A1"], "formula.h5ad")
    out = tmp / "formula"
    code, _ = run_cli(["run", str(p), "--out", str(out), *base, "--all-genes"])
    import csv

    with open(out / "gene_rankings.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    firsts = sorted({r["perturbation"] for r in rows})
    numeric = all(not r[c].startswith("'") and np.isfinite(float(r[c])) for r in rows for c in ("rank", "effect_z"))
    labels = sorted(ad.read_h5ad(out / "responses.h5ad").obs_names)
    case("labels =cmd|' /C calc'!A0, +SUM(1,2), @A1", f"exit {code}; gene_rankings.csv cells {firsts}; numbers "
                                                       f"parse as numbers: {numeric}; responses.h5ad labels {labels}")
    twins = ["GeneA", "genea", unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")]
    twins_file = tmp / "twins.h5ad"
    b = small.copy()
    old = b.obs["perturbation"].astype(str).to_numpy()
    extra = np.flatnonzero(old == "control")[:120]
    new = old.astype(object)
    for i, lab in enumerate(twins):
        new[extra[i * 30:(i + 1) * 30]] = lab
    b.obs["perturbation"] = new
    b.write_h5ad(twins_file)
    out = tmp / "twins"
    code, msg = run_cli(["run", str(twins_file), "--out", str(out), *base, "--perturbations", *twins])
    names = sorted(x.name for x in (out / "records").glob("p_*.h5"))
    folded = {unicodedata.normalize("NFD", n).casefold() for n in names}
    case("labels GeneA, genea, cafe-acute NFC and NFD", f"exit {code}; {len(names)} record files {names}; "
                                                           f"{len(folded)} distinct without case, after NFD")

    # 8. two runs into one --out at once
    out = tmp / "twice"
    procs = [cli_process(["run", str(data), "--out", str(out), *base]) for _ in range(2)]
    outcomes = []
    for proc in procs:
        _, err = proc.communicate()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        outcomes.append(f"exit {proc.returncode}" + (f": {lines[-1]}" if lines else ""))
    case("two runs into one --out at once", "; ".join(sorted(outcomes)))

    # 9. the benchmark report's guide cells
    out = tmp / "bench"
    code, msg = run_cli(["benchmark", str(tmp / "small.h5ad"), "--perturbation-key", "perturbation", "--control",
                         "control", "--n-target", "500", "--n-control", "100", "--seeds", "1", "--methods", "t-test",
                         "--out", str(out), "--quiet", "--n-workers", "1"])
    line = next(ln for ln in (out / "report.md").read_text().splitlines() if "guide cells" in ln)
    case("benchmark --n-target 500 on perturbations of 50 cells", f"exit {code}; report: {line[:160]}")



if __name__ == "__main__":
    main()
