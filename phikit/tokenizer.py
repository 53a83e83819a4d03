"""Tokenizer from a checkpoint folder, through the ``tokenizers`` library, plus streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from phikit.errors import PhikitError

EOS_TEXT = "<|endoftext|>"


TURN_END_TEXTS = ("<|end|>", "<|im_end|>")  # the chat turn's end of Phi-3/3.5/4-mini, and of Phi-4


class Tokenizer:
    """A checkpoint's tokenizer through the ``tokenizers`` library: Phi-2's byte-level BPE (GPT-2/CodeGen
    vocabulary), Phi-3's SentencePiece BPE (Llama-2's, in tokenizer.json), Phi-4-mini's o200k, Phi-4's BPE.

    Reads ``tokenizer.json``; falls back to ``vocab.json`` + ``merges.txt`` (plus ``added_tokens.json``).
    Encoding adds no BOS, as transformers' tokenizers for Phi do not. ``eos_id``: tokenizer_config.json's
    ``eos_token`` (else ``<|endoftext|>``), appended to training examples and used as padding. ``stop_ids``:
    every id that ends a reply: the EOS, config.json's and generation_config.json's ``eos_token_id`` (one or
    a list) and the chat turn's end (``<|end|>``). ``chat_template``: the checkpoint's Jinja template, if any.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        self.folder = folder
        path = folder / "tokenizer.json"
        try:
            if path.is_file():
                self._tok = HFTokenizer.from_file(str(path))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                self._tok = _from_vocab_merges(folder)
            else:
                raise PhikitError(
                    f"{folder}: no tokenizer found (expected tokenizer.json, or vocab.json and merges.txt)"
                )
        except PhikitError:
            raise
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
            raise PhikitError(f"{folder}: cannot read the tokenizer ({e})") from None
        settings = _read_json_object(folder / "tokenizer_config.json")
        self.special_tokens = {
            key: _token_text(settings[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_text(settings.get(key)) is not None
        }
        self.eos_text = self.special_tokens.get("eos_token", EOS_TEXT)
        eos = self._tok.token_to_id(self.eos_text)
        if eos is None:
            self.eos_text, eos = EOS_TEXT, self._tok.token_to_id(EOS_TEXT)
        if eos is None:
            raise PhikitError(f"{folder}: tokenizer has no {EOS_TEXT} token (nor an eos_token); not a Phi tokenizer")
        self.eos_id: int = eos
        self.pad_id: int = eos  # generation and training pad with EOS (masked out of attention and loss)
        bos = self._tok.token_to_id(self.special_tokens.get("bos_token", self.eos_text))
        self.bos_id: int = eos if bos is None else bos  # never added to prompts; lm-eval's prefix token
        stops = {eos, *_eos_ids(folder / "config.json"), *_eos_ids(folder / "generation_config.json")}
        stops.update(i for i in map(self._tok.token_to_id, TURN_END_TEXTS) if i is not None)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.chat_template: str | None = _chat_template(folder, settings)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, also when it is part of a UTF-8 character (decoding it alone would
        give U+FFFD): byte-level BPE's tokens map back through GPT-2's byte alphabet, SentencePiece's byte
        fallback pieces ``<0xE2>`` are that byte and its "▁" a space; added tokens are their text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._tok.get_added_tokens_decoder():
            return piece.encode("utf-8")
        if self._byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _byte_level(self) -> bool:
        return type(self._tok.decoder).__name__ == "ByteLevel"


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte alphabet for byte-level BPE, inverted: printable bytes stand for themselves, the others
    for the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


_UNICODE_TO_BYTE = _bytes_to_unicode()


def _read_json_object(path: Path) -> dict:
    """A JSON object file, or {} where it is absent; a malformed one names itself."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PhikitError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(path: Path) -> list[int]:
    """``eos_token_id`` of a config file: one id or a list (Phi-3's generation_config lists three)."""
    value = _read_json_object(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _chat_template(folder: Path, settings: dict) -> str | None:
    """The checkpoint's chat template: chat_template.jinja (transformers 5), else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: the one named "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


class StreamDecoder:
    """Turns token ids, fed one at a time, into text pieces that never split a UTF-8 character.

    Byte-level BPE may put half of a multi-byte character in one token; decoding that alone gives U+FFFD.
    We decode a short window of recent tokens and hold text back while it ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoding from here gives the context that spaces depend on
        self.read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (a trailing incomplete character comes out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def _from_vocab_merges(folder: Path):
    """The byte-level BPE tokenizer that ``tokenizer.json`` holds, built from the slow-tokenizer files.

    Added tokens get the flags transformers gives the entries of ``added_tokens.json``: ``<|endoftext|>`` (Phi's
    bos/eos/unk) special and not normalized, the rest (Phi-2's runs of 2-31 spaces and 2-9 tabs) normal and
    normalized, as in microsoft/phi-2's own ``tokenizer.json``. The ``tokenizers`` library matches added tokens
    before the pre-tokenizer, so a run of spaces is one token there and never reaches BPE.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    bpe = models.BPE.from_file(
        str(folder / "vocab.json"), str(folder / "merges.txt"), continuing_subword_prefix="", end_of_word_suffix=""
    )
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    added_file = folder / "added_tokens.json"
    added: dict[str, int] = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else {}
    if EOS_TEXT in tok.get_vocab() and EOS_TEXT not in added:
        added[EOS_TEXT] = tok.token_to_id(EOS_TEXT)
    # tokenizers gives a new added token the next free id, so add them in id order and check that they got theirs
    for text, token_id in sorted(added.items(), key=lambda kv: kv[1]):
        if text == EOS_TEXT:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(text, special=False, normalized=True)])
        if tok.token_to_id(text) != token_id:
            raise PhikitError(
                f"{added_file}: token {text!r} has id {token_id}, but vocab.json and the tokens before it "
                f"give it {tok.token_to_id(text)}; added token ids must follow vocab.json without gaps"
            )
    return tok
