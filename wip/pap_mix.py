"""Prototype: the Papalexi benchmark with the perturbed effect from the per-gene mixture likelihood."""
import sys
import numpy as np
sys.path.insert(0, "/tmp/pb")
from mixfit import mixture_effects
import scotgm_pp.tl._pair as P
from scotgm_pp.cli import main

_orig = P.fit_count_layer

def patched(counts, fixed_state, responsibilities, **kw):
    cf = _orig(counts, fixed_state, responsibilities, **kw)
    fixed = np.asarray(fixed_state)
    guide = fixed != 0
    w = np.where(fixed[guide] < 0, np.asarray(responsibilities)[guide, 1], 1.0)
    y = counts[np.flatnonzero(guide)]
    s = np.asarray(kw["size_factors"])[guide]
    alpha = 1.0 / np.maximum(np.asarray(cf.dispersion, float), 1e-6)
    d, se = mixture_effects(y, s, w, cf.params.beta, alpha, cf.params.delta[1], delta_sd=cf.prior.delta_sd)
    cf.params.delta[1] = d
    cf.effect_se[1] = se
    return cf

if __name__ == "__main__":
    P.fit_count_layer = patched
    sys.exit(main(sys.argv[1:]))
