"""The workflow's scripts and rules, fast: each script of workflow/scripts/ run as Snakemake's
`script:` directive runs it (a `snakemake` object in its globals), on small hand-made tables, and
the tune/train rules' parameters read from the DAG Snakemake builds for config/smoke.yaml.

tests/test_pipeline.py runs the whole pipeline end to end but never looks at which runs a job
picked or how tables were joined; these tests do, in seconds. Scripts and rules are this
checkout's (paths from this file), never an installed copy.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from natgrad_impls.figures import tables
from natgrad_impls.runner import HYPERPARAMETER_ORDER

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"


class Files(list):
    """Snakemake's Namedlist as the scripts use it: by position (input[0]) and by name (output.runs)."""

    def __init__(self, *items, **named):
        flat = [*items]
        for value in named.values():
            flat.extend(value if isinstance(value, list) else [value])
        super().__init__(str(p) for p in flat)
        for name, value in named.items():
            setattr(self, name, [str(p) for p in value] if isinstance(value, list) else str(value))


def run_script(name, tmp_path, *, rule, input=None, output=None, params=None, wildcards=None, threads=1):
    """Run workflow/scripts/`name` with a stand-in `snakemake`; on an error, fail with the job's log
    (results.job_log sends the script's output and traceback there). The environment is restored:
    train.py sets thread variables for its own process."""
    log = tmp_path / "logs" / f"{rule}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job = SimpleNamespace(input=input or Files(), output=output or Files(), params=params or SimpleNamespace(),
                          log=Files(log), rule=rule, wildcards=wildcards or SimpleNamespace(), config={},
                          threads=threads)
    environment = dict(os.environ)
    try:
        runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": job})
    except BaseException as error:  # SystemExit too: a script that gives up
        raise AssertionError(f"{name} ({rule}) failed: {error!r}\n{log.read_text()[-3000:]}") from error
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return log.read_text()


# -- cos_along_best_ef.py ---------------------------------------------------------------------------

def grid_rows(optimizer, lr, damping, best, repeats=(0,)):
    return [{"task": "wine", "optimizer": optimizer, "framework": "numpy", "device": "cpu", "dtype": "float64",
             "lr": lr, "damping": damping, "best": best, "repeat": r, "step": 0, "loss": 1.0} for r in repeats]


def test_cos_is_measured_along_the_best_ef_run_with_its_lr_and_damping(tmp_path):
    """DESIGN 4: cos(NGD, EF) along the best *ef* run with that run's damping. Here ngd's best run
    (listed first) and ef's differ in both lr and damping, so a rerun of the wrong one shows."""
    grid = pd.DataFrame(grid_rows("ngd", 1.0, 1e-4, True) + grid_rows("ngd", 0.1, 1e-2, False)
                        + grid_rows("ef", 1.0, 1.0, False) + grid_rows("ef", 0.1, 1e-2, True, repeats=(0, 1)))
    grid.to_parquet(tmp_path / "numpy-cpu.parquet", index=False)
    out = tmp_path / "cos.parquet"
    run_script("cos_along_best_ef.py", tmp_path, rule="cos_along_best_ef", input=Files(tmp_path / "numpy-cpu.parquet"),
               output=Files(out), params=SimpleNamespace(steps=3), wildcards=SimpleNamespace(task="wine"))
    frame = pd.read_parquet(out)
    assert set(frame["optimizer"]) == {"ef"} and set(frame["task"]) == {"wine"}
    assert set(frame["lr"]) == {0.1}, "not the best ef run's lr"
    assert set(frame["damping"]) == {1e-2}, "not the best ef run's damping"
    assert frame["step"].max() == 3 and frame["cos_ef_ngd"].notna().all()


# -- train.py: tune, then train on its best setting -----------------------------------------------

