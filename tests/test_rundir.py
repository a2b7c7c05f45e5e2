"""An output directory is claimed for one config: the same config continues it, another is refused
naming what differs, and the package's own assets count by name, not by where the package lies."""

import json
import os

import pytest

from hpd_kernels.training.config import ASSETS, ConfigError
from hpd_kernels.training.rundir import claim_output_dir

TEACHER = "addition_any_teacher.safetensors"


def _config(checkpoint):
    return {"base": {"teacher": {"decoder": {"layers": 2}, "checkpoint": checkpoint}, "lr": 3e-4}, "seeds": [0, 1]}


def test_the_same_config_from_a_moved_package_continues_the_run(tmp_path):
    out = str(tmp_path / "run")
    assert claim_output_dir(out, _config(os.path.join(ASSETS, TEACHER))) is False  # created
    # The run directory of another checkout (or environment) of the package: its asset path differs.
    moved = os.path.join(str(tmp_path), "elsewhere", "hpd_kernels", "training", "assets", TEACHER)
    assert claim_output_dir(out, _config(moved)) is True   # the same run, continued
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["base"]["teacher"]["checkpoint"] == os.path.join(ASSETS, TEACHER)  # untouched


@pytest.mark.parametrize("change, named", [
    (lambda config: config["base"]["teacher"].update(checkpoint="/data/my_teacher.safetensors"),
     "base.teacher.checkpoint"),
    # A file that is not one of the package's assets, even under a folder of that name.
    (lambda config: config["base"]["teacher"].update(
        checkpoint=os.path.join("/x", "hpd_kernels", "training", "assets", "other.safetensors")),
     "base.teacher.checkpoint"),
    (lambda config: config["base"]["teacher"]["decoder"].update(layers=3), "base.teacher.decoder.layers"),
    (lambda config: config.update(seeds=[0, 1, 2]), "seeds"),
    (lambda config: config["base"].pop("lr"), "base.lr"),
])
def test_another_config_is_refused_naming_what_differs(tmp_path, change, named):
    out = str(tmp_path / "run")
    claim_output_dir(out, _config(os.path.join(ASSETS, TEACHER)))
    before = sorted(os.listdir(out))
    other = _config(os.path.join(ASSETS, TEACHER))
    change(other)
    with pytest.raises(ConfigError, match=rf"another config \(differs in \['{named}'\]\)"):
        claim_output_dir(out, other)
    assert sorted(os.listdir(out)) == before
