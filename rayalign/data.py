"""Datasets in TRL's formats: reading, validation, tokenization and collation.

Formats (DESIGN.md, "Data formats"):

- SFT: ``{"prompt", "completion"}`` or ``{"messages": [{"role", "content"}, ...]}``; with
  messages the last assistant turn is the response and everything before it, rendered by the
  tokenizer's chat template with a generation prompt, is the prompt.
- Preference: ``{"prompt", "chosen", "rejected"}`` (+ optional ``"weight"`` and precomputed
  ``"ref_chosen_logps"`` / ``"ref_rejected_logps"``); each field a string or a message list
  (the prompt rendered with the chat template; chosen/rejected = their last assistant turn).
- Unpaired: ``{"prompt", "completion", "label": bool}`` (+ optional ``"ref_logps"``).

Prompts must be non-empty; a response may be the empty string (a policy that stops at once
produced it, and it is then just the EOS token), but never missing or of the wrong type.

Files are JSONL (UTF-8) or Parquet, local or any URI pyarrow understands. Every row is
validated on load; the first bad row raises `DataError` naming file, row (1-based) and field:
bytes that are not UTF-8, lone surrogates (``"\\ud800"`` in JSON: no tokenizer can encode
them), chat roles other than system / user / assistant (a template would render them as
text, e.g. ``<|wizard|>``). `check_examples` runs the same checks without a tokenizer (chat
templates unrendered) and without torch, so a job can name a bad row in a second, before it
imports the heavy libraries or starts Ray.

Tokenization: prompt and response are tokenized separately and concatenated, so the response
tokens (and the EOS that ends the response) are exactly the tokens that count. The prompt
keeps its *last* ``max_prompt_length`` tokens; the response plus EOS is cut on the right so
that the whole sequence fits ``max_length`` (a cut response loses its EOS, as it should:
the model did not finish it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import DataConfig

if TYPE_CHECKING:  # torch is imported where batches are built, so validation stays light
    import torch

CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset row is malformed. The message names the file, the row and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, reason: str):
        self.source, self.row, self.field, self.reason = source, row, field, reason
        where = source + (f", row {row}" if row is not None else "")
        where += f", field {field!r}" if field else ""
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None


@dataclass(frozen=True)
class UnpairedExample:
    prompt: str
    completion: str
    label: bool
    ref_logps: float | None = None


Example = SFTExample | PreferenceExample | UnpairedExample


def _open_input(path: str):
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return filesystem.open_input_stream(inner)
    return open(path, "rb")


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, row)`` from a JSONL or Parquet file; row numbers are 1-based."""
    path = str(path)
    if path.endswith(".parquet") or path.endswith(".pq"):
        import pyarrow.parquet as pq

        try:
            with _open_input(path) as f:
                table = pq.read_table(f)
        except (OSError, ValueError) as err:
            raise DataError(path, None, None, f"cannot read Parquet: {err}") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    if not (path.endswith(".jsonl") or path.endswith(".json")):
        raise DataError(path, None, None, "unknown file type; expected .jsonl or .parquet")
    try:
        f = _open_input(path)
    except OSError as err:
        raise DataError(path, None, None, f"cannot open: {err}") from None
    with f:
        for number, raw in enumerate(f.read().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, number, None, f"not UTF-8: byte {err.object[err.start]:#04x} "
                                f"at column {err.start + 1}") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, number, None, f"invalid JSON: {err.msg}") from None


