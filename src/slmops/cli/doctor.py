"""`slmops doctor`: check the environment and say what to fix."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

_MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(as_json: bool) -> None:
    """Check versions, execution providers, optional extras, cache, disk, the embedded model and data.

    Exits 1 when a check fails (a command would not work), 0 otherwise.
    """
    from slmops.core.doctor import run_checks
    from slmops.core.privacy import go_offline

    go_offline(olive=False)
    checks = run_checks()
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{_MARK[c.status]}  {c.name:<{width}}  {c.detail}")
            if c.fix:
                click.echo(f"      {'':<{width}}  fix: {c.fix}")
        failed = sum(c.status == "fail" for c in checks)
        warned = sum(c.status == "warn" for c in checks)
        click.echo(f"{failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")
    if any(c.status == "fail" for c in checks):
        raise SystemExit(1)
