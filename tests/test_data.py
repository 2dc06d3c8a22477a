import json

import pytest

from conftest import write_jsonl
from slmops.core.errors import DataError
from slmops.training import data
from slmops.training.data import load_splits, normalise_sft


def _rows(*rows):
    return list(enumerate(rows, start=1))


# --- SFT formats -------------------------------------------------------------------------------


def test_alpaca_with_and_without_input():
    examples = data.normalise_sft(
        _rows(
            {"instruction": "Translate", "input": "hola", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ),
        "t",
    )
    assert examples[0] == {"prompt": [{"role": "user", "content": "Translate\n\nhola"}], "completion": "hello"}
    assert examples[1]["prompt"][0]["content"] == "Say hi"


def test_input_output_and_prompt_completion_and_system():
    io = data.normalise_sft(_rows({"input": "q", "output": "a", "system": "be brief"}), "t")
    assert io == [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], "completion": "a"}
    ]
    pc = data.normalise_sft(_rows({"prompt": "q", "completion": "a"}), "t")
    assert pc == [{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}]


def test_messages_and_sharegpt():
    msgs = data.normalise_sft(
        _rows(
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "t",
    )
    assert msgs == [
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completion": "a"}
    ]
    share = data.normalise_sft(
        _rows({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}), "t"
    )
    assert share == [{"prompt": [{"role": "user", "content": "u"}], "completion": "a"}]


def test_plain_text():
    assert data.normalise_sft(_rows({"text": "once upon"}), "t") == [{"prompt": None, "completion": "once upon"}]


def test_explicit_format_overrides_detection():
    # rows have both prompt/completion and text; detection picks prompt_completion, the recipe says text
    rows = _rows({"prompt": "p", "completion": "c", "text": "whole"})
    assert data.normalise_sft(rows, "t", "text") == [{"prompt": None, "completion": "whole"}]
    assert data.normalise_sft(rows, "t")[0]["completion"] == "c"


def test_undetectable_format():
    with pytest.raises(DataError, match=r"cannot tell the format from columns \['answer', 'question'\]"):
        data.normalise_sft(_rows({"question": "q", "answer": "a"}), "f.jsonl")


def test_preference_data_refused_for_sft():
    with pytest.raises(DataError, match="that is preference data; use it for DPO"):
        data.normalise_sft(_rows({"chosen": "a", "rejected": "b"}), "f.jsonl")


def test_all_bad_rows_reported_with_row_and_field():
    rows = _rows(
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output"},
        {"instruction": 3, "output": "x"},
        {"instruction": "empty", "output": "  "},
    )
    with pytest.raises(DataError) as err:
        data.normalise_sft(rows, "f.jsonl")
    assert str(err.value) == (
        "f.jsonl: 3 bad row(s): row 2 field 'output': is missing; row 3 field 'instruction': expected text, "
        "got int; row 4 field 'output': is empty; fix those rows or set data.format (read as 'alpaca')"
    )


def test_problem_list_is_capped():
    rows = _rows(*([{"input": "x"}] * 30))
    rows[0] = (1, {"input": "x", "output": "y"})
    with pytest.raises(DataError, match=r"29 bad row\(s\).*\(and 19 more\)"):
        data.normalise_sft(rows, "f")


def test_messages_must_end_with_assistant():
    with pytest.raises(DataError, match="row 1 field 'messages': the last message must be the assistant's answer"):
        data.normalise_sft(_rows({"messages": [{"role": "user", "content": "u"}]}), "f")


# --- Reading files ----------------------------------------------------------------------------


def test_reads_jsonl_json_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"input": "q", "output": "a"}
    write_jsonl(tmp_path / "d.jsonl", [row, row])
    (tmp_path / "d.json").write_text(json.dumps({"data": [row]}))
    (tmp_path / "d.csv").write_text("input,output\nq,a\n")
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "d.parquet")
    for name, first_row in [("d.jsonl", 1), ("d.json", 1), ("d.csv", 2), ("d.parquet", 1)]:
        rows = data.read_rows(data.locate(str(tmp_path / name), None))
        assert rows[0] == (first_row, row), name


def test_jsonl_bad_lines_are_numbered(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "q", "output": "a"}\n\n{broken\n[1, 2]\n')
    with pytest.raises(DataError, match=r"2 bad row\(s\): row 3: invalid JSON .*; row 4: expected a JSON object"):
        data.read_rows(data.locate(str(path), None))


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2 is not UTF-8 text; re-save the file as UTF-8"):
        data.read_rows(data.locate(str(path), None))


def test_empty_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the data set is empty"):
        data.read_rows(data.locate(str(tmp_path / "d.jsonl"), None))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        data.read_rows(data.locate(str(tmp_path / "d.txt"), None))


def test_locate_uses_data_dir_and_hashes(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "t"}])
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    source = data.locate("some/where/x.jsonl", "org/x")
    assert source.path == str((tmp_path / "x.jsonl").resolve())
    assert source.sha256 == data.file_sha256(tmp_path / "x.jsonl")


