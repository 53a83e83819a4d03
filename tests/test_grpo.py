"""GRPO: the loss and its LoRA gradients equal TRL's GRPOTrainer on the same fixed completions and advantages
(each loss type, with and without the KL term, with a sampling temperature), advantages as TRL normalises
rewards, reward functions built in and the user's own, and a recipe on which the mean reward rises."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from test_preference import _policy, _same_adapter, assert_lora_grads_equal

import phikit
from phikit.errors import PhikitError
from phikit.train import TrainConfig, finetune, group_advantages
from phikit.train.rewards import reward_functions

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def constant_reward(completions, **_):  # named by test_user_reward_functions_are_loaded_by_path
    return [0.5] * len(completions)


def _completions(tokenizer):
    """Four fixed prompt + completion rows, prompts of equal length (TRL left-pads prompts, phikit right-pads
    whole rows: equal prompts put every token at the same position in both)."""
    prompts = ["### Human: What is 2 plus 2?### Assistant:", "### Human: What is 3 plus 5?### Assistant:"]
    replies = [" 4.", " 5, maybe.", " 8.", " eight or so"]
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(2)]
    assert len({len(p) for p in prompt_ids}) == 1
    completions = [tokenizer.encode(r) + [tokenizer.eos_id] for r in replies]
    completions[3] = completions[3][:-1]  # one completion cut at the length limit: no EOS
    return prompt_ids, completions


@pytest.mark.parametrize(
    "loss_type, beta, temperature, packed, correction",
    [
        ("dapo", 0.0, 1.0, True, None),
        ("dapo", 0.0, 1.0, False, None),
        ("grpo", 0.0, 1.0, True, None),
        ("bnpo", 0.0, 0.7, True, None),
        ("dr_grpo", 0.0, 1.0, True, None),
        ("dapo", 0.04, 0.7, True, None),
        ("dapo", 0.0, 0.7, True, "sequence_mask"),
        ("grpo", 0.04, 1.0, False, "token_truncate"),
    ],
)
def test_grpo_loss_and_gradients_equal_trls(tiny, tmp_path, loss_type, beta, temperature, packed, correction):
    """Each group's prompt once (packed) or every row whole; with ``correction``, completions as if sampled
    by another model (a 16-bit copy), weighted as TRL weighs vLLM's samples."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from phikit.data import prompt_reply_batch
    from phikit.lora import adapters_disabled
    from phikit.train.grpo import GroupBatch, GRPORecipe
    from phikit.train.losses import frozen_head, token_logps
    from phikit.train.packing import pack_groups

    model, lora = _policy(tiny)
    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    prompt_ids, completions = _completions(tokenizer)
    advantages = torch.tensor([0.9, -0.9, 1.2, -0.4])
    limit = 12
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=loss_type,
        beta=beta,
        temperature=temperature,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=limit,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 autocast; the parity is in fp32
    )
    data = Dataset.from_list([{"prompt": "a"}] * 4)
    trainer = GRPOTrainer(
        copy.deepcopy(tiny[1]),
        reward_funcs=constant_reward,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tiny[0]),
        peft_config=lora,
    )
    _same_adapter(trainer, model)
    trainer.current_gradient_accumulation_steps = 1
    width = max(len(c) for c in completions)
    completion_ids = torch.full((4, width), tokenizer.pad_id)
    completion_mask = torch.zeros(4, width, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
    ids, labels = prompt_reply_batch(prompt_ids, completions, tokenizer.pad_id)
    inputs = {
        "prompt_ids": torch.tensor(prompt_ids),
        "prompt_mask": torch.ones(4, len(prompt_ids[0]), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }
    if beta:  # the reference: phikit's model with the adapter off, laid out as TRL keeps it
        with torch.no_grad(), adapters_disabled(model):
            reference, sequence = token_logps(model, ids, labels, frozen_head(model.lm_head), temperature)
        inputs["ref_per_token_logps"] = torch.zeros(4, width)
        for i in range(4):
            inputs["ref_per_token_logps"][i, : len(completions[i])] = reference[sequence == i]
    sampled = None
    if correction:  # the sampler's log-probs: near the policy's, but completion 2 past the weights' bound
        with torch.no_grad():
            policy, sequence = token_logps(model, ids, labels, frozen_head(model.lm_head), temperature)
        sampled = policy + torch.where(sequence == 2, -1.2, 0.05 * torch.linspace(-1, 1, len(sequence)))
        # TRL's importance_sampling_ratio (its _generate_and_score_completions), bound 3, TRL's default
        difference = torch.zeros(4, width)
        for i in range(4):
            difference[i, : len(completions[i])] = (policy - sampled)[sequence == i]
        if correction == "sequence_mask":
            ratio = torch.exp(difference.sum(-1, keepdim=True))
            ratio = ratio.masked_fill(ratio > 3.0, 0.0)
            assert ratio[2] == 0 and (ratio[[0, 1, 3]] > 0).all()
        else:
            ratio = torch.exp(difference).clamp(max=3.0)
            assert ratio.max() == 3.0
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = ratio
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    recipe = GRPORecipe(
        TrainConfig(
            method="grpo",
            reward_funcs=["answer"],
            loss_type=loss_type,
            beta=beta,
            temperature=temperature,
            max_completion_length=limit,
            grad_accum=1,
            importance_sampling=correction or "sequence_mask",
        )
    )
    recipe.model, recipe.head = model, frozen_head(model.lm_head)
    recipe.step_tokens = int(completion_mask.sum())
    if packed:  # the two groups of two completions, each prompt once
        groups = [(prompt_ids[0], completions[:2]), (prompt_ids[2], completions[2:])]
        batch = GroupBatch(pack_groups(groups, tokenizer.pad_id), None, advantages, sampled, {"reward": 0.0}, 0)
        assert batch.inputs.numel() < ids.numel()
    else:
        batch = GroupBatch(ids, labels, advantages, sampled, {"reward": 0.0}, 0)
    ours, metrics, n = recipe.loss(model, batch)
    ours.backward()
    assert n == 4 and metrics["reward"] == 0.0
    if correction:
        assert metrics["sampling/importance_sampling_ratio/max"] <= 3.0
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert_lora_grads_equal(model, trainer.model)


def test_advantages_are_normalised_as_trls():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0])
    grouped = rewards.view(-1, 4)
    expected = (rewards - grouped.mean(1).repeat_interleave(4)) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    assert group_advantages(rewards, 4)[4:].abs().max() == 0  # a group that agrees teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), rewards - grouped.mean(1).repeat_interleave(4))


