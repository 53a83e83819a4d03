"""phikit bench's JSON report and phikit perplexity against transformers' loss."""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phikit.checkpoint import load_model
from phikit.cli import main
from phikit.evaluate import perplexity
from phikit.tokenizer import Tokenizer

ROW_KEYS = {"engine", "precision", "load_s", "prefill_tok_s", "ttft_s", "decode_tok_s", "peak_memory_gb"}


@pytest.mark.slow
def test_bench_json_schema(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            str(folder),
            "--precisions",
            "fp32,int4",
            "--prompt-tokens",
            "20",
            "--new-tokens",
            "5",
            "--repeats",
            "1",
            "--compare-transformers",
            "--depth",
            "48,96",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "bench.png"),
        ]
    )
    said = capsys.readouterr()
    stdout = said.out
    assert code == 0 and f"wrote {out}" in said.err and f"wrote {tmp_path / 'bench.png'}" in said.err
    assert f", {torch.get_num_threads()} of {os.cpu_count()} CPU threads" in stdout  # the threads it used
    head = (tmp_path / "bench.png").read_bytes()[:24]  # 3 panels of bars, 15 x 3.8 inches at 100 dpi
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1500, 380)
    report = json.loads(out.read_text())
    assert {"date", "machine", "settings", "rows"} <= report.keys()
    rows = report["rows"]
    assert [(r["engine"], r["precision"]) for r in rows] == [  # the baselines first
        ("transformers", "bf16"),
        ("transformers", "fp32"),
        ("phikit", "fp32"),
        ("phikit", "int4"),
    ]
    for r in rows:
        assert ROW_KEYS <= r.keys(), r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_memory_gb"] > 0
        assert "decode_vs_transformers_bf16" in r
    assert "| phikit | int4 |" in stdout
    for r in rows[2:]:  # decode after 48 and 96 tokens of context, with the cache those hold
        assert set(r["decode_at_depth_tok_s"]) == {"48", "96"} and min(r["decode_at_depth_tok_s"].values()) > 0
        assert r["kv_cache_mb_at_depth"]["96"] == pytest.approx(2 * r["kv_cache_mb_at_depth"]["48"])
    assert "decode tok/s after N tokens" in stdout
    assert main(["plot", str(out), "--out", str(tmp_path / "again.png")]) == 0  # the saved report drawn again
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "bench.png").read_bytes()


@pytest.mark.parametrize("depth", ["abc", "0", "1000"])
def test_bench_refuses_a_depth_it_cannot_measure(tiny, capsys, depth):
    folder, _ = tiny  # a context of 256 tokens
    assert main(["bench", "--model", str(folder), "--precisions", "fp32", "--depth", depth]) == 2
    assert "--depth" in capsys.readouterr().err


def test_perplexity_matches_transformers_loss(tiny):
    folder, hf = tiny
    tok = Tokenizer(folder)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 12)[:150]
    model = load_model(folder, dtype="fp32", device="cpu")
    # windows of 64 tokens every 32: the documented transformers recipe, computed with its model
    total, count, scored = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, 32):
        end = min(begin + 64, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        first = max(scored, begin + 1) - begin  # label positions scored before get -100
        labels[:, :first] = -100
        with torch.no_grad():
            loss = hf(window, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count, scored = total + loss.item() * n, count + n, end
        if end == len(ids):
            break
    result = perplexity(model, ids, context=64, stride=32)
    assert result.tokens == count == len(ids) - 1
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-4)


def test_a_benchmark_without_its_extra_says_what_to_install(tmp_path):
    """bench_finetune needs trl (the `bench` extra): without it, one line naming the command, no traceback."""
    blocker = tmp_path / "trl"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('trl is not installed')\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune.py"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "pip install -e '.[bench]'" in result.stderr
