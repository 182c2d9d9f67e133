"""Text generation with a decoder artifact (``compile --decoder``): KV cache, sampling, streaming,
and split decoding with the cloud.

    from tvm_hybrid.runtime import Generator
    gen = Generator("dist/smollm2/x86-64-avx512-vnni")
    out = gen.generate("The capital of France is", max_tokens=16)      # greedy
    print(out.text, out.decode_ms_per_token)
    for piece in gen.stream("Once upon a time", temperature=0.8, top_p=0.9, seed=1):
        print(piece, end="", flush=True)

The KV cache lives in TVM tensors on the device between calls: each call's present_* outputs
are the next call's past_* inputs as they are (never copied to numpy). The prompt runs through
a prefill segment a chunk at a time (the last chunk padded; its padded rows are overwritten by
the next tokens before any query can see them), then one token a call through the decode
segment. Greedy by default; ``temperature`` > 0 samples, after ``top_k`` and ``top_p``
(nucleus) filtering, from a seeded generator. Generation stops at a stop token (the model's EOS
and chat end tokens, or ``stop``), at ``max_tokens``, or when the cache is full.

A split artifact (``compile --decoder --memory …``) runs the embeddings and its first layers
here and sends each call's hidden rows (one per token) to ``serve`` at ``cloud_url``, which runs
the other layers with a KV cache of its own kept per sequence (KServe v2 request parameters
``sequence_id``, ``sequence_start``, ``sequence_end``, as Triton's sequence batching names
them) and answers with the logits — only the ``top_logits`` best when sampling needs no more
(greedy: 1; top-k: k). The prompt's tokens never leave the device. If the cloud fails
(``fallback="auto"``), the device loads its own build of the cloud's layers, rebuilds their
cache from the hidden rows it sent, and goes on: same tokens, no restart.

Only the TVM runtime and numpy are needed; text in and out needs the ``tokenizers`` package.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import RuntimeFailure, UsageError, one_line
from ._tvm import tvm_runtime
from .artifact import open_artifact
from .threads import resolve as resolve_threads
from .threads import use as use_threads

#: Request parameters of a sequence (Triton's sequence-batching names), and the top-logits ask.
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END, TOP_LOGITS = "sequence_id", "sequence_start", "sequence_end", "top_logits"


@dataclasses.dataclass
class Generation:
    """One generate() call: the continuation, how long each phase took and, split, what crossed."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    stop_reason: str  # "stop" (a stop token), "length" (max_tokens), "context" (cache full)
    prefill_ms: float
    decode_ms: float  # all decode steps together
    #: Split decoding: {"calls", "bytes_up", "bytes_down", "ms", "bytes_up_per_token", …,
    #: "fallback": None or why the device took over}; None when the artifact is not split.
    cloud: dict[str, Any] | None = None

    @property
    def decode_ms_per_token(self) -> float | None:
        steps = max(len(self.tokens) - 1, 0)  # the first token comes from the prefill's logits
        return self.decode_ms / steps if steps else None

    @property
    def tokens_per_s(self) -> float | None:
        per = self.decode_ms_per_token
        return 1e3 / per if per else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decode_ms_per_token"] = self.decode_ms_per_token
        d["tokens_per_s"] = self.tokens_per_s
        return d


