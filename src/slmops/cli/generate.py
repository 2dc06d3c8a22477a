"""`slmops generate` and `slmops chat`: run a bundle with onnxruntime-genai, switching adapters by name."""

from __future__ import annotations

import json
from pathlib import Path

import click


def sampling_options(f):
    for option in reversed(
        [
            click.option("--max-new-tokens", type=click.IntRange(1, 65536), default=128, show_default=True),
            click.option(
                "--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy."
            ),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
            click.option("--top-k", type=click.IntRange(1), default=50, show_default=True),
            click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output)."),
        ]
    ):
        f = option(f)
    return f


def _sampling(max_new_tokens, temperature, top_p, top_k, seed):
    from slmops.shipping.runtime import Sampling

    return Sampling(max_new_tokens, temperature, top_p, top_k, seed)


def variant_option(f):
    return click.option(
        "--variant",
        default=None,
        help="For a model package: the variant to run (default: the "
        "first whose device this machine has, GPU/NPU before CPU).",
    )(f)


@click.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-a", "--adapter", default=None, help="Adapter name from the bundle (default: the base model).")
@click.option("--merged", default=None, help="Run the bundle's merged variant NAME (export --merge NAME).")
@click.option("-p", "--prompt", required=True, help="The user's message (or raw text with --raw).")
@click.option("--system", default=None, help="A system message.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--stream/--no-stream", default=True, help="Print tokens as they come.")
@click.option("--json", "as_json", is_flag=True, help="Print the completion and its counts as JSON.")
@variant_option
@sampling_options
def generate_command(bundle, adapter, merged, prompt, system, raw, stream, as_json, variant, **sampling) -> None:
    """Generate a reply from a bundle (base model, one adapter, or a merged variant)."""
    from slmops.core.errors import RunError
    from slmops.shipping.runtime import Completion, Runtime

    if adapter and merged:
        raise RunError("--adapter and --merged conflict: a merged variant has its adapter built in; pass one")
    rt = Runtime(bundle, merged=merged, variant=variant)
    if adapter:
        rt.load_adapter(adapter)  # an unknown name fails before any work
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = prompt if raw else rt.chat_prompt(messages)
    result = Completion("", 0, 0, "length", 0.0)
    pieces = rt.stream(text, adapter, _sampling(**sampling), result=result)
    if as_json or not stream:
        for _ in pieces:
            pass
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "adapter": adapter,
                        "merged": merged,
                        "text": result.text,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "finish_reason": result.finish_reason,
                        "seconds": round(result.seconds, 3),
                    }
                )
            )
        else:
            click.echo(result.text)
        return
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    rate = result.completion_tokens / result.seconds if result.seconds else 0.0
    click.echo(
        f"[{adapter or 'base'}: {result.completion_tokens} tokens, {rate:.0f} tok/s, {result.finish_reason}]", err=True
    )


@click.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-a", "--adapter", default=None, help="Adapter to start with (default: the base model).")
@click.option("--system", default=None, help="A system message.")
@variant_option
@sampling_options
def chat_command(bundle, adapter, system, variant, **sampling) -> None:
    """Talk to a bundle. /adapter NAME switches adapter (/adapter base for none), /reset, /quit."""
    from slmops.core.errors import SlmopsError
    from slmops.shipping.runtime import Runtime

    rt = Runtime(bundle, variant=variant)
    if adapter:
        rt.load_adapter(adapter)
    options = _sampling(**sampling)
    history = [{"role": "system", "content": system}] if system else []
    click.echo(
        f"adapters: {', '.join(rt.adapter_names) or 'none'}; now: {adapter or 'base'}. /adapter NAME, /reset, /quit",
        err=True,
    )
    while True:
        try:
            line = click.prompt(f"{adapter or 'base'}>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if line.startswith("/adapter"):
            name = line[len("/adapter") :].strip()
            try:
                if name and name != "base":
                    rt.load_adapter(name)
                adapter = None if name in ("", "base") else name
            except SlmopsError as exc:
                click.echo(f"Error: {exc}", err=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in rt.stream(rt.chat_prompt(history), adapter, options):
                reply.append(piece)
                click.echo(piece, nl=False)
        except SlmopsError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            history.pop()
            click.echo(f"Error: {exc}; /reset starts over", err=True)
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})
