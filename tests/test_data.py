"""Fine-tuning data: formats, EOS and padding labels, response-only masking, packing, malformed rows."""

import json

import pytest

from phikit.data import (
    IGNORE,
    collate,
    epoch_batches,
    load_examples,
    pack_examples,
    read_rows,
    render,
    split_turns,
)
from phikit.errors import PhikitError
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_guanaco_text_splits_into_turns():
    text = "### Human: Hi there### Assistant: Hello! How can I help?### Human: Bye### Assistant: Goodbye."
    segments = split_turns(text, get_template("guanaco"))
    assert "".join(s for s, _ in segments) == text
    assert [s for s, reply in segments if reply] == [" Hello! How can I help?", " Goodbye."]


def test_every_example_ends_with_a_labelled_eos_and_responses_only_masks_prompts(tok, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "### Human: 2+2?### Assistant: 4."}])
    full, _ = load_examples(str(data), tok, "text", "guanaco")
    masked, _ = load_examples(str(data), tok, "text", "guanaco", responses_only=True)
    for e in (full[0], masked[0]):
        assert e.ids[-1] == tok.eos_id and e.labels[-1] == tok.eos_id
    assert full[0].labels == full[0].ids
    trained = [t for t in masked[0].labels if t != IGNORE]
    assert tok.decode(trained) == " 4.<|endoftext|>"
    assert tok.decode(masked[0].ids) == "### Human: 2+2?### Assistant: 4.<|endoftext|>"


def test_alpaca_and_messages_formats(tok):
    instruct = get_template("instruct")
    alpaca = render({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca", instruct)
    assert "".join(s for s, _ in alpaca) == "Instruct: Add\n2 and 3\nOutput: 5"
    chat = render(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"},
            ]
        },
        "messages",
        get_template("guanaco"),
    )
    expected = "### Human: Be brief.\nHi### Assistant: Hello### Human: Bye### Assistant: Bye!"
    assert "".join(s for s, _ in chat) == expected
    assert [s for s, reply in chat if reply] == [" Hello", " Bye!"]


def test_padding_is_masked_but_the_real_eos_is_not(tok, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "a much longer example text here"}])
    examples, _ = load_examples(str(data), tok, "text", "raw")
    ids, labels = collate(examples, tok.pad_id)
    short = len(examples[0].ids)
    assert labels[0, short - 1] == tok.eos_id  # its own EOS is trained on
    assert (ids[0, short:] == tok.pad_id).all() and (labels[0, short:] == IGNORE).all()


def test_packing_fills_sequences_and_keeps_labels_aligned(tok, tmp_path):
    rows = [{"text": f"### Human: question {i}### Assistant: answer {i}"} for i in range(20)]
    examples, _ = load_examples(
        str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "text", "guanaco", responses_only=True
    )
    packed = pack_examples(examples, 32, tok.pad_id)
    assert all(len(p.ids) == 32 == len(p.labels) for p in packed)
    flat = [t for p in packed for t in p.ids]
    total = sum(len(e.ids) for e in examples)
    assert flat[:total] == [t for e in examples for t in e.ids]
    assert sum(t == tok.eos_id for t in flat[:total]) == 20


def test_malformed_rows_name_file_and_line_or_are_counted(tok, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, "{broken json", {"txt": "wrong field"}, {"text": "ok"}])
    with pytest.raises(PhikitError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(str(data), tok, "text", "raw")
    examples, skipped = load_examples(str(data), tok, "text", "raw", skip_bad_rows=True)
    assert (len(examples), skipped) == (2, 2)
    bad = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}])
    with pytest.raises(PhikitError, match=r"a\.jsonl:1: expected string fields"):
        load_examples(str(bad), tok, "alpaca", "instruct")
    with pytest.raises(PhikitError, match="data file not found"):
        list(read_rows(str(tmp_path / "missing.jsonl")))