def test_built_in_rewards():
    [(_, answer), (_, regex), (_, length)] = reward_functions(["answer", "regex", "length"], r"\s*-?\d+", 8)
    assert answer(completions=[" 7.", " it is 7", " 8", "none"], answer=[7, 7, 7, 7]) == [1.0, 1.0, 0.0, 0.0]
    assert regex(completions=[" 12.", "twelve"]) == [1.0, 0.0]
    assert length(completion_ids=[[1] * 6, [1] * 7, [1] * 8]) == [0.0, -0.5, -1.0]


def test_user_reward_functions_are_loaded_by_path():
    [(name, function)] = reward_functions(["test_grpo:constant_reward"], None, 8)
    assert name == "constant_reward" and function(completions=["a"]) == [0.5]
    for bad, message in [
        (["nosuch.module:f"], "cannot load"),
        (["plain"], "unknown reward"),
        (["regex"], "needs reward_regex"),
    ]:
        with pytest.raises(PhikitError, match=message):
            reward_functions(bad, None, 8)
    with pytest.raises(PhikitError, match="method grpo needs reward_funcs"):
        TrainConfig(method="grpo").validate("recipe")
    with pytest.raises(PhikitError, match="one weight per reward"):
        TrainConfig(method="grpo", reward_funcs=["answer"], reward_weights=[1.0, 2.0]).validate("recipe")


