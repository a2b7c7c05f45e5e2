"""`Context`: the data, the teacher and its samples, built once per process and shared by the runs
of one experiment there."""

from __future__ import annotations

from ..pipeline import choose_device
from ..rundir import prepare_teacher
from ..workload import Workload, build_model
from .grid import arms, tuned
from .teacher_data import teacher_data


class Context:
    """What every run of one experiment shares in one process: data, teacher and its samples."""

    def __init__(self, experiment, cache_dir, log=None):
        base = experiment["base"]
        self.experiment, self.cache_dir = experiment, cache_dir
        self.device = choose_device(experiment.get("device", "auto"))
        validation = experiment["tuning"]["validation_problems"] if tuned(experiment) else 0
        self.workload = Workload(base, cache_dir, log, validation=validation)
        self.teacher = build_model(base["teacher"], self.workload.tokenizer, "teacher", self.device,
                                   cache_dir=cache_dir, log=log)
        self.teacher_samples, self.teacher_data_info = {}, {}   # by the temperature they were drawn at
        self.samples = experiment["eval"]["samples"]
        self.common = self.workload.train_options(log or (lambda *_: None))

    def prepare(self, log):
        """The teacher (trained and cached if the config says so) and its samples."""
        self.teacher, _ = prepare_teacher(self.teacher, self.experiment["base"], self.workload, self.cache_dir, log)
        settings = self.experiment["teacher_data"]
        for temperature in sorted({self.teacher_temperature(arm) for arm in arms(self.experiment)
                                   if arm.data == "teacher"}):
            self.teacher_samples[temperature], self.teacher_data_info[temperature] = teacher_data(
                self.teacher, self.workload, self.cache_dir, seed=settings["seed"],
                temperature=temperature, max_new_tokens=self.experiment["eval"]["max_new_tokens"], log=log)

    def teacher_temperature(self, arm_or_run):
        """The temperature of the teacher's samples that an arm (or run) distils on."""
        chosen = arm_or_run.teacher_temperature
        return self.experiment["teacher_data"]["temperature"] if chosen is None else chosen

    def examples(self, run):
        return self.teacher_samples[self.teacher_temperature(run)] if run.data == "teacher" else self.workload.examples
