import numpy as np, time, warnings, sys
sys.path.insert(0, "wip")
from mixfit import mixture_effects
from scotgm_pp.inference import count_layer as cl, count_fit as cf
warnings.simplefilter("ignore")
rng = np.random.default_rng(1)
n0, n1, G = 300, 150, 400
base = rng.normal(-7, 1.2, G); eff = np.zeros(G); eff[:40] = rng.choice([-1, 1], 40) * rng.uniform(0.5, 2.3, 40)
z = rng.random(n1) < 0.7
score = rng.normal(np.where(z, 1.5, 0.0), 1.0)
lw = np.log(0.7) - 0.5 * (score - 1.5) ** 2 - (np.log(0.3) - 0.5 * score**2); w = 1 / (1 + np.exp(-lw))
s = np.exp(rng.normal(np.log(3000), 0.3, n0 + n1)); st = np.r_[np.zeros(n0, bool), z]
mu = s[:, None] * np.exp(base + eff * st[:, None]); phi = 0.2
y = rng.negative_binomial(1 / phi, (1 / phi) / (1 / phi + mu)).astype(float)
fixed = np.r_[np.zeros(n0, int), -np.ones(n1, int)]
R = np.zeros((n0 + n1, 2)); R[:n0, 0] = 1; R[n0:, 1] = w; R[n0:, 0] = 1 - w
data = cl.CountData(y, s, np.full(G, phi), fixed, 2)
prior = cl.default_count_prior(y, s)
t = time.perf_counter(); cut, _, _ = cf.fit_given_states(data, R, prior); t_cut = time.perf_counter() - t
t = time.perf_counter(); marg, Q, it, ok = cf.fit_marginal(data, R, prior); t_m = time.perf_counter() - t
print("EM iterations", it, ok, "time cut / marginal", round(t_cut, 3), round(t_m, 3))
d_proto, se_proto = mixture_effects(y[n0:], s[n0:], w, marg.params.beta, np.full(G, 1 / phi), marg.params.delta[1], delta_sd=prior.delta_sd)
print("max |delta - 1-D prototype (beta fixed at the fit)|", np.abs(marg.params.delta[1] - d_proto).max())
se_l = cf.effect_standard_errors(data, marg, R, prior, correction="louis", Q=Q)[1]
print("max rel |se louis - prototype|", np.nanmax(np.abs(se_l / se_proto - 1)))
print("target-like genes (eff<-1.5): cut err", np.round((cut.params.delta[1] - eff)[eff < -1.5].mean(), 3), "marginal err", np.round((marg.params.delta[1] - eff)[eff < -1.5].mean(), 3))
