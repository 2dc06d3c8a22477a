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
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Generations at once.")
@click.option(
    "--max-queue",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Requests that may wait; beyond that, 503.",
)
@click.option("--max-tokens-limit", type=click.IntRange(1), default=2048, show_default=True)
@variant_option
def serve_command(bundle, host, port, api_key, workers, max_queue, max_tokens_limit, variant) -> None:
    """Serve a bundle over HTTP with the OpenAI API: base and adapters are models."""
    import uvicorn

    from slmops.core.privacy import go_offline
    from slmops.shipping.serve import ServeOptions, create_app

    go_offline(olive=False)
    app = create_app(
        bundle,
        ServeOptions(
            api_key=api_key, workers=workers, max_queue=max_queue, max_tokens_limit=max_tokens_limit, variant=variant
        ),
    )
    click.echo(f"serving {bundle} on http://{host}:{port}/v1 (models: GET /v1/models)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