def test_locate_offline_without_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    with pytest.raises(
        DataError,
        match=r"data file 'nope.jsonl' not found: looked at nope.jsonl and .*nope.jsonl "
        r"\(SLMOPS_DATA_DIR is .*\); the hub \(for org/ds\) is offline; set SLMOPS_DATA_DIR",
    ):
        data.locate("nope.jsonl", "org/ds")


def test_changed_file_is_detected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    spec = {"path": str(path), "sha256": data.file_sha256(path)}
    assert data.source_from_dict(spec).path == str(path)
    write_jsonl(path, [{"text": "b"}])
    with pytest.raises(DataError, match="the file changed since the run was planned"):
        data.source_from_dict(spec)


# --- Real data --------------------------------------------------------------------------------


def test_h4rmony_reads_and_dedupes(shared_data):
    source = data.locate("h4rmony_alpaca.jsonl", None)
    train, held = data.load_splits(source, "sft", eval_split=0.1, seed=42)
    assert (len(train), len(held)) == (462, 51)  # 517 rows, 4 exact duplicates
    assert train[0]["prompt"][0]["content"].startswith("Below is an instruction")
    again, held_again = data.load_splits(source, "sft", eval_split=0.1, seed=42)
    assert held_again == held
    _, other = data.load_splits(source, "sft", eval_split=0.1, seed=7)
    assert other != held
    assert not {json.dumps(e, sort_keys=True) for e in held} & {json.dumps(e, sort_keys=True) for e in train}


def test_hh_rlhf_implicit_prompt_split(shared_data):
    rows = data.read_rows(data.locate("hh_rlhf_harmless_1k.jsonl", None))
    examples = data.normalise_preference(rows, "hh")
    assert len(examples) == len(rows)
    first, raw = examples[0], rows[0][1]
    assert first["prompt"][-1]["role"] == "user"
    assert all(m["role"] in ("user", "assistant") for m in first["prompt"])
    assert raw["chosen"].startswith("\n\nHuman: " + first["prompt"][0]["content"])
    assert raw["chosen"].rstrip().endswith(first["chosen"])
    assert raw["rejected"].rstrip().endswith(first["rejected"])
    assert first["chosen"] != first["rejected"]
    assert not first["chosen"].startswith("Assistant:")


# --- Preference formats -----------------------------------------------------------------------


def test_implicit_prompt_split_multi_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix sand."
    ex = data.split_implicit_prompt(chosen, rejected)
    assert ex == {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How do I bake bread?"},
        ],
        "chosen": "Mix flour and water.",
        "rejected": "Mix sand.",
    }


def test_implicit_prompt_split_without_markers():
    ex = data.split_implicit_prompt("The sky is blue today", "The sky is green today")
    assert ex == {
        "prompt": [{"role": "user", "content": "The sky is"}],
        "chosen": "blue today",
        "rejected": "green today",
    }
    assert data.split_implicit_prompt("abc", "xyz") is None


def test_explicit_preference_strings_and_messages():
    ex = data.normalise_preference(
        _rows(
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            },
        ),
        "t",
    )
    assert ex[0] == ex[1] == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}


def test_implicit_message_lists():
    conv = [{"role": "user", "content": "q"}]
    ex = data.normalise_preference(
        _rows(
            {
                "chosen": conv + [{"role": "assistant", "content": "good"}],
                "rejected": conv + [{"role": "assistant", "content": "bad"}],
            }
        ),
        "t",
    )
    assert ex == [{"prompt": conv, "chosen": "good", "rejected": "bad"}]


def test_bad_preference_rows():
    rows = _rows(
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"chosen": "alpha", "rejected": "omega"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    )
    with pytest.raises(DataError) as err:
        data.normalise_preference(rows, "p.jsonl")
    assert str(err.value) == (
        "p.jsonl: 3 bad row(s): row 1 field 'rejected': is missing; row 2 field 'rejected': is the same as chosen; "
        "row 3 field 'prompt': is empty: chosen and rejected share no prompt; add a prompt column; "
        "fix those rows (each needs a prompt, and chosen different from rejected)"
    )


# --- Tokenisation -----------------------------------------------------------------------------