class _Row:
    """Field access on one raw row that turns every problem into a `DataError`."""

    def __init__(self, source: str, number: int, row: Any, tokenizer, render: bool = True):
        if not isinstance(row, dict):
            raise DataError(source, number, None, f"expected an object, got {type(row).__name__}")
        self.source, self.number, self.row, self.tokenizer = source, number, row, tokenizer
        self.render = render  # False: check message lists, leave chat templates unrendered

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(self.source, self.number, field, reason)

    def has(self, field: str) -> bool:
        return self.row.get(field) is not None

    def messages(self, field: str, value: list) -> list[dict]:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise self.error(field, f"message {i} must be {{'role': str, 'content': str}}")
            if m["role"] not in CHAT_ROLES:
                raise self.error(field, f"message {i}: unknown role {m['role'][:40]!r}; expected "
                                        f"one of {', '.join(CHAT_ROLES)}")
            self.text(field, m["content"], allow_empty=True)
        if not value:
            raise self.error(field, "empty message list")
        return value

    def render_prompt(self, field: str, messages: list[dict]) -> str:
        if not self.render:
            return ""
        if self.tokenizer is None:
            raise self.error(field, "message lists need a tokenizer with a chat template")
        if not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
            raise self.error(field, f"message lists need a chat template to render the prompt, "
                                    f"and {name} has none: use a chat model as policy.path (its "
                                    f"template renders every prompt) or prompt/completion rows")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def prompt(self, field: str = "prompt") -> str:
        value = self.row.get(field)
        if isinstance(value, list):
            return self.render_prompt(field, self.messages(field, value))
        return self.text(field)

    def response(self, field: str) -> str:
        """A response string, or the last assistant turn of a message list."""
        value = self.row.get(field)
        if isinstance(value, list):
            last = self.messages(field, value)[-1]
            if last["role"] != "assistant":
                raise self.error(field, "the last message must have role 'assistant'")
            value = last["content"]
        return self.text(field, value, allow_empty=True)

    def text(self, field: str, value: Any = None, allow_empty: bool = False) -> str:
        value = self.row.get(field) if value is None else value
        if value is None:
            raise self.error(field, "missing")
        if not isinstance(value, str):
            raise self.error(field, f"expected a string or message list, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "empty string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise self.error(field, f"lone surrogate {value[err.start]!r} at character "
                                    f"{err.start}: not valid Unicode text") from None
        return value

    def number_(self, field: str, default: float | None) -> float | None:
        value = self.row.get(field, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(field, f"expected a finite number, got {value!r}")
        return float(value)


def _sft(r: _Row) -> SFTExample:
    if r.has("messages"):
        messages = r.messages("messages", r.row["messages"])
        last = messages[-1]
        if last["role"] != "assistant":
            raise r.error("messages", "the last message must have role 'assistant'")
        if len(messages) < 2:
            raise r.error("messages", "need at least one turn before the assistant's response")
        return SFTExample(r.render_prompt("messages", messages[:-1]),
                          r.text("messages", last["content"], allow_empty=True))
    if not r.has("completion") and not r.has("prompt"):
        raise r.error(None, "expected 'prompt' + 'completion' or 'messages'")
    return SFTExample(r.prompt(), r.response("completion"))


def _preference(r: _Row) -> PreferenceExample:
    weight = r.number_("weight", 1.0)
    if weight < 0:
        raise r.error("weight", f"must be >= 0, got {weight}")
    return PreferenceExample(
        r.prompt(), r.response("chosen"), r.response("rejected"), weight,
        r.number_("ref_chosen_logps", None), r.number_("ref_rejected_logps", None),
    )


def _unpaired(r: _Row) -> UnpairedExample:
    label = r.row.get("label")
    if not isinstance(label, bool):
        raise r.error("label", f"expected true or false, got {label!r}")
    return UnpairedExample(r.prompt(), r.response("completion"), label, r.number_("ref_logps", None))


_PARSERS = {"sft": _sft, "preference": _preference, "unpaired": _unpaired}


def load_examples(
    path: str | os.PathLike, kind: str, tokenizer=None, limit: int | None = None,
    render: bool = True,
) -> list[Example]:
    """Read and validate a whole dataset file; fails on the first bad row. With
    ``render=False`` message-list prompts are checked but not rendered (they come out "")."""
    if kind not in _PARSERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(_PARSERS)}")
    parse, source, out = _PARSERS[kind], str(path), []
    for number, row in read_rows(source):
        out.append(parse(_Row(source, number, row, tokenizer, render)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(source, None, None, "no rows")
    return out


def load_dataset(cfg: DataConfig, tokenizer=None) -> list[Example]:
    """`load_examples` for a `DataConfig`."""
    return load_examples(cfg.path, cfg.kind, tokenizer, cfg.limit)


def check_examples(cfg: DataConfig) -> int:
    """Every check of `load_dataset` but the chat-template rendering; the number of rows."""
    return len(load_examples(cfg.path, cfg.kind, None, cfg.limit, render=False))


def encode(
    tokenizer, prompt: str, response: str, max_prompt_length: int, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response + EOS) under the truncation rules of this module."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = (response_ids + [tokenizer.eos_token_id])[: max_length - len(prompt_ids)]
    return prompt_ids, response_ids


@dataclass
class SequenceBatch:
    """Right-padded prompt+response sequences; `response_mask` marks the tokens that count."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] bool

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                       self.response_mask)))


def collate(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> SequenceBatch:
    """Concatenate each (prompt_ids, response_ids) and right-pad into one batch."""
    import torch

    if not sequences:
        raise ValueError("cannot collate an empty batch")
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    response = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, :n] = 1
        response[i, len(p):n] = True
    return SequenceBatch(input_ids, attention, response)


def collate_pairs(
    tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
    max_prompt_length: int, max_length: int,
) -> SequenceBatch:
    """Chosen rows first, then rejected rows, in one padded batch of 2B for a single forward."""
    seqs = [encode(tokenizer, p, c, max_prompt_length, max_length) for p, c in zip(prompts, chosen)]
    seqs += [encode(tokenizer, p, r, max_prompt_length, max_length) for p, r in zip(prompts, rejected)]
    return collate(seqs, tokenizer.pad_token_id)
