"""The workflow's scripts and rules, fast: each script of workflow/scripts/ run as Snakemake's
`script:` directive runs it (a `snakemake` object in its globals), on small hand-made tables, and
the tune/train rules' parameters read from the DAG Snakemake builds for config/smoke.yaml.

tests/test_pipeline.py runs the whole pipeline end to end but never looks at which runs a job
picked or how tables were joined; these tests do, in seconds. Scripts and rules are this
checkout's (paths from this file), never an installed copy.
"""

from __future__ import annotations

import collections
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from natgrad_impls.figures import tables
from natgrad_impls.runner import HYPERPARAMETER_ORDER
from rst_check import rst_problems

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
    assert set(frame["framework"]) == {"numpy"}, "not the numpy grid's own implementation (figure 3's caption)"
    assert set(frame["lr"]) == {0.1}, "not the best ef run's lr"
    assert set(frame["damping"]) == {1e-2}, "not the best ef run's damping"
    assert frame["step"].max() == 3 and frame["cos_ef_ngd"].notna().all()


# -- figure.py and toy.py ----------------------------------------------------------------------------

@pytest.mark.parametrize("caption", sorted(p.name for p in (REPO / "workflow" / "report").glob("*.rst")))
def test_every_static_caption_renders_as_restructuredtext_without_complaint(caption):
    """The report renders each caption with Jinja, then docutils; text that reads as markup (`|x|`,
    an unclosed `*`) shows up there as an error box inside the caption."""
    import jinja2

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    text = jinja2.Template((REPO / "workflow" / "report" / caption).read_text()).render(
        snakemake=SimpleNamespace(config=config))
    assert rst_problems(text) == []


def test_figure_3_is_drawn_from_the_best_runs_with_the_cosine_and_its_caption(tmp_path):
    """figure.py reads the grids' best runs (not the others) and the cosine files (by name, not as
    grids), draws figure 3 and writes a PNG, a PDF and the caption: the static text of
    workflow/report/, then this run's notes (here the best EF run's setting, and no missing cosine)."""
    folder = tmp_path / "grid" / "wine"
    folder.mkdir(parents=True)
    grid = pd.DataFrame(grid_rows("ef", 0.1, 1e-2, True) + grid_rows("ef", 1.0, 1.0, False)).assign(chaotic=False,
                                                                                                    diverged=False)
    grid.to_parquet(folder / "numpy-cpu.parquet", index=False)
    pd.DataFrame({"task": "wine", "optimizer": "ef", "lr": 0.1, "damping": 1e-2, "step": [0, 1],
                  "cos_ef_ngd": [1.0, 0.5]}).to_parquet(folder / "cos.parquet", index=False)
    static = REPO / "workflow" / "report" / "fig3-optimisation.rst"
    out = tmp_path / "figures"
    run_script("figure.py", tmp_path, rule="figure_fig3_optimisation",
               input=Files(folder / "numpy-cpu.parquet", folder / "cos.parquet", caption=static),
               output=Files(png=out / "fig3.png", pdf=out / "fig3.pdf", caption=out / "fig3.rst"),
               params=SimpleNamespace(figure="fig3-optimisation"))
    assert (out / "fig3.png").read_bytes()[:4] == b"\x89PNG" and (out / "fig3.pdf").read_bytes()[:4] == b"%PDF"
    caption = (out / "fig3.rst").read_text()
    assert caption.startswith(static.read_text().strip() + "\n\n**This run:** ")
    notes = caption.split("**This run:** ", 1)[1]
    assert "Best runs on wine: EF lr 0.1, damping 0.01." in notes and "cos(EF, NGD)" not in notes, notes


def test_reference_figures_note_tables_measured_with_other_versions(tmp_path):
    """The reference figures draw every committed table, each with a note where its framework
    versions are not this run's (or it records none): a reader knows which rows may have moved."""
    from natgrad_impls import timing

    row = {"framework": "torch", "device": "cpu", "dtype": "float32", "optimizer": "sgd", "setting": "sgd",
           "width": 128, "batch_size": 128,
           "num_params": 101770, "step_s": 2e-3, "gradient_s": 1e-3, "gradient_equivalents": 2.0}
    tables_ = {"old.csv": {}, "current.csv": {"versions": timing.package_versions(["torch"])},
               "other.csv": {"versions": "torch 2.11.0"}}
    for name, extra in tables_.items():
        pd.DataFrame([{**row, **extra}]).to_csv(tmp_path / name, index=False)
    out = tmp_path / "figures"
    run_script("figure.py", tmp_path, rule="figure",
               input=Files(*(tmp_path / name for name in tables_),
                           caption=REPO / "workflow" / "report" / "reference-cost.rst"),
               output=Files(png=out / "f.png", pdf=out / "f.pdf", caption=out / "f.rst"),
               params=SimpleNamespace(figure="reference-cost"))
    notes = (out / "f.rst").read_text().split("**This run:** ", 1)[1]
    assert "old.csv: records no package versions" in notes
    assert f"other.csv: measured with torch 2.11.0; this run has {timing.package_versions(['torch'])}." in notes
    assert "current.csv" not in notes


@pytest.mark.parametrize("figure, model", [("fig2-misspecification", "logistic"),
                                           ("appendix-misspecification-linear", "linear")])
def test_figure_2_and_its_appendix_draw_their_own_model(tmp_path, figure, model):
    """One toy table holds both models' sets; figure 2 draws the logistic ones and its appendix the
    linear ones. With only the correct logistic set in the table, only the appendix misses it."""
    table = pd.DataFrame({"variant": "logistic-correct", "kind": ["data", "data", "minimum"], "x_0": [1.0, -1.0, None],
                          "x_1": [0.5, 2.0, None], "y": [0.0, 1.0, None], "theta_0": [None, None, 0.3],
                          "theta_1": [None, None, -0.2], "loss": [None, None, 0.5], "curvature": None})
    table.to_parquet(tmp_path / "misspec.parquet", index=False)
    out = tmp_path / "figures"
    run_script("figure.py", tmp_path, rule="figure",
               input=Files(tmp_path / "misspec.parquet", caption=REPO / "workflow" / "report" / f"{figure}.rst"),
               output=Files(png=out / "f.png", pdf=out / "f.pdf", caption=out / "f.rst"),
               params=SimpleNamespace(figure=figure))
    caption = (out / "f.rst").read_text()
    assert ("Correct: not in the table" in caption) == (model == "linear"), caption
    assert "Misspecified (A): not in the table" in caption


