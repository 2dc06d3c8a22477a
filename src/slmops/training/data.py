"""Data: find files, read rows with their numbers, detect and normalise formats, tokenise.

Normalised SFT example:        {"prompt": [messages] | None, "completion": str}
                               (prompt None = plain text, every token is trained on)
Normalised preference example: {"prompt": [messages], "chosen": str, "rejected": str}
A message is {"role": "system" | "user" | "assistant", "content": str}.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from string import Formatter
from typing import Any, Iterable, Optional

from slmops.core.errors import DataError
from slmops.core.files import file_sha256, tree_sha256

MAX_PROBLEMS = 10  # problems listed in one error; the rest are counted
IGNORE_INDEX = -100
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = tuple[int, dict]  # (row number as a user counts it, the row)


# ---------------------------------------------------------------------------------------------
# Finding the data


@dataclass(frozen=True)
class DataSource:
    """Where rows come from: a local file (with its content hash), or a hub dataset."""

    path: Optional[str] = None
    sha256: Optional[str] = None
    dataset: Optional[str] = None
    file: Optional[str] = None
    split: str = "train"

    @property
    def label(self) -> str:
        return self.path or f"{self.dataset}/{self.file or self.split}"


def find_local(file: str) -> Optional[Path]:
    """The file as a path, else by name under $SLMOPS_DATA_DIR; None when neither exists."""
    for candidate in _candidates(file):
        if candidate.exists():
            return candidate
    return None


def locate(file: Optional[str], dataset: Optional[str], split: str = "train") -> DataSource:
    """A path as given, else its name under $SLMOPS_DATA_DIR, else the hub dataset. A dataset that
    names a local folder (`save_to_disk`, or parquet files) is read from there, offline."""
    local = find_local(file) if file else None
    if local is not None and local.is_dir():
        raise DataError(
            f"data file '{local}' is a folder; name a .jsonl, .json, .csv or .parquet file, or set "
            "data.dataset to read a Hugging Face dataset folder"
        )
    if local is not None:
        return DataSource(path=str(local.resolve()), sha256=file_sha256(local), split=split)
    folder = find_local(dataset) if dataset else None
    if folder is not None and folder.is_dir():
        return DataSource(path=str(folder.resolve()), sha256=tree_sha256(folder), split=split)
    if dataset and not _hub_offline():
        return DataSource(dataset=dataset, file=file, split=split)
    looked = " and ".join(str(c) for c in _candidates(file)) if file else "no file named"
    data_dir = os.environ.get("SLMOPS_DATA_DIR") or "unset"
    hub = f"; the hub (for {dataset}) is offline" if dataset else ""
    raise DataError(
        f"data file '{file or dataset}' not found: looked at {looked} (SLMOPS_DATA_DIR is {data_dir}){hub}; "
        "set SLMOPS_DATA_DIR to the folder that holds it, or pass --data PATH"
    )


def _candidates(file: str) -> list[Path]:
    paths = [Path(file).expanduser()]
    data_dir = os.environ.get("SLMOPS_DATA_DIR")
    if data_dir and not Path(file).is_absolute():
        paths.append(Path(data_dir).expanduser() / Path(file).name)
    return paths


def locate_section(section) -> tuple[DataSource, Optional[DataSource]]:
    """The training and (if named) evaluation sources of a recipe data section."""
    train = locate(section.file, section.dataset, section.split)
    whole = section.split.partition("[")[0]  # the training slice is not the evaluation file's
    held = locate(section.eval_file, section.dataset, whole) if section.eval_file else None
    return train, held


def _hub_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(source: DataSource) -> list[Row]:
    if source.dataset and not source.path:
        rows = _read_hub(source)  # `datasets` slices the split itself
    else:
        assert source.path is not None  # locate() gives every source a path or a dataset
        rows = _split_rows(source)
        rows = [rows[i] for i in split_range(source.split, len(rows), source.label, named=Path(source.path).is_dir())]
    if not rows:
        raise DataError(f"{source.label}: the data set is empty; give a file with at least one row")
    return rows


def _split_rows(source: DataSource) -> list[Row]:
    """Every row of the split a local source's `split` names (before any [slice])."""
    assert source.path is not None
    path = Path(source.path)
    return _read_folder(path, source.split.partition("[")[0]) if path.is_dir() else _read_file(path)


