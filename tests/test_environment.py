"""The pins are the same everywhere a newcomer might install from."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return dict(re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line).groups() for line in lines if "==" in line)


def test_environment_yml_mirrors_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == pinned
    assert all("==" in d for d in project["dependencies"]), "every runtime dependency is pinned exactly"


def test_lock_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    lower = {k.lower(): v for k, v in lock.items()}
    assert {k: lower.get(k.lower()) for k in pinned} == pinned
