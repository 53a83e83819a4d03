"""Fine-tuning end to end on a tiny model: it learns to answer and stop, resumes exactly after a kill,
runs under torchrun with two processes, and reports recipe mistakes clearly."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from serving import free_port  # noqa: E402

import phikit
from phikit.errors import PhikitError
from phikit.train import TrainConfig, checkpoints, finetune

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


def recipe(tiny_folder, out, **overrides):
    return TrainConfig.from_yaml(
        RECIPE,
        {
            "model": str(tiny_folder),
            "output_dir": str(out),
            "data": str(REPO / "recipes/data/tiny-instructions.jsonl"),
            **overrides,
        },
    )


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_learns_to_stop(tiny, tmp_path):
    folder, _ = tiny
    adapter = finetune(recipe(folder, tmp_path / "run"), progress=False)
    rows = metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert any("eval_loss" in r for r in rows)
    tuned = phikit.load(folder, dtype="fp32", device="cpu", adapter=adapter)
    base = phikit.load(folder, dtype="fp32", device="cpu")
    for question in ("What is the capital of France?", "What is 5 plus 3?", "Say the word red."):
        prompt = f"### Human: {question}### Assistant:"  # raw template: only <|endoftext|> can stop it
        short = tuned.generate(prompt, max_new_tokens=24)
        assert short.finish_reason == "stop" and len(short.token_ids) <= 6, short
        assert base.generate(prompt, max_new_tokens=24).finish_reason == "length"


def _adapter_weights(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny, tmp_path):
    folder, _ = tiny
    settings = {"max_steps": 120, "save_every": 10, "eval_every": 1000, "batch_size": 4, "lora_dropout": 0.1}
    straight = finetune(recipe(folder, tmp_path / "straight", **settings), progress=False)

    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "phikit",
        "finetune",
        "--config",
        str(RECIPE),
        "-q",
        "--model",
        str(folder),
        "--output_dir",
        str(out),
        "--data",
        str(REPO / "recipes/data/tiny-instructions.jsonl"),
    ]
    for k, v in settings.items():
        args += [f"--{k}", str(v)]
    # the same thread count as the runs in this process: a sum split over another number of threads rounds
    # differently (PyTorch's kernels on an Intel CPU: 5e-8 after 10 steps), and 120 steps amplify it to 0.1
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not checkpoints(out):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints(out), proc.stderr.read().decode()[-2000:]
    assert not (out / "adapter").exists(), "the run finished before it could be killed"
    resumed = finetune(recipe(folder, out, resume=True, **settings), progress=False)
    a, b = _adapter_weights(straight), _adapter_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, settings["max_steps"] + 1))  # each step once, in order


def test_a_planted_pickle_in_a_checkpoint_is_refused(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "run"
    finetune(recipe(folder, out, max_steps=4, save_every=2, eval_every=1000), progress=False)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = checkpoints(out)[-1]
    torch.save({"step": 2, "payload": Exploit()}, newest / "trainer_state.pt")
    (out / "adapter").rename(tmp_path / "old-adapter")
    with pytest.raises(PhikitError, match="trainer_state.pt: refused: it holds Python objects") as refused:
        finetune(recipe(folder, out, max_steps=4, save_every=2, eval_every=1000, resume=True), progress=False)
    assert not marker.exists() and "weights_only" not in str(refused.value)  # not torch's advice to load unsafely
    adapter = tmp_path / "adapter"  # an adapter_model.bin and a .bin checkpoint are refused the same way
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((tmp_path / "old-adapter" / "adapter_config.json").read_text())
    torch.save({"payload": Exploit()}, adapter / "adapter_model.bin")
    with pytest.raises(PhikitError, match="adapter_model.bin: refused: it holds Python objects"):
        phikit.load(folder, dtype="fp32", device="cpu", adapter=adapter)
    bin_model = tmp_path / "bin-model"
    bin_model.mkdir()
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            (bin_model / name).write_bytes((Path(folder) / name).read_bytes())
    torch.save({"payload": Exploit()}, bin_model / "pytorch_model.bin")
    with pytest.raises(PhikitError, match="pytorch_model.bin: refused: it holds Python objects"):
        phikit.load(bin_model, dtype="fp32", device="cpu")
    (bin_model / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(PhikitError, match="cannot read .* the file is truncated or corrupt: re-download it"):
        phikit.load(bin_model, dtype="fp32", device="cpu")
    assert not marker.exists()


def test_a_run_keeps_its_folder_to_itself_and_saves_its_last_step(tiny, tmp_path, capsys):
    """A second run into a folder a run is using is refused (its lock held); a run's last step is saved too,
    so --resume extends a finished run from where it ended; a NaN metric is written as JSON's null."""
    from phikit.train import MetricsLog
    from phikit.train.recipe import _lock_run

    folder, _ = tiny
    out = tmp_path / "run"
    held = _lock_run(out)
    with pytest.raises(PhikitError, match="in use by another run"):
        finetune(recipe(folder, out, max_steps=2, eval_every=1000), progress=False)
    held.close()
    finetune(recipe(folder, out, max_steps=3, save_every=2, eval_every=1000), progress=False)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # the last step, off the beat
    finetune(recipe(folder, out, max_steps=6, save_every=2, eval_every=1000, resume=True), progress=False)
    assert f"resuming from {out / 'checkpoint-3'} (step 3)" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    log = MetricsLog(tmp_path / "log", True)
    log.write(1, reward=float("nan"), best=float("inf"), loss=0.5)
    line = (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) == {
        "step": 1,
        "reward": None,
        "best": None,
        "loss": 0.5,
    }