def test_tokenize_masks_prompt_and_keeps_examples_apart(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = [
        {"prompt": [{"role": "user", "content": "plant trees"}], "completion": "yes, many trees"},
        {"prompt": None, "completion": "plain text"},
    ]
    first, second = data.tokenize_sft(examples, tok, max_seq_len=128)
    n_prompt = next(i for i, label in enumerate(first["labels"]) if label != data.IGNORE_INDEX)
    prompt_text = tok.apply_chat_template(examples[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(first["input_ids"][:n_prompt]) == prompt_text
    assert _trained_spans(tok, first) == ["yes, many trees<|im_end|>"]  # not the template's newline after it
    assert tok.decode(first["input_ids"][n_prompt:]) == "yes, many trees<|im_end|>\n"
    assert data.IGNORE_INDEX not in second["labels"]  # plain text: every token is trained on
    assert tok.decode(second["input_ids"]) == "plain text<|im_end|>"


def test_tokenize_truncates_prompt_before_answer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = {"prompt": [{"role": "user", "content": "trees " * 200}], "completion": "short answer"}
    (feat,) = data.tokenize_sft([long], tok, max_seq_len=32)
    assert len(feat["input_ids"]) == 32
    assert tok.decode([t for t in feat["labels"] if t != data.IGNORE_INDEX]) == "short answer<|im_end|>"


QWEN_STYLE = (  # Qwen2.5's shape: a default system prompt when the conversation has none
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if not (m['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "plant trees"},
    {"role": "assistant", "content": "yes, many"},
    {"role": "user", "content": "which ones"},
    {"role": "assistant", "content": "oaks"},
    {"role": "tool", "content": "oak: slow"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "wait"},
]


def _trained_spans(tok, feature) -> list[str]:
    """The trained tokens, decoded run by run."""
    spans, run = [], []
    for label in [*feature["labels"], data.IGNORE_INDEX]:
        if label == data.IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            run.append(label)
    return spans


def _as_example(messages):
    return {"prompt": messages[:-1], "completion": messages[-1]["content"]}


@pytest.fixture(params=["chatml", "qwen-style", "smollm2"])
def chat_tokenizer(request, tiny_model):
    from transformers import AutoTokenizer

    if request.param == "smollm2":  # the real one, with its default system prompt
        from slmops.core.models import DEFAULT_MODEL, resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    if request.param == "qwen-style":
        tok.chat_template = QWEN_STYLE
    return tok


def test_every_assistant_turn_is_trained(chat_tokenizer):
    stats = data.TokenStats()
    (feat,) = data.tokenize_sft([_as_example(CONVERSATION)], chat_tokenizer, 512, stats=stats)
    assert _trained_spans(chat_tokenizer, feat) == ["yes, many<|im_end|>", "oaks<|im_end|>", "wait<|im_end|>"]
    assert chat_tokenizer.decode(feat["input_ids"]) == chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert stats.trained == sum(label != data.IGNORE_INDEX for label in feat["labels"]) and stats.last_turn_only == 0


def test_last_assistant_trains_only_the_final_answer(chat_tokenizer):
    (feat,) = data.tokenize_sft([_as_example(CONVERSATION)], chat_tokenizer, 512, train_on="last_assistant")
    assert _trained_spans(chat_tokenizer, feat) == ["wait<|im_end|>"]


def test_a_long_conversation_loses_whole_early_exchanges(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conversation = [{"role": "system", "content": "be brief"}, *CONVERSATION]
    whole = len(data.tokenize_sft([_as_example(conversation)], tok, 512)[0]["input_ids"])
    stats = data.TokenStats()
    (feat,) = data.tokenize_sft([_as_example(conversation)], tok, whole - 1, stats=stats)
    text = tok.decode(feat["input_ids"])
    assert text.startswith("<|im_start|>system\nbe brief") and "plant trees" not in text and "which ones" in text
    assert _trained_spans(tok, feat) == ["oaks<|im_end|>", "wait<|im_end|>"]
    assert (stats.truncated_rows, stats.dropped_turns) == (1, 1)
    assert "1 of 1 examples were over max_seq_len" in data.truncation_note(stats, whole - 1)


def test_a_template_that_rewrites_earlier_turns_trains_the_last_answer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # earlier answers hidden, as reasoning templates do: a conversation is not the run of its prefixes
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    stats = data.TokenStats()
    (feat,) = data.tokenize_sft([_as_example(CONVERSATION)], tok, 512, stats=stats)
    assert _trained_spans(tok, feat) == ["wait<|im_end|>"] and stats.last_turn_only == 1


def test_tokenize_without_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    (feat,) = data.tokenize_sft(
        [{"prompt": [{"role": "user", "content": "Q:"}], "completion": "A"}], tok, 64, use_chat_template=False
    )
    n_prompt = feat["labels"].count(data.IGNORE_INDEX)
    assert tok.decode(feat["input_ids"][:n_prompt]) == "Q:\n"
    assert tok.decode(feat["input_ids"][n_prompt:]) == "A<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Text templates (classification as generation) and split slices


TEMPLATE = {
    "prompt": "Classify the sentiment: {sentence}",
    "completion": "{label}",
    "value_names": {"label": {0: "negative", 1: "neutral", "2": "positive"}},
}


def test_template_fills_columns_and_names_values():
    rows = [(1, {"sentence": "Profit rose.", "label": 2}), (2, {"sentence": "Flat year.", "label": "1"})]
    examples = normalise_sft(rows, "phrases.csv", "template", TEMPLATE)
    assert examples == [
        {"prompt": [{"role": "user", "content": "Classify the sentiment: Profit rose."}], "completion": "positive"},
        {"prompt": [{"role": "user", "content": "Classify the sentiment: Flat year."}], "completion": "neutral"},
    ]


def test_template_reports_missing_columns_and_unnamed_values():
    rows = [(1, {"sentence": "x", "label": 7}), (2, {"label": 0})]
    with pytest.raises(DataError) as err:
        normalise_sft(rows, "phrases.csv", "template", TEMPLATE)
    message = str(err.value)
    assert (
        "2 bad row(s)" in message
        and "row 1 field 'label': value 7 has no name in template.value_names.label" in message
        and "row 2 field 'sentence': is missing (the template names it)" in message
    )


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train", range(10)),
        ("train[:3]", range(3)),
        ("train[7:]", range(7, 10)),
        ("train[-2:]", range(8, 10)),
        ("train[50%:]", range(5, 10)),
        ("train[10%:30%]", range(1, 3)),
    ],
)
def test_split_slices_of_a_local_file(split, expected):
    from slmops.training.data import split_range

    assert list(split_range(split, 10)) == list(expected)


def test_slices_train_and_evaluate_on_disjoint_rows(tmp_path):
    from slmops.training.data import locate

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(10)))
    train, held = load_splits(locate(str(path), None, "train[:6]"), eval_split="train[6:8]")
    assert [e["completion"] for e in train] == [f"c{i}" for i in range(6)]
    assert [e["completion"] for e in held] == ["c6", "c7"]
    with pytest.raises(DataError, match="eval_split train\\[5:8\\] shares 1 rows with split train\\[:6\\]"):
        load_splits(locate(str(path), None, "train[:6]"), eval_split="train[5:8]")
    with pytest.raises(DataError, match="a local file has only the train split, not 'test'"):
        load_splits(locate(str(path), None, "test[:6]"))


# --- Hugging Face dataset folders (data.dataset naming a local folder) --------------------------


def _qa_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(start, start + n)]


@pytest.fixture
def saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_qa_rows(10)), "test": datasets.Dataset.from_list(_qa_rows(3, 100))}
    ).save_to_disk(str(folder))
    return folder


