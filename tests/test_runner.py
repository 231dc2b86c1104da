"""The runner (natgrad_impls.runner): every offline task x optimizer x framework runs; divergence
stops and marks a run without raising; runs are reproducible; the DESIGN 7 columns are there,
with missing hyperparameters empty."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import dense_reference as ref
from conftest import every_optimizer, jax_compiles, singular_task, underdetermined_task
from natgrad_impls import make_optimizer, models, results, runner, timing
from natgrad_impls.names import Optimizer
from natgrad_impls.tasks import TASKS

OFFLINE = [name for name, task in TASKS.items() if task.offline]
CONVEX = [name for name in OFFLINE if runner.is_convex(TASKS[name])]
# Small steps: the smoke runs must not diverge.
SMOKE = every_optimizer({
    "sgd": {"lr": 1e-6, "momentum": 0.5},
    "adam": {"lr": 1e-3},
    "ef": {"lr": 1e-2, "damping": 1e-2},
    "ngd": {"lr": 1e-2, "damping": 1e-2},
    "kfac": {"lr": 1e-2, "damping": 1e-2, "kfac_update_period": 2},
})
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small problems: torch's intra-op threads only add synchronisation (and stall on a loaded
    machine). Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REQUIRED = ["task", "optimizer", "framework", "device", "dtype", "seed", "lr", "damping", "step", "loss", "time_s",
            "diverged", "grad_norm"]


def _cases():
    for task in OFFLINE:
        for framework in ("numpy", "torch", "jax"):
            if framework == "numpy" and task not in CONVEX:
                continue
            for optimizer in SMOKE:
                yield task, optimizer, framework


def test_offline_tasks_are_the_expected_ones():
    assert set(CONVEX) == {"wine", "breastcancer", "vecfield", "misspec"}
    assert set(OFFLINE) - set(CONVEX) == {"digits-mlp", "mnist1d-mlp"}


@pytest.mark.parametrize("task,optimizer,framework", list(_cases()))
def test_smoke(task, optimizer, framework):
    hp = dict(SMOKE[optimizer])
    if task not in CONVEX and optimizer == "sgd":
        hp["lr"] = 0.05
    if task not in CONVEX and optimizer == "ngd":
        hp["fisher"] = "mc"  # the exact Fisher of 10 classes costs 10 x the columns: slow for a smoke test
    frame = runner.run(task, optimizer, framework, hyperparameters=hp, steps=2, eval_every=1, progress=False)
    assert list(frame.columns[: len(REQUIRED)]) == REQUIRED
    assert frame["step"].tolist() == [0, 1, 2]
    assert not frame["diverged"].any()
    assert np.isfinite(frame["loss"]).all() and np.isfinite(frame["grad_norm"]).all()
    assert frame["time_s"].iloc[0] == 0 and frame["time_s"].is_monotonic_increasing
    assert (frame["lr"] == hp["lr"]).all()
    assert frame["damping"].isna().all() == (optimizer in ("sgd", "adam"))
    if task in CONVEX:
        assert "test_loss" not in frame  # no test split, full batch: nothing else to evaluate
        assert frame["batch_size"].isna().all()
    else:
        for column in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert frame[column].notna().all(), column
        assert (frame["batch_size"] == TASKS[task].batch_size).all()


def test_a_run_without_steps_takes_its_tasks_default():
    """steps omitted (`natgrad run` without --steps): the task's own number, wine's 100, so rows 0 to 100."""
    frame = runner.run("wine", "ngd", "numpy", hyperparameters={"lr": 1.0, "damping": 1e-3}, progress=False)
    assert TASKS["wine"].steps == 100 and frame["step"].tolist() == list(range(101))
    assert not frame["diverged"].any()


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_divergence_stops_and_marks_the_run(framework):
    frame = runner.run("wine", "sgd", framework, hyperparameters={"lr": 1.0}, steps=50, progress=False)
    assert frame["diverged"].all()
    assert len(frame) == 2  # step 0, then the step whose loss exceeded 100 x the first
    assert frame["loss"].iloc[-1] > 100 * frame["loss"].iloc[0]


@pytest.mark.parametrize("optimizer, hyperparameters", [("sgd", {"lr": 0.1, "momentum": 0.9}),
                                                      ("kfac", {"lr": 0.01, "damping": 0.01})])
def test_the_runs_of_a_jax_job_after_the_first_compile_nothing(optimizer, hyperparameters):
    """A tuning job's runs in one process share their programs (steps, batching, evaluations, the
    cosine): a run of another setting and seed after the first compiles nothing, where each run
    traced, lowered and compiled (or read back from the persistent cache) all of them anew."""
    def one_run(scale, seed):
        setting = {k: v * scale if k in ("lr", "damping") else v for k, v in hyperparameters.items()}
        return runner.run("digits-mlp", optimizer, "jax", dtype="float32", hyperparameters=setting, steps=6,
                          eval_every=3, seed=seed, cos_ef_ngd=True, cos_damping=0.01, progress=False)

    one_run(1.0, 0)
    with jax_compiles() as compiles:
        frame = one_run(0.5, 1)
    assert compiles == [] and frame["train_loss"].notna().sum() == 3 and frame["cos_ef_ngd"].notna().all()


def test_a_jax_run_compiles_everything_before_its_loop(monkeypatch):
    """Steps, evaluations and the cosine are compiled in setup (setup_s), so that the loop's step and
    evaluation times hold no compilation (the cosine's took 0.35 s of eval_s at step 0)."""
    in_loop = []
    bar = runner.progress_bar

    def loop_starts(*args, **kwargs):
        in_loop.append(True)
        return bar(*args, **kwargs)

    monkeypatch.setattr(runner, "progress_bar", loop_starts)
    with jax_compiles(mark=lambda: bool(in_loop)) as compiles:  # each compilation: in the loop or not
        runner.run("digits-mlp", "ef", "jax", dtype="float32", hyperparameters={"lr": 0.1, "damping": 1.0}, steps=4,
                   eval_every=2, cos_ef_ngd=True, progress=False)
    assert in_loop and compiles and not any(compiles)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_steps_run_with_the_setups_objects_out_of_the_collectors_reach(framework, monkeypatch):
    """A full garbage collection over torch's or jax's objects took 50-70 ms: one in a timed step
    would be a spike in time_s. The loop runs with them frozen, and they are handed back after it,
    also after a run that fails; a heap the caller froze stays frozen."""
    import gc

    frozen = []

    class Bar:
        def update(self, n):
            frozen.append(gc.get_freeze_count())

        def close(self):
            pass

    monkeypatch.setattr(runner, "progress_bar", lambda *args, **kwargs: Bar())
    runner.run("digits-mlp", "sgd", framework, dtype="float32", hyperparameters={"lr": 0.1}, steps=3, progress=False)
    assert len(frozen) == 3 and min(frozen) > 1000 and gc.get_freeze_count() == 0
    monkeypatch.setattr(Bar, "update", lambda self, n: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runner.run("digits-mlp", "sgd", framework, dtype="float32", hyperparameters={"lr": 0.1}, steps=3, progress=False)
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(Bar, "update", lambda self, n: None)
    gc.freeze()  # a caller's frozen heap is theirs: the run leaves it frozen
    try:
        runner.run("digits-mlp", "sgd", framework, dtype="float32", hyperparameters={"lr": 0.1}, steps=1,
                   progress=False)
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_divergence_is_the_first_step_past_100_times_the_first_loss(framework):
    """sgd on wine at lr 4e-6 grows its loss about 2.7-fold a step (x51 at step 5, x141 at step 6): the
    run stops at step 6, the first past 100 x the first loss, not before and not later (the run at
    lr 1 above crosses every threshold at once)."""
    frame = runner.run("wine", "sgd", framework, hyperparameters={"lr": 4e-6}, steps=50, progress=False)
    growth = (frame["loss"] / frame["loss"].iloc[0]).to_numpy()
    assert frame["diverged"].all() and frame["step"].tolist() == list(range(7))
    assert growth[-1] > 100 >= growth[:-1].max() and growth[-2] > 30


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_a_failed_solve_is_a_divergence_at_the_next_step_in_every_framework(framework):
    """A singular solve gives NaN parameters (jax's solves cannot raise; numpy's and torch's raised,
    which recorded the failure a step earlier): step 0's loss, then NaN."""
    frame = runner.run(singular_task(), "ngd", framework, hyperparameters={"lr": 1.0, "damping": 0.0}, progress=False)
    assert frame["diverged"].all()
    assert len(frame) == 2 and math.isfinite(frame["loss"].iloc[0]) and math.isnan(frame["loss"].iloc[1])


@pytest.mark.parametrize("optimizer", ["ef", "ngd"])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_an_undamped_curvature_of_too_few_columns_is_a_divergence(framework, optimizer):
    """damping 0 with fewer examples than weights: the curvature is singular whatever the data, but an LU
    solve returned finite, arbitrary steps (different in each framework). It must fail as a singular
    solve does: NaN parameters, a divergence at the next step."""
    frame = runner.run(underdetermined_task(), optimizer, framework, hyperparameters={"lr": 1.0, "damping": 0.0},
                       progress=False)
    assert frame["diverged"].all()
    assert len(frame) == 2 and math.isfinite(frame["loss"].iloc[0]) and math.isnan(frame["loss"].iloc[1])


@pytest.mark.parametrize("optimizer", ["ef", "ngd"])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_an_undamped_curvature_of_as_many_columns_as_weights_is_solved(framework, optimizer):
    """The other side of the rule above: 5 examples of the 5 weights give an invertible curvature, whose
    undamped solve must not be refused. ngd at lr 1 on this noiseless linear regression is Newton's
    step: the loss drops to round-off at step 1."""
    frame = runner.run(underdetermined_task(examples=5), optimizer, framework,
                       hyperparameters={"lr": 1.0, "damping": 0.0}, steps=3, progress=False)
    assert not frame["diverged"].any() and np.isfinite(frame["loss"]).all() and len(frame) == 4
    if optimizer == "ngd":
        assert frame["loss"].iloc[1] < 1e-20 * frame["loss"].iloc[0]


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_an_undamped_true_fisher_is_solved_with_an_l2_prior_and_the_empirical_one_is_not(framework):
    """The prior's l2 I is part of the true Fisher (DESIGN 4), so on 3 examples of 5 weights it is
    invertible undamped: Newton's step at lr 1 on this quadratic lands on the regularised minimum,
    where the loss stays. The empirical Fisher has no prior term: still singular, its step NaN."""
    task = underdetermined_task(l2=0.1)
    kwargs = dict(hyperparameters={"lr": 1.0, "damping": 0.0}, steps=3, progress=False)
    ngd = runner.run(task, "ngd", framework, **kwargs)
    assert not ngd["diverged"].any() and ngd["loss"].iloc[1] < 0.5 * ngd["loss"].iloc[0]
    np.testing.assert_allclose(ngd["loss"].iloc[2:], ngd["loss"].iloc[1], rtol=1e-12)
    ef = runner.run(task, "ef", framework, **kwargs)
    assert math.isnan(ef["loss"].iloc[1]) and ef["diverged"].all()


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_same_seed_same_numbers(framework):
    task = "wine" if framework == "numpy" else "digits-mlp"
    hp = {"lr": 0.1, "damping": 1e-2} if framework == "numpy" else {"lr": 1e-3}
    kwargs = dict(hyperparameters=hp, steps=4, seed=3, eval_every=2, progress=False)
    optimizer = "ef" if framework == "numpy" else "adam"
    first = runner.run(task, optimizer, framework, **kwargs)
    second = runner.run(task, optimizer, framework, **kwargs)
    measured = [c for c in first.columns if c != "time_s"]
    pd.testing.assert_frame_equal(first[measured], second[measured])
    if framework != "numpy":  # mini-batches: another seed, another order
        other = runner.run(task, optimizer, framework, **{**kwargs, "seed": 4})
        assert not np.allclose(other["loss"].iloc[1:], first["loss"].iloc[1:])


def test_convex_tasks_start_from_zero_and_agree_across_frameworks():
    """The Kunstner protocol: theta0 = 0, float64; numpy, torch and jax agree to round-off."""
    kwargs = dict(hyperparameters={"lr": 0.5, "damping": 1e-3}, steps=10, progress=False)
    losses = [runner.run("breastcancer", "ngd", fw, **kwargs)["loss"].to_numpy() for fw in ("numpy", "torch", "jax")]
    assert losses[0][0] == pytest.approx(math.log(2), rel=1e-15)  # theta0 = 0: every p = 1/2
    for other in losses[1:]:
        np.testing.assert_allclose(other, losses[0], rtol=1e-10)


def test_cos_ef_ngd_is_measured_and_agrees_across_frameworks():
    kwargs = dict(hyperparameters={"lr": 0.1, "damping": 1e-3}, steps=3, cos_ef_ngd=True, progress=False)
    runs = [runner.run("breastcancer", "ef", fw, **kwargs) for fw in ("numpy", "torch", "jax")]
    for column in runner.COSINES:
        cosines = [run[column].to_numpy() for run in runs]
        assert np.all(np.abs(cosines[0]) <= 1 + 1e-12) and np.isfinite(cosines[0]).all(), column
        for other in cosines[1:]:
            np.testing.assert_allclose(other, cosines[0], rtol=1e-8, err_msg=column)
    with pytest.raises(ValueError, match="cos_damping"):
        runner.run("wine", "sgd", "numpy", hyperparameters={"lr": 0.1}, steps=1, cos_ef_ngd=True, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 2.7, "steps: 2.7 must be an integer >= 0"),  # int() made it 2 steps
    ("eval_every", 1.5, "eval_every: 1.5 must be an integer >= 1"),  # and every step an evaluation
    ("cos_damping", -5.0, "cos_damping: -5.0 must be a finite number >= 0"),  # a cosine of -0.76 came out
    ("cos_damping", math.nan, "cos_damping: nan must be a finite number >= 0"),
])
def test_library_callers_get_the_clis_checks(field, value, message):
    """runner.run takes what the command line refuses before it: a fraction of a step or of an evaluation
    period, and a negative or NaN cosine damping, are errors naming the field, not silently rounded or used."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        runner.run("wine", "ef", "numpy", hyperparameters={"lr": 0.1, "damping": 1e-3}, cos_ef_ngd=True,
                   **{"steps": 2, field: value}, progress=False)


def test_missing_hyperparameters_are_empty_in_the_file(tmp_path):
    frame = runner.run("wine", "sgd", "numpy", hyperparameters={"lr": 1e-6}, steps=2, progress=False)
    path = results.write(frame, tmp_path / "run.csv")
    header, first = path.read_text().splitlines()[:2]
    fields = dict(zip(header.split(","), first.split(",")))
    assert fields["damping"] == "" and fields["batch_size"] == "" and fields["momentum"] == "0.0"
    back = results.read(path)
    assert back["damping"].isna().all()
    pd.testing.assert_frame_equal(results.read(results.write(frame, tmp_path / "run.parquet")), frame)


def test_a_csv_result_has_the_frames_columns_and_no_index(tmp_path):
    """DESIGN 7: a result file's columns are the run's; a written index would add an unnamed column
    of row numbers to every CSV file, for pandas and any other reader (parquet keeps none either)."""
    frame = pd.DataFrame({"task": ["wine", "wine"], "step": [0, 1], "loss": [1.0, 0.5]})
    path = results.write(frame, tmp_path / "run.csv")
    assert path.read_text().splitlines()[0] == "task,step,loss"
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)
    pd.testing.assert_frame_equal(results.read(results.write(frame, tmp_path / "RUN.CSV")), frame)  # any case


@pytest.mark.parametrize("task, written", [("digits-mlp", "128"), ("wine", "")])
def test_a_csv_result_writes_the_batch_size_as_a_count(tmp_path, task, written):
    """batch_size is a count, empty for full batch; a float column would write "128.0"."""
    frame = runner.run(task, "sgd", "torch", hyperparameters={"lr": 0.01}, steps=1, progress=False)
    path = results.write(frame, tmp_path / "run.csv")
    header, first = path.read_text().splitlines()[:2]
    assert first.split(",")[header.split(",").index("batch_size")] == written


def test_a_folder_is_no_result_file(tmp_path):
    """A folder named like a result file is refused before a run, naming `out` (DESIGN 7: bad input is
    one line naming the field, and nothing is written), not after the whole run, when the rename of
    its temporary onto the folder fails."""
    folder = tmp_path / "run.csv"
    folder.mkdir()
    for check in (results.check_path, results.check_writable):
        with pytest.raises(ValueError, match=r"^out: .*run\.csv' is a folder"):
            check(folder)


def test_results_are_readable_by_others(tmp_path):
    """Results are for sharing (a report, a cluster's other users): the temporary that `atomic` writes
    through comes from mkstemp, which makes owner-only (0600) files, so the file must be opened up
    to 0644 before the rename, in both formats and for text."""
    frame = pd.DataFrame({"step": [0, 1]})
    paths = [results.write(frame, tmp_path / "run.csv"), results.write(frame, tmp_path / "run.parquet"),
             results.write_text("caption", tmp_path / "caption.rst")]
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o644, path.name


def test_a_failing_pipeline_job_writes_its_traceback_to_its_log(tmp_path):
    """results.job_log: what a job prints and the error that ends it are both in its log, which
    is where Snakemake points a reader (`--show-failed-logs`, the job's log path)."""
    log = tmp_path / "job.log"
    with pytest.raises(ZeroDivisionError):
        with results.job_log(log):
            print("tuning 3 settings")
            1 / 0
    text = log.read_text()
    assert text.startswith("tuning 3 settings\n") and "Traceback" in text and "ZeroDivisionError" in text


def test_a_job_log_holds_what_c_code_writes_too(tmp_path):
    """torch's, XLA's and the C libraries' messages (a warning, an abort's last words) go to file
    descriptors 1 and 2, not through sys.stdout: they went to Snakemake's console, not the job's log.
    Both descriptors are the process's own again after the block."""
    import os

    log = tmp_path / "job.log"
    before = [os.fstat(fd).st_ino for fd in (1, 2)]
    with results.job_log(log):
        print("from python")
        os.write(1, b"from C, stdout\n")
        os.write(2, b"from C, stderr\n")
    assert log.read_text() == "from python\nfrom C, stdout\nfrom C, stderr\n"
    assert [os.fstat(fd).st_ino for fd in (1, 2)] == before


def test_a_pipeline_job_stopped_by_sigterm_unwinds_and_says_so(tmp_path):
    """SIGTERM inside results.job_log unwinds (a result being written removes its temporary file)
    with exit status 143 and a line in the log; the handler before it is back afterwards."""
    import signal

    class Unhandled(Exception):
        pass

    def outside(signum, frame):  # so that a job_log without its handler fails this test, not the session
        raise Unhandled

    out = tmp_path / "run.csv"

    def killed_while_writing(temp):
        Path(temp).write_text("half a table")
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(SystemExit) as stopped:
            with results.job_log(tmp_path / "job.log"):
                results.atomic(out, killed_while_writing)
        assert signal.getsignal(signal.SIGTERM) is outside  # the handler before it is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [tmp_path / "job.log"]  # no result, no temporary file
    assert "stopped by SIGTERM (exit status 143)" in (tmp_path / "job.log").read_text()


@pytest.mark.parametrize("extension, writer", [(".csv", "to_csv"), (".parquet", "to_parquet")])
def test_a_table_write_that_fails_leaves_neither_the_table_nor_a_temporary(tmp_path, monkeypatch, extension, writer):
    """results.write goes through results.atomic in both formats: a writer that dies half-way (a
    full disk) leaves the folder as it was, so a resumed pipeline never takes half a table for one."""

    def half_then_full_disk(frame, temp, **kwargs):
        Path(temp).write_text("half a table")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, writer, half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        results.write(pd.DataFrame({"step": [0, 1]}), tmp_path / f"run{extension}")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_swept_from_subfolders_only_when_asked(tmp_path):
    """Old `.NAME.*.part` files (of killed writers) go, young ones (maybe still being written) and
    other files stay; subfolders, hidden ones too, only with recursive=True."""
    old, young = 2 * 3600, 60
    files = {".a.csv.x.part": old, "sub/.b.csv.y.part": old, ".runs/.c.parquet.z.part": old,
             ".d.csv.w.part": young, "e.part": old}
    now = time.time()
    for name, age in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
        os.utime(path, (now - age, now - age))
    left = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())  # noqa: E731
    results.remove_stale_temporaries(tmp_path, 3600)
    assert left() == [".d.csv.w.part", ".runs/.c.parquet.z.part", "e.part", "sub/.b.csv.y.part"]
    results.remove_stale_temporaries(tmp_path, 3600, recursive=True)
    assert left() == [".d.csv.w.part", "e.part"]


def test_many_runs_killed_part_way_resume_at_the_next_run(tmp_path, monkeypatch):
    """runner.run_many (the tune and train jobs): a job stopped after two of four runs starts again
    at the third, and its table equals that of a job never stopped (time aside); a changed protocol
    reuses nothing."""
    settings, seeds = [{"lr": 0.1}, {"lr": 0.01}], [0, 1]
    protocol = dict(dtype="float32", steps=3, eval_every=2)
    many = lambda folder, **changed: runner.run_many(  # noqa: E731
        "digits-mlp", "sgd", "torch", "cpu", settings, seeds, folder, log=lambda line: None, **{**protocol, **changed})
    whole = many(None)
    calls, real = [], runner.run

    def stopped_at_the_third(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or a cluster's time limit
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        many(tmp_path / "kept")
    calls.clear()
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: calls.append(kwargs["seed"]) or real(*args, **kwargs))
    resumed = many(tmp_path / "kept")
    assert calls == [0, 1]  # the second setting's two seeds; the first's were kept
    same = [c for c in whole.columns if c != "time_s"]
    pd.testing.assert_frame_equal(resumed[same], whole[same])
    calls.clear()
    many(tmp_path / "kept", steps=4)
    assert len(calls) == 4


def test_many_runs_log_the_full_train_loss_that_tuning_ranks_by():
    """One line per run, counted over the job's runs: its last step's loss, and beside it the
    full-train loss the tuning ranks settings by where that step was evaluated (a convex run
    evaluates none)."""
    lines = []
    frame = runner.run_many("digits-mlp", "sgd", "torch", "cpu", [{"lr": 0.1}], [0], log=lines.append,
                            dtype="float32", steps=4, eval_every=2)
    last = frame.iloc[-1]
    assert lines == [f"{{'lr': 0.1}} seed 0: final loss {last['loss']:.6g} (full-train {last['train_loss']:.6g}) "
                     f"at step 4, {last['time_s']:.3g} s of steps (1 of 1)"]
    lines.clear()
    runner.run_many("wine", "sgd", "numpy", "cpu", [{"lr": 1e-6}, {"lr": 1e-7}], [0, 1], log=lines.append, steps=2)
    assert "full-train" not in lines[0] and lines[0].startswith("{'lr': 1e-06} seed 0: final loss ")
    assert [line.rsplit("(", 1)[1] for line in lines] == ["1 of 4)", "2 of 4)", "3 of 4)", "4 of 4)"]
    assert lines[3].startswith("{'lr': 1e-07} seed 1: ")


def test_a_kept_run_is_reused_only_under_the_same_optimizer_framework_and_dtype(tmp_path, monkeypatch):
    """One checkpoint folder, one field changed at a time: the same settings under sgd and then
    adam (a tune job per optimizer), in another framework, or in another dtype are runs of their
    own, not the kept sgd/numpy/float64 run; the same call again reuses it."""
    calls, real = [], runner.run
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: calls.append(args[1:3]) or real(*args, **kwargs))
    folder = tmp_path / "kept"
    base = dict(task="wine", optimizer="sgd", framework="numpy", device="cpu", settings=[{"lr": 1e-3}], seeds=[0],
                checkpoints=folder, log=lambda line: None, steps=3)
    first = runner.run_many(**base)
    again = runner.run_many(**base)
    assert calls == [("sgd", "numpy")]  # the second call read the kept run
    pd.testing.assert_frame_equal(again, first)
    for change in (dict(optimizer="adam"), dict(framework="torch"), dict(framework="torch", dtype="float32")):
        calls.clear()
        frame = runner.run_many(**{**base, **change})
        assert calls == [(change.get("optimizer", "sgd"), change.get("framework", "numpy"))], change
        assert (frame["optimizer"] == change.get("optimizer", "sgd")).all()
        assert (frame["dtype"] == change.get("dtype", "float64")).all()
    calls.clear()
    runner.run_many(**base)
    assert calls == []
    # nor under another release of a numerical library (torch's here): it moves float32 results
    versions = timing.package_version
    monkeypatch.setattr(timing, "package_version", lambda name: "0.0" if name == "torch" else versions(name))
    runner.code_version.cache_clear()  # (computed once per process)
    try:
        runner.run_many(**base)
    finally:
        monkeypatch.undo()
        runner.code_version.cache_clear()
    assert calls == [("sgd", "numpy")]