def test_a_run_keeps_its_settings_and_a_resume_names_what_changed(tiny, tmp_path, capsys):
    """recipe.yaml holds the settings a run goes by; a resume with another lr says so; a resume of a finished
    run says nothing is left; an interrupted run's dashboard stops reloading and says where it stopped."""
    from phikit.train.recipe import SFTRecipe

    folder, _ = tiny
    out = tmp_path / "run"
    finetune(recipe(folder, out, max_steps=2, save_every=1, eval_every=1000), progress=False)
    settings = yaml.safe_load((out / "recipe.yaml").read_text())
    assert settings["max_steps"] == 2 and settings["model"] == str(folder) and "resume" not in settings
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(folder).resolve())  # merge finds it anywhere
    capsys.readouterr()
    finetune(recipe(folder, out, max_steps=2, lr=1e-3, resume=True), progress=False)
    err = capsys.readouterr().err
    assert "settings other than checkpoint-2's: lr 0.02 there, 0.001 now" in err
    assert "nothing is left to train" in err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lr"] == 1e-3

    def stop(self):
        raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    original = SFTRecipe.save_checkpoint
    try:
        SFTRecipe.save_checkpoint = stop
        with pytest.raises(KeyboardInterrupt):
            finetune(recipe(folder, interrupted, max_steps=3, save_every=2, eval_every=1000), progress=False)
    finally:
        SFTRecipe.save_checkpoint = original
    page = (interrupted / "dashboard.html").read_text()
    assert "interrupted at step 2 of 3" in page and 'http-equiv="refresh"' not in page