def _read_folder(path: Path, split: str) -> list[Row]:
    """One split of a Hugging Face dataset folder: `save_to_disk`'s, or parquet files named by split."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else ["train"]
        if split not in splits:
            raise DataError(f"dataset folder {path} has no split '{split}'; it has: {', '.join(splits)}")
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    elif any(path.rglob("*.parquet")):
        try:
            table = datasets.load_dataset("parquet", data_dir=str(path), split=split)
        except ValueError as exc:  # an unknown split
            raise DataError(f"dataset folder {path}: {exc}; name one of its splits") from None
    else:
        raise DataError(
            f"dataset folder {path} is neither a `save_to_disk` folder nor parquet files; "
            "save it with Dataset.save_to_disk or to_parquet"
        )
    return list(enumerate(table, start=1))


def split_range(split: str, n: int, label: str = "data", named: bool = False) -> range:
    """The rows that a split such as train, train[:2000] or train[90%:] names, of n.

    A local file is the train split; a dataset folder's split is already chosen by name (`named`).
    Percent bounds round as `datasets` does by default (closest).
    """
    name, _, bounds = split.partition("[")
    if name != "train" and not named:
        raise DataError(
            f"{label}: a local file has only the train split, not '{name}'; write train[...] to take a slice of it"
        )
    if not bounds:
        return range(n)
    start, stop = (_bound(b, n) for b in bounds.rstrip("]").split(":"))
    return range(n)[slice(start, stop)]


def _bound(text: str, n: int) -> Optional[int]:
    if not text:
        return None
    if text.endswith("%"):
        return round(int(text[:-1]) * n / 100)
    return int(text)


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text; re-save the file as UTF-8") from None
    if suffix == ".jsonl":
        return _parse_jsonl(path, text)
    if suffix == ".json":
        return _parse_json(path, text)
    return _parse_csv(path, text)


def _parse_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, problems = [], Problems(str(path))
    try:
        for number, row in enumerate(reader, start=2):
            if None in row:  # DictReader files surplus values under None
                problems.add(number, None, f"{len(row[None])} more value(s) than the header has columns")
                continue
            rows.append((number, dict(row)))
    except csv.Error as exc:
        raise DataError(
            f"{path}: line {reader.line_num} is not valid CSV ({exc}); fix the file, or save the data as .jsonl"
        ) from None
    problems.raise_if_any("fix those lines (quote values that contain commas)")
    return rows


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    rows, problems = [], Problems(str(path))
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(number, None, f"invalid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.add(number, None, "expected a JSON object")
            continue
        rows.append((number, row))
    problems.raise_if_any("fix those lines")
    return rows


def _parse_json(path: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}}); use that or JSON lines')
    return list(enumerate(data, start=1))


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read parquet ({exc}); check the file") from None
    return list(enumerate(table.to_pylist(), start=1))


def _read_hub(source: DataSource) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(source.dataset, data_files=source.file, split=source.split)
    except Exception as exc:  # datasets raises many types; all mean "not loadable as named"
        raise DataError(
            f"hub dataset {source.label}: cannot load ({type(exc).__name__}); check the id and file"
        ) from None
    return list(enumerate(ds, start=1))


# ---------------------------------------------------------------------------------------------
# Problems, reported all at once


class Problems:
    def __init__(self, label: str):
        self.label = label
        self.items: list[str] = []
        self.count = 0

    def add(self, row: int, field: Optional[str], message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_PROBLEMS:
            where = f"row {row}" + (f" field '{field}'" if field else "")
            self.items.append(f"{where}: {message}")

    def raise_if_any(self, fix: str) -> None:
        if not self.count:
            return
        more = f" (and {self.count - len(self.items)} more)" if self.count > len(self.items) else ""
        raise DataError(f"{self.label}: {self.count} bad row(s): {'; '.join(self.items)}{more}; {fix}")


# ---------------------------------------------------------------------------------------------
# SFT formats

SFT_FORMATS = {
    # format: (required columns, optional columns)
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "input_output": (("input", "output"), ("system",)),
    "text": (("text",), ()),
    "template": ((), ()),  # columns named by the recipe's template
}
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


def detect_sft_format(rows: list[Row], label: str) -> str:
    _require_rows(rows, label)
    columns = set(rows[0][1])
    if "conversations" in columns:
        columns.add("messages")
    for name, (required, _) in SFT_FORMATS.items():
        if required and set(required) <= columns:
            return name
    if {"chosen", "rejected"} <= columns:
        raise DataError(f"{label}: rows have chosen/rejected: that is preference data; use it for DPO, not SFT")
    raise DataError(
        f"{label}: cannot tell the format from columns {sorted(columns, key=str)}; expected instruction/output (alpaca), "
        "input/output, prompt/completion, messages or text, or set data.format"
    )


def _require_rows(rows: list[Row], label: str) -> None:
    if not rows:
        raise DataError(f"{label}: the data set is empty; give a file with at least one row")


def normalise_sft(rows: list[Row], label: str, fmt: str = "auto", template: Optional[dict] = None) -> list[dict]:
    """Turn rows of any SFT format into {"prompt": messages | None, "completion": str}.

    template (format "template"): {"prompt": str, "completion": str, "value_names": {column: {value: name}}}.
    """
    _require_rows(rows, label)
    fmt = detect_sft_format(rows, label) if fmt == "auto" else fmt
    if fmt == "template" and not template:
        raise DataError(f"{label}: format template needs a `template` section in the data section")
    problems, examples = Problems(label), []
    for number, row in rows:
        if fmt == "template":
            assert template is not None  # checked before the loop
            example = _template_row(template, number, row, problems)
        else:
            example = _sft_row(fmt, number, row, problems)
        if example is not None:
            examples.append(example)
    problems.raise_if_any(f"fix those rows or set data.format (read as '{fmt}')")
    return examples


def _sft_row(fmt: str, number: int, row: dict, problems: Problems) -> Optional[dict]:
    if fmt == "messages":
        return _sft_messages(number, row.get("messages", row.get("conversations")), problems)
    required, _ = SFT_FORMATS[fmt]
    values = {}
    for field in required:
        value = _text_field(number, row, field, problems)
        if value is None:
            return None
        values[field] = value
    if fmt == "text":
        return {"prompt": None, "completion": values["text"]}
    if fmt == "alpaca":
        extra = row.get("input")
        user = values["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        prompt, completion = user, values["output"]
    else:
        prompt, completion = values[required[0]], values[required[1]]
    messages = [{"role": "user", "content": prompt}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.insert(0, {"role": "system", "content": row["system"]})
    return {"prompt": messages, "completion": completion}


def _template_row(template: dict, number: int, row: dict, problems: Problems) -> Optional[dict]:
    """The template's prompt and completion filled from the row's columns (named values where given)."""
    texts = []
    for part in ("prompt", "completion"):
        values = {}
        for _, column, _, _ in Formatter().parse(template[part]):
            if column is None or column in values:
                continue
            value = _template_value(template, number, row, column, problems)
            if value is None:
                return None
            values[column] = value
        texts.append(template[part].format_map(values))
    if not texts[1].strip():
        problems.add(number, None, "the completion template gives empty text")
        return None
    return {"prompt": [{"role": "user", "content": texts[0]}], "completion": texts[1]}


def _template_value(template: dict, number: int, row: dict, column: str, problems: Problems) -> Optional[str]:
    value = row.get(column)
    if column not in row or value is None:
        problems.add(number, column, "is missing (the template names it)")
        return None
    names = (template.get("value_names") or {}).get(column)
    if names is None:
        return str(value)
    named = {str(k): v for k, v in names.items()}  # YAML keys 0 and "0" name the same value
    if str(value) in named:
        return named[str(value)]
    problems.add(number, column, f"value {value!r} has no name in template.value_names.{column}")
    return None


def _text_field(number: int, row: dict, field: str, problems: Problems) -> Optional[str]:
    value = row.get(field)
    if field not in row or value is None:
        problems.add(number, field, "is missing")
    elif not isinstance(value, str):
        problems.add(number, field, f"expected text, got {type(value).__name__}")
    elif not value.strip():
        problems.add(number, field, "is empty")
    else:
        return value
    return None


def _sft_messages(number: int, messages: Any, problems: Problems) -> Optional[dict]:
    parsed = _parse_messages(number, "messages", messages, problems)
    if parsed is None:
        return None
    if parsed[-1]["role"] != "assistant":
        problems.add(number, "messages", "the last message must be the assistant's answer")
        return None
    return {"prompt": parsed[:-1], "completion": parsed[-1]["content"]}


def _parse_messages(number: int, field: str, messages: Any, problems: Problems) -> Optional[list[dict]]:
    if not isinstance(messages, list) or not messages:
        problems.add(number, field, "expected a non-empty list of messages")
        return None
    parsed = []
    for msg in messages:
        role = msg.get("role", msg.get("from")) if isinstance(msg, dict) else None
        content = msg.get("content", msg.get("value")) if isinstance(msg, dict) else None
        if str(role).lower() not in _ROLES or not isinstance(content, str):
            problems.add(number, field, "each message needs a role (system/user/assistant/tool) and text content")
            return None
        parsed.append({"role": _ROLES[str(role).lower()], "content": content})
    return parsed


# ---------------------------------------------------------------------------------------------
# Preference formats

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|User|System):[ \t]?")


def normalise_preference(rows: list[Row], label: str) -> list[dict]:
    """Turn preference rows into {"prompt": messages, "chosen": str, "rejected": str}.

    Accepts prompt/chosen/rejected (strings or message lists) and the implicit-prompt form
    where chosen and rejected are whole transcripts sharing the conversation up to the answer.
    """
    _require_rows(rows, label)
    columns = set(rows[0][1])
    if not {"chosen", "rejected"} & columns:
        raise DataError(f"{label}: preference data needs chosen and rejected columns; found {sorted(columns, key=str)}")
    problems, examples = Problems(label), []
    for number, row in rows:
        example = _preference_row(number, row, problems)
        if example is not None:
            examples.append(example)
    problems.raise_if_any("fix those rows (each needs a prompt, and chosen different from rejected)")
    return examples


def _preference_row(number: int, row: dict, problems: Problems) -> Optional[dict]:
    for field in ("chosen", "rejected"):
        if row.get(field) in (None, "", []):
            problems.add(number, field, "is missing" if row.get(field) is None else "is empty")
            return None
    if row.get("prompt") not in (None, "", []):
        example = _explicit_preference(number, row, problems)
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        example = _implicit_messages(number, row, problems)
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        example = split_implicit_prompt(row["chosen"], row["rejected"])
    else:
        problems.add(number, "chosen", "chosen and rejected must both be text or both be message lists")
        return None
    if example is None:
        problems.add(number, "prompt", "is empty: chosen and rejected share no prompt; add a prompt column")
        return None
    # An empty answer is kept: in hh-rlhf, saying nothing is sometimes the less harmful choice.
    if example["chosen"].strip() == example["rejected"].strip():
        problems.add(number, "rejected", "is the same as chosen")
        return None
    return example


def _explicit_preference(number: int, row: dict, problems: Problems) -> Optional[dict]:
    prompt = row["prompt"]
    messages: Optional[list[dict]]
    if isinstance(prompt, str):
        messages = _transcript_to_messages(prompt) or [{"role": "user", "content": prompt}]
    else:
        messages = _parse_messages(number, "prompt", prompt, problems)
        if messages is None:
            return None
    answers = {}
    for field in ("chosen", "rejected"):
        value = row[field]
        if isinstance(value, list):
            parsed = _parse_messages(number, field, value, problems)
            if parsed is None:
                return None
            value = parsed[-1]["content"]
        answers[field] = value if isinstance(value, str) else str(value)
    return {"prompt": messages, **answers}


def _implicit_messages(number: int, row: dict, problems: Problems) -> Optional[dict]:
    chosen = _parse_messages(number, "chosen", row["chosen"], problems)
    rejected = _parse_messages(number, "rejected", row["rejected"], problems)
    if chosen is None or rejected is None:
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        return None
    return {"prompt": chosen[:shared], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def split_implicit_prompt(chosen: str, rejected: str) -> Optional[dict]:
    """Split two transcripts that share a prefix into (prompt messages, chosen answer, rejected answer).

    The prompt ends at the last "Assistant:" turn marker inside the shared prefix; without turn
    markers it ends at the last whitespace of the shared prefix. None when nothing is shared.
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = max(common.rfind("\n\nAssistant:"), -1 if not common.startswith("Assistant:") else 0)
    if marker >= 0:
        cut = marker + len("\n\nAssistant:") if common[marker] == "\n" else len("Assistant:")
        messages = _transcript_to_messages(chosen[:cut])
    else:
        cut = max(common.rfind(" "), common.rfind("\n")) + 1
        messages = [{"role": "user", "content": chosen[:cut].strip()}] if chosen[:cut].strip() else None
    if not messages:
        return None
    return {"prompt": messages, "chosen": chosen[cut:].strip(), "rejected": rejected[cut:].strip()}