def test_json_and_parquet_files(tok, tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [r for _, r in read_rows(str(tmp_path / "d.json"))] == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    examples, _ = load_examples(str(tmp_path / "d.parquet"), tok, "text", "raw")
    assert [tok.decode(e.ids) for e in examples] == ["one<|endoftext|>", "two<|endoftext|>"]


def test_gzipped_json_and_jsonl_files_read_as_the_plain_ones(tok, tmp_path):
    import gzip

    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Add", "input": "1+1", "output": "2"},
    ]
    gzip_json = tmp_path / "alpaca.json.gz"
    gzip_json.write_bytes(gzip.compress(json.dumps(rows).encode()))
    gzip_jsonl = tmp_path / "alpaca.jsonl.gz"
    gzip_jsonl.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert [r for _, r in read_rows(str(gzip_json))] == rows
    assert [r for _, r in read_rows(str(gzip_jsonl))] == rows
    plain = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    expected = [e.ids for e in load_examples(str(plain), tok, "alpaca", "instruct")[0]]
    assert [e.ids for e in load_examples(str(gzip_json), tok, "alpaca", "instruct")[0]] == expected
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    with pytest.raises(PhikitError, match=r"broken\.json\.gz: not a readable gzip file"):
        list(read_rows(str(tmp_path / "broken.json.gz")))
    with pytest.raises(PhikitError, match="data file not found"):
        list(read_rows(str(tmp_path / "missing.json.gz")))


def test_a_packed_sequence_without_reply_tokens_has_zero_loss_not_nan(tiny, tok, tmp_path):
    """With responses_only, a long user turn can fill a packed sequence: its loss must not be NaN (the loop
    stops on NaN), and a batch with replies keeps PyTorch's mean cross-entropy over them."""
    import torch
    import torch.nn.functional as F

    import phikit
    from phikit.train import causal_lm_loss

    long_question = "why " * 40
    rows = [
        {"text": f"### Human: {long_question}### Assistant: Because."},
        {"text": "### Human: Hi### Assistant: Hello."},
    ]
    examples, _ = load_examples(
        str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "text", "guanaco", responses_only=True
    )
    packed = pack_examples(examples, 16, tok.pad_id)
    assert all(label == IGNORE for label in packed[0].labels)  # all prompt
    model = phikit.load(tiny[0], dtype="fp32", device="cpu").model
    ids, labels = collate(packed[:1], tok.pad_id)
    loss, count = causal_lm_loss(model, ids, labels)
    assert (loss.item(), count) == (0.0, 0)
    ids, labels = collate(packed, tok.pad_id)
    loss, count = causal_lm_loss(model, ids, labels)
    with torch.no_grad():
        logits = model(ids)[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert count == int((labels[:, 1:] != IGNORE).sum()) > 0
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_epoch_order_is_reproducible_and_ranks_split_it(tok, tmp_path):
    rows = [{"text": f"row {i}"} for i in range(10)]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "text", "raw")
    a = epoch_batches(examples, 2, seed=1, epoch=3)
    assert [e.ids for b in a for e in b] == [e.ids for b in epoch_batches(examples, 2, seed=1, epoch=3) for e in b]
    r0, r1 = epoch_batches(examples, 2, 1, 3, rank=0, world=2), epoch_batches(examples, 2, 1, 3, rank=1, world=2)
    assert len(r0) == len(r1) == 2 and r0 + r1 != a[:4]