@pytest.fixture
def parquet_dataset(tmp_path):
    import datasets

    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_list(_qa_rows(10)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(_qa_rows(3, 100)).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize("kind", ["saved_dataset", "parquet_dataset"])
def test_a_local_dataset_folder_is_read_offline_by_split(kind, request, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = request.getfixturevalue(kind)
    source = data.locate(None, str(folder), "train[:8]")
    assert source.path == str(folder.resolve()) and len(source.sha256) == 64
    train, held = data.load_splits(source, "sft", eval_split="train[8:]")
    assert [e["completion"] for e in train] == [f"answer {i}" for i in range(8)]
    assert [e["completion"] for e in held] == ["answer 8", "answer 9"]
    _, test = data.load_splits(source, "sft", eval_split="test")
    assert [e["completion"] for e in test] == ["answer 100", "answer 101", "answer 102"]
    with pytest.raises(DataError, match=r"eval_split train\[5:\] shares 3 rows with split train\[:8\]"):
        data.load_splits(source, "sft", eval_split="train[5:]")
    with pytest.raises(DataError, match="validation"):
        data.load_splits(data.locate(None, str(folder), "validation"), "sft")


def test_a_dataset_folders_hash_follows_its_content(saved_dataset):
    before = data.locate(None, str(saved_dataset)).sha256
    (saved_dataset / "extra.txt").write_text("x")
    assert data.locate(None, str(saved_dataset)).sha256 != before
