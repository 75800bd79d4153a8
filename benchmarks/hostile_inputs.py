"""Every careless or hostile input listed in issue 15, run through the CLI or the API; one line each.

    python benchmarks/hostile_inputs.py [--workdir DIR]

Each case prints its outcome: the exit code and the one-line message for the CLI, or the
exception or the checked result for the API.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._validation import InputError
from scotgm_pp.cli import main as cli


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli(argv)
        except SystemExit as e:
            code = e.code
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    return code, (lines[-1] if lines else "")


def api(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok: " + str(fn())
    except (InputError, ValueError, KeyError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


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
    args = ap.parse_args()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="scotgm_hostile_"))
    tmp.mkdir(parents=True, exist_ok=True)
    base = ["--perturbation-key", "perturbation", "--control", "control", "--quiet", "--n-workers", "1"]
    cases = []

    def case(name, outcome):
        cases.append((name, outcome))
        print(f"- {name}: {outcome}", flush=True)

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
    lab = a.obs["perturbation"].astype(object).to_numpy()
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
    print(f"\n{len(cases)} cases; files in {tmp}")


if __name__ == "__main__":
    main()
