"""OpenAI's completions and chat completions over the engine: a body is admitted against the server's
capacity, converted into engine requests (``submit``), and answered whole (``collect``) or as server-sent
events (``stream``). The engine only calls the thread-safe ``deliver`` each request carries; nothing here
knows about routes, and the routes (``app.py``) know nothing of this but ``answer``."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from phikit.serve import structured
from phikit.serve.engine import Engine, Request
from phikit.serve.metrics import Metrics
from phikit.serve.outputs import OUTPUTS, Choice, best
from phikit.serve.schemas import APIError, ChatBody, CompletionBody, Limits, _Common, check_text
from phikit.serve.tokenize import PromptTokenizer
from phikit.templates import ChatTemplate, Template
from phikit.tokenizer import Tokenizer


@dataclass
class Job:
    """One admitted request's generations and the queue their engine events arrive on."""

    body: _Common
    output: object  # outputs.ChatOutput | outputs.CompletionOutput
    prompts: int
    n: int
    best_of: int
    choices: list[Choice] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    prompt_tokens: int = 0
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict:
        """Tokens as OpenAI counts them: each prompt once, every generation's; ``cached_tokens``: the prompts' tokens
        whose keys and values came from the prefix cache (each prompt's first generation, as it is counted once)."""
        done, asked = sum(c.request.completion_tokens for c in self.choices), self.prompt_tokens
        cached = sum(c.request.cached_prefix for c in self.choices[:: self.best_of])
        usage = {"prompt_tokens": asked, "completion_tokens": done, "total_tokens": asked + done}
        return {**usage, "prompt_tokens_details": {"cached_tokens": cached}}


