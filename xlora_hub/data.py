"""Causal-LM training data for X-LoRA: read examples, tokenise them, batch them.

An example is either ``{"text": ...}`` (the loss is on every token) or ``{"prompt": ..., "completion": ...}``
(the loss is on the completion only, so the model is not trained to write the questions). It may also
name the expert it belongs to (``{"expert": "math", ...}``), which the optional routing loss and the
routing report use. Examples come from a JSONL file, a text file (one ``text`` example per line), a
``datasets.Dataset`` or any sequence of dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataFormatError

IGNORE_INDEX = -100
"""Label value that ``transformers`` losses skip (prompt tokens and padding)."""

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read one JSON object per line; an empty or malformed line is an error naming its line number."""
    path = Path(path)
    examples: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                raise DataFormatError(
                    f"{path}, line {number}: empty line. A JSONL file holds one JSON object per line; "
                    "remove the blank line."
                )
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})."
                ) from None
            if not isinstance(value, dict):
                raise DataFormatError(
                    f'{path}, line {number}: expected a JSON object such as {{"text": ...}}, got {type(value).__name__}.'
                )
            examples.append(value)
    if not examples:
        raise DataFormatError(f"{path}: the file holds no example.")
    return examples


def read_text(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a text file with one ``text`` example per line; an empty line is an error naming its line number."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                raise DataFormatError(f"{path}, line {number}: empty line. Each line is one example; remove it.")
            examples.append({"text": text})
    if not examples:
        raise DataFormatError(f"{path}: the file holds no example.")
    return examples


def load_examples(data: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Examples as a list of dicts, from a ``.jsonl``/``.txt`` file, a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise DataFormatError(f"{path}: no such data file.")
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return read_jsonl(path)
        if suffix in TEXT_SUFFIXES:
            return read_text(path)
        raise DataFormatError(
            f"{path}: unsupported data file type {suffix!r}; use a JSONL file ({', '.join(JSONL_SUFFIXES)}) or a "
            f"text file ({', '.join(TEXT_SUFFIXES)}), or pass a `datasets.Dataset`."
        )
    if isinstance(data, Mapping):
        raise DataFormatError(
            "Expected a sequence of examples (a list of dicts or a `datasets.Dataset`), got a single mapping; "
            "for a `datasets.DatasetDict`, pass one split such as `dataset['train']`."
        )
    examples = []
    for index, row in enumerate(data):
        if not isinstance(row, Mapping):
            raise DataFormatError(f"Example {index}: expected a dict of fields, got {type(row).__name__}.")
        examples.append(dict(row))
    if not examples:
        raise DataFormatError("The dataset holds no example.")
    return examples


@dataclass(frozen=True)
class Fields:
    """Names of the fields an example is read from."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "expert"


def _string_field(example: Mapping[str, Any], name: str, where: str) -> str:
    value = example[name]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field `{name}` must be a string, got {type(value).__name__}.")
    return value


def tokenize_example(
    example: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int,
    fields: Fields = Fields(),
    add_eos: bool = True,
    label_names: Sequence[str] | None = None,
    where: str = "example",
) -> dict[str, Any]:
    """``input_ids`` / ``labels`` (prompt tokens masked with -100) / ``attention_mask`` of one example.

    Prompt and completion are tokenised separately so the boundary between them is exact; the
    tokenizer's special tokens (BOS) go before the prompt, and EOS after the completion so the model
    learns to stop. With ``label_names``, the example's ``fields.label`` becomes ``routing_label``
    (the expert index); examples without it get -100 (no routing loss).
    """
    check_max_length(max_length)
    if fields.prompt in example or fields.completion in example:
        missing = [n for n in (fields.prompt, fields.completion) if n not in example]
        if missing:
            raise DataFormatError(
                f"{where}: has `{fields.prompt if fields.prompt in example else fields.completion}` but no "
                f"`{missing[0]}`; a prompt/completion example needs both fields."
            )
        prompt_ids = tokenizer(_string_field(example, fields.prompt, where), add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(_string_field(example, fields.completion, where), add_special_tokens=False)[
            "input_ids"
        ]
    elif fields.text in example:
        prompt_ids = []
        completion_ids = tokenizer(_string_field(example, fields.text, where), add_special_tokens=True)["input_ids"]
    else:
        raise DataFormatError(
            f"{where}: no `{fields.text}` field and no `{fields.prompt}`/`{fields.completion}` fields (it has "
            f"{sorted(example)}). Rename the columns, or pass `text_field=`/`prompt_field=`/`completion_field=`."
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = [*completion_ids, eos]
    input_ids = [*prompt_ids, *completion_ids][:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(completion_ids))[:max_length]
    if len(input_ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataFormatError(
            f"{where}: no token left to learn from after truncation to max_length={max_length} "
            f"(prompt {len(prompt_ids)} tokens, completion {len(completion_ids)} tokens); raise `max_length` "
            "or shorten the prompt."
        )
    features: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    if label_names is not None:
        features["routing_label"] = _routing_label(example, fields.label, label_names, where)
    return features


def _routing_label(example: Mapping[str, Any], field: str, label_names: Sequence[str], where: str) -> int:
    value = example.get(field)
    if value is None:
        return IGNORE_INDEX
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{where}: `{field}` must be an expert name or index, got {value!r}.")
    if isinstance(value, int):
        if not 0 <= value < len(label_names):
            raise DataFormatError(f"{where}: `{field}` index {value} is out of range (0..{len(label_names) - 1}).")
        return value
    if value not in label_names:
        raise DataFormatError(
            f"{where}: `{field}` is {value!r}, which is not an expert of the mixture {list(label_names)}."
        )
    return list(label_names).index(value)


def check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataFormatError(
            f"max_length must be an integer of at least 2 (one input token and one target token), got {max_length!r}."
        )


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples, ready for :class:`CompletionCollator` (a plain loop or ``transformers.Trainer``)."""

    def __init__(self, features: list[dict[str, Any]], *, label_names: Sequence[str] | None = None) -> None:
        self.features = features
        self.label_names = list(label_names) if label_names is not None else None

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]

    @property
    def has_routing_labels(self) -> bool:
        return any(f.get("routing_label", IGNORE_INDEX) != IGNORE_INDEX for f in self.features)


def tokenize_dataset(
    data: str | os.PathLike[str] | Iterable[Mapping[str, Any]] | TokenizedDataset,
    tokenizer: Any,
    *,
    max_length: int = 512,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    label_field: str = "expert",
    fields: Fields | None = None,
    label_names: Sequence[str] | None = None,
    add_eos: bool = True,
) -> TokenizedDataset:
    """Load (see :func:`load_examples`) and tokenise every example (see :func:`tokenize_example`).

    ``fields`` names the fields in one value (it replaces the four ``*_field`` keywords, which then stay
    at their defaults). Pass ``label_names`` (the mixture's expert names) to keep each example's expert
    as a routing label. A :class:`TokenizedDataset` is returned unchanged.
    """
    if isinstance(data, TokenizedDataset):
        return data
    check_max_length(max_length)
    if tokenizer is None:
        raise DataFormatError("A tokenizer is needed to tokenise the examples; pass `tokenizer=`.")
    source = str(data) if isinstance(data, (str, os.PathLike)) else "dataset"
    spelled = Fields(text=text_field, prompt=prompt_field, completion=completion_field, label=label_field)
    if fields is not None and spelled != Fields():
        raise ValueError("Pass the field names either as fields=Fields(...) or as the *_field keywords, not both.")
    fields = fields if fields is not None else spelled
    examples = load_examples(data)
    features = [
        tokenize_example(
            example,
            tokenizer,
            max_length=max_length,
            fields=fields,
            add_eos=add_eos,
            label_names=label_names,
            where=f"{source}, example {index}" if source == "dataset" else f"{source}, line {index + 1}",
        )
        for index, example in enumerate(examples)
    ]
    return TokenizedDataset(features, label_names=label_names)


class CompletionCollator:
    """Right-pads a list of tokenised examples into a batch (labels padded with -100).

    ``routing_label`` is passed through as ``routing_labels`` only when ``keep_routing_labels`` is true:
    a model's ``forward`` does not take it, so only a loop that pops it (``train_classifier``,
    :class:`~xlora_hub.training.XLoraTrainer`) asks for it.
    """

    def __init__(self, *, pad_token_id: int, keep_routing_labels: bool = False) -> None:
        self.pad_token_id = int(pad_token_id)
        self.keep_routing_labels = keep_routing_labels

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> CompletionCollator:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise DataFormatError("The tokenizer has neither a pad token nor an EOS token to pad batches with.")
        return cls(pad_token_id=pad, **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :n] = torch.tensor(feature["attention_mask"], dtype=torch.long)
            batch["labels"][row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
        if self.keep_routing_labels:
            batch["routing_labels"] = torch.tensor(
                [f.get("routing_label", IGNORE_INDEX) for f in features], dtype=torch.long
            )
        return batch


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token prediction is a supervised (answer) token: ``labels[:, t + 1] != -100``."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


__all__ = [
    "IGNORE_INDEX",
    "CompletionCollator",
    "Fields",
    "TokenizedDataset",
    "answer_mask",
    "check_max_length",
    "load_examples",
    "read_jsonl",
    "read_text",
    "tokenize_dataset",
    "tokenize_example",
]