NETWORK = {"task": "digits-mlp", "framework": "torch", "device": "cpu"}
PROTOCOL = {"dtype": "float32", "steps": 3, "eval_every": 1}
TUNED = {  # optimizer: its tuning grid as common.smk's tuning_runs writes it (fixed hyperparameters first)
    "sgd": [{"momentum": 0.9, "lr": lr} for lr in (0.1, 0.01)],
    "ngd": [{"fisher": "mc", "lr": 0.1, "damping": d} for d in (1.0, 0.1)],
    "kfac": [{"kfac_update_period": 10, "lr": lr, "damping": 0.1} for lr in (0.1, 0.01)],
}


@pytest.mark.parametrize("optimizer", TUNED)
def test_train_reruns_every_tuned_hyperparameter_of_the_best_setting(tmp_path, optimizer):
    """tune writes its best setting as JSON and train reruns it (train.smk: input.best): every
    hyperparameter of the tuned runs must reach the reruns, not only lr and damping (sgd's
    momentum 0.9 lost would rerun plain sgd; kfac's update period, ngd's Monte-Carlo Fisher)."""
    settings = TUNED[optimizer]
    wildcards = SimpleNamespace(optimizer=optimizer, **NETWORK)
    tune, best = tmp_path / "tune.parquet", tmp_path / "tune.best.json"
    run_script("train.py", tmp_path, rule="tune", output=Files(runs=tune, best=best), wildcards=wildcards,
               params=SimpleNamespace(runs=settings, seeds=[0], protocol=PROTOCOL, cos_ef_ngd=False,
                                      checkpoints=str(tmp_path / ".tune.runs")))
    chosen = json.loads(best.read_text())
    for name, value in settings[0].items():
        if name not in ("lr", "damping"):
            assert chosen.get(name) == value, f"best setting {chosen} lost {name}={value!r}"
    # the JSON is the tuned table's best setting, every hyperparameter column of it
    row = tables.best_hyperparameters(pd.read_parquet(tune)).iloc[0]
    expected = {n: row[n] for n in HYPERPARAMETER_ORDER if n in row and not pd.isna(row[n])}
    assert chosen.keys() == expected.keys(), f"best setting {chosen}, the tuned table's {expected}"
    for name, value in expected.items():
        assert chosen[name] == (pytest.approx(value) if isinstance(value, float) else value), name

    train = tmp_path / "train.parquet"
    run_script("train.py", tmp_path, rule="train", input=Files(best=best), output=Files(runs=train),
               wildcards=wildcards, params=SimpleNamespace(seeds=[1, 2], protocol=PROTOCOL, cos_ef_ngd=False,
                                                           checkpoints=str(tmp_path / ".train.runs")))
    reruns = pd.read_parquet(train)
    assert sorted(reruns["seed"].unique()) == [1, 2]
    for name, value in chosen.items():
        assert name in reruns.columns and set(reruns[name]) == {value}, f"the reruns' {name} is not {value!r}"
    assert not (tmp_path / ".train.runs").exists(), "the job's checkpoints outlived its table"


# -- table.py: best-networks with two frameworks -----------------------------------------------------

def network_runs(framework, finals, seeds):
    """Runner-like frames of sgd on digits-mlp: per lr, a train_loss falling to finals[lr]."""
    rows = []
    for lr, final in finals.items():
        for seed in seeds:
            for step, loss in enumerate((2.0, 1.0, final)):
                rows.append({"task": "digits-mlp", "optimizer": "sgd", "framework": framework, "device": "cpu",
                             "dtype": "float32", "seed": seed, "lr": lr, "damping": math.nan, "momentum": 0.9,
                             "step": step * 10, "loss": loss, "train_loss": loss, "time_s": 0.1 * step,
                             "diverged": False, "batch_size": 128})
    return pd.DataFrame(rows)