def test_samples_is_recorded_only_where_labels_are_drawn():
    """The exact Fisher draws no labels: its runs have no `samples`, so a grid or a table that holds
    both kinds shows it empty for them, not a 1 that reads as one sample."""
    hps = {"lr": 0.1, "damping": 1.0}
    exact = runner.run("wine", "ngd", "numpy", hyperparameters={**hps, "fisher": "exact"}, steps=1, progress=False)
    mc = runner.run("wine", "ngd", "numpy", hyperparameters={**hps, "fisher": "mc", "samples": 3}, steps=1, progress=False)
    assert "samples" not in exact.columns and (exact["fisher"] == "exact").all()
    assert (mc["samples"] == 3).all() and (mc["fisher"] == "mc").all()
    both = pd.concat([exact, mc])
    assert both["samples"].isna().tolist() == [True] * 2 + [False] * 2


def test_timing_covers_the_steps_only():
    frame = runner.run("digits-mlp", "sgd", "torch", hyperparameters={"lr": 0.05}, steps=20, eval_every=5,
                       progress=False)
    attrs = frame.attrs
    assert frame["time_s"].iloc[-1] == pytest.approx(attrs["step_s"])
    assert attrs["step_s"] + attrs["eval_s"] <= attrs["loop_s"]
    assert frame["test_accuracy"].notna().sum() == 5  # steps 0, 5, 10, 15, 20


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^damping: not a hyperparameter of sgd \(one of lr, momentum\)$"):
        runner.resolve("wine", "sgd", "numpy", hyperparameters={"lr": 1.0, "damping": 1.0})
    with pytest.raises(ValueError, match=r"^damping: required by ngd"):
        runner.resolve("wine", "ngd", "numpy", hyperparameters={"lr": 1.0})
    with pytest.raises(ValueError, match=r"^framework: 'numpy' is not available for task 'digits-mlp' \(one of torch, jax\)$"):
        runner.resolve("digits-mlp", "sgd", "numpy", hyperparameters={"lr": 1.0})
    with pytest.raises(ValueError, match=r"^dtype: 'float32' is not available for numpy \(one of float64\)$"):
        runner.resolve("wine", "sgd", "numpy", dtype="float32", hyperparameters={"lr": 1.0})


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cuda_runs_equal_cpu_runs(framework):
    """On a GPU: the same run, float64, to round-off; mini-batches and evaluation work there."""
    kwargs = dict(hyperparameters={"lr": 1.0, "damping": 1e-4}, steps=20, progress=False)
    on_gpu = runner.run("breastcancer", "ngd", framework, "cuda", **kwargs)
    on_cpu = runner.run("breastcancer", "ngd", framework, "cpu", **kwargs)
    np.testing.assert_allclose(on_gpu["loss"], on_cpu["loss"], rtol=1e-10)
    assert set(on_gpu["device"]) == {"cuda"} and set(on_cpu["device"]) == {"cpu"}  # the row says where it ran
    frame = runner.run("digits-mlp", "kfac", framework, "cuda", "float32", hyperparameters={"lr": 0.01, "damping": 1e-2},
                       steps=30, eval_every=10, progress=False)
    assert not frame["diverged"].any() and frame["test_accuracy"].notna().sum() == 4
    assert frame["loss"].iloc[-1] < frame["loss"].iloc[0]


