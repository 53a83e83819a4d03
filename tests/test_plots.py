"""Pictures of runs: the dashboard.html a run keeps (its data embedded safely, drawn in a real browser without
console errors), and ``phikit plot``'s PNG and SVG comparing runs."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from phikit.cli import main as cli
from phikit.errors import PhikitError
from phikit.plots import charts, dashboard_html, series, write_dashboard

REPO = Path(__file__).resolve().parents[1]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def fake_run(folder: Path, steps: int = 12, scale: float = 1.0, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": 1, "memory/params_mb": 26.4, "memory/optimizer_mb": 52.7}]
    for s in range(1, steps + 1):
        rows.append(
            {"step": s, "loss": scale * 2 / s, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 900.0, **(extra or {})}
        )
        if s % 4 == 0:
            rows.append({"step": s, "eval_loss": scale * 2.2 / s, "eval_perplexity": 3.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')
    return folder


def embedded(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def test_a_run_keeps_a_dashboard_with_every_metric(tiny, tmp_path):
    """A DPO run on the tiny model writes dashboard.html with its metrics grouped into charts (loss with
    held-out loss, the preference rewards...); finished, the page no longer reloads itself."""
    from phikit.train import TrainConfig, finetune

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        (json.dumps({"prompt": "### Human: hi### Assistant:", "chosen": " Hi.", "rejected": " No."}) + "\n") * 8
    )
    config = TrainConfig.from_yaml(
        REPO / "recipes" / "tiny-dpo-cpu.yaml",
        {"model": str(tiny[0]), "output_dir": str(tmp_path / "run"), "data": str(pairs), "eval_data": str(pairs)},
    )
    finetune(config, progress=False)
    html = (tmp_path / "run" / "dashboard.html").read_text()
    data = embedded(html)
    assert ["loss", "eval_loss"] in [keys for _, keys in data["charts"]]
    assert any("rewards/accuracies" in keys for _, keys in data["charts"])
    assert 'http-equiv="refresh"' not in html and not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)


def test_metric_names_cannot_break_out_of_the_page(tmp_path):
    run = fake_run(tmp_path / "run", extra={"</script><script>alert(1)</script>": 1.0})
    html = write_dashboard(run, live=True).read_text()
    assert "</script><script>alert(1)" not in html and 'http-equiv="refresh"' in html
    assert "</script><script>alert(1)</script>" in embedded(html)["series"]


def test_charts_group_metrics_and_skip_what_is_not_a_number():
    rows = [{"step": 1, "loss": 1.0, "eval_loss": 1.1, "note": "x", "nan": float("nan"), "flag": True, "custom": 3}]
    assert set(series(rows)) == {"loss", "eval_loss", "custom"}
    assert charts({"loss", "eval_loss", "custom"}) == [("loss", ["loss", "eval_loss"]), ("custom", ["custom"])]
    orpo = {"loss", "nll_loss", "eval_nll_loss", "log_odds_ratio", "log_odds_chosen", "eval_log_odds_ratio"}
    assert charts(orpo) == [  # ORPO's terms in two charts, not one each
        ("loss", ["loss", "nll_loss", "eval_nll_loss"]),
        ("log odds, chosen vs rejected (ORPO)", ["log_odds_chosen", "log_odds_ratio", "eval_log_odds_ratio"]),
    ]
    assert "phikit: a &lt;b&gt;" in dashboard_html(rows, "a <b>", live=False)


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium; CI installs it)")
def test_the_dashboard_draws_in_chromium_without_console_errors(tmp_path):
    run = fake_run(tmp_path / "run", extra={"rewards/accuracies": 0.6})
    page = write_dashboard(run, live=False)
    shot = tmp_path / "dashboard.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    proc = subprocess.run(
        [*cmd, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    dom = proc.stdout
    assert dom.count("<figure>") == len(embedded(page.read_text())["charts"]) >= 5, proc.stderr[-2000:]
    assert dom.count("<path ") >= 7 and "run finished" in dom
    # a metric logged once (memory at step 1) shows its values instead of a chart of one point
    assert re.search(r"<dt>memory/params_mb</dt><dd>26\.4 \(step 1\)</dd>", dom), dom[:3000]
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", proc.stderr), proc.stderr[-2000:]
    subprocess.run(
        [*cmd, "--window-size=1280,900", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120
    )
    assert png_size(shot) == (1280, 900)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_phikit_plot_compares_runs_as_png_and_svg(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", scale=0.5)
    assert cli(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(tmp_path / "runs.png")]) == 0
    width, height = png_size(tmp_path / "runs.png")
    assert (width, height) == (1500, 680)  # 6 panels: 3 columns x 2 rows of 500 x 340 px
    assert cli(["plot", str(a), "--metrics", "loss,eval_loss", "--out", str(tmp_path / "loss.svg")]) == 0
    root = ET.parse(tmp_path / "loss.svg").getroot()
    assert root.tag.endswith("svg")
    assert cli(["plot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) != 0
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(PhikitError, match="png or .svg"):
        from phikit.plots import plot_runs

        plot_runs([a], tmp_path / "x.jpg")


def test_bar_labels_are_plain_numbers():
    from phikit.plots import _bar_value

    assert [_bar_value(v) for v in (1530.4, 128.0, 17.25, 0.5)] == ["1,530", "128", "17.2", "0.5"]


def test_svg_bars_say_cut_names_whole_on_hover_and_their_values_where_few():
    import xml.etree.ElementTree as ET

    from phikit.plots import bars_svg

    ns = "{http://www.w3.org/2000/svg}"
    chart = ET.fromstring(bars_svg("t", ["shakespeare-dialogue", "short"], {"a": [51.59, 51.79]}))
    texts = chart.findall(f"{ns}text")
    categories = [t for t in texts if t.get("class") == "category"]
    assert [t.text for t in categories] == ["shakespeare-d\u2026", "short"]
    assert categories[0].find(f"{ns}title").text == "shakespeare-dialogue"
    assert [t.text for t in texts if t.get("class") == "value"] == ["51.59", "51.79"]
    many = ET.fromstring(bars_svg("t", [str(i) for i in range(13)], {"a": [1.0] * 13}))
    assert not [t for t in many.findall(f"{ns}text") if t.get("class") == "value"]  # too many to label
    names = [f"attention-summary-{i}" for i in range(10)]  # ten groups of ~53 px: names cut to fit, not overlapping
    crowded = ET.fromstring(bars_svg("t", names, {"a": [1.0] * 10, "b": [2.0] * 10}))
    cut = [t.text for t in crowded.findall(f"{ns}text") if t.get("class") == "category"]
    assert all(len(c) <= 8 and c.endswith("\u2026") for c in cut), cut
