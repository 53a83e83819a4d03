"""GRPO's data and its samples: prompts read and checked (file and line), groups of completions sampled with
phikit's own batched generation, scored by the reward functions and turned into training sequences.

Rows: {"prompt": "..." | [messages], ...}: text is used as written, messages are rendered with the recipe's
template and its generation prompt; every other column goes to the reward functions (e.g. "answer").
``GRPORecipe`` is GRPO's fine-tuning recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from phikit.data import apply_columns, prompt_reply_batch, read_rows
from phikit.errors import PhikitError
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer
from phikit.train.losses import group_advantages, grpo_loss, token_logps, unwrap
from phikit.train.packing import Packed, pack_groups, packable, packed_token_logps
from phikit.train.recipe import SFTRecipe


@dataclass
class PromptExample:
    ids: list[int]
    text: str
    columns: dict = field(default_factory=dict)
    messages: list | None = None  # the chat messages the text was rendered from


def load_prompts(
    source: str,
    tokenizer: Tokenizer,
    template: str = "guanaco",
    split: str = "train",
    max_prompt_tokens: int = 512,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[PromptExample], int, int]:
    """(prompts, malformed rows skipped, prompts cut); a prompt longer than ``max_prompt_tokens`` keeps its
    end."""
    chat = get_template(template, tokenizer)
    prompts: list[PromptExample] = []
    skipped = cut = 0
    for where, row in read_rows(source, split):
        try:
            text, extra, messages = _prompt(row, columns, chat)
        except (ValueError, TypeError) as e:
            if skip_bad_rows:
                skipped += 1
                continue
            raise PhikitError(f"{where}: {e} (GRPO prompts); fix the row or set skip_bad_rows") from None
        ids = tokenizer.encode(text)
        cut += len(ids) > max_prompt_tokens
        prompts.append(PromptExample(ids[-max_prompt_tokens:], text, extra, messages))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise PhikitError(f"{source}: no usable prompts ({skipped} malformed)")
    return prompts, skipped, cut


def _prompt(row, columns, chat) -> tuple[str, dict, list | None]:
    """A row's prompt as text, its other columns, and its chat messages (None: the prompt was text)."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "__error__" in row:
        raise ValueError(row["__error__"])
    row = apply_columns(row, columns)
    prompt, messages = row.get("prompt"), None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        prompt, messages = chat.render_messages(prompt, add_generation_prompt=True), prompt
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected a field "prompt": text or a list of chat messages')
    return prompt, {k: v for k, v in row.items() if k != "prompt"}, messages


@torch.no_grad()
def sample_completions(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop_ids,
    pad_id: int,
    logprobs: list[list[float]] | None = None,
) -> list[list[int]]:
    """One sampled completion per prompt (all decoded together), each up to and including its first stop
    token, or ``max_new_tokens`` long; with ``logprobs``, each completion's tokens' log-probabilities under
    the distribution they were drawn from are appended to it (a list per completion). The model decodes in
    eval mode (no dropout) and goes back to its mode."""
    from phikit.generate import GenerationConfig, generate_tokens

    was_training = model.training
    model.eval()
    steps: list[torch.Tensor] | None = [] if logprobs is not None else None
    try:
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for tokens in generate_tokens(model, prompts, config, pad_id, steps):
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = token in stop_ids
            if all(done):
                break
    finally:
        model.train(was_training)
    if logprobs is not None:
        table = torch.stack(steps, dim=1).tolist()  # (rows, steps)
        logprobs.extend(row[: len(c)] for row, c in zip(table, out))
    return out