def _transcript_to_messages(text: str) -> Optional[list[dict]]:
    """Parse "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages; None if there are no markers."""
    parts = _TURN.split(text)
    if len(parts) < 3:
        return None
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            messages.append({"role": _ROLES.get(role.lower(), "user"), "content": content.strip()})
    return messages or None


# ---------------------------------------------------------------------------------------------
# Selection: dedupe, eval split, sample cap


def dedupe(examples: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for example in examples:
        key = json.dumps(example, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random hold-out: the same seed always holds out the same rows."""
    if len(examples) < 2:
        raise DataError(f"eval_split needs at least 2 examples, found {len(examples)}; drop eval_split or add data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------------------------------------
# Tokenisation: one example at a time, prompt tokens masked out of the loss


def render_sft(example: dict, tokenizer, use_chat_template: bool = True) -> tuple[str, str]:
    """The prompt text (not trained on) and the completion text (trained on) of one example."""
    eos = tokenizer.eos_token or ""
    if example["prompt"] is None:
        return "", example["completion"] + eos
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        answer = {"role": "assistant", "content": example["completion"]}
        full = tokenizer.apply_chat_template(example["prompt"] + [answer], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, example["completion"] + eos
    prompt = "\n\n".join(m["content"] for m in example["prompt"])
    sep = "" if prompt.endswith(("\n", " ")) else "\n"
    return prompt + sep, example["completion"] + eos


@dataclass
class TokenStats:
    """What tokenising SFT examples did: for `slmops data preview`, and the log of a fine-tune."""

    rows: int = 0
    tokens: int = 0
    trained: int = 0
    truncated_rows: int = 0  # rows cut to max_seq_len
    dropped_turns: int = 0  # whole earlier exchanges left out to fit
    last_turn_only: int = 0  # conversations the chat template could not split into turns


def tokenize_sft(
    examples: Iterable[dict],
    tokenizer,
    max_seq_len: int,
    use_chat_template: bool = True,
    train_on: str = "all_assistant",
    stats: Optional[TokenStats] = None,
) -> list[dict]:
    """input_ids / attention_mask / labels per example; labels are IGNORE_INDEX where nothing is trained.

    With train_on "all_assistant" a conversation trains every assistant turn (its text and the
    end-of-turn token the template puts after it), never system, user or tool text; with
    "last_assistant", or without a chat template, only the final answer. See _turns and _last.
    """
    stats = stats if stats is not None else TokenStats()
    features = []
    for example in examples:
        feature = None
        earlier = any(m["role"] == "assistant" for m in example["prompt"] or [])
        if train_on == "all_assistant" and earlier and use_chat_template and getattr(tokenizer, "chat_template", None):
            feature = _turns(example, tokenizer, max_seq_len, stats)
            stats.last_turn_only += feature is None
        if feature is None:
            feature = _last(example, tokenizer, max_seq_len, use_chat_template, stats)
        stats.rows += 1
        stats.tokens += len(feature["input_ids"])
        stats.trained += sum(label != IGNORE_INDEX for label in feature["labels"])
        features.append(feature)
    return features


def _last(example: dict, tokenizer, max_seq_len: int, use_chat_template: bool, stats: TokenStats) -> dict:
    """The final answer trained, everything before it prompt. Too long: the prompt keeps its end and
    the answer its start; the prompt gives up tokens first, but the answer keeps at least half of
    max_seq_len (or all of itself)."""
    prompt, completion = render_sft(example, tokenizer, use_chat_template)
    answer = completion.rstrip()  # what the template puts after the end-of-turn token is not trained
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(completion[len(answer) :], add_special_tokens=False)["input_ids"] if answer != completion else []
    stats.truncated_rows += len(p_ids) + len(c_ids) > max_seq_len
    c_keep = min(len(c_ids), max(max_seq_len - len(p_ids), max_seq_len // 2))
    p_keep = max_seq_len - c_keep
    p_ids = p_ids[len(p_ids) - p_keep :] if len(p_ids) > p_keep else p_ids
    c_ids = c_ids[:c_keep]
    t_ids = t_ids if len(p_ids) + len(c_ids) + len(t_ids) <= max_seq_len else []
    return _feature([(p_ids, False), (c_ids, True), (t_ids, False)])


def _turns(example: dict, tokenizer, max_seq_len: int, stats: TokenStats) -> Optional[dict]:
    """Every assistant turn of a conversation trained. Too long: whole exchanges go from the start
    (the system message stays) until it fits; None if one exchange is still too long, or if the
    template does not render the conversation as a run of its prefixes."""
    messages = [*example["prompt"], {"role": "assistant", "content": example["completion"]}]
    dropped = 0
    while True:
        pieces = _turn_pieces(messages, tokenizer)
        if pieces is None:
            return None
        tokenized = [(tokenizer(text, add_special_tokens=False)["input_ids"], trained) for text, trained in pieces]
        if sum(len(ids) for ids, _ in tokenized) <= max_seq_len:
            break
        shorter = _drop_first_exchange(messages)
        if shorter is None:
            return None
        messages, dropped = shorter, dropped + 1
    if dropped:
        stats.truncated_rows += 1
        stats.dropped_turns += dropped
    return _feature(tokenized)


def _turn_pieces(messages: list[dict], tokenizer) -> Optional[list[tuple[str, bool]]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn is what the
    template adds between the generation prompt before it and the end of that turn, trailing
    whitespace left out. Found by rendering each prefix, so any template works that renders a
    conversation as the run of its prefixes (None when one does not)."""

    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation)

    full, pieces, done = render(len(messages), False), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before, after = render(i, True), render(i + 1, False).rstrip()
        if not (full.startswith(before) and full.startswith(after) and done <= len(before) < len(after)):
            return None
        pieces += [(full[done : len(before)], False), (full[len(before) : len(after)], True)]
        done = len(after)
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def _drop_first_exchange(messages: list[dict]) -> Optional[list[dict]]:
    """The conversation without its first user turn and everything up to the next one; None if it has one exchange."""
    head = 1 if messages[0]["role"] == "system" else 0
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= head]
    if len(users) < 2:
        return None
    return messages[:head] + messages[users[1] :]