def test_the_starting_point_toy_reruns_each_optimizers_best_grid_setting(tmp_path):
    """toy.py's starting_point table reruns wine from each start with each optimizer's best setting
    of the numpy grid it is given (rows best and repeat 0), not with another run of the grid."""
    best = {"sgd": (0.1, math.nan), "ngd": (0.5, 1e-4), "ef": (0.01, 1e-6)}
    rows = []
    for optimizer, (lr, damping) in best.items():
        rows += grid_rows(optimizer, lr, damping, True, repeats=(0, 1)) + grid_rows(optimizer, 1.0, 1e-2, False)
    pd.DataFrame(rows).to_parquet(tmp_path / "numpy-cpu.parquet", index=False)
    out = tmp_path / "starting_point.parquet"
    run_script("toy.py", tmp_path, rule="toy", input=Files(tmp_path / "numpy-cpu.parquet"), output=Files(out),
               wildcards=SimpleNamespace(toy="starting_point"))
    runs = pd.read_parquet(out).query("kind == 'run' and problem == 'wine'")
    for optimizer, (lr, damping) in best.items():
        mine = runs[runs["optimizer"] == optimizer]
        assert set(mine["lr"]) == {lr} and mine["start"].nunique() == 4, optimizer
        assert mine["damping"].isna().all() if math.isnan(damping) else set(mine["damping"]) == {damping}, optimizer


def test_the_misspec_toy_writes_the_misspecification_table(tmp_path):
    """toy.py writes the table its wildcard names: for `misspec`, figure 2's six sets (logistic and
    linear; correct and misspecified A and B), each with data, minimum, contour and curvature rows."""
    out = tmp_path / "misspec.parquet"
    run_script("toy.py", tmp_path, rule="toy", output=Files(out), wildcards=SimpleNamespace(toy="misspec"))
    table = pd.read_parquet(out)
    assert set(table["variant"]) == {f"{model}-{suffix}" for model in ("logistic", "linear")
                                     for suffix in ("correct", "misspecified-a", "misspecified-b")}
    assert set(table["kind"]) == {"data", "minimum", "contour", "curvature"}


# -- train.py: tune, then train on its best setting -----------------------------------------------

NETWORK = {"task": "digits-mlp", "framework": "torch", "device": "cpu"}
PROTOCOL = {"dtype": "float32", "steps": 4, "eval_every": 2}  # not runner.run's defaults (float64, 200)
TUNED = {  # optimizer: its tuning grid as common.smk's tuning_runs writes it (fixed hyperparameters first)
    "sgd": [{"momentum": 0.9, "lr": lr} for lr in (0.01, 0.1)],
    "ngd": [{"fisher": "mc", "lr": 0.1, "damping": d} for d in (1.0, 0.1)],
    "kfac": [{"kfac_update_period": 10, "lr": lr, "damping": 0.1} for lr in (0.01, 0.1)],
}  # each grid's first setting is not its best, so that a job taking the first is caught


def check_protocol(frame, stage):
    """The runs of a tune or train job follow params.protocol, not runner.run's defaults: its dtype
    (a float64 network where the config says float32 is slower and another benchmark), its steps,
    and full-train evaluations every eval_every steps and at the last one."""
    assert set(frame["dtype"]) == {PROTOCOL["dtype"]}, f"{stage}: dtype {set(frame['dtype'])}, protocol {PROTOCOL}"
    steps, every = PROTOCOL["steps"], PROTOCOL["eval_every"]
    assert not frame["diverged"].all(), f"{stage}: every run diverged, nothing to check"
    for _, run in frame.groupby(["seed", *[n for n in HYPERPARAMETER_ORDER if n in frame]], dropna=False):
        last = steps if not run["diverged"].any() else int(run["step"].max())  # a diverged run stops early
        assert run["step"].max() == last, f"{stage}: a run of {run['step'].max()} steps, protocol {PROTOCOL}"
        expected = sorted({k for k in range(last + 1) if k % every == 0 or k == steps})
        evaluated = sorted(run.loc[run["train_loss"].notna(), "step"].astype(int))
        assert evaluated == expected, f"{stage}: evaluated at steps {evaluated}, protocol {PROTOCOL}"


@pytest.mark.parametrize("optimizer", TUNED)
def test_train_reruns_every_tuned_hyperparameter_of_the_best_setting(tmp_path, optimizer):
    """tune writes its best setting as JSON and train reruns it (train.smk: input.best): every
    hyperparameter of the tuned runs must reach the reruns, not only lr and damping (sgd's
    momentum 0.9 lost would rerun plain sgd; kfac's update period, ngd's Monte-Carlo Fisher).
    Both jobs' runs follow the protocol (dtype, steps, eval_every)."""
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
    check_protocol(pd.read_parquet(tune), "tune")
    assert chosen.keys() == expected.keys(), f"best setting {chosen}, the tuned table's {expected}"
    for name, value in expected.items():
        assert chosen[name] == (pytest.approx(value) if isinstance(value, float) else value), name
    assert chosen != settings[0], "the grid's first setting is its best: the choice is not tested"

    train = tmp_path / "train.parquet"
    run_script("train.py", tmp_path, rule="train", input=Files(best=best), output=Files(runs=train),
               wildcards=wildcards, params=SimpleNamespace(seeds=[1, 2], protocol=PROTOCOL, cos_ef_ngd=False,
                                                           checkpoints=str(tmp_path / ".train.runs")))
    reruns = pd.read_parquet(train)
    assert sorted(reruns["seed"].unique()) == [1, 2]
    check_protocol(reruns, "train")
    for name, value in chosen.items():
        assert name in reruns.columns and set(reruns[name]) == {value}, f"the reruns' {name} is not {value!r}"
    assert not (tmp_path / ".train.runs").exists(), "the job's checkpoints outlived its table"