def score(
    functions, prompts: list[PromptExample], group: int, completions: list[str], ids: list[list[int]], step: int = 0
):
    """(rewards: one row per function, one column per completion, NaN where a function returned None; the
    mean of each function's rewards by name). Functions are called as TRL calls them (``phikit.train.rewards``):
    columns of the data repeated per group; where every prompt was chat messages, the conversational form."""
    from phikit.train.rewards import built_in

    texts = [p.text for p in prompts for _ in range(group)]
    columns = {k for p in prompts for k in p.columns}
    kwargs = {k: [p.columns.get(k) for p in prompts for _ in range(group)] for k in columns}
    state = SimpleNamespace(global_step=step)
    as_texts = {"prompts": texts, "completions": completions}
    as_messages = as_texts
    if all(p.messages is not None for p in prompts):  # TRL's conversational form
        as_messages = {
            "prompts": [p.messages for p in prompts for _ in range(group)],
            "completions": [[{"role": "assistant", "content": text}] for text in completions],
        }
    rows = []
    for name, function in functions:
        form = as_texts if built_in(function) else as_messages
        values = function(**form, completion_ids=ids, trainer_state=state, **kwargs)
        values = values.tolist() if hasattr(values, "tolist") else values  # a NumPy array or a tensor
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise PhikitError(
                f"reward function {name} must return one number per completion ({len(completions)}), got {got}"
            )
        try:
            rows.append([float("nan") if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise PhikitError(f"reward function {name} returned something that is not a number or None") from None
    rewards = torch.tensor(rows, dtype=torch.float32)
    means = {f"rewards/{name}": float(torch.nanmean(rewards[i])) for i, (name, _) in enumerate(functions)}
    return rewards, means


class GRPORecipe(SFTRecipe):
    """GRPO: each micro-batch is ``batch_size`` prompts x ``num_generations`` completions sampled with
    phikit's batched generation from the adapter being trained, scored by the reward functions, with
    advantages normalised within each prompt's group; the step's micro-batches are all sampled before the
    first update (TRL's generation batch). With ``beta`` > 0 the reference is the base with the adapter
    off, as for DPO."""

    unit = "prompts"

    def setup_data(self) -> None:
        from phikit.train.rewards import columns_taken, reward_functions

        config = self.config
        if config.fsdp and self.world > 1:
            raise PhikitError("grpo samples with the inference path, which needs whole weights: run it without fsdp")
        if config.seq_len <= config.max_completion_length:
            raise PhikitError("seq_len must be longer than max_completion_length (a prompt needs room)")
        self.functions = reward_functions(config.reward_funcs, config.reward_regex, config.max_completion_length)
        weights = config.reward_weights or [1.0] * len(self.functions)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        room = config.seq_len - config.max_completion_length

        cut: list[int] = []  # prompts cut to fit, per source read (the training data first)

        def load(source, split, limit):
            args = (config.template, split, room, config.skip_bad_rows, limit, config.columns)
            prompts, skipped, cut_here = load_prompts(source, self.tokenizer, *args)
            cut.append(cut_here)
            return prompts, skipped

        self.train_set, self.eval_set = self.read_data(load)
        if cut[0] and self.main_process:
            print(f"{cut[0]} of {len(self.train_set)} prompt(s) were cut to their last {room} tokens")
        for data, prompts in ((config.data, self.train_set), (config.eval_data or config.data, self.eval_set)):
            for name, function in self.functions:
                taken = columns_taken(function)
                lacking = [p for p in prompts if taken - set(p.columns)]
                if lacking:
                    missing = sorted(taken - set(lacking[0].columns))
                    raise PhikitError(
                        f"reward function {name} takes the column(s) {', '.join(missing)}, which {len(lacking)} of "
                        f"the {len(prompts)} prompts of {data} lack"
                    )
        self.step_tokens = None

    def setup_model(self) -> None:
        from phikit.train.sampler import Sampler, quantized, resolve

        super().setup_model()
        kind = resolve(self.config.sampler, self.dtype, quantized(self.model))
        self.sampler = Sampler(self.model, kind, self.folder, self.device)

    def next_batches(self) -> list:
        batches = super().next_batches()
        self.step_tokens = sum(b.scored for b in batches)
        return batches

    def collate(self, batch: list) -> GroupBatch:
        """Sample the group of every prompt, score it, lay it out for the training forward."""
        config, tokenizer = self.config, self.tokenizer
        group = config.num_generations
        prompts = [p.ids for p in batch for _ in range(group)]
        seed = int(torch.randint(0, 2**62, (1,)))  # from the run's RNG, so a resumed run samples the same
        self.sampler.refresh(self.step)  # the weights of this many optimizer steps
        sampled: list[list[float]] | None = None if self.sampler.exact else []
        completions = sample_completions(
            self.sampler.model,
            prompts,
            config.max_completion_length,
            config.temperature,
            seed,
            tokenizer.stop_ids,
            tokenizer.pad_id,
            sampled,
        )
        texts = [tokenizer.decode([t for t in c if t not in tokenizer.stop_ids]) for c in completions]
        rewards, means = score(self.functions, batch, group, texts, completions, self.step)
        total = torch.nansum(rewards * self.weights[:, None], dim=0)
        advantages = group_advantages(total, group, config.scale_rewards)
        model_config = unwrap(self.model).config
        if packable(model_config, config.seq_len):
            window = getattr(model_config, "sliding_window", None)
            groups = [(p.ids, completions[i * group : (i + 1) * group]) for i, p in enumerate(batch)]
            inputs, labels = pack_groups(groups, tokenizer.pad_id, window).to(self.device), None
        else:
            ids, labels = prompt_reply_batch(prompts, completions, tokenizer.pad_id)
            inputs, labels = ids.to(self.device), labels.to(self.device)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        ended = sum(bool(c) and c[-1] in tokenizer.stop_ids for c in completions) / len(completions)
        flat = float((total.view(-1, group).std(dim=1).nan_to_num(0.0) == 0).float().mean())
        self.watch_samples(batch[0].text, texts[:group], total[:group].tolist(), flat)
        metrics = {
            "reward": float(total.mean()),
            "reward_std": float(total.view(-1, group).std(dim=1).mean()),
            "frac_reward_zero_std": flat,  # TRL's name: groups whose completions all scored the same
            **means,
            "completions/mean_length": float(lengths.mean()),
            "completions/ended": ended,
        }
        if sampled is not None:
            sampled = torch.tensor([v for row in sampled for v in row], dtype=torch.float32, device=self.device)
        return GroupBatch(inputs, labels, advantages.to(self.device), sampled, metrics, sum(map(len, completions)))

    def tokens(self, batch: GroupBatch) -> int:
        return batch.inputs.numel()

    FLAT_STEPS = 5  # optimizer steps of equal rewards in every group before the note

    def watch_samples(self, prompt: str, texts: list[str], rewards: list[float], flat: float) -> None:
        """A step's first group into output_dir/completions.jsonl (what the rewards were given, to check reward
        functions against; a resumed run first drops the lines past its checkpoint), and a note once when no
        group's rewards have differed for FLAT_STEPS steps: then every advantage is 0 and nothing is learnt."""
        import json

        if not self.main_process or not self.model.training:  # held-out groups (evaluate) are not watched
            return
        step = self.step + 1  # the optimizer step being sampled for
        path = self.out / "completions.jsonl"
        if getattr(self, "sampled_step", None) is None and self.config.resume and path.is_file():
            from phikit.train.state import keep_lines_up_to

            keep_lines_up_to(path, self.step)
        if getattr(self, "sampled_step", None) != step:
            self.sampled_step = step
            row = {"step": step, "prompt": prompt, "completions": texts, "rewards": rewards}
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.flat_batches = getattr(self, "flat_batches", 0) + 1 if flat == 1.0 else 0
        if self.flat_batches == self.FLAT_STEPS * self.config.grad_accum and not getattr(self, "flat_noted", False):
            self.flat_noted = True
            self.bar.write(
                file=sys.stderr,
                s=f"phikit: note: for {self.FLAT_STEPS} steps every group's completions got equal rewards "
                "(frac_reward_zero_std 1): the advantages are 0 and GRPO learns nothing; see what the reward "
                f"functions were given in {path}",
            )

    def logps(self, model, batch: GroupBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch.inputs, Packed):
            return packed_token_logps(model, batch.inputs, self.head, self.config.temperature)
        return token_logps(model, batch.inputs, batch.labels, self.head, self.config.temperature)

    def loss(self, model, batch: GroupBatch) -> tuple[torch.Tensor, dict, int]:
        from phikit.lora import adapters_disabled

        config = self.config
        logps, sequence = self.logps(model, batch)
        reference = None
        if config.beta:
            with torch.no_grad(), adapters_disabled(self.model):
                reference, _ = self.logps(self.model, batch)
        training = model.training and self.step_tokens
        loss, extra = grpo_loss(
            logps,
            sequence,
            batch.advantages,
            config.epsilon,
            config.loss_type,
            config.beta,
            reference,
            config.max_completion_length,
            self.step_tokens / config.grad_accum if training else len(logps),
            batch.sampled,
            config.importance_sampling,
            config.importance_sampling_max,
        )
        return loss, {**batch.metrics, **extra}, len(batch.advantages)


@dataclass
class GroupBatch:
    """A micro-batch of GRPO: the groups laid out for the training forward (``Packed``, or right-padded
    ``inputs`` ids with ``labels``), each completion's advantage, each scored token's log-probability under
    the sampler (None: sampled by the policy itself), the sampling's metrics and the scored token count."""

    inputs: Packed | torch.Tensor
    labels: torch.Tensor | None
    advantages: torch.Tensor
    sampled: torch.Tensor | None
    metrics: dict
    scored: int