class DecoderHalf:
    """The segments of one decoder (or one half of a split one) loaded as VM functions: ``run``
    takes the stream (token ids, or hidden rows) and a cache, returns the result and the new
    cache. Holds no sequence state, so one instance serves many sequences (``serve``)."""

    def __init__(self, tvm, device, root: Path, doc: dict[str, Any], segments: dict, weights: dict):
        from tvm.runtime.vm import VirtualMachine

        from ..hostcpu import pick_variant
        from .executors import _loadable

        self.tvm, self.device = tvm, device
        self.cache_pairs = [tuple(p) for p in doc["cache"]]
        self.stream = doc.get("stream", "input_ids")
        self.result = doc.get("result", "logits")
        self.chunks = sorted(int(p["tokens"]) for p in doc["prefill"])
        self._segs: dict[Any, tuple] = {}
        self.build: str | None = None  # the dispatch build loaded (a portable artifact's), else None
        roles = [(1, doc["decode"])] + [(int(p["tokens"]), p["segment"]) for p in doc["prefill"]]
        for n, sid in roles:
            seg = segments[sid]
            variant = pick_variant(seg.variants)  # this CPU's best build of a portable artifact
            library = variant["library"] if variant else seg.library
            try:
                vm = VirtualMachine(tvm.runtime.load_module(str(_loadable(root / library))), device)
            except Exception as e:
                raise RuntimeFailure(f"cannot load {library}: {one_line(e, last=True)}") from e
            self.build = variant["profile"] if variant else None
            keys = (variant["weights"] if variant else (seg.weights or {}).get("keys")) or []
            if keys and seg.weights["file"] not in weights:
                with np.load(root / seg.weights["file"], allow_pickle=False) as z:
                    weights[seg.weights["file"]] = {k: tvm.runtime.tensor(z[k], device) for k in z.files}
            w = weights.get((seg.weights or {}).get("file"), {})
            self._segs[n] = (vm["main"], [t.name for t in seg.inputs], [t.name for t in seg.outputs], [w[k] for k in keys])
        spec = {t.name: t for t in segments[doc["decode"]].inputs}
        self.cache_shape = tuple(spec[self.cache_pairs[0][0]].shape)
        self.row_shape = tuple(spec[self.stream].shape[2:])  # () for token ids, (hidden,) for rows

    def segment_for(self, rows: int) -> int:
        """The segment that runs ``rows`` stream rows (at most the largest chunk does, the caller
        slicing longer ones): decode for one, else the smallest chunk they fit (padded)."""
        return 1 if rows == 1 else next((c for c in self.chunks if c >= rows), self.chunks[-1])

    def empty_cache(self) -> dict[str, Any]:
        zeros = np.zeros(self.cache_shape, np.float32)
        return {past: self.tvm.runtime.tensor(zeros, self.device) for past, _ in self.cache_pairs}

    def run(self, n: int, stream: np.ndarray, start: int, last: int, cache: dict[str, Any]):
        """Segment ``n`` (1: decode, else a prefill chunk) on ``stream`` (its first dims [1, ≤n],
        padded here) from position ``start``: (result as numpy, the new cache)."""
        tvm = self.tvm
        fn, in_names, out_names, weights = self._segs[n]
        padded = np.zeros((1, n, *self.row_shape), stream.dtype)
        padded[:, : stream.shape[1]] = stream
        small = {self.stream: padded, "start": np.array([start], np.int64), "last": np.array([last], np.int64)}
        args = [cache[name] if name in cache else tvm.runtime.tensor(small[name], self.device) for name in in_names]
        outs = fn(*args, *weights)
        outs = [outs] if len(out_names) == 1 else list(outs)
        by_name = dict(zip(out_names, outs))
        new = {past: by_name[present] for past, present in self.cache_pairs}
        return by_name[self.result].numpy(), new


