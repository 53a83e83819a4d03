"""Fine-tuning data: read rows, render them to (prompt, response) text, tokenize, pack.

Files: .jsonl, .json (a list of rows), .parquet, each of the first two also gzipped (.jsonl.gz, .json.gz),
or a Hugging Face Hub dataset. Formats of a row:
  text      {"text": "### Human: ...### Assistant: ..."}  (guanaco; turns split on the template's markers)
  alpaca    {"instruction": ..., "input": ... (optional), "output": ...}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
Rows are written with a prompt template: a format template (guanaco, instruct, ...) or, with ``template:
chat``, the checkpoint's own chat template (Phi-3, Phi-4), whose replies end with its turn-end token
(``<|end|>``), trained on with the reply. Every example ends with the EOS (``<|endoftext|>``) so the model
learns to stop. Padding is also EOS but is masked out of the loss, while each example's real EOS keeps its
label. With ``responses_only`` the loss covers only what the assistant says (and its EOS).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from phikit.errors import PhikitError
from phikit.templates import ChatTemplate, Template, get_template
from phikit.tokenizer import Tokenizer

IGNORE = -100
FORMATS = {  # each data format and the fields it reads (what ``columns`` may map a data's column to)
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


MAX_DECOMPRESSED_BYTES = 16 << 30  # a .gz data file may decompress to at most this much (a zip bomb stops here)


class _Limited(io.RawIOBase):
    """A decompressing stream that refuses to give more than ``limit`` bytes, naming the file."""

    def __init__(self, stream: BinaryIO, path: Path, limit: int):
        self.stream, self.path, self.limit, self.read_so_far = stream, path, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self.stream.readinto(buffer)
        except (OSError, EOFError, zlib.error) as e:
            raise PhikitError(f"{self.path}: not a readable gzip file ({e})") from None
        self.read_so_far += n
        if self.read_so_far > self.limit:
            raise PhikitError(f"{self.path}: decompresses to more than {self.limit / 2**30:g} GiB; not reading it")
        return n

    def close(self) -> None:
        self.stream.close()
        super().close()


def _open_bytes(path: Path) -> BinaryIO:
    """The file for reading bytes; a .gz file decompressed as it is read (datasets such as alpaca_data.json.gz
    ship so), up to ``MAX_DECOMPRESSED_BYTES``."""
    if path.suffix != ".gz":
        return path.open("rb")
    return io.BufferedReader(_Limited(gzip.open(path, "rb"), path, MAX_DECOMPRESSED_BYTES), 1 << 20)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of splits)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a local .jsonl/.json/.csv/.tsv/.parquet file (.jsonl.gz, .json.gz,
    .csv.gz, .tsv.gz too), a folder written by ``datasets``' ``save_to_disk`` or a Hugging Face Hub dataset;
    ``where`` is "file:line" (or "dataset[split]:index") for error messages."""
    path = Path(source).expanduser()
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise PhikitError(
                f"{path} is a folder but not one written by datasets' save_to_disk; give a data file "
                "(.jsonl, .json, .csv, .tsv, .parquet) or that folder"
            )
        yield from _dataset_rows(source, split, path)
        return
    if suffix in (".csv", ".tsv"):
        if not path.is_file():
            raise PhikitError(f"{path}: data file not found")
        yield from _delimited_rows(path, "\t" if suffix == ".tsv" else ",")
        return
    if suffix == ".jsonl" or (path.exists() and suffix not in (".json", ".parquet")):
        if not path.is_file():
            raise PhikitError(f"{path}: data file not found")
        with _open_bytes(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"{path}:{number}", {"__error__": f"not valid UTF-8 (byte {e.start})"}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{number}", {"__error__": f"not valid JSON ({e.msg})"}
                    continue
                yield f"{path}:{number}", row
        return
    if suffix == ".json":
        if not path.is_file():
            raise PhikitError(f"{path}: data file not found")
        try:
            with _open_bytes(path) as f:
                rows = json.loads(f.read().decode("utf-8"))
        except json.JSONDecodeError as e:
            raise PhikitError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise PhikitError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get(split))
        if not isinstance(rows, list):
            raise PhikitError(f'{path}: expected a JSON list of rows (or {{"data": [...]}})')
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
        return
    if path.suffix == ".parquet" and not path.is_file():
        raise PhikitError(f"{path}: data file not found")
    yield from _dataset_rows(source, split, path if path.suffix == ".parquet" else None)


