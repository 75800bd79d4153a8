import time, numpy as np, warnings
from scotgm_pp.inference import count_layer as cl, count_fit as cf
warnings.simplefilter("ignore")
rng = np.random.default_rng(0)
n0, n1, G = 800, 300, 8000
base = rng.normal(-8.5, 1.5, G); eff = np.zeros(G); eff[:100] = rng.normal(0, 1, 100)
z = rng.random(n1) < 0.7
score = rng.normal(np.where(z, 1.5, 0.0), 1.0)
lw = np.log(0.7) - 0.5 * (score - 1.5) ** 2 - (np.log(0.3) - 0.5 * score**2); w = 1 / (1 + np.exp(-lw))
s = np.exp(rng.normal(np.log(5000), 0.3, n0 + n1)); st = np.r_[np.zeros(n0, bool), z]
mu = s[:, None] * np.exp(base + eff * st[:, None])
y = rng.negative_binomial(5, 5 / (5 + mu)).astype(float)
fixed = np.r_[np.zeros(n0, int), -np.ones(n1, int)]
R = np.zeros((n0 + n1, 2)); R[:n0, 0] = 1; R[n0:, 1] = w; R[n0:, 0] = 1 - w
lib = y.sum(1)
data = cl.CountData(y, lib, cl.control_dispersion(y, lib, fixed == 0), fixed, 2)
prior = cl.default_count_prior(y, lib)
for rep in range(4):
    t = time.perf_counter(); cf.fit_given_states(data, R, prior, tol=1e-4); a = time.perf_counter() - t
    t = time.perf_counter(); _, _, it, ok = cf.fit_marginal(data, R, prior, tol=1e-4); b = time.perf_counter() - t
    print("cut", round(a, 3), "marginal", round(b, 3), "ratio", round(b / a, 2), "EM it", it, ok)