def test_reward_functions_are_called_as_trls(tmp_path, monkeypatch):
    """Conversational prompts reach the user's function as TRL gives them (messages; completions as an
    assistant message), built-ins still get texts; NumPy arrays and tensors are returned values too; names are
    unique per metric; a module in the working folder loads (the phikit command's path lacks it)."""
    import numpy as np

    from phikit.train.grpo import PromptExample, score

    seen = {}

    def probe(prompts, completions, completion_ids, trainer_state, answer, **_):
        seen.update(prompts=prompts, completions=completions, step=trainer_state.global_step, answer=answer)
        return np.array([0.25] * len(completions))

    messages = [{"role": "user", "content": "What is 2 plus 2?"}]
    prompts = [PromptExample([1, 2], "rendered", {"answer": 4}, messages)]
    functions = reward_functions(["answer", "answer"], None, 8) + [("probe", probe)]
    assert [n for n, _ in functions] == ["answer", "answer_2", "probe"]
    rewards, means = score(functions, prompts, 2, [" 4", " five"], [[3], [4]], step=7)
    assert seen["prompts"] == [messages, messages] and seen["step"] == 7 and seen["answer"] == [4, 4]
    assert seen["completions"] == [[{"role": "assistant", "content": text}] for text in (" 4", " five")]
    assert rewards.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.25, 0.25]]
    assert means == {"rewards/answer": 0.5, "rewards/answer_2": 0.5, "rewards/probe": 0.25}
    with pytest.raises(PhikitError, match=r"one number per completion \(2\), got 3 values"):
        score([("three", lambda completions, **_: torch.ones(3))], prompts, 2, ["a", "b"], [[1], [2]])
    (tmp_path / "myrewards.py").write_text("def short(completions, **_):\n    return [1.0 for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    [(name, short)] = reward_functions(["myrewards:short"], None, 8)
    assert name == "short" and short(completions=["x"]) == [1.0]


def test_a_reward_needing_a_column_the_data_lacks_fails_before_the_model_loads(tiny, tmp_path, monkeypatch):
    import phikit.api

    monkeypatch.setattr(phikit.api, "load", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?"}) + "\n" for i in range(8)))
    recipe = TrainConfig.from_yaml(
        REPO / "recipes" / "tiny-grpo-cpu.yaml",
        {"model": str(tiny[0]), "output_dir": str(tmp_path / "run"), "data": str(data)},
    )
    with pytest.raises(PhikitError, match=r"reward function answer takes the column\(s\) answer, which 8 of the 8"):
        finetune(recipe, progress=False)


def test_equal_rewards_are_noted_and_each_steps_samples_kept(tiny, tmp_path, capsys):
    """A reward that never tells completions apart: frac_reward_zero_std 1 every step, a note once after
    FLAT_STEPS steps, and each step's first group with its rewards in completions.jsonl; a resume drops
    the lines past its checkpoint."""
    settings = {
        "model": str(tiny[0]),
        "output_dir": str(tmp_path / "run"),
        "data": str(REPO / "recipes/data/arithmetic.jsonl"),
        "reward_funcs": ["test_grpo:constant_reward"],
        "max_steps": 6,
        "num_generations": 2,
        "batch_size": 2,
        "max_completion_length": 4,
        "save_every": 3,
        "eval_every": 1000,
    }
    finetune(TrainConfig.from_yaml(REPO / "recipes" / "tiny-grpo-cpu.yaml", settings), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["frac_reward_zero_std"] for r in rows if "reward" in r] == [1.0] * 6
    assert capsys.readouterr().err.count("every group's completions got equal rewards") == 1
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2, 3, 4, 5, 6]
    assert samples[0]["prompt"].startswith("### Human: ") and samples[0]["rewards"] == [0.5, 0.5]
    assert len(samples[0]["completions"]) == 2
    (tmp_path / "run" / "adapter").rename(tmp_path / "old-adapter")
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    finetune(
        TrainConfig.from_yaml(REPO / "recipes" / "tiny-grpo-cpu.yaml", {**settings, "resume": True}), progress=False
    )
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2, 3, 4, 5, 6]