def _delimited_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV/TSV file with a header line, as {column: text}; a row of the wrong width names its line."""
    import csv

    with _open_bytes(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise PhikitError(f"{path}: empty; a CSV/TSV data file starts with a header line naming its columns")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield where, {"__error__": f"{len(row)} columns where the header names {len(header)}"}
                    continue
                yield where, dict(zip(header, row))
        except UnicodeDecodeError as e:
            raise PhikitError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        except csv.Error as e:
            raise PhikitError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _dataset_rows(source: str, split: str, local: Path | None) -> Iterator[tuple[str, dict]]:
    """Rows through ``datasets``: a save_to_disk folder, a Parquet file or a Hub dataset id."""
    try:
        import datasets
    except ImportError:
        raise PhikitError(f"reading {source} needs the 'datasets' package: pip install datasets") from None
    try:
        if local is not None and local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PhikitError(f"{local}: no split {split!r} (it has {', '.join(ds)}); set split")
                ds = ds[split]
        elif local is not None:
            ds = datasets.load_dataset("parquet", data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except PhikitError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "cannot get it"
        raise PhikitError(
            f"cannot load dataset {source!r} split {split!r} ({str(e).splitlines()[0][:200]}); "
            "for offline use pass a local .jsonl/.json/.csv/.parquet file or a save_to_disk folder"
        ) from None
    for i, row in enumerate(ds):
        yield f"{source}[{split}]:{i}", row


def _check_unicode(value) -> None:
    """Every string in a row must be valid Unicode: JSON can spell a lone surrogate ("\\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start : e.end].encode("unicode_escape").decode()
            raise ValueError(f"contains an unpaired surrogate ({bad})") from None
    elif isinstance(value, dict):
        for v in value.values():
            _check_unicode(v)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v)


def render(row: dict, fmt: str, template: Template | ChatTemplate) -> list[tuple[str, bool]]:
    """A row as text segments, each flagged True when it is the model's reply (trained on)."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "__error__" in row:
        raise ValueError(row["__error__"])
    _check_unicode(row)
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError('expected a non-empty string field "text"')
        if isinstance(template, ChatTemplate):  # no turn markers to split on: plain text, all trained on
            return [(text, True)]
        return split_turns(text, template)
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError('expected string fields "instruction" and "output"')
        extra = row.get("input") or ""
        prompt = instruction + (f"\n{extra}" if extra else "")
        if isinstance(template, ChatTemplate):  # an instruction is a user turn, its output the reply
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}]
            return template.conversation_segments(turns)
        return [(template.render(prompt), False), (" " + output.strip(), True)]
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('expected string fields "prompt" and "completion"')
        if isinstance(template, ChatTemplate):
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return template.conversation_segments(turns)
        return [(template.render(prompt), False), (completion, True)]
    if fmt == "sharegpt":
        return template.conversation_segments(_sharegpt_messages(row.get("conversations")))
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError('expected a non-empty list field "messages"')
        return template.conversation_segments(messages)
    raise PhikitError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_messages(conversation) -> list[dict]:
    """ShareGPT's {"from": "human" | "gpt" | "system", "value": ...} turns (Axolotl's and Unsloth's format; also
    {"role", "content"}) as chat messages."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError('expected a non-empty list field "conversations"')
    messages = []
    for turn in conversation:
        if not isinstance(turn, dict):
            raise ValueError('each turn of "conversations" must be an object with "from" and "value"')
        speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if speaker not in SHAREGPT_ROLES or not isinstance(text, str):
            raise ValueError(
                f'each turn needs "from" (human, gpt or system) and a string "value"; got from {speaker!r}'
            )
        message = {"role": SHAREGPT_ROLES[speaker], "content": text}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    return messages


