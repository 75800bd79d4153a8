# Papalexi ranking, weighted against marginal count likelihood, same command (see the commit message)
cd /work/wip-marginal && . /work/main/.venv/bin/activate && PYTHONPATH=/work/wip-marginal python -m scotgm_pp.cli benchmark \
  /work/shared/data/papalexi2021_eccite_subset.h5ad --perturbation-key target --control non-targeting --n-target 60 \
  --n-control 300 --seeds 20 --methods scotgm-ot:effect_shrunk scotgm-ot:effect_shrunk_marginal --n-workers 1 --quiet \
  --out /tmp/wipm/pap
