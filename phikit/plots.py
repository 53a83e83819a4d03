"""Pictures: a live, self-contained ``dashboard.html`` beside each training run's metrics.jsonl,
``phikit plot``'s PNG/SVG curves comparing runs, and ``phikit bench --plot``'s bars.

The dashboard is one HTML file with the metrics embedded and a small script that draws them as SVG line
charts: nothing is fetched from the network (a browser opening a file:// page could not read metrics.jsonl
anyway), and while the run trains the page reloads itself every few seconds to show the file rewritten
since. Charts: every numeric metric, grouped (loss with held-out loss, learning rate, grad norm, tokens/s,
memory; DPO/ORPO rewards, accuracies and margins; GRPO's rewards and completion lengths), each against step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from phikit.errors import PhikitError

# chart title -> the metrics it draws (held-out ones are the same names with "eval_" in front)
GROUPS = [
    ("loss", ["loss", "nll_loss"]),  # ORPO's loss is its NLL minus beta x the log odds term
    ("learning rate", ["lr"]),
    ("grad norm", ["grad_norm"]),
    ("tokens/s", ["tokens_per_s"]),
    ("memory (MB a process)", ["memory/params_mb", "memory/optimizer_mb"]),
    ("rewards (DPO/ORPO: beta x log-ratio)", ["rewards/chosen", "rewards/rejected"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("reward margin", ["rewards/margins"]),
    ("log-probs of replies (DPO: sum, ORPO: per token)", ["logps/chosen", "logps/rejected"]),
    ("log odds, chosen vs rejected (ORPO)", ["log_odds_chosen", "log_odds_ratio"]),
    ("reward (GRPO)", ["reward", "reward_std"]),
    ("share of groups scored alike (GRPO)", ["frac_reward_zero_std"]),
    ("completion length (GRPO)", ["completions/mean_length"]),
    (
        "importance weights of the sampler's completions (GRPO)",
        [f"sampling/importance_sampling_ratio/{k}" for k in ("min", "mean", "max")],
    ),
]
REFRESH_S = 5
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]  # the dashboard's and the SVG bars'


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a line that does not parse, such as a half-written last one, is skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] for every finite numeric value."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    out.setdefault(key, []).append((row["step"], float(value)))
    return out


def charts(names: set[str]) -> list[tuple[str, list[str]]]:
    """(title, metrics) of each chart with data: the groups above (with their held-out twins), then one chart
    for each other metric."""
    out, used = [], set()
    for title, keys in GROUPS:
        present = []
        for k in (k for key in keys for k in (key, f"eval_{key}")):
            if k in names and k not in used and k not in present:
                present.append(k)
        if present:
            out.append((title, present))
            used.update(present)
    for name in sorted(names - used):
        if name.startswith("eval_") and name[5:] in used:
            continue
        out.append((name, [name]))
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>phikit: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.2em; }} .meta {{ color: #666; font-size: 0.9em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1em; }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; }}
figcaption {{ font-weight: 600; margin-bottom: 0.3em; }}
.legend span {{ margin-right: 1em; font-size: 0.85em; }}
svg text {{ font-size: 11px; fill: #555; }}
dl.values {{ display: grid; grid-template-columns: max-content auto; gap: 0.3em 1em; margin: 0.5em; }}
figure:has(dl.values) {{ align-self: start; }}
dl.values dt {{ color: #555; }} dl.values dd {{ margin: 0; font-size: 1.3em; font-weight: 600; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta" id="meta"></p>
<div class="grid" id="charts"></div>
<script type="application/json" id="data">{data}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const COLORS = {colors};
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) {{
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}}
function fmt(v) {{
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-2 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}}
function ticks(lo, hi, n) {{  // round values (1, 2 or 5 x 10^k apart) covering lo..hi in about n steps
  const raw = (hi - lo) / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * p).find(s => s >= raw * (1 - 1e-9));
  const out = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-6; v += step) out.push(+v.toPrecision(12));
  if (out[out.length - 1] < hi) out.push(+(out[out.length - 1] + step).toPrecision(12));
  return out;
}}
function chart(title, keys) {{
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.appendChild(cap);
  if (keys.every(k => DATA.series[k].length === 1)) {{  // logged once (memory at step 1): the values, no chart
    const list = document.createElement("dl");
    list.className = "values";
    for (const k of keys) {{
      const [step, value] = DATA.series[k][0];
      const term = document.createElement("dt"), def = document.createElement("dd");
      term.textContent = k;
      def.textContent = `${{fmt(value)}} (step ${{step}})`;
      list.append(term, def);
    }}
    fig.appendChild(list);
    return fig;
  }}
  const W = 420, H = 220, L = 60, R = 10, T = 10, B = 30;
  const svg = el("svg", {{width: "100%", viewBox: `0 0 ${{W}} ${{H}}`, role: "img", "aria-label": title}}, fig);
  const points = keys.flatMap(k => DATA.series[k]);
  let [x0, x1] = [Math.min(...points.map(p => p[0])), Math.max(...points.map(p => p[0]))];
  let [y0, y1] = [Math.min(...points.map(p => p[1])), Math.max(...points.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) {{ const pad = Math.abs(y0) / 10 || 0.5; y0 -= pad; y1 += pad; }}
  const ys = ticks(y0, y1, 4), xs = ticks(x0, x1, 5).filter(x => Number.isInteger(x) || x1 - x0 > 5);
  [y0, y1] = [ys[0], ys[ys.length - 1]];
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const v of ys) {{  // round values with light grid lines
    el("line", {{x1: L, y1: sy(v), x2: W - R, y2: sy(v), stroke: "#eee"}}, svg);
    el("text", {{x: L - 4, y: sy(v) + 4, "text-anchor": "end"}}, svg).textContent = fmt(v);
  }}
  el("line", {{x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}}, svg);
  el("line", {{x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}}, svg);
  for (const x of xs.filter(x => x >= x0 && x <= x1)) {{
    el("text", {{x: sx(x), y: H - 12, "text-anchor": "middle"}}, svg).textContent = String(x);
  }}
  el("text", {{x: W - R, y: H - 1, "text-anchor": "end"}}, svg).textContent = "step";
  const legend = document.createElement("div");
  legend.className = "legend";
  keys.forEach((k, i) => {{
    const pts = DATA.series[k];
    const color = COLORS[i % COLORS.length];
    const d = pts.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    el("path", {{d: d, fill: "none", stroke: color, "stroke-width": 1.5}}, svg);
    if (pts.length < 40) pts.forEach(p => el("circle", {{cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color}}, svg));
    const s = document.createElement("span");
    s.style.color = color;
    const last = pts[pts.length - 1];
    s.textContent = `${{k}} (last ${{fmt(last[1])}} at step ${{last[0]}})`;
    legend.appendChild(s);
  }});
  fig.appendChild(legend);
  return fig;
}}
const grid = document.getElementById("charts");
for (const [title, keys] of DATA.charts) grid.appendChild(chart(title, keys));
const state = DATA.live ? "; reloads every {refresh_s} s" : "; " + DATA.status;
document.getElementById("meta").textContent = `${{DATA.rows}} rows of metrics.jsonl, written ${{DATA.written}}` + state;
</script></body></html>
"""