_BUSY_LOOP = """
import time, jax, jax.numpy as jnp
x = jnp.ones((1500, 1500)); step = jax.jit(lambda a: a @ a)
step(x).block_until_ready()  # compiled outside the measurement
cpu, wall = time.process_time(), time.perf_counter()
while time.perf_counter() - wall < 1.0:
    step(x).block_until_ready()
print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""


@pytest.mark.skipif(runner.usable_cores() < 2, reason="one core: nothing to oversubscribe")
def test_the_thread_environment_keeps_jax_on_one_core():
    # A one-thread pipeline job's jax must not spread its matmuls over the cores that the other
    # jobs run on. One busy thread cannot use more than its wall time in CPU time; XLA's default
    # pool, one thread per core, uses nearly twice that on an idle 2-core machine.
    env = {**os.environ, **runner.thread_environment(1)}
    out = subprocess.run([sys.executable, "-c", _BUSY_LOOP], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 1.3


def _batch_rows(n, size, seed, count):
    """The first `count` mini-batches' rows by the documented rule: per epoch, a permutation drawn
    from models.random_stream(seed, "batches"), its incomplete tail dropped, cut into `size` rows."""
    rng, rows = models.random_stream(seed, "batches"), []
    while len(rows) < count:
        order = rng.permutation(n)[: n // size * size]
        rows += [order[i:i + size] for i in range(0, len(order), size)]
    return rows[:count]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_mini_batches_follow_the_seeds_documented_order(framework, monkeypatch):
    """Seeds move the batch order as well as the initialisation: from one fixed initial point, with
    lr 0 (the parameters never move), step k's loss is that point's loss on the k-th batch of
    random_stream(seed, "batches"), across an epoch boundary (digits: 11 batches of 128), and two
    seeds see different batches."""
    real = models.init_params
    monkeypatch.setattr(models, "init_params", lambda model, seed, *args, **kwargs: real(model, 0, *args, **kwargs))
    task = TASKS["digits-mlp"]
    x, y = task.load(0).train
    start = real(task.problem.model, 0, "glorot")
    steps, losses = 12, {}
    for seed in (3, 4):
        frame = runner.run("digits-mlp", "sgd", framework, hyperparameters={"lr": 0.0}, steps=steps, seed=seed,
                           eval_every=steps, progress=False)
        rows = _batch_rows(len(x), task.batch_size, seed, steps + 1)
        expected = [ref.loss(task.problem, start, x[r], y[r]) for r in rows]
        np.testing.assert_allclose(frame["loss"], expected, rtol=1e-12, err_msg=f"seed {seed}")
        losses[seed] = frame["loss"].to_numpy()
    assert not np.allclose(losses[3], losses[4], rtol=1e-6)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("task,variant", [("vecfield", None), ("misspec", "linear-misspecified-b")])
def test_cos_ef_ngd_shifts_the_fisher_by_l2_and_not_the_ef(task, variant, framework):
    """With a prior (l2 > 0) the cosine is between (EF + damping I)^-1 g and (F + l2 I + damping I)^-1 g
    (DESIGN 6: the prior is in the loss, gradient and Fisher, not in the EF), against a dense
    autograd reference. damping < l2, so that a shifted EF would move the cosine well past round-off."""
    t = runner.resolve_task(task, variant)
    assert t.problem.l2 > 0
    seed, damping = 2, 1e-3
    x, y = t.load(seed).train
    theta = models.init_params(t.problem.model, seed, "glorot")  # not 0: g includes the l2 term
    frame = runner.run(t, "ef", framework, hyperparameters={"lr": 0.1, "damping": damping}, steps=0, seed=seed,
                       init="glorot", cos_ef_ngd=True, progress=False)
    expected = ref.cosines(t.problem, theta, x, y, damping)  # (ref.fisher includes l2 I)
    for column, value in expected.items():
        assert frame[column].iloc[0] == pytest.approx(value, rel=1e-8, abs=0), column


def _numpy(params):
    """A step's parameters (torch tensors or jax arrays) as float64 NumPy."""
    return {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64) for k, v in params.items()}