def test_train_steps_with_one_thread_where_the_job_holds_every_core(tmp_path, monkeypatch):
    """A train job holds every core (nothing beside its timed steps) but steps with one thread, as
    the tuning does: float32 round-off, and the losses with it, depend on the thread count."""
    from natgrad_impls import runner

    seen = []

    def run_many(*args, **kwargs):
        seen.append({name: os.environ[name] for name in ("OMP_NUM_THREADS", "PJRT_NPROC")})
        return pd.DataFrame({"task": ["digits-mlp"], "step": [0], "loss": [1.0]})

    monkeypatch.setattr(runner, "run_many", run_many)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"lr": 0.1}))
    run_script("train.py", tmp_path, rule="train", input=Files(best=best),
               output=Files(runs=tmp_path / "train.parquet"), wildcards=SimpleNamespace(task="digits-mlp", optimizer="sgd", framework="torch", device="cpu"),
               params=SimpleNamespace(seeds=[1], protocol=PROTOCOL, cos_ef_ngd=False,
                                      checkpoints=str(tmp_path / ".train.runs")), threads=4)
    assert seen == [{"OMP_NUM_THREADS": "1", "PJRT_NPROC": "1"}]


def test_train_records_the_cosine_where_the_rule_asks(tmp_path):
    """params.cos_ef_ngd (true for the optimizers of networks.cos_ef_ngd) reaches the reruns: the
    networks-cosine figure draws their cos_ef_ngd column, which runs without it lack."""
    best = tmp_path / "tune.best.json"
    best.write_text(json.dumps({"lr": 0.03, "damping": 0.1}))
    out = {}
    for cos in (True, False):
        out[cos] = tmp_path / f"train-{cos}.parquet"
        run_script("train.py", tmp_path, rule="train", input=Files(best=best), output=Files(runs=out[cos]),
                   wildcards=SimpleNamespace(optimizer="ef", **NETWORK),
                   params=SimpleNamespace(seeds=[1], protocol={**PROTOCOL, "steps": 2}, cos_ef_ngd=cos,
                                          checkpoints=str(tmp_path / f".train-{cos}.runs")))
    reruns = pd.read_parquet(out[True])
    assert "cos_ef_ngd" in reruns and reruns["cos_ef_ngd"].between(-1, 1).any(), reruns.columns.tolist()
    plain = pd.read_parquet(out[False])
    assert "cos_ef_ngd" not in plain or plain["cos_ef_ngd"].isna().all()


# -- cost.py: the cost and scaling rules ------------------------------------------------------------

def test_cost_and_scaling_jobs_time_what_the_config_says_and_name_the_machine(tmp_path, monkeypatch):
    """cost.py hands timing its rule's own settings: a cost job timing.settings on its task, a
    scaling job timing.scaling's settings, widths and batch sizes (not the cost job's settings), both
    timing's dtype and repeats; each table names the machine that timed it (device_name) and the
    threads its framework could use (cpu_threads): the rule's, XLA's too (PJRT_NPROC, which it reads
    where Snakemake's OMP_NUM_THREADS does not reach it)."""
    import inspect

    from natgrad_impls import timing

    calls = {}

    def spy(name):
        real = getattr(timing, name)

        def call(*args, **kwargs):
            calls[name] = dict(inspect.signature(real).bind(*args, **kwargs).arguments)
            return pd.DataFrame({"step_s": [1.0]})
        monkeypatch.setattr(timing, name, call)

    spy("cost_table")
    spy("scaling_table")
    monkeypatch.setattr(timing, "device_name", lambda device, framework="torch": f"machine of {framework} {device}")
    monkeypatch.setattr(timing, "cpu_threads", lambda framework: int(os.environ.get("PJRT_NPROC", 0)))
    t = {"dtype": "float64", "repeats": 7, "settings": ["sgd", "kfac"],
         "scaling": {"frameworks": ["jax"], "settings": ["ngd-mc"], "widths": [8, 16], "batch_sizes": [4, 32]}}
    wildcards = SimpleNamespace(task="digits-mlp", framework="jax", device="cpu")
    for rule, params in (("cost", SimpleNamespace(timing=t)),
                         ("scaling", SimpleNamespace(timing=t, scaling=t["scaling"]))):
        run_script("cost.py", tmp_path, rule=rule, output=Files(tmp_path / f"{rule}.csv"), params=params,
                   wildcards=wildcards, threads=3)
        assert set(pd.read_csv(tmp_path / f"{rule}.csv")["machine"]) == {"machine of jax cpu"}, rule
        assert set(pd.read_csv(tmp_path / f"{rule}.csv")["threads"]) == {3}, rule
    assert calls == {"cost_table": dict(task="digits-mlp", framework="jax", device="cpu", dtype="float64",
                                        settings=["sgd", "kfac"], repeats=7),
                     "scaling_table": dict(framework="jax", device="cpu", widths=[8, 16], batch_sizes=[4, 32],
                                           settings=["ngd-mc"], dtype="float64", repeats=7)}


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
    run_script("table.py", tmp_path, rule="table_best_networks", input=Files(**paths),
               output=Files(csv=out, html=out.with_suffix(".html")), params=SimpleNamespace(table="best-networks"))
    table = pd.read_csv(out)
    assert set(tables.GROUP) <= set(table.columns), table.columns.tolist()
    assert len(table) == 2 and not table.duplicated(tables.GROUP).any(), table.to_string()
    rows = table.set_index("framework")
    assert rows.loc["torch", "lr"] == 1.0 and rows.loc["jax", "lr"] == 0.1
    assert rows.loc["torch", "edge"] == "lr largest"
    assert pd.isna(rows.loc["jax", "edge"]) or rows.loc["jax", "edge"] == ""
    assert (rows["seeds"] == 2).all()


