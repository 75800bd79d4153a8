"""The README's quick start runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path


def test_the_readme_quick_start_runs_from_guide_counts():
    """The README's quick start, as written: it begins from guide counts."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Quick start in Python"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert code.index("assign_guides") < code.index("perturbation_response")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["adata"].uns["guide_assignment"]["counts"]["one_guide"] > 1500
    assert len(namespace["fractions"]) == 24 and namespace["fractions"]["fraction_perturbed"].notna().all()
    assert len(namespace["hits"]) > 0 and (namespace["resp"].obs["target_rank"] == 1).sum() >= 7