def spy_on_steps(monkeypatch, record):
    """runner.run's optimizers, with record(params, out) after each step: the parameters it was
    handed and what it returned (new parameters, state, info)."""

    def spied(*args, **kwargs):
        opt = make_optimizer(*args, **kwargs)

        def step(params, state, batch):
            out = opt.step(params, state, batch)
            record(params, out)
            return out

        return SimpleNamespace(init=opt.init, step=step)

    monkeypatch.setattr(runner, "make_optimizer", spied)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_float32_run_computes_in_float32(framework, monkeypatch):
    """dtype float32 is what the steps compute in (the parameters each step sees, its loss), not a
    label: its first loss is the float64 run's to float32 round-off, not closer, not further."""
    seen = []

    def dtypes(params, out):  # of the parameters a step is handed, its loss and its new parameters
        arrays = [*params.values(), out[2]["loss"], *out[0].values()]
        seen.append({str(v.dtype).removeprefix("torch.") for v in arrays})

    spy_on_steps(monkeypatch, dtypes)
    kwargs = dict(hyperparameters={"lr": 0.05}, steps=2, seed=1, eval_every=2, progress=False)
    single = runner.run("digits-mlp", "sgd", framework, dtype="float32", **kwargs)
    assert seen and all(dtypes == {"float32"} for dtypes in seen), seen
    double = runner.run("digits-mlp", "sgd", framework, dtype="float64", **kwargs)
    gap = abs(single["loss"].iloc[0] / double["loss"].iloc[0] - 1)
    assert 1e-10 < gap < 1e-4, gap


