"""The README's Python example runs as written (on small synthetic banks named as in the README)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from disalign.calib.artifact.publish import artifact_dir
from tests.conftest import REPO


@pytest.mark.slow  # the example's 13-point rho grid: about 30 s on 2 busy cores
def test_readme_python_example(lt_banks, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"From Python.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.h5").symlink_to(lt_banks[split])
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102
    probabilities, est = scope["probabilities"], scope["est"]
    assert isinstance(probabilities, np.ndarray) and probabilities.shape == (100, 10)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert len(scope["names"]) == 100 and set(scope["names"]) <= set(est.class_names_)
    assert (artifact_dir(tmp_path / "calib") / "calibration.json").is_file() and type(est).__name__ == "DisAlign"
