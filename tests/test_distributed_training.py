"""The trainer under torch.distributed (gloo, 2 CPU processes): DDP equals one process on the same
global batch, with uneven sequence lengths and gradient accumulation (the global-token mean)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.training.checkpoint import load_model, save_model
from hpd_kernels.training.trainer import TrainConfig, train

VOCAB, EOS, WORLD = 13, 2, 2


def _finish():
    """Both ranks leave together: a rank that tears gloo down while its peer still talks to it can
    abort the peer's process."""
    dist.barrier()
    dist.destroy_process_group()


def _examples():
    generator = torch.Generator().manual_seed(0)
    examples = []
    for index in range(40):  # responses of 1 to 9 tokens: a per-rank mean would weight them wrongly
        prompt = torch.randint(3, VOCAB, (2 + index % 3,), generator=generator).tolist()
        response = torch.randint(3, VOCAB, (index % 9,), generator=generator).tolist() + [EOS]
        examples.append((prompt, response))
    return examples


def _models():
    torch.manual_seed(1)
    student = DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=2)).double()
    torch.manual_seed(5)
    teacher = DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2)).double()
    return student, teacher


def _config(objective, batch_size):
    return TrainConfig(objective=objective, steps=3, batch_size=batch_size, grad_accum=2, lr=1e-2, warmup_steps=1,
                       backend="torch", max_grad_norm=0.5)


def _ddp_worker(rank, init_file, objective, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    student, teacher = _models()
    history = train(_config(objective, 4), student, teacher, _examples(), eos_id=EOS, progress=False, log=None)
    if rank == 0:
        save_model(student, out + ".safetensors")
        with open(out + ".json", "w") as handle:
            json.dump(history, handle)
    _finish()


@pytest.mark.parametrize("objective", ["sft", "jsd"])
def test_ddp_steps_equal_single_process_steps_on_the_same_global_batch(tmp_path, objective):
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), objective, out), nprocs=WORLD, join=True)
    single, teacher = _models()
    expected = train(_config(objective, 4 * WORLD), single, teacher, _examples(), eos_id=EOS, progress=False, log=None)
    distributed, _ = _models()
    load_model(distributed, out + ".safetensors")
    for (name, a), (_, b) in zip(single.state_dict().items(), distributed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    history = json.load(open(out + ".json"))
    for mine, theirs in zip(history, expected):
        for key in ("loss", "grad_norm", "tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key


def _fsdp_worker(rank, init_file, folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    config = TrainConfig(objective="hpd", steps=4, batch_size=3, lr=1e-2, warmup_steps=1, backend="torch",
                         strategy="fsdp", save_every=2, seed=4)
    runs = {}
    for name, stop_after in (("whole", None), ("cut", 3)):
        student, teacher = _models()
        runs[name] = train(config, student, teacher, _examples(), eos_id=EOS, run_dir=f"{folder}/{name}",
                           progress=False, log=None, stop_after=stop_after)
    student, teacher = _models()  # a new process resuming the interrupted run from its step-2 checkpoint
    resumed = train(config, student, teacher, _examples(), eos_id=EOS, run_dir=f"{folder}/cut", progress=False,
                    log=None)
    if rank == 0:
        with open(f"{folder}/histories.json", "w") as handle:
            json.dump({"whole": runs["whole"], "resumed": resumed}, handle)
    _finish()


def test_an_fsdp2_run_checkpoints_sharded_safetensors_and_resumes_to_the_same_numbers(tmp_path):
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    histories = json.load(open(tmp_path / "histories.json"))
    timing = ("tokens_per_s", "step_time_s", "peak_memory_mb")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert len(histories["whole"]) == 4
    assert strip(histories["resumed"]) == strip(histories["whole"])
    checkpoint = next((tmp_path / "cut").glob("checkpoint-*"))
    files = {path.suffix for path in checkpoint.iterdir()}
    assert ".safetensors" in files and not files & {".pt", ".bin", ".distcp", ".pkl"}, files


def test_hpd_distill_runs_under_torchrun_with_two_processes(tmp_path):
    import socket
    import subprocess
    import sys

    from test_cli import TINY

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "hpd_kernels", "distill", "--config", str(config), "--out", str(tmp_path / "run"),
         "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| student after hpd |") == 1  # rank 0 alone reports
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2