def truncation_note(stats: TokenStats, max_seq_len: int) -> str:
    """One line on what tokenising left out, for the log (and `slmops data preview`)."""
    parts = []
    if stats.truncated_rows:
        parts.append(
            f"{stats.truncated_rows} of {stats.rows} examples were over max_seq_len {max_seq_len}: "
            f"{stats.dropped_turns} early exchanges were left out whole, the rest cut"
        )
    if stats.last_turn_only:
        parts.append(
            f"{stats.last_turn_only} conversations train only their last answer (the chat template does not "
            "render them as a run of their prefixes, or one exchange alone is too long)"
        )
    return "; ".join(parts)


def pack(features: list[dict], max_seq_len: int) -> list[dict]:
    """Examples packed into rows of at most max_seq_len tokens, best-fit decreasing (as TRL packs).

    Each example keeps its own position ids (from 0), so the model attends within it only (see
    slmops.training.passes.packing), and the first token of each is not a target: in a row it
    would be predicted from the example before it.
    """
    bins: list[list[dict]] = []
    room: list[int] = []
    for feature in sorted(features, key=lambda f: len(f["input_ids"]), reverse=True):
        size = len(feature["input_ids"])
        fits = [i for i, free in enumerate(room) if free >= size]
        if fits:
            best = min(fits, key=lambda i: room[i])
            bins[best].append(feature)
            room[best] -= size
        else:
            bins.append([feature])
            room.append(max_seq_len - size)
    rows = []
    for members in bins:
        rows.append(
            {
                "input_ids": [t for f in members for t in f["input_ids"]],
                "labels": [t for f in members for t in [IGNORE_INDEX, *f["labels"][1:]]],
                "position_ids": [p for f in members for p in range(len(f["input_ids"]))],
            }
        )
    return rows


