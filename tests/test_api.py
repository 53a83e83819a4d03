"""phikit from Python: lazy top-level names, and the mistakes a Python user can make are one-line errors
at the call (not a traceback from torch, not a silent misreading)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phikit
from phikit.errors import PhikitError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phi(tiny):
    return phikit.load(tiny[0], dtype="fp32", device="cpu")


def test_names_import_on_first_use_and_probing_runs_nothing():
    probe = (
        "import sys, phikit; print(hasattr(phikit, '__main__'), hasattr(phikit, 'foo.bar'), "
        "'torch' in sys.modules, 'generate' in dir(phikit), 'importlib' in dir(phikit))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.split() == ["False", "False", "False", "True", "False"], proc.stdout + proc.stderr
    for name in phikit.__all__:
        assert getattr(phikit, name) is not None
    assert phikit.kernels.__name__ == "phikit.kernels"  # a submodule, as an attribute
    with pytest.raises(AttributeError, match="has no attribute 'lod'"):
        phikit.lod  # noqa: B018


def test_numpy_numbers_and_any_sequence_of_prompts_are_taken(phi):
    import numpy as np

    expected = phi.generate(["Hi", "Yo"], max_new_tokens=3)
    assert [c.text for c in phi.generate(np.array(["Hi", "Yo"]), max_new_tokens=np.int64(3))] == [
        c.text for c in expected
    ]
    assert [c.text for c in phi.generate((p for p in ["Hi", "Yo"]), max_new_tokens=3, temperature=np.float32(0))] == [
        c.text for c in expected
    ]


def test_one_stop_string_is_one_string_not_its_characters(phi):
    whole = phi.generate("Hello", max_new_tokens=12)
    word = next(w for w in whole.text.split() if len(w) > 2)  # a word the reply holds, longer than a character
    cut = phi.generate("Hello", max_new_tokens=12, stop=word)
    assert cut.text == phi.generate("Hello", max_new_tokens=12, stop=[word]).text
    assert cut.text == whole.text[: whole.text.index(word)] and cut.finish_reason == "stop"
    assert "".join(phi.stream("Hello", max_new_tokens=12, stop=word)) == cut.text


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.generate("Hi", max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
        (lambda p: p.generate("Hi", max_new_tokens="8"), "max_new_tokens must be an integer, got '8'"),
        (lambda p: p.generate("Hi", temperature="0.5"), "temperature must be a number, got '0.5'"),
        (lambda p: p.generate("Hi", seed="a"), "seed must be an integer, got 'a'"),
        (lambda p: p.generate("Hi", stop=[""]), "stop must be a string or a list of non-empty strings"),
        (lambda p: p.generate({"role": "user", "content": "hi"}), "not chat messages"),
        (lambda p: p.generate([{"role": "user", "content": "hi"}]), "not chat messages"),
        (lambda p: p.generate([1, 2, 3]), "prompts must be a string or a list of strings"),
        (lambda p: p.stream(["a", "b"]), "stream takes one prompt"),
        (lambda p: p.stream("Hi", max_tokens=3), "unknown generation setting"),  # at the call, before next()
        (lambda p: p.generate("Hi " * 600, max_new_tokens=4), r"truncate=True \(--truncate\)"),
    ],
)
def test_generation_mistakes_are_one_line_errors_at_the_call(phi, call, message):
    with pytest.raises(PhikitError, match=message):
        call(phi)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"dtype": torch.int8},
            r'not a dtype of weights; use bf16, fp16 or fp32 \(for torch.int8 weights: quantize="int8"\)',
        ),
        ({"device": "meta"}, "not one phikit runs on"),
        ({"quantize": True}, "quantize must be int8, int4, nf4, a QuantSpec or None, got True"),
        ({"quantize": "int8", "group_size": 32}, "group_size 32 is int4's; with int8 it changes nothing"),
        ({"group_size": 32}, "with no quantization it changes nothing"),
        ({"quantize": "int4", "group_size": "64"}, "group_size must be an integer"),
        ({"quantize": phikit.QuantSpec("int4", 64), "group_size": 32}, "differs from the QuantSpec's 64"),
    ],
)
def test_load_mistakes_are_one_line_errors_before_the_weights(tiny, options, message):
    with pytest.raises(PhikitError, match=message):
        phikit.load(tiny[0], **{"device": "cpu", **options})
    with pytest.raises(PhikitError, match="is int4's; nf4 has none"):
        phikit.QuantSpec("nf4", 1000)


def test_load_spellings_and_a_quantized_folder_of_another_group_size(tiny, tmp_path):
    assert phikit.load(tiny[0], dtype="FP32", device="cpu", quantize="none").quantization is None
    assert phikit.load(tiny[0], dtype="fp32", device="cpu", quantize="INT8").quantization.format == "int8"
    folder = phikit.save_quantized(phikit.load(tiny[0], device="cpu", quantize="int4", group_size=32), tmp_path / "q")
    assert phikit.load(folder, device="cpu", quantize="int4", group_size=32).quantization.group_size == 32
    with pytest.raises(PhikitError, match=r"already quantized \(int4, groups of 32; asked for int4, groups of 64\)"):
        phikit.load(folder, device="cpu", quantize="int4")


def test_a_model_with_an_adapter_is_not_saved_quantized(tiny, tmp_path):
    from phikit.lora import LoRAConfig, inject_lora, save_adapter

    base = phikit.load(tiny[0], dtype="fp32", device="cpu")
    inject_lora(base.model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(base.model, tmp_path / "adapter", str(tiny[0]))
    with_adapter = phikit.load(tiny[0], device="cpu", quantize="int4", adapter=tmp_path / "adapter")
    with pytest.raises(PhikitError, match="carries a LoRA adapter.*merge it first"):
        phikit.save_quantized(with_adapter, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_conversation_rendered_by_its_template_generates_as_the_chat_template_does(phi3_factory):
    """docs/generate.md: a message list (a system prompt, history) goes through the template's
    render_messages and then generates as raw text; one user message so equals template="chat"."""
    from phikit.templates import get_template

    phi = phikit.load(phi3_factory("phi3-4k")[0], dtype="fp32", device="cpu")
    chat = get_template("chat", phi.tokenizer)
    text = chat.render_messages([{"role": "user", "content": "Name a colour."}])
    direct = phi.generate("Name a colour.", template="chat", max_new_tokens=8)
    assert phi.generate(text, template="raw", stop=list(chat.stop), max_new_tokens=8).text == direct.text
    system = chat.render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "Be brief." in system and phi.generate(system, template="raw", max_new_tokens=4).token_ids


def test_perplexity_takes_a_loaded_model_and_says_when_it_shortens_the_context(phi):
    from phikit.evaluate import perplexity

    ids = phi.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    assert perplexity(phi, ids).perplexity == perplexity(phi.model, ids).perplexity
    longest = phi.model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"past the model's {longest} tokens"):
        perplexity(phi, ids, context=longest + 1)
    with pytest.raises(PhikitError, match="context must be at least 2 tokens, got 0"):
        perplexity(phi, ids, context=0)


def test_a_recipe_built_in_python_is_checked_as_a_yaml_one(tiny, tmp_path):
    from phikit.train import TrainConfig, finetune

    data = REPO / "recipes" / "data" / "tiny-instructions.jsonl"
    base = {"model": str(tiny[0]), "data": str(data), "output_dir": str(tmp_path / "run"), "device": "cpu"}
    with pytest.raises(PhikitError, match="lr"):
        finetune(TrainConfig(**base, lr=-1.0), progress=False)
    with pytest.raises(PhikitError, match="seq_len"):
        finetune(TrainConfig(**base, seq_len=2), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    import numpy as np

    paths = {**base, "model": tiny[0], "data": data, "output_dir": tmp_path / "run"}  # Path objects, a tuple
    small = {"seq_len": 64, "grad_accum": 1, "eval_fraction": 0.0, "max_steps": np.int64(2)}
    adapter = finetune(TrainConfig(**paths, **small, lora_targets=("q_proj", "v_proj")), progress=False)
    assert (adapter / "adapter_config.json").is_file()


def test_a_group_size_reaches_int4_columns_only(tiny, tmp_path, capsys):
    from phikit.cli import main
    from phikit.quantize import QuantSpec

    # a folder an early version wrote as int8 "with" group size 32 loads as int8
    assert QuantSpec.from_config({"quant_method": "phikit", "format": "int8", "group_size": 32}) == QuantSpec("int8")
    suite = tmp_path / "suite.yaml"
    suite.write_text("template: instruct\nmax_new_tokens: 2\nprompts:\n  - {id: hi, prompt: Say hi}\n")
    args = ["eval", "-m", tiny[0], "--dtype", "fp32", "--device", "cpu", "--suite", suite, "--out", tmp_path / "o"]
    assert main([str(a) for a in [*args, "--group-size", "32", "--compare", "q4:quantize=int4"]]) == 0
    assert "groups of 32" in (tmp_path / "o" / "report.md").read_text()