def test_the_mean_reward_rises_on_the_arithmetic_recipe(tiny, tmp_path):
    """SFT on the tiny instructions (a base that ends its answers), merged, then the GRPO recipe: sampled with
    phikit's batched generation, its mean reward (exact answers + answering with a number) rises."""
    from phikit.api import merge_adapter

    sft = TrainConfig.from_yaml(
        REPO / "recipes" / "tiny-cpu.yaml",
        {
            "model": str(tiny[0]),
            "output_dir": str(tmp_path / "sft"),
            "data": str(REPO / "recipes/data/tiny-instructions.jsonl"),
        },
    )
    base = merge_adapter(tiny[0], finetune(sft, progress=False), tmp_path / "base")
    recipe = TrainConfig.from_yaml(
        REPO / "recipes" / "tiny-grpo-cpu.yaml",
        {"model": str(base), "output_dir": str(tmp_path / "grpo"), "data": str(REPO / "recipes/data/arithmetic.jsonl")},
    )
    finetune(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    rewards = [r["reward"] for r in steps]
    assert len(rewards) == 20 and all("rewards/answer" in r and "completions/mean_length" in r for r in steps)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_sampler_copy_is_the_policy_merged_and_its_logprobs_are_transformers(tiny):
    """The 16-bit copy GRPO samples with holds the policy's weights with the adapter merged (rounded once),
    is rewritten only when the policy has stepped, and the log-probability it reports for each sampled token
    is the one transformers gives the merged policy at that temperature (to the copy's bf16 rounding)."""
    from phikit.lora import merge_lora
    from phikit.quantize import QuantizedLinear
    from phikit.train.grpo import sample_completions
    from phikit.train.sampler import Sampler, quantized, resolve

    model, _ = _policy(tiny)
    assert not quantized(model)
    int8 = copy.deepcopy(model)  # a quantized base (loaded so, or saved so): the policy samples itself
    int8.lm_head = QuantizedLinear.from_weight(int8.lm_head.weight.detach(), int8.lm_head.bias.detach(), "int8")
    assert quantized(int8)
    assert resolve("auto", "fp32", False) == "bf16" and resolve("auto", "bf16", False) == "policy"
    with pytest.raises(PhikitError, match="quantized base"):
        resolve("bf16", "fp32", True)
    sampler = Sampler(model, "bf16", tiny[0], "cpu")
    sampler.refresh(0)
    merged = dict(merge_lora(copy.deepcopy(model)).named_parameters())
    for name, value in sampler.params.items():
        assert value.dtype == torch.bfloat16 or "norm" in name  # the CPU backend keeps norms fp32
        assert torch.equal(value, merged[name].to(value.dtype)), name
    q = "model.layers.0.self_attn.q_proj.weight"
    before = sampler.params[q].clone()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.add_(0.5)
    sampler.refresh(0)  # the same step: nothing rewritten
    assert torch.equal(sampler.params[q], before)
    sampler.refresh(1)
    assert not torch.equal(sampler.params[q], before)

    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    prompts = [tokenizer.encode("### Human: What is 2 plus 2?### Assistant:")] * 3
    logprobs: list[list[float]] = []
    completions = sample_completions(sampler.model, prompts, 6, 0.7, 3, set(), tokenizer.pad_id, logprobs)
    reference = copy.deepcopy(tiny[1])
    loaded = reference.load_state_dict(merge_lora(copy.deepcopy(model)).state_dict(), strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if k.endswith("weight")]
    for prompt, completion, reported in zip(prompts, completions, logprobs):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        assert len(reported) == len(completion) == 6
        torch.testing.assert_close(torch.tensor(reported), expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini"])
def test_the_sampler_copy_of_a_phi3_family_policy(phi3_factory, variant):
    """Fused qkv_proj and gate_up_proj adapters merge into the copy by the same names (Phi-4-mini: grouped
    queries, a tied head), and the copy's logits are the merged policy's to bf16 rounding."""
    from phikit.lora import LoRAConfig, inject_lora, merge_lora
    from phikit.train.sampler import Sampler

    folder, _ = phi3_factory(variant)
    model = phikit.load(folder, dtype="fp32", device="cpu").model
    inject_lora(model, LoRAConfig(4, 8, 0.0, ["qkv_proj", "gate_up_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    sampler = Sampler(model, "bf16", folder, "cpu")
    sampler.refresh(0)
    merged = merge_lora(copy.deepcopy(model))
    for name, value in merged.named_parameters():
        torch.testing.assert_close(sampler.params[name].float(), value.to(sampler.params[name].dtype).float())
    ids = torch.tensor([[5, 17, 42, 7, 9, 3, 250, 11]])
    with torch.no_grad():
        ours, theirs = sampler.model(ids).float(), merged(ids).float()
    base = phikit.load(folder, dtype="fp32", device="cpu").model
    with torch.no_grad():
        unmerged = base(ids).float()  # what a copy that missed the adapter would give
    assert (ours - theirs).abs().mean() < 0.2 * (unmerged - theirs).abs().mean()
