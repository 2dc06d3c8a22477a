"""`slmops serve`: an OpenAI-compatible server over a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from slmops.cli.generate import variant_option


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="SLMOPS_API_KEY", help="Require Authorization: Bearer KEY.")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Requests decoded together, whatever their adapter (continuous batching).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Requests that may wait beyond those running; beyond that, 503.",
)
@click.option(
    "--max-context",
    type=click.IntRange(16),
    default=None,
    help="Tokens per request, prompt and reply (default: the model's context). The KV cache grows to "
    "max-batch x this at most.",
)
@click.option("--max-tokens-limit", type=click.IntRange(1), default=2048, show_default=True)
@click.option(
    "--admin-key",
    default=None,
    envvar="SLMOPS_ADMIN_KEY",
    help="Allow POST/DELETE /v1/adapters with Authorization: Bearer ADMIN_KEY.",
)
@click.option(
    "--adapter-dir",
    "adapter_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A folder adapters may be loaded from at run time (repeatable).",
)
@click.option(
    "--adapter-capacity",
    type=click.IntRange(1),
    default=None,
    help="LoRA rank columns for adapters, fixed at start (default: the bundle's adapters' plus 64). A "
    "rank-16 adapter on q/k/v and o takes 48; every column costs decode time.",
)
@click.option(
    "--prefix-cache-mb",
    type=click.IntRange(0),
    default=256,
    show_default=True,
    help="Memory for the KV of prompt prefixes (a chat template's system prompt, earlier turns), reused "
    "by later prompts that start the same way; 0 turns it off.",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: all cores).")
@click.option(
    "--no-batching",
    is_flag=True,
    help="Run each request on its own onnxruntime-genai generator (what non-CPU bundles do).",
)
@click.option(
    "--workers", type=click.IntRange(1), default=2, show_default=True, help="With --no-batching: generations at once."
)
@click.option(
    "--grace-period",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGTERM/SIGINT: seconds to finish running requests (new ones are refused) before stopping.",
)
@variant_option
def serve_command(
    bundle,
    host,
    port,
    api_key,
    max_batch,
    max_queue,
    max_context,
    max_tokens_limit,
    admin_key,
    adapter_dirs,
    adapter_capacity,
    prefix_cache_mb,
    threads,
    no_batching,
    workers,
    grace_period,
    variant,
) -> None:
    """Serve a bundle over HTTP with the OpenAI API: base and adapters are models."""
    import uvicorn

    from slmops.core.compat import interrupt_handled
    from slmops.core.errors import RunError
    from slmops.core.privacy import go_offline
    from slmops.shipping.serve import ServeOptions, create_app

    go_offline(olive=False)
    for folder in adapter_dirs:
        if not folder.is_dir():
            raise RunError(f"--adapter-dir {folder} does not exist or is not a folder; create it, or pass another")
    app = create_app(
        bundle,
        ServeOptions(
            api_key=api_key,
            admin_key=admin_key,
            adapter_dirs=tuple(adapter_dirs),
            batching=not no_batching,
            max_batch=max_batch,
            workers=workers,
            max_queue=max_queue,
            max_context=max_context,
            adapter_capacity=adapter_capacity,
            prefix_cache_mb=prefix_cache_mb,
            threads=threads,
            max_tokens_limit=max_tokens_limit,
            variant=variant,
        ),
    )
    click.echo(f"serving {bundle} on http://{host}:{port}/v1 (models: GET /v1/models)", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_period)
    try:
        uvicorn.Server(config).run()  # on SIGTERM/SIGINT it stops listening, then drains
    except KeyboardInterrupt:
        pass  # uvicorn raises the signal it caught again once drained
    interrupt_handled()  # a drained stop is a clean exit, not an interruption
    click.echo("stopped", err=True)
