"""`hpd distill`: teacher, then student, end to end, from one config.

The config is a JSON object (the embedded default is `DEFAULT_CONFIG`; a user's file overrides
it section by section):

- `task` (the built-in addition task) or `data` (+ optional `eval_data`): JSON lines of
  `{"prompt": ..., "response": ...}`;
- `teacher`: `{"hf": path}`, or `{"decoder": {...}, "checkpoint": file}`, or
  `{"decoder": {...}, "train": {...}}` to train it from scratch with `sft` (cached on disk, keyed
  by everything that determines it, so the next run reuses it);
- `student`: `{"hf": path}` or `{"decoder": {...}}`, optional `checkpoint`, optional `warmup`
  (a short `sft` run before distillation: the "student before");
- `distill`: the distillation run's `TrainConfig`; `eval`: how models are scored; `device`.

Every stage writes under the output directory and resumes from there; a directory that holds a
run of another config is refused, never overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time

import torch

from ..models.decoder import DecoderConfig, DecoderLM
from . import distributed
from .checkpoint import CheckpointError, load_model, save_model
from .data import DataError, CharTokenizer, HFTokenizer, check_aligned, encode_pairs, read_jsonl
from .criteria import shifted_labels
from .plot import plot_runs
from .task import answer_accuracy, encode_examples, make_problems, task_tokenizer
from .trainer import TrainConfig, collate, train

DEFAULT_CONFIG = {
    "task": {"name": "addition", "train_problems": 20000, "eval_problems": 400, "min_terms": 3, "max_terms": 4,
             "max_value": 20, "seed": 0},
    "teacher": {
        "decoder": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "max_positions": 96},
        "train": {"objective": "sft", "steps": 1500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "seed": 0},
    },
    "student": {
        "decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_positions": 96},
        "warmup": {"objective": "sft", "steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "seed": 1},
    },
    "distill": {"objective": "hpd", "steps": 1500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "seed": 2,
                "eval_every": 300, "save_every": 100},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "seed": 0},
    "device": "auto",
}

SECTIONS = {
    "task": {"name", "train_problems", "eval_problems", "min_terms", "max_terms", "max_value", "seed"},
    "data": None, "eval_data": None, "eval_fraction": None, "device": None,
    "teacher": {"hf", "decoder", "checkpoint", "train"},
    "student": {"hf", "decoder", "checkpoint", "warmup"},
    "distill": None,  # TrainConfig's fields, checked there
    "eval": {"max_new_tokens", "temperature", "seed", "limit"},
}


class ConfigError(ValueError):
    """A config that cannot be run: the message names the file and key."""


def read_json_object(path, what):
    """The JSON object in the file at `path`; errors name the file (and line) and say what is wrong."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return value


