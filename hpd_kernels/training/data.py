"""User data for `hpd distill --config`: JSON lines of `{"prompt": ..., "response": ...}`, and the
tokenizers that turn them into token ids (character-level for the built-in decoder, a model's own
tokenizer for Hugging Face models). Errors name the file and line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

PAD, EOS = 0, 1


class DataError(ValueError):
    """Unusable input data: the message names the file and line."""


def read_jsonl(path):
    """`[(prompt, response)]` from a JSON-lines file (UTF-8, a byte-order mark allowed); blank lines
    are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().split("\n")  # newlines only: JSON strings may hold U+2028
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected an object with \"prompt\" and \"response\", "
                            f"got {type(record).__name__}")
        for key in ("prompt", "response"):
            if key not in record:
                raise DataError(f"{path} line {number}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise DataError(f"{path} line {number}: {key!r} must be a string, got {type(record[key]).__name__}")
        if not record["response"]:
            raise DataError(f"{path} line {number}: 'response' is empty")
        pairs.append((record["prompt"], record["response"]))
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


@dataclass(frozen=True)
class CharTokenizer:
    """One id per character of `alphabet`, after PAD (0) and EOS (1)."""

    alphabet: str

    pad_id = PAD
    eos_id = EOS

    @classmethod
    def from_texts(cls, texts):
        return cls("".join(sorted(set("".join(texts)))))

    @property
    def vocab_size(self):
        return len(self.alphabet) + 2

    def encode(self, text, *, prompt=False):
        unknown = set(text) - set(self.alphabet)
        if unknown:
            raise ValueError(f"characters outside the tokenizer's alphabet: {sorted(unknown)}")
        return [self.alphabet.index(char) + 2 for char in text]

    def decode(self, ids):
        chars = []
        for token in ids:
            if token == EOS:
                break
            if token >= 2:
                chars.append(self.alphabet[token - 2])
        return "".join(chars)

    def describe(self):
        return {"kind": "char", "alphabet": self.alphabet}


class HFTokenizer:
    """A Hugging Face tokenizer: special tokens (BOS) on prompts only; EOS ends responses."""

    def __init__(self, tokenizer, name):
        if tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer of {name} has no EOS token; responses could not end")
        self.tokenizer, self.name = tokenizer, name
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path, name=None):
        """The tokenizer in `path`; `name` (default `path`) is what messages and run records call it."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), name or path)

    @property
    def vocab_size(self):
        return len(self.tokenizer)

    def encode(self, text, *, prompt=False):
        return self.tokenizer(text, add_special_tokens=prompt)["input_ids"]

    def decode(self, ids):
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self):
        return {"kind": "hf", "name": self.name, "size": self.vocab_size}


def check_aligned(teacher_tokenizer, student_tokenizer, teacher_name="teacher", student_name="student"):
    """Token-level distillation compares distributions id by id: both sides must give every
    token the same id (the vocabulary sizes may differ by padding rows of the lm_head)."""
    if isinstance(teacher_tokenizer, HFTokenizer) and isinstance(student_tokenizer, HFTokenizer):
        teacher_vocab, student_vocab = teacher_tokenizer.tokenizer.get_vocab(), student_tokenizer.tokenizer.get_vocab()
        differing = [token for token, index in student_vocab.items() if teacher_vocab.get(token) != index]
        if differing:
            raise DataError(f"the vocabularies of {teacher_name} and {student_name} cannot be aligned: "
                            f"{len(differing)} of the student's {len(student_vocab)} tokens have another id (or none) "
                            f"in the teacher's, e.g. {differing[:3]}")
    elif teacher_tokenizer.describe() != student_tokenizer.describe():
        raise DataError(f"the tokenizers of {teacher_name} ({teacher_tokenizer.describe()}) and {student_name} "
                        f"({student_tokenizer.describe()}) differ: their vocabularies cannot be aligned")


def encode_pairs(pairs, tokenizer, path="data"):
    """`[(prompt ids, response ids + EOS)]`; a text the tokenizer cannot encode names its line."""
    examples = []
    for number, (prompt, response) in enumerate(pairs, 1):
        try:
            examples.append((tokenizer.encode(prompt, prompt=True), tokenizer.encode(response) + [tokenizer.eos_id]))
        except ValueError as error:
            raise DataError(f"{path} example {number}: {error}") from None
    return examples
