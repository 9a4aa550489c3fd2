"""Chat engine: continuous batching over llama.cpp's low-level API.

llama-cpp-python's `Llama` class only ever decodes sequence 0, so concurrent requests would be
served one after another. Here one scheduler thread owns the llama context and, at every step,
puts one token of each generating sequence plus chunks of waiting prompts into a single
`llama_decode` batch, samples each sequence with its own sampler chain, and admits new requests
between steps. All decodes happen on that one thread: rotating calls across threads costs a lot
(OpenMP keeps a thread team per calling thread).

Each sequence has its own KV stream of `ctx_per_seq` cells (llama.cpp's non-unified cache). A
unified cache would let sequences share one pool of cells, but attention then sums over cells
whose layout depends on the other sequences, and greedy outputs under load stop matching the
same request served alone (measured: 4 concurrent prompts diverged within 24 tokens). Per-sequence
streams keep batched output identical to unbatched output.

With separate streams llama.cpp puts sequences into one micro-batch only while their ids rise by
one in batch order (llama_batch_allocr::split_equal, `sequential`); otherwise every sequence is
decoded on its own and batching gains nothing (measured: 92 instead of 188 tok/s at 8 streams).
So the requests admitted together take the lowest free ids (each the one of them that kept most
of its prompt) and the batch is laid out in id order.

Prefix cache: after a long prompt is decoded, its KV stream is copied into one of a few spare
streams; a later request that starts with the same tokens (a shared system prompt, the earlier
turns of a conversation) copies that stream back and decodes only the rest. A finished
sequence's own stream keeps its prompt and answer too, until the next request takes it: that
one restarts from them in place, without a copy (the next turn of a conversation, a repeated
prompt), or copies them when it is given another stream (`PrefixCache`). Like llama-server's
prompt cache, a restored prefix can round differently from a cold prefill (the kernels sum in
another order for other batch shapes), so answers after a hit may differ in late tokens.

Sliding-window layers (Gemma 3) keep only their window in each stream, as in llama-server
(`swa_full` off), so a stream cut back to a position must still hold the window before it: a
prefix restore that would need dropped positions decodes the prompt afresh (`_holds_window`);
rolling back rejected drafts never does (`_verify`).

Prompt-lookup speculation (`lookup_draft`; the service turns it on): for a greedy request decoding
alone, when its last three tokens occurred earlier in the prompt or answer, the tokens that
followed them are decoded as a draft in the same step and kept as far as the model agrees.
Outputs stay bit-identical to plain decoding because the engine measures it: at start it decodes
a probe text token by token and again as drafts, and allows only the draft lengths and positions
whose logits match bit for bit. On x86 that is drafts of up to 2 tokens (llama.cpp multiplies 4+
rows of repacked K-quants with another kernel) below position 256 (from 512 KV cells on, one
row's attention is split across threads and sums in another order). Only a sequence decoding
alone drafts: beside others, extra rows move it onto other kernels, and a batch is already
compute-bound (measured: 8 clients took 6% longer with drafts). The service also times the
probe's steps and keeps only drafts whose rows cost less than decoding them one at a time
(`draft_timed`): with gemma-3-270m and an AVX2 build none do, and drafts cost a lone client 18%.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines import prompt
from appliance.engines.events import Event, Finish, Outbox, PromptScores, Stream, TokenEvent
from appliance.engines.lanes import CoreLanes, physical_cores
from appliance.engines.prefix import PrefixCache
from appliance.engines.textstream import TextAssembler
from appliance.errors import ApplianceError, Busy, ContextTooLong, RequestError

__all__ = ["ChatEngine", "EngineBusy", "EngineConfig", "Event", "Finish", "GenerationRequest",
           "GrammarError", "Sampling", "Stream", "TokenEvent"]

log = logging.getLogger(__name__)
SCORE_CHUNK = 32  # prompt tokens scored per step: each keeps a row of n_vocab logits
# decoded at start to find which draft lengths verify bit-identically (any text will do)
PROBE_TEXT = "The appliance checks every bundle before it installs it, and keeps the old one."
ATTENTION_PAD = 256  # KV cells a step attends over are padded to this (llama_kv_cache::get_n_kv)


class EngineBusy(Busy):
    """The request queue is full."""


class GrammarError(RequestError):
    """llama.cpp could not compile a grammar."""


class NoTemplate(RequestError):
    """A base model: it has no chat template, so it only serves completions."""

    code = "no_chat_template"


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - the venv always has it
        raise ApplianceError("chat needs llama-cpp-python, which is not installed",
                             hint="run `make venv`, which builds it") from exc
    return llama_cpp


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one chat engine. threads=0 means one per physical core."""

    n_gpu_layers: int = 0
    threads: int = 0
    parallel: int = 8  # sequences decoded together
    ctx_per_seq: int = 1024  # KV cells of each sequence: its prompt + answer limit
    prefix_slots: int = 4  # KV streams that keep recent prompts for reuse (0: no prefix cache)
    min_prefix: int = 64  # shortest shared prefix worth restoring
    # prompt-lookup speculation: most draft tokens per step (0: off; the service's default is
    # 2); the engine uses no more than its start-up probe found bit-identical to plain decoding
    lookup_draft: int = 0
    # and only drafts whose step, all accepted, beats decoding its tokens one at a time, timed
    # at start-up (the service's default; off, the probe's outcome does not depend on speed)
    draft_timed: bool = False
    batch: int = 512  # most tokens per llama_decode call
    max_queue: int = 64


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int  # 0: only decode (and score) the prompt
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    logprobs: int | None = None  # None: off; N: the chosen token plus N alternatives
    # A sampler chain made in advance by `make_sampler` (off the scheduler thread: compiling a
    # grammar takes time). The engine owns and frees it once `submit` is called.
    sampler: Any = None
    n: int = 1  # choices: sequences that decode the prompt once and then sample apart
    prompt_logprobs: bool = False  # score the prompt's own tokens too (a PromptScores event)
    # the engine's bookkeeping: choices admitted so far, samplers cloned for the others
    admitted: int = field(default=0, init=False)
    clones: list[Any] = field(default_factory=list, init=False)


