"""The pins are the same everywhere a newcomer might install from; the threading the package sets on import."""

import os
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


def test_jax_keeps_scipy_openblas_to_one_thread_and_numpy_untouched():
    """natgrad_impls.jax limits the OpenBLAS that jaxlib's LAPACK kernels use (SciPy's) to one
    thread, so that it does not fight XLA's pool; NumPy's OpenBLAS keeps its threads."""
    import subprocess
    import sys

    code = (
        "import numpy, natgrad_impls.jax\n"
        "from threadpoolctl import threadpool_info\n"
        "for i in threadpool_info():\n"
        "    if i['internal_api'] == 'openblas': print(i['filepath'], i['num_threads'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2"}).stdout.split("\n")
    threads = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out if line}
    scipy_libs = [path for path in threads if Path(path).parent.name == "scipy.libs"]
    numpy_libs = [path for path in threads if Path(path).parent.name == "numpy.libs"]
    assert scipy_libs and all(threads[path] == 1 for path in scipy_libs)
    assert numpy_libs and all(threads[path] == 2 for path in numpy_libs)


def test_float32_means_float32_in_both_frameworks():
    """Importing the package keeps float32 out of TF32 on GPUs in both frameworks: jax's matrix
    products and convolutions at "highest" precision, torch's cuDNN convolutions off TF32 (its
    matrix products are full float32 by default), in a fresh interpreter, as every entry point
    starts. tests/test_gpu.py checks what that buys on a GPU."""
    import subprocess
    import sys

    code = (
        "import torch, jax, natgrad_impls.torch, natgrad_impls.jax\n"
        "print(torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,"
        " jax.config.jax_default_matmul_precision)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "highest"]


def test_makefile_installs_the_pinned_torch_and_jax():
    """The Makefile names torch (first, so that nothing pulls another build) and, for GPU=cuda12,
    jax with its CUDA extra: at the versions pyproject pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    assert re.findall(r"pip install --quiet torch==(\S+)", makefile) == [pinned["torch"]]
    assert re.findall(r'"jax\[\$\(GPU\)\]==([^"]+)"', makefile) == [pinned["jax"]]


def test_asv_builds_each_commit_as_make_setup_does():
    """`asv continuous` builds a commit's environment on pyproject's Python with torch at its pin first
    (the CPU build), then the project constrained by requirements.lock, with the test extra (kfac-jax:
    without it PeerStep's and OverPeer's K-FAC rows are skipped, not timed)."""
    import json

    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "benchmarks" / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    assert conf["pythons"] and all(p in SpecifierSet(project["requires-python"]) for p in conf["pythons"])
    torch_first, package = conf["install_command"]
    assert re.findall(r"install torch==(\S+)", torch_first) == [_pins(project["dependencies"])["torch"]]
    assert re.search(r"install -c \{build_dir\}/requirements\.lock \{wheel_file\}\[test\]", package), package


def test_ci_runs_every_test_with_the_test_extra():
    """.ci/run is `make test`, which installs the project with the lock and its test extra (the
    kfac-jax and curvlinops references: without them their tests skip) and deselects nothing (the
    slow asv run is what fails CI on a broken benchmark)."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'pip install --quiet -c requirements\.lock -e "\.\[test\]"', makefile)
    recipe = re.search(r"^test:.*\n\t(.*)", makefile, flags=re.M).group(1)
    assert not {"-m", "-k", "--deselect", "--ignore"} & set(recipe.split("-m pytest", 1)[1].split()), recipe
