"""Preference tuning: pairs read in TRL's four forms (HH-RLHF's transcripts among them), DPO and ORPO losses
and LoRA gradients equal to TRL's DPOTrainer and ORPOTrainer on the same batch, DPO starting at ln 2, and
runs end to end through the recipe."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

import phikit
from phikit.errors import PhikitError
from phikit.train import TrainConfig, finetune
from phikit.train.losses import sequence_logps
from phikit.train.preference import PairExample, collate_pairs, load_pairs, split_pair

REPO = Path(__file__).resolve().parents[1]
HH = SHARED_DATA / "hh-rlhf-2k"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PAIRS = [
    {"prompt": "### Human: What is 2 plus 2?### Assistant:", "chosen": " 4.", "rejected": " 5, or so."},
    {"prompt": "### Human: Name a colour.### Assistant:", "chosen": " Red.", "rejected": " I will not."},
    {"prompt": "### Human: Say hi.### Assistant:", "chosen": " Hi.", "rejected": " Goodbye then."},
    {"prompt": "### Human: What is 3 plus 1?### Assistant:", "chosen": " 4.", "rejected": " 31."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_four_row_forms_give_the_same_pair(tiny):
    """Text with a prompt, two transcripts sharing it (HH-RLHF's form), and the two message forms; the prompt
    ends where the replies differ, at the last "Assistant:"."""
    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    transcript = {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."}
    assert split_pair(transcript) == ("\n\nHuman: hi\n\nAssistant:", " Hello!", " Go away.")
    user = [{"role": "user", "content": "hi"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}
    implicit = {
        "chosen": user + [{"role": "assistant", "content": "Hello!"}],
        "rejected": user + [{"role": "assistant", "content": "Go away."}],
    }
    assert split_pair(implicit)[0] == user
    from phikit.templates import get_template
    from phikit.train.preference import encode_pair

    template = get_template("guanaco", tokenizer)
    a = encode_pair(*split_pair(explicit), tokenizer, template)
    b = encode_pair(*split_pair(implicit), tokenizer, template)
    assert a == b
    assert tokenizer.decode(a.prompt) == "### Human: hi### Assistant:"
    assert a.chosen[-1] == a.rejected[-1] == tokenizer.eos_id
    for bad, message in [
        ({"chosen": "same", "rejected": "same"}, "do not share a prompt"),
        ({"prompt": "x", "chosen": 3, "rejected": "y"}, "all strings"),
        ({"chosen": user, "rejected": user + user}, "differ in the last one"),
    ]:
        with pytest.raises(ValueError, match=message):
            split_pair(bad)


def test_a_bad_row_names_its_file_and_line(tiny, tmp_path):
    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(PhikitError, match=r"pairs.jsonl:2: .*chosen.*rejected"):
        load_pairs(str(path), tokenizer)
    pairs, skipped, _ = load_pairs(str(path), tokenizer, skip_bad_rows=True)
    assert (len(pairs), skipped) == (1, 1)
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(
        PhikitError,
        match=r"other.jsonl:1: no 'chosen' or 'rejected' field \(its other columns: "
        r"question, good, bad\); .* --columns prompt=question,chosen=good,rejected=bad",
    ):
        load_pairs(str(other), tokenizer)
    assert (
        len(load_pairs(str(other), tokenizer, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})[0])
        == 1
    )


def test_cut_pairs_are_counted_after_the_held_out_ones_are_split_off(tiny, tmp_path, capsys):
    import re

    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 5)
    for seq_len in (16, 12):
        out = tmp_path / f"run{seq_len}"
        finetune(dpo_recipe(tiny[0], out, data, seq_len=seq_len, eval_fraction=0.2, max_steps=1), progress=False)
        said = re.search(
            r"(\d+) of 16 training pair\(s\); (\d+) of 4 held-out were cut to seq_len (\d+) tokens(.*)",
            capsys.readouterr().err,
        )
        cut = load_pairs(str(data), tokenizer, seq_len=seq_len)[2]  # the whole file's
        assert said and int(said[1]) + int(said[2]) == cut and int(said[3]) == seq_len
        assert (said[4] == ": a longer seq_len keeps more of each") == (cut * 4 > 20)


@pytest.mark.skipif(not HH.is_dir(), reason=f"{HH} is absent (the real HH-RLHF pairs live in ../shared)")
def test_hh_rlhf_transcripts_split_as_its_prompt_file(phi2_tokenizer_dir, tmp_path):
    """HH-RLHF's {chosen, rejected} transcripts give, row for row, the pairs of its {prompt, chosen, rejected}
    file (made by the data's PROVENANCE from the same rows: prompt = up to the last "\\n\\nAssistant:")."""
    from phikit.tokenizer import Tokenizer

    tokenizer = Tokenizer(phi2_tokenizer_dir)
    transcripts = [json.loads(line) for line in (HH / "test.jsonl").read_text().splitlines()]
    explicit = [json.loads(line) for line in (HH / "test.prompt.jsonl").read_text().splitlines()]

    def prompt(text):  # the data's own rule
        return text[: text.rfind("\n\nAssistant:") + len("\n\nAssistant:")]

    kept = [t for t in transcripts if prompt(t["chosen"]) == prompt(t["rejected"])]
    ours = load_pairs(str(write_jsonl(tmp_path / "t.jsonl", kept)), tokenizer, seq_len=100_000)[0]
    theirs = load_pairs(str(HH / "test.prompt.jsonl"), tokenizer, seq_len=100_000)[0]
    assert len(ours) == len(theirs) == len(explicit) == 199
    assert ours == theirs
    labels = collate_pairs(ours[:2], tokenizer.pad_id)[1]
    assert (labels[0] != -100).sum() == len(ours[0].chosen)  # only the reply is trained on


def test_long_pairs_keep_the_end_of_the_prompt():
    from phikit.train.preference import fit_pair

    pair = PairExample(list(range(100)), [1] * 30, [2] * 10)
    fitted, cut = fit_pair(pair, 64)
    assert cut and fitted.prompt == list(range(66, 100)) and fitted.chosen == [1] * 30 and fitted.rejected == [2] * 10
    assert fit_pair(PairExample([1], [2], [3]), 64) == (PairExample([1], [2], [3]), False)


# ---- against TRL ----


def _policy(tiny, r=4):
    """phikit's model with a LoRA adapter whose B weights are not zero (so the policy differs from the
    reference), and the same adapter as PEFT's LoraConfig."""
    from peft import LoraConfig

    from phikit.lora import LoRAConfig, inject_lora

    model = phikit.load(tiny[0], dtype="fp32", device="cpu").model
    inject_lora(model, LoRAConfig(r, 2 * r, 0.0, ["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _same_adapter(trainer, model) -> None:
    """The TRL trainer's adapter (made fresh from its peft_config, so its reference is the base with the
    adapter disabled, as phikit's) given phikit's LoRA weights."""
    from peft import set_peft_model_state_dict

    from phikit.lora import lora_state_dict

    state = {k: v.clone() for k, v in lora_state_dict(model).items()}  # PEFT's saved names
    result = set_peft_model_state_dict(trainer.model, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    trainer.model.train()


def _batch(tokenizer, rows):
    pairs = [
        PairExample(
            tokenizer.encode(r["prompt"]),
            tokenizer.encode(r["chosen"]) + [tokenizer.eos_id],
            tokenizer.encode(r["rejected"]) + [tokenizer.eos_id],
        )
        for r in rows
    ]
    ids, labels = collate_pairs(pairs, tokenizer.pad_id)
    lengths = [len(p.prompt) + len(p.chosen) for p in pairs] + [len(p.prompt) + len(p.rejected) for p in pairs]
    attention = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    return pairs, ids, labels, attention


def _recipe(model, **settings):
    from phikit.train.losses import frozen_head
    from phikit.train.preference import PreferenceRecipe

    recipe = PreferenceRecipe(TrainConfig(**settings))
    recipe.model, recipe.head, recipe.amp_dtype, recipe.device = (
        model,
        frozen_head(model.lm_head),
        None,
        torch.device("cpu"),
    )
    recipe.reference = {}
    return recipe


def assert_lora_grads_equal(model, peft_model) -> None:
    """Every LoRA gradient of phikit's model equals the PEFT model's (its default adapter) within 1e-5
    relative, 2e-6 absolute (fp32 sums in another order: pairs laid end to end make other matrix shapes)."""
    ours = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    theirs = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if "lora_" in n and ".default" in n
    }
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name in ours:
        torch.testing.assert_close(
            ours[name], theirs[name], rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_dpo_loss_and_gradients_equal_trls(tiny, tmp_path, loss_type, smoothing):
    """The same batch through TRL's DPOTrainer (PEFT model, reference = adapter disabled) and through phikit's
    DPO recipe: loss, TRL's metrics and every LoRA gradient within 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model, lora = _policy(tiny)
    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    pairs, ids, labels, attention = _batch(tokenizer, PAIRS)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=[loss_type],
        label_smoothing=smoothing,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(PAIRS),
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    data = Dataset.from_list(PAIRS)
    trainer = DPOTrainer(
        copy.deepcopy(tiny[1]), args=args, train_dataset=data, processing_class=hf_tokenizer, peft_config=lora
    )
    _same_adapter(trainer, model)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": (labels != -100).long()}
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    recipe = _recipe(model, method="dpo", beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    recipe.tokenizer = tokenizer
    for batch in (recipe.collate(pairs), (ids, labels, pairs)):  # a pair as one row (its prompt once), and apart
        recipe.reference = {}
        model.zero_grad()
        ours, our_metrics, n = recipe.loss(model, batch)
        ours.backward()
        assert n == len(PAIRS)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert our_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
        assert_lora_grads_equal(model, trainer.model)


def test_orpo_loss_and_gradients_equal_trls(tiny, tmp_path):
    """TRL's ORPOTrainer puts the prompt's tokens in its NLL term; phikit masks the prompt (as the ORPO
    paper and this toolkit's pairs do). With one-token prompts (a first token is never a target) the two
    terms are the same: loss, metrics and LoRA gradients within 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, lora = _policy(tiny)
    tokenizer = phikit.load(tiny[0], dtype="fp32", device="cpu").tokenizer
    rows = [{**r, "prompt": r["prompt"][:1]} for r in PAIRS]
    pairs, ids, labels, attention = _batch(tokenizer, rows)
    assert all(len(p.prompt) == 1 for p in pairs)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    data = Dataset.from_list(rows)
    trainer = ORPOTrainer(
        copy.deepcopy(tiny[1]), args=args, train_dataset=data, processing_class=hf_tokenizer, peft_config=lora
    )
    _same_adapter(trainer, model)
    n = len(pairs)
    batch = {
        "chosen_input_ids": ids[:n],
        "chosen_attention_mask": attention[:n],
        "chosen_labels": labels[:n],
        "rejected_input_ids": ids[n:],
        "rejected_attention_mask": attention[n:],
        "rejected_labels": labels[n:],
    }
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    theirs.backward()

    recipe = _recipe(model, method="orpo", beta=0.1)
    recipe.tokenizer = tokenizer
    for batch in (recipe.collate(pairs), (ids, labels, pairs)):  # a pair as one row (its prompt once), and apart
        model.zero_grad()
        ours, our_metrics, _ = recipe.loss(model, batch)
        ours.backward()
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "log_odds_ratio"):
            assert our_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
        assert_lora_grads_equal(model, trainer.model)


# ---- the recipe end to end ----


def dpo_recipe(tiny_folder, out, data, **overrides):
    return TrainConfig.from_yaml(
        REPO / "recipes" / "tiny-dpo-cpu.yaml",
        {"model": str(tiny_folder), "output_dir": str(out), "data": str(data), **overrides},
    )


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_ln2_and_learns_the_preference(tiny, tmp_path):
    """A fresh adapter makes the policy the reference: the first step's loss is ln 2 and its rewards 0; after
    training, the chosen replies win on the training pairs; the adapter reloads."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    adapter = finetune(dpo_recipe(tiny[0], tmp_path / "run", data, eval_data=str(data)), progress=False)
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # 0 but for fp32 rounding: the policy runs under autograd and the reference without, through kernels that
    # sum in other orders, and each reward is beta x a difference of summed log-probs of hundreds of tokens
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["loss"] < 0.5 * math.log(2)
    evaluated = [r for r in metrics(tmp_path / "run") if "eval_rewards/accuracies" in r]
    assert evaluated[-1]["eval_rewards/accuracies"] == 1.0
    tuned = phikit.load(tiny[0], dtype="fp32", device="cpu", adapter=adapter)  # the saved adapter loads
    base = phikit.load(tiny[0], dtype="fp32", device="cpu")
    ids = torch.tensor([tuned.tokenizer.encode(PAIRS[1]["prompt"])])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids), base.model(ids), atol=1e-4)


def test_orpo_runs_and_the_methods_need_their_data(tiny, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    finetune(dpo_recipe(tiny[0], tmp_path / "orpo", data, method="orpo", max_steps=3), progress=False)
    rows = [r for r in metrics(tmp_path / "orpo") if "loss" in r]
    assert len(rows) == 3 and all("nll_loss" in r and "rewards/accuracies" in r for r in rows)
    with pytest.raises(PhikitError, match="method dpo trains on preference pairs"):
        dpo_recipe(tiny[0], tmp_path / "x", data, data_format="text")
    with pytest.raises(PhikitError, match="method must be one of"):
        dpo_recipe(tiny[0], tmp_path / "x", data, method="ppo")
    with pytest.raises(PhikitError, match="not data_format preference"):
        TrainConfig(method="sft", data_format="preference").validate("recipe")


@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini"])
def test_a_pair_in_one_row_scores_as_its_two_sequences_apart(phi3_factory, variant):
    """Packing pairs (each prompt once, the rejected reply's positions restarting after it, its tokens blind
    to the chosen reply, pairs end to end and blind to each other) gives each reply's summed log-probs of the
    sequences run apart: through a
    sliding window of 16 shorter than the pairs (Phi-3-4k's), and with grouped-query attention and a tied
    head (Phi-4-mini's)."""
    from phikit.train.preference import pack_pairs, packed_logps

    folder, _ = phi3_factory(variant)
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    lengths = [(12, 9, 14), (3, 20, 5), (25, 1, 7)]
    pairs = [PairExample(*(torch.randint(5, 300, (n,)).tolist() for n in sizes)) for sizes in lengths]
    window = phi.model.config.sliding_window
    with torch.no_grad():
        rows = pack_pairs(pairs, phi.tokenizer.pad_id, window, row_tokens=64)
        assert rows.ids.shape[0] == 2  # the first two pairs share a row, the third has its own
        packed, counts = packed_logps(phi.model, rows)
        ids, labels = collate_pairs(pairs, phi.tokenizer.pad_id)
        apart, apart_counts = sequence_logps(phi.model, ids, labels)
    assert counts.tolist() == apart_counts.tolist() == [9, 20, 1, 14, 5, 7]
    torch.testing.assert_close(packed, apart, rtol=1e-5, atol=1e-4)
