"""What a config trains on and with: the data (the built-in task or the user's files, with a
tokenizer and the held-out problems) and the teacher and student models built for it."""

from __future__ import annotations

import copy
import hashlib
import json

import torch

from ..models.decoder import DecoderLM
from ..digests import file_sha256
from .checkpoint import load_model, verify_sha256
from .config import ConfigError, decoder_config, train_config
from .data import DataError, CharTokenizer, HFTokenizer, check_aligned, encode_pairs, read_jsonl
from .task import encode_examples, make_problems, task_tokenizer


def is_hugging_face(section):
    """A teacher or student section of a Hugging Face model (`hf` or `gguf`)."""
    return "hf" in section or "gguf" in section


def hf_folder(section, role, cache_dir=None, log=None):
    """`(folder or hub id, name)` of an `hf` or `gguf` section: a GGUF file is converted once into
    a Hugging Face folder under `cache_dir` (`models/gguf.py`)."""
    if "hf" in section:
        return section["hf"], section["hf"]
    from ..models.gguf import GGUFError, converted_dir
    from .rundir import default_cache_dir

    try:
        return converted_dir(section["gguf"], cache_dir or default_cache_dir(), log), section["gguf"]
    except GGUFError as error:
        raise ConfigError(f"{role}.gguf: {error}") from None


class Workload:
    """Tokenizer, training examples and evaluation problems `(prompt, response, answer)`.
    Hugging Face models bring their tokenizer (a GGUF file is converted under `cache_dir`)."""

    def __init__(self, config, cache_dir=None, log=None, validation=0):
        """`validation` > 0 also sets aside that many problems to tune on (`validation_problems`):
        the built-in task makes new ones; a data file gives its last `validation` training pairs."""
        self.config = config
        self.cache_dir, self.log = cache_dir, log
        if "task" in config:
            task = config["task"]
            # The built-in task's text, tokenized by the models' own tokenizer when they have one.
            hf = any(is_hugging_face(config[role]) for role in ("teacher", "student"))
            self.tokenizer = self._tokenizer(config, ()) if hf else task_tokenizer()
            shape = dict(min_terms=task["min_terms"], max_terms=task["max_terms"], max_value=task["max_value"],
                         orders=task.get("orders", "two"))
            self.train_problems = make_problems(task["train_problems"], task["seed"], **shape)
            self.eval_problems = make_problems(task["eval_problems"], task["seed"] + 1_000_000, **shape)
            self.validation_problems = make_problems(validation, task["seed"] + 2_000_000, **shape)
            self.examples = encode_examples(self.train_problems, self.tokenizer)
            self.score = None  # the final answer after '#'
            self.identity = {"task": task}
        else:
            pairs = read_jsonl(config["data"])
            if config.get("eval_data"):
                eval_pairs = read_jsonl(config["eval_data"])
            else:  # hold out a slice of the data
                held = max(1, int(len(pairs) * config.get("eval_fraction", 0.05)))
                if held >= len(pairs):
                    raise DataError(f"{config['data']} has {len(pairs)} examples: too few to hold some out for "
                                    f"evaluation (give eval_data)")
                pairs, eval_pairs = pairs[:-held], pairs[-held:]
            if validation:
                if validation >= len(pairs):
                    raise DataError(f"{config['data']} has {len(pairs)} training examples: too few to set "
                                    f"{validation} aside for tuning")
                pairs, validation_pairs = pairs[:-validation], pairs[-validation:]
            else:
                validation_pairs = []
            self.validation_problems = [(prompt, response, response) for prompt, response in validation_pairs]
            self.tokenizer = self._tokenizer(config, pairs + eval_pairs)
            self.examples = encode_pairs(pairs, self.tokenizer, config["data"])
            encode_pairs(eval_pairs, self.tokenizer, config.get("eval_data") or config["data"])
            self.eval_problems = [(prompt, response, response) for prompt, response in eval_pairs]
            self.score = lambda text, problem: text.strip() == problem[1].strip()
            self.files = {path: file_sha256(path) for path in (config["data"], config.get("eval_data")) if path}
            self.identity = {"data_sha256": self.files[config["data"]]}
        limit = config["eval"].get("limit")
        if limit:
            self.eval_problems = self.eval_problems[:limit]

    files = {}  # {data file path: sha256 of its bytes} (none for the built-in task)
    train_problems = None  # the built-in task's (prompt, response, answer) of `examples`

    def scored_on(self, problems):
        """This workload with `problems` in place of its evaluation problems (the validation split,
        for tuning)."""
        view = copy.copy(self)
        view.eval_problems = problems
        return view

    def fingerprint(self):
        """What a run directory records of its data when it is created: the sha256 of each data
        file's bytes, and of the examples and evaluation problems made from them."""
        from .trainer import examples_sha256

        return {"files": dict(self.files), "examples_sha256": examples_sha256(self.examples),
                "eval_sha256": hashlib.sha256(json.dumps(self.eval_problems).encode()).hexdigest()}

    def _tokenizer(self, config, texts):
        tokenizers, names, loaded = {}, {}, {}
        for role in ("teacher", "student"):
            if is_hugging_face(config[role]):
                folder, names[role] = hf_folder(config[role], role, self.cache_dir, self.log)
                if folder in loaded:  # the same model (truncated or not): one tokenizer
                    tokenizers[role] = loaded[folder]
                    continue
                try:
                    tokenizers[role] = loaded[folder] = HFTokenizer.from_pretrained(folder, names[role])
                except (OSError, ValueError) as error:
                    if isinstance(error, DataError):
                        raise
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    kind = "hf" if "hf" in config[role] else "gguf"
                    raise ConfigError(f"{role}.{kind}: cannot load a tokenizer from {names[role]!r}: "
                                      f"{reason}") from None
        if len(tokenizers) == 2 and tokenizers["teacher"] is not tokenizers["student"]:
            check_aligned(tokenizers["teacher"], tokenizers["student"], names["teacher"], names["student"])
        if tokenizers:
            return tokenizers.get("student") or tokenizers["teacher"]
        return CharTokenizer.from_texts(text for pair in texts for text in pair)

    def check_positions(self, distill_values=()):
        """Refuse a built-in decoder whose `max_positions` is shorter than a sequence it would see:
        a training example, an evaluation prompt plus `eval.max_new_tokens` (and, for the student,
        a rollout: a prompt plus the `max_new_tokens` of each of `distill_values`). Checked before
        anything is written; a run would otherwise fail in the middle."""
        from ..models.decoder import DecoderConfig

        eval_examples = encode_examples(self.eval_problems, self.tokenizer)
        longest_response = max(len(response) for _, response in self.examples)
        longest_prompt = max(len(prompt) for prompt, _ in self.examples)
        needs = {"a training example (prompt + response + EOS)": max(len(p) + len(r) for p, r in self.examples),
                 "an evaluation example": max(len(p) + len(r) for p, r in eval_examples),
                 "an evaluation prompt + eval.max_new_tokens":
                     max(len(p) for p, _ in eval_examples) + self.config["eval"]["max_new_tokens"]}
        rollouts = {"a prompt + distill.max_new_tokens (on-policy rollouts)":
                    longest_prompt + (values.get("max_new_tokens") or longest_response)
                    for values in distill_values if values.get("on_policy_fraction", 0) > 0}
        for role in ("teacher", "student"):
            decoder = self.config[role].get("decoder")
            if decoder is None:
                continue
            limit = decoder.get("max_positions", DecoderConfig.max_positions)
            for what, length in {**needs, **(rollouts if role == "student" else {})}.items():
                if length > limit:
                    raise DataError(f"{role}.decoder.max_positions={limit} is shorter than {what}: {length} tokens; "
                                    f"raise it")

    def train_options(self, log):
        """The options of `train` that come from the data (its padding and end-of-sequence ids),
        with `log`."""
        return dict(pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id, log=log)

    def distill_config(self, values, source, path):
        """The `TrainConfig` of a distillation run: its rollouts are as long as the data's longest
        response unless `max_new_tokens` says otherwise."""
        config = train_config(values, source, path)
        if not config.max_new_tokens:
            config.max_new_tokens = max(len(response) for _, response in self.examples)
        return config



