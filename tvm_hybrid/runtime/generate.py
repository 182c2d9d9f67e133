"""Text generation with a decoder artifact (``compile --decoder``): KV cache, sampling, streaming.

    from tvm_hybrid.runtime import Generator
    gen = Generator("dist/smollm2/x86-64-avx512-vnni")
    out = gen.generate("The capital of France is", max_tokens=16)      # greedy
    print(out.text, out.decode_ms_per_token)
    for piece in gen.stream("Once upon a time", temperature=0.8, top_p=0.9, seed=1):
        print(piece, end="", flush=True)

The KV cache lives in TVM tensors on the device between calls: each call's present_* outputs
are the next call's past_* inputs as they are (never copied to numpy). The prompt runs through
the prefill segment a chunk at a time (the last chunk padded; its padded rows are overwritten
by the next tokens before any query can see them), then one token a call through the decode
segment. Greedy by default; ``temperature`` > 0 samples, after ``top_k`` and ``top_p``
(nucleus) filtering, from a seeded generator. Generation stops at a stop token (the model's
EOS and chat end tokens, or ``stop``), at ``max_tokens``, or when the cache is full.
Only the TVM runtime and numpy are needed; text in and out needs the ``tokenizers`` package.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ArtifactError, RuntimeFailure, UsageError, one_line
from ._tvm import tvm_runtime
from .artifact import open_artifact
from .threads import resolve as resolve_threads
from .threads import use as use_threads


@dataclasses.dataclass
class Generation:
    """One generate() call: the continuation and how long each phase took."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    stop_reason: str  # "stop" (a stop token), "length" (max_tokens), "context" (cache full)
    prefill_ms: float
    decode_ms: float  # all decode steps together

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


class Generator:
    """A decoder artifact loaded once: its two segments share one copy of the weights."""

    def __init__(self, artifact: str | Path, threads: int | None = None, verify_key=None):
        self._artifact = open_artifact(artifact, verify_key)
        m = self._artifact.manifest
        if m.decoder is None:
            raise UsageError(f"{artifact} is not a decoder artifact (compile one with `tvm-hybrid compile MODEL "
                             "--decoder`); run other models with `tvm-hybrid run` or Session")  # fmt: skip
        from ..hostcpu import check_native

        check_native(m.target, f"decoder artifact {artifact}")
        self.config = dict(m.decoder.get("config") or {})
        self.chunks = sorted(int(p["tokens"]) for p in m.decoder["prefill"])
        self.max_context = int(m.decoder["max_context"])
        self.cache_pairs = [tuple(p) for p in m.decoder["cache"]]
        self.threads = threads if threads is not None else resolve_threads(None)
        tvm = tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        from .executors import _loadable

        self._tvm = tvm
        self.device = tvm.cpu(0)
        root = self._artifact.root
        by_id = {s.id: s for s in m.segments}
        weights: dict[str, object] = {}
        self._segs = {}
        roles = [("decode", m.decoder["decode"])] + [(p["tokens"], p["segment"]) for p in m.decoder["prefill"]]
        for role, sid in roles:
            seg = by_id[sid]
            try:
                vm = VirtualMachine(tvm.runtime.load_module(str(_loadable(root / seg.library))), self.device)
            except Exception as e:
                raise RuntimeFailure(f"cannot load {seg.library}: {one_line(e, last=True)}") from e
            keys = (seg.weights or {}).get("keys") or []
            if keys and not weights:
                with np.load(root / seg.weights["file"], allow_pickle=False) as z:
                    for k in z.files:
                        weights[k] = tvm.runtime.tensor(z[k], self.device)
            self._segs[role] = (vm["main"], [t.name for t in seg.inputs], [t.name for t in seg.outputs],
                                [weights[k] for k in keys])  # fmt: skip
        spec = {t.name: t for t in by_id[m.decoder["decode"]].inputs}
        self._cache_shape = tuple(spec[self.cache_pairs[0][0]].shape)
        self._zeros = np.zeros(self._cache_shape, np.float32)
        self._tokenizer = None
        if m.decoder.get("tokenizer"):
            self._tokenizer_path = root / m.decoder["tokenizer"]
        else:
            self._tokenizer_path = None
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: an empty cache, position 0."""
        self._cache = {past: self._tvm.runtime.tensor(self._zeros, self.device) for past, _ in self.cache_pairs}
        self.position = 0

    def close(self) -> None:
        self._artifact.close()

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
    def _call(self, role, ids: list[int], last: int) -> np.ndarray:
        """Run ``ids`` through segment ``role`` ("decode", or a prefill chunk's size) at the position."""
        tvm = self._tvm
        fn, in_names, out_names, weights = self._segs[role]
        n = 1 if role == "decode" else role
        padded = np.zeros((1, n), np.int64)
        padded[0, : len(ids)] = ids
        small = {"input_ids": padded, "start": np.array([self.position], np.int64), "last": np.array([last], np.int64)}
        args = [self._cache[name] if name in self._cache else tvm.runtime.tensor(small[name], self.device)
                for name in in_names]  # fmt: skip
        use_threads(self.threads)
        outs = fn(*args, *weights)
        outs = [outs] if len(out_names) == 1 else list(outs)
        by_name = dict(zip(out_names, outs))
        for past, present in self.cache_pairs:
            self._cache[past] = by_name[present]
        return by_name["logits"].numpy()[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run ``ids`` from the current position; returns the last token's logits."""
        if not ids:
            raise UsageError("nothing to prefill: the prompt has no tokens")
        if self.position + len(ids) > self.max_context:
            raise UsageError(f"the prompt needs {self.position + len(ids)} positions; this decoder's cache holds "
                             f"{self.max_context} (compile with a larger --max-context)")  # fmt: skip
        logits = None
        i = 0
        while i < len(ids):
            left = len(ids) - i
            # The smallest chunk the rest fits in (padded), else the largest, full.
            chunk = next((c for c in self.chunks if c >= left), self.chunks[-1])
            part = ids[i : i + chunk]
            i += len(part)
            if len(part) == 1 or self.position + chunk > self.max_context:
                for t in part:  # one token, or the padded chunk would not fit the cache: token by token
                    logits = self.step(t)
                continue
            logits = self._call(chunk, part, len(part) - 1)
            self.position += len(part)
        return logits

    def step(self, token: int) -> np.ndarray:
        """Feed one token; returns the next token's logits."""
        if self.position >= self.max_context:
            raise UsageError(f"the cache is full ({self.max_context} tokens)")
        logits = self._call("decode", [int(token)], 0)
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
        rng = np.random.default_rng(seed)
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
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
            logits = self.step(token)
            decode_ms += (time.perf_counter() - t1) * 1e3
        text = self.decode(out) if text_mode else ""
        if text_mode and len(text) > len(emitted):
            yield text[len(emitted):]
        result["generation"] = Generation(text, out, len(ids), reason, round(prefill_ms, 3), round(decode_ms, 3))


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
    z = logits[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def is_decoder(artifact: str | Path) -> bool:
    """Whether an artifact directory holds a decoder (without loading it)."""
    from .. import manifest as mf

    try:
        return mf.read(Path(artifact)).decoder is not None
    except (ArtifactError, OSError):
        return False
