"""Property-based: no input makes the recipe loader, the data normaliser or the manifest reader raise
anything but slmops' own error types (which the CLI turns into one line and exit 2)."""

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.core.errors import SlmopsError
from slmops.shipping.manifest import MANIFEST, read_manifest
from slmops.training.data import (
    DataSource,
    normalise_preference,
    normalise_sft,
    read_rows,
    split_implicit_prompt,
)
from slmops.training.recipe import load_recipe, parse_override

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20,
)

SECTIONS = ["name", "model", "data", "method", "lora", "qlora", "training", "dpo", "export", "description"]
KEYS = [
    "name",
    "file",
    "dataset",
    "format",
    "r",
    "alpha",
    "target_modules",
    "max_steps",
    "learning_rate",
    "beta",
    "eval_split",
    "batch_size",
    "dtype",
    "precision",
    "target",
    "save_steps",
    "max_samples",
    "bogus",
]
recipe_like = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    scalars | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=6),
    max_size=7,
)


def _only_own_errors(call, *args):
    try:
        call(*args)
    except SlmopsError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message  # one line
    # anything else propagates and fails the test


@FAST
@given(text=st.text(max_size=300))
def test_recipe_loader_any_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _only_own_errors(load_recipe, str(path))


@FAST
@given(raw=recipe_like)
def test_recipe_loader_any_mapping(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    _only_own_errors(load_recipe, str(path))


@FAST
@given(data=st.binary(max_size=200))
def test_recipe_loader_any_bytes(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    _only_own_errors(load_recipe, str(path))


@FAST
@given(item=st.text(max_size=40))
def test_set_override_any_text(item):
    _only_own_errors(parse_override, item)


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_data_reader_any_bytes(tmp_path, data, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(data)

    def read_and_normalise():
        rows = read_rows(DataSource(path=str(path)))
        _only_own_errors(normalise_sft, rows, path.name)
        _only_own_errors(normalise_preference, rows, path.name)

    _only_own_errors(read_and_normalise)


@FAST
@given(
    header=st.sampled_from(["instruction,output", "prompt,chosen,rejected", "a,b", ""]),
    text=st.text(alphabet='ab,"\n\r ', max_size=60),
)
def test_csv_rows_any_shape(tmp_path, header, text):
    # ragged rows (more or fewer values than the header), quotes, blank lines
    path = tmp_path / "d.csv"
    path.write_text(header + "\n" + text, encoding="utf-8")

    def read_and_normalise():
        rows = read_rows(DataSource(path=str(path)))
        _only_own_errors(normalise_sft, rows, path.name)
        _only_own_errors(normalise_preference, rows, path.name)

    _only_own_errors(read_and_normalise)


rows = st.lists(
    st.dictionaries(
        st.sampled_from(
            [
                "instruction",
                "input",
                "output",
                "prompt",
                "completion",
                "response",
                "text",
                "messages",
                "conversations",
                "chosen",
                "rejected",
                "question",
                "answer",
                "role",
                "content",
            ]
        )
        | st.text(max_size=6),
        json_values
        | st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": scalars}),
            max_size=4,
        ),
        max_size=5,
    ),
    max_size=6,
)


@FAST
@given(rows=rows, fmt=st.sampled_from(["auto", "alpaca", "prompt_completion", "input_output", "messages", "text"]))
def test_sft_normaliser_any_rows(rows, fmt):
    numbered = [(i + 1, row) for i, row in enumerate(rows)]
    _only_own_errors(normalise_sft, numbered, "rows.jsonl", fmt)


@FAST
@given(rows=rows)
def test_preference_normaliser_any_rows(rows):
    _only_own_errors(normalise_preference, [(i + 1, row) for i, row in enumerate(rows)], "pairs.jsonl")


transcript = st.lists(
    st.tuples(
        st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "Human:", "\n\nH: ", ""]),
        st.text(alphabet=string.printable, max_size=20),
    ),
    max_size=6,
).map(lambda parts: "".join(a + b for a, b in parts))


@FAST
@given(chosen=transcript | st.text(max_size=80), rejected=transcript | st.text(max_size=80))
def test_implicit_prompt_split_never_raises(chosen, rejected):
    split = split_implicit_prompt(chosen, rejected)
    if split is not None:  # a split always keeps both answers and a prompt of messages
        assert set(split) >= {"prompt", "chosen", "rejected"}
        assert isinstance(split["prompt"], list) and split["prompt"]


@FAST
@given(value=json_values)
def test_manifest_reader_any_json(tmp_path, value):
    (tmp_path / MANIFEST).write_text(json.dumps(value), encoding="utf-8")
    _only_own_errors(read_manifest, tmp_path)


@FAST
@given(data=st.binary(max_size=200))
def test_manifest_reader_any_bytes(tmp_path, data):
    (tmp_path / MANIFEST).write_bytes(data)
    _only_own_errors(read_manifest, tmp_path)


@pytest.mark.parametrize("fields", [{}, {"format": "slmops-bundle"}])
def test_manifest_reader_near_misses(tmp_path, fields):
    (tmp_path / MANIFEST).write_text(json.dumps(fields))
    with pytest.raises(SlmopsError):
        read_manifest(Path(tmp_path))