def test_invalid_utf8_and_lone_surrogates_name_file_and_line(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "ok"}\n'
    )
    with pytest.raises(PhikitError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_examples(str(path), tok, "text", "raw")
    path.write_bytes(b'{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
    with pytest.raises(PhikitError, match=r"d\.jsonl:2: contains an unpaired surrogate"):
        load_examples(str(path), tok, "text", "raw")
    path.write_bytes(
        b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "ok"}\n'
    )
    examples, skipped = load_examples(str(path), tok, "text", "raw", skip_bad_rows=True)
    assert (len(examples), skipped) == (2, 2)


# ---- the formats people have (issue 22) ----

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


def trained_text(tok, example) -> str:
    return tok.decode([i for i, label in zip(example.ids, example.labels) if label != IGNORE])


def test_a_datasets_save_to_disk_folder_reads_like_the_file(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "Add 2 and 2", "input": "", "output": "4"}, {"instruction": "Say hi", "output": "hi"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    from_file, _ = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "alpaca", "instruct")
    for folder in ("ds", "dd"):
        from_disk, _ = load_examples(str(tmp_path / folder), tok, "alpaca", "instruct")
        assert [e.ids for e in from_disk] == [e.ids for e in from_file]
    with pytest.raises(PhikitError, match="no split 'test'"):
        list(read_rows(str(tmp_path / "dd"), "test"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(PhikitError, match="not one written by datasets' save_to_disk"):
        list(read_rows(str(tmp_path / "plain")))


def test_sharegpt_conversations_are_chat_messages(tok, tmp_path):
    share = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CHAT
    ]
    a, _ = load_examples(str(write_jsonl(tmp_path / "s.jsonl", [{"conversations": share}])), tok, "sharegpt", "guanaco")
    b, _ = load_examples(str(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])), tok, "messages", "guanaco")
    assert a[0].ids == b[0].ids and a[0].labels == b[0].labels
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(PhikitError, match=r"bad.jsonl:1: .*from"):
        load_examples(str(bad), tok, "sharegpt", "guanaco")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_tables_with_prompt_completion_or_mapped_columns(tok, tmp_path, suffix):
    rows = [{"question": "Capital of France?", "answer": " Paris."}, {"question": "2+2?", "answer": " 4"}]
    path = tmp_path / f"t{suffix}"
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text(
            "question" + sep + "answer\n" + "".join(f'"{r["question"]}"{sep}"{r["answer"]}"\n' for r in rows)
        )
    columns = {"prompt": "question", "completion": "answer"}
    got, _ = load_examples(str(path), tok, "prompt_completion", "raw", responses_only=True, columns=columns)
    assert [trained_text(tok, e) for e in got] == [" Paris.<|endoftext|>", " 4<|endoftext|>"]
    with pytest.raises(PhikitError, match='"prompt" and "completion"'):
        load_examples(str(path), tok, "prompt_completion", "raw")


def test_a_csv_row_of_the_wrong_width_names_its_line(tok, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(PhikitError, match=r"t.csv:3: 3 columns where the header names 2"):
        load_examples(str(path), tok, "prompt_completion", "raw")


def test_an_assistant_turn_of_weight_0_is_not_trained_on(tok, tmp_path):
    weighted = [dict(m) for m in CHAT]
    weighted[2]["weight"] = 0
    examples, _ = load_examples(
        str(write_jsonl(tmp_path / "w.jsonl", [{"messages": weighted}])),
        tok,
        "messages",
        "guanaco",
        responses_only=True,
    )
    text = trained_text(tok, examples[0])
    assert "6." in text and "4." not in text
    bad = [dict(m) for m in CHAT]
    bad[4]["weight"] = 0.5
    with pytest.raises(PhikitError, match='"weight" is 0'):
        load_examples(str(write_jsonl(tmp_path / "b.jsonl", [{"messages": bad}])), tok, "messages", "guanaco")


def test_gzip_data_is_read_as_a_stream_with_a_size_limit(tok, tmp_path, monkeypatch):
    import gzip

    from phikit import data

    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(
        gzip.compress(("\n".join(json.dumps({"text": f"row {i} " + "x" * 100}) for i in range(300)) + "\n").encode())
    )
    assert len(load_examples(str(path), tok, "text", "raw")[0]) == 300
    monkeypatch.setattr(data, "MAX_DECOMPRESSED_BYTES", 10_000)
    with pytest.raises(PhikitError, match="decompresses to more than"):
        load_examples(str(path), tok, "text", "raw")
