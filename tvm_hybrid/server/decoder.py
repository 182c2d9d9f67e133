"""The cloud half of a split decoder, served with a KV cache per sequence.

A device runs the embeddings and the first layers and sends each call's hidden rows; this runs
the other layers (its rows come unpadded, 1 to the largest chunk; they are padded here).
Requests name their sequence with KServe v2 request parameters as Triton's sequence batching
does: ``sequence_id`` (a string or number), ``sequence_start`` (true: a new
sequence, its cache emptied) and ``sequence_end`` (true: free it after this request; a request
with no inputs only ends it). ``top_logits`` N returns the N best logits (``top_ids``,
``top_logits``) instead of the whole row. At most ``max_sequences`` live at once (a new one
beyond that is refused with 429 until one ends or expires); a sequence idle ``timeout`` seconds
expires; a request for an unknown or expired sequence is refused (404) saying so, and the
device then falls back or starts over.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import numpy as np

from ..manifest import TensorSpec
from ..runtime.cloud import wire_version


class SequenceError(Exception):
    """A request the sequence rules refuse: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class _Sequence:
    cache: dict
    position: int = 0
    used: float = 0.0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class ServedDecoder:
    """A decoder cloud artifact under its endpoint: ``workers`` copies of its VMs (one weights
    copy), and the live sequences' caches."""

    stateful = True

    def __init__(self, art, workers: int, threads: int, max_sequences: int = 16, timeout: float = 300.0):
        from ..runtime._tvm import tvm_runtime
        from ..runtime.generate import DecoderHalf

        m = art.manifest
        d = m.decoder
        ep = d["endpoint"]
        self.name, self.version = ep["model"], ep["version"]
        tvm = tvm_runtime()
        device = tvm.cpu(0)
        by_id = {s.id: s for s in m.segments}
        weights: dict = {}
        self._halves: queue.SimpleQueue = queue.SimpleQueue()
        half = None
        for _ in range(workers):
            half = DecoderHalf(tvm, device, art.root, d, by_id, weights)
            self._halves.put(half)
        self.pool_size = workers
        self.threads = threads
        self.chunks = half.chunks
        self.max_context = int(d["max_context"])
        decode = by_id[d["decode"]]
        self.inputs: list[TensorSpec] = [t for t in decode.inputs if not t.name.startswith("past_")]
        self.outputs: list[TensorSpec] = [t for t in decode.outputs if t.name == "logits"]
        self.stream = half.stream
        self.max_sequences, self.timeout = max_sequences, timeout
        self._seqs: dict[str, _Sequence] = {}
        self._lock = threading.Lock()
        self._empty = half.empty_cache

    @property
    def versions(self) -> list[str]:
        return list(dict.fromkeys([self.version, wire_version(self.version)]))

    def metadata(self) -> dict[str, Any]:
        from ..protocol import v2_datatype

        def t(s: TensorSpec, dims=None):
            return {"name": s.name, "datatype": v2_datatype(s.dtype), "shape": dims or list(s.shape)}

        ins = [t(s, [1, -1, *s.shape[2:]] if s.name == self.stream else None) for s in self.inputs]
        return {"name": self.name, "versions": self.versions, "platform": "tvm-hybrid", "inputs": ins,
                "outputs": [t(s) for s in self.outputs],
                "parameters": {"sequence_batching": True, "max_sequences": self.max_sequences,
                               "sequence_timeout_s": self.timeout, "chunks": [1, *self.chunks],
                               "max_context": self.max_context}}  # fmt: skip

    def _expire(self, now: float) -> None:
        for sid in [k for k, s in self._seqs.items() if now - s.used > self.timeout and not s.lock.locked()]:
            del self._seqs[sid]

    def check(self, feeds: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        """The request's shape and sequence rules, before it queues for a worker (SequenceError)."""
        sid = params.get("sequence_id")
        if sid is None or isinstance(sid, (bool, dict, list)) or str(sid) == "":
            raise SequenceError(400, f"{self.name} keeps state per sequence: give a sequence_id request parameter")
        if not feeds:
            if not params.get("sequence_end"):
                raise SequenceError(400, "a request without inputs only ends a sequence (sequence_end: true)")
            return
        missing = [s.name for s in self.inputs if s.name not in feeds and s.name != "last"]
        if missing:
            raise SequenceError(400, f"missing input(s) {', '.join(missing)}")
        x = feeds[self.stream]
        if x.dtype != np.float32 or x.ndim != 3 or x.shape[0] != 1 or not 1 <= x.shape[1] <= self.chunks[-1] \
                or tuple(x.shape[2:]) != tuple(self.inputs[0].shape[2:]):  # fmt: skip
            raise SequenceError(400, f"{self.stream} must be float32 [1, S, {self.inputs[0].shape[2]}] with S from 1 to "
                                     f"{self.chunks[-1]}; got {x.dtype} {list(x.shape)}")  # fmt: skip
        top = params.get("top_logits")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
            raise SequenceError(400, f"top_logits must be a positive integer, not {top!r}")

    def infer_sequence(self, feeds: dict[str, np.ndarray], params: dict[str, Any]) -> dict[str, np.ndarray]:
        """One request of a sequence (``check`` passed): run the layers on its rows with the
        sequence's cache; the logits (or the top ones)."""
        sid = str(params["sequence_id"])
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            seq = self._seqs.get(sid)
            if params.get("sequence_start"):
                if seq is None and len(self._seqs) >= self.max_sequences:
                    raise SequenceError(429, f"{len(self._seqs)} sequences are live, the most this server keeps "
                                             f"(--max-sequences); end one or retry when one expires")  # fmt: skip
                seq = self._seqs[sid] = _Sequence(self._empty())
            elif seq is None:
                raise SequenceError(404, f"sequence {sid[:64]!r} is unknown or expired (idle over {self.timeout:g} s); "
                                         "start it again with sequence_start")  # fmt: skip
            seq.used = now
        if not feeds:  # sequence_end alone
            with self._lock:
                self._seqs.pop(sid, None)
            return {}
        with seq.lock:
            x = feeds[self.stream]
            rows = x.shape[1]
            start = int(np.asarray(feeds["start"]).reshape(-1)[0])
            last = int(np.asarray(feeds.get("last", np.array([rows - 1]))).reshape(-1)[0])
            if start > seq.position:
                raise SequenceError(400, f"sequence {sid[:64]!r} is at position {seq.position}; a request cannot "
                                         f"start at {start} (positions must follow on)")  # fmt: skip
            if not 0 <= last < rows or start + last + 1 > self.max_context:
                raise SequenceError(400, f"last {last} / start {start} fall outside the chunk or the "
                                         f"{self.max_context}-token cache")  # fmt: skip
            half = self._halves.get()
            try:
                from ..runtime.threads import use

                use(self.threads)
                logits, seq.cache = half.run(half.segment_for(rows), x, start, last, seq.cache)  # padded to it
            finally:
                self._halves.put(half)
            seq.position = start + last + 1  # a retried request rewinds: rows past it are masked out
            seq.used = time.monotonic()
        if params.get("sequence_end"):
            with self._lock:
                self._seqs.pop(sid, None)
        top = params.get("top_logits")
        if top:
            top = min(int(top), logits.shape[-1])
            ids = np.argpartition(-logits[0], top - 1)[:top]
            ids = ids[np.argsort(-logits[0, ids], kind="stable")]
            return {"top_ids": ids[None].astype(np.int64), "top_logits": logits[:, ids].astype(np.float32)}
        return {"logits": logits}