@dataclass
class _Seq:
    req: GenerationRequest
    stream: Stream
    seq_id: int
    sampler: Any
    text: TextAssembler
    done_prompt: int = 0  # prompt tokens already in the KV cache
    pending: int | None = None  # sampled token not yet decoded
    generated: int = 0
    started: float = field(default_factory=time.monotonic)
    ttft: float | None = None
    lookup: NgramIndex | None = None  # prompt + answer so far, for drafts (greedy only)
    draft: list[int] = field(default_factory=list)
    greedy: bool = False  # plain argmax over the logits (plus logit_bias): no sampler needed
    index: int = 0  # the choice
    cached: int = 0  # prompt tokens restored from another stream
    scores: list[tuple[float, list[tuple[int, float]]]] | None = None  # prompt logprobs so far
    answer: list[int] = field(default_factory=list)  # the tokens generated so far

    def held(self) -> int:
        """How many of prompt + answer the KV stream holds for certain: the decoded part of
        the prompt, then every generated token but the last (which may not have been decoded;
        rejected drafts past it may have been)."""
        if self.done_prompt < len(self.req.prompt):
            return self.done_prompt
        return len(self.req.prompt) + max(0, self.generated - 1)

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt


class ChatEngine:
    """One GGUF model, one llama context, one scheduler thread."""

    def __init__(self, model_path: Path, config: EngineConfig,
                 lanes: CoreLanes | None = None, template: str | None = None) -> None:
        """Load `model_path` with `config.n_gpu_layers` layers offloaded (-1: all) and start the
        scheduler. Decoding uses `config.threads` CPU threads (0: one per physical core), fewer
        while other engines hold some of the `lanes`. `template` (a Jinja chat template, from
        the bundle) replaces the one in the GGUF."""
        self.config = config
        self.path = model_path
        ll = _llama()
        self._ll = ll
        from llama_cpp import _logger  # silence llama.cpp's load chatter unless debugging
        _logger.set_verbose(os.environ.get("APPLIANCE_LLAMA_VERBOSE") == "1")
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        self._model = ll.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise ApplianceError(f"llama.cpp could not load {model_path.name}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self.template = template or self._gguf_template()
        self.bos, self.eos = self.special_tokens()
        self.n_ctx_train = ll.llama_model_n_ctx_train(self._model)
        threads = config.threads or physical_cores()
        self.lanes = lanes or CoreLanes(threads)
        self._threads = threads
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = config.ctx_per_seq * (config.parallel + config.prefix_slots)
        cparams.n_batch = config.batch
        cparams.n_ubatch = config.batch
        cparams.n_seq_max = config.parallel + config.prefix_slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # see the module docstring
        cparams.swa_full = False  # sliding-window layers keep their window only: `_holds_window`
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:  # e.g. no memory for the KV cache: give the weights back too
            ll.llama_model_free(self._model)
            raise ApplianceError(f"llama.cpp could not create a context for {model_path.name}")
        self._mem = ll.llama_get_memory(self._ctx)
        self._n_swa = ll.llama_model_n_swa(self._model)  # 0: no sliding-window layers
        self.ctx_per_seq = min(config.ctx_per_seq, self.n_ctx_train or config.ctx_per_seq)
        self._batch = ll.llama_batch_init(config.batch, 0, 1)
        self.draft_limit = self.draft_below = 0  # set by the probe, on the scheduler thread
        self.draft_costs: list[float] = []  # seconds a step of 1, 2, ... rows took (timed probe)
        self._step_times: dict[int, float] = {}
        self._probed = threading.Event()
        self._probe_error: ApplianceError | None = None
        self._lock = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, Stream]] = deque()
        self._active: list[_Seq] = []
        self._free_ids = list(range(config.parallel))
        # cached prompts live in the streams above the generating ones (which must stay the
        # low, consecutive ids)
        self._prefix = PrefixCache([config.parallel + i for i in range(config.prefix_slots)],
                                   config.min_prefix)
        self._stop = False
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self._outbox = Outbox()
        self.stats = {"requests": 0, "tokens": 0, "prompt_tokens": 0, "prefix_hits": 0,
                      "prefix_tokens": 0, "draft_accepted": 0, "steps": 0}
        self._thread = threading.Thread(target=self._run, name=f"chat-{model_path.stem}",
                                        daemon=True)
        self._thread.start()
        self._probed.wait()
        if self._probe_error is not None:
            self._thread.join()
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            raise self._probe_error

    # --- model facts --------------------------------------------------------------------------

    def _gguf_template(self) -> str | None:
        raw = self._ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def chat_prompt(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    parallel: bool = True) -> list[int]:
        """The prompt tokens for a conversation, through the model's chat template; the answer
        starts right after them (`parallel`: several tool calls may answer). Raises
        RequestError when the model has no template, and TemplateFailure when the template
        refuses these messages."""
        if not self.template:
            raise NoTemplate(f"model {self.path.stem} has no chat template; use /v1/completions")
        text = prompt.render(self.template, messages, bos=self.bos, eos=self.eos, tools=tools,
                             parallel=parallel)
        add_bos = not (self.bos and text.startswith(self.bos))
        return self.tokenize(text, add_special=add_bos, parse_special=True)

    def token_text(self, token: int, special: bool = True) -> str:
        return self.piece(token, special).decode("utf-8", "replace")

    def special_tokens(self) -> tuple[str, str]:
        ll = self._ll
        bos, eos = ll.llama_vocab_bos(self._vocab), ll.llama_vocab_eos(self._vocab)
        return (self.token_text(bos) if bos >= 0 else "", self.token_text(eos) if eos >= 0 else "")

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special,
                                    parse_special)
        if n < 0:
            cap = -n
            buf = (self._ll.llama_token * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special,
                                        parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    # --- requests -----------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        """Return the max_tokens to use; raise ContextTooLong if the prompt leaves no room."""
        room = self.ctx_per_seq - n_prompt
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = n_prompt + (max_tokens or 1)
            raise ContextTooLong(
                f"this model's context is {self.ctx_per_seq} tokens; the request needs {asked} "
                f"({n_prompt} in the prompt, {max_tokens or 1} to generate)")
        return max_tokens if max_tokens is not None else room

    def make_sampler(self, req: GenerationRequest) -> Any:
        ll, s = self._ll, req.sampling
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if s.logit_bias:
            arr = (ll.llama_logit_bias * len(s.logit_bias))()
            for i, (tok, bias) in enumerate(s.logit_bias.items()):
                arr[i].token, arr[i].bias = tok, bias
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(
                self.n_vocab, len(s.logit_bias), arr))
        if req.grammar:
            g = ll.llama_sampler_init_grammar(self._vocab, req.grammar.encode(), b"root")
            if not g:
                ll.llama_sampler_free(chain)
                raise GrammarError("the response format could not be compiled into a grammar")
            ll.llama_sampler_chain_add(chain, g)
        if s.presence_penalty or s.frequency_penalty or s.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                self.n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else random.getrandbits(32)
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def submit(self, req: GenerationRequest, stream: Stream) -> None:
        """Queue a request; events arrive on `stream`. Raises EngineBusy or ContextTooLong
        before anything is queued. A request with a grammar must bring its sampler (made by
        `make_sampler` off the event loop), so the scheduler thread never compiles one."""
        try:
            if len(req.prompt) + req.max_tokens > self.ctx_per_seq:
                raise ContextTooLong(f"prompt + max_tokens exceed {self.ctx_per_seq} tokens")
            if req.n < 1 or not req.prompt:
                raise ApplianceError("a request needs a prompt and at least one choice")
            if req.grammar and req.sampler is None:
                raise ApplianceError("a request with a grammar needs its sampler made first")
            with self._lock:
                if self._stop:
                    raise ApplianceError("the chat engine is shut down")
                if len(self._waiting) >= self.config.max_queue:
                    raise EngineBusy("the chat queue is full")
                self._waiting.append((req, stream))
                self._lock.notify()
        except ApplianceError:
            self.discard(req)
            raise

    def discard(self, req: GenerationRequest) -> None:
        """Free a request's prepared samplers (it, or its remaining choices, will not run)."""
        if req.sampler is not None:
            self._ll.llama_sampler_free(req.sampler)
            req.sampler = None
        for clone in req.clones:
            self._ll.llama_sampler_free(clone)
        req.clones = []

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def idle(self) -> bool:
        return not self._active and not self._waiting

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def health(self, stuck_after: float = 120.0) -> str:
        """ok, dead (the scheduler thread ended) or stuck (one decode, or an idle wait, that
        never returns)."""
        if not self.alive():
            return "dead"
        busy = self.busy_since
        now = time.monotonic()
        if (busy is not None and now - busy > stuck_after) or (
                busy is None and now - self.heartbeat > stuck_after):
            return "stuck"
        return "ok"

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=30)
        ll = self._ll
        for seq in self._active:
            ll.llama_sampler_free(seq.sampler)
        for req, _ in self._waiting:
            self.discard(req)
        ll.llama_batch_free(self._batch)
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)

    # --- the draft probe (before the scheduler starts) ----------------------------------------

    def _probe_drafts(self, most: int) -> tuple[int, int]:
        """(longest draft, first position a draft may not reach): the drafts whose verification
        logits are bit-identical to decoding the same tokens one at a time, on this model and
        these kernels; (0, 0) is off. Which kernel runs depends on the shapes, not the numbers:
        the rows in the step, and how many KV cells attention spans. llama.cpp pads the cells
        to a multiple of 256 (`ATTENTION_PAD`), so a short probe text stands for every position
        below 256. From 512 cells on it splits a single row's attention over its threads and
        sums the parts in another order: with several threads no draft goes past 255. With one
        a second probe, past 256 positions, decides; only then, as its 260-token prefill is
        what a probe costs (minutes under emulation)."""
        if most <= 0:
            return 0, 0
        text = self.tokenize(PROBE_TEXT, add_special=True, parse_special=False)
        below = min(ATTENTION_PAD, self.ctx_per_seq)
        short = min(len(text), below - most)  # its drafts end below position 256
        long = min(below + most + 8, self.ctx_per_seq - most - 1)  # spans 512 cells
        try:
            k = self._identical_drafts(text[:short], most, 0)
            if k and self.config.draft_timed:
                k = self._paying_drafts(text[:short], k)
            if not k:
                return 0, 0
            if self._threads > 1 or long <= below:
                return k, below
            tokens = (text * (long // len(text) + 1))[:long]
            if self._identical_drafts(tokens, k, short - 1) < k:
                return k, below
            return k, self.ctx_per_seq
        finally:
            self._ll.llama_memory_seq_rm(self._mem, 0, -1, -1)

    def _identical_drafts(self, tokens: list[int], most: int, cached: int) -> int:
        """Decode `tokens` (the first `cached` are in sequence 0 already), then the next
        `most` + 1 one at a time (greedy), then those again as one draft of k tokens for
        k = 1..most: the largest k that matched. Leaves all but the last token cached."""
        pos = len(tokens) - 1
        prefill = [(t, i, False) for i, t in enumerate(tokens[:-1]) if i >= cached]
        for at in range(0, len(prefill), self.config.batch):  # the batch holds this many rows
            self._decode_rows(prefill[at:at + self.config.batch])
        plain: list[np.ndarray] = []
        fed = [tokens[-1]]
        self._step_times = {}  # rows -> fastest step seen, for `draft_timed`
        for j in range(most + 1):
            plain += self._timed_rows([(fed[j], pos + j, True)])
            fed.append(int(plain[-1].argmax()))
        identical = 0
        for k in range(1, most + 1):
            self._ll.llama_memory_seq_rm(self._mem, 0, pos, -1)
            rows = self._timed_rows([(t, pos + j, True) for j, t in enumerate(fed[:k + 1])])
            if not all(np.array_equal(a, b) for a, b in zip(rows, plain, strict=False)):
                break
            identical = k
        self._ll.llama_memory_seq_rm(self._mem, 0, pos, -1)
        log.info("lookup drafts after %d tokens: %d of %d verify bit-identically", len(tokens),
                 identical, most)
        return identical

    def _paying_drafts(self, tokens: list[int], most: int) -> int:
        """The longest draft, up to `most`, whose step of k + 1 rows takes less time than k + 1
        steps of one row, so that it can pay when accepted; 0 if none can. Several rows take
        another kernel than one, and on some builds cost more than as many single rows
        (gemma-3-270m, AVX2 build, 2 threads: 11.8 ms for one row, 40.2 ms for three).
        `tokens` is cached in sequence 0 but for its last. Each step is timed once more beside
        the identity probe's own steps, the fastest kept (decodes are slow under emulation,
        where the boot tests run); the cache is left as it was."""
        pos = len(tokens) - 1
        for rows in range(1, most + 2):
            self._ll.llama_memory_seq_rm(self._mem, 0, pos, -1)
            self._timed_rows([(tokens[-1], pos + j, True) for j in range(rows)])
        self._ll.llama_memory_seq_rm(self._mem, 0, pos, -1)
        self.draft_costs = cost = [self._step_times[rows] for rows in range(1, most + 2)]
        k = max((k for k in range(1, most + 1) if cost[k] < (k + 1) * cost[0]), default=0)
        log.info("lookup drafts: steps of 1-%d rows take %s ms; drafts of up to %d token(s) "
                 "can pay", most + 1, ", ".join(f"{c * 1000:.1f}" for c in cost), k)
        return k

    def _timed_rows(self, rows: list[tuple[int, int, bool]]) -> list[np.ndarray]:
        """`_decode_rows`, keeping the fastest time seen for a step of this many rows."""
        start = time.perf_counter()
        out = self._decode_rows(rows)
        took = time.perf_counter() - start
        self._step_times[len(rows)] = min(took, self._step_times.get(len(rows), took))
        return out

    def _decode_rows(self, rows: list[tuple[int, int, bool]]) -> list[np.ndarray]:
        """Decode (token, position, wants logits) rows of sequence 0; copies of their logits."""
        batch = self._batch
        for i, (token, pos, logits) in enumerate(rows):
            _put_row(batch, i, token, pos, 0, logits)
        batch.n_tokens = len(rows)
        if self._ll.llama_decode(self._ctx, batch) != 0:
            raise ApplianceError(f"llama.cpp could not decode the probe for {self.path.name}")
        return [np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i),
                                      shape=(self.n_vocab,)).copy()
                for i, (_, _, logits) in enumerate(rows) if logits]

    # --- the scheduler thread -----------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting choices in free streams. A request's first choice starts alone; the
        others wait until it has decoded the prompt, then copy its KV stream."""
        held: deque[tuple[GenerationRequest, Stream]] = deque()
        burst = sum(r.n - r.admitted for r, _ in self._waiting)  # choices that may start now
        while self._waiting and self._free_ids:
            req, stream = self._waiting.popleft()
            k = req.admitted
            if stream.cancelled:
                self.discard(req)
                for index in range(k, req.n):
                    self._outbox.put(stream, Finish("cancelled", len(req.prompt), 0, index=index))
                continue
            if k == 0 and not req.prompt_logprobs and self._prefix.in_flight(req.prompt,
                                                                               self._active):
                held.append((req, stream))  # admitted once that prefill is done, then copied
                continue
            if k and any(s.req is req and s.done_prompt < len(req.prompt) for s in self._active):
                held.append((req, stream))  # a sibling is still decoding the prompt
                continue
            try:
                sampler = self._choice_sampler(req, k)
            except ApplianceError as exc:
                self.discard(req)
                self._outbox.put(stream, Finish("error", len(req.prompt), 0, error=exc.message,
                                                index=k))
                continue
            req.admitted += 1
            if req.admitted < req.n:
                self._waiting.appendleft((req, stream))
            # llama.cpp batches sequences whose ids are consecutive, so this round fills the
            # lowest free ids; of those, each takes the one that kept most of its prompt (then
            # reused in place, where another would copy it or decode it again)
            seq_id = self._prefix.kept_best(req.prompt, self._free_ids[:max(1, burst)])
            self._free_ids.remove(seq_id)
            burst -= 1
            seq = _Seq(req, stream, seq_id, sampler, TextAssembler(req.stop), index=k)
            if req.prompt_logprobs and k == 0:
                seq.scores = []
            s = req.sampling
            # greedy with no sampler state (penalties remember tokens; a grammar would have to
            # be rewound): the argmax needs no sampler, and drafts can be checked
            seq.greedy = bool(s.temperature <= 0 and not req.grammar and not s.presence_penalty
                              and not s.frequency_penalty and s.repeat_penalty == 1.0)
            if seq.greedy and self.draft_limit and req.logprobs is None:
                seq.lookup = NgramIndex(req.prompt)
            self._restore_prefix(seq)
            self._active.append(seq)
            self._active.sort(key=lambda s: s.seq_id)
            self.stats["requests"] += 1
        self._waiting.extendleft(reversed(held))

    def _choice_sampler(self, req: GenerationRequest, k: int) -> Any:
        """The sampler of choice `k`. Each choice draws from its own seed (seed + k when the
        client gave one); a grammar's compiled sampler is cloned for the other choices before
        the first one samples, so every choice starts from the grammar's initial state."""
        ll = self._ll
        if k == 0:
            if req.n > 1 and req.sampler is not None:
                req.clones = [ll.llama_sampler_clone(req.sampler) for _ in range(req.n - 1)]
            sampler, req.sampler = req.sampler or self.make_sampler(req), None
            return sampler
        s = req.sampling
        seed = (s.seed + k) & 0xFFFFFFFF if s.seed is not None else random.getrandbits(32)
        if not req.clones:
            return self.make_sampler(replace(req, sampling=replace(s, seed=seed)))
        chain = req.clones.pop(0)
        if s.temperature > 0:  # the chain ends with its random draw: draw from another seed
            ll.llama_sampler_free(ll.llama_sampler_chain_remove(
                chain, ll.llama_sampler_chain_n(chain) - 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _restore_prefix(self, seq: _Seq) -> None:
        """Start `seq` from the stream that shares the longest prefix with its prompt: its own
        stream when what that kept is the best, cut back to the shared length; else another,
        copied whole, then cut (at least one prompt token is left to decode). A later choice
        copies its first choice's prompt whole; a scored prompt is decoded in full, as restored
        positions have no logits."""
        ll, own = self._ll, seq.seq_id
        slot, keep = -1, 0
        if seq.scores is None:
            sibling = next((s for s in self._active if s.req is seq.req
                            and s.done_prompt == len(s.prompt)), None)
            if sibling is not None:
                slot, keep = sibling.seq_id, len(seq.prompt) - 1
            else:
                slot, keep = self._prefix.source(seq.req.prompt, self._active, own)
        self._prefix.forget(own)
        if not (slot == own and self._holds_window(own, keep)
                and ll.llama_memory_seq_rm(self._mem, own, keep, -1)):
            ll.llama_memory_seq_rm(self._mem, own, -1, -1)  # what it kept is of no use
            if slot < 0 or slot == own or keep <= 0 or not self._holds_window(slot, keep):
                return  # a cold prefill
            ll.llama_memory_seq_cp(self._mem, slot, own, -1, -1)
            if not ll.llama_memory_seq_rm(self._mem, own, keep, -1):
                ll.llama_memory_seq_rm(self._mem, own, -1, -1)  # cannot cut: start afresh
                return
        seq.done_prompt = seq.cached = keep
        self._prefix.used(slot)
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens"] += keep

    def _holds_window(self, seq_id: int, pos: int) -> bool:
        """Whether stream `seq_id`, cut back to `pos`, still holds every position the token at
        `pos` attends to. With `swa_full` off, sliding-window layers reuse a stream's cells once
        they fall out of the window, and drop all older positions with them (llama.cpp's
        llama_kv_cache::apply_ubatch), so what is left runs from seq_pos_min to the end; a
        token at p sees the positions after p - n_swa (llama_hparams::is_masked_swa)."""
        if not self._n_swa:
            return True
        first = self._ll.llama_memory_seq_pos_min(self._mem, seq_id)
        return bool(first <= max(0, pos - self._n_swa + 1))

    def _save_prefix(self, seq: _Seq) -> None:
        """Keep a copy of a just-decoded prompt in the least recently used slot."""
        slot = self._prefix.slot_for(seq.req.prompt)
        if slot is not None:
            self._ll.llama_memory_seq_cp(self._mem, seq.seq_id, slot, -1, -1)
            self._prefix.saved(slot, seq.req.prompt)

    def _release(self, seq: _Seq, keep: bool = True) -> None:
        """Free the sequence's stream. Unless told not to, the stream keeps the KV of what it
        holds for certain, a prefix source for the next request that takes it."""
        ll, held = self._ll, seq.held()
        if keep and self._prefix.enabled and held and ll.llama_memory_seq_rm(
                self._mem, seq.seq_id, held, -1):
            self._prefix.keep(seq.seq_id, (seq.req.prompt + seq.answer)[:held])
        else:
            ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            self._prefix.forget(seq.seq_id)
        ll.llama_sampler_free(seq.sampler)
        self._free_ids.append(seq.seq_id)
        self._free_ids.sort()
        self._active.remove(seq)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        tail = "" if reason in ("cancelled", "error") else seq.text.flush()
        self._outbox.put(seq.stream, Finish(reason, len(seq.req.prompt), seq.generated, tail,
                                            error, seq.ttft, seq.index, seq.cached,
                                            seq.text.matched))
        self._release(seq, keep=reason != "error")

    def _run(self) -> None:
        # The probe decodes here too: a decode on any other thread leaves that thread an OpenMP
        # team whose workers then compete with this one's (measured: 8 clients 40% slower).
        try:
            self.draft_limit, self.draft_below = self._probe_drafts(
                min(self.config.lookup_draft, self.config.batch - 1))
        except ApplianceError as exc:
            self._probe_error = exc
            return
        finally:
            self._probed.set()
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._active and not self._waiting:
                        self.heartbeat = time.monotonic()
                        self._lock.wait(timeout=1.0)
                    if self._stop:
                        break
                    self._admit()
                self.heartbeat = time.monotonic()
                for seq in [s for s in self._active if s.stream.cancelled]:
                    self._finish(seq, "cancelled")
                if self._active:
                    self._step()
                self._outbox.flush()
                if not self._active and self._waiting:
                    time.sleep(0.001)
        except Exception as exc:  # the engine is dead: tell everyone, healthz reports it
            log.exception("chat engine crashed")
            for seq in list(self._active):
                self._outbox.put(seq.stream, Finish(
                    "error", len(seq.req.prompt), seq.generated,
                    error=f"engine failure: {type(exc).__name__}", index=seq.index))
            self._outbox.flush()
            self._stop = True
            raise

    def _fit_threads(self) -> None:
        """Decode on the cores that no other engine is using right now."""
        want = min(self.config.threads or self.lanes.cores, self.lanes.chat_threads())
        if want != self._threads:
            self._ll.llama_set_n_threads(self._ctx, want, want)
            self._threads = want

    def _step(self) -> None:
        self._fit_threads()
        ll, batch = self._ll, self._batch
        n = 0
        outputs: list[tuple[_Seq, int]] = []
        prefilled: list[_Seq] = []
        scored: list[tuple[_Seq, int, int, int]] = []  # seq, first position, batch index, count

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            _put_row(batch, n, token, pos, seq_id, logits)
            n += 1

        # Every generating sequence gets its next token; prompts fill the room that is left.
        # Tokens go in sequence-id order (see the module docstring). Only a sequence decoding
        # alone may add a draft (see the module docstring).
        solo = self._active[0] if len(self._active) == 1 else None
        if solo is not None and solo.pending is not None and solo.lookup is not None:
            pos = len(solo.req.prompt) + solo.generated - 1  # of the pending token
            solo.draft = solo.lookup.draft(min(self.draft_limit, self.draft_below - 1 - pos,
                                               solo.req.max_tokens - solo.generated - 1))
        k = len(solo.draft) if solo is not None else 0
        room = self.config.batch - sum(1 for s in self._active if s.pending is not None) - k
        for seq in self._active:
            if seq.pending is not None:
                pos = len(seq.req.prompt) + seq.generated - 1
                add(seq.pending, pos, seq.seq_id, True)
                outputs.append((seq, n - 1))
                for j, token in enumerate(seq.draft):
                    add(token, pos + 1 + j, seq.seq_id, True)
                continue
            take = min(len(seq.req.prompt) - seq.done_prompt, room)
            if seq.scores is not None:  # every position's logits: bounded memory per step
                take = min(take, SCORE_CHUNK)
            if take <= 0:
                continue
            if seq.scores is not None:
                scored.append((seq, seq.done_prompt, n, take))
            for i in range(seq.done_prompt, seq.done_prompt + take):
                add(seq.req.prompt[i], i, seq.seq_id,
                    i == len(seq.req.prompt) - 1 or seq.scores is not None)
            seq.done_prompt += take
            room -= take
            if seq.done_prompt == len(seq.req.prompt):
                outputs.append((seq, n - 1))
                prefilled.append(seq)
        batch.n_tokens = n
        self.stats["steps"] += 1  # llama_decode calls: /metrics turns time into time per step
        self.busy_since = time.monotonic()
        rc = ll.llama_decode(self._ctx, batch)
        self.busy_since = None
        if rc != 0:
            in_batch = {id(s): s for s, _ in outputs}
            in_batch.update({id(s): s for s in self._active if s.done_prompt})
            for seq in in_batch.values():
                self._finish(seq, "error", f"llama_decode failed with code {rc}")
            return
        for seq, first, idx, count in scored:
            self._score(seq, first, idx, count)
        for seq in prefilled:
            self._save_prefix(seq)  # before sampling: a sequence may finish at once
        for seq, idx in outputs:
            if seq.req.max_tokens == 0:  # prompt scoring only
                self._finish(seq, "length")
            elif seq.draft:
                self._verify(seq, idx)
            else:
                self._sample(seq, idx)

    def _score(self, seq: _Seq, first: int, idx: int, count: int) -> None:
        """Log-probabilities of prompt tokens first+1 .. first+count, from the logits at batch
        rows idx .. idx+count-1; sent once the whole prompt is scored."""
        assert seq.scores is not None
        prompt, top_n = seq.req.prompt, seq.req.logprobs or 0
        for j in range(count):
            if first + j + 1 < len(prompt):
                seq.scores.append(_logprobs(self._ll.llama_get_logits_ith(self._ctx, idx + j),
                                            self.n_vocab, prompt[first + j + 1], top_n))
        if seq.done_prompt == len(prompt):
            self._outbox.put(seq.stream, PromptScores(
                [None, *(lp for lp, _ in seq.scores)], [[], *(top for _, top in seq.scores)],
                seq.index))

    def _sample(self, seq: _Seq, idx: int) -> None:
        ll = self._ll
        logprob, top = None, None
        if seq.req.logprobs is not None:
            logits = ll.llama_get_logits_ith(self._ctx, idx)
        token = self._pick(seq, idx)
        if seq.req.logprobs is not None:
            logprob, top = _logprobs(logits, self.n_vocab, token, seq.req.logprobs)
        if self._emit(seq, token, logprob, top):
            seq.pending = token

    def _pick(self, seq: _Seq, idx: int) -> int:
        """The next token. Greedy requests take the argmax of the raw logits directly: the
        sampler chain would first copy all 262k candidates of a large vocabulary (0.2 ms)."""
        if not seq.greedy:
            return int(self._ll.llama_sampler_sample(seq.sampler, self._ctx, idx))
        row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, idx),
                                    shape=(self.n_vocab,))
        return greedy_token(row, seq.req.sampling.logit_bias)

    def _verify(self, seq: _Seq, idx: int) -> None:
        """Greedy check of a lookup draft: keep the drafted tokens the model agrees with, then
        its own next token; drop the KV of the rest.

        That leaves the sliding window whole (`_holds_window`): only a sequence decoding alone
        drafts, so its rows go through one micro-batch, which reuses only cells its first
        position no longer sees (llama_kv_cache::find_slot masks against seq_pos_max + 1); the
        next token comes later and needs none of them. Beside a shorter prompt chunk, llama.cpp's
        equal split would send the last drafted rows through a second micro-batch, which could."""
        ll, draft = self._ll, seq.draft
        seq.draft = []
        pos = len(seq.req.prompt) + seq.generated - 1  # of the pending token
        for j in range(len(draft) + 1):
            token = self._pick(seq, idx + j)
            if not self._emit(seq, token, None, None):
                return  # finished; its KV is freed with it
            if j == len(draft) or token != draft[j]:
                ll.llama_memory_seq_rm(self._mem, seq.seq_id, pos + 1 + j, -1)
                self.stats["draft_accepted"] += j
                seq.pending = token
                return

    def _emit(self, seq: _Seq, token: int, logprob: float | None,
              top: list[tuple[int, float]] | None) -> bool:
        """Hand one sampled token to the client; False if the sequence has finished."""
        if seq.ttft is None:
            seq.ttft = time.monotonic() - seq.started
            self.stats["prompt_tokens"] += len(seq.req.prompt)
        if self.is_eog(token):
            self._finish(seq, "stop")
            return False
        seq.generated += 1
        seq.answer.append(token)
        self.stats["tokens"] += 1
        if seq.lookup is not None:
            seq.lookup.append(token)
        text = seq.text.feed(self.piece(token))
        self._outbox.put(seq.stream, TokenEvent(text, token, logprob, top, seq.index))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.req.max_tokens:
            self._finish(seq, "length")
        else:
            return True
        return False