def _feature(pieces: list[tuple[list[int], bool]]) -> dict:
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if trained else IGNORE_INDEX for piece, trained in pieces for t in piece]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# ---------------------------------------------------------------------------------------------
# The whole SFT path from sources to example lists


def source_from_dict(spec: dict) -> DataSource:
    """Rebuild a DataSource from a rendered config; a portable one (no path) is located now."""
    source = DataSource(**spec)
    if source.path:
        if source.sha256 and Path(source.path).is_file() and file_sha256(Path(source.path)) != source.sha256:
            raise DataError(f"{source.path}: the file changed since the run was planned; run the command again")
        return source
    return locate(source.file, source.dataset, source.split)


def load_splits(
    train: DataSource,
    kind: str = "sft",
    fmt: str = "auto",
    *,
    eval_source: Optional[DataSource] = None,
    eval_split: Optional[float | str] = None,
    max_samples: Optional[int] = None,
    drop_duplicates: bool = True,
    seed: int = 42,
    template: Optional[dict] = None,
    columns: Optional[dict[str, str]] = None,
) -> tuple[list[dict], list[dict]]:
    """Read, normalise ("sft" or "preference"), dedupe and split: (train examples, eval examples).

    eval_split: a fraction held out at random (seeded), or a slice of the same data (train[2000:2200]).
    columns: {name slmops reads: the data's column}, applied before the format is read.
    """

    def read(source: DataSource) -> list[dict]:
        rows = rename_columns(read_rows(source), columns or {})
        if kind == "sft":
            return normalise_sft(rows, source.label, fmt, template)
        return normalise_preference(rows, source.label)

    examples = read(train)
    if drop_duplicates:
        examples = dedupe(examples)
    held: list[dict] = []
    if isinstance(eval_split, str):
        check_disjoint(train, eval_split)
        held = read(replace(train, split=eval_split))
    elif eval_split:
        examples, held = split_eval(examples, eval_split, seed)
    elif eval_source:
        held = read(eval_source)
    if max_samples:
        examples = examples[:max_samples]
    return examples, held


