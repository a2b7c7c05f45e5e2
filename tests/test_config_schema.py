"""Every key of the config schema, and every flag, refused when wrong through the real `hpd` entry:
exit code 2, one line on stderr naming the file (or the command line) and the key, and nothing
written (`--out` and `--cache-dir` untouched). The cases are made from the schema itself (a value
of the wrong type and one out of range for each key), so a key added to it is tested here.

Validation happens before any data is read into a model or any model is built: `Workload` is
replaced by a trap, so nothing here trains.
"""

import hashlib
import json
import math
import os
from dataclasses import fields

import pytest
import torch

from hpd_kernels.cli import main
from hpd_kernels.models.decoder import DecoderConfig
from hpd_kernels.training.experiment import context as experiment_context
from hpd_kernels.training import pipeline, schema
from hpd_kernels.training.config import load_config
from hpd_kernels.training.data import read_jsonl
from hpd_kernels.training.trainer import TrainConfig
from hpd_kernels.training.workload import Workload

DECODER = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}
TASK_BASE = {"task": {"train_problems": 20, "eval_problems": 4},
             "teacher": {"decoder": DECODER, "train": {"objective": "sft", "steps": 1, "batch_size": 2}},
             "student": {"decoder": DECODER, "warmup": {"objective": "sft", "steps": 1, "batch_size": 2}},
             "distill": {"steps": 1, "batch_size": 2}, "eval": {"max_new_tokens": 4}}
DATA_BASE = {key: value for key, value in TASK_BASE.items() if key != "task"} | {"data": "train.jsonl"}
# An experiment's base is hpd distill's config less what the experiment sets itself (distill, eval, device).
EXPERIMENT_BASE = {"objectives": ["sft", "hpd"], "seeds": [0], "distill": {"steps": 1, "batch_size": 2},
                   "sweep": {"fkl_weight": [2.0], "rkl_weight": [1.0], "on_policy_fraction": [0.5]},
                   "primary": {"treatment": "hpd", "control": "seqkd"},
                   "eval": {"max_new_tokens": 4, "samples": 1},
                   "base": {key: value for key, value in TASK_BASE.items() if key not in ("distill", "eval")}}
NO_GPU = not torch.cuda.is_available()


class Trap:
    def __init__(self, *args, **kwargs):
        raise AssertionError("validation let a bad config through to the workload")


@pytest.fixture(autouse=True)
def no_workload(monkeypatch):
    monkeypatch.setattr(pipeline, "Workload", Trap)
    monkeypatch.setattr(experiment_context, "Workload", Trap)


def _bad_values(spec):
    """`[(label, value)]`: values `spec` refuses, the wrong type first, then out of range."""
    if isinstance(spec, schema.Optional):
        return _bad_values(spec.spec)
    if isinstance(spec, schema.Int):
        values = [("string", "x"), ("float", 2.5), ("bool", True), ("below", (spec.low or 0) - 1)]
        if spec.high is not None:
            values.append(("at the top", spec.high))
        return values
    if isinstance(spec, schema.Number):
        values = [("string", "x"), ("bool", True), ("nan", math.nan), ("inf", math.inf)]
        if spec.low is not None:
            values.append(("below", spec.low if spec.low_open else spec.low - 1))
        if spec.high is not None:
            values.append(("above", spec.high if spec.high_open else spec.high + 0.5))
        return values
    if isinstance(spec, schema.Choice):
        return [("number", 3), ("unknown choice", "nope")]
    if isinstance(spec, schema.Bool):
        return [("string", "yes"), ("number", 1)]
    if isinstance(spec, schema.Name):
        return [("number", 3), ("empty", ""), ("upper case", "Arm"), ("a path", "../arm")]
    if isinstance(spec, schema.File):
        return [("number", 3), ("empty", ""), ("missing", "missing.file"), ("a directory", ".")]
    if isinstance(spec, schema.HFModel):
        return [("number", 3), ("missing directory", "./no/such/model"), ("a file", "train.jsonl")]
    if isinstance(spec, schema.GGUFModel):
        return [("number", 3), ("empty", ""), ("missing file", "missing.gguf"), ("a directory", ".")]
    if isinstance(spec, schema.Device):
        return [("number", 3), ("unknown", "foo"), ("index", "cuda:x")] + ([("no gpu", "cuda")] if NO_GPU else [])
    if isinstance(spec, schema.ListOf):
        return [("string", "x"), ("repeated", [_good(spec.item)] * 2)] + \
               [("bad item " + label, [value]) for label, value in _bad_values(spec.item)[:2]] + \
               ([] if spec.empty else [("empty", [])])
    if isinstance(spec, schema.Section):
        return [("number", 3), ("list", []), ("unknown key", {"bogus_key": 1})]
    if isinstance(spec, (schema.Anything, schema.Refused)):
        return []  # Anything: checked later; Refused: every value, tested by name below
    raise AssertionError(f"no bad values for {spec!r}")