class Generator:
    """A decoder artifact loaded once: its segments share one copy of the weights."""

    def __init__(self, artifact: str | Path, threads: int | None = None, verify_key=None, cloud_url: str | None = None,
                 token: str | None = None, timeout: float = 30.0, fallback: str = "auto"):  # fmt: skip
        if fallback not in ("auto", "off"):
            raise UsageError(f"fallback must be auto or off for a decoder, not {fallback!r}")
        self._artifact = open_artifact(artifact, verify_key)
        m = self._artifact.manifest
        if m.decoder is None:
            self._artifact.close()
            raise UsageError(f"{artifact} is not a decoder artifact (compile one with `tvm-hybrid compile MODEL "
                             "--decoder`); run other models with `tvm-hybrid run` or Session")  # fmt: skip
        if m.role == "cloud":
            self._artifact.close()
            raise UsageError(f"{artifact} is the cloud half of a split decoder: serve it (`tvm-hybrid serve`)")
        from ..hostcpu import check_native

        check_native(m.target, f"decoder artifact {artifact}")
        self.config = dict(m.decoder.get("config") or {})
        self.max_context = int(m.decoder["max_context"])
        self.threads = threads if threads is not None else resolve_threads(None)
        self.fallback = fallback
        self._tvm = tvm_runtime()
        self.device = self._tvm.cpu(0)
        self._by_id = {s.id: s for s in m.segments}
        self._weights: dict = {}
        self.local = DecoderHalf(self._tvm, self.device, self._artifact.root, m.decoder, self._by_id, self._weights)
        self.chunks = self.local.chunks
        self.split = m.decoder.get("split")
        self._cloud = None
        self._rest: DecoderHalf | None = None  # the cloud half on the device (fallback), loaded when needed
        if self.split is not None:
            if cloud_url is None and fallback == "off":
                raise UsageError(f"{artifact} runs layers {self.split['layers']}..{self.split['of'] - 1} in the cloud: "
                                 "give --cloud-url (or let the device run them: fallback auto)")  # fmt: skip
            fb = self._by_id[self.split["fallback"]["decode"]]
            logits = next((t for t in fb.outputs if t.name == "logits"), None)
            self._vocab = int(logits.shape[-1]) if logits is not None else self.config.get("vocab")
            if cloud_url is not None:
                from .cloud import CloudClient

                self._cloud = CloudClient(cloud_url, token, timeout)
        self._tokenizer = None
        tok = m.decoder.get("tokenizer")
        self._tokenizer_path = self._artifact.root / tok if tok else None
        self.trace: list[dict[str, Any]] = []
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: position 0 (a split one starts a new cloud sequence). The cache
        tensors are kept as they are: a query at position q reads rows 0..q only, and the new
        sequence has written each of them by then (zeros are needed once, against garbage that
        could be NaN)."""
        self._end_sequence()
        if getattr(self, "_cache", None) is None:
            self._cache = self.local.empty_cache()
        self.position = 0
        self._sequence = uuid.uuid4().hex
        self._started = False
        self._rows: list[np.ndarray] = []  # split: the hidden rows sent, one per position
        self._rest_cache = None
        self._fell_back: str | None = None
        self._stats = {"calls": 0, "bytes_up": 0, "bytes_down": 0, "ms": 0.0, "decode_calls": 0, "decode_bytes": 0}

    def close(self) -> None:
        self._end_sequence()
        if self._cloud is not None:
            self._cloud.close()
        self._artifact.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _end_sequence(self) -> None:
        """Tell the cloud the sequence is over (it frees that cache now rather than at expiry)."""
        if self._cloud is None or not getattr(self, "_started", False) or self._fell_back:
            return
        ep = self.split["endpoint"]
        try:
            self._cloud.infer(ep["model"], ep["version"], {}, {SEQUENCE_ID: self._sequence, SEQUENCE_END: True})
        except RuntimeFailure:
            pass  # it expires there anyway
        self._started = False

    # -- tokens -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_path is None:
                raise UsageError("this decoder artifact carries no tokenizer.json; pass token ids")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise UsageError("text in and out needs the tokenizers package: pip install tokenizers "
                                 "(or pass token ids)") from None  # fmt: skip
            self._tokenizer = Tokenizer.from_file(str(self._tokenizer_path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """The model's chat format for one user turn (ChatML-style templates), ready to generate."""
        template = self.config.get("chat_template") or ""
        if "<|im_start|>" not in template:
            return user
        sys_text = system or ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"
                              if "SmolLM" in template else "You are a helpful assistant.")  # fmt: skip
        return (f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n")

    # -- model calls ------------------------------------------------------------------------
    def _call(self, n: int, ids: list[int], top: int | None = None) -> np.ndarray:
        """Run ``ids`` (at most ``n``) through segment ``n`` at the position; the last one's logits."""
        use_threads(self.threads)
        t0 = time.perf_counter()
        out, self._cache = self.local.run(n, np.array([ids], np.int64), self.position, len(ids) - 1, self._cache)
        entry = {"tokens": len(ids), "device_ms": (time.perf_counter() - t0) * 1e3}
        if self.split is not None:
            rows = out[:, : len(ids)]
            out = self._rest_call(n, rows, top, entry)
            self._rows.append(rows[0])
        self.trace.append(entry)
        del self.trace[:-256]
        return out[0]

    def _rest_call(self, n: int, rows: np.ndarray, top: int | None, entry: dict) -> np.ndarray:
        """The layers after the split on ``rows``: in the cloud, or (fallen back) here."""
        if self._fell_back is None and self._cloud is not None:
            ep = self.split["endpoint"]
            params = {SEQUENCE_ID: self._sequence, **({SEQUENCE_START: True} if not self._started else {}),
                      **({TOP_LOGITS: top} if top else {})}  # fmt: skip
            # The real rows only: the server pads them to its chunk (the device's own chunking).
            feeds = {self.split["hidden"]: np.ascontiguousarray(rows, np.float32), "start": np.array([self.position], np.int64),
                     "last": np.array([rows.shape[1] - 1], np.int64)}  # fmt: skip
            try:
                outs, sent = self._cloud.infer(ep["model"], ep["version"], feeds, params)
            except RuntimeFailure as e:
                if self.fallback == "off":
                    raise
                self._fell_back = one_line(e, 300)
            else:
                self._started = True
                ex = self._cloud.last_exchange
                self._stats["calls"] += 1
                self._stats["bytes_up"] += sent
                self._stats["bytes_down"] += ex.bytes_down if ex else 0
                self._stats["ms"] += ex.ms if ex else 0.0
                if n == 1:  # what one generated token costs the link
                    self._stats["decode_calls"] += 1
                    self._stats["decode_bytes"] += sent + (ex.bytes_down if ex else 0)
                entry.update(where="cloud", bytes_up=sent, bytes_down=ex.bytes_down if ex else None,
                             cloud_ms=ex.ms if ex else None)  # fmt: skip
                return _logits(outs, self._vocab)
        elif self._fell_back is None:
            self._fell_back = "no cloud URL given"
        return self._local_rest(n, rows, entry)

    def _local_rest(self, n: int, rows: np.ndarray, entry: dict) -> np.ndarray:
        if self._rest is None:
            self._rest = DecoderHalf(self._tvm, self.device, self._artifact.root, self.split["fallback"], self._by_id,
                                     self._weights)  # fmt: skip
        if self._rest_cache is None:  # rebuild the cloud half's cache from the rows it was sent
            self._rest_cache = self._rest.empty_cache()
            history = np.concatenate(self._rows)[None] if self._rows else None
            pos = 0
            while history is not None and pos < history.shape[1]:
                part = history[:, pos : pos + self._rest.chunks[-1]]
                m = self._rest.segment_for(part.shape[1])
                _, self._rest_cache = self._rest.run(m, part, pos, part.shape[1] - 1, self._rest_cache)
                pos += part.shape[1]
            entry["fallback"] = self._fell_back
        t0 = time.perf_counter()
        out, self._rest_cache = self._rest.run(n, rows, self.position, rows.shape[1] - 1, self._rest_cache)
        entry.update(where="device-fallback", fallback_ms=(time.perf_counter() - t0) * 1e3)
        return out

    def prefill(self, ids: list[int], top: int | None = None) -> np.ndarray:
        """Run ``ids`` from the current position; returns the last token's logits."""
        if not ids:
            raise UsageError("nothing to prefill: the prompt has no tokens")
        if self.position + len(ids) > self.max_context:
            raise UsageError(f"the prompt needs {self.position + len(ids)} positions; this decoder's cache holds "
                             f"{self.max_context} (compile with a larger --max-context)")  # fmt: skip
        logits = None
        i = 0
        while i < len(ids):
            chunk = self.local.segment_for(len(ids) - i)
            part = ids[i : i + chunk]
            i += len(part)
            if len(part) == 1 or self.position + chunk > self.max_context:
                for t in part:  # one token, or the padded chunk would not fit the cache: token by token
                    logits = self.step(t, top)
                continue
            logits = self._call(chunk, part, top)
            self.position += len(part)
        return logits

    def step(self, token: int, top: int | None = None) -> np.ndarray:
        """Feed one token; returns the next token's logits."""
        if self.position >= self.max_context:
            raise UsageError(f"the cache is full ({self.max_context} tokens)")
        logits = self._call(1, [int(token)], top)
        self.position += 1
        return logits

    # -- generation -------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: list[int] | None = None,
               on_token: Callable[[int], None] | None = None) -> Iterator[str]:  # fmt: skip
        """Yield the continuation's text piece by piece (see ``generate``)."""
        result = {}
        yield from self._run(prompt, max_tokens, temperature, top_k, top_p, seed, stop, on_token, result)

    def generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[int] | None = None,
                 on_text: Callable[[str], None] | None = None) -> Generation:  # fmt: skip
        """Continue ``prompt`` (text, or token ids) from an empty cache; ``on_text`` gets each piece."""
        result: dict = {}
        for piece in self._run(prompt, max_tokens, temperature, top_k, top_p, seed, stop, None, result):
            if on_text is not None:
                on_text(piece)
        return result["generation"]

    def _run(self, prompt, max_tokens, temperature, top_k, top_p, seed, stop, on_token, result):
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be 1 or more, not {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise UsageError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        text_mode = isinstance(prompt, str)
        ids = self.encode(prompt) if text_mode else [int(t) for t in prompt]
        stops = set(stop if stop is not None else self.config.get("stop") or [])
        # What the cloud returns of the logits (split): all of them only when sampling needs all.
        top = 1 if temperature == 0 else (top_k if top_k else None)
        rng = np.random.default_rng(seed)
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(ids, top)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out: list[int] = []
        emitted = ""
        reason = "length"
        decode_ms = 0.0
        while True:
            token = sample(logits, temperature, top_k, top_p, rng)
            if token in stops:
                reason = "stop"
                break
            out.append(token)
            if on_token is not None:
                on_token(token)
            if text_mode:
                text = self.decode(out)
                if not text.endswith("\ufffd"):  # a multi-byte character is complete
                    yield text[len(emitted):]
                    emitted = text
            if len(out) >= max_tokens:
                break
            if self.position >= self.max_context:
                reason = "context"
                break
            t1 = time.perf_counter()
            logits = self.step(token, top)
            decode_ms += (time.perf_counter() - t1) * 1e3
        text = self.decode(out) if text_mode else ""
        if text_mode and len(text) > len(emitted):
            yield text[len(emitted):]
        cloud = None
        if self.split is not None:
            st = self._stats
            per = max(self.position, 1)
            cloud = {**st, "ms": round(st["ms"], 3), "layers_on_device": self.split["layers"], "layers": self.split["of"],
                     "bytes_up_per_token": round(st["bytes_up"] / per, 1), "bytes_down_per_token": round(st["bytes_down"] / per, 1),
                     "bytes_per_decode_token": round(st["decode_bytes"] / st["decode_calls"], 1) if st["decode_calls"] else None,
                     "fallback": self._fell_back}  # fmt: skip
        self._end_sequence()
        result["generation"] = Generation(text, out, len(ids), reason, round(prefill_ms, 3), round(decode_ms, 3), cloud)


def _logits(outs: dict[str, np.ndarray], vocab: int | None) -> np.ndarray:
    """[1, vocab] logits from a cloud reply: whole, or its top ones (ids and values) spread over
    a vector of -inf (what sampling among the top k sees)."""
    if "logits" in outs:
        return outs["logits"]
    ids, vals = outs.get("top_ids"), outs.get("top_logits")
    if ids is None or vals is None or vocab is None:
        raise RuntimeFailure("the cloud's decoder reply has neither logits nor top_ids/top_logits")
    full = np.full((1, int(vocab)), -np.inf, np.float32)
    full[0, ids[0].astype(np.int64)] = vals[0]
    return full


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:  # fmt: skip
    """The next token: argmax at temperature 0; else a draw from softmax(logits / temperature)
    restricted to the ``top_k`` most likely and the smallest set holding ``top_p`` of the mass."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    order = np.argsort(-logits)
    if top_k:
        order = order[:top_k]
    order = order[np.isfinite(logits[order])]
    z = logits[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