def test_best_networks_table_has_one_row_per_group_with_its_own_grid_edge(tmp_path):
    """table.py joins each rerun's best setting to where it lies in *its own* tuning grid: on the full
    group (task, optimizer, framework, device, dtype). With torch's best on the grid's edge and
    jax's inside, a join on fewer columns mixes the frameworks' rows."""
    tuning = {"torch": {1.0: 0.5, 0.1: 0.8, 0.01: 0.9}, "jax": {1.0: 0.9, 0.1: 0.3, 0.01: 0.8}}
    best_lr = {"torch": 1.0, "jax": 0.1}
    paths = {"runs": [], "tuning": []}
    for framework in ("torch", "jax"):
        best = best_lr[framework]
        for stage, frame in (("tuning", network_runs(framework, tuning[framework], [0])),
                             ("runs", network_runs(framework, {best: tuning[framework][best]}, [1, 2]))):
            path = tmp_path / stage / f"{framework}-cpu.parquet"
            path.parent.mkdir(exist_ok=True)
            frame.to_parquet(path, index=False)
            paths[stage].append(path)
    out = tmp_path / "best-networks.csv"
    run_script("table.py", tmp_path, rule="table_best_networks", input=Files(**paths), output=Files(csv=out),
               params=SimpleNamespace(table="best-networks"))
    table = pd.read_csv(out)
    assert set(tables.GROUP) <= set(table.columns), table.columns.tolist()
    assert len(table) == 2 and not table.duplicated(tables.GROUP).any(), table.to_string()
    rows = table.set_index("framework")
    assert rows.loc["torch", "lr"] == 1.0 and rows.loc["jax", "lr"] == 0.1
    assert rows.loc["torch", "edge"] == "lr largest"
    assert pd.isna(rows.loc["jax", "edge"]) or rows.loc["jax", "edge"] == ""
    assert (rows["seeds"] == 2).all()


# -- the rules: which seeds reach the tune and train jobs ------------------------------------------

DAG_PARAMS = r"""
import contextlib, io, json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, ResourceSettings

root = Path(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1),
                                config_settings=ConfigSettings(configfiles=[root / "config/smoke.yaml"]),
                                snakefile=root / "Snakefile", workdir=root)
        workflow.dag(DAGSettings())
        # what a dry run builds, without running a job (the API's printdag fails in Snakemake 9.27)
        dag_workflow = workflow._workflow
        dag_workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        dag_workflow._build_dag()
        jobs = [{"rule": job.rule.name, "output": [str(f) for f in job.output],
                 "wildcards": dict(job.wildcards_dict), "seeds": list(getattr(job.params, "seeds", []))}
                for job in dag_workflow.dag.jobs]
print(json.dumps(jobs))
"""


def test_tune_jobs_get_the_tuning_seeds_and_train_jobs_the_rerun_seeds(tmp_path):
    """DeepOBS protocol (train.smk): tune on networks.tuning_seeds, rerun the best setting on the
    fresh networks.seeds. A dry run prints no script parameters, so the DAG of the smoke
    configuration is built with Snakemake's API (no profile, as `--workflow-profile none`) in a
    bare copy of the workflow (no results: every job is in it) and each job's params.seeds read."""
    root = tmp_path / "natgrad-bench"
    root.mkdir()
    for name in ("Snakefile", "environment.yml"):
        shutil.copy(REPO / name, root / name)
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, root / name)
    done = subprocess.run([sys.executable, "-c", DAG_PARAMS, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = json.loads(done.stdout.strip().splitlines()[-1])
    networks = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())["networks"]
    assert not set(networks["tuning_seeds"]) & set(networks["seeds"])  # else the test could not tell them apart
    tune = [job for job in jobs if job["rule"] == "tune"]
    train = [job for job in jobs if job["rule"] == "train"]
    assert len(tune) == len(train) == 5, [job["rule"] for job in jobs]  # smoke: five optimizers, one task
    for job in tune:
        assert job["seeds"] == networks["tuning_seeds"], f"{job['output'][0]}: seeds {job['seeds']}"
    for job in train:
        assert job["seeds"] == networks["seeds"], f"{job['output'][0]}: seeds {job['seeds']}"
    assert {j["wildcards"]["optimizer"] for j in tune} == {j["wildcards"]["optimizer"] for j in train}
