"""Prompt suites and reports; the lm-eval adapter against lm-eval's own HF backend on the same checkpoint."""

import json
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import pytest

import phikit
from phikit.errors import PhikitError
from phikit.evaluate import load_suite, run_suite, write_report

# --- prompt suites -------------------------------------------------------------------------------------


def test_default_suite_has_the_reference_prompts():
    suite = load_suite()
    assert suite.template == "auto" and len(suite.prompts) == 10  # Phi-2: instruct; a chat model: its template
    text = "\n".join(p.prompt for p in suite.prompts)
    for needle in (
        "3Sum",
        "Attention Is All You Need",
        "joke",
        "Shakespeare",
        "advancedmath",
        "LoRA: Low-Rank Adaptation",
        "List 20 famous people",
        '"I love bread and cheese!" into French',
        "chicken curry",
        "Where is the moon right now?",
    ):
        assert needle in text
    assert len({p.id for p in suite.prompts}) == 10


@pytest.mark.parametrize(
    "body,message",
    [
        ("prompts: [{id: a, prompt: hi}, {prompt: hello}]", r"prompts entry 2: 'id' must be a non-empty string"),
        ("prompts: [{id: a, prompt: hi}, {id: a, prompt: yo}]", r"prompts entry 2 \(id 'a'\): duplicate id"),
        ("prompts: [{id: a, prompt: hi, max_new_tokens: 0}]", r"entry 1 \(id 'a'\): max_new_tokens must be a pos"),
        ("prompts: [{id: a, prompt: hi, max_tokens: 5}]", r"entry 1 \(id 'a'\): unknown key\(s\) max_tokens"),
        ("prompts: [{id: a, prompt: ''}]", r"entry 1 \(id 'a'\): 'prompt' must be a non-empty string"),
        ("prompts: [just a string]", r"prompts entry 1: expected a mapping"),
        ("prompts: []", r"'prompts' must be a non-empty list"),
        ("template: alpacca\nprompts: [{id: a, prompt: hi}]", r"template: unknown template 'alpacca'"),
        ("max_new_tokens: lots\nprompts: [{id: a, prompt: hi}]", r"max_new_tokens must be a positive integer"),
        ("prompt: [{id: a, prompt: hi}]", r"unknown key\(s\) prompt"),
        ("prompts: [{id: a, prompt: hi}", r"not valid YAML"),
    ],
)
def test_bad_suite_errors_name_the_file_and_entry(tmp_path, body, message):
    path = tmp_path / "suite.yaml"
    path.write_text(body)
    with pytest.raises(PhikitError, match=message) as caught:
        load_suite(path)
    assert str(caught.value).startswith(str(path))
    with pytest.raises(PhikitError, match="not found"):
        load_suite(tmp_path / "missing.yaml")


