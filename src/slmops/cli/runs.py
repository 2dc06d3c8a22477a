"""`slmops runs list|show`: the local runs index (fine-tunes, sweeps and their trials)."""

from __future__ import annotations

import json

import click


@click.group("runs")
def runs_group() -> None:
    """The local runs index (./runs, or $SLMOPS_RUNS_DIR): fine-tunes, sweeps and their trials."""


@runs_group.command("list")
@click.option("--kind", type=click.Choice(["finetune", "sweep", "trial"]), default=None, help="Only runs of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def runs_list(kind, as_json) -> None:
    """Every run, oldest first: id, status, recipe, objective or eval loss, time."""
    from slmops.training.runs import list_runs, runs_dir

    records = [r for r in list_runs() if kind is None or r["kind"] == kind]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo(f"no runs in {runs_dir()}")
        return
    click.echo(f"{'id':<48} {'status':<11} {'metric':>20} {'seconds':>8}")
    for r in records:
        click.echo(f"{r['id']:<48} {r['status']:<11} {_metric(r):>20} {r.get('seconds') or '-':>8}")


def _metric(record: dict) -> str:
    if isinstance(record.get("objective"), dict) and record["objective"].get("value") is not None:
        return f"{record['objective']['name']} {record['objective']['value']:.4f}"
    if record.get("best"):
        name = next(k for k in record["best"] if k not in ("trial", "params", "adapter"))
        return f"best {name} {record['best'][name]:.4f}"
    losses = [m["eval_loss"] for m in (record.get("metrics") or {}).values() if m.get("eval_loss") is not None]
    return f"eval_loss {losses[-1]:.4f}" if losses else "-"


@runs_group.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def runs_show(run_id, as_json) -> None:
    """One run's record: recipe, data hashes, metrics, durations, outputs (the loss plot among them)."""
    from slmops.training.runs import find_run

    record = find_run(run_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        else:
            click.echo(f"{key}: {json.dumps(value) if isinstance(value, list) else value}")