def test_the_summary_table_reads_both_best_tables_and_the_cost_tables(tmp_path):
    """table.py's summary: the convex and network best-hyperparameters tables in one, ranked, each
    network row with its step's cost where a cost table has its task; without cost tables (no timing
    settings), no cost column."""
    convex = pd.DataFrame({"task": "wine", "optimizer": ["sgd", "ngd"], "framework": "numpy", "device": "cpu",
                           "dtype": "float64", "final_loss": [0.36, 0.03], "diverged": False, "chaotic": False})
    network = pd.DataFrame({"task": "digits-mlp", "optimizer": ["sgd", "kfac"], "framework": "torch", "device": "cpu",
                            "dtype": "float32", "momentum": [0.9, math.nan], "final_loss": [0.005, 0.0001],
                            "diverged": False})
    cost = pd.DataFrame({"task": "digits-mlp", "optimizer": ["sgd", "sgd", "kfac"],
                         "setting": ["sgd", "sgd-momentum", "kfac"], "framework": "torch", "device": "cpu",
                         "gradient_equivalents": [1.2, 1.6, 4.8]})
    paths = {}
    for name, frame in (("best-convex", convex), ("best-networks", network), ("cost", cost)):
        paths[name] = tmp_path / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    for costs in ([paths["cost"]], []):
        out = tmp_path / "summary.csv"
        run_script("table.py", tmp_path, rule="table_summary", output=Files(csv=out, html=out.with_suffix(".html")),
                   input=Files(best=[paths["best-convex"], paths["best-networks"]], cost=costs),
                   params=SimpleNamespace(table="summary"))
        table = pd.read_csv(out).set_index(["task", "optimizer"])
        page = out.with_suffix(".html").read_text()  # the report's view: the same rows, by their legends
        assert page.startswith("<!DOCTYPE html>") and page.count("<tr>") == len(table) and "K-FAC" in page
        assert table["rank"].to_dict() == {("digits-mlp", "kfac"): 1, ("digits-mlp", "sgd"): 2,
                                           ("wine", "ngd"): 1, ("wine", "sgd"): 2}
        if costs:
            assert table.loc[("digits-mlp", "sgd"), "gradient_equivalents"] == 1.6
            assert table.loc[("digits-mlp", "kfac"), "gradient_equivalents"] == 4.8
            assert pd.isna(table.loc[("wine", "sgd"), "gradient_equivalents"])
        else:
            assert "gradient_equivalents" not in table.columns


# -- data.py: fetch a download task's files and say what was loaded --------------------------------

def test_the_data_job_writes_a_row_per_split_with_its_size(tmp_path, monkeypatch):
    """Stand-in files pinned in an empty cache (no network: the mirror does not exist): yacht has no test
    split (a Kunstner task), fashionmnist-cnn's inputs are 1x28x28 images, 784 numbers each."""
    from test_tasks import place, write_idx  # the download formats' stand-ins, pinned in the cache

    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "no-mirror").as_uri())
    rng = np.random.default_rng(0)
    files = {"yacht": "\n".join(" ".join(f"{v:g}" for v in row) for row in rng.uniform(1, 9, (4, 7))).encode()}
    for part, n in [("train", 3), ("test", 2)]:
        files[f"fashion-mnist/{part}-images"] = write_idx(rng.integers(0, 256, (n, 28, 28)))
        files[f"fashion-mnist/{part}-labels"] = write_idx(rng.integers(0, 10, n))
    place(monkeypatch, files)
    # yacht: 6 columns of inputs and the bias (the seventh is the target)
    expected = {"yacht": [("train", 4, 7)], "fashionmnist-cnn": [("train", 3, 784), ("test", 2, 784)]}
    for task, rows in expected.items():
        out = tmp_path / f"{task}.csv"
        run_script("data.py", tmp_path, rule="data", output=Files(out), wildcards=SimpleNamespace(task=task))
        table = pd.read_csv(out)
        assert list(zip(table["split"], table["examples"], table["inputs"])) == rows, table.to_string()
        assert (table["task"] == task).all()


# -- the rules: what the configuration gives each job ------------------------------------------------

DAG_PARAMS = r"""
import contextlib, io, json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, ResourceSettings


def plain(value):  # a job's parameter as JSON where it is plain data, else its repr
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def report(job):  # where the report shows a job's output: its category (section) and labels
    flagged = [f.flags["report"] for f in job.output if "report" in f.flags]
    return {"category": flagged[0].category, "labels": flagged[0].labels} if flagged else None


def build(root, configfile, cores):
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=cores),
                                config_settings=ConfigSettings(configfiles=[root / configfile]),
                                snakefile=root / "Snakefile", workdir=root)
        workflow.dag(DAGSettings())
        # what a dry run builds, without running a job (the API's printdag fails in Snakemake 9.27)
        dag_workflow = workflow._workflow
        dag_workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        dag_workflow._build_dag()
        return [{"rule": job.rule.name, "output": [str(f) for f in job.output],
                 "input": [str(f) for f in job.input],
                 "named_input": {name: [str(f) for f in ([v] if isinstance(v, str) else v)]
                                 for name, v in job.input.items()},
                 "report": report(job), "wildcards": dict(job.wildcards_dict), "threads": job.threads,
                 "local": job.rule.name in dag_workflow._localrules or job.rule.norun,  # (is_local: all, here)
                 "params": {name: plain(value) for name, value in job.params.items()},
                 "shell": job.shellcmd if job.is_shell else None,
                 "script": job.rule.script and job.rule.basedir.join(job.rule.script).get_path_or_uri(True)}
                for job in dag_workflow.dag.jobs]


root, cores, out = Path(sys.argv[1]), int(sys.argv[2]), {}
with contextlib.redirect_stdout(io.StringIO()):
    for configfile in sys.argv[3:]:  # one process: each workflow after the first takes a fraction of a second
        out[configfile] = build(root, configfile, cores)
print(json.dumps(out))
"""

# smoke: what the tests run; gpu: devices listed (cpu and cuda: no GPU needed to build its DAG), several
# dampings, and several frameworks and devices per folder
DAG_CORES = 4  # the DAGs' --cores: a job that takes every core has 4 threads
DAG_CONFIGS = ("smoke.yaml", "gpu.yaml")  # ids not "gpu": conftest skips the `gpu` keyword without one
# overlays of the tests' own (written into the copy's config/), each leaving out or splitting up what
# the shipped ones have together: which figures, tables and jobs a configuration asks for
OVERLAYS = {
    # no ef, the one optimizer whose runs record the cosine (no cosine anywhere), a Bernoulli and a download
    # task, no wine grid, timing and scaling apart
    "no-ef.yaml": """
optimizers: [sgd, ngd, kfac]
devices: [cpu]
convex: {tasks: [breastcancer, yacht], frameworks: [numpy], hyperparameters: {kfac: {kfac_update_period: 3}}}
toys: [starting_point]
networks: {tasks: [digits-mlp, mnist1d-mlp], frameworks: [jax], cos_ef_ngd: [ef]}
timing: {settings: [], scaling: {frameworks: [jax], settings: [sgd]}}
""",
    # neither figure 3 task, no Bernoulli task; the cosine of ngd; timing on a task the networks do not tune
    "regression.yaml": """
devices: [cpu]
convex: {tasks: [energy, yacht, powerplant]}
toys: [vecfield]
networks: {tasks: [digits-mlp], frameworks: [torch], cos_ef_ngd: [ngd]}
timing: {tasks: [mnist1d-mlp], frameworks: [jax], scaling: {frameworks: [torch], settings: []}}
""",
    # convex grids without numpy: figure 3 and the logit-clip comparison draw numpy grids
    "no-numpy.yaml": "devices: [cpu]\nconvex: {tasks: [wine, breastcancer], frameworks: [torch]}\n",
}