def dashboard_html(rows: list[dict], title: str, live: bool, status: str = "run finished") -> str:
    """The page for ``rows`` (metrics.jsonl's); ``live``: it reloads itself every REFRESH_S seconds; else it
    says ``status`` (how the run ended)."""
    data = series(rows)
    payload = {
        "series": data,
        "charts": charts(set(data)),
        "rows": len(rows),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "live": live,
        "status": status,
    }
    text = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")  # no early </script>
    refresh = f'\n<meta http-equiv="refresh" content="{REFRESH_S}">' if live else ""
    escaped = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return PAGE.format(refresh=refresh, title=escaped, data=text, refresh_s=REFRESH_S, colors=json.dumps(COLORS))


def write_dashboard(run: Path, live: bool = False, status: str = "run finished") -> Path:
    """run/dashboard.html from run/metrics.jsonl, written atomically (``status``: see ``dashboard_html``)."""
    from phikit.checkpoint import atomic_write

    rows = read_metrics(run / "metrics.jsonl")
    html = dashboard_html(rows, f"fine-tuning run {run.resolve().name}", live, status)
    atomic_write(run / "dashboard.html", lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return run / "dashboard.html"


def plot_runs(runs: list[Path], out: Path, metrics: list[str] | None = None) -> Path:
    """One PNG or SVG (by ``out``'s suffix) with a panel per chart, each run a line: runs compared."""
    check_picture(out)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    data = {}
    for run in runs:
        path = run / "metrics.jsonl" if run.is_dir() else run
        if not path.is_file():
            raise PhikitError(f"{run}: no metrics.jsonl (give a run's output_dir or its metrics.jsonl)")
        label = path.parent.name if path.name == "metrics.jsonl" else path.stem
        data[label] = series(read_metrics(path))
    names = set().union(*(set(s) for s in data.values()))
    panels = charts(names) if not metrics else [(m, [m]) for m in metrics if m in names]
    if not panels:
        raise PhikitError(f"nothing to plot: {'none of ' + ', '.join(metrics) if metrics else 'no numeric metrics'}")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for label, runs_series in data.items():
            for key in keys:
                if key in runs_series:
                    steps, values = zip(*runs_series[key])
                    name = label if len(keys) == 1 else f"{label}: {key}"
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, lw=1, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(plt, fig, out)


def _bar_value(value: float) -> str:
    """A bar's label: whole numbers with thousands separators from 100 up (1,530, not 1.53e+03), else 3 digits."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def check_picture(out: Path) -> None:
    """A picture is written as .png or .svg (by its suffix); anything else is refused before any work."""
    if out.suffix.lower() not in (".png", ".svg"):
        raise PhikitError(f"{out}: write a .png or .svg file")


def _save(plt, fig, out: Path) -> Path:
    """The figure into ``out`` (PNG or SVG by its suffix), written atomically, and closed."""
    from phikit.checkpoint import atomic_write

    atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=100))
    plt.close(fig)
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PhikitError("drawing needs matplotlib: pip install matplotlib (or .[bench])") from None
    return plt


def plot_bench(report: dict, out: Path) -> Path:
    """``phikit bench``'s report as bars: prefill and decode tokens/s and peak memory per precision, a
    color per engine (phikit, transformers), one PNG or SVG by ``out``'s suffix."""
    check_picture(out)
    rows = [r for r in report["rows"] if "error" not in r]
    if not rows:
        raise PhikitError("nothing to draw: every measurement failed")
    plt = _pyplot()
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    panels = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"), ("peak_memory_gb", "peak GB")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    width = 0.8 / len(engines)
    for ax, (key, title) in zip(axes, panels):
        for i, engine in enumerate(engines):
            values = {r["precision"]: r.get(key, 0.0) for r in rows if r["engine"] == engine}
            xs = [j + i * width for j, p in enumerate(precisions) if p in values]
            bars = ax.bar(xs, [values[p] for p in precisions if p in values], width, label=engine)
            ax.bar_label(bars, fmt=_bar_value, fontsize=7)
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(precisions))], precisions)
        ax.set_title(title)
        ax.legend(fontsize=7)
    settings = report.get("settings", {})
    fig.suptitle(
        f"{Path(str(settings.get('model', ''))).name}: prompt {settings.get('prompt_tokens')} tokens, "
        f"{settings.get('new_tokens')} new; {report.get('machine', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(plt, fig, out)


def _esc(text: str) -> str:
    import html

    return html.escape(str(text), quote=True)


def bars_svg(title: str, categories: list[str], series: dict[str, list[float]], stacked: bool = False) -> str:
    """An inline SVG bar chart (no script, nothing fetched): a group of bars per category, a color per
    series; ``stacked`` piles the series up instead (counts that add up to a whole)."""
    width, left, top = max(360, 70 + 26 * len(categories) * (1 if stacked else len(series))), 46, 28
    legend: list[list[tuple[str, float]]] = [[]]  # rows of (series name, x): as many rows as the names need
    x = 0.0
    for name in series:
        room = 30 + 6.5 * len(name)  # the square, the name (11 px text: ~6.5 px a character), a gap
        if legend[-1] and left + x + room > width - 10:
            legend.append([])
            x = 0.0
        legend[-1].append((name, left + x))
        x += room
    bottom = 40 + 16 * (len(legend) - 1)
    height = 190 + bottom
    totals = [sum(v[i] for v in series.values()) for i in range(len(categories))] if stacked else []
    peak = max(totals or [x for v in series.values() for x in v] or [1.0]) or 1.0
    plot_w, plot_h = width - left - 10, height - top - bottom
    group = plot_w / max(len(categories), 1)
    bar = group * 0.8 / (1 if stacked else max(len(series), 1))
    labelled = not stacked and len(categories) * len(series) <= 12
    fit = min(14, max(4, int(group / 6)))  # characters of a category name under its group (10 px text: ~6 px each)
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak:.3g}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>',
    ]
    for i, category in enumerate(categories):
        x0 = left + i * group + group * 0.1
        base = 0.0
        for j, (name, values) in enumerate(series.items()):
            h = values[i] / peak * plot_h
            x = x0 if stacked else x0 + j * bar
            y = top + plot_h - h - (base / peak * plot_h if stacked else 0)
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{COLORS[j % len(COLORS)]}">'
                f"<title>{_esc(name)}, {_esc(category)}: {values[i]:.4g}</title></rect>"
            )
            if labelled:  # few bars: each says its value (two perplexities 0.4% apart look the same as bars)
                out.append(
                    f'<text class="value" x="{x + bar / 2:.1f}" y="{y - 3:.1f}" font-size="9" '
                    f'text-anchor="middle">{values[i]:.4g}</text>'
                )
            base += values[i] if stacked else 0
        short = category if len(category) <= fit else category[: fit - 1] + "\u2026"  # cut, said, whole on hover
        out.append(
            f'<text class="category" x="{x0 + group * 0.4:.1f}" y="{top + plot_h + 14}" font-size="10" '
            f'text-anchor="middle">{_esc(short)}<title>{_esc(category)}</title></text>'
        )
    j = 0
    for r, row in enumerate(legend):
        for name, x in row:
            y = height - 6 - 16 * (len(legend) - 1 - r)
            out.append(
                f'<text x="{x:.0f}" y="{y}" font-size="11" fill="{COLORS[j % len(COLORS)]}">&#9632; {_esc(name)}</text>'
            )
            j += 1
    return "".join(out) + "</svg>"