def apply_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """A row with its columns renamed to the names the format reads: ``columns`` maps the format's field
    (prompt, completion, instruction, input, output, text, messages, conversations) to the data's column."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for field, column in columns.items():
        if column in row:
            renamed[field] = row[column]
    return renamed


def check_columns(source: str, split: str, columns: dict[str, str] | None, fields=None, rows: int = 1000) -> None:
    """``columns`` (field -> the data's column) names only ``fields`` (where given: the format's) and columns
    that some row among the first ``rows`` of the data has: a misspelt or absent column is a one-line error
    before anything trains, not a mapping that renames nothing (or a missing field, rows later)."""
    if not columns:
        return
    if fields is not None and set(columns) - set(fields):
        unknown = ", ".join(sorted(set(columns) - set(fields)))
        raise PhikitError(f"columns: {unknown}: not a field of this format (it reads {', '.join(fields)})")
    wanted, seen, names = set(columns.values()), set(), []
    for i, (_, row) in enumerate(read_rows(source, split)):
        if isinstance(row, dict) and "__error__" not in row:
            seen |= row.keys() & wanted
            names += [k for k in row if k not in names]
        if wanted <= seen or i + 1 >= rows:
            break
    missing = [f"{field}={column}" for field, column in columns.items() if column not in seen]
    if missing:
        raise PhikitError(
            f"columns {', '.join(missing)}: no such column in {source}"
            + (f" (its rows have {', '.join(names[:12])})" if names else "")
        )


def split_turns(text: str, template: Template) -> list[tuple[str, bool]]:
    """Split guanaco-style text into user parts and assistant replies using the template's markers:
    the text after each assistant marker (up to the next user marker) is a reply."""
    user_marker, _, assistant_marker = template.prompt.partition("{prompt}")
    user_marker, assistant_marker = user_marker.strip(), assistant_marker.strip()
    if not assistant_marker or assistant_marker not in text:
        return [(text, True)]  # plain text: all of it is trained on
    segments: list[tuple[str, bool]] = []
    rest = text
    while rest:
        cut = rest.find(assistant_marker)
        if cut < 0:
            segments.append((rest, False))
            break
        segments.append((rest[: cut + len(assistant_marker)], False))
        rest = rest[cut + len(assistant_marker) :]
        end = rest.find(user_marker) if user_marker else -1
        reply, rest = (rest, "") if end < 0 else (rest[:end], rest[end:])
        segments.append((reply, True))
    return segments


def encode(segments: list[tuple[str, bool]], tokenizer: Tokenizer, responses_only: bool) -> Example:
    """Token ids with the EOS appended (unless the text already ends with it: a chat template's own, which
    is then trained on with the last reply), and labels (IGNORE where not trained on)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_reply in segments:
        part = tokenizer.encode(text)
        ids += part
        labels += part if (is_reply or not responses_only) else [IGNORE] * len(part)
    if ids and ids[-1] == tokenizer.eos_id:
        return Example(ids, labels)
    trained = not responses_only or (bool(segments) and segments[-1][1])  # after a reply left out: not trained
    return Example(ids + [tokenizer.eos_id], labels + [tokenizer.eos_id if trained else IGNORE])


def rendered_rows(
    source: str,
    fmt: str = "text",
    template: str | Template | ChatTemplate = "guanaco",
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int | None = None,
    skipped: list[str] | None = None,
    tokenizer: Tokenizer | None = None,
    columns: dict[str, str] | None = None,
) -> Iterator[tuple[str, dict, list]]:
    """(where, row, segments) of each usable row of a data source in order, up to ``limit`` rows: the rows
    fine-tuning trains on (and holds out from). A malformed row raises a PhikitError naming file and line,
    unless ``skip_bad_rows``; then its ``where`` is appended to ``skipped``. ``tokenizer``: where the
    template is ``chat`` (the checkpoint's chat template)."""
    if fmt not in FORMATS:
        raise PhikitError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    template = get_template(template, tokenizer)
    used = 0
    for where, row in read_rows(source, split):
        try:
            segments = render(apply_columns(row, columns), fmt, template)
        except ValueError as e:
            if skip_bad_rows:
                if skipped is not None:
                    skipped.append(where)
                continue
            raise PhikitError(f"{where}: {e} (format {fmt}); fix the row or set skip_bad_rows") from None
        yield where, row, segments
        used += 1
        if limit and used >= limit:
            return


def load_examples(
    source: str,
    tokenizer: Tokenizer,
    fmt: str = "text",
    template: str | Template = "guanaco",
    split: str = "train",
    responses_only: bool = False,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[Example], int]:
    """Tokenized examples of a data source (``rendered_rows``) and the number of malformed rows skipped."""
    skipped: list[str] = []
    rows = rendered_rows(source, fmt, template, split, skip_bad_rows, limit, skipped, tokenizer, columns)
    examples = [encode(segments, tokenizer, responses_only) for _, _, segments in rows]
    if not examples:
        raise PhikitError(f"{source}: no usable rows ({len(skipped)} malformed)")
    return examples, len(skipped)


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> list[Example]:
    """Concatenate examples (each already ending with EOS) into sequences of exactly ``seq_len``;
    the last, shorter one is padded (padding masked out of the loss)."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.ids
        labels += e.labels
    packed = [Example(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    last = packed[-1]
    if len(last.ids) < seq_len:
        short = seq_len - len(last.ids)
        packed[-1] = Example(last.ids + [pad_id] * short, last.labels + [IGNORE] * short)
    return packed


def truncate_examples(examples: list[Example], seq_len: int) -> list[Example]:
    return [Example(e.ids[:seq_len], e.labels[:seq_len]) for e in examples]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch with EOS; padding gets IGNORE labels, real EOS tokens keep theirs."""
    longest = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def prompt_reply_batch(prompts: list[list[int]], replies: list[list[int]], pad_id: int):
    """(ids, labels) of prompt + reply rows (``collate``'s right padding): labels on the replies only, as
    preference pairs and GRPO's completions are trained."""
    return collate([Example(p + r, [IGNORE] * len(p) + r) for p, r in zip(prompts, replies)], pad_id)


def epoch_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[Example]]:
    """This rank's batches of one epoch, shuffled by (seed, epoch) so a resumed run sees the same order."""
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    batches = [[examples[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    usable = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:usable:world]


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (deterministically) for evaluation."""
    if not 0 < fraction < 1:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