@pytest.fixture(scope="module")
def dags(tmp_path_factory):
    """{configuration: its DAG's jobs (rule, output, input, report category and labels, wildcards,
    params, shell command)}. A dry run prints no script parameters, so each DAG is built with
    Snakemake's API (no profile, as `--workflow-profile none`) in a bare copy of the workflow (no
    results: every job is in it), once for the module."""
    root = tmp_path_factory.mktemp("dag") / "natgrad-bench"
    root.mkdir()
    for name in ("Snakefile", "environment.yml"):
        shutil.copy(REPO / name, root / name)
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, root / name)
    for name, text in OVERLAYS.items():
        (root / "config" / name).write_text(text)
    names = [*DAG_CONFIGS, *OVERLAYS]
    done = subprocess.run([sys.executable, "-c", DAG_PARAMS, str(root), str(DAG_CORES),
                           *[f"config/{n}" for n in names]], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"config/{names}: " + done.stdout[-3000:] + done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: built[f"config/{name}"] for name in names}


def configured(name):
    """config/config.yaml with the overlay config/`name` merged in, as Snakemake merges a --configfile."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(OVERLAYS.get(name) or (REPO / "config" / name).read_text()))
    return config


def jobs_of(dag, *rules):
    found = [job for job in dag if job["rule"] in rules]
    assert found, f"no {' or '.join(rules)} job in the DAG"
    return found


def test_tune_jobs_get_the_tuning_seeds_and_train_jobs_the_rerun_seeds(dags):
    """DeepOBS protocol (train.smk): tune on networks.tuning_seeds, rerun the best setting on the
    fresh networks.seeds (each job's params.seeds in the smoke DAG)."""
    jobs = dags["smoke.yaml"]
    networks = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())["networks"]
    assert not set(networks["tuning_seeds"]) & set(networks["seeds"])  # else the test could not tell them apart
    tune = [job for job in jobs if job["rule"] == "tune"]
    train = [job for job in jobs if job["rule"] == "train"]
    assert len(tune) == len(train) == 5, [job["rule"] for job in jobs]  # smoke: five optimizers, one task
    for job in tune:
        assert job["params"]["seeds"] == networks["tuning_seeds"], f"{job['output'][0]}: {job['params']['seeds']}"
    for job in train:
        assert job["params"]["seeds"] == networks["seeds"], f"{job['output'][0]}: {job['params']['seeds']}"
    assert {j["wildcards"]["optimizer"] for j in tune} == {j["wildcards"]["optimizer"] for j in train}


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_jobs_that_time_steps_take_every_core_and_the_others_one(dags, name):
    """cost, scaling and train jobs time the steps of the report's cost figures, time axes and time
    to target: nothing may run beside them. grid and tune jobs share the machine, a core each."""
    alone, shared = ("cost", "scaling", "train"), ("grid", "tune")
    for job in jobs_of(dags[name], *alone, *shared):
        cores = DAG_CORES if job["rule"] in alone else 1
        assert job["threads"] == cores, f"{job['rule']} {job['wildcards']}: {job['threads']} threads"
    assert {job["rule"] for job in dags[name]} >= {*alone, *shared}


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_the_script_of_every_job_is_there(dags, name):
    """Snakemake looks for a rule's `script:` only when a job of it runs: a wrong path fails no DAG,
    and the data rule's jobs (download tasks, gpu.yaml) run in no test of the pipeline."""
    scripts = {job["rule"]: job["script"] for job in dags[name] if job["script"]}
    assert scripts and ("data" in scripts or name == "smoke.yaml"), sorted(scripts)
    for rule, script in scripts.items():
        assert Path(script).is_file(), f"rule {rule}: no script {script}"


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_numpy_jobs_run_on_cpu_only_and_the_others_on_the_configured_devices(dags, name):
    """numpy has no GPU code (common.smk devices_for): with `devices: [cpu, cuda]` (gpu.yaml) torch
    and jax get a job per device, numpy only its cpu job, never a numpy-cuda one."""
    config, dag = configured(name), dags[name]
    for job in dag:
        if job["wildcards"].get("framework") == "numpy":
            assert job["wildcards"].get("device") == "cpu", f"{job['rule']} {job['output']}: numpy on a GPU"
    c, n = config["convex"], config["networks"]
    devices = {f: configured_devices(config, f) for f in {*c["frameworks"], *n["frameworks"]}}
    expected = {(f, d) for f in c["frameworks"] for d in devices[f]}
    grid = {(j["wildcards"]["framework"], j["wildcards"]["device"]) for j in jobs_of(dag, "grid")}
    assert grid == expected, f"grid jobs on {sorted(grid)}, expected {sorted(expected)}"
    expected = {(f, d) for f in n["frameworks"] for d in devices[f]}
    tune = {(j["wildcards"]["framework"], j["wildcards"]["device"]) for j in jobs_of(dag, "tune")}
    assert tune == expected, f"tune jobs on {sorted(tune)}, expected {sorted(expected)}"


def configured_devices(config, framework) -> tuple[str, ...]:
    """The devices a framework's jobs should run on: numpy cpu only; the list; or with `auto` those
    this machine's framework sees (asked here through runner.available_devices, not common.smk)."""
    from natgrad_impls.names import Framework
    from natgrad_impls.runner import available_devices

    if framework == "numpy":
        return ("cpu",)
    if config["devices"] != "auto":
        return tuple(config["devices"])
    return tuple(d.value for d in available_devices(Framework(framework)))


def options(command, name):
    """The values of every `--name value` and `--name=value` in a shell command."""
    import shlex

    words = shlex.split(command)
    values = [words[i + 1] for i, w in enumerate(words[:-1]) if w == name]
    return values + [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]


