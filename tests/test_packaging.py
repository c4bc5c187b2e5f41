"""Packaging (issue 14): `pip install .` / `pipx install .` gives one module, load_balancer.py, and one
command, `load-balancer`, and nothing else: not bench/, tests/ or examples/.

The wheel is built once per module, offline, with the test venv's pip and setuptools
(`pip wheel --no-deps --no-build-isolation --no-index`, pinned in requirements-dev.txt), from a copy
of the checkout (less .git, virtualenvs and caches) in a temporary folder, so that setuptools'
build/ and *.egg-info never land in the checkout while bench/, tests/ and examples/ are there to
be wrongly picked up. It is then installed into a fresh virtualenv made in tmp_path, and the installed
command, the installed module and the checkout's file must print the same --version line.

Every subprocess has a timeout; pip reads no configuration file and no index.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT

import load_balancer as lb

#: Left out of the copy of the checkout that the wheel is built from: git, virtualenvs, caches and
#: earlier build output. Everything else (bench/, tests/, examples/, ...) is copied, so that a
#: setuptools that auto-discovered packages would put them in the wheel and fail the test.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "venv", ".tox", ".nox", "__pycache__", "*.pyc",
                                    ".pytest_cache", ".benchmarks", "build", "dist", "*.egg-info")
#: What setuptools may write into the wheel's .dist-info folder, and nothing else.
DIST_INFO_FILES = {"METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt",
                   "LICENSE", "licenses/LICENSE"}
#: PEP 639 `license = "MIT"` + license-files, which pyproject.toml uses, needs this.
MIN_SETUPTOOLS = (77,)
BUILD_TIMEOUT = 120.0
RUN_TIMEOUT = 30.0


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)


def clean_env() -> dict[str, str]:
    """The environment without anything that would point pip or Python elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def run(args: list, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def leftovers_before() -> set[str]:
    return build_leftovers()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, leftovers_before) -> Path:
    try:
        setuptools_version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        setuptools_version = "0"
    assert version_tuple(setuptools_version) >= MIN_SETUPTOOLS, (
        f"setuptools {setuptools_version} in {sys.prefix}: the build needs setuptools>=77; "
        f"run `make test`, or `{sys.executable} -m pip install -r requirements-dev.txt`")
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED, symlinks=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "-w", out, src], cwd=base, timeout=BUILD_TIMEOUT)
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def dist_info() -> str:
    return f"load_balancer-{lb.__version__}.dist-info/"


def build_leftovers() -> set[str]:
    return {p.name for p in (ROOT / "build", ROOT / "dist", *ROOT.glob("*.egg-info")) if p.exists()}


def test_building_leaves_nothing_in_the_checkout(wheel, leftovers_before):
    # Compared with before the build: a developer's own `pip install .` may have left some (ignored
    # by git); this test's build must add none.
    assert build_leftovers() <= leftovers_before, sorted(build_leftovers() - leftovers_before)


def test_wheel_name_is_the_module_version_pure_python(wheel):
    assert wheel.name == f"load_balancer-{lb.__version__}-py3-none-any.whl"


def test_wheel_holds_only_the_module_and_its_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    info = dist_info()
    outside = sorted(n for n in names if not n.startswith(info))
    assert outside == ["load_balancer.py"], f"files outside {info}: {outside}"
    inside = {n[len(info):] for n in names if n.startswith(info)}
    assert inside <= DIST_INFO_FILES, f"unexpected in {info}: {sorted(inside - DIST_INFO_FILES)}"
    assert {"METADATA", "WHEEL", "RECORD", "entry_points.txt"} <= inside, sorted(inside)
    assert inside & {"LICENSE", "licenses/LICENSE"}, f"no LICENSE in {info}: {sorted(inside)}"
    for top in ("bench", "tests", "examples", "build"):
        assert not any(n.startswith(top + "/") or f"/{top}/" in n for n in names), (top, sorted(names))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("load_balancer.py") == (ROOT / "load_balancer.py").read_bytes()


