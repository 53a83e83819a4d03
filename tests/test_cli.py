"""The phikit command line: output on stdout, statistics on stderr, one-line errors."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phikit.api import load
from phikit.cli import build_parser, main
from phikit.errors import PhikitError


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
    tokens = expected.prompt_tokens + len(expected.token_ids)
    per_token = 2 * 2 * 4 * 16 * 4  # keys and values x 2 layers x 4 heads x 16 dims x fp32 (fp32 weights)
    assert f"KV cache {per_token * tokens / 1e6:.1f} MB for {tokens} tokens" in err, err


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
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["generate", "--file", "/nonexistent/prompts.txt"], "--file /nonexistent/prompts.txt: file not found"),
        (["generate"], "give a prompt"),
        (["generate", "-m", "{folder}", "--template", "nonsense", "hi"], "unknown template"),
        (["generate", "-m", "/nonexistent/model", "--system", "Be brief", "hi"], "--system needs a template"),
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


# ---- values and files a user can get wrong ----

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["generate", "--temperature", "nan", "hi"], "temperature"),
        (["generate", "--temperature", "inf", "hi"], "temperature"),
        (["generate", "--repetition-penalty", "nan", "hi"], "--repetition-penalty"),
        (["eval", "--compare", "x:quantize=int3"], "quantize must be one of"),
        (["bench", "--new-tokens", "0"], "--new-tokens"),
        (["eval", "--compare", "x:group_size=abc"], "group_size"),
    ],
)
def test_bad_values_are_one_line_errors(capsys, args, fragment):
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "override,fragment",
    [
        (["--max_steps", "-1"], "max_steps"),
        (["--save_every", "0"], "save_every"),
        (["--eval_every", "0"], "eval_every"),
        (["--weight_decay", "nan"], "finite"),
        (["--epochs", "inf"], "finite"),
    ],
)
def test_bad_recipe_values_are_one_line_errors(capsys, override, fragment):
    code, _, err = run_cli(capsys, "finetune", "--config", REPO_ROOT / "recipes/tiny-cpu.yaml", *override)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_an_output_dir_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    code, _, err = run_cli(
        capsys, "finetune", "--config", REPO_ROOT / "recipes/tiny-cpu.yaml", "--output_dir", tmp_path / "f"
    )
    assert code == 2 and "is a file" in err


def test_invalid_utf8_prompts_are_refused(tiny, tmp_path, capsys):
    folder, _ = tiny
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\nbad \xff\n")
    code, _, err = run_cli(capsys, "generate", "-m", folder, "--file", bad)
    assert code == 2 and "p.txt:2: not valid UTF-8" in err
    code, _, err = run_cli(capsys, "generate", "-m", folder, "bad \udcff argv")  # how Python passes bad argv bytes
    assert code == 2 and "not valid UTF-8" in err


def test_a_closed_pipe_ends_quietly(tiny, tmp_path):
    folder, _ = tiny
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n" * 40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "phikit", "generate", "-m", str(folder), "-q", "-n", "4", "--file", str(prompts)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err


def test_a_ctrl_c_while_pytorch_imports_is_one_line(monkeypatch, capsys):
    # the command's first imports do not reach PyTorch, so main() is running when it imports
    probe = "import sys, phikit.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    import phikit.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(phikit.cli, "build_parser", interrupted)
    code, out, err = run_cli(capsys, "generate", "Hi")
    assert code == 130 and err.strip() == "phikit: interrupted" and not out


def test_sigterm_cleans_up_as_a_ctrl_c_does(monkeypatch, capsys, tmp_path):
    """kill / timeout / a container's stop send SIGTERM: the command stops as after a Ctrl-C (its cleanup
    runs: here the temporary of a write in progress goes) and says so in one line, exit 143."""
    import signal

    import phikit.cli.bench
    from phikit.checkpoint import atomic_write

    def killed_while_writing(args):
        def write(tmp):
            tmp.write_text("half")
            signal.raise_signal(signal.SIGTERM)

        atomic_write(tmp_path / "out.json", write)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(phikit.cli.bench, "run", killed_while_writing)
    try:
        code, _, err = run_cli(capsys, "bench")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and err.strip() == "phikit: terminated"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_says_so(monkeypatch, capsys):
    import errno

    import phikit.cli.bench

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")

    monkeypatch.setattr(phikit.cli.bench, "run", full)
    code, _, err = run_cli(capsys, "bench")
    assert code == 2 and "the disk is full writing /out/model.safetensors" in err


def test_writing_over_the_source_is_refused(tiny, tmp_path, capsys):
    import shutil

    folder, _ = tiny
    source = tmp_path / "models" / "tiny"
    shutil.copytree(folder, source)
    code, _, err = run_cli(capsys, "quantize", "-m", source, "--to", "int8", "--overwrite", source)
    assert code == 2 and "is or contains the source model" in err
    for command in (["export"], ["merge", "--adapter", tmp_path]):
        code, _, err = run_cli(capsys, *command, "-m", source, "--overwrite", tmp_path / "models")
        assert code == 2 and "is or contains the source model" in err
    assert (source / "config.json").is_file()


def test_outputs_that_cannot_be_written_are_one_line_errors_before_the_work(tiny, tmp_path, capsys, monkeypatch):
    import phikit.cli.bench
    from phikit.checkpoint import atomic_write
    from phikit.errors import PhikitError

    folder, _ = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setattr(phikit.cli.bench, "run_bench", None, raising=False)  # never reached
    for where in (blocker / "sub", __import__("pathlib").Path("/proc/phikit-test")):
        commands = [
            ["quantize", "-m", folder, "--to", "int8", where / "q"],
            ["export", "-m", folder, "--format", "gguf", where / "m.gguf"],
            ["export", "-m", folder, where / "hf"],
            ["merge", "-m", folder, "--adapter", tmp_path, where / "merged"],
            ["bench", "-m", folder, "--precisions", "fp32", "--json", where / "b.json"],
            ["eval", "-m", folder, "--out", where / "ev"],
            ["plot", runs, "--out", where / "runs.png"],
        ]
        for command in commands:
            code, _, err = run_cli(capsys, *command)
            assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, err)
            assert str(where) in err and ("is a file, not a folder" in err or "cannot write" in err), err
        with pytest.raises(PhikitError, match="is a file, not a folder|cannot write"):  # the path, not a temp name
            atomic_write(where / "x.json", lambda tmp: tmp.write_text("{}"))
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run"]


def test_files_written_get_the_users_umask(tiny, tmp_path, capsys):
    import os
    import stat

    folder, _ = tiny
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "quantize", "-m", folder, "--to", "int8", tmp_path / "q")[0] == 0
        assert run_cli(capsys, "export", "-m", folder, "--format", "gguf", tmp_path / "m.gguf")[0] == 0
        assert run_cli(capsys, "export", "-m", folder, tmp_path / "hf")[0] == 0
    finally:
        os.umask(old)
    for path in [tmp_path / "q", tmp_path / "hf", tmp_path / "m.gguf", *(tmp_path / "q").iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_version_and_reported_precision(tiny, capsys):
    folder, _ = tiny
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("phikit ")
    code, _, err = run_cli(capsys, "generate", "-m", folder, "--dtype", "bf16", "-n", "2", "Hello")
    assert code == 0 and "(bf16, cpu)" in err


def test_every_subcommand_is_a_module_with_the_shared_model_flags():
    import importlib

    from phikit.cli import COMMANDS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    for command, module in COMMANDS.items():
        mod = importlib.import_module(f"phikit.cli.{module}")
        assert callable(mod.add_parser) and callable(mod.run)
        flags = {o: a for a in sub.choices[command]._actions for o in a.option_strings}
        if "--quantize" in flags:  # commands that load a model for inference: one definition of the flags
            reference = {o: a for a in sub.choices["generate"]._actions for o in a.option_strings}
            for flag in ("--model", "--dtype", "--device", "--quantize", "--group-size"):
                assert (flags[flag].default, flags[flag].help, flags[flag].choices) == (
                    reference[flag].default,
                    reference[flag].help,
                    reference[flag].choices,
                ), (command, flag)


@pytest.mark.parametrize(
    "args, message",
    [
        (["perplexity", "--data", "{dir}"], "--data {dir}: is a directory"),
        (["perplexity", "--data", "{bad}"], "not valid UTF-8"),
        (["perplexity", "--data", "{txt}", "--context", "1"], "--context 1: must be at least 2"),
        (["perplexity", "--data", "{txt}", "--max-tokens", "-5"], "--max-tokens -5: must be at least 2"),
        (["eval", "--out", "{txt}"], "--out {txt}: is a file"),
        (["eval", "-n", "0"], "--max-new-tokens 0: must be at least 1"),
        (["bench", "--threads", "-1"], "--threads -1: must be at least 1"),
        (["bench", "--json", "{dir}"], "--json {dir}: is a directory"),
        (["generate", "--file", "{dir}"], "--file {dir}: is a directory"),
    ],
)
def test_mistakes_with_files_and_numbers_are_one_line_errors(tiny, tmp_path, capsys, args, message):
    folder, _ = tiny
    (tmp_path / "d").mkdir()
    (tmp_path / "t.txt").write_text("some text to score")
    (tmp_path / "b.txt").write_bytes(b"ok\n\xff\xfe bad")
    names = {"dir": tmp_path / "d", "txt": tmp_path / "t.txt", "bad": tmp_path / "b.txt"}
    filled = [a.format(**names) for a in args]
    model_flags = ["--model", folder] + ([] if args[0] == "bench" else ["--dtype", "fp32"])
    code, _, err = run_cli(capsys, *filled, *model_flags)
    assert code != 0 and message.format(**names) in err and "Traceback" not in err, err


def test_generate_reads_prompts_from_stdin_with_file_dash(tiny, monkeypatch, capsys):
    import io

    folder, _ = tiny
    stdin = io.TextIOWrapper(io.BytesIO(b"Hello\nThe sky is\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, _ = run_cli(capsys, "generate", "-m", folder, "--dtype", "fp32", "-n", "3", "-q", "--file", "-")
    assert code == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hello", "The sky is"]


def test_an_unknown_flag_is_reported_with_the_commands_own_usage(capsys):
    for argv, usage, error in (
        (["quantize", "-m", "x", "--to", "int4", "-o", "out"], "usage: phikit quantize", "phikit quantize: error"),
        (["--bogus"], "usage: phikit [-h]", "phikit: error"),
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.startswith(usage) and f"{error}: unrecognized arguments" in err


def test_merge_takes_the_base_model_its_adapter_names(tiny, tmp_path, capsys):
    """Without --model, merge (and export, generate ...) use the base model recorded in adapter_config.json,
    and say so; a recorded local folder that is gone is a one-line error asking for --model."""
    import json

    from phikit.checkpoint import load_model
    from phikit.lora import LoRAConfig, inject_lora, save_adapter

    folder, _ = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "adapter", base_model=str(folder))
    code, _, err = run_cli(capsys, "merge", "--adapter", tmp_path / "adapter", tmp_path / "merged")
    assert code == 0 and f"base model {folder} (from {tmp_path / 'adapter'}/adapter_config.json" in err
    assert (tmp_path / "merged" / "config.json").is_file()
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "/gone/model"}))
    code, _, err = run_cli(capsys, "export", "--adapter", tmp_path / "adapter", tmp_path / "hf")
    assert (
        code == 2
        and err.strip().endswith("names base model /gone/model, which is not here; give --model (its folder or Hub id)")
        and len(err.strip().splitlines()) == 1
    )


def test_a_gguf_export_into_a_folder_name_is_refused(tiny, tmp_path, capsys):
    folder, _ = tiny
    code, _, err = run_cli(capsys, "export", "-m", folder, "--format", "gguf", f"{tmp_path}/new/")
    assert code == 2 and f"--format gguf writes one file; name it, e.g. {tmp_path}/new/model.gguf" in err
    assert not (tmp_path / "new").exists()


def test_a_killed_writers_hidden_temporaries_are_removed_by_the_next_write(tmp_path, capsys):
    """Temporaries carry host and pid: the next write of the same output removes those of a process that no
    longer runs (SIGKILL leaves them; Ctrl-C cleans up itself), never a running one's or another output's."""
    import subprocess
    import sys

    from phikit.checkpoint import atomic_write, temp_tag

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = temp_tag().rsplit("-", 1)[0] + "-" + gone.stdout.strip()
    stale = [tmp_path / f".m.gguf.{dead}.abc.tmp", tmp_path / f".m.gguf.tmp-{dead}-abc"]
    stale[0].write_bytes(b"x" * 1000)
    stale[1].mkdir()
    kept = [tmp_path / f".m.gguf.{temp_tag()}.abc.tmp", tmp_path / f".other.gguf.{dead}.abc.tmp"]
    for path in kept:
        path.write_text("x")
    atomic_write(tmp_path / "m.gguf", lambda tmp: tmp.write_text("done"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.gguf", *(p.name for p in kept)])
    assert f"removed {stale[0]}, left unfinished by a process that was killed" in capsys.readouterr().err

    # killed between replace_folder's two renames: the previous output is put back, not deleted
    from phikit.checkpoint import check_output_folder, save_checkpoint

    old = tmp_path / f".hf.old-{dead}-abc"
    (old / "hf").mkdir(parents=True)
    (old / "hf" / "config.json").write_text("{}")
    save_checkpoint(tmp_path / "other", {}, {"a": 1})  # a write beside it sweeps only its own name's leftovers
    assert old.is_dir()
    save_checkpoint(tmp_path / "hf", {}, {"a": 1}, overwrite=True)
    assert not old.exists() and "put " in capsys.readouterr().err
    assert (tmp_path / "hf" / "config.json").read_text().startswith('{\n  "a"')
    # inside an output folder only phikit's own inner files' leftovers are swept; a user's hidden file stays
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / f".backup.{dead}.tar").write_text("mine")
    with pytest.raises(PhikitError, match="already exists and is not empty"):
        check_output_folder(notes, overwrite=False)
    assert (notes / f".backup.{dead}.tar").read_text() == "mine"
    (notes / f".backup.{dead}.tar").unlink()
    (notes / f".model.gguf.{dead}.x.tmp").write_text("half")
    check_output_folder(notes, overwrite=False)  # a killed Ollama export's GGUF is not content
    assert not any(notes.iterdir())
    # a model folder with a .git (a clone of a Hub repo) is not replaced
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(b"")
    with pytest.raises(PhikitError, match="does not look like a model folder"):
        check_output_folder(repo, overwrite=True)


def test_overwrite_replaces_only_a_folder_holding_a_model(tiny, tmp_path, capsys, monkeypatch):
    """--overwrite never replaces the working folder (or one holding it) nor a folder of other files; a model
    folder it wrote before is replaced."""
    folder, _ = tiny
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "quantize", "-m", folder, "--to", "int8", "--overwrite", mine)
    assert code == 2 and "does not look like a model folder (one of config.json, adapter_config.json" in err
    (mine / "config.json").write_text('{"app": "settings"}')  # a project's own config.json: still not a model
    (mine / "w.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "quantize", "-m", folder, "--to", "int8", "--overwrite", mine)
    assert code == 2 and "does not look like a model folder" in err  # it has a subfolder
    for name in ("config.json", "w.safetensors"):
        (mine / name).unlink()
    monkeypatch.chdir(mine / "sub")
    for where in (".", ".."):
        code, _, err = run_cli(capsys, "quantize", "-m", folder, "--to", "int8", "--overwrite", where)
        assert code == 2 and "is the working folder or holds it" in err
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "sub"]
    assert run_cli(capsys, "quantize", "-m", folder, "--to", "int8", tmp_path / "q")[0] == 0
    assert run_cli(capsys, "quantize", "-m", folder, "--to", "int4", "--overwrite", tmp_path / "q")[0] == 0


def test_a_full_disk_is_one_line_whoever_writes(monkeypatch):
    """safetensors, gguf-py and torch.save each say "disk full" their own way; the CLI says it one way."""
    import errno

    from phikit.cli import disk_full

    class SafetensorError(Exception):
        pass

    assert (
        disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/m.gguf")) == "the disk is full writing /x/m.gguf"
    )
    said = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert disk_full(SafetensorError(said)) == "the disk is full"
    assert (
        disk_full(OSError("Not enough free space to write 25755648 bytes after offset 1972736")) == "the disk is full"
    )
    assert "probably full" in disk_full(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 8")
    )
    assert disk_full(RuntimeError("shape mismatch")) is None and disk_full(OSError(errno.EACCES, "denied")) is None


def test_prompt_files_drop_a_byte_order_mark_and_an_empty_stop_is_refused(tiny, tmp_path, capsys):
    from phikit.cli.generate import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffHello\nBye\n".encode())
    assert read_prompts(prompts) == ["Hello", "Bye"]
    folder, _ = tiny
    code, _, err = run_cli(capsys, "generate", "-m", folder, "--stop", "", "Hi")
    assert code == 2 and "--stop: an empty string would stop before the first token" in err


def test_finetune_into_a_place_it_cannot_write_is_one_line(tiny, tmp_path, capsys):
    folder, _ = tiny
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    code, _, err = run_cli(
        capsys, "finetune", "-c", recipe, "--model", folder, "--output_dir", "/proc/phikit-test/run", "-q"
    )
    assert code == 2 and "output_dir /proc/phikit-test/run/metrics.jsonl: cannot write in /proc" in err, err


def test_perplexity_prints_its_json_line_with_what_it_measured(tiny, tmp_path, capsys):
    """The command end to end (it once scored and then failed before printing): the line equals
    evaluate.perplexity on the same model and names precision, group size, dtype, context and stride."""
    from phikit.evaluate import perplexity, read_text

    folder, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    code, out, _ = run_cli(
        capsys, "perplexity", "-m", folder, "--data", text, "--quantize", "int4", "--dtype", "fp32", "--context", "64"
    )
    assert code == 0
    line = json.loads(out)
    phi = load(folder, dtype="fp32", device="cpu", quantize="int4")
    expected = perplexity(phi.model, read_text(text, phi.tokenizer), 64)
    assert line["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6) and line["tokens"] == expected.tokens
    assert {k: line[k] for k in ("precision", "group_size", "dtype", "context", "stride", "adapter")} == {
        "precision": "int4",
        "group_size": 64,
        "dtype": "fp32",
        "context": 64,
        "stride": 32,
        "adapter": None,
    }