def option(command, name):
    """The value of `--name value` or `--name=value` in a shell command (exactly one)."""
    values = options(command, name)
    assert len(values) == 1, f"{name} given {len(values)} times in: {command}"
    return values[0]


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_grid_commands_carry_the_convex_settings(dags, name):
    """Each `natgrad grid` command (rule grid and its logit-clip twin) gets the config's convex grid,
    steps and repeats: an option left out falls back to natgrad's default silently (100 steps for
    smoke's 20), and its wildcards, checkpoints and output."""
    c = configured(name)["convex"]
    for job in jobs_of(dags[name], "grid", "grid_logit_clip_none"):
        command, where = job["shell"], job["output"][0]
        assert command, f"{where}: no shell command"
        assert option(command, "--steps") == str(c["steps"]), f"{where}: {command}"
        assert option(command, "--repeats") == str(c["repeats"]), f"{where}: {command}"
        assert option(command, "--lrs") == c["lrs"] and option(command, "--dampings") == c["dampings"], command
        for wildcard in ("task", "framework", "device"):
            assert option(command, f"--{wildcard}") == job["wildcards"][wildcard], f"{where}: {command}"
        assert option(command, "--optimizers").split(",") == configured(name)["optimizers"], command
        assert option(command, "--checkpoints") == job["params"]["checkpoints"], command
        assert option(command, "--out") == where, command
        # the job's log is its stderr, no terminal: progress comes as lines there, unless turned off
        assert "--no-progress" not in command.split(), command
    assert any(j["rule"] == "grid_logit_clip_none" for j in dags[name]) == bool(c["compare_logit_clip"])


def canonical(settings):
    return sorted(json.dumps(setting, sort_keys=True) for setting in settings)


@pytest.mark.parametrize("name", [*DAG_CONFIGS, "no-ef.yaml"])  # no-ef: config.yaml's dampings per optimizer
def test_tune_jobs_run_the_whole_tuning_grid_with_the_fixed_hyperparameters(dags, name):
    """A tune job's params.runs (common.smk tuning_runs): every lr of its optimizer, times every
    damping of its own (networks.dampings per optimizer) or of the one list, for an optimizer that
    has one, each with the optimizer's fixed hyperparameters of networks.hyperparameters (sgd's
    momentum 0.9 lost would tune plain sgd)."""
    from natgrad_impls.runner import accepted

    n, dag = configured(name)["networks"], dags[name]
    per_optimizer = isinstance(n["dampings"], dict)  # or one list for every optimizer that takes a damping
    grids = n["dampings"].values() if per_optimizer else [n["dampings"]]
    assert all(len(grid) > 1 for grid in grids) or name == "smoke.yaml"  # gpu.yaml: a damping grid to lose
    tuned = set()
    for job in jobs_of(dag, "tune"):
        optimizer = job["wildcards"]["optimizer"]
        tuned.add(optimizer)
        fixed = n.get("hyperparameters", {}).get(optimizer, {})
        dampings = [None] if "damping" not in accepted(optimizer) else \
            n["dampings"][optimizer] if per_optimizer else n["dampings"]
        expected = [{**fixed, "lr": lr, **({} if d is None else {"damping": d})} for lr in n["lrs"][optimizer]
                    for d in dampings]
        runs = job["params"]["runs"]
        assert canonical(runs) == canonical(expected), f"{job['output'][0]}: runs {runs}, expected {expected}"
    assert tuned == set(configured(name)["optimizers"])  # (each has an lr grid, or the config is refused)


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_network_jobs_get_the_configured_protocol(dags, name):
    """tune and train run their networks in networks.dtype for networks.steps, evaluated every
    networks.eval_every steps (params.protocol, which train.py passes to every run); the reruns of
    networks.cos_ef_ngd record the cosine, the tuning runs never."""
    n = configured(name)["networks"]
    for job in jobs_of(dags[name], "tune", "train"):
        protocol, where = job["params"]["protocol"], job["output"][0]
        assert isinstance(protocol, dict), f"{where}: protocol {protocol!r}"
        for key in ("dtype", "steps", "eval_every"):
            assert protocol.get(key) == n[key], f"{where}: protocol {key} {protocol.get(key)!r}, config {n[key]!r}"
        cos = job["rule"] == "train" and job["wildcards"]["optimizer"] in n.get("cos_ef_ngd", [])
        assert job["params"]["cos_ef_ngd"] is cos, f"{where}: cos_ef_ngd {job['params']['cos_ef_ngd']}"


@pytest.mark.parametrize("name", DAG_CONFIGS)
def test_every_job_keeps_its_checkpoints_in_its_own_folder_beside_its_table(dags, name):
    """params.checkpoints (common.smk checkpoints_beside): a hidden folder beside the job's table, one
    per job. Two jobs writing into one folder (results/grid/wine/ holds numpy-cpu and torch-cpu)
    would read each other's kept runs as their own, and the first to finish removes the other's."""
    import collections

    jobs = [job for job in dags[name] if "checkpoints" in job["params"]]
    assert {"grid", "tune", "train"} <= {job["rule"] for job in jobs}
    folders = collections.Counter(Path(job["output"][0]).parent for job in jobs)
    assert max(folders.values()) > 1, "no folder holds two tables: nothing to tell apart"
    for job in jobs:
        table, kept = Path(job["output"][0]), Path(job["params"]["checkpoints"])
        assert kept.parent == table.parent and kept.name.startswith("."), f"{table}: checkpoints in {kept}"
    shared = {folder: n for folder, n in collections.Counter(j["params"]["checkpoints"] for j in jobs).items() if n > 1}
    assert not shared, f"checkpoint folders shared by several jobs: {shared}"


# -- the targets: which figures and tables a configuration asks for, from which files -------------

SUMMARY, KUNSTNER, NETWORKS, COST = "0. At a glance", "1. Kunstner et al. (2019)", "2. Networks", "3. Cost"
APPENDIX, ENVIRONMENT = "5. Appendix", "6. Environment"


def runs_of(stage, tasks, optimizers, framework):
    return [f"results/{stage}/{t}/{o}/{framework}-cpu.parquet" for t in tasks for o in optimizers]


def grids_of(tasks, frameworks=("numpy",), suffix=""):
    return [f"results/grid/{t}/{f}-cpu{suffix}.parquet" for t in tasks for f in frameworks]


