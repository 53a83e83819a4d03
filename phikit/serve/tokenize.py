"""Tokenizing request text without stalling the server: large prompts in a worker process.

Measured (benchmarks/bench_serve_health.py, RESULTS.md): the ``tokenizers`` library keeps Python's GIL while
it encodes, so six 4 MB prompts tokenized in threads stopped the event loop for seconds (13 s at worst): /health,
streams and every other request waited. A prompt of ``OFFLOAD_CHARS`` characters or more is therefore
tokenized in a separate process (started on first need, spawned, holding its own copy of the tokenizer);
shorter ones, which take milliseconds, in a thread. The ids come back as packed int32 bytes, so the main
process spends only the time to unpack them. A prompt that cannot fit the context whatever its tokens (more
characters than the context times the longest token's bytes) is refused before any tokenizing (``fits``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from array import array
from concurrent.futures import ProcessPoolExecutor

from phikit.tokenizer import Tokenizer

OFFLOAD_CHARS = 1 << 16  # prompts from 64K characters on are tokenized in the worker process

_worker_tokenizer: Tokenizer | None = None


def _start_worker(folder: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(folder)


def _encode_in_worker(text: str) -> bytes:
    return array("i", _worker_tokenizer.encode(text)).tobytes()


class PromptTokenizer:
    """``encode(text)`` off the event loop: a thread for short text, the worker process for long text."""

    def __init__(self, tokenizer: Tokenizer, offload_chars: int = OFFLOAD_CHARS):
        self.tokenizer, self.offload_chars = tokenizer, offload_chars
        self.pool: ProcessPoolExecutor | None = None
        self.longest_token = 0  # bytes of the vocabulary's longest token, counted on first use

    def fits(self, text: str, tokens: int) -> bool:
        """False only when ``text`` needs more than ``tokens`` tokens whatever its tokenization: every token
        covers at most the longest token's bytes, so at most that many characters."""
        if not self.longest_token:
            vocab = self.tokenizer._tok.get_vocab_size(with_added_tokens=True)
            self.longest_token = max(len(self.tokenizer.token_bytes(i)) for i in range(vocab)) or 1
        return len(text) <= tokens * self.longest_token

    async def encode(self, text: str) -> list[int]:
        if len(text) < self.offload_chars or getattr(self.tokenizer, "folder", None) is None:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(str(self.tokenizer.folder),),
            )
        packed = await asyncio.get_running_loop().run_in_executor(self.pool, _encode_in_worker, text)
        return array("i", packed).tolist()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
