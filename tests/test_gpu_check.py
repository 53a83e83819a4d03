"""benchmarks/gpu_check.sh stops within seconds, saying why in one line of summary.md, where the run could not
succeed: no GPU, no .whl/ or .device/ it needs, stage limits that do not match the stages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def check(tmp_path, **env) -> tuple[int, str, float]:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, (out / "summary.md").read_text(), time.monotonic() - start


@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for the Linux GPU machines")
def test_the_gpu_check_stops_at_once_where_it_cannot_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    code, summary, seconds = check(tmp_path, PHIKIT_CHECK_LIMITS="100 40")
    assert code == 2 and "PHIKIT_CHECK_LIMITS has 2 values, one per stage is 5" in summary
    code, summary, seconds = check(tmp_path, PHIKIT_CHECK_LIMITS="100 40 75 ninety 180")
    assert code == 2 and "'ninety' is not a whole number" in summary
    if not list((REPO / ".whl").glob("*.whl")):
        code, summary, seconds = check(tmp_path)
        assert code == 2 and ("no .whl/*.whl" in summary or "no .device/" in summary), summary
    code, summary, seconds = check(tmp_path, PHIKIT_CHECK_NO_WHEELS="1")
    if "no .device/" not in summary:  # ../shared or .device/ is here: the GPU is what is missing
        assert code == 2 and "torch sees no CUDA/ROCm GPU" in summary, summary
    assert len(summary.strip().splitlines()) == 1 and seconds < 60