def cos_of(tasks):
    return [f"results/grid/{t}/cos.parquet" for t in tasks]


NO_EF_TRAIN = runs_of("train", ("digits-mlp", "mnist1d-mlp"), ("sgd", "ngd", "kfac"), "jax")
REGRESSION_TRAIN = runs_of("train", ("digits-mlp",), ("sgd", "adam", "ef", "ngd", "kfac"), "torch")
CLIP = grids_of(["breastcancer"]) + grids_of(["breastcancer"], suffix="-logit_clip-none")
BEST_TABLES = ["results/tables/best-convex.csv", "results/tables/best-networks.csv"]
# {overlay: {figure or table: (report section, its label, its inputs: a list, or a table's {name: list})}},
# worked out from common.smk's docstrings: figure 3 of breastcancer and wine (else the first two tasks),
# the appendix of every task where that is more; cosines along ef's best run where there is ef; the
# logit-clip comparison of the Bernoulli tasks; cost figures of timing's tasks and frameworks where
# there are settings; items numbered per section, figures first, then tables
TARGETS = {
    "no-ef.yaml": {
        "fig3-optimisation": (KUNSTNER, "1.", grids_of(["breastcancer"])),
        "appendix-optimisation-all-tasks": (APPENDIX, "1.", grids_of(["breastcancer", "yacht"])),
        "appendix-starting-point": (APPENDIX, "2.", ["results/toys/starting_point.parquet"]),
        "appendix-logit-clip": (APPENDIX, "3.", CLIP),
        "networks-loss": (NETWORKS, "1.", NO_EF_TRAIN),
        "networks-accuracy": (NETWORKS, "2.", NO_EF_TRAIN),
        "cost-scaling": (COST, "1.", ["results/scaling/jax-cpu.csv"]),
        "best-convex": (KUNSTNER, "2.", {"runs": grids_of(["breastcancer", "yacht"])}),
        "best-networks": (NETWORKS, "3.", {"runs": NO_EF_TRAIN, "tuning": [p.replace("/train/", "/tune/")
                                                                         for p in NO_EF_TRAIN]}),
        "logit-clip": (APPENDIX, "4.", {"runs": CLIP}),
        "environment": (ENVIRONMENT, "1.", {}),
        # no timing settings: no cost column, and no cost job for it
        "summary": (SUMMARY, "1.", {"best": BEST_TABLES, "cost": []}),
    },
    "regression.yaml": {
        "fig1-vecfield": (KUNSTNER, "1.", ["results/toys/vecfield.parquet"]),
        "fig3-optimisation": (KUNSTNER, "2.", grids_of(["energy", "yacht"]) + cos_of(["energy", "yacht"])),
        "appendix-optimisation-all-tasks": (APPENDIX, "1.", grids_of(["energy", "yacht", "powerplant"])
                                            + cos_of(["energy", "yacht", "powerplant"])),
        "networks-loss": (NETWORKS, "1.", REGRESSION_TRAIN),
        "networks-accuracy": (NETWORKS, "2.", REGRESSION_TRAIN),
        "networks-cosine": (NETWORKS, "3.", REGRESSION_TRAIN),
        "cost-steps": (COST, "1.", ["results/cost/mnist1d-mlp/jax-cpu.csv"]),
        "cost-devices": (COST, "2.", ["results/cost/mnist1d-mlp/jax-cpu.csv"]),
        "best-convex": (KUNSTNER, "3.", {"runs": grids_of(["energy", "yacht", "powerplant"],
                                                          ("numpy", "torch", "jax"))}),
        "best-networks": (NETWORKS, "4.", {"runs": REGRESSION_TRAIN, "tuning": [p.replace("/train/", "/tune/")
                                                                              for p in REGRESSION_TRAIN]}),
        "environment": (ENVIRONMENT, "1.", {}),
        "summary": (SUMMARY, "1.", {"best": BEST_TABLES, "cost": ["results/cost/mnist1d-mlp/jax-cpu.csv"]}),
    },
}


@pytest.mark.parametrize("name", TARGETS)
def test_the_configuration_asks_for_its_figures_and_tables_from_their_files(dags, name):
    """common.smk figures() and tables(), through the DAG: exactly the expected figure and table jobs,
    each with its inputs, its report section and its number in that section."""
    found = {}
    for job in dags[name]:
        if job["rule"].startswith(("figure_", "table_")):
            item = Path(job["output"][0]).stem
            inputs = ({k: sorted(v) for k, v in job["named_input"].items()} if job["rule"].startswith("table_")
                      else sorted(set(job["input"]) - {f"workflow/report/{item}.rst"}))  # (less its caption)
            found[item] = (job["report"]["category"], job["report"]["labels"]["item"], inputs)
    expected = {item: (section, f"{number} {item}", {k: sorted(v) for k, v in inputs.items()}
                       if isinstance(inputs, dict) else sorted(inputs))
                for item, (section, number, inputs) in TARGETS[name].items()}
    assert found.keys() == expected.keys(), f"asked for {sorted(found)}, expected {sorted(expected)}"
    for item in expected:
        assert found[item] == expected[item], f"{item}: {found[item]}, expected {expected[item]}"


def test_on_a_cluster_data_figures_and_tables_run_where_snakemake_does(dags):
    """`localrule`: a download needs the network, which a cluster's compute nodes often lack, and a
    figure or table is seconds of work, not a job to queue; every computing job is submitted."""
    for job in dags["gpu.yaml"]:
        local = job["rule"] == "data" or job["rule"].startswith(("figure_", "table_"))
        assert job["local"] == (local or job["rule"] == "all"), job["rule"]


COMPUTING_RULES = {"grid", "grid_logit_clip_none", "cos_along_best_ef", "toy", "tune", "train", "cost", "scaling"}
COMPUTING_CODE = ("natgrad_impls/cli.py",  # (grid's)
                  "workflow/scripts/cos_along_best_ef.py", "workflow/scripts/toy.py", "workflow/scripts/train.py",
                  "workflow/scripts/cost.py", "workflow/scripts/data.py")
PACKAGE = REPO / "natgrad_impls"