def load_config(path=None, overrides=None):
    """The default config, overridden by the JSON file at `path`, then by `overrides` (for the
    `distill` section). Relative paths in the file are taken relative to the file."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    source = "the default config"
    if path is not None:
        source = path
        config = merge_config(config, read_json_object(path, "config file"), os.path.dirname(os.path.abspath(path)),
                              path)
    if overrides:
        config["distill"].update({key: value for key, value in overrides.items() if value is not None})
    validate_config(config, source)
    return config


def merge_config(config, user, base_dir, source, prefix=""):
    """`config` overridden section by section by the user's object `user` (from a file in
    `base_dir`, named `source`; `prefix` names the section in messages): relative paths (`data`,
    `eval_data`, a model's `hf` or `checkpoint`) are taken relative to `base_dir`, the user's data
    replaces the built-in task, and a model given as `hf` or `decoder` replaces the default's way to
    build it. Shared by `hpd distill` and `hpd experiment`'s `base`; returns a new config."""
    config, user = copy.deepcopy(config), copy.deepcopy(user)
    for key in ("data", "eval_data"):
        if isinstance(user.get(key), str):
            user[key] = os.path.join(base_dir, user[key])
    for role in ("teacher", "student"):
        section = user.get(role)
        if isinstance(section, dict):
            for key in ("hf", "checkpoint"):
                if isinstance(section.get(key), str) and os.path.exists(os.path.join(base_dir, section[key])):
                    section[key] = os.path.join(base_dir, section[key])
    if "data" in user:  # the user's data replaces the built-in task
        config.pop("task", None)
    for role in ("teacher", "student"):  # a model given by path replaces the default's way to build one
        if isinstance(user.get(role), dict) and ("hf" in user[role] or "decoder" in user[role]):
            config[role] = {}
    for key, value in user.items():
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {prefix}{key!r}; known keys: {sorted(SECTIONS)}")
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def validate_config(config, source):
    if "task" in config and "data" in config:
        raise ConfigError(f"{source}: give either 'task' (the built-in task) or 'data', not both")
    if "task" not in config and "data" not in config:
        raise ConfigError(f"{source}: 'data' (a JSON-lines file of prompt/response) is required")
    for key, allowed in SECTIONS.items():
        if allowed is None or key not in config:
            continue
        if not isinstance(config[key], dict):
            raise ConfigError(f"{source}: {key!r} must be an object")
        for inner in config[key]:
            if inner not in allowed:
                raise ConfigError(f"{source}: unknown key {key}.{inner!r}; known keys: {sorted(allowed)}")
    if config.get("task", {}).get("name", "addition") != "addition":
        raise ConfigError(f"{source}: task.name must be 'addition' (the built-in task), got {config['task']['name']!r}")
    for role in ("teacher", "student"):
        section = config[role]
        if ("hf" in section) == ("decoder" in section):
            raise ConfigError(f"{source}: {role} needs exactly one of 'hf' (a Hugging Face model) or 'decoder' "
                              f"(the built-in model's sizes)")
        if "decoder" in section:
            _decoder_config(section["decoder"], 1, f"{source}: {role}.decoder")
    teacher = config["teacher"]
    if "decoder" in teacher and "checkpoint" not in teacher and "train" not in teacher:
        raise ConfigError(f"{source}: a decoder teacher needs 'checkpoint' (trained weights) or 'train' "
                          f"(train it from scratch with sft)")
    for where, values in (("teacher.train", teacher.get("train")), ("student.warmup", config["student"].get("warmup")),
                          ("distill", config["distill"])):
        if values is not None:
            if _train_config(values, f"{source}: {where}").strategy == "fsdp":
                raise ConfigError(f"{source}: {where}.strategy: hpd distill runs DDP under torchrun (it evaluates and "
                                  f"saves whole models on rank 0); FSDP2 is available in the trainer API, "
                                  f"train(TrainConfig(strategy='fsdp'), ...)")


def _decoder_config(values, vocab_size, where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object of DecoderConfig fields")
    known = set(DecoderConfig.__dataclass_fields__)
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(known)}")
    try:
        return DecoderConfig(**{"vocab_size": vocab_size, **values})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _train_config(values, where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object of training options")
    try:
        return TrainConfig.from_dict(values, where)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Data and models


class Workload:
    """Tokenizer, training examples and evaluation problems `(prompt, response, answer)`."""

    def __init__(self, config):
        self.config = config
        if "task" in config:
            task = config["task"]
            self.tokenizer = task_tokenizer()
            shape = dict(min_terms=task["min_terms"], max_terms=task["max_terms"], max_value=task["max_value"])
            train_problems = make_problems(task["train_problems"], task["seed"], **shape)
            self.eval_problems = make_problems(task["eval_problems"], task["seed"] + 1_000_000, **shape)
            self.examples = encode_examples(train_problems, self.tokenizer)
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
            self.tokenizer = self._tokenizer(config, pairs + eval_pairs)
            self.examples = encode_pairs(pairs, self.tokenizer, config["data"])
            encode_pairs(eval_pairs, self.tokenizer, config.get("eval_data") or config["data"])
            self.eval_problems = [(prompt, response, response) for prompt, response in eval_pairs]
            self.score = lambda text, problem: text.strip() == problem[1].strip()
            with open(config["data"], "rb") as handle:
                self.identity = {"data_sha256": hashlib.sha256(handle.read()).hexdigest()}
        limit = config["eval"].get("limit")
        if limit:
            self.eval_problems = self.eval_problems[:limit]

    @staticmethod
    def _tokenizer(config, texts):
        tokenizers = {role: HFTokenizer.from_pretrained(config[role]["hf"])
                      for role in ("teacher", "student") if "hf" in config[role]}
        if len(tokenizers) == 2:
            check_aligned(tokenizers["teacher"], tokenizers["student"], config["teacher"]["hf"], config["student"]["hf"])
        if tokenizers:
            return tokenizers.get("student") or tokenizers["teacher"]
        return CharTokenizer.from_texts(text for pair in texts for text in pair)

    def max_response_tokens(self):
        return max(len(response) for _, response in self.examples)


def build_model(section, tokenizer, role, device):
    """The teacher or student of a config section, on `device`, in float32."""
    if "hf" in section:
        from ..models.hf import HFCausalLM

        try:
            model = HFCausalLM.from_pretrained(section["hf"], dtype=torch.float32)
        except OSError as error:
            raise ConfigError(f"{role}.hf: cannot load a model from {section['hf']!r}: {error}") from None
        if model.vocab_size < tokenizer.vocab_size:
            raise DataError(f"{role} {section['hf']} has {model.vocab_size} output rows but the tokenizer has "
                            f"{tokenizer.vocab_size} tokens: the vocabularies cannot be aligned")
    else:
        decoder = _decoder_config({"vocab_size": tokenizer.vocab_size, **section["decoder"]}, tokenizer.vocab_size,
                                  f"{role}.decoder")
        if decoder.vocab_size < tokenizer.vocab_size:
            raise DataError(f"{role}.decoder.vocab_size={decoder.vocab_size} is smaller than the tokenizer's "
                            f"{tokenizer.vocab_size} tokens: the vocabularies cannot be aligned")
        torch.manual_seed((section.get("train") or section.get("warmup") or {}).get("seed", 0))
        model = DecoderLM(decoder)
    model = model.to(device)
    if section.get("checkpoint"):
        load_model(model, section["checkpoint"])
    return model


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_statistics(model, workload, teacher=None, batch_size=128):
    """Teacher-forced cross-entropy of `model` on the evaluation responses (nats/token) and, with
    `teacher`, the forward and reverse KL between them per token (temperature 1)."""
    examples = encode_examples(workload.eval_problems, workload.tokenizer)
    device = model.lm_head.weight.device
    totals = {"heldout_ce": 0.0, "fkl_to_teacher": 0.0, "rkl_to_teacher": 0.0}
    tokens = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        input_ids, loss_mask = collate(examples[start:start + batch_size], workload.tokenizer.pad_id, device)
        labels = shifted_labels(input_ids, loss_mask)
        attention = (input_ids != workload.tokenizer.pad_id).long() | loss_mask
        active = labels != -100
        log_q = torch.log_softmax(model.lm_head(model(input_ids, attention_mask=attention))[active].double(), -1)
        totals["heldout_ce"] += float(-log_q.gather(-1, labels[active][:, None]).sum())
        if teacher is not None:
            teacher_logits = teacher.lm_head(teacher(input_ids, attention_mask=attention))[active].double()
            log_p = torch.log_softmax(teacher_logits[:, :log_q.shape[-1]], -1)
            totals["fkl_to_teacher"] += float((log_p.exp() * (log_p - log_q)).nan_to_num().sum())
            totals["rkl_to_teacher"] += float((log_q.exp() * (log_q - log_p)).nan_to_num().sum())
        tokens += int(active.sum())
    model.train(was_training)
    if teacher is None:
        del totals["fkl_to_teacher"], totals["rkl_to_teacher"]
    return {key: value / max(1, tokens) for key, value in totals.items()}


def evaluate_model(model, workload, eval_config, teacher=None):
    """Greedy and sampled exact-match accuracy, held-out cross-entropy (and KL to the teacher)."""
    common = dict(max_new_tokens=eval_config["max_new_tokens"], seed=eval_config["seed"], score=workload.score)
    return {
        "greedy_accuracy": answer_accuracy(model, workload.eval_problems, workload.tokenizer, greedy=True, **common),
        "sampled_accuracy": answer_accuracy(model, workload.eval_problems, workload.tokenizer, greedy=False,
                                            temperature=eval_config["temperature"], **common),
        **heldout_statistics(model, workload, teacher),
    }


# ----------------------------------------------------------------------------------------------
# The pipeline


def default_cache_dir():
    return os.environ.get("HPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hpd-kernels")


def _claim_output_dir(out_dir, config):
    """Create `out_dir` for `config`, or accept it when it already holds a run of this config."""
    path = os.path.join(out_dir, "config.json")
    if os.path.exists(path):
        with open(path) as handle:
            saved = json.load(handle)
        if saved != json.loads(json.dumps(config)):
            changed = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
            raise ConfigError(f"{out_dir} holds a run of another config (differs in {changed}); choose another "
                              f"--out directory: nothing in {out_dir} was changed")
        return True
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not a run directory of hpd distill; choose another --out "
                          f"directory: nothing in it was changed")
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(config, handle, indent=1)
    os.replace(path + ".tmp", path)
    return False


def _prepare_teacher(model, config, workload, cache_dir, log):
    """The teacher's weights and evaluation: as given, or trained with sft and cached."""
    section = config["teacher"]
    if "train" not in section or section.get("checkpoint"):
        model.eval().requires_grad_(False)
        return model, None
    identity = {"decoder": section["decoder"], "train": section["train"], "data": workload.identity,
                "tokenizer": workload.tokenizer.describe(), "eval": config["eval"], "format": 1}
    if distributed.world_size() > 1:  # batch_size is per rank: another world size trains another teacher
        identity["world_size"] = distributed.world_size()
    key = _digest(identity)
    folder = os.path.join(cache_dir, f"teacher-{key}")
    weights, info_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "info.json")
    if os.path.isfile(weights) and os.path.isfile(info_path):
        load_model(model, weights)
        with open(info_path) as handle:
            info = json.load(handle)
        log(f"teacher: reusing {folder}")
    else:
        log(f"teacher: training from scratch with sft ({section['train']['steps']} steps), cached in {folder}")
        started = time.perf_counter()
        train_config = _train_config(section["train"], "teacher.train")
        history = train(train_config, model, None, workload.examples, pad_id=workload.tokenizer.pad_id,
                        eos_id=workload.tokenizer.eos_id, run_dir=os.path.join(folder, "run"), label="teacher sft",
                        log=log)
        info = None
        if distributed.is_main():  # under torchrun every rank trained (DDP); rank 0 writes the cache
            info = {"evaluation": evaluate_model(model, workload, config["eval"]),
                    "train_seconds": time.perf_counter() - started, "final_train_metrics": history[-1]}
            save_model(model, weights, metadata={"config": json.dumps(section)})
            with open(info_path + ".tmp", "w") as handle:
                json.dump(info, handle, indent=1)
            os.replace(info_path + ".tmp", info_path)
        info = distributed.broadcast_object(info)
    model.eval().requires_grad_(False)
    return model, info["evaluation"]