def test_train_loss_is_measured_every_eval_every_steps_and_at_the_last(monkeypatch):
    """Runs evaluate every eval_every steps and at the last step, whatever eval_every: 7 steps at
    eval_every 5 measure steps 0, 5 and 7, and row 7 is the full-train loss at the final parameters
    (those the extra step at k == steps is handed), against the dense reference."""
    seen = []
    spy_on_steps(monkeypatch, lambda params, out: seen.append(_numpy(params)))
    frame = runner.run("digits-mlp", "sgd", "torch", hyperparameters={"lr": 0.05}, steps=7, eval_every=5, seed=1,
                       progress=False)
    assert frame["step"].tolist() == list(range(8))
    assert frame.loc[frame["train_loss"].notna(), "step"].tolist() == [0, 5, 7]
    task = TASKS["digits-mlp"]
    x, y = task.load(1).train
    final = seen[-1]  # the last step call measures the final parameters (and is discarded)
    assert frame["train_loss"].iloc[7] == pytest.approx(ref.loss(task.problem, final, x, y), rel=1e-10, abs=0)
    assert frame["train_loss"].iloc[7] != pytest.approx(frame["train_loss"].iloc[5], rel=1e-6)  # the params moved


class _Clock:
    """A stand-in for the time module: perf_counter moves only when a test moves it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _clock_charging_steps(monkeypatch) -> _Clock:
    """The runner's clock, a stand-in on which the first step call ever (compilation, first-call costs)
    takes 100 and every other step call 1."""
    clock, calls = _Clock(), []
    monkeypatch.setattr(runner, "time", clock)

    def step_cost(params, out):
        clock.now += 1.0 if calls else 100.0
        calls.append(None)

    spy_on_steps(monkeypatch, step_cost)
    return clock


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_time_s_is_the_synchronised_steps_alone_on_a_stand_in_clock(framework, monkeypatch):
    """DESIGN 4: time is the wall-clock of the step alone, after warm-up/compilation, synchronised on
    the device. On a clock that moves only when told (the first step call ever, compilation, costs 100,
    every other 1; waiting for the device at a sync 0.5; an evaluation or a cosine 1000), time_s must
    be 1.5 k exactly: cumulative, the warm-up, evaluations and cosines outside, the wait at the sync
    inside, and step_s its last value (the extra step at k == steps is not a step of the run); eval_s
    holds the evaluations and the cosines (scripts/run_overhead.py splits the loop's time by it)."""
    from natgrad_impls.names import Framework

    clock = _clock_charging_steps(monkeypatch)

    class Charged(runner._IO[Framework(framework)]):
        def sync(self, tree):
            super().sync(tree)
            clock.now += 0.5

        def evaluate(self, *args):
            clock.now += 1000.0
            return super().evaluate(*args)

        def cosine(self, *args):
            clock.now += 1000.0
            return super().cosine(*args)

    monkeypatch.setitem(runner._IO, Framework(framework), Charged)
    frame = runner.run("digits-mlp", "sgd", framework, hyperparameters={"lr": 0.05}, steps=5, eval_every=2,
                       cos_ef_ngd=True, cos_damping=0.1, progress=False)
    assert frame["time_s"].tolist() == [1.5 * k for k in range(6)]
    assert frame.attrs["step_s"] == 7.5
    assert frame.attrs["eval_s"] == (8 + 6) * 1000.0  # train and test at steps 0, 2, 4 and 5; a cosine at each


def test_numpy_runs_are_timed_after_a_warm_up_too(monkeypatch):
    """numpy's first step pays first-call costs (3-9 steps' time on breastcancer) as torch's and jax's do,
    so it is warmed up like them: on a clock where the first step call ever costs 100 and every other 1,
    time_s counts 1 a step."""
    clock = _clock_charging_steps(monkeypatch)
    frame = runner.run("wine", "sgd", "numpy", hyperparameters={"lr": 1e-6}, steps=3, progress=False)
    assert frame["time_s"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_evaluations_are_the_whole_splits_at_theta_k_chunk_by_chunk(framework, monkeypatch):
    """train_* and test_* are the loss and accuracy of the whole training and test splits at theta_k
    (the parameters step k is handed), against the dense reference's loss and torch.nn's argmax.
    EVAL_CHUNK 500 cuts the 1437 training examples into three chunks (jax pads and masks the last)
    and leaves the 360 test examples one, so that both ways through the evaluation are checked."""
    monkeypatch.setattr(runner, "EVAL_CHUNK", 500)
    seen = []
    spy_on_steps(monkeypatch, lambda params, out: seen.append(_numpy(params)))
    frame = runner.run("digits-mlp", "sgd", framework, hyperparameters={"lr": 0.1}, steps=3, eval_every=2, seed=1,
                       progress=False)
    task = TASKS["digits-mlp"]
    splits = dict(zip(("train", "test"), task.load(1)))
    for k in (0, 2, 3):
        theta = seen[2 + k]  # after the two warm-up calls
        net = ref.torch_nn(task.problem.model, theta)
        for name, (x, y) in splits.items():
            with torch.no_grad():
                accuracy = float(np.mean(net(torch.as_tensor(x)).argmax(1).numpy() == y))
            expected = ref.loss(task.problem, theta, x, y)
            assert frame[f"{name}_loss"].iloc[k] == pytest.approx(expected, rel=1e-10), (k, name)
            assert frame[f"{name}_accuracy"].iloc[k] == accuracy, (k, name)


def _logistic_task_with_a_test_split():
    """Logistic regression with a bias parameter and a test split: accuracy on a single Bernoulli output."""
    from natgrad_impls.tasks import Dataset, Split, Task

    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(200, 3)), rng.normal(size=(100, 3))
    y, y_test = (rng.integers(0, 2, size=(n, 1)).astype(np.float64) for n in (200, 100))
    data = Dataset(Split(x, y), Split(x_test, y_test))
    problem = models.Problem(models.linear(3, 1, bias=True), "bernoulli")
    return Task("logistic-split", problem, True, "test", 200, None, 10, lambda seed: data)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_bernoulli_accuracy_is_the_sign_of_the_logit(framework, monkeypatch):
    """One Bernoulli output predicts class 1 where its logit x w + b is > 0 (the mean above 1/2), not
    where the logit is above 1/2; numpy's path appends the input's 1 last, where the bias sits in
    the parameter vector. Against the closed form at the parameters each step is handed."""
    seen = []
    spy_on_steps(monkeypatch, lambda params, out: seen.append(_numpy(params)))
    task = _logistic_task_with_a_test_split()
    frame = runner.run(task, "sgd", framework, hyperparameters={"lr": 1.0}, steps=2, seed=2, init="glorot",
                       eval_every=1, progress=False)
    thetas = seen[-3:]  # steps 0, 1 and 2 (the last call measures the final parameters)
    assert thetas[-1]["dense0.bias"][0] != 0  # the bias has moved from its Glorot 0, so it counts
    for name, (x, y) in zip(("train", "test"), task.load(2)):
        expected = [np.mean((x @ t["dense0.weight"].T + t["dense0.bias"] > 0) == (y == 1)) for t in thetas]
        np.testing.assert_allclose(frame[f"{name}_accuracy"], expected, rtol=0, atol=1e-15, err_msg=name)
    # from theta0 = 0, the convex tasks' start, every logit is exactly 0: not > 0, so class 0 everywhere
    start = runner.run(task, "sgd", framework, hyperparameters={"lr": 0.0}, steps=0, progress=False)
    for name, (x, y) in zip(("train", "test"), task.load(0)):
        assert start[f"{name}_accuracy"].iloc[0] == np.mean(y == 0), name


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_a_mini_batched_convex_run_is_evaluated_on_its_whole_objective(framework):
    """vecfield in mini-batches of 100 has no test split, yet it is evaluated (on the full training set)
    as every mini-batch run is, and train_loss is the objective: the mean NLL plus the prior's
    l2/2 |theta|^2, against the dense reference. lr 0 from a Glorot start (not 0: the prior counts)."""
    task, seed = TASKS["vecfield"], 2
    frame = runner.run(task, "sgd", framework, hyperparameters={"lr": 0.0}, steps=2, batch_size=100, seed=seed,
                       init="glorot", eval_every=1, progress=False)
    x, y = task.load(seed).train
    theta = models.init_params(task.problem.model, seed, "glorot")
    np.testing.assert_allclose(frame["train_loss"], ref.loss(task.problem, theta, x, y), rtol=1e-12)
    assert "test_loss" not in frame


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_float32_ngd_directions_hold_at_small_dampings_on_networks(framework):
    """The exact Fisher's gradient lies in its factor's span, so its NGD direction (a step's, and the
    cosine's) is solved for by push-through, which float32 keeps at any damping: the cosines at 1e-8
    on digits-mlp's Glorot start agree with float64's to 1e-4 (Woodbury's correction, which divides
    float32's round-off by the damping, was 0.03 to 0.05 off: the size of the cosines themselves)."""
    cosines = {}
    for dtype in ("float32", "float64"):
        frame = runner.run("digits-mlp", "ngd", framework, dtype=dtype, hyperparameters={"lr": 0.0, "damping": 1e-8},
                           steps=0, cos_ef_ngd=True, cos_damping=1e-8, progress=False)
        cosines[dtype] = frame[list(runner.COSINES)].iloc[0].to_numpy()
    np.testing.assert_allclose(cosines["float32"], cosines["float64"], rtol=0, atol=1e-4)
    assert (cosines["float64"] < 0.1).all()  # (NGD's direction far from EF's and the gradient's)


def test_float32_wide_batches_below_their_damping_floor_are_refused_on_networks_only():
    """Where a batch gives the curvature factor half as many columns as the network has parameters or
    more, float32 loses ef's and ngd's directions at small dampings (Woodbury's kernel nears
    singular; from D columns the solve is dense: 150% off float64 at 1e-8): refused below
    runner.FLOAT32_WIDE_BATCH_MIN_DAMPING, for the step and the cosine, naming the field, with the EF's
    damping alone (l2 is not part of it); float64, a narrower batch, kfac and a convex task run."""
    from natgrad_impls.tasks import Task

    digits = dict(task="digits-mlp", framework="torch", dtype="float32")  # 9610 parameters, 9 classes - 1
    small = Task("mlp-4-3-3", models.Problem(models.mlp((4, 3, 3), "tanh"), "categorical", l2=1e-3), True, "test",
                 40, None, 10, lambda seed: None)  # 27 parameters, full batch: the EF's 40 columns
    refused = [("ngd", {"damping": 1e-6}, 534, None, "damping: 1e-06 is below 0.0001.*exact curvature 4806 columns"),
               ("ngd", {"damping": 1e-5, "fisher": "mc", "samples": 9}, 534, None, "mc curvature 4806 columns"),
               ("kfac", {"damping": 1e-3}, 534, 1e-6, "cos_damping: 1e-06 .*exact curvature 4806"),
               ("ef", {"damping": 1e-5}, None, None, "damping: 1e-05 .*empirical curvature 40 columns, at least "
                                                     "half of mlp-4-3-3's 27 parameters")]
    for optimizer, h, batch_size, cos_damping, message in refused:
        task = small if optimizer == "ef" else digits["task"]
        spec = runner.resolve(optimizer=optimizer, hyperparameters={"lr": 0.1, **h}, **{**digits, "task": task})
        with pytest.raises(ValueError, match=message):
            runner.check_float32_wide_batches(spec, batch_size, cos_damping)
    accepted = [("ngd", {"damping": 1e-8}, 533, "float32", None), ("ngd", {"damping": 1e-4}, 534, "float32", None),
                ("ngd", {"damping": 1e-8}, 1068, "float64", None), ("kfac", {"damping": 1e-8}, 1068, "float32", None),
                ("ef", {"damping": 1e-8}, 128, "float32", 1e-8)]
    for optimizer, h, batch_size, dtype, cos_damping in accepted:
        spec = runner.resolve(optimizer=optimizer, hyperparameters={"lr": 0.1, **h}, **{**digits, "dtype": dtype})
        runner.check_float32_wide_batches(spec, batch_size, cos_damping)
    wine = runner.resolve("wine", "ngd", "torch", dtype="float32", hyperparameters={"lr": 0.1, "damping": 1e-10})
    runner.check_float32_wide_batches(wine, None)  # (convex: D small, C invertible by its data)
    with pytest.raises(ValueError, match="^damping: 1e-06 is below"):  # and run checks before any step
        runner.run("digits-mlp", "ngd", "torch", dtype="float32", hyperparameters={"lr": 0.1, "damping": 1e-6},
                   batch_size=534, steps=1, progress=False)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_cos_ef_ngd_is_on_the_steps_batch_with_cos_damping(framework):
    """Row k's cosine is measured on the k-th mini-batch (the one step k sees), not the whole training
    set, and with cos_damping where one is given, not the run's damping. lr 0 keeps theta at its
    Glorot start, so the rows differ by their batches alone; against the dense reference (F with the
    prior's l2, the EF without) on the documented batch rows."""
    task, seed, damping = TASKS["vecfield"], 2, 0.1
    frame = runner.run(task, "ef", framework, hyperparameters={"lr": 0.0, "damping": 1e-6}, steps=3, batch_size=100,
                       seed=seed, init="glorot", cos_ef_ngd=True, cos_damping=damping, eval_every=3, progress=False)
    x, y = task.load(seed).train
    theta = models.init_params(task.problem.model, seed, "glorot")
    for k, rows in enumerate(_batch_rows(len(x), 100, seed, 4)):
        for column, value in ref.cosines(task.problem, theta, x[rows], y[rows], damping).items():
            assert frame[column].iloc[k] == pytest.approx(value, rel=1e-8, abs=0), (column, k)


@pytest.mark.parametrize("task, framework", [("wine", "numpy"), ("wine", "torch"), ("wine", "jax"),
                                             ("digits-mlp", "torch"), ("digits-mlp", "jax")])
def test_held_cosines_are_those_of_their_own_steps(task, framework, monkeypatch):
    """The cosines wait for an evaluation, or for COSINES_HELD steps (wine has no evaluations), with
    each step's parameters and batch: as moving runs (lr > 0), they equal cosines computed at once."""
    kwargs = dict(hyperparameters={"lr": 1e-3 if task == "wine" else 0.1, "damping": 1.0}, steps=150,
                  eval_every=50, dtype="float64", cos_ef_ngd=True, cos_damping=1e-2, progress=False)
    held = runner.run(task, "ef", framework, **kwargs)
    monkeypatch.setattr(runner, "COSINES_HELD", 1)
    at_once = runner.run(task, "ef", framework, **kwargs)
    assert held["loss"].iloc[-1] < 0.9 * held["loss"].iloc[0] and held["cos_ef_ngd"].nunique() > 100
    pd.testing.assert_frame_equal(held[list(runner.COSINES)], at_once[list(runner.COSINES)], rtol=1e-12)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_network_cosines_match_the_dense_reference(framework):
    """On an MLP the cosines come from the steps' own solves and each layer's flattened gradient: both
    columns against dense EF and Fisher matrices, on the first batch at the Glorot start (lr 0). At a
    small damping the NGD step is far from the gradient (cos_ngd_grad well below 1); at a damping that
    swamps both curvatures, both steps are gradient steps and both cosines are 1."""
    from natgrad_impls.tasks import Dataset, Split, Task

    rng = np.random.default_rng(0)
    data = Dataset(Split(rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)), None)
    problem = models.Problem(models.mlp((5, 6, 3), "tanh"), "categorical")
    task = Task("mlp-cosines", problem, True, "test", 40, 10, 10, lambda seed: data)
    theta = models.init_params(problem.model, 1, "glorot")
    rows = _batch_rows(40, 10, 1, 1)[0]
    for damping, low in ((1e-3, True), (1e6, False)):
        frame = runner.run(task, "ef", framework, hyperparameters={"lr": 0.0, "damping": 1e-3}, steps=0, seed=1,
                           cos_ef_ngd=True, cos_damping=damping, progress=False)
        expected = ref.cosines(problem, theta, data.train.X[rows], data.train.y[rows], damping)
        for column, value in expected.items():
            assert frame[column].iloc[0] == pytest.approx(value, rel=1e-8, abs=0), (column, damping)
        assert (expected["cos_ngd_grad"] < 0.9) == low and (expected["cos_ef_ngd"] > 1 - 1e-9) != low, expected


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_grad_norm_is_that_of_the_steps_batch_gradient_at_theta_k(framework, monkeypatch):
    """grad_norm at row k is |grad L(theta_k)| on the k-th mini-batch, against the dense reference at
    the parameters step k is handed. jax brings several steps' scalars to the host at once; each must
    land on its own row."""
    seen = []
    spy_on_steps(monkeypatch, lambda params, out: seen.append(_numpy(params)))
    task, seed, steps = TASKS["digits-mlp"], 1, 4
    frame = runner.run(task, "sgd", framework, hyperparameters={"lr": 0.1}, steps=steps, seed=seed, eval_every=steps,
                       progress=False)
    x, y = task.load(seed).train
    for k, rows in enumerate(_batch_rows(len(x), task.batch_size, seed, steps + 1)):
        g = ref.loss_gradient(task.problem, seen[2 + k], x[rows], y[rows])  # after the two warm-up calls
        assert frame["grad_norm"].iloc[k] == pytest.approx(np.linalg.norm(g), rel=1e-10), k