def load_section(section, kind: str, seed: int) -> tuple[DataSource, Optional[DataSource], list[dict], list[dict]]:
    """A recipe data section read as a run reads it: (source, eval source, train examples, held-out examples)."""
    source, eval_source = locate_section(section)
    template = getattr(section, "template", None)  # SFT sections only
    train, held = load_splits(
        source,
        kind,
        getattr(section, "format", "auto"),
        eval_source=eval_source,
        eval_split=section.eval_split,
        max_samples=section.max_samples,
        drop_duplicates=section.dedupe,
        seed=seed,
        template=template.model_dump() if template else None,
        columns=section.columns,
    )
    return source, eval_source, train, held


def rename_columns(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    if not columns:
        return rows
    renamed = []
    for number, row in rows:
        row = dict(row)
        for ours, theirs in columns.items():
            if theirs in row:
                row[ours] = row.pop(theirs)
        renamed.append((number, row))
    return renamed


def check_disjoint(train: DataSource, eval_split: str) -> None:
    """Training and evaluation slices of one local file must not share rows."""
    if not train.path:
        return  # a hub split is sliced by `datasets`; its size is not known before loading
    if train.split.partition("[")[0] != eval_split.partition("[")[0]:
        return  # two splits of a dataset folder share no rows
    n = len(_split_rows(train))
    named = Path(train.path).is_dir()
    trained, held = (set(split_range(s, n, train.label, named)) for s in (train.split, eval_split))
    if trained & held:
        raise DataError(
            f"{train.label}: eval_split {eval_split} shares {len(trained & held)} rows with split "
            f"{train.split}; choose slices that do not overlap"
        )


def fit_prompt(example: dict, tokenizer, max_length: int) -> dict:
    """Shorten a preference prompt so that prompt + answer fit in max_length tokens.

    TRL truncates the end of the whole sequence, which would cut the answers (the only part
    trained on) out of long conversations. Here the answers keep up to half the budget and the
    prompt gives up its oldest turns first, then the start of its first remaining turn.
    """

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    answer = min(max(n_tokens(example["chosen"]), n_tokens(example["rejected"])) + 2, max_length // 2)
    budget = max_length - answer
    messages = list(example["prompt"])

    def prompt_tokens(msgs: list[dict]) -> int:
        return (
            len(
                tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
            if getattr(tokenizer, "chat_template", None)
            else n_tokens(" ".join(m["content"] for m in msgs))
        )

    while len(messages) > 1 and prompt_tokens(messages) > budget:
        messages.pop(0)
    ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
    cut, excess = 0, prompt_tokens(messages) - budget
    while excess > 0 and cut < len(ids) - 1:  # decoding a cut and encoding it again can come out longer: repeat
        cut = min(cut + excess, len(ids) - 1)
        messages[0] = {**messages[0], "content": tokenizer.decode(ids[cut:])}
        excess = prompt_tokens(messages) - budget
    if excess > 0:  # the template's own tokens leave no room: TRL would drop every pair
        raise DataError(
            f"max_length {max_length} leaves {budget} tokens for a prompt, fewer than this model's chat "
            f"template takes around a one-token message ({prompt_tokens(messages)}); raise dpo.max_length"
        )
    return {**example, "prompt": messages}