def build_model(section, tokenizer, role, device, cache_dir=None, log=None):
    """The teacher or student of a config section, on `device`, in float32 (a GGUF file is
    converted once under `cache_dir`, default `default_cache_dir()`)."""
    if is_hugging_face(section):
        from ..models.hf import HFCausalLM

        folder, name = hf_folder(section, role, cache_dir, log)
        kind = "hf" if "hf" in section else "gguf"
        try:
            model = HFCausalLM.from_pretrained(folder, num_layers=section.get("num_layers"), dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{role}.{kind}: cannot load a model from {name!r}: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if model.vocab_size < tokenizer.vocab_size:
            raise DataError(f"{role} {name} has {model.vocab_size} output rows but the tokenizer has "
                            f"{tokenizer.vocab_size} tokens: the vocabularies cannot be aligned")
    else:
        decoder = decoder_config({"vocab_size": tokenizer.vocab_size, **section["decoder"]}, tokenizer.vocab_size,
                                 "config", f"{role}.decoder")
        if decoder.vocab_size < tokenizer.vocab_size:
            raise DataError(f"{role}.decoder.vocab_size={decoder.vocab_size} is smaller than the tokenizer's "
                            f"{tokenizer.vocab_size} tokens: the vocabularies cannot be aligned")
        torch.manual_seed((section.get("train") or section.get("warmup") or {}).get("seed", 0))
        model = DecoderLM(decoder)
    model = model.to(device)
    if section.get("checkpoint"):
        verify_sha256(section["checkpoint"])  # a recorded checksum (the pinned teacher's) must match
        load_model(model, section["checkpoint"])
    return model