def _put_row(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Row i of a llama_batch: one token of one sequence."""
    batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id


def greedy_token(row: np.ndarray, bias: dict[int, float]) -> int:
    """argmax(row + bias), the first of equals, as `biased_argmax` finds it, without copying
    the row (a 1 MiB copy per token at a 262k vocabulary: 0.25 ms). Only the biased tokens
    differ from the row, so the row's own argmax wins unless one of them beats or ties it; the
    rare cases this shortcut cannot settle (the argmax itself is biased, NaN) take the copy."""
    best = int(row.argmax())
    if not bias:
        return best
    top = row[best]
    if best in bias or top != top:
        return biased_argmax(row, bias)
    for token, value in bias.items():
        biased = row.dtype.type(row[token] + value)  # rounded as `row[token] += value` rounds
        if biased != biased:
            return biased_argmax(row, bias)
        if biased > top or (biased == top and token < best):
            best, top = token, biased
    return best


def biased_argmax(row: np.ndarray, bias: dict[int, float]) -> int:
    """The reference: argmax of a biased copy of the row."""
    row = row.copy()
    for token, value in bias.items():
        row[token] += value
    return int(row.argmax())


class NgramIndex:
    """A token history with, for each `ngram` tokens, where they last occurred, so that a draft
    (what followed the latest earlier occurrence of the last `ngram` tokens) costs one dict
    lookup per token instead of a scan of the history."""

    def __init__(self, tokens: list[int], ngram: int = 3) -> None:
        self.ngram = ngram
        self.history: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence
        self._before = -1  # start of the tail's latest earlier occurrence (-1: none)
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.history.append(token)
        start = len(self.history) - self.ngram
        if start >= 0:
            key = tuple(self.history[start:])
            self._before = self._last.get(key, -1)
            self._last[key] = start

    def draft(self, most: int) -> list[int]:
        if most <= 0 or self._before < 0:
            return []
        begin = self._before + self.ngram
        return self.history[begin:begin + most]


def _logprobs(logits_ptr: Any, n_vocab: int, token: int,
              top_n: int) -> tuple[float, list[tuple[int, float]]]:
    logits = np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    lse = peak + np.log(np.exp(logits - peak).sum())
    chosen = float(logits[token] - lse)
    if top_n <= 0:
        return chosen, []
    best = np.argpartition(-logits, top_n)[:top_n]
    best = best[np.argsort(-logits[best])]
    return chosen, [(int(t), float(logits[t] - lse)) for t in best]
