"""Embeddings engine: onnxruntime over the graph the bundle builder made (pooling and L2
normalisation are inside it), the `tokenizers` fast tokenizer, and micro-batching.

Requests from concurrent clients are gathered for a few milliseconds into one padded batch
(sorted by length so padding stays small), run once, and the rows handed back. MiniLM's
tokenizer.json pads every input to 128 tokens; here padding is dynamic (to the longest input of
the batch) and truncation is off: an input longer than the model's limit is the client's error.

The int8 variant quantises activations dynamically, with one scale per tensor: run in a batch,
a text's vector would move with its batch mates (cosine 0.985 to itself alone, measured). Users
index documents in batches and query them one at a time, so the same text must give the same
vector however it arrives: a dynamically quantised graph is therefore run one row at a time
(`max_batch=1`; requests are still gathered, and each row needs no padding). Measured on the
parity set with one thread: int8 per row 304 texts/s and identical to itself alone; int8 in
batches of 32, 372 texts/s but not; fp32 in batches, about 140. Per-token quantisation in the
graph would keep batching, but onnxruntime's fused MatMulIntegerToFloat reads only one
activation scale (cosine 0.51 to fp32 when fused, tried), so the plain per-row run it is.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.lanes import CoreLanes
from appliance.errors import ApplianceError, Busy, ContextTooLong, FormatError, RequestError

__all__ = ["BadTokens", "EmbedEngine", "TooLong"]
log = logging.getLogger(__name__)


class TooLong(ContextTooLong):
    """An input has more tokens than the model takes: row `index` of the call, `tokens` long
    (so a caller that joined several fields into one call can name the field)."""

    def __init__(self, message: str, *, index: int, tokens: int) -> None:
        super().__init__(message)
        self.index = index
        self.tokens = tokens


class BadTokens(RequestError):
    """Client-given token ids outside the vocabulary."""

    code = "invalid_token_id"


@dataclass
class _Job:
    ids: list[list[int]]
    future: Future[np.ndarray] = field(default_factory=Future)


class EmbedEngine:
    def __init__(self, model: Path, max_tokens: int, lanes: CoreLanes, threads: int = 1,
                 max_batch: int = 32, gather_ms: float = 2.0, max_queue: int = 64) -> None:
        """Load `model` (ONNX, tokenizer.json beside it). onnxruntime gets `threads` intra-op
        threads with spinning off, since the chat engine's threads share the same cores.
        `max_batch` rows go into one run: 1 for a dynamically quantised graph (see above)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tok_path = model.parent / "tokenizer.json"
        if not tok_path.is_file():
            raise FormatError(f"{model.parent.name} has no tokenizer.json beside {model.name}")
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        specials = self.tokenizer.encode("").ids  # what the post-processor wraps input with
        self._prefix, self._suffix = specials[:1], specials[1:]
        self.vocab = self.tokenizer.get_vocab_size()
        self.max_tokens = max_tokens
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.dimensions = int(self.session.get_outputs()[0].shape[-1])
        self.lanes = lanes
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.gather = gather_ms / 1000
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._running = False
        self.stats = {"requests": 0, "inputs": 0, "tokens": 0, "batches": 0, "runs": 0}
        self._thread = threading.Thread(target=self._run, name="embed", daemon=True)
        self._thread.start()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens; raises TooLong naming the input."""
        out = [e.ids for e in self.tokenizer.encode_batch(texts)]
        self._check(out)
        return out

    def wrap(self, token_lists: list[list[int]]) -> list[list[int]]:
        """Client-given token ids, checked, with the special tokens added."""
        for i, ids in enumerate(token_lists):
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise BadTokens(f"input[{i}] has token id {bad}, outside 0..{self.vocab - 1}")
        out = [self._prefix + ids + self._suffix for ids in token_lists]
        self._check(out)
        return out

    def _check(self, ids: list[list[int]]) -> None:
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise TooLong(f"input[{i}] has {len(row)} tokens; this model takes at most "
                              f"{self.max_tokens}", index=i, tokens=len(row))

    def submit(self, ids: list[list[int]]) -> Future[np.ndarray]:
        """Queue token-id rows; the future gives one unit vector per row."""
        job = _Job(ids)
        with self._cond:
            if self._stop:
                raise ApplianceError("the embeddings engine is shut down")
            if len(self._jobs) >= self.max_queue:
                raise Busy("the embeddings queue is full; retry shortly")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def embed(self, ids: list[list[int]]) -> np.ndarray:
        """Run rows now, in length-sorted sub-batches, on this thread."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            with self.lanes.borrow("embeddings"):
                result = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
            out[chunk] = result[0]
            self.stats["runs"] += 1
        return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            time.sleep(self.gather)  # let concurrent requests join this batch
            with self._cond:
                jobs, self._jobs = self._jobs, []
                self._running = True
            rows = [r for job in jobs for r in job.ids]
            try:
                vectors = self.embed(rows)
            except Exception as exc:  # a failed batch fails its requests, not the engine
                log.exception("embedding batch failed")
                for job in jobs:
                    job.future.set_exception(exc)
                self._running = False
                continue
            at = 0
            for job in jobs:
                job.future.set_result(vectors[at:at + len(job.ids)])
                at += len(job.ids)
            self.stats["requests"] += len(jobs)
            self.stats["batches"] += 1
            self.stats["inputs"] += len(rows)
            self.stats["tokens"] += sum(len(r) for r in rows)
            self._running = False

    def idle(self) -> bool:
        return not self._jobs and not self._running

    def health(self) -> str:
        return "ok" if self._thread.is_alive() and not self._stop else "dead"

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)


def truncate(vectors: np.ndarray, dimensions: int) -> Any:
    """Keep the first `dimensions` components and renormalise each row to unit length."""
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)