def library_files_used_by(paths) -> set[str]:
    """The package's files (relative to it) whose names the files at `paths` import, anywhere in
    them, and what those import in turn; a package's __init__ only where a name of its own is
    imported, not one of its submodules (its code runs then, but it computes nothing)."""
    def files(module: str, names=()):
        parts = module.split(".")[1:]
        found = [f"{'/'.join(parts + [n])}.py" for n in names if (PACKAGE.joinpath(*parts, f"{n}.py")).exists()]
        if len(found) < len(names) or not names:  # a name of the module's own
            own = "/".join(parts)
            found.append(f"{own}.py" if PACKAGE.joinpath(f"{own}.py").exists() else f"{own}/__init__.py".lstrip("/"))
        return found

    import ast

    used, todo = set(), [Path(p) for p in paths]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text())):
            if isinstance(node, ast.Import):
                found = [f for a in node.names if a.name.startswith("natgrad_impls") for f in files(a.name)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("natgrad_impls"):
                found = files(node.module, [a.name for a in node.names])
            else:
                continue
            todo += [PACKAGE / f for f in found if f not in used]
            used.update(found)
    return used


def test_jobs_take_as_params_what_they_read_and_the_code_that_computes_them(dags):
    """Snakemake reruns a job whose params changed. The whole `networks` section as a tune job's param
    reran every tuning job for new rerun seeds, and `timing` every cost job for another task list;
    the library, which Snakemake does not track, is a param, so that a fix to it reruns what it
    computed (runner.code_version): the computing rules' without the drawing modules, whose edits
    redraw the figures and tables alone."""
    from natgrad_impls.runner import code_version

    drawing = {f"figures/{p.name}" for p in (PACKAGE / "figures").glob("*.py")}
    leave_out = tuple(sorted(drawing - library_files_used_by(REPO / p for p in COMPUTING_CODE)))
    assert "figures/tables.py" not in leave_out and "figures/paper.py" in leave_out  # (train reads the picks)
    protocol = {"dtype", "steps", "eval_every"}
    read = {"tune": {"protocol": protocol}, "train": {"protocol": protocol},
            "cost": {"timing": {"dtype", "settings", "repeats"}},
            "scaling": {"timing": {"dtype", "repeats"}, "scaling": {"widths", "batch_sizes", "settings"}}}
    codes = collections.defaultdict(set)
    for job in dags["gpu.yaml"]:
        for param, keys in read.get(job["rule"], {}).items():
            assert set(job["params"][param]) == keys, (job["rule"], param)
        if job["rule"] in COMPUTING_RULES:
            codes["computed"].add(job["params"]["code"])
        elif job["rule"].startswith(("figure_", "table_")):
            codes["drawn"].add(job["params"]["code"])
        codes["rules"].add(job["rule"])
    assert COMPUTING_RULES - {"grid_logit_clip_none"} <= codes.pop("rules")
    assert codes == {"computed": {code_version(leave_out)[:16]}, "drawn": {code_version()[:16]}}


def test_download_tasks_get_a_data_job_and_the_starting_point_reuses_only_a_configured_wine_grid(dags):
    """data_inputs: a data job (fetch and verify) for each download task, none for offline ones;
    toy_inputs: the starting-point figure reads the numpy wine grid where the config runs one, and
    runs its own grid otherwise (a wine grid the config does not ask for is not run for it)."""
    data = {name: sorted(job["wildcards"]["task"] for job in dags[name] if job["rule"] == "data") for name in dags}
    assert data["smoke.yaml"] == [] and data["no-ef.yaml"] == ["yacht"]
    assert data["regression.yaml"] == ["energy", "powerplant", "yacht"]
    for name, grid in (("smoke.yaml", ["results/grid/wine/numpy-cpu.parquet"]), ("no-ef.yaml", []),
                       ("no-numpy.yaml", [])):
        toy = [job for job in dags[name] if job["rule"] == "toy" and job["wildcards"]["toy"] == "starting_point"]
        assert len(toy) == 1 and toy[0]["input"] == grid, f"{name}: {toy}"


def test_figure_3_and_the_numpy_grids_only_where_convex_frameworks_has_numpy(dags):
    """Figure 3, its appendix and the logit-clip comparison draw numpy grids: a config whose
    convex.frameworks has no numpy asks for none of them (not even with a Bernoulli task) and runs no
    numpy job; its best-convex table reads the grids it asked for."""
    jobs = dags["no-numpy.yaml"]
    assert not [job["output"] for job in jobs if job["wildcards"].get("framework") == "numpy"]
    assert not {"figure_fig3_optimisation", "figure_appendix_optimisation_all_tasks", "figure_appendix_logit_clip",
                "table_logit_clip", "grid_logit_clip_none"} & {j["rule"] for j in jobs}
    best = [job for job in jobs if job["rule"] == "table_best_convex"]
    assert len(best) == 1 and sorted(best[0]["named_input"]["runs"]) == [
        "results/grid/breastcancer/torch-cpu.parquet", "results/grid/wine/torch-cpu.parquet"]


def test_grid_commands_carry_the_convex_hyperparameters_and_the_logit_clip(dags):
    """convex.hyperparameters, as natgrad grid options (--kfac-update-period, its own name in the
    CLI), and not networks.hyperparameters (sgd's momentum 0.9 would turn figure 3's GD into heavy
    ball); the logit-clip twin grids the exact likelihood, the grid the paper code's default."""
    jobs = dags["no-ef.yaml"]
    for job in jobs_of(jobs, "grid", "grid_logit_clip_none"):
        command = job["shell"]
        assert option(command, "--kfac-update-period") == "3", command
        assert not options(command, "--momentum") and not options(command, "--fisher"), command
    for name in DAG_CONFIGS + ("no-ef.yaml",):
        for job in jobs_of(dags[name], "grid", "grid_logit_clip_none"):
            clip = ["none"] if job["rule"] == "grid_logit_clip_none" else []
            assert options(job["shell"], "--logit-clip") == clip, job["shell"]


@pytest.mark.parametrize("name", [*DAG_CONFIGS, *OVERLAYS])
def test_each_figure_has_its_own_caption(dags, name):
    for job in dags[name]:
        if job["rule"].startswith("figure_"):
            figure = Path(job["output"][0]).stem
            assert job["named_input"]["caption"] == [f"workflow/report/{figure}.rst"], job["named_input"]
            assert (REPO / "workflow" / "report" / f"{figure}.rst").read_text().strip(), figure
