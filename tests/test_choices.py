"""Each list of choices is written once (slmops.core.choices); the tables keyed by them cover exactly those."""

from typing import get_args

from click.testing import CliRunner

from slmops.cli import cli
from slmops.core import choices
from slmops.shipping.export import TARGETS
from slmops.training.recipe import ExportSection


def test_targets_and_providers_cover_the_target_choices():
    assert set(TARGETS) == set(choices.TARGET_CHOICES) == set(choices.PROVIDERS)
    assert all(set(t.precisions) <= set(choices.PRECISIONS) for t in TARGETS.values())


def test_recipe_schema_uses_the_choices():
    fields = ExportSection.model_fields
    assert get_args(fields["target"].annotation) == choices.TARGET_CHOICES
    assert set(get_args(fields["int4_algo"].annotation)) == set(choices.INT4_ALGOS)
    assert get_args(fields["block_size"].annotation) == choices.BLOCK_SIZES


def test_cli_offers_the_same_choices():
    def choices_of(command: str, option: str) -> tuple:
        param = next(p for p in cli.commands[command].params if p.name == option)
        return tuple(param.type.choices)

    assert choices_of("export", "target") == choices_of("bench", "ep") == choices.TARGET_CHOICES
    assert choices_of("export", "precision") == choices.PRECISION_CHOICES
    assert choices_of("export", "int4_algo") == choices.INT4_ALGOS
    assert choices_of("export", "kv_cache") == choices.KV_CACHES
    assert choices_of("export", "block_size") == tuple(str(b) for b in choices.BLOCK_SIZES)
    assert choices_of("finetune", "report_to") == choices.TRACKERS


def test_an_unknown_choice_is_one_line_naming_the_choices():
    result = CliRunner().invoke(cli, ["export", "-t", "tpu", "-o", "x"])
    assert result.exit_code == 2 and "'tpu' is not one of 'cpu', 'cuda'" in result.output