def test_a_run_records_its_seed_and_batch_size_and_starts_from_that_seeds_parameters():
    """The seed draws the initial parameters as well as the batch order: row 0's full-train loss is
    that of init_params(seed) (a run that drew them from seed 0 would still see other batches under
    another seed, which is all the batch-order test can tell), and the row records the seed and the
    batch size asked for, not 0 and the task's 128."""
    task, seed = TASKS["digits-mlp"], 3
    frame = runner.run(task, "sgd", "torch", hyperparameters={"lr": 0.1}, steps=0, batch_size=64, seed=seed,
                       progress=False)
    x, y = task.load(seed).train
    theta = models.init_params(task.problem.model, seed, "glorot")
    (rows,) = _batch_rows(len(x), 64, seed, 1)
    assert frame["train_loss"].iloc[0] == pytest.approx(ref.loss(task.problem, theta, x, y), rel=1e-12)
    assert frame["loss"].iloc[0] == pytest.approx(ref.loss(task.problem, theta, x[rows], y[rows]), rel=1e-12)
    assert frame[["seed", "batch_size"]].values.tolist() == [[seed, 64]]


def test_a_misspec_run_records_its_variant():
    """misspec is six data sets under one task name: a run's rows say which (the misspec figure and
    table group by it), and a task without variants has no such column."""
    frame = runner.run("misspec", "sgd", "numpy", hyperparameters={"lr": 0.1}, steps=1, variant="linear-misspecified-b",
                       progress=False)
    assert frame["variant"].tolist() == ["linear-misspecified-b"] * 2
    assert "variant" not in runner.run("wine", "sgd", "numpy", hyperparameters={"lr": 1e-6}, steps=1, progress=False)


def test_an_optimizer_without_a_numpy_reference_is_named(monkeypatch):
    """Its hyperparameters' names come from the numpy signature: without one, a ValueError says so
    (not a KeyError from inside the runner)."""
    from natgrad_impls.numpy import OPTIMIZERS

    monkeypatch.delitem(OPTIMIZERS, Optimizer.KFAC)
    with pytest.raises(ValueError, match=r"^optimizer: 'kfac' has no numpy reference"):
        runner.accepted("kfac")
