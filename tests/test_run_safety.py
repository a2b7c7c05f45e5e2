"""Runs survive kills, damaged checkpoints, changed data, full disks and a second run on one --out.

- metrics after a kill before the first checkpoint (or mid-write) are exactly an uninterrupted run's;
- a checkpoint file whose bytes differ from the sha256 recorded when it was published is refused, and
  so are metrics that end before the checkpoint's step (a half-written last line resumes as a kill);
- data changed under the same path is refused, not continued as the same run;
- a write that fails with ENOSPC is a one-line error;
- one process at a time per output directory (flock): the second is refused with the holder named,
  a killed holder (kill -9) frees it at once, and a run that needs a teacher another run is training
  into the cache waits for it and reuses it.
"""

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from hpd_kernels.cli import main
from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.training.checkpoint import CheckpointError
from hpd_kernels.training.jsonfiles import WriteError, write_json_atomic
from hpd_kernels.training.locks import LOCK_NAME, LockedError, lock_directory
from hpd_kernels.training.trainer import TrainConfig, train

from toy_training import EOS, VOCAB, toy_examples, toy_model  # noqa: E402,F401
TIMING = ("tokens_per_s", "step_time_s", "peak_memory_mb")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(n=48, seed=0):
    return toy_examples(n, seed)


_model = toy_model


def _without_timing(records):
    return [{key: value for key, value in record.items() if key not in TIMING} for record in records]


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# ---------------------------------------------------------------- exact metrics after a kill


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill", ["stop_after", "evaluate_raises", "mid_write"])
def test_a_kill_before_the_first_checkpoint_resumes_to_an_uninterrupted_runs_metrics(tmp_path, kill):
    teacher = _model(16, seed=5)
    config = TrainConfig(objective="hpd", steps=5, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2,
                         backend="torch", seed=3)  # save_every=0: the only checkpoint is at the end
    score = lambda model, step: {"weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}  # noqa: E731
    uninterrupted = train(config, _model(8, 1), teacher, _examples(), eos_id=EOS, evaluate=score,
                          run_dir=str(tmp_path / "whole"), progress=False, log=None)

    cut = str(tmp_path / "cut")
    if kill == "stop_after":  # killed after step 3
        train(config, _model(8, 1), teacher, _examples(), eos_id=EOS, evaluate=score, run_dir=cut,
              progress=False, log=None, stop_after=3)
    else:  # killed inside the evaluation of step 4: steps 1-3 are in metrics.jsonl
        def dies_at_4(model, step):
            if step == 4:
                raise Killed
            return score(model, step)
        with pytest.raises(Killed):
            train(config, _model(8, 1), teacher, _examples(), eos_id=EOS, evaluate=dies_at_4, run_dir=cut,
                  progress=False, log=None)
    if kill == "mid_write":  # and half of a record was on its way to the disk
        with open(os.path.join(cut, "metrics.jsonl"), "a") as handle:
            handle.write('{"step": 4, "loss": 0.')
    assert not os.path.exists(os.path.join(cut, "latest.json"))
    if kill != "mid_write":
        assert [record["step"] for record in _metrics(cut)] == [1, 2, 3]

    # A new process builds the same initial student (the pipeline seeds it); with no checkpoint to
    # load, the run starts over from it.
    resumed = train(config, _model(8, 1), teacher, _examples(), eos_id=EOS, evaluate=score, run_dir=cut,
                    progress=False, log=None)
    assert [record["step"] for record in _metrics(cut)] == [1, 2, 3, 4, 5]  # no step twice
    assert _without_timing(_metrics(cut)) == _without_timing(_metrics(str(tmp_path / "whole")))
    assert _without_timing(resumed) == _without_timing(uninterrupted)  # losses, evaluations: all equal


# ---------------------------------------------------------------- damaged checkpoints, changed data


def _checkpointed_run(run_dir, examples=None):
    config = TrainConfig(objective="sft", steps=3, batch_size=4, save_every=2, seed=1)
    train(config, _model(8, 0), None, examples or _examples(), run_dir=run_dir, progress=False, log=None,
          stop_after=2)
    return config


@pytest.mark.parametrize("damage", ["flip_model_byte", "truncate_optimizer"])
def test_a_damaged_checkpoint_file_is_refused_by_its_checksum(tmp_path, damage):
    run_dir = str(tmp_path / "run")
    config = _checkpointed_run(run_dir)
    latest = json.load(open(os.path.join(run_dir, "latest.json")))
    assert set(latest["sha256"]) == {"model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    folder = os.path.join(run_dir, latest["checkpoint"])
    name = "model.safetensors" if damage == "flip_model_byte" else "optimizer.safetensors"
    path = os.path.join(folder, name)
    data = bytearray(open(path, "rb").read())
    if damage == "flip_model_byte":
        data[-5] ^= 0x01  # one bit of one weight: still a valid safetensors file, another model
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name} does not match the sha256 checksum recorded when it was "
                                              r"written") as caught:
        train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None)
    assert "\n" not in str(caught.value)