def test_a_fresh_run_starts_a_new_metrics_file(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    finetune(recipe(folder, out, max_steps=3, eval_every=1000, save_every=1000), progress=False)
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_under_torchrun(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "phikit",
        "finetune",
        "--config",
        str(RECIPE),
        "-q",
        "--model",
        str(folder),
        "--output_dir",
        str(out),
        "--data",
        str(REPO / "recipes/data/tiny-instructions.jsonl"),
        "--max_steps",
        "30",
        "--batch_size",
        "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_recipe_mistakes_are_clear(tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(PhikitError, match="unknown setting.*learning_rate"):
        recipe(folder, tmp_path, learning_rate=0.1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed")
    with pytest.raises(PhikitError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(PhikitError, match="scheduler must be"):
        recipe(folder, tmp_path, scheduler="exp")
    with pytest.raises(PhikitError, match="no checkpoint"):
        finetune(recipe(folder, tmp_path / "none", resume=True), progress=False)


def test_columns_that_name_nothing_are_refused_before_training(tiny, tmp_path):
    folder, _ = tiny
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}?", "answer": f" {i}."}) + "\n" for i in range(4)))
    settings = {"data": str(data), "data_format": "alpaca", "max_steps": 1}
    for columns, message in (
        ("instruction=question,output=answr", r"columns output=answr: no such column in .*qa.jsonl .*question, answer"),
        ("instr=question,output=answer", r"columns: instr: not a field of this format \(it reads instruction, input"),
    ):
        with pytest.raises(PhikitError, match=message):
            finetune(recipe(folder, tmp_path / "run", columns=columns, **settings), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_run_that_fails_before_writing_leaves_no_folder(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "new" / "run"
    with pytest.raises(PhikitError, match="data file not found"):
        finetune(recipe(folder, out, data=str(tmp_path / "missing.jsonl")), progress=False)
    assert not out.exists()  # not an empty folder holding only the lock
    out.mkdir(parents=True)
    with pytest.raises(PhikitError, match="data file not found"):
        finetune(recipe(folder, out, data=str(tmp_path / "missing.jsonl")), progress=False)
    assert out.is_dir()  # a folder that was there stays


def test_an_interrupted_run_says_how_to_go_on(tmp_path):
    from phikit.cli.finetune import interrupted_note

    assert "no checkpoint" in interrupted_note(tmp_path / "missing")
    for step in (20, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"")
    assert interrupted_note(tmp_path).endswith(
        f"{tmp_path / 'checkpoint-40'}: run the same command with --resume to continue from it"
    )


def test_diverging_loss_stops_with_a_clear_error(tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(PhikitError, match="loss became"):
        finetune(recipe(folder, tmp_path / "nan", lr=1e9, warmup_steps=0, max_steps=20), progress=False)


def test_a_misspelt_setting_gets_the_nearest_name(tmp_path):
    from phikit.cli.finetune import parse_overrides

    with pytest.raises(PhikitError, match=r"^--max_step: unknown setting\(s\) max_step \(did you mean max_steps\?\)$"):
        parse_overrides(["--max_step", "3"])
    with pytest.raises(PhikitError, match=r"learning_rate \(did you mean lr\?\)"):  # transformers' name
        parse_overrides(["--learning_rate", "1e-4"])
    assert parse_overrides(["--lr=2e-4", "--max_steps", "3", "--model=/x=y"]) == {
        "lr": 2e-4,
        "max_steps": 3,
        "model": "/x=y",
    }
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("lerning_rate: 1e-4\nbta: 0.2\n")
    with pytest.raises(PhikitError, match=r"unknown setting\(s\) bta, lerning_rate; known: batch_size, beta"):
        TrainConfig.from_yaml(recipe_file)  # not every key has a near one: the list of keys
    assert [n for n in TrainConfig(method="sft", beta=0.5, loss_type="ipo").notes() if "does not use" in n] == [
        "method sft does not use beta, loss_type"
    ]
    assert TrainConfig(method="orpo", loss_type="ipo").ignored() == ["loss_type"]


def test_cli_overrides_are_typed(tmp_path):
    from phikit.cli.finetune import parse_overrides

    assert parse_overrides(
        [
            "--lr",
            "2e-4",
            "--packing",
            "false",
            "--lora_targets",
            "q_proj,v_proj",
            "--max_steps",
            "7",
            "--quantize",
            "none",
        ]
    ) == {"lr": 2e-4, "packing": False, "lora_targets": ["q_proj", "v_proj"], "max_steps": 7, "quantize": None}
    with pytest.raises(PhikitError, match="--max_steps"):
        parse_overrides(["--max_steps", "many"])


@pytest.mark.parametrize("head", ["frozen", "quantized", "trained"])
def test_the_loss_and_its_gradients_match_transformers(tiny, head):
    """causal_lm_loss applies a frozen head to the labelled positions a chunk at a time and computes its
    gradient in the same pass; loss and gradients equal transformers' own causal-LM loss (labels shifted
    inside, -100 ignored) on the same weights, for a plain frozen head, a quantized one (transformers given
    the dequantized weight) and a trained one (the plain path)."""
    from phikit.quantize import QuantizedLinear
    from phikit.train import causal_lm_loss
    from phikit.train.losses import frozen_head

    folder, shared = tiny
    hf = copy.deepcopy(shared)
    model = phikit.load(folder, dtype="fp32", device="cpu").model
    if head == "quantized":
        model.lm_head = QuantizedLinear.from_weight(hf.lm_head.weight.detach(), hf.lm_head.bias.detach(), "nf4")
        hf.lm_head.weight.data = model.lm_head.dequantized()
    for m in (model, hf):
        for name, p in m.named_parameters():
            p.requires_grad_(
                name.endswith("layers.0.self_attn.q_proj.weight") or (head == "trained" and "lm_head" in name)
            )
    # the head path is taken for the CPU backend's own frozen layer too (it once took the plain path)
    assert (frozen_head(model.lm_head) is None) == (head == "trained")
    torch.manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt
    labels[1, 5:9] = -100
    loss, count = causal_lm_loss(model, ids, labels)
    loss.backward()
    reference = hf(input_ids=ids, labels=labels).loss
    reference.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    assert len(ours) == len(theirs) == (3 if head == "trained" else 1)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    empty = torch.full_like(labels, -100)
    assert causal_lm_loss(model, ids, empty)[0].item() == 0


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("responses_only", "false", False),
        ("packing", "off", False),
        ("packing", "yes", True),
        ("seq_len", 64.0, 64),
        ("lr", "1e-4", 1e-4),
        ("lora_targets", "q_proj", ["q_proj"]),
        ("lora_targets", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("lora_targets", "all-linear", "all-linear"),
        ("lora_targets", r".*\.mlp\.fc1", r".*\.mlp\.fc1"),
        ("columns", "prompt=question,completion=answer", {"prompt": "question", "completion": "answer"}),
        ("max_steps", "null", None),
        ("importance_sampling", False, "off"),  # a bare YAML off
        ("importance_sampling", "token_mask", "token_mask"),
    ],
)
def test_yaml_values_are_typed_as_the_command_lines(tmp_path, key, value, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({key: value}) if value is not False else f"{key}: off\n")
    assert getattr(TrainConfig.from_yaml(recipe), key) == expected
    text = {None: "null", False: "off"}.get(value, str(value)) if not isinstance(value, float) else str(value)
    assert TrainConfig.coerce(key, text) == expected


def test_an_override_of_none_clears_the_recipes_value(tmp_path):
    """``--max_steps none`` on the command line (None in the overrides) clears what the recipe set; a bad
    override is named with its value, and blamed on the overrides too."""
    from phikit.cli.finetune import parse_overrides

    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 20\nquantize: int8\nepochs: 1\n")
    cleared = TrainConfig.from_yaml(recipe, parse_overrides(["--max_steps", "none", "--quantize", "null"]))
    assert cleared.max_steps is None and cleared.quantize is None
    with pytest.raises(PhikitError, match=r"r.yaml \+ overrides: sampler must be one of .*, got 'gpu'"):
        TrainConfig.from_yaml(recipe, parse_overrides(["--sampler", "gpu"]))
    with pytest.raises(PhikitError, match="must be given"):
        TrainConfig.from_yaml(recipe, {"lr": None})
    dpo = TrainConfig.from_yaml(recipe, parse_overrides(["--method", "dpo", "--sampler", "fp16", "--temperature", "1"]))
    assert dpo.ignored() == ["sampler"]  # temperature 1 is the default: nothing to say
    assert dpo.notes() == ["method dpo does not use sampler"]
    full = TrainConfig.from_yaml(REPO / "recipes" / "tiny-cpu.yaml", parse_overrides(["--lora", "false"]))
    assert any("LoRA-sized rate" in note for note in full.notes())  # the recipe's 2e-2 on every weight
    calm = parse_overrides(["--lora", "false", "--lr", "2e-5", "--quantize", "none"])
    assert TrainConfig.from_yaml(recipe, calm).notes() == []
    assert (
        TrainConfig.from_yaml(recipe, parse_overrides(["--method", "grpo", "--reward_funcs", "answer"])).ignored() == []
    )


@pytest.mark.parametrize(
    "key, value", [("seq_len", 64.5), ("lora_r", 2.5), ("packing", "maybe"), ("seq_len", True), ("template", 3)]
)
def test_yaml_values_of_the_wrong_type_name_the_key(tmp_path, key, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(PhikitError, match=f"{key} must be"):
        TrainConfig.from_yaml(recipe)


def test_training_takes_all_linear_and_regex_targets(tiny, tmp_path):
    folder, _ = tiny
    for name, targets in (("all", "all-linear"), ("regex", r".*\.mlp\.fc[12]")):
        adapter = finetune(recipe(folder, tmp_path / name, max_steps=2, lora_targets=targets), progress=False)
        saved = json.loads((adapter / "adapter_config.json").read_text())
        assert saved["target_modules"] == targets


def test_data_is_checked_before_the_model_loads(tiny, tmp_path, monkeypatch):
    import phikit.api

    folder, _ = tiny
    monkeypatch.setattr(phikit.api, "load", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "### Human: hi### Assistant: ok"}\n{"txt": 1}\n')
    with pytest.raises(PhikitError, match=r"bad.jsonl:2"):
        finetune(recipe(folder, tmp_path / "run", data=str(bad)), progress=False)


def test_resume_refuses_changed_lora_settings_and_ignores_odd_folders(tiny, tmp_path):
    import shutil

    folder, _ = tiny
    out = tmp_path / "run"
    finetune(recipe(folder, out, max_steps=4, save_every=2, eval_every=1000), progress=False)
    shutil.copytree(checkpoints(out)[-1], out / "checkpoint-4.bak")
    with pytest.raises(PhikitError, match=r"lora_r 8 there, 4 now"):
        finetune(recipe(folder, out, max_steps=6, save_every=2, lora_r=4, resume=True), progress=False)
    finetune(recipe(folder, out, max_steps=6, save_every=2, resume=True), progress=False)
    assert [p.name for p in checkpoints(out)][-1] != "checkpoint-4.bak"


def _nan_on_rank_one(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from phikit.train import _finite_everywhere

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = _finite_everywhere(torch.tensor(float("nan") if rank == 1 else 1.0), 2)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank():
    """Under DDP the loss is checked on every rank together: a NaN on rank 1 alone makes rank 0 stop too,
    instead of waiting for rank 1 at its next collective for ever."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_nan_on_rank_one, args=(free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: False, 1: False}


def test_a_recipes_data_path_is_found_beside_it_from_any_folder(tmp_path, monkeypatch):
    """A relative data path that does not exist from the working directory is the recipe's own (beside the
    file); one that exists from the working directory is taken as written; a Hub id is left alone."""
    from phikit.train import TrainConfig

    recipe = REPO / "recipes" / "tiny-cpu.yaml"
    monkeypatch.chdir(tmp_path)
    assert Path(TrainConfig.from_yaml(recipe).data) == REPO / "recipes" / "data" / "tiny-instructions.jsonl"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny-instructions.jsonl").write_text('{"text": "hi"}\n')
    assert TrainConfig.from_yaml(recipe).data == "data/tiny-instructions.jsonl"  # the working folder's own
    hub = tmp_path / "hub.yaml"
    hub.write_text("model: microsoft/phi-2\ndata: timdettmers/openassistant-guanaco\n")
    assert TrainConfig.from_yaml(hub).data == "timdettmers/openassistant-guanaco"
    lost = tmp_path / "elsewhere" / "lost.yaml"  # a file in neither place: both named, before anything loads
    lost.parent.mkdir()
    lost.write_text("data: ../shared/data/train.jsonl\n")
    with pytest.raises(PhikitError, match=r"neither in the working folder .* nor beside the recipe .*--data"):
        TrainConfig.from_yaml(lost)
    assert TrainConfig.from_yaml(lost, {"data": "mine.jsonl"}).data == "mine.jsonl"  # overridden: not looked for