def _good(spec):
    return {schema.Int: 1, schema.Number: 0.5, schema.Choice: getattr(spec, "values", [None])[0], schema.Name: "a",
            schema.Section: {}}[type(spec)]


def _keys(spec, path=()):
    """Every (path, spec) of a section, depth first."""
    for name, child in spec.fields.items():
        yield path + (name,), child
        if isinstance(child, schema.Section):
            yield from _keys(child, path + (name,))


def _set(config, path, value):
    config = json.loads(json.dumps(config))
    node = config
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value
    return config


def _distill_cases():
    for path, spec in _keys(schema.DISTILL):
        for label, value in _bad_values(spec):
            yield pytest.param(path, value, id=f"{'.'.join(path)}-{label}")


def _experiment_cases():
    for path, spec in _keys(schema.EXPERIMENT):
        if path[0] == "base" and len(path) > 1:
            continue  # base.*: hpd distill's keys, tested above
        for label, value in _bad_values(spec):
            yield pytest.param(path, value, id=f"{'.'.join(path)}-{label}")


def _tree(folder):
    """A digest of every file and directory under `folder` (None when it does not exist)."""
    if not os.path.exists(folder):
        return None
    digest = hashlib.sha256()
    for root, dirs, names in sorted(os.walk(folder)):
        digest.update(root.encode())
        for name in sorted(names):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "ab", "response": "ba"}\n' * 10)
    return tmp_path