def test_wheel_metadata(wheel):
    info = dist_info()
    with zipfile.ZipFile(wheel) as zf:
        meta = email.parser.Parser().parsestr(zf.read(info + "METADATA").decode("utf-8"))
        wheel_meta = email.parser.Parser().parsestr(zf.read(info + "WHEEL").decode("utf-8"))
        entry_points = zf.read(info + "entry_points.txt").decode("utf-8")
        license_name = next(n for n in zf.namelist()
                            if n in (info + "LICENSE", info + "licenses/LICENSE"))
        license_text = zf.read(license_name)
    assert meta["Name"] == "load-balancer"
    assert meta["Version"] == lb.__version__
    assert meta["Requires-Python"] == ">=3.9"
    assert meta.get_all("Requires-Dist") is None, "the balancer needs only the standard library"
    assert "MIT" in (meta["License-Expression"] or meta["License"] or ""), meta.items()
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert meta["Description-Content-Type"] == "text/markdown"
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert "Topic :: Internet :: Proxy Servers" in classifiers
    assert wheel_meta["Root-Is-Purelib"] == "true"
    assert wheel_meta.get_all("Tag") == ["py3-none-any"]

    assert "load-balancer = load_balancer:main" in entry_points.splitlines()
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read_string(entry_points)
    assert parser.sections() == ["console_scripts"]
    assert dict(parser["console_scripts"]) == {"load-balancer": "load_balancer:main"}


def snapshot(venv: Path) -> set[str]:
    """Every file and folder under the venv's bin/ and site-packages/, relative to the venv."""
    tops = [venv / "bin", *venv.glob("lib/python3*/site-packages")]
    return {str(p.relative_to(venv)) for top in tops for p in top.iterdir()}


def make_venv_with(wheel: Path, venv: Path) -> set[str]:
    """A fresh virtualenv with the wheel installed by pip, offline; returns what the install added
    to bin/ and site-packages/. pip >= 22.3 installs into another interpreter's environment with
    --python, which spares a pip inside the new venv (the slow part of `python -m venv`); an older
    pip gets a venv with its own pip."""
    python = venv / "bin" / "python"
    install = ["install", "--no-deps", "--no-index", "--quiet", wheel]
    if version_tuple(metadata.version("pip")) >= (22, 3):
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
        before = snapshot(venv)
        run([sys.executable, "-m", "pip", "--python", python, *install], cwd=venv.parent,
            timeout=BUILD_TIMEOUT)
    else:
        run([sys.executable, "-m", "venv", venv], cwd=venv.parent, timeout=BUILD_TIMEOUT)
        before = snapshot(venv)
        run([python, "-m", "pip", *install], cwd=venv.parent, timeout=BUILD_TIMEOUT)
    return snapshot(venv) - before


def test_installed_command_module_and_file_print_one_version(wheel, tmp_path):
    venv = tmp_path / "venv"
    added = make_venv_with(wheel, venv)
    python, command = venv / "bin" / "python", venv / "bin" / "load-balancer"

    # Exactly the command, the module and its metadata (bytecode caches aside): no bench/, tests/,
    # examples/ packages, no other scripts.
    site = next(venv.glob("lib/python3*/site-packages")).relative_to(venv)
    expected = {"bin/load-balancer", f"{site}/load_balancer.py",
                f"{site}/load_balancer-{lb.__version__}.dist-info"}
    assert added - {f"{site}/__pycache__"} == expected, sorted(added)
    assert os.access(command, os.X_OK)

    elsewhere = tmp_path  # not the checkout: `python -m` would import ./load_balancer.py from there
    where = run([python, "-c", "import load_balancer; print(load_balancer.__file__)"], cwd=elsewhere)
    assert Path(where.stdout.strip()).resolve() == (venv / site / "load_balancer.py").resolve()

    lines = {
        "load-balancer": run([command, "--version"], cwd=elsewhere).stdout,
        "python -m load_balancer": run([python, "-m", "load_balancer", "--version"],
                                       cwd=elsewhere).stdout,
        "load_balancer.py": run([sys.executable, ROOT / "load_balancer.py", "--version"],
                                cwd=ROOT).stdout,
    }
    assert len(set(lines.values())) == 1, lines
    (line,) = set(lines.values())
    assert line.endswith(f" {lb.__version__}\n") and line.count("\n") == 1, lines
