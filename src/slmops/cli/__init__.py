"""The `slmops` command line: a thin skin over the library. Errors become one line and exit 2 (a failed check: 1)."""

from __future__ import annotations

import logging

import click

from slmops import __version__
from slmops.core.errors import SlmopsError, disk_full


class UserError(click.ClickException):
    """A SlmopsError at the CLI edge: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


class SlmopsGroup(click.Group):
    def invoke(self, ctx: click.Context):
        from slmops.core.compat import honour_interrupts

        try:
            with honour_interrupts():
                return super().invoke(ctx)
        except SlmopsError as exc:
            error = UserError(str(exc))
            # click types exit_code as a ClassVar; its main() reads it from the instance, so this works
            error.exit_code = exc.exit_code  # type: ignore[misc]
            raise error from None
        except KeyboardInterrupt:
            click.echo(
                "\nInterrupted: partial output removed (a fine-tune keeps its last checkpoint for --resume).", err=True
            )
            raise SystemExit(130) from None
        except Exception as exc:
            full = disk_full(exc)
            if full is None:
                raise
            where = f" writing {full.filename}" if full.filename else ""
            raise UserError(
                f"no space left on the device{where}; free some space, or write the output to "
                "another disk (-o/--output, SLMOPS_CACHE_DIR)"
            ) from None


@click.group(cls=SlmopsGroup)
@click.version_option(__version__, prog_name="slmops")
@click.option("-v", "--verbose", is_flag=True, help="Show library logs (Olive, transformers).")
def cli(verbose: bool) -> None:
    """Fine-tune, align and ship small language models, with Microsoft Olive as the engine."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("slmops").setLevel(logging.INFO if verbose else logging.WARNING)


def _register() -> None:
    from slmops.cli import (
        bench,
        compare,
        data,
        doctor,
        export,
        finetune,
        generate,
        package,
        recipes,
        runs,
        serve,
        sweep,
    )
    from slmops.cli import eval as eval_cli

    cli.add_command(finetune.finetune_command)
    cli.add_command(sweep.sweep_command)
    cli.add_command(runs.runs_group)
    cli.add_command(export.export_command)
    cli.add_command(export.verify_command)
    cli.add_command(package.package_command)
    cli.add_command(generate.generate_command)
    cli.add_command(generate.chat_command)
    cli.add_command(bench.bench_command)
    cli.add_command(serve.serve_command)
    cli.add_command(eval_cli.eval_command)
    cli.add_command(compare.compare_command)
    cli.add_command(recipes.recipes_group)
    cli.add_command(data.data_group)
    cli.add_command(doctor.doctor_command)


_register()


def main() -> None:
    cli(prog_name="slmops")
