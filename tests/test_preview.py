"""`slmops data preview`: rows after the chat template and the mask, and the data's statistics."""

import json

from click.testing import CliRunner

from conftest import PREFERENCE_DATA, write_jsonl, write_recipe
from slmops.cli import cli

THREE_TURNS = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "plant trees"},
        {"role": "assistant", "content": "yes, many"},
        {"role": "user", "content": "which ones"},
        {"role": "assistant", "content": "oaks"},
        {"role": "user", "content": "and then"},
        {"role": "assistant", "content": "wait"},
    ]
}


def _preview(recipe, *args):
    result = CliRunner().invoke(cli, ["data", "preview", "-r", str(recipe), *args])
    assert result.exit_code == 0, result.output
    return result.output


def _spans(tokens: list[dict]) -> list[str]:
    spans, run = [], ""
    for token in [*tokens, {"text": "", "trained": False}]:
        if token["trained"]:
            run += token["text"]
        elif run:
            spans.append(run)
            run = ""
    return spans


def test_preview_json_shows_every_assistant_turn_trained(tiny_model, tmp_path):
    one_turn = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [THREE_TURNS, one_turn])
    recipe = write_recipe(tmp_path / "r.yaml", f"model:\n  name: {tiny_model}\ndata:\n  file: {data}\n")
    report = json.loads(_preview(recipe, "--json"))
    (stats,) = report["stats"]
    assert stats["stage"] == "sft" and stats["truncated_rows"] == 0
    first = report["rows"][0]
    assert set(first["tokens"][0]) == {"id", "text", "trained"}
    assert _spans(first["tokens"]) == ["yes, many<|im_end|>", "oaks<|im_end|>", "wait<|im_end|>"]
    trained = sum(t["trained"] for r in report["rows"] for t in r["tokens"])
    assert stats["trained_share"] == round(trained / stats["tokens"], 4)
    assert _spans(report["rows"][1]["tokens"]) == ["hello<|im_end|>"]
    last = json.loads(_preview(recipe, "--json", "--set", "data.train_on=last_assistant"))
    assert _spans(last["rows"][0]["tokens"]) == ["wait<|im_end|>"]


def test_preview_text_marks_trained_tokens_and_counts_truncation(tiny_model, tmp_path):
    rows = [
        {"messages": THREE_TURNS["messages"]},
        {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "ok"}]},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml", f"model:\n  name: {tiny_model}\ndata:\n  file: {data}\n  max_seq_len: 128\n"
    )
    text = _preview(recipe, "--rows", "1")
    assert "[[yes, many<|im_end|>]]" in text and "[[wait<|im_end|>]]" in text
    assert "sft: 2 rows" in text and "1 truncated" in text and "over max_seq_len 128" in text


def test_preview_preference_pairs(tiny_model, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", f"model:\n  name: {tiny_model}\ndpo:\n  data:\n    file: {PREFERENCE_DATA}\n"
    )
    report = json.loads(_preview(recipe, "--json", "--rows", "1"))
    (stats,) = report["stats"]
    assert stats["stage"] == "dpo" and stats["rows"] > 1
    assert [r["kind"] for r in report["rows"]] == ["chosen", "rejected"]
    chosen = report["rows"][0]["tokens"]
    assert not chosen[0]["trained"] and chosen[-1]["trained"]  # the prompt is not trained, the answer is