def _refused(argv, capsys, workdir, out="out", cache="cache"):
    """Run `hpd` with `--out` and `--cache-dir` in `workdir`; assert exit 2, one line on stderr and
    nothing written under either directory. Returns the line."""
    out, cache = str(workdir / out), str(workdir / cache)
    before = _tree(str(workdir))
    code = main(argv + ["--out", out, "--cache-dir", cache])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, captured.out, err)
    assert err.startswith(f"hpd {argv[0]}: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert _tree(str(workdir)) == before  # nothing written, neither --out nor --cache-dir
    return err


def _run_config(kind, config, workdir, capsys):
    path = workdir / "cfg.json"
    path.write_text(json.dumps(config))  # NaN and Infinity are written as JSON's extensions
    return _refused([kind, "--config", str(path)], capsys, workdir)


def _key_named(err, path):
    dotted = ".".join(path)
    if f"{dotted} " in err or f"{dotted}:" in err:
        return True
    return "bogus_key" in err  # an unknown key is named by itself under its section


@pytest.mark.parametrize("path,value", list(_distill_cases()))
def test_every_distill_key_is_checked(workdir, capsys, path, value):
    base = TASK_BASE if path[0] == "task" else DATA_BASE
    err = _run_config("distill", _set(base, path, value), workdir, capsys)
    assert "cfg.json: " in err, err
    assert _key_named(err, path), err


@pytest.mark.parametrize("path,value", list(_experiment_cases()))
def test_every_experiment_key_is_checked(workdir, capsys, path, value):
    err = _run_config("experiment", _set(EXPERIMENT_BASE, path, value), workdir, capsys)
    assert "cfg.json: " in err, err
    assert _key_named(err, path) or path[0] == "distill" and "unknown training option" in err, err


def test_the_schema_covers_every_option_of_the_dataclasses():
    assert set(schema.TRAIN.fields) == {field.name for field in fields(TrainConfig)}
    assert set(schema.DECODER.fields) == {field.name for field in fields(DecoderConfig)}
    counts = {name: len(list(_keys(spec))) for name, spec in (("distill", schema.DISTILL),
                                                              ("experiment", schema.EXPERIMENT))}
    assert counts["distill"] > 60 and counts["experiment"] > 30, counts


@pytest.mark.parametrize("argv,key", [
    (["distill", "--steps", "0"], "--steps"), (["distill", "--seed", "-1"], "--seed"),
    (["distill", "--seed", str(2**70)], "--seed"), (["distill", "--on-policy-fraction", "1.5"], "--on-policy-fraction"),
    (["distill", "--on-policy-fraction", "nan"], "--on-policy-fraction"), (["distill", "--device", "foo"], "--device"),
    (["experiment", "--workers", "0"], "--workers"), (["experiment", "--workers", "-3"], "--workers"),
    (["experiment", "--max-runs", "-1"], "--max-runs"), (["experiment", "--max-runs", "0"], "--max-runs"),
    (["experiment", "--device", "tpu"], "--device"),
] + ([(["distill", "--device", "cuda"], "--device"), (["experiment", "--device", "cuda:0"], "--device")]
     if NO_GPU else []))
def test_bad_flags_name_the_flag(workdir, capsys, argv, key):
    err = _refused(argv, capsys, workdir)
    assert f"the command line: {key} must be" in err, err


@pytest.mark.parametrize("config,needle", [
    ({}, "the config file is empty; give the keys to override, any of ['data', 'device', 'distill'"),
    (_set(TASK_BASE, ("teacher", "train", "objective"), "hpd"), "teacher.train.objective must be sft"),
    (_set(TASK_BASE, ("student", "warmup", "objective"), "fkl"), "student.warmup.objective must be sft"),
    (_set(_set(TASK_BASE, ("task", "min_terms"), 4), ("task", "max_terms"), 3), "task.max_terms must be >="),
    (_set(TASK_BASE, ("student", "decoder", "num_heads"), 3), "student.decoder: hidden_size (8) must split"),
    (_set(DATA_BASE, ("eval_fraction",), 1.5), "eval_fraction must be a number in (0, 1)"),
    (_set(TASK_BASE, ("distill", "lr"), -1), "cfg.json: distill.lr must be a finite number > 0, got -1"),
    (_set(TASK_BASE, ("distill", "seed"), 2**70), "distill.seed must be an integer in [0, 2**63)"),
    (_set(TASK_BASE, ("distill", "steps"), 2.5), "distill.steps must be an integer in [1, 10**7), got 2.5"),
    (_set(TASK_BASE, ("eval", "max_new_tokens"), "x"),
     'eval.max_new_tokens must be an integer in [1, 2**20), got "x"'),
    ({**DATA_BASE, "task": {"seed": 1}}, "give either 'task' (the built-in task) or 'data', not both"),
])
def test_rules_between_keys_and_the_issue_examples(workdir, capsys, config, needle):
    err = _run_config("distill", config, workdir, capsys)
    assert needle in err, err


def test_an_empty_experiment_file_is_refused_naming_its_keys(workdir, capsys):
    err = _run_config("experiment", {}, workdir, capsys)
    assert "the experiment file is empty" in err and "'objectives'" in err, err


def test_the_experiment_checks_every_planned_run(workdir, capsys):
    config = _set(EXPERIMENT_BASE, ("sweep", "fkl_weight"), [0.5])  # the sweep's runs, at their merged options
    config = _set(config, ("distill", "rollout_top_p"), 0)
    err = _run_config("experiment", config, workdir, capsys)
    assert "distill.rollout_top_p must be a number in (0, 1], got 0" in err, err


def _read_only_dir(workdir):
    folder = workdir / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return str(folder)
    if not os.access("/proc/self", os.W_OK):  # root writes anywhere but where the kernel refuses it
        return "/proc/self"
    pytest.skip("no read-only directory to test with")


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "out_read_only", "out_empty",
                                  "cache_is_a_file", "cache_read_only", "config_json_is_a_directory",
                                  "config_json_not_json", "config_is_a_directory"])