def test_a_checkpoint_of_other_examples_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    config = _checkpointed_run(run_dir)
    with pytest.raises(CheckpointError, match="trained on other examples"):
        train(config, _model(8, 0), None, _examples(seed=7), run_dir=run_dir, progress=False, log=None)


DECODER = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}


def _user_data_config(tmp_path, distill=None):
    lines = [json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) for a in range(5) for b in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = {"data": "train.jsonl", "eval_fraction": 0.2,
              "teacher": {"decoder": {**DECODER, "hidden_size": 16}, "train": {"objective": "sft", "steps": 2,
                                                                                 "batch_size": 4}},
              "student": {"decoder": DECODER},
              "distill": distill or {"objective": "fkl", "steps": 2, "batch_size": 4},
              "eval": {"max_new_tokens": 3}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    return str(tmp_path / "cfg.json")


def _snapshot(folder):
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_hpd_distill_refuses_changed_data_and_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    argv = ["distill", "--config", _user_data_config(tmp_path), "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert [os.path.basename(path) for path in recorded["files"]] == ["train.jsonl"] and recorded["examples_sha256"]
    capsys.readouterr()

    # The same path, other bytes: refused before anything is trained or written.
    original = (tmp_path / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(original.replace('"0+0=", "response": "0"', '"0+0=", "response": "00"'))
    before = _snapshot(tmp_path / "run")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.jsonl changed since the run in" in err and err.count("\n") == 1, err
    assert _snapshot(tmp_path / "run") == before
    (tmp_path / "train.jsonl").write_text(original)

    # A flipped bit in the distillation's checkpoint: refused, naming the file.
    model = tmp_path / "run" / "distill" / "checkpoint-0000002" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x10
    model.write_bytes(bytes(data))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{model} does not match the sha256 checksum recorded when it was written" in err
    assert err.count("\n") == 1, err


# ---------------------------------------------------------------- metrics cut short (issue 20, item 9)


@pytest.mark.parametrize("cut", ["to_its_first_line", "emptied", "deleted", "a_step_removed"])
def test_metrics_that_end_before_the_checkpoint_are_refused_naming_the_file(tmp_path, cut):
    """A resume continues from the checkpoint's step: metrics that end before it would leave those
    steps out of the run's record for good (the run used to finish, exit 0, without a word)."""
    run_dir = str(tmp_path / "run")
    config = TrainConfig(objective="sft", steps=4, batch_size=4, save_every=2, seed=1)
    train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None, stop_after=3)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    assert len(lines) == 3 and json.load(open(os.path.join(run_dir, "latest.json")))["step"] == 2
    if cut == "deleted":
        os.remove(path)
    else:
        kept = {"to_its_first_line": lines[:1], "emptied": [], "a_step_removed": [lines[0], lines[2]]}[cut]
        open(path, "w").write("".join(kept))
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as caught:
        train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None)
    message = str(caught.value)
    assert message.startswith(f"{path} ") and "\n" not in message, message
    assert "the checkpoint at step 2" in message and "nothing there was changed" in message, message
    assert _snapshot(run_dir) == before


def test_a_damaged_line_in_the_metrics_is_refused_naming_the_file_and_line(tmp_path):
    run_dir = str(tmp_path / "run")
    config = TrainConfig(objective="sft", steps=4, batch_size=4, save_every=2, seed=1)
    train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None, stop_after=3)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").write(lines[0] + '{"step": 2, "lo\n' + lines[2])
    with pytest.raises(ValueError, match=rf"^{path} line 2: not valid JSON \(.*\): the file was damaged or edited$"):
        train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None)


def test_a_half_written_line_after_the_checkpoint_still_resumes(tmp_path):
    """A kill mid-write leaves an unterminated last line after the checkpoint's step: that is an
    interruption, not lost metrics, and resuming replays it as before."""
    config = TrainConfig(objective="sft", steps=4, batch_size=4, save_every=2, seed=1)
    whole = train(config, _model(8, 0), None, _examples(), run_dir=str(tmp_path / "whole"), progress=False, log=None)
    run_dir = str(tmp_path / "run")
    train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None, stop_after=3)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as handle:
        handle.write('{"step": 4, "loss": 0.')
    resumed = train(config, _model(8, 0), None, _examples(), run_dir=run_dir, progress=False, log=None)
    assert [record["step"] for record in _metrics(run_dir)] == [1, 2, 3, 4]
    assert _without_timing(resumed) == _without_timing(whole)


