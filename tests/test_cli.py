"""The phikit command line: output on stdout, statistics on stderr, one-line errors."""

import json
import subprocess
import sys

import pytest

from phikit.api import load
from phikit.cli import build_parser, main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_only_the_completion(tiny, capsys):
    folder, _ = tiny
    code, out, err = run_cli(
        capsys, "generate", "--model", folder, "--dtype", "fp32", "-n", "12", "--template", "instruct", "Say hi"
    )
    assert code == 0
    expected = load(folder, dtype="fp32", device="cpu").generate("Say hi", template="instruct", max_new_tokens=12)
    assert out == expected.text + "\n"
    assert "tok/s" in err and "peak memory" in err and "loaded" in err


def test_stream_prints_the_same_text(tiny, capsys):
    folder, _ = tiny
    _, plain, _ = run_cli(capsys, "generate", "-m", folder, "--dtype", "fp32", "-n", "12", "-q", "Hello")
    _, streamed, err = run_cli(
        capsys, "generate", "-m", folder, "--dtype", "fp32", "-n", "12", "-q", "--stream", "Hello"
    )
    assert streamed == plain and err == ""


def test_file_mode_prints_jsonl_in_order(tiny, tmp_path, capsys):
    folder, _ = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nThe sea\ndef f():\n")
    code, out, _ = run_cli(
        capsys, "generate", "-m", folder, "--dtype", "fp32", "-n", "6", "-q", "--batch-size", "2", "--file", prompts
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["Hello", "The sea", "def f():"]
    phi = load(folder, dtype="fp32", device="cpu")
    assert [r["completion"] for r in rows] == [
        phi.generate(p, max_new_tokens=6).text for p in ["Hello", "The sea", "def f():"]
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "-m", "/nonexistent/model", "hi"], "no such model folder"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["generate", "--file", "/nonexistent/prompts.txt"], "prompt file not found"),
        (["generate"], "give a prompt"),
        (["generate", "-m", "{folder}", "--template", "nonsense", "hi"], "unknown template"),
    ],
)
def test_user_errors_are_one_line(tiny, capsys, args, message):
    folder, _ = tiny
    code, out, err = run_cli(capsys, *[a.format(folder=folder) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("phikit: error: ") and message in err
    assert err.count("\n") == 1


def test_bad_jsonl_row_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    code, _, err = run_cli(capsys, "generate", "--file", prompts)
    assert code == 2 and f"{prompts}:2:" in err


def test_help_explains_every_subcommand():
    parser = build_parser()
    assert "generate" in parser.format_help()
    out = subprocess.run([sys.executable, "-m", "phikit", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout and "--template" in out.stdout


def test_eval_writes_a_side_by_side_report(tiny, tmp_path, capsys):
    folder, _ = tiny
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "template: instruct\nmax_new_tokens: 6\nprompts:\n  - {id: hi, prompt: Say hi}\n"
        "  - {id: sum, prompt: Add 2 and 3}\n"
    )
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        folder,
        "--dtype",
        "fp32",
        "--suite",
        suite,
        "--out",
        tmp_path / "out",
        "--compare",
        "int8:quantize=int8",
    )
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "int8" in report and "base" in report and "Say hi" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"base", "int8"} and len(results["int8"]) == 2


def test_eval_compare_spec_errors(capsys):
    code, _, err = run_cli(capsys, "eval", "--compare", "broken")
    assert code == 2 and "LABEL:key=value" in err