def _json_dump(path, value):
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=1)
    os.replace(path + ".tmp", path)


def run_distill(config, out_dir, *, cache_dir=None, log=print):
    """Teacher (loaded or trained and cached), student warm-up, distillation, evaluation; returns
    the results dict also written to `out_dir/results.json` (+ `results.md`, `distill.png`)."""
    started = time.perf_counter()
    device = choose_device(config.get("device", "auto"))
    main = distributed.is_main()
    if not main:
        log = _silent
    # Data, models and checkpoints are all checked before anything is written.
    workload = Workload(config)
    teacher = build_model(config["teacher"], workload.tokenizer, "teacher", device)
    student = build_model(config["student"], workload.tokenizer, "student", device)
    distill_config = _train_config(config["distill"], "distill")
    resumed = _on_main(lambda: _claim_output_dir(out_dir, config))
    if resumed:
        log(f"{out_dir}: continuing the run found there")
    teacher, teacher_eval = _prepare_teacher(teacher, config, workload, cache_dir or default_cache_dir(), log)
    evaluations_path = os.path.join(out_dir, "evaluations.json")

    def update_evaluations(key, compute):
        """Rank 0 evaluates (once: the result is kept on disk) and tells the other ranks."""
        def work():
            stored = {}
            if os.path.isfile(evaluations_path):
                with open(evaluations_path) as handle:
                    stored = json.load(handle)
            if key not in stored:
                stored[key] = compute()
                _json_dump(evaluations_path, stored)
            return stored
        return _on_main(work)

    evaluations = update_evaluations("teacher", lambda: teacher_eval or evaluate_model(teacher, workload, config["eval"]))
    if not distill_config.max_new_tokens:
        distill_config.max_new_tokens = workload.max_response_tokens()
    common = dict(pad_id=workload.tokenizer.pad_id, eos_id=workload.tokenizer.eos_id, log=log)
    if config["student"].get("warmup"):
        warmup = _train_config(config["student"]["warmup"], "student.warmup")
        train(warmup, student, None, workload.examples, run_dir=os.path.join(out_dir, "student_warmup"),
              label="student warm-up sft", **common)
    evaluations = update_evaluations("student_before", lambda: evaluate_model(student, workload, config["eval"], teacher))
    history = train(distill_config, student, teacher, workload.examples, run_dir=os.path.join(out_dir, "distill"),
                    evaluate=lambda model, step: evaluate_model(model, workload, config["eval"], teacher),
                    label=f"student {distill_config.objective}", **common)
    if not main:  # rank 0 evaluates and writes the results
        distributed.barrier()
        return None
    final = history[-1]
    evaluations["student_after"] = {key.removeprefix("eval_"): value for key, value in final.items()
                                    if key.startswith("eval_")}
    _json_dump(evaluations_path, evaluations)
    save_model(student, os.path.join(out_dir, "student.safetensors"),
               metadata={"config": json.dumps(config["student"])})
    before = {"step": 0, **{f"eval_{key}": value for key, value in evaluations["student_before"].items()}}
    plot_runs({f"student ({distill_config.objective})": [before] + history}, os.path.join(out_dir, "distill.png"),
              title=f"hpd distill: {distill_config.objective}")
    results = {"objective": distill_config.objective, "evaluations": evaluations, "device": str(device),
               "world_size": distributed.world_size(),
               "seconds_this_invocation": time.perf_counter() - started,
               "distill_step_time_s": sum(r["step_time_s"] for r in history) / len(history),
               "distill_peak_memory_mb": max(r["peak_memory_mb"] for r in history)}
    _json_dump(os.path.join(out_dir, "results.json"), results)
    table = results_table(evaluations, distill_config.objective)
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    distributed.barrier()
    return results