def test_hpd_distill_refuses_metrics_cut_short_in_one_line(tmp_path, capsys):
    argv = ["distill", "--config", _user_data_config(tmp_path, {"objective": "fkl", "steps": 4, "batch_size": 4,
                                                                 "save_every": 2}),
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    capsys.readouterr()
    metrics = tmp_path / "run" / "distill" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    before = _snapshot(tmp_path / "run")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpd distill: error: {metrics} ") and err.count("\n") == 1, err
    assert "holds the metrics of 1 of the 4 steps up to the checkpoint at step 4 (they end at step 1:" in err, err
    assert "resuming would leave 3 steps out of the run's metrics" in err, err
    assert _snapshot(tmp_path / "run") == before


# ---------------------------------------------------------------- full disks


def test_a_full_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import hpd_kernels.training.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    argv = ["distill", "--config", _user_data_config(tmp_path), "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress lines of the teacher's training
    assert last.startswith("hpd distill: error: cannot write ") and "No space left on device" in last, err
    assert "checkpoint-0000002.tmp/model.safetensors" in last and "Traceback" not in err
    leftovers = [name for _, dirs, names in os.walk(tmp_path / "cache") for name in dirs + names if ".tmp" in name]
    assert not leftovers  # the half-written checkpoint was removed

    # The JSON writer and the metrics file say the same.
    monkeypatch.setattr("hpd_kernels.training.jsonfiles.os.fsync", full)
    with pytest.raises(WriteError, match=r"cannot write .*x\.json: No space left on device"):
        write_json_atomic(str(tmp_path / "x.json"), {"a": 1})
    assert not os.path.exists(tmp_path / "x.json.tmp")
    if os.path.exists("/dev/full"):  # writes to /dev/full fail with ENOSPC
        run_dir = tmp_path / "metrics_on_full_disk"
        run_dir.mkdir()
        os.symlink("/dev/full", run_dir / "metrics.jsonl")
        with pytest.raises(WriteError, match=r"metrics\.jsonl: No space left on device"):
            train(TrainConfig(objective="sft", steps=2, batch_size=4), _model(8, 0), None, _examples(),
                  run_dir=str(run_dir), progress=False, log=None)


# ---------------------------------------------------------------- one run per output directory


def _hold_lock_in_another_process(directory, command="holder"):
    """A process that takes the lock of `directory` and sleeps; returns it once it holds the lock."""
    code = ("import sys, time; from hpd_kernels.training.locks import lock_directory; "
            f"lock = lock_directory(sys.argv[1], command={command!r}); print('locked', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    ready, _, _ = select.select([process.stdout], [], [], 60)
    assert ready and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_one_out_is_refused_naming_the_holder_until_it_is_killed(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock_in_another_process(out, "hpd distill")
    try:
        with pytest.raises(LockedError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()} \(started "):
            lock_directory(str(out))
        argv = ["distill", "--config", _user_data_config(tmp_path), "--out", str(out),
                "--cache-dir", str(tmp_path / "cache")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by pid {holder.pid} on host {socket.gethostname()}" in err and "hpd distill" in err
        assert err.count("\n") == 1, err
        experiment = tmp_path / "experiment.json"
        experiment.write_text(json.dumps({
            "objectives": ["sft"], "seeds": [0], "distill": {"steps": 1, "batch_size": 2},
            "sweep": {"fkl_weight": [], "rkl_weight": [], "on_policy_fraction": []},
            "primary": {"treatment": "seqkd", "control": "sft on gold (oracle)"},
            "base": {"task": {"train_problems": 20, "eval_problems": 4},
                     "teacher": {"decoder": DECODER, "train": {"objective": "sft", "steps": 1, "batch_size": 2}},
                     "student": {"decoder": DECODER}}}))
        assert main(["experiment", "--config", str(experiment), "--out", str(out), "--cache-dir",
                     str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hpd experiment: error: {out} is in use by pid {holder.pid}") and err.count("\n") == 1
        assert os.listdir(out) == [LOCK_NAME]  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_directory(str(out)):  # at once: the kernel released the dead holder's lock
        pass
    assert (out / LOCK_NAME).read_text() == ""  # released: no holder named


def test_a_run_waits_for_a_locked_teacher_then_reuses_it(tmp_path):
    """Two runs sharing a cache: while one trains the teacher (holds its folder's lock), the other
    waits, and then reuses the teacher instead of training it again."""
    config = _user_data_config(tmp_path)
    cache = tmp_path / "cache"
    assert main(["distill", "--config", config, "--out", str(tmp_path / "first"), "--cache-dir", str(cache)]) == 0
    [folder] = [cache / name for name in os.listdir(cache) if name.startswith("teacher-")]
    trained = {name: (folder / name).read_bytes() for name in ("model.safetensors", "info.json")}
    for name in trained:  # as if the first run were still training it
        (folder / name).unlink()
    lock = lock_directory(str(folder), command="teacher training")
    second = subprocess.Popen([sys.executable, "-m", "hpd_kernels.cli", "distill", "--config", config, "--out",
                               str(tmp_path / "second"), "--cache-dir", str(cache)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        for line in second.stdout:
            lines.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while not any("waiting for it" in line for line in lines) and time.time() < deadline and second.poll() is None:
            time.sleep(0.05)
        assert any(f"is in use by pid {os.getpid()}" in line and "waiting for it" in line for line in lines), lines
        assert second.poll() is None  # waiting, not refused
        for name, content in trained.items():  # the "first run" finishes its teacher
            (folder / name).write_bytes(content)
    finally:
        lock.release()
    assert second.wait(timeout=120) == 0, "".join(lines)
    reader.join(timeout=10)
    text = "".join(lines)
    assert "teacher: reusing" in text and "training from scratch" not in text, text
