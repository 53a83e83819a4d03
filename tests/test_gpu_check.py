"""benchmarks/gpu_check.sh stops within seconds, saying why in one line of summary.md, where the run could not
succeed: no GPU, no .whl/ or .device/ it needs, stage limits that do not match the stages or add up to more
than its 8 minutes. Its dry run goes through every stage on the CPU. benchmarks/wheel_deps.py names the
carried wheels' requirements that the other wheels and the installed packages do not meet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata
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
    code, summary, seconds = check(tmp_path, PHIKIT_CHECK_LIMITS="100 40 75 90 180")
    assert code == 2 and "PHIKIT_CHECK_LIMITS add up to 485s, more than the 480s" in summary, summary
    if not list((REPO / ".whl").glob("*.whl")):
        code, summary, seconds = check(tmp_path)
        assert code == 2 and ("no .whl/*.whl" in summary or "no .device/" in summary), summary
    code, summary, seconds = check(tmp_path, PHIKIT_CHECK_NO_WHEELS="1")
    if "no .device/" not in summary:  # ../shared or .device/ is here: the GPU is what is missing
        assert code == 2 and "torch sees no CUDA/ROCm GPU" in summary, summary
    assert len(summary.strip().splitlines()) == 1 and seconds < 60


def tokenizer_and_rows() -> bool:
    shared, device = REPO.parent / "shared" / "data", REPO / ".device"
    pairs = [(shared / "phi2-tokenizer", shared / "guanaco-1k" / "train.jsonl")]
    pairs.append((device / "phi2-tokenizer", device / "guanaco.jsonl"))
    return any(tokenizer.exists() and rows.exists() for tokenizer, rows in pairs)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for the Linux GPU machines")
@pytest.mark.skipif(
    not tokenizer_and_rows(),
    reason="needs Phi-2's tokenizer and guanaco rows (../shared/data or .device/, as the script reads)",
)
def test_the_dry_run_goes_through_every_stage_without_a_gpu(tmp_path):
    # 1 s per stage: each is cut, which is what this asserts on (the whole dry run takes about 90 s)
    code, summary, seconds = check(
        tmp_path,
        PHIKIT_CHECK_DRY="1",
        PHIKIT_CHECK_LIMITS="1 1 1 1 1",
        PHIKIT_CHECK_NO_WHEELS="1",  # the wheels install in seconds; not what this is about
        PHIKIT_BENCH_WORK=str(tmp_path / "work"),
    )
    assert code == 0, summary
    assert "DRY RUN" in summary and "torch sees no" not in summary
    for stage in ("setup: checks, wheels, versions", "tests", "phi2", "decode", "qlora", "bench", "**total**"):
        assert f"| {stage} |" in summary, summary
    assert "| decode | 124 (time limit) |" in summary
    assert (tmp_path / "work" / "phi2-random" / "config.json").is_file()  # re-made after its stage was cut


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel holding nothing but its METADATA, enough for wheel_deps."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    headers += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(headers) + "\n\nA fake.\n")
    return path


def test_wheel_deps_names_each_unmet_requirement(tmp_path):
    numpy = metadata.version("numpy")
    fake_wheel(
        tmp_path,
        "fake",
        "1.0",
        [
            "numpy>=999",  # installed, too old
            "fake-helper>=2",  # carried, too old
            "fake_other<2",  # carried, good (name spelled another way)
            "not-a-real-package-here>=1",  # neither carried nor installed
            "numpy>=1; python_version < '3'",  # a marker that does not hold: skipped
            "pytest>=1",  # installed, good
            "tqdm>=99; extra == 'progress'",  # only for an extra: skipped
        ],
    )
    fake_wheel(tmp_path, "fake_helper", "1.5", [])
    fake_wheel(tmp_path, "fake-other", "1.2", [])
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "wheel_deps.py"), str(tmp_path)], capture_output=True, text=True
    )
    line = proc.stdout.strip()
    assert proc.returncode == 1 and len(line.splitlines()) == 1, proc
    assert line.startswith("wheel requirements unmet (3): ")
    assert f"fake needs numpy>=999, the image has {numpy}" in line
    assert "fake needs fake-helper>=2, the carried wheel is 1.5" in line
    assert "fake needs not-a-real-package-here>=1, which is neither carried nor installed" in line
    assert "fake_other" not in line and "pytest" not in line and "tqdm" not in line


def test_wheel_deps_says_when_all_is_met(tmp_path):
    fake_wheel(tmp_path, "fake", "1.0", ["fake-helper>=1", f"numpy=={metadata.version('numpy')}"])
    fake_wheel(tmp_path, "fake_helper", "1.5", [])
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "wheel_deps.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("wheel requirements: all met (2 carried wheels"), proc