def _silent(*_):
    pass


def choose_device(choice):
    """This process's device: under torchrun, the local rank's GPU (or the CPU)."""
    if distributed.launched_by_torchrun():
        device = distributed.setup_from_env()
        return device if choice in ("auto", "cuda") or device.type == "cpu" else torch.device(choice)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice)


def _on_main(work):
    """Run `work()` on rank 0 only and hand its result (or its error) to every rank. Any error is
    handed on, not only a user's: the other ranks would otherwise wait forever in the broadcast.
    Rank 0 raises its own exception; the others a user error's class, or RuntimeError naming it."""
    result, error, unexpected = None, None, None
    if distributed.is_main():
        try:
            result = work()
        except (ConfigError, DataError, CheckpointError) as caught:
            error = (type(caught).__name__, str(caught))
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks know
            unexpected = caught
            error = ("RuntimeError", f"rank 0 failed: {type(caught).__name__}: {caught}")
    result, error = distributed.broadcast_object((result, error))
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise {"ConfigError": ConfigError, "DataError": DataError, "CheckpointError": CheckpointError,
               "RuntimeError": RuntimeError}[error[0]](error[1])
    return result


def results_table(evaluations, objective):
    rows = [("teacher", "teacher"), ("student before", "student_before"), (f"student after {objective}", "student_after")]
    columns = [("greedy acc", "greedy_accuracy", "{:.1%}"), ("sampled acc", "sampled_accuracy", "{:.1%}"),
               ("held-out CE", "heldout_ce", "{:.3f}"), ("FKL to teacher", "fkl_to_teacher", "{:.3f}"),
               ("RKL to teacher", "rkl_to_teacher", "{:.3f}")]
    lines = ["| model | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, key in rows:
        values = evaluations.get(key, {})
        cells = [fmt.format(values[field]) if field in values else "-" for _, field, fmt in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