def test_run_suite_equals_generate(phi, tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            template: guanaco
            max_new_tokens: 9
            prompts:
              - {id: short, prompt: "Say hi", max_new_tokens: 4}
              - {id: default, prompt: "Where is the moon right now?"}
            """
        )
    )
    results = run_suite(phi, path)
    expected = [
        phi.generate("Say hi", template="guanaco", max_new_tokens=4),
        phi.generate("Where is the moon right now?", template="guanaco", max_new_tokens=9),
    ]
    for r, c in zip(results, expected):
        assert (r["text"], r["tokens"], r["stopped_by_itself"]) == (c.text, len(c.token_ids), c.finish_reason == "stop")
        assert r["seconds"] > 0 and r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
    assert [r["id"] for r in results] == ["short", "default"]
    assert [r["prompt"] for r in results] == ["Say hi", "Where is the moon right now?"]

    # the default suite with a run-time budget and a stop string that the greedy text contains
    quick = run_suite(phi, None, max_new_tokens=12)
    suite = load_suite()
    for r, item in zip(quick, suite.prompts):
        c = phi.generate(item.prompt, template="instruct", max_new_tokens=12)
        assert (r["id"], r["text"], r["tokens"], r["template"]) == (item.id, c.text, len(c.token_ids), "instruct")
    stop = quick[0]["text"][4:7]
    cut = run_suite(phi, suite, max_new_tokens=12, stop=(stop,))[0]
    assert cut["stopped_by_itself"] and cut["text"] == quick[0]["text"][: quick[0]["text"].index(stop)]


def test_answers_say_whether_they_ended_at_eos_a_turn_marker_or_the_budget(phi, tmp_path):
    from phikit.generate import Completion

    ids = phi.tokenizer.encode("Paris is in France.")
    marker_ids = phi.tokenizer.encode("Paris is in France.### Human: and")
    answers = {  # what generate returns for each way of ending (EOS is never part of token_ids)
        "eos": Completion("Paris is in France.", ids, 5, "stop"),
        "marker": Completion("Paris is in France.", marker_ids, 5, "stop"),
        "length": Completion("Paris is in France.", ids, 5, "length"),
    }

    class Scripted:  # a Phi whose answers are given, to cover an ending a tiny random model cannot be made to write
        tokenizer = phi.tokenizer
        defaults = phi.defaults

        def generate(self, prompt, **options):
            return answers[prompt]

    suite = tmp_path / "suite.yaml"
    suite.write_text("prompts:\n" + "".join(f"  - {{id: {k}, prompt: {k}}}\n" for k in answers))
    results = run_suite(Scripted(), suite)
    assert [r["ended_at"] for r in results] == ["eos", "marker", "length"]
    assert [r["stopped_by_itself"] for r in results] == [True, True, False]
    markdown = write_report({"tuned": results}, tmp_path / "out")[0].read_text()
    assert "2/3 stopped by themselves (1 at EOS, 1 at a turn marker)" in markdown
    assert "stopped by itself at EOS" in markdown and "stopped by itself at a turn marker" in markdown
    # the real model's answers: a stop string is a marker ending, the budget a length ending
    cut = run_suite(phi, None, max_new_tokens=12)[0]
    stop = cut["text"][4:7]
    stopped = run_suite(phi, None, max_new_tokens=12, stop=(stop,))[0]
    assert (cut["ended_at"], stopped["ended_at"]) == ("length", "marker")


class _Table(HTMLParser):
    """Rows of cells (their text, unescaped) of every table in a page, parsed by the standard library."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_report_has_every_prompt_and_column_and_escapes_html(phi, tmp_path):
    base = run_suite(phi, None, max_new_tokens=6)
    hostile = [dict(r, text=f"<script>alert('{r['id']}')</script> a | b\n    indented &amp;") for r in base]
    hostile[0]["stopped_by_itself"] = True
    columns = {"base": base, "int4 <&>": hostile[:-1]}  # the last prompt is missing from the second column
    md_path, html_path = write_report(columns, tmp_path / "out")
    page, markdown = html_path.read_text(), md_path.read_text()

    table = _Table()
    table.feed(page)
    header, *rows = table.rows
    assert header == ["prompt", "base", "int4 <&>"]
    assert len(rows) == len(base) + 1 and rows[-1][0] == "summary"
    for row, r, h in zip(rows, base, hostile):
        assert row[0] == r["id"] + r["prompt"]
        assert row[1].startswith(r["text"]) and f"{r['tokens']} tokens" in row[1]
        if h is not hostile[-1]:
            assert row[2].startswith(h["text"])
    assert rows[-2][2] == "—"
    assert "stopped by itself" in rows[0][2] and "cut at max_new_tokens" in rows[1][2]
    stopped = sum(r["stopped_by_itself"] for r in base)
    assert rows[-1][1].startswith(f"{stopped}/{len(base)} stopped by themselves")
    assert rows[-1][2].startswith(f"1/{len(base) - 1} stopped by themselves")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;amp;" in page

    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(base) + 1  # header, rule, prompts, summary
    assert all(line.count("|") == 4 for line in lines)  # escaped pipes do not add cells
    for r in base:
        assert f"**{r['id']}**" in markdown
    assert "int4 &lt;&amp;&gt;" in lines[0] and "<script>" not in markdown

    blank = [dict(r, text="\n" * 40) for r in base]  # an answer of newlines only: said, not a tall empty cell
    blanks = write_report({"base": base, "blank": blank}, tmp_path / "blank")[1].read_text()
    assert blanks.count("(no text: 40 whitespace characters)") == len(base)
    assert "&nbsp;&nbsp;&nbsp;&nbsp;indented" in markdown
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries

    # under the table: answer lengths (a bar per prompt and column) and endings (3 kinds stacked per column)
    charts = page.split('<div class="charts">', 1)[1]
    assert charts.count("<svg") == 2 and charts.count("<rect") == 2 * len(base) + 3 * 2
    assert "int4 &lt;&amp;&gt;" in charts and "<&>" not in charts
    assert "<script" not in charts and "http" not in charts.replace("http://www.w3.org/2000/svg", "")
    from test_plots import chromium

    if chromium():  # the page renders without console errors in a real browser
        import subprocess

        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--dump-dom"]
        proc = subprocess.run([*cmd, html_path.as_uri()], capture_output=True, text=True, timeout=120)
        assert proc.stdout.count("<svg") == 2 and "CONSOLE" not in proc.stderr, proc.stderr[-2000:]


def test_eval_report_shows_each_models_perplexity_side_by_side(tiny, tmp_path, capsys):
    """`phikit eval --perplexity` puts each compared model's perplexity, as `perplexity()` measures it on the
    same file, in the table and in a bar chart with a bar per model."""
    import xml.etree.ElementTree as ET

    from phikit.cli import main
    from phikit.evaluate import perplexity, read_text

    folder, _ = tiny
    suite, text = tmp_path / "suite.yaml", tmp_path / "text.txt"
    suite.write_text("template: instruct\nmax_new_tokens: 4\nprompts:\n  - {id: hi, prompt: Say hi}\n")
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)  # ~800 tokens: several windows
    out = tmp_path / "out"
    args = ["eval", "-m", folder, "--dtype", "fp32", "--device", "cpu", "--suite", suite, "--out", out]
    code = main([str(a) for a in [*args, "--perplexity", text, "--compare", "int8 <&>:quantize=int8"]])
    assert code == 0, capsys.readouterr().err
    expected = {}
    for label, quantize in (("base", None), ("int8 <&>", "int8")):
        model = phikit.load(folder, dtype="fp32", device="cpu", quantize=quantize)
        expected[label] = perplexity(model.model, read_text(text, model.tokenizer))
    assert expected["base"].perplexity != expected["int8 <&>"].perplexity

    measured = json.loads((out / "perplexity.json").read_text())
    assert measured["data"] == str(text)
    for label, p in expected.items():
        assert measured["models"][label] == pytest.approx(vars(p), rel=1e-6)

    page, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()
    table = _Table()
    table.feed(page)
    header, *rows = table.rows
    assert header == ["prompt", "base", "int8 <&>"]
    assert rows[-1][0] == "perplexity on text.txt" and rows[-2][0] == "summary"
    for cell, p in zip(rows[-1][1:], expected.values()):
        assert cell == f"{p.perplexity:.2f} (nll {p.nll:.4f} over {p.tokens} tokens)"
    row = markdown.splitlines()[-1]
    assert row.startswith("| **perplexity on text.txt** |") and row.count("|") == 4
    assert all(f"{p.perplexity:.2f} (nll {p.nll:.4f} over {p.tokens} tokens)" in row for p in expected.values())

    charts = page.split('<div class="charts">', 1)[1]
    assert "<&>" not in page and "<&>" not in markdown
    svgs = [ET.fromstring("<svg" + part.split("</svg>")[0] + "</svg>") for part in charts.split("<svg")[1:]]
    assert len(svgs) == 3
    chart = svgs[-1]
    assert chart.get("aria-label") == "perplexity"
    ns = "{http://www.w3.org/2000/svg}"
    bars = chart.findall(f"{ns}rect")
    assert len(bars) == 2  # one per model
    for bar, (label, p) in zip(bars, expected.items()):
        assert bar.find(f"{ns}title").text == f"text.txt, {label}: {p.perplexity:.4g}"
    heights = [float(bar.get("height")) for bar in bars]
    ratio = expected["base"].perplexity / expected["int8 <&>"].perplexity
    assert heights[0] / heights[1] == pytest.approx(ratio, rel=1e-2)  # bars drawn to scale from zero
    texts = chart.findall(f"{ns}text")
    assert [t.text for t in texts if t.get("class") == "category"] == ["base", "int8 <&>"]
    assert [t.text for t in texts if t.get("class") == "value"] == [f"{p.perplexity:.4g}" for p in expected.values()]
    assert texts[-1].text == "\u25a0 text.txt"
    from test_plots import chromium

    if chromium():  # the page renders without console errors in a real browser
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--dump-dom"]
        proc = subprocess.run([*cmd, (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
        assert proc.stdout.count("<svg") == 3 and "CONSOLE" not in proc.stderr, proc.stderr[-2000:]

    # without --perplexity the report has neither the row nor the chart; with --lm-eval it is an error
    assert main([str(a) for a in args]) == 0
    assert "perplexity" not in (out / "report.html").read_text()
    assert main([str(a) for a in [*args, "--perplexity", text, "--lm-eval", "hellaswag"]]) == 2
    assert "--perplexity goes with a prompt suite" in capsys.readouterr().err
    with pytest.raises(PhikitError, match="label\\(s\\) int4 that have no column"):
        write_report({"base": []}, tmp_path / "x", perplexities={"int4": expected["base"]})


def test_eval_checks_every_column_first_keeps_finished_ones_and_says_what_each_ran(tiny, tmp_path, capsys):
    import shutil

    from phikit.cli import main

    folder, _ = tiny
    suite = tmp_path / "suite.yaml"
    suite.write_text("template: instruct\nmax_new_tokens: 3\nprompts:\n  - {id: hi, prompt: Say hi}\n")
    out = tmp_path / "out"
    args = ["eval", "-m", folder, "--dtype", "fp32", "--device", "cpu", "--suite", suite, "--out", out]

    def refused(*extra) -> str:
        assert main([str(a) for a in [*args, *extra]]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "loading" not in err, err  # before any model loads
        return err

    assert "label(s) base given twice" in refused("--compare", "base:dtype=bf16")
    assert "--compare a: adapter /nowhere: no adapter_config.json there" in refused("--compare", "a:adapter=/nowhere")
    assert "group_size is int4's; add quantize=int4" in refused("--compare", "g:group_size=128")
    assert "--compare goes with a prompt suite" in refused("--compare", "q:quantize=int8", "--lm-eval", "hellaswag")
    assert "--include-path /nowhere: no such folder" in refused("--lm-eval", "x", "--include-path", "/nowhere")
    assert not out.exists()

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    code = main([str(a) for a in [*args, "--compare", "int8:quantize=int8", "--compare", f"bad:model={broken}"]])
    err = capsys.readouterr().err
    assert code == 2 and f"wrote the 2 finished column(s) to {out} before stopping" in err
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# phikit eval (stopped: 2 of 3 columns)")
    settings = markdown.splitlines()[4]
    assert settings == (
        f"| *settings* | *model {folder} · dtype fp32 · template instruct* | "
        f"*model {folder} · dtype fp32 · int8 · template instruct* |"
    )
    assert list(json.loads((out / "results.json").read_text())) == ["base", "int8"]
    assert main([str(a) for a in [*args, "--compare", "int8:quantize=int8"]]) == 0  # a finished report
    capsys.readouterr()
    code = main([str(a) for a in [*args, "--compare", "int8:quantize=int8", "--compare", f"bad:model={broken}"]])
    err = capsys.readouterr().err  # stopped again: the finished report stays, the stopped one goes beside it
    assert code == 2 and f"to {out / 'stopped'} before stopping ({out}'s earlier finished report kept)" in err
    assert (out / "report.md").read_text().startswith("# phikit eval\n")
    assert (out / "stopped" / "report.md").read_text().startswith("# phikit eval (stopped: 2 of 3 columns)")


def test_phikit_imports_without_lm_eval():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lm_eval"] = None  # as if not installed: importing it raises ImportError
        import phikit.evaluate as ev
        from phikit.errors import PhikitError
        assert ev.TemplateLM is None and len(ev.load_suite().prompts) == 10
        for call in (lambda: ev.PhikitLM("x"), lambda: ev.run_lm_eval("x", "hellaswag")):
            try:
                call()
            except PhikitError as e:
                assert "pip install" in str(e)
            else:
                raise AssertionError("no error")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- lm-evaluation-harness -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends(tiny, phi):
    """(our adapter, lm-eval's HF backend) on the same checkpoint folder."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from phikit.evaluate import PhikitLM

    folder, _ = tiny
    return PhikitLM(pretrained=phi, batch_size=3), HFLM(
        pretrained=str(folder), device="cpu", dtype="float32", batch_size=3
    )


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hf_backend(backends, phi):
    ours, ref = backends
    tok = phi.tokenizer
    context = "The capital of France is"
    greedy = phi.generate(context, max_new_tokens=2).token_ids
    continuation = tok.decode(greedy)
    assert tok.encode(context + continuation) == tok.encode(context) + greedy  # a greedy continuation
    pairs = [
        (context, continuation),
        ("Question: 2+2=", " 4"),
        ("Question: 2+2=", " 5"),  # same input as the one before: one shared forward
        ("Question: 2+2= ", "5"),  # the trailing space moves to the continuation
        ("", "Hello world"),  # empty context: conditioned on <|endoftext|>
        ("def f(x):", "\n    return x * 2\n"),
        ("word " * 300, " and the end."),  # longer than the 256-token window: cut from the left
        ("Caf\u00e9 na\u00efve", " \u65e5\u672c\u8a9e \U0001f600"),
    ]
    got = ours.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    expected = ref.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert [flag for _, flag in got] == [flag for _, flag in expected]
    assert expected[0][1] is True
    for (lp, _), (ref_lp, _) in zip(got, expected):
        assert lp == pytest.approx(ref_lp, abs=1e-4)


def test_loglikelihood_rolling_matches_hf_backend(backends, monkeypatch):
    ours, ref = backends
    monkeypatch.setattr("phikit.evaluate.SCORE_CHUNK", 100)  # several lm_head slices per batch
    texts = [
        "Hello world.",
        "x",
        "The quick brown fox jumps over the lazy dog. " * 60,  # ~600 tokens: three rolling windows of 256
        "def add(a, b):\n    return a + b\n" * 20,
    ]
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    expected = ref.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for lp, ref_lp in zip(got, expected):
        # HFLM sums each window in fp32: over thousands of nats that alone differs by ~1e-4
        assert lp == pytest.approx(ref_lp, rel=1e-6, abs=1e-4)


def test_generate_until_matches_hf_backend_and_stops_at_until(backends):
    ours, ref = backends
    free = ours.generate_until(_instances("generate_until", [("Hello world", {"max_gen_toks": 24})]))[0]
    stop = free[6:9]
    assert stop and free.index(stop) > 0
    requests = [
        ("Hello world", {"until": [stop], "max_gen_toks": 24, "do_sample": False}),
        ("The capital of France is", {"until": ["\n", "."], "max_gen_toks": 10}),
        ("def f(x):", {"until": "return", "max_gen_toks": 16}),
        ("word " * 300, {"until": ["zzz"], "max_gen_toks": 8}),  # context cut to the window's last tokens
    ]
    got = ours.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got == ref.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got[0] == free[: free.index(stop)]


def test_registered_with_lm_eval_as_phikit(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from phikit.evaluate import PhikitLM

    folder, _ = tiny
    assert get_model("phikit") is PhikitLM
    assert get_model("hf") is HFLM  # lm-eval's own backends are still found
    lm = get_model("phikit").create_from_arg_string(f"pretrained={folder},dtype=fp32,device=cpu,batch_size=2")
    assert (lm.batch_size, lm.max_length, lm.prefix_token_id) == (2, 256, lm.tokenizer.eos_id)
    assert lm.get_model_info()["model_dtype"] == "float32"
    with pytest.raises(PhikitError, match="batch_size must be a positive integer"):
        PhikitLM(pretrained=lm.phi, batch_size="auto")


TASKS = {
    "tiny_mc": """
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: answer
        metric_list: [{metric: acc}, {metric: acc_norm}]
    """,
    "tiny_text": """
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
    """,
    "tiny_gen": """
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        generation_kwargs: {until: ["\\n", "."], max_gen_toks: 12, do_sample: false}
        metric_list: [{metric: exact_match}]
    """,
}
ROWS = {
    "tiny_mc": [
        {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "The capital of France is", "choices": ["Berlin", "Madrid", "Paris"], "answer": 2},
        {"question": "Water boils at", "choices": ["100 degrees", "0 degrees"], "answer": 0},
        {"question": "Which is a fruit?", "choices": [" apple", " car"], "answer": 0},
    ],
    "tiny_text": [{"text": "The quick brown fox jumps over the lazy dog. " * 30}, {"text": "Hello world."}],
    "tiny_gen": [{"question": "Say hi", "answer": "hi"}, {"question": "Count: one, two,", "answer": " three"}],
}


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """A TaskManager over three tiny lm-eval tasks (multiple choice, perplexity, generation) in local JSONL."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, body in TASKS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[name]))
        data = {"data_files": {"test": str(folder / f"{name}.jsonl")}, "cache_dir": str(folder / "cache")}
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs: {json.dumps(data)}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + textwrap.dedent(body))
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_simple_evaluate_phikit_equals_hf_on_local_tasks(tiny, phi3_factory, local_tasks, family):
    from lm_eval import simple_evaluate

    from phikit.evaluate import format_lm_eval, run_lm_eval

    folder, _ = tiny if family == "phi" else phi3_factory("phi3-4k")
    tasks = list(TASKS)
    ours = run_lm_eval(folder, ",".join(tasks), dtype="fp32", device="cpu", task_manager=local_tasks, log_samples=True)
    ref = simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=tasks,
        device="cpu",
        batch_size=4,
        task_manager=local_tasks,
        log_samples=True,
    )
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_mc"]["acc_norm,none"] == ref["results"]["tiny_mc"]["acc_norm,none"]
    assert ours["results"]["tiny_gen"]["exact_match,none"] == ref["results"]["tiny_gen"]["exact_match,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_text"][metric] == pytest.approx(ref["results"]["tiny_text"][metric], rel=1e-5)
    for task in tasks:
        for mine, theirs in zip(ours["samples"][task], ref["samples"][task]):
            for (a,), (b,) in zip(mine["resps"], theirs["resps"]):  # one response per request
                if isinstance(b, str):  # generate_until
                    assert a == b
                elif isinstance(b, (tuple, list)):  # loglikelihood: (log-prob, is greedy)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
                else:  # loglikelihood_rolling
                    assert a == pytest.approx(b, rel=1e-6, abs=1e-4)
    table = format_lm_eval(ours)
    assert all(task in table for task in tasks)


def test_run_lm_eval_names_unknown_tasks(phi, local_tasks):
    from phikit.evaluate import run_lm_eval

    with pytest.raises(PhikitError, match="unknown lm-eval task.*hellaswagg"):
        run_lm_eval(phi, "tiny_mc,hellaswagg", task_manager=local_tasks)
    with pytest.raises(PhikitError, match="no lm-eval tasks"):
        run_lm_eval(phi, " , ", task_manager=local_tasks)


def test_a_task_whose_dataset_cannot_be_fetched_is_a_one_line_error(phi, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets.config
    from lm_eval.tasks import TaskManager

    from phikit.evaluate import run_lm_eval

    body = TASKS["tiny_mc"]
    head = "task: tiny_hub\ndataset_path: nobody/no-such-dataset-phikit\ntest_split: test\n"
    (tmp_path / "tiny_hub.yaml").write_text(head + textwrap.dedent(body))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without the Hub, at once
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(PhikitError, match="could not get a task's dataset.*Hub is reachable"):
        run_lm_eval(phi, "tiny_hub", task_manager=manager)


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_against_phikit_serve_equals_its_hf_backend(tiny, local_tasks, tokenized):
    """lm-eval's local-completions backend scoring through `phikit serve` (echo + logprobs, token-id or text
    prompts) gives the numbers of its hf backend on the same checkpoint."""
    from lm_eval import simple_evaluate
    from serving import Server

    from phikit.serve import create_app

    folder, _ = tiny
    tasks = list(TASKS)
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    kwargs = dict(tasks=tasks, task_manager=local_tasks, log_samples=True)
    # lm-eval's API backend cuts rolling documents into windows of max_length - 1 tokens (it keeps a position
    # for a generated token), its hf backend into windows of max_length: give hf one token less, so both
    # score the same windows
    ref = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32,max_length=255", device="cpu", batch_size=4, **kwargs
    )
    with Server(create_app(phi.model, phi.tokenizer, "tiny", max_batch=4)) as s:
        args = (
            f"base_url={s.url}/v1/completions,model=tiny,tokenizer={folder},tokenizer_backend=huggingface,"
            f"tokenized_requests={tokenized},num_concurrent=2,max_retries=1,max_length=256"
        )
        ours = simple_evaluate(model="local-completions", model_args=args, **kwargs)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == ref["results"]["tiny_mc"][metric]
    assert ours["results"]["tiny_gen"]["exact_match,none"] == ref["results"]["tiny_gen"]["exact_match,none"]
    for mine, theirs in zip(ours["samples"]["tiny_text"], ref["samples"]["tiny_text"]):  # rolling, windowed
        # the short document fits one window: equal; the long one still differs slightly by window (3.6e-4
        # relative with the fallback tokenizer's longer ids, 2e-5 with Phi-2's): lm-eval's two backends do
        # not split rolling documents identically even with matching max_length
        assert mine["resps"][0][0] == pytest.approx(theirs["resps"][0][0], rel=5e-4, abs=1e-4)
    for task in ("tiny_mc", "tiny_gen"):
        for mine, theirs in zip(ours["samples"][task], ref["samples"][task]):
            for (a,), (b,) in zip(mine["resps"], theirs["resps"]):
                if isinstance(b, str):
                    assert a == b
                else:
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
