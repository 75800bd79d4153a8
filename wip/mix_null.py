import numpy as np, sys
sys.path.insert(0, "/tmp/pb")
from mixfit import mixture_effects
rng = np.random.default_rng(0)
n, G = 150, 2000
rej_mix, rej_w, sdz_mix, sdz_w = [], [], [], []
for rep in range(5):
    # calibrated state probabilities: a two-component score mixture
    z = rng.random(n) < 0.7
    score = rng.normal(np.where(z, 1.5, 0.0), 1.0)
    lw = np.log(0.7) - 0.5 * (score - 1.5) ** 2 - (np.log(0.3) - 0.5 * score**2)
    w = 1 / (1 + np.exp(-lw))
    s = np.exp(rng.normal(np.log(3000), 0.3, n))
    beta = rng.normal(-7, 1.2, G)
    phi = 0.2
    mu = s[:, None] * np.exp(beta)[None, :]
    y = rng.negative_binomial(1 / phi, (1 / phi) / (1 / phi + mu))
    alpha = np.full(G, 1 / phi)
    d, se = mixture_effects(y, s, w, beta, alpha, np.zeros(G), delta_sd=1e6)
    zz = d / se
    ok = np.isfinite(zz) & (np.abs(d) < 10)
    rej_mix.append(np.mean(np.abs(zz[ok]) > 1.96)); sdz_mix.append(np.std(zz[ok]))
    # the weighted (complete-data) estimator with the imputation SE, beta known
    ysum = w @ y; msum = w @ mu
    dw = np.log(np.maximum(ysum, 1e-9) / msum)
    t = mu * np.exp(dw) + alpha; g1 = alpha * (y - mu * np.exp(dw)) / t; h1 = alpha * mu * np.exp(dw) * (y + alpha) / t**2
    Ic = (w[:, None] * h1).sum(0); V = (w[:, None] * (1 - w[:, None]) * g1**2).sum(0)
    sew = np.sqrt(1 / Ic + V / Ic**2)
    zw = dw / sew; okw = np.isfinite(zw) & (ysum > 0)
    rej_w.append(np.mean(np.abs(zw[okw]) > 1.96)); sdz_w.append(np.std(zw[okw]))
print("mixture: rej", np.round(rej_mix, 3), "sd z", np.round(sdz_mix, 3))
print("weighted: rej", np.round(rej_w, 3), "sd z", np.round(sdz_w, 3))