def test_unusable_paths_are_refused_naming_the_flag(workdir, capsys, case):
    config = workdir / "cfg.json"
    config.write_text(json.dumps(TASK_BASE))
    (workdir / "afile").write_text("x")
    out, cache, key = "out", "cache", "--out"
    if case == "out_is_a_file":
        out = "afile"
    elif case == "out_under_a_file":
        out = "afile/run"
    elif case == "out_read_only":
        out = os.path.join(_read_only_dir(workdir), "run")
    elif case == "cache_is_a_file":
        cache, key = "afile", "--cache-dir"
    elif case == "cache_read_only":
        cache, key = os.path.join(_read_only_dir(workdir), "cache"), "--cache-dir"
    elif case == "config_json_is_a_directory":
        (workdir / "out" / "config.json").mkdir(parents=True)
    elif case == "config_json_not_json":
        (workdir / "out").mkdir()
        (workdir / "out" / "config.json").write_text("{not json")
    elif case == "config_is_a_directory":
        config, key = workdir, "config file"
    if case == "out_empty":
        before = _tree(str(workdir))
        code = main(["distill", "--config", str(config), "--out", "", "--cache-dir", str(workdir / "cache")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "the command line: --out must be a directory path, got \"\"" in err
        assert _tree(str(workdir)) == before
        return
    err = _refused(["distill", "--config", str(config)], capsys, workdir, out=out, cache=cache)
    assert key in err, err


def test_a_byte_order_mark_is_accepted_in_data_and_config_files(tmp_path):
    bom = "\ufeff"
    (tmp_path / "train.jsonl").write_text(bom + '{"prompt": "ab", "response": "ba"}\n' * 10, encoding="utf-8")
    assert read_jsonl(str(tmp_path / "train.jsonl"))[0] == ("ab", "ba")
    path = tmp_path / "cfg.json"
    path.write_text(bom + json.dumps(DATA_BASE), encoding="utf-8")
    config = load_config(str(path))
    assert len(Workload(config).examples) == 9  # the last example is held out for evaluation


def test_text_that_is_not_utf8_is_refused_naming_the_file(workdir, capsys):
    (workdir / "train.jsonl").write_bytes(b'{"prompt": "\xff", "response": "b"}\n')
    config = workdir / "cfg.json"
    config.write_text(json.dumps(DATA_BASE))
    with pytest.raises(ValueError, match=r"train\.jsonl: not UTF-8 text"):
        Workload(load_config(str(config)))
    config.write_bytes(b'{"device": "\xff"}')
    err = _refused(["distill", "--config", str(config)], capsys, workdir)
    assert "cfg.json: not UTF-8 text" in err, err


@pytest.mark.parametrize("role,max_positions,needle", [
    ("student", 4, "student.decoder.max_positions=4 is shorter than a training example (prompt + response + EOS): "
                   "5 tokens"),
    ("teacher", 5, "teacher.decoder.max_positions=5 is shorter than an evaluation prompt + eval.max_new_tokens: "
                   "6 tokens"),
])
def test_a_decoder_too_short_for_the_data_is_refused_before_anything_is_written(workdir, capsys, monkeypatch, role,
                                                                                 max_positions, needle):
    monkeypatch.setattr(pipeline, "Workload", Workload)  # the data is read; no model is built
    monkeypatch.setattr(pipeline, "build_model", Trap)
    config = _set(DATA_BASE, (role, "decoder", "max_positions"), max_positions)
    err = _run_config("distill", _set(config, ("eval_data",), "train.jsonl"), workdir, capsys)
    assert needle in err, err


def test_train_config_checks_through_the_schema():
    from hpd_kernels.training.schema import ConfigError

    with pytest.raises(ConfigError, match=r"TrainConfig: lr must be a finite number > 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"TrainConfig: unknown training option 'stepz'"):
        TrainConfig.from_dict({"stepz": 1})
    with pytest.raises(ConfigError,
                       match=r"my\.json: distill\.steps must be an integer in \[1, 10\*\*7\), got true"):
        TrainConfig.from_dict({"steps": True}, "my.json", "distill")


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["experiment", "--workers", "x"], "argument --workers: invalid int value: 'x'"),
    (["distill", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_flags_argparse_refuses_are_one_line_too(workdir, capsys, argv, needle):
    before = _tree(str(workdir))
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(workdir / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and needle in err, err
    assert _tree(str(workdir)) == before


# ---------------------------------------------------------------- issue 20, items 7 and 8


@pytest.mark.parametrize("key,value,where", [
    ("distill", {"lr": -1}, "'distill'"),   # the issue's example: it used to start a run
    ("distill", {"steps": 5}, "'distill'"),  # a valid value is refused too: it would not be used
    ("eval", {"max_new_tokens": 4}, "'eval'"),
    ("device", "cpu", "'device'"),
])
def test_an_experiment_refuses_the_base_keys_it_sets_itself(workdir, capsys, key, value, where):
    """`base.distill`, `base.eval` and `base.device` are `hpd distill`'s keys that an experiment sets
    itself (its own `distill`, `eval` and `device`): given in `base`, they were silently dropped."""
    err = _run_config("experiment", _set(EXPERIMENT_BASE, ("base", key), value), workdir, capsys)
    assert f"cfg.json: base.{key} is not used: an experiment" in err and f"its own {where}" in err, err


def _integer_specs():
    """Every integer spec of the schema, with its key: the config sections and the flags."""
    for name, spec in (("distill", schema.DISTILL), ("experiment", schema.EXPERIMENT)):
        for path, child in _keys(spec):
            child = child.spec if isinstance(child, schema.Optional) else child
            if isinstance(child, schema.ListOf):
                child = child.item
            if isinstance(child, schema.Int):
                yield f"{name}: {'.'.join(path)}", child
    for flag, spec in schema.FLAGS.items():
        yield flag, spec


def test_every_integer_key_has_an_upper_bound():
    specs = dict(_integer_specs())
    assert len(specs) > 30, sorted(specs)
    unbounded = sorted(key for key, spec in specs.items() if spec.high is None)
    assert not unbounded, unbounded
    assert schema.TRAIN.fields["steps"].high == 10**7 and schema.TRAIN.fields["seed"].high == 2**63


HUGE = 10**30  # an integer in JSON and on the command line, not a float


@pytest.mark.parametrize("kind,path,needle", [
    ("distill", ("distill", "steps"), "distill.steps must be an integer in [1, 10**7), got " + str(HUGE)),
    ("distill", ("teacher", "train", "batch_size"), "teacher.train.batch_size must be an integer in [1, 65536)"),
    ("distill", ("student", "warmup", "grad_accum"), "student.warmup.grad_accum must be an integer in [1, 65536)"),
    ("distill", ("distill", "eval_every"), "distill.eval_every must be an integer in [0, 10**7)"),
    ("distill", ("distill", "max_new_tokens"), "distill.max_new_tokens must be an integer in [0, 2**20)"),
    ("distill", ("student", "decoder", "num_layers"), "student.decoder.num_layers must be an integer in [1, 1024)"),
    ("distill", ("teacher", "decoder", "max_positions"), "teacher.decoder.max_positions must be an integer in"),
    ("distill", ("task", "train_problems"), "task.train_problems must be an integer in [1, 10**7)"),
    ("distill", ("eval", "limit"), "eval.limit must be an integer in [1, 10**7)"),
    ("distill", ("task", "seed"), "task.seed must be an integer in [0, 2**63)"),
    ("experiment", ("tuning", "validation_problems"), "tuning.validation_problems must be an integer in [1, 10**7)"),
    ("experiment", ("tuning", "extend"), "tuning.extend must be an integer in [0, 16)"),
    ("experiment", ("eval", "samples"), "eval.samples must be an integer in [1, 1024)"),
    ("experiment", ("distill", "steps"), "distill.steps must be an integer in [1, 10**7)"),
])
def test_a_huge_integer_is_refused_naming_the_key_and_its_bound(workdir, capsys, kind, path, needle):
    base = TASK_BASE if kind == "distill" else EXPERIMENT_BASE
    err = _run_config(kind, _set(base, path, HUGE), workdir, capsys)
    assert f"cfg.json: {needle}" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--steps", str(HUGE)], "the command line: --steps must be an integer in [1, 10**7), got " + str(HUGE)),
    (["distill", "--steps", str(10**7)], "the command line: --steps must be an integer in [1, 10**7)"),
    (["experiment", "--workers", str(HUGE)], "the command line: --workers must be an integer in [1, 1024)"),
    (["experiment", "--max-runs", str(HUGE)], "the command line: --max-runs must be an integer in [1, 10**6)"),
])
def test_a_huge_integer_flag_is_refused_naming_the_flag_and_its_bound(workdir, capsys, argv, needle):
    err = _refused(argv, capsys, workdir)
    assert needle in err, err


def test_steps_1e30_on_the_command_line_is_one_line_and_exit_2(workdir, capsys):
    before = _tree(str(workdir))
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--steps", "1e30", "--out", str(workdir / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "argument --steps: invalid int value: '1e30'" in err
    assert _tree(str(workdir)) == before


def test_the_largest_step_count_is_accepted():
    assert TrainConfig(steps=10**7 - 1, warmup_steps=10**7 - 1, eval_every=10**7 - 1).steps == 10**7 - 1
