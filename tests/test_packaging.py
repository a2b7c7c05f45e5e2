"""The package as a non-editable install ships it: the executable spec, `reference/` at the top of
the checkout, inside the package as `hpd_kernels.reference` and under no top-level name of its own;
every module of `hpd_kernels/` and its data files as well (setup.py makes the package list, the
`package-dir` mapping in pyproject.toml places `reference/`). The wheel is built offline, without
build isolation (setuptools from this environment), from a copy of the sources: a few seconds.
In a checkout, `hpd_kernels.reference` is imported from `reference/` too."""

import importlib
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _files(folder: pathlib.Path) -> dict:
    """The files under `folder` a build copies (no caches), by path relative to it."""
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """{path: bytes} of the wheel that `pip wheel --no-deps --no-build-isolation .` would build."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("hpd_kernels", "reference"):
        shutil.copytree(ROOT / folder, source / folder, ignore=SKIPPED)
    out = tmp_path_factory.mktemp("wheel")
    build = ("import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", build, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_wheel_ships_the_reference_under_the_package_name_only(wheel):
    top_level = {name.split("/")[0] for name in wheel}
    extra = {name for name in top_level if name != "hpd_kernels" and not name.endswith(".dist-info")}
    assert not extra, f"the wheel installs top-level names other than hpd_kernels: {sorted(extra)}"
    (listed,) = [name for name in wheel if name.endswith(".dist-info/top_level.txt")] or [None]
    if listed is not None:
        assert wheel[listed].decode().split() == ["hpd_kernels"]
    spec = _files(ROOT / "reference")
    assert "__init__.py" in spec and "objectives.py" in spec
    for relative, path in spec.items():
        name = f"hpd_kernels/reference/{relative}"
        assert wheel.get(name) == path.read_bytes(), f"{name} is not reference/{relative}"
    shipped = {name for name in wheel if name.startswith("hpd_kernels/reference/")}
    assert shipped == {f"hpd_kernels/reference/{relative}" for relative in spec}


def test_wheel_ships_every_module_of_the_package(wheel):
    assert not (ROOT / "hpd_kernels" / "reference").exists(), (
        "hpd_kernels/reference/ is left over: the spec lives in reference/, and in an editable install a "
        "folder of that name (even one holding only __pycache__) shadows it; remove it")
    missing = [relative for relative, path in _files(ROOT / "hpd_kernels").items()
               if (path.suffix == ".py" or relative.startswith("training/assets/"))
               and wheel.get(f"hpd_kernels/{relative}") != path.read_bytes()]
    assert not missing, f"not in the wheel (or not as in the checkout): {missing}"


def test_checkout_imports_the_reference_from_the_top_level_folder():
    import hpd_kernels

    if pathlib.Path(hpd_kernels.__file__).resolve().parent != ROOT / "hpd_kernels":
        pytest.skip("hpd_kernels is not imported from this checkout (a non-editable install)")
    reference = importlib.import_module("hpd_kernels.reference")
    assert pathlib.Path(reference.__file__).resolve() == ROOT / "reference" / "__init__.py"
    assert pathlib.Path(reference.objectives.__file__).resolve() == ROOT / "reference" / "objectives.py"
