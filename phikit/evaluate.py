"""Evaluation: perplexity over a text file, prompt suites compared side by side, and lm-evaluation-harness.

Three views of a model that answer different questions: perplexity (did quantizing hurt?), a fixed
prompt suite read by a person (did fine-tuning change how it answers?), and lm-eval's benchmark tasks
(numbers comparable with published ones). lm-eval is optional: without it everything but the adapter works.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from phikit.checkpoint import atomic_write
from phikit.errors import PhikitError, first_line
from phikit.generate import generate
from phikit.models import CausalLM
from phikit.quantize import GROUP_SIZE
from phikit.templates import get_template
from phikit.tokenizer import EOS_TEXT, Tokenizer

if TYPE_CHECKING:
    from phikit.api import Phi

try:  # the lm-eval adapter at the end of this module exists only where lm-eval is installed
    import lm_eval.models  # noqa: F401 - registers lm-eval's own backends ("hf", ...) before ours, see below
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    TemplateLM = None

logger = logging.getLogger(__name__)
LM_EVAL_MISSING = "lm-eval is not installed; pip install 'lm-eval>=0.4.13' to run lm-evaluation-harness tasks"


def read_text(path: str | Path, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a .txt file, or of the "text" fields of a .jsonl file joined by <|endoftext|>."""
    path = Path(path)
    if not path.is_file():
        raise PhikitError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'data file not found'}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PhikitError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if path.suffix != ".jsonl":
        ids = tokenizer.encode(text)
        if not ids:
            raise PhikitError(f"{path}: no text in the file")
        return ids
    ids: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PhikitError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return ids


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted


