"""The unit tests' own data (tests/fixtures): what the generator writes, in the formats the tests rely on."""

import importlib.util
import json
import re

from conftest import CORPUS, FIXTURES, PREFERENCE_DATA, SFT_DATA
from slmops.training import data


def _generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixtures_are_what_the_generator_writes():
    rendered = _generator().render()
    assert set(rendered) == {CORPUS.name, SFT_DATA.name, PREFERENCE_DATA.name}
    for name, text in rendered.items():
        assert (FIXTURES / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from make_fixtures.py; run python tests/fixtures/make_fixtures.py"
        )


def test_corpus_covers_what_the_tests_prompt_with():
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(set(lines)) == 400
    words = set(re.findall(r"[a-z]+", " ".join(lines).lower()))
    assert {
        "hello",
        "hi",
        "the",
        "sea",
        "forest",
        "trees",
        "river",
        "seeds",
        "tell",
        "me",
        "about",
        "question",
        "answer",
        "good",
        "bad",
        "kind",
        "rude",
        "bread",
        "sky",
        "blue",
        "birds",
        "water",
        "friend",
    } <= words


def test_sft_fixture_reads_as_alpaca():
    source = data.locate(str(SFT_DATA), None)
    rows = data.read_rows(source)
    assert data.detect_sft_format(rows, source.label) == "alpaca"
    assert all(set(row) == {"instruction", "input", "output"} for _, row in rows)
    assert any(row["input"] for _, row in rows) and any(not row["input"] for _, row in rows)
    train, held = data.load_splits(source, "sft", eval_split=0.25, seed=42)
    assert (len(train), len(held)) == (72, 24)  # 96 distinct rows
    with_input = next(row for _, row in rows if row["input"])
    example = data.normalise_sft([(1, with_input)], "x")[0]
    assert example["prompt"] == [{"role": "user", "content": f"{with_input['instruction']}\n\n{with_input['input']}"}]


def test_preference_fixture_reads_as_explicit_pairs():
    rows = data.read_rows(data.locate(str(PREFERENCE_DATA), None))
    assert all(set(row) == {"prompt", "chosen", "rejected"} for _, row in rows)
    examples = data.normalise_preference(rows, "prefs")
    assert len(examples) == len(data.dedupe(examples)) == 100
    assert all(e["prompt"][0]["role"] == "user" and e["chosen"] != e["rejected"] for e in examples)
    assert len(json.dumps(examples)) < 40_000  # small: the tiny DPO runs stay fast
