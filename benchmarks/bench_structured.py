"""Grammar engines for structured output on Phi-2's vocabulary: llguidance against outlines-core.

    python benchmarks/bench_structured.py [--tokenizer DIR] [--steps 64]

For each of the JSON schemas the tests use (nested objects, arrays, enums, bounds, patterns): the time to
build the schema's constraint (llguidance: grammar + matcher; outlines-core: regex + index over the whole
vocabulary), and the time per token to compute the allowed-token mask while walking a constrained
sequence (random allowed tokens, seeded, up to --steps tokens). xgrammar is not measured: its wheel
needs Triton and transformers installed. Prints a Markdown table and writes results_structured.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, markdown_table, save_json  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"


def schemas() -> list[dict]:
    from test_serve_api import SCHEMAS

    return SCHEMAS


def byte_vocabulary(tokenizer_json: dict) -> dict[int, bytes]:
    """Each token's bytes (GPT-2's byte-level alphabet decoded; added tokens as UTF-8)."""
    alphabet = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = alphabet[:]
    n = 0
    for b in range(256):
        if b not in alphabet:
            alphabet.append(b)
            chars.append(256 + n)
            n += 1
    decode = {chr(c): b for b, c in zip(alphabet, chars)}
    out = {i: bytes(decode[ch] for ch in token) for token, i in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        out[added["id"]] = added["content"].encode()
    return out


def walk(allowed, advance, steps: int, seed: int) -> list[float]:
    """Seconds per mask over a random constrained walk. ``allowed()`` returns the (vocab,) bool mask the
    server applies to the logits: that is what is timed, not the choice of the next token."""
    rng = random.Random(seed)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        mask = allowed()
        times.append(time.perf_counter() - started)
        tokens = mask.nonzero()[:, 0].tolist()
        if not tokens:
            break
        if not advance(rng.choice(tokens)):
            break
    return times


def bench_llguidance(folder: Path, vocab: int, steps: int) -> dict:
    """Through phikit's own structured-output code (what the server runs per request)."""
    from phikit.serve.structured import Grammar, _ll_tokenizer, compile_schema
    from phikit.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    started = time.perf_counter()
    _ll_tokenizer(tokenizer, vocab)
    setup = time.perf_counter() - started
    builds, masks = [], []
    for i, schema in enumerate(schemas()):
        started = time.perf_counter()
        grammar = Grammar(compile_schema(schema, tokenizer, vocab), tokenizer, vocab)
        builds.append(time.perf_counter() - started)

        def advance(token, grammar=grammar):
            grammar.accept(token)
            return not grammar.finished()

        masks += walk(grammar.allowed, advance, steps, i)
    return {
        "engine": "llguidance",
        "setup_s": setup,
        "build_ms": statistics.median(builds) * 1e3,
        "build_max_ms": max(builds) * 1e3,
        "mask_us": statistics.median(masks) * 1e6,
    }


def bench_outlines(vocab_bytes: dict[int, bytes], eos: int, vocab: int, steps: int, max_schemas: int) -> dict:
    import outlines_core
    import torch

    started = time.perf_counter()
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in vocab_bytes.items():
        if i != eos:
            by_bytes.setdefault(b, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, by_bytes)
    setup = time.perf_counter() - started
    builds, masks = [], []
    for i, schema in enumerate(schemas()[:max_schemas]):
        started = time.perf_counter()
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
        builds.append(time.perf_counter() - started)

        def advance(token, guide=guide):
            guide.advance(token)
            return not guide.is_finished()

        def allowed(guide=guide):
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[torch.tensor(guide.get_tokens(), dtype=torch.long)] = True
            return mask

        masks += walk(allowed, advance, steps, i)
    return {
        "engine": "outlines-core",
        "setup_s": setup,
        "build_ms": statistics.median(builds) * 1e3,
        "build_max_ms": max(builds) * 1e3,
        "mask_us": statistics.median(masks) * 1e6,
        "schemas": max_schemas,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = SHARED / "phi2-tokenizer" if (SHARED / "phi2-tokenizer").is_dir() else SHARED / "gpt2-bpe"
    ap.add_argument("--tokenizer", type=Path, default=default)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--outlines-schemas", type=int, default=10, help="outlines-core indexes are slow: fewer")
    ap.add_argument("--out", type=Path, default=HERE / "results_structured.json")
    args = ap.parse_args()
    text = (args.tokenizer / "tokenizer.json").read_text()
    raw = json.loads(text)
    eos = next(t["id"] for t in raw["added_tokens"] if t["content"] == "<|endoftext|>")
    vocab = 51200
    rows = [bench_llguidance(args.tokenizer, vocab, args.steps)]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append(bench_outlines(byte_vocabulary(raw), eos, vocab, args.steps, args.outlines_schemas))
    print(f"\nMachine: {machine()}\nTokenizer: {args.tokenizer} ({len(raw['model']['vocab'])} + added tokens)\n")
    columns = [
        ("engine", "engine"),
        ("setup_s", "tokenizer setup s"),
        ("build_ms", "schema build ms (median)"),
        ("build_max_ms", "schema build ms (max)"),
        ("mask_us", "mask per token us (median)"),
    ]
    print(markdown_table(rows, columns))
    save_json(args.out, {"command": " ".join(sys.argv), "tokenizer": str(args.tokenizer), "rows": rows})


if __name__ == "__main__":
    main()