@torch.inference_mode()
def perplexity(
    model: CausalLM,
    ids: list[int],
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``ids`` with a sliding window: windows of ``context`` tokens every ``stride`` tokens,
    each scoring only the tokens the previous window did not (transformers' documented method). ``model``: a
    CausalLM or a loaded ``Phi``; ``context``: 1024 or the model's, if shorter (a longer one given: the
    model's, with a warning)."""
    model = getattr(model, "model", model) if hasattr(model, "tokenizer") else model  # a Phi: its network
    longest = model.config.max_position_embeddings
    if context is not None and context > longest:
        warnings.warn(f"context {context} is past the model's {longest} tokens; using {longest}", stacklevel=2)
    context = min(1024 if context is None else context, longest)
    if context < 2:
        raise PhikitError(f"context must be at least 2 tokens, got {context}")
    stride = stride or context // 2
    if not 0 < stride <= context:
        raise PhikitError(f"stride must be between 1 and the context ({context}), got {stride}")
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise PhikitError("need at least 2 tokens of text to measure perplexity")
    total, count, scored_to = 0.0, 0, 0
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=None if progress else True, leave=False):
        end = min(begin + context, len(ids))
        window = torch.tensor([ids[begin:end]], device=model.device)
        logits = model(window[:, :-1]).float()
        targets = window[0, 1:]
        first = max(scored_to, begin + 1) - (begin + 1)  # skip tokens an earlier window already scored
        nll = F.cross_entropy(logits[0, first:], targets[first:], reduction="sum")
        total += nll.item()
        count += targets.numel() - first
        scored_to = end
        if end == len(ids):
            break
    mean = total / count
    return Perplexity(math.exp(mean), mean, count)


# --- prompt suites ------------------------------------------------------------------------------------

DEFAULT_SUITE = Path(__file__).parent / "prompts" / "default.yaml"


@dataclass
class SuitePrompt:
    id: str
    prompt: str
    max_new_tokens: int | None = None  # None: the suite's


@dataclass
class PromptSuite:
    """Prompts to run on every model compared; ``template`` wraps each (raw when None)."""

    prompts: list[SuitePrompt]
    template: str | None = None
    max_new_tokens: int | None = None
    path: Path | None = None


def load_suite(path: str | os.PathLike | None = None) -> PromptSuite:
    """Read a prompt suite YAML (``{template, max_new_tokens, prompts: [{id, prompt, max_new_tokens}]}``);
    phikit's own ``prompts/default.yaml`` when ``path`` is None. Every mistake names the file and entry."""
    path = Path(path) if path is not None else DEFAULT_SUITE
    if not path.is_file():
        raise PhikitError(f"{path}: prompt suite not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PhikitError(f"{path}: not valid YAML{at} ({problem})") from None
    if not isinstance(raw, dict):
        raise PhikitError(f"{path}: expected a mapping with a 'prompts' list at the top level")
    unknown = set(raw) - {"template", "max_new_tokens", "prompts"}
    if unknown:
        raise PhikitError(
            f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: template, max_new_tokens, prompts"
        )
    template = raw.get("template")
    if template is not None:
        if not isinstance(template, str):
            raise PhikitError(f"{path}: template must be a string, got {template!r}")
        try:
            if template not in ("chat", "auto"):  # those are the checkpoint's own, known once it is loaded
                get_template(template)
        except PhikitError as e:
            raise PhikitError(f"{path}: template: {e}") from None
    max_new_tokens = _positive_int(raw.get("max_new_tokens"), f"{path}: max_new_tokens")
    entries = raw.get("prompts")
    if not isinstance(entries, list) or not entries:
        raise PhikitError(f"{path}: 'prompts' must be a non-empty list of {{id, prompt}} entries")
    prompts, seen = [], set()
    for number, entry in enumerate(entries, 1):
        where = f"{path}: prompts entry {number}"
        if not isinstance(entry, dict):
            raise PhikitError(f"{where}: expected a mapping with 'id' and 'prompt', got {entry!r}")
        if isinstance(entry.get("id"), str) and entry["id"].strip():
            where += f" (id {entry['id']!r})"
        unknown = set(entry) - {"id", "prompt", "max_new_tokens"}
        if unknown:
            raise PhikitError(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: id, prompt, max_new_tokens"
            )
        prompt_id, prompt = entry.get("id"), entry.get("prompt")
        if not isinstance(prompt_id, str) or not prompt_id.strip():
            raise PhikitError(f"{where}: 'id' must be a non-empty string, got {prompt_id!r}")
        if prompt_id in seen:
            raise PhikitError(f"{where}: duplicate id; each prompt needs its own")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PhikitError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        seen.add(prompt_id)
        prompts.append(
            SuitePrompt(prompt_id, prompt, _positive_int(entry.get("max_new_tokens"), f"{where}: max_new_tokens"))
        )
    return PromptSuite(prompts, template, max_new_tokens, path)


def _positive_int(value: Any, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PhikitError(f"{where} must be a positive integer, got {value!r}")
    return value


def run_suite(
    phi: Phi, suite: PromptSuite | str | os.PathLike | None = None, progress: bool = False, **options
) -> list[dict]:
    """Generate an answer to each prompt of ``suite`` (a PromptSuite, a YAML path, or None for the default).

    One prompt at a time, so each answer's seconds and tokens/s are its own. ``options`` are generation
    settings (``temperature``, ``stop``, ...); ``template`` and ``max_new_tokens`` given here override the
    suite's, e.g. for a quick smoke run. Greedy by default, so two models differ only by the model.
    """
    if not isinstance(suite, PromptSuite):
        suite = load_suite(suite)
    template = options.pop("template", None) or suite.template
    # auto: the checkpoint's chat template (Phi-3, Phi-4), else the instruct format (Phi-2)
    template = get_template(template, phi.tokenizer, fallback="instruct") if template else None
    override = options.pop("max_new_tokens", None)
    results = []
    for item in tqdm(suite.prompts, desc="prompts", unit="prompt", disable=None if progress else True, leave=False):
        budget = override or item.max_new_tokens or suite.max_new_tokens or phi.defaults.max_new_tokens
        completion = phi.generate(item.prompt, template=template, max_new_tokens=budget, **options)
        tokens = len(completion.token_ids)
        results.append(
            {
                "id": item.id,
                "template": template.name if template is not None else "raw",
                "prompt": item.prompt,
                "text": completion.text,
                "tokens": tokens,
                "seconds": completion.seconds,
                "tokens_per_second": tokens / completion.seconds if completion.seconds > 0 else 0.0,
                "stopped_by_itself": completion.finish_reason == "stop",  # EOS or a turn marker, not the budget
                "ended_at": _ending(phi.tokenizer, completion),
            }
        )
    return results


def _ending(tokenizer: Tokenizer, completion) -> str:
    """How an answer ended: "eos" (the model wrote a stop token: <|endoftext|>, a chat model's <|end|>),
    "marker" (a turn marker or stop string: the generated tokens hold more text than the answer, which is cut
    before it) or "length" (the budget)."""
    if completion.finish_reason != "stop":
        return "length"
    return "eos" if tokenizer.decode(completion.token_ids) == completion.text else "marker"


# --- side-by-side report -------------------------------------------------------------------------------


def write_report(
    columns: dict[str, list[dict]],
    out_dir: str | os.PathLike,
    title: str = "phikit eval",
    perplexities: dict[str, Perplexity] | None = None,
    perplexity_data: str | None = None,
    settings: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` in ``out_dir``: one row per prompt, one column per label
    ("base", "fine-tuned", "int4", ...) with each answer, its tokens, time and whether it stopped by
    itself, and a summary row. Rows follow the first column's order; a prompt missing from a column
    shows as a dash. Each file is written atomically, so a report is never half-written.

    ``perplexities`` (label -> each model's perplexity on the same text, named by ``perplexity_data``)
    adds a row under the summary and a bar chart, so what quantizing or fine-tuning did to the numbers
    sits beside what it did to the answers. ``settings`` (label -> what that column ran: model, dtype,
    quantization, adapter, template) adds a row above the prompts."""
    if not columns:
        raise PhikitError("write_report needs at least one column of results")
    unknown = set(perplexities or {}) - set(columns)
    if unknown:
        raise PhikitError(f"perplexities for label(s) {', '.join(sorted(unknown))} that have no column of results")
    out_dir = Path(out_dir)
    by_label = {label: {r["id"]: r for r in results} for label, results in columns.items()}
    ids: dict[str, str] = {}  # id -> prompt, in order of first appearance
    for results in columns.values():
        for r in results:
            ids.setdefault(r["id"], r["prompt"])
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    perplexities = perplexities or {}
    settings = settings or {}
    markdown = _report_markdown(title, by_label, ids, perplexities, perplexity_data, settings)
    page = _report_html(title, by_label, ids, perplexities, perplexity_data, settings)
    atomic_write(md_path, lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    atomic_write(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return md_path, html_path


def _summary(results: dict[str, dict]) -> dict:
    tokens = sum(r["tokens"] for r in results.values())
    seconds = sum(r["seconds"] for r in results.values())
    return {
        "prompts": len(results),
        "stopped": sum(r["stopped_by_itself"] for r in results.values()),
        "eos": sum(r.get("ended_at") == "eos" for r in results.values()),
        "marker": sum(r.get("ended_at") == "marker" for r in results.values()),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }


def _meta(r: dict) -> str:
    ending = "stopped by itself" if r["stopped_by_itself"] else "cut at max_new_tokens"
    ending += {"eos": " at EOS", "marker": " at a turn marker"}.get(r.get("ended_at"), "")
    return f"{r['tokens']} tokens · {r['seconds']:.2f} s · {r['tokens_per_second']:.1f} tokens/s · {ending}"


def _summary_meta(s: dict) -> str:
    ended = f" ({s['eos']} at EOS, {s['marker']} at a turn marker)" if s["eos"] + s["marker"] == s["stopped"] else ""
    return (
        f"{s['stopped']}/{s['prompts']} stopped by themselves{ended} · {s['tokens']} tokens · "
        f"{s['seconds']:.2f} s · {s['tokens_per_second']:.1f} tokens/s"
    )


def _perplexity_meta(p: Perplexity | None) -> str:
    return "—" if p is None else f"{p.perplexity:.2f} (nll {p.nll:.4f} over {p.tokens} tokens)"


def _perplexity_heading(data: str | None) -> str:
    return f"perplexity on {data}" if data else "perplexity"


def _markdown_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: HTML escaped (renderers pass raw HTML through), pipes and
    newlines encoded, leading spaces kept so code stays indented."""
    # splitlines: every line boundary Python knows (\x0b, \x0c, \x85, \u2028 ...), not only \n
    lines = html.escape(text, quote=False).replace("|", "&#124;").splitlines() or [""]
    return "<br>".join("&nbsp;" * (len(line) - len(line.lstrip(" "))) + line.lstrip(" ") for line in lines)


def _report_markdown(
    title: str,
    by_label: dict[str, dict[str, dict]],
    ids: dict[str, str],
    perplexities: dict[str, Perplexity],
    perplexity_data: str | None,
    settings: dict[str, str],
) -> str:
    labels = list(by_label)
    rows = [
        f"# {_markdown_cell(title)}",
        "",
        "| prompt | " + " | ".join(_markdown_cell(label) for label in labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    if settings:
        rows.append("| *settings* | " + " | ".join(f"*{_markdown_cell(settings.get(k, '—'))}*" for k in labels) + " |")
    for prompt_id, prompt in ids.items():
        cells = [f"**{_markdown_cell(prompt_id)}**<br>{_markdown_cell(prompt)}"]
        for label in labels:
            r = by_label[label].get(prompt_id)
            cells.append("—" if r is None else f"{_markdown_cell(r['text'])}<br><br>*{_meta(r)}*")
        rows.append("| " + " | ".join(cells) + " |")
    summaries = [_summary_meta(_summary(by_label[label])) for label in labels]
    rows.append("| **summary** | " + " | ".join(f"**{s}**" for s in summaries) + " |")
    if perplexities:
        cells = [_markdown_cell(_perplexity_meta(perplexities.get(label))) for label in labels]
        rows.append(f"| **{_markdown_cell(_perplexity_heading(perplexity_data))}** | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


_STYLE = """.charts { display: flex; flex-wrap: wrap; gap: 1.5em; margin-top: 1.5em; }

body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
.scroll { overflow-x: auto; }
@media (max-width: 700px) {  /* a phone: columns keep a readable width and the table scrolls sideways */
  body { margin: 0.8em; }
  table { width: auto; min-width: 100%; }
  th, td { min-width: 14em; }
}
th, td { border: 1px solid #ccc; padding: 0.5em; vertical-align: top; text-align: left; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font-size: 0.9em; }
td pre { max-height: 24em; overflow: auto; }
.meta { color: #555; font-size: 0.85em; margin-top: 0.5em; overflow-wrap: anywhere; }
.blank { color: #777; font-style: italic; }
.cut { color: #a33; }
tr.summary td { font-weight: bold; background: #f4f4f4; }
"""


def _report_html(
    title: str,
    by_label: dict[str, dict[str, dict]],
    ids: dict[str, str],
    perplexities: dict[str, Perplexity],
    perplexity_data: str | None,
    settings: dict[str, str],
) -> str:
    def esc(text: str) -> str:
        return html.escape(text, quote=True)

    labels = list(by_label)
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<div class="scroll"><table><thead><tr><th>prompt</th>'
        + "".join(f"<th>{esc(label)}</th>" for label in labels)
        + "</tr></thead>",
        "<tbody>",
    ]
    if settings:
        cells = "".join(f'<td class="meta">{esc(settings.get(label, "—"))}</td>' for label in labels)
        out.append(f'<tr class="settings"><td class="meta">settings</td>{cells}</tr>')
    for prompt_id, prompt in ids.items():
        cells = [f"<td><b>{esc(prompt_id)}</b><pre>{esc(prompt)}</pre></td>"]
        for label in labels:
            r = by_label[label].get(prompt_id)
            if r is None:
                cells.append("<td>—</td>")
            else:
                css = "meta" if r["stopped_by_itself"] else "meta cut"
                answer = (
                    f"<pre>{esc(r['text'])}</pre>"
                    if r["text"].strip()  # an answer of blanks or newlines only: said, not an empty (or tall) cell
                    else f'<div class="blank">(no text: {len(r["text"])} whitespace characters)</div>'
                )
                cells.append(f'<td>{answer}<div class="{css}">{esc(_meta(r))}</div></td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    summaries = "".join(f"<td>{esc(_summary_meta(_summary(by_label[label])))}</td>" for label in labels)
    out.append(f'<tr class="summary"><td>summary</td>{summaries}</tr>')
    if perplexities:
        cells = "".join(f"<td>{esc(_perplexity_meta(perplexities.get(label)))}</td>" for label in labels)
        out.append(f'<tr class="summary"><td>{esc(_perplexity_heading(perplexity_data))}</td>{cells}</tr>')
    charts = _report_charts(by_label, ids, perplexities, perplexity_data)
    out += ["</tbody></table></div>", '<div class="charts">', *charts, "</div>", "</body></html>"]
    return "\n".join(out) + "\n"


def _report_charts(
    by_label: dict[str, dict[str, dict]],
    ids: dict[str, str],
    perplexities: dict[str, Perplexity],
    perplexity_data: str | None,
) -> list[str]:
    """Inline SVG charts under the table: each answer's length in tokens, prompt by prompt and model by
    model, how each model's answers ended (at EOS, at a turn marker or stop string, cut at the budget) and,
    when measured, each model's perplexity (a bar per model; the legend names the text)."""
    from phikit.plots import bars_svg

    labels = list(by_label)
    lengths = {label: [by_label[label].get(i, {}).get("tokens", 0) for i in ids] for label in labels}
    endings = {"EOS": [], "turn marker": [], "cut at max_new_tokens": []}
    for label in labels:
        results = by_label[label].values()
        endings["EOS"].append(sum(r.get("ended_at") == "eos" for r in results))
        endings["turn marker"].append(sum(r.get("ended_at") == "marker" for r in results))
        endings["cut at max_new_tokens"].append(sum(not r["stopped_by_itself"] for r in results))
    charts = [
        bars_svg("answer length (tokens) per prompt", list(ids), lengths),
        bars_svg("how the answers ended", labels, endings, stacked=True),
    ]
    measured = [label for label in labels if label in perplexities]
    if measured:
        values = [perplexities[label].perplexity for label in measured]
        charts.append(bars_svg("perplexity", measured, {perplexity_data or "perplexity": values}))
    return charts


# --- lm-evaluation-harness -----------------------------------------------------------------------------

SCORE_CHUNK = 2048  # continuation tokens scored per lm_head call

# Without lm-eval the class still exists (so the module imports) but cannot be built.
_LMBase = TemplateLM if TemplateLM is not None else object


class PhikitLM(_LMBase):
    """lm-evaluation-harness model ``phikit``: the native model (and its quantization and LoRA adapters)
    behind lm-eval's three request types, scored exactly as lm-eval's HF backend (``HFLM``) scores them.

    Context and continuation are tokenized together and split where the context's own tokens end
    (``TemplateLM._encode_pair``, HFLM's split), an empty context becomes ``<|endoftext|>``, inputs longer
    than the context window keep their last tokens, and rolling log-likelihoods use lm-eval's own windows.

    ``model_args``: ``pretrained=PATH_OR_HUB_ID,dtype=bf16,device=cuda,quantize=int4,adapter=DIR,batch_size=8``
    (also ``max_gen_toks``, ``group_size``, and ``max_length``, which narrows the log-likelihood windows
    only). ``pretrained`` may be a loaded ``phikit.Phi``.
    """

    def __init__(
        self,
        pretrained: Any = "microsoft/phi-2",
        dtype: str | None = "auto",
        device: str | None = "auto",
        quantize: str | None = None,
        adapter: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,  # passed by lm-eval's CLI; phikit does not search batch sizes
        max_length: int | None = None,
        max_gen_toks: int = 256,
        group_size: int = GROUP_SIZE,
    ):
        if TemplateLM is None:
            raise PhikitError(LM_EVAL_MISSING)
        super().__init__()
        from phikit.api import Phi, load  # not at module level: api composes the capability modules

        if isinstance(pretrained, Phi):
            self.phi = pretrained
        else:
            self.phi = load(
                pretrained, dtype=dtype, device=device, quantize=quantize, group_size=group_size, adapter=adapter
            )
        self.adapter = adapter
        self.tokenizer: Tokenizer = self.phi.tokenizer
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            self.batch_size = 0
        if self.batch_size < 1:
            raise PhikitError(
                f"batch_size must be a positive integer (phikit does not detect batch sizes), got {batch_size!r}"
            )
        context = self.phi.model.config.max_position_embeddings
        self._max_length = min(int(max_length or context), context)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def model(self) -> CausalLM:
        return self.phi.model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # as HFLM: the BOS (Phi-2: <|endoftext|>, Phi-3: <s>), else the EOS

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.phi.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.phi.path).replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results under ``config``."""
        spec = self.phi.quantization
        return {
            "model_path": str(self.phi.path),
            # the weights' dtype (--dtype; quantized layers: "quantization"); on a CPU activations stay fp32
            "model_dtype": str(self.phi.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
            "compute_dtype": str(self.phi.model.dtype).removeprefix("torch."),
            "quantization": spec.format if spec is not None else None,
            "adapter": str(self.adapter) if self.adapter else None,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        ids = self.tokenizer.encode(string)  # Phi adds no BOS, whatever add_special_tokens says
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probs, every token greedy) of each continuation; requests are
        ``(cache key, context ids, continuation ids)``.

        Requests with the same input (context + continuation minus its last token, cut to the window)
        share one forward, as HFLM's one-token-continuation cache does for multiple choice; inputs run
        longest first in right-padded batches (causal attention never reads the padding to its right).
        lm_head runs only on the continuation positions, not on every position as in HFLM.
        """
        model = self.phi.model
        by_input: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise PhikitError(f"loglikelihood request {index} has an empty context or continuation")
            if len(continuation) > self.max_length:
                raise PhikitError(
                    f"loglikelihood request {index}: its continuation of {len(continuation)} tokens is longer "
                    f"than the context window of {self.max_length} tokens"
                )
            window = (context + continuation)[-(self.max_length + 1) :][:-1]
            by_input.setdefault(tuple(window), []).append(index)
        inputs = sorted(by_input, key=lambda ids: (-len(ids), ids))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = range(0, len(inputs), self.batch_size)
        for first in tqdm(batches, desc="loglikelihood", unit="batch", disable=disable_tqdm, leave=False):
            chunk = inputs[first : first + self.batch_size]
            batch = torch.full((len(chunk), len(chunk[0])), self.tokenizer.pad_id, dtype=torch.long)
            for row, ids in enumerate(chunk):
                batch[row, : len(ids)] = torch.tensor(ids)
            hidden = model.model(batch.to(model.device))  # (batch, longest, hidden)
            picked, targets, owners = [], [], []
            for row, ids in enumerate(chunk):
                for index in by_input[ids]:
                    continuation = requests[index][2]
                    picked.append(hidden[row, len(ids) - len(continuation) : len(ids)])
                    targets += continuation
                    owners.append((index, len(continuation)))
            token_logprobs, greedy = [], []
            goals = torch.tensor(targets, device=model.device)
            # fp32 log-probs over the vocabulary, a slice of tokens at a time: whole rolling windows of a
            # batch at once would take gigabytes (8 x 2048 tokens x 51200 x 4 bytes)
            for part, goal in zip(torch.cat(picked).split(SCORE_CHUNK), goals.split(SCORE_CHUNK)):
                logprobs = F.log_softmax(model.lm_head(part).float(), dim=-1)  # (tokens, vocab)
                token_logprobs += logprobs.gather(-1, goal[:, None])[:, 0].tolist()
                greedy += (logprobs.argmax(dim=-1) == goal).tolist()
            offset = 0
            for index, n in owners:
                answer = (float(sum(token_logprobs[offset : offset + n])), all(greedy[offset : offset + n]))
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                offset += n
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks) in lm-eval's own rolling windows of the context
        size: the first conditioned on <|endoftext|>, each later one on the tokens before it, every token
        scored once."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context with phikit's generate until a stop string of ``until`` (or <|endoftext|>)
        or ``max_gen_toks`` tokens; greedy unless the task asks for sampling. A context too long for the
        window keeps its last tokens, as HFLM does."""
        groups: dict[str, tuple[dict, list[int]]] = {}  # one GenerationConfig per group
        for index, request in enumerate(requests):
            _, gen_kwargs = request.args
            settings = self._generation_settings(gen_kwargs)
            groups.setdefault(json.dumps(settings, sort_keys=True), (settings, []))[1].append(index)
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        for settings, indices in groups.values():
            contexts = {i: requests[i].args[0] for i in indices}
            lengths = {i: len(ids) for i, ids in zip(indices, self.tokenizer.encode_batch(list(contexts.values())))}
            order = sorted(indices, key=lambda i: -lengths[i])  # similar lengths share a batch: less padding
            for first in range(0, len(order), self.batch_size):
                chunk = order[first : first + self.batch_size]
                completions = generate(
                    self.phi.model,
                    self.tokenizer,
                    [contexts[i] for i in chunk],
                    truncate=True,
                    batch_size=self.batch_size,
                    **settings,
                )
                for index, completion in zip(chunk, completions):
                    results[index] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[index].args, completion.text)
                progress.update(len(chunk))
        progress.close()
        return results

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        """phikit GenerationConfig fields from a task's generation kwargs (normalized as lm-eval does)."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
        stop = handle_stop_sequences(kwargs.pop("until", None), eos=EOS_TEXT)
        settings = {"max_new_tokens": int(kwargs.pop("max_gen_toks")), "stop": tuple(s for s in stop if s)}
        sampling = kwargs.pop("do_sample", False)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        settings["temperature"] = temperature if sampling else 0.0
        for name in ("top_p", "top_k", "repetition_penalty"):
            if name in kwargs:
                settings[name] = kwargs.pop(name)
        if kwargs:
            raise PhikitError(
                f"generation setting(s) {', '.join(sorted(kwargs))} of this task are not supported by phikit; "
                "supported: until, max_gen_toks, do_sample, temperature, top_p, top_k, repetition_penalty"
            )
        return settings


if TemplateLM is not None:
    register_model("phikit")(PhikitLM)


def run_lm_eval(
    model: Any,
    tasks: str | list[str],
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
    batch_size: int = 8,
    include_path: str | os.PathLike | None = None,
    group_size: int = GROUP_SIZE,
    **options,
) -> dict:
    """Run lm-evaluation-harness ``tasks`` ("hellaswag,arc_easy" or a list) on a model: a path or Hub id,
    a loaded ``phikit.Phi`` or a ``PhikitLM``. ``include_path`` adds a folder of your own task YAMLs.
    ``options`` go to ``lm_eval.simple_evaluate`` (``num_fewshot``, ``limit``, ``log_samples``,
    ``task_manager`` ...); building lm-eval's index of its ~15k built-in tasks takes a while (~15 s).
    Returns its results dict; ``format_lm_eval`` turns that into lm-eval's Markdown table."""
    if TemplateLM is None:
        raise PhikitError(LM_EVAL_MISSING)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise PhikitError("no lm-eval tasks given; pass e.g. --lm-eval hellaswag,arc_easy")
    manager = options.pop("task_manager", None) or TaskManager(
        include_path=str(include_path) if include_path is not None else None
    )
    resolved, unknown = [], []
    for name in names:
        if Path(name).is_file() or name in manager.all_tasks:
            resolved.append(name)
        elif manager.match_tasks([name]):  # a glob such as arc_*
            resolved += manager.match_tasks([name])
        else:
            unknown.append(name)
    if unknown:
        raise PhikitError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists them"
            + ("" if include_path else ", --include-path adds a folder of your own task YAMLs")
        )
    lm = (
        model
        if isinstance(model, PhikitLM)
        else PhikitLM(
            model,
            dtype=dtype,
            device=device,
            quantize=quantize,
            adapter=adapter,
            batch_size=batch_size,
            group_size=group_size,
        )
    )
    options.setdefault("log_samples", False)
    options.setdefault("batch_size", lm.batch_size)  # recorded in the results' config (the model is ours)
    try:
        results = simple_evaluate(model=lm, tasks=resolved, task_manager=manager, **options)
    except _dataset_unreachable() as e:
        raise PhikitError(
            f"lm-eval could not get a task's dataset ({first_line(e)}); run it once where the Hugging Face Hub is "
            "reachable (datasets caches what it downloads)"
        ) from None
    if results is None:
        raise PhikitError("lm-eval returned no results")
    return results


def _dataset_unreachable() -> tuple[type[BaseException], ...]:
    """The errors with which datasets and huggingface_hub say a dataset could not be downloaded or found."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return ConnectionError, DatasetNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled


def format_lm_eval(results: dict) -> str:
    """lm-eval's own Markdown table of a ``run_lm_eval`` result (and of its groups, when any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
