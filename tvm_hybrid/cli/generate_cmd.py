"""`tvm-hybrid generate`: continue a prompt with a decoder artifact (compile --decoder)."""

from __future__ import annotations

import sys

import click

from .output import emit_json


@click.command("generate")
@click.argument("artifact", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn in the model's chat format.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Stop after this many new tokens (also at a stop token, or when the cache is full).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0, sample from the softened distribution.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample among the k likeliest (0: all).")
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True,
              help="Sample within the smallest set holding this much probability (nucleus).")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (same seed, same text).")
@click.option("--threads", type=int, default=None, metavar="N",
              help="CPU threads  [default: $TVM_NUM_THREADS, else every core this process may use].")
@click.option("--cloud-url", metavar="URL", help="Split decoders: the server running the cloud's layers (tvm-hybrid serve).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token for the cloud, in a file.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the cloud per call.")
@click.option("--fallback", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="Split decoders: auto: if the cloud fails, the device runs its layers (its own build) and goes on.")
@click.option("--verify-key", type=click.Path(dir_okay=False), envvar="TVM_HYBRID_VERIFY_KEY", show_envvar=True,
              help="PEM public key; the artifact must carry a valid signature by it (`tvm-hybrid sign`).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: text, tokens, stop reason, prefill ms, decode ms per token, tokens/s.")
def command(artifact: str, prompt: str, chat: bool, max_tokens: int, temperature: float, top_k: int, top_p: float,
            seed: int | None, threads: int | None, cloud_url: str | None, token_file: str | None, timeout: float,
            fallback: str, verify_key: str | None, as_json: bool) -> None:  # fmt: skip
    """Continue PROMPT with a decoder artifact; the text streams to stdout, timings to stderr.

    \b
    tvm-hybrid generate dist/llm/x86-64-avx512-vnni --prompt "The capital of France is" -n 16
    tvm-hybrid generate dist/llm/x86-64-avx512-vnni --chat -p "Name three colors." --temperature 0.7 --seed 1
    tvm-hybrid generate dist/llm/x86-64-avx512-vnni -p "Once upon a time" --json
    tvm-hybrid generate dist/split/x86-64 -p "The capital of France is" --cloud-url http://127.0.0.1:8000
    """
    from ..runtime.generate import Generator
    from ..runtime.threads import resolve as resolve_threads

    if threads is not None:
        threads = resolve_threads(threads, "--threads")
    from .serve_cmd import read_token

    gen = Generator(artifact, threads=threads, verify_key=verify_key, cloud_url=cloud_url, token=read_token(token_file),
                    timeout=timeout, fallback=fallback)  # fmt: skip
    try:
        text = gen.chat_prompt(prompt) if chat else prompt
        stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        out = gen.generate(text, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           on_text=stream)  # fmt: skip
    finally:
        gen.close()
    if as_json:
        emit_json({"artifact": artifact, "prompt": prompt, **out.to_dict(), "threads": gen.threads})
        return
    sys.stdout.write("\n")
    per = out.decode_ms_per_token
    click.echo(f"{out.prompt_tokens} prompt tokens in {out.prefill_ms:.0f} ms; {len(out.tokens)} generated"
               + (f", {per:.1f} ms/token ({1e3 / per:.1f} tokens/s)" if per else "")
               + f"; stopped: {out.stop_reason}", err=True)  # fmt: skip
    if out.cloud is not None:
        c = out.cloud
        click.echo(f"split: layers 0..{c['layers_on_device'] - 1} here, the rest in the cloud: {c['calls']} calls, "
                   f"{c['bytes_up_per_token']:.0f} bytes up and {c['bytes_down_per_token']:.0f} down per token"
                   + (f"; fell back to the device: {c['fallback']}" if c["fallback"] else ""), err=True)  # fmt: skip