class Serving:
    """The OpenAI endpoints' logic for one engine. ``names`` are the models served (the base first, then
    each adapter); a completions request takes at most ``max_prompts`` prompts; every request's generations
    (prompts x best_of) are checked against the capacity before anything is tokenized or allocated."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        template: Template | ChatTemplate,
        metrics: Metrics,
        names: list[str],
        limits: Limits,
        timeout: float,
        max_prompts: int,
    ):
        self.engine, self.tokenizer, self.template, self.metrics = engine, tokenizer, template, metrics
        self.names, self.limits, self.timeout, self.max_prompts = names, limits, timeout, max_prompts
        self.prompt_tokenizer = PromptTokenizer(tokenizer)
        self.created = int(time.time())  # the models' "created": when this server made them available

    def close(self) -> None:
        self.prompt_tokenizer.close()

    # ---- models ----

    def model_card(self, name: str) -> dict:
        self.adapter_of(name)
        parent = None if name == self.names[0] else self.names[0]
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "phikit", "root": name}
        return {**card, "parent": parent}

    def adapter_of(self, name: str | None) -> int:
        """The engine's adapter index of a served model name (-1: the base), or a 404 naming those served."""
        if name is None or name == self.names[0]:
            return -1
        if name in self.names:
            return self.names.index(name) - 1
        served = ", ".join(repr(n) for n in self.names)
        raise APIError(
            404, f"model {name!r} does not exist; this server serves {served}", param="model", code="model_not_found"
        )

    # ---- one request ----

    async def answer(self, body: CompletionBody | ChatBody, request: HTTPRequest):
        """The whole answer (a dict) or a streaming response."""
        prompts = body.prompts(self.template) if isinstance(body, ChatBody) else body.prompts()
        body.check_unsupported()
        adapter = self.adapter_of(body.model)
        n, best_of = body.choices()
        output = OUTPUTS[body.kind](self.tokenizer, body.top_logprobs_count())
        if len(prompts) > self.max_prompts:
            raise APIError(
                400,
                f"{len(prompts)} prompts; this server takes at most {self.max_prompts} per request (--max-prompts)",
                param="prompt",
            )
        total = len(prompts) * best_of  # checked before anything is tokenized, compiled or allocated
        engine = self.engine
        capacity = engine.max_batch + engine.max_queue
        if total > capacity:
            raise APIError(
                400,
                f"this request asks for {total} generations (prompts x max(n, best_of)); this server runs at most "
                f"{capacity} at once (--max-batch {engine.max_batch} + --max-queue {engine.max_queue}); split it",
                param="n",
            )
        if not engine.reserve(total):
            raise APIError(
                503,
                "the server is busy (every slot taken and the queue full); retry later",
                "server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        job = Job(body, output, len(prompts), n, best_of)
        try:
            await self.submit(job, prompts, adapter)
        finally:  # submitted generations are the engine's to release; give back the rest of the reservation
            engine.release(total - sum(c.submitted for c in job.choices))
        if body.stream:
            return StreamingResponse(self.stream(job), media_type="text/event-stream")
        return await self.collect(job, request)

    async def tokenize(self, prompt) -> tuple[list[int], str | None]:
        """Token ids of a prompt given as text (tokenized off the event loop: serve/tokenize.py) or as ids
        (checked). Text that cannot fit the context whatever its tokens is refused without tokenizing."""
        context, vocab = self.limits.context, self.limits.vocab
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if not self.prompt_tokenizer.fits(prompt, context - 1):
                raise APIError(
                    400,
                    f"the prompt ({len(prompt)} characters) cannot fit this model's context of {context} tokens",
                    param="prompt",
                    code="context_length_exceeded",
                )
            ids = await self.prompt_tokenizer.encode(prompt)
            return ids or [self.tokenizer.eos_id], prompt
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be 0..{vocab - 1} and not empty", param="prompt")
        return list(prompt), None

    async def submit(self, job: Job, prompts: list, adapter: int) -> None:
        """Engine requests for each prompt x best_of, submitted into the reservation (grammar matchers are
        built only now, for admitted choices)."""
        body, tokenizer, vocab = job.body, self.tokenizer, self.limits.vocab
        echo, logprobs = body.echoes(), job.output.logprobs
        grammar = structured.grammar_for(body.response_format, tokenizer, vocab)
        tokenized = [await self.tokenize(p) for p in prompts]
        loop = asyncio.get_running_loop()
        deadline = time.time() + self.timeout
        bias = body.bias(vocab)
        for ids, text in tokenized:
            sampling = body.sampling(len(ids), self.limits)
            stops = sampling.stops
            if isinstance(body, ChatBody) and grammar is None:  # with a grammar its end is the reply's end
                stops = tuple(dict.fromkeys((*self.template.stop, *stops)))
            for j in range(job.best_of):
                index = len(job.choices)
                request = Request(
                    ids,
                    sampling.max_tokens,
                    sampling.seeded(j),
                    stops,
                    lambda e, index=index: loop.call_soon_threadsafe(job.events.put_nowait, (index, e)),
                    deadline,
                    logprobs=logprobs if logprobs is not None else (0 if job.best_of > job.n else None),
                    prompt_logprobs=echo and logprobs is not None,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    logit_bias=bias,
                    grammar=structured.Grammar(grammar, tokenizer, vocab) if grammar else None,
                    adapter=adapter,
                )
                echoed = (text if text is not None else tokenizer.decode(ids)) if echo else ""
                job.choices.append(Choice(index, request, echo=echoed))
        for choice in job.choices:
            self.engine.submit_reserved(choice.request)
            choice.submitted = True
            self.metrics.prompt_tokens.inc(len(choice.request.prompt_ids))
        job.id = f"{job.output.id_prefix}-{secrets.token_hex(12)}"
        job.prompt_tokens = sum(len(ids) for ids, _ in tokenized)

    def apply(self, choice: Choice, event) -> str | None:
        """Record an engine event on its choice; the text piece it adds (or None)."""
        what, value = event
        if what == "prompt_logprobs":
            choice.prompt_entries = value
        elif what == "token":
            token, piece, entry = value
            if token is not None:
                self.metrics.token(choice.request, first=not choice.tokens)
                choice.tokens.append(token)
                choice.entries.append(entry)
            if piece:
                choice.pieces.append(piece)
            return piece
        else:
            if value == "error":
                raise APIError(500, "generation failed inside the server (see its log)", "server_error")
            if value == "timeout":
                raise APIError(
                    504, f"generation did not finish within {self.timeout:.0f} s", "server_error", code="timeout"
                )
            choice.reason = value
            self.metrics.finished(choice.request)
        return None

    def cancel(self, job: Job) -> None:
        for c in job.choices:
            self.engine.cancel(c.request)  # a no-op when finished; frees the slot when the client went away

    def _header(self, job: Job, obj: str) -> dict:
        return {"id": job.id, "object": obj, "created": job.created, "model": job.body.model or self.names[0]}

    async def collect(self, job: Job, request: HTTPRequest) -> dict:
        """The whole answer once every choice is done; a client that leaves frees its rows."""
        loop = asyncio.get_running_loop()
        pending, next_check = len(job.choices), loop.time()
        try:
            while pending:
                try:
                    index, event = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    index = event = None
                if loop.time() >= next_check:  # queued or generating: a client that left frees its place
                    next_check = loop.time() + 0.25
                    if await request.is_disconnected():
                        self.cancel(job)
                        raise APIError(499, "client closed the request")
                if event is not None:
                    self.apply(job.choices[index], event)
                    pending -= event[0] == "done"
        except BaseException:
            self.cancel(job)
            raise
        kept = best(job.choices, job.prompts, job.n, job.best_of)
        echo = job.body.echoes()
        choices = [job.output.choice(c, i, echo) for i, c in enumerate(kept)]
        return {**self._header(job, job.output.object), "choices": choices, "usage": job.usage()}

    async def stream(self, job: Job):
        """Server-sent events: each new piece of text as a chunk, a finishing chunk per choice, usage when
        asked, then ``[DONE]``; an error midway is sent as an error chunk."""
        output, header = job.output, self._header(job, job.output.chunk_object)
        options = job.body.stream_options

        def pack(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            for opening in output.opening(job.choices):
                yield pack({**header, "choices": [opening]})
            pending = len(job.choices)
            while pending:
                index, event = await job.events.get()
                choice = job.choices[index]
                try:
                    piece = self.apply(choice, event)
                except APIError as e:
                    yield pack(e.body())
                    yield "data: [DONE]\n\n"
                    return
                if event[0] == "prompt_logprobs" and job.body.echoes():
                    piece = choice.echo  # the echoed prompt comes first
                token, entry = (event[1][0], event[1][2]) if event[0] == "token" else (None, None)
                if piece or (token is not None and output.logprobs is not None):
                    yield pack({**header, "choices": [output.delta(choice, piece or "", token, entry)]})
                if event[0] == "done":
                    pending -= 1
                    yield pack({**header, "choices": [output.end(index, choice.reason)]})
            if options is not None and options.include_usage:
                yield pack({**header, "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel(job)
