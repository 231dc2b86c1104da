"""`natgrad grid` (natgrad_impls.grid): the vectorised grid gives the numbers of a plain loop of
`natgrad run` calls (to 1e-10 relative in float64, runs that are not chaotic), in numpy, torch and
jax; diverged runs are recorded up to their divergence and masked out; best runs are checked for
chaos as DESIGN 4 defines it."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import overflowing_task, singular_task
from natgrad_impls import cli, grid, hyperparameters, models, results, runner
from natgrad_impls.names import Optimizer
from natgrad_impls.tasks import get_task

LRS, DAMPINGS, STEPS = "-3:0:4", "-4:0:3", 20
ALL = ",".join(o.value for o in Optimizer)  # every optimizer the library has
# Points compared per optimizer and task: all of them in numpy, a sample in torch and jax (jax
# compiles every run's step, about a second each).
SAMPLE = {"numpy": None, "torch": 3, "jax": 1}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These problems are tiny: torch's intra-op threads only add synchronisation (and stall on a
    loaded machine). Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clip_options(logit_clip):
    return [] if logit_clip is None else ["--logit-clip", logit_clip]


def _grid(tmp_path, task, framework, optimizers=ALL, lrs=LRS, dampings=DAMPINGS, steps=STEPS, repeats=0,
          logit_clip=None, options=()):
    out = tmp_path / f"grid-{task}-{framework}.parquet"
    status = cli.main(["grid", "--task", task, "--optimizers", optimizers, "--framework", framework, f"--lrs={lrs}",
                       f"--dampings={dampings}", "--steps", str(steps), "--repeats", str(repeats), "--out", str(out),
                       *_clip_options(logit_clip), *options])
    assert status == 0
    return results.read(out)


def _run(tmp_path, task, framework, optimizer, lr, damping, steps=STEPS, logit_clip=None, options=()):
    out = tmp_path / f"run-{task}-{framework}-{optimizer}-{lr:g}-{damping:g}.parquet"
    argv = ["run", "--task", task, "--optimizer", optimizer, "--framework", framework, "--lr", repr(float(lr)),
            "--steps", str(steps), "--out", str(out), *_clip_options(logit_clip), *options]
    if not math.isnan(damping):
        argv += ["--damping", repr(float(damping))]
    assert cli.main(argv) == 0
    return results.read(out)


def _sensitivity(task, optimizer, lr, damping, steps=STEPS, repeats=3, logit_clip=None, fisher=None) -> float:
    """How far runs from theta0 + 1e-14 noise move the recorded losses (max relative change over
    the steps; inf when they stop at another step): a property of the dynamics, measured with the
    numpy grid. Above 1e-8 the run is chaotic (DESIGN 4)."""
    t = runner.resolve_task(task, logit_clip=logit_clip)
    x, y = t.load().train
    hp = {"lr": 1.0, **({} if math.isnan(damping) else {"damping": 1.0})}
    if fisher is not None and optimizer in ("ngd", "kfac"):
        hp["fisher"] = fisher
    h = runner.make_hyperparameters(optimizer, hp)
    theta0 = np.vstack([np.zeros(x.shape[1]),
                        1e-14 * np.random.default_rng(1).standard_normal((repeats, x.shape[1]))])
    runs = grid.trajectories(t.problem, x, y, optimizer, h, np.full(repeats + 1, lr), np.full(repeats + 1, damping),
                             steps, theta0=theta0, progress=False)
    if len(set(runs.last)) > 1:
        return math.inf
    with np.errstate(invalid="ignore"):
        moved = np.abs(runs.loss - runs.loss[0]) / np.abs(runs.loss[0])
    return float(np.nanmax(moved)) if np.isfinite(runs.loss).any() else 0.0


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_runs_whose_fisher_weights_stop_changing_reuse_their_matrices_and_equal_the_loop(framework):
    """numpy's and torch's grids form a run's Fisher matrix again only where its weights changed
    since the step before: at large lrs the paper clip saturates every logit, so some runs of a chunk
    keep their weights while others move, and each must still equal its own `natgrad run` (a reused
    matrix written to the wrong run, or not refreshed, is off by O(1)). The loop's clip is exact at
    logits of 1e12 and more, as the grid's is."""
    lrs, dampings, steps = (-2, 8, 11), (-10, 0, 6), 30
    frame = grid.run_grid("breastcancer", ["ngd"], framework, lrs=lrs, dampings=dampings, steps=steps, repeats=0,
                          progress=False).frame
    compared = 0
    for (lr, damping), mine in frame.groupby(["lr", "damping"]):
        loop = runner.run("breastcancer", "ngd", framework, hyperparameters={"lr": lr, "damping": damping},
                          steps=steps, progress=False)
        assert len(mine) == len(loop), (lr, damping)
        np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=1e-8, err_msg=f"lr {lr} damping {damping}")
        compared += 1
    assert compared == lrs[2] * dampings[2]


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("task,logit_clip", [("wine", None), ("breastcancer", None), ("breastcancer", "none")])
def test_grid_equals_a_loop_of_runs(tmp_path, task, logit_clip, framework):
    """Runs that are not chaotic agree to 1e-10 relative at every step. A few are sensitive without
    being chaotic (a 1e-14 change of theta0 moves them by 1e-10..1e-8, e.g. ef at lr 1, damping
    1e-4, which turns chaotic after 20 steps): they must agree to within 100 x that sensitivity,
    since the round-off of two ways of forming the same matrix is such a perturbation, and a large
    one when the solve is ill-conditioned. breastcancer runs with the paper code's logit clip (its
    default) and with the exact likelihood, whose large steps diverge."""
    frame = _grid(tmp_path, task, framework, logit_clip=logit_clip)
    strict = sensitive = chaotic = diverged = 0
    for optimizer, runs in frame.groupby("optimizer", observed=True):
        points = runs[["lr", "damping"]].drop_duplicates().to_numpy()
        if SAMPLE[framework]:
            points = points[np.linspace(0, len(points) - 1, SAMPLE[framework] + 2)[1:-1].round().astype(int)]
        for lr, damping in points:
            same_damping = (runs["damping"] == damping) | (np.isnan(damping) & runs["damping"].isna())
            mine = runs[(runs["lr"] == lr) & same_damping]
            loop = _run(tmp_path, task, framework, optimizer, lr, damping, logit_clip=logit_clip)
            assert len(mine) == len(loop), (optimizer, lr, damping)
            assert mine["diverged"].tolist() == loop["diverged"].tolist()
            diverged += bool(loop["diverged"].iloc[0])
            spread = _sensitivity(task, optimizer, lr, damping, logit_clip=logit_clip)
            if spread > 1e-8:
                chaotic += 1
                continue
            tolerance = 1e-10 if spread <= 1e-10 else 100 * spread
            strict += tolerance == 1e-10
            sensitive += tolerance > 1e-10
            np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=tolerance, err_msg=f"{optimizer} {lr} {damping}")
            # gradients shrink to round-off at convergence: compare them relative to the first one
            np.testing.assert_allclose(mine["grad_norm"], loop["grad_norm"], rtol=max(1e-7, tolerance),
                                       atol=1e-10 * loop["grad_norm"].iloc[0])
    assert strict >= {"numpy": 30, "torch": 8, "jax": 3}[framework], (strict, sensitive, chaotic)
    if task == "wine" or logit_clip == "none":
        assert diverged > 0  # the comparison covers masked runs too (clipping keeps breastcancer's bounded)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("task,logit_clip", [("wine", None), ("breastcancer", None), ("breastcancer", "none")])
def test_torch_and_jax_grids_equal_the_numpy_grid_at_every_point(tmp_path, task, logit_clip, framework):
    """The loop comparison above samples torch's and jax's points (a run each is slow); grid against
    grid covers every point of every optimizer, at the tolerances of the loop comparison. The Fisher
    is exact: each framework draws its own MC labels (K-FAC's default)."""
    keys = ["optimizer", "lr", "damping", "step"]
    numpy, mine = (_grid(tmp_path, task, f, logit_clip=logit_clip, options=("--fisher", "exact"))
                   .set_index(keys).sort_index() for f in ("numpy", framework))
    assert mine.index.equals(numpy.index) and (mine["diverged"] == numpy["diverged"]).all()
    compared = 0
    for (optimizer, lr, damping), runs in numpy.groupby(keys[:3], observed=True, dropna=False):
        spread = _sensitivity(task, optimizer, lr, damping, logit_clip=logit_clip, fisher="exact")
        if spread > 1e-8:
            continue  # chaotic: no two implementations agree
        np.testing.assert_allclose(mine.loc[runs.index, "loss"], runs["loss"], rtol=max(1e-10, 100 * spread),
                                   err_msg=f"{optimizer} {lr} {damping}")
        compared += 1
    assert compared >= 40, compared  # of 5 optimizers' 12 (sgd, adam: 4) points


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_grid_with_momentum_equals_a_loop_of_runs(tmp_path, framework):
    """sgd with momentum 0.9: the grid's heavy ball (no dampening, as torch.optim.SGD, to which the
    runner's sgd is tied) gives `natgrad run`'s numbers, on runs that converge and runs that
    diverge. The comparison above runs sgd without momentum only."""
    momentum = ["--momentum", "0.9"]
    frame = _grid(tmp_path, "wine", framework, optimizers="sgd", lrs="-7:-4:4", options=momentum)
    assert (frame["momentum"] == 0.9).all()
    diverged = 0
    for lr, mine in frame.groupby("lr"):
        loop = _run(tmp_path, "wine", framework, "sgd", lr, math.nan, options=momentum)
        assert (loop["momentum"] == 0.9).all()
        assert len(mine) == len(loop) and mine["diverged"].tolist() == loop["diverged"].tolist(), lr
        diverged += bool(loop["diverged"].iloc[0])
        np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=1e-10, err_msg=f"sgd momentum 0.9, lr {lr}")
    assert 0 < diverged < 4  # both kinds of run are compared


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_monte_carlo_fisher_draws_are_the_frameworks_own(tmp_path, framework, samples):
    """ngd with fisher=mc: the grid draws each step's labels as the framework's ngd does (from the
    seed and the step alone, `samples` of them per input), so a grid run equals `natgrad run` (and
    another seed does not). Several samples too: one sample would pass for any `samples`."""
    out = tmp_path / "grid.parquet"
    argv = ["grid", "--task", "breastcancer", "--optimizers", "ngd", "--framework", framework, "--fisher", "mc",
            "--samples", str(samples), "--lrs=-1:0:2", "--dampings=-2:-2:1", "--steps", "10", "--repeats", "0",
            "--out", str(out)]
    assert cli.main(argv) == 0
    frame = results.read(out)
    assert (frame["samples"] == samples).all()
    for seed in (0, 1):
        run = tmp_path / f"run{seed}.parquet"
        assert cli.main(["run", "--task", "breastcancer", "--optimizer", "ngd", "--framework", framework, "--fisher",
                         "mc", "--samples", str(samples), "--lr", "1.0", "--damping", "0.01", "--steps", "10",
                         "--seed", str(seed), "--out", str(run)]) == 0
        mine = frame[frame["lr"] == 1.0]["loss"].to_numpy()
        theirs = results.read(run)["loss"].to_numpy()
        if seed == 0:
            np.testing.assert_allclose(mine, theirs, rtol=1e-10, err_msg=f"{samples} samples")
        else:
            assert not np.allclose(mine[1:], theirs[1:], rtol=1e-6)


@pytest.mark.parametrize("framework, optimizer", [("torch", "ngd"), ("jax", "ngd"), ("torch", "kfac")])
def test_a_failed_solve_diverges_at_the_step_natgrad_run_says(framework, optimizer):
    """A singular matrix (two equal inputs; a damping of 1e-300 is lost to round-off) gives a NaN
    step in the grid as in `natgrad run`: step 0's loss, then NaN. Not numpy's grid, whose batched
    matrix is formed with other round-off, nor jax's K-FAC, whose Cholesky factor of the singular
    A: both come out barely regular, and the runs converge."""
    task, setting = singular_task(), {"lr": 1.0, "damping": 1e-300}
    frame = grid.run_grid(task, [optimizer], framework, lrs=(0, 0, 1), dampings=(-300, -300, 1), steps=5, repeats=0,
                          progress=False).frame
    run = runner.run(task, optimizer, framework, hyperparameters=setting, steps=5, progress=False)
    assert frame["diverged"].all() and run["diverged"].all()
    np.testing.assert_array_equal(frame["loss"], run["loss"])  # equal NaNs too
    assert len(frame) == 2 and math.isnan(frame["loss"].iloc[1])


def test_a_chaotic_best_run_prints_bounds_that_differ():
    """A spread of 3.5e-7 relative: six significant digits would print the two bounds alike."""
    best = grid.Best("sgd", 1e-3, math.nan, 7.709684, 20, False, np.array([7.709684 + 2.7e-6, 7.709684 - 0.1e-6]),
                     True, 3.6e-7)
    low, high = re.search(r"end between (\S+) and (\S+) ", best.describe()).groups()
    assert low != high and float(low) == pytest.approx(7.709684 - 0.1e-6, rel=1e-9)
    # the bounds span the best run's own loss too (1, below both repeats), as the spread does
    best = grid.Best("ef", 0.1, 1e-10, 1.0, 100, False, np.array([1.5, 1.25]), True, 0.5)
    bounds = re.search(r"end between (\S+) and (\S+) ", best.describe()).groups()
    assert tuple(map(float, bounds)) == (1.0, 1.5)


def test_a_grid_whose_best_setting_is_among_nan_runs_picks_the_finite_one():
    """NGD on an exactly singular Z^T Z: damping 1e-300 ends in NaN, damping 1 at a finite loss. The
    best is the finite run, neither a NaN nor no best at all."""
    result = grid.run_grid(singular_task(), ["ngd"], "torch", lrs=(0, 0, 1), dampings=(-300, 0, 2), steps=5,
                           repeats=0, progress=False)
    ends = result.frame.groupby("damping")["loss"].agg(lambda loss: loss.iloc[-1])
    assert ends.isna().to_dict() == {1e-300: True, 1.0: False}
    [best] = result.best
    assert best.damping == 1.0 and math.isfinite(best.loss) and not best.diverged
    assert set(result.frame.loc[result.frame["best"], "damping"]) == {1.0}


def test_a_grid_stopped_part_way_resumes_at_its_next_optimizer(tmp_path, monkeypatch):
    """With checkpoints, each optimizer's finished grid is kept: a grid stopped after its first
    optimizer computes only the others when run again, and gives the same rows and bests as one
    uninterrupted grid; another setting (more steps) reuses nothing."""
    kwargs = dict(lrs=(-2, 0, 3), dampings=(-2, 0, 2), steps=10, repeats=2, progress=False)
    whole = grid.run_grid("breastcancer", ["sgd", "ef"], **kwargs)
    computed, real = [], grid._optimizer_grid

    def counting(task, train, optimizer, *args):
        computed.append(optimizer.value)
        return real(task, train, optimizer, *args)

    def stop(optimizer, best, seconds):
        raise KeyboardInterrupt  # stopped once the first optimizer is done

    monkeypatch.setattr(grid, "_optimizer_grid", counting)
    folder = tmp_path / ".grid.runs"
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid("breastcancer", ["sgd", "ef"], checkpoints=folder, on_done=stop, **kwargs)
    resumed = grid.run_grid("breastcancer", ["sgd", "ef"], checkpoints=folder, **kwargs)
    assert computed == ["sgd", "ef"]  # sgd once, before the stop; ef after it
    assert [o.value for o in resumed.resumed] == ["sgd"] and whole.resumed == ()  # what the CLI's last line names
    measured = [c for c in whole.frame.columns if c != "time_s"]
    pd.testing.assert_frame_equal(resumed.frame[measured], whole.frame[measured])
    assert [b.describe() for b in resumed.best] == [b.describe() for b in whole.best]
    grid.run_grid("breastcancer", ["sgd"], checkpoints=folder, **{**kwargs, "steps": 11})
    assert computed == ["sgd", "ef", "sgd"]


def test_the_cli_says_which_optimizers_it_kept_from_an_interrupted_run(tmp_path, capsys, monkeypatch):
    """Stopped, it says in one line what it kept; resumed, its last line names what it read back,
    since its timing covers only what this process computed."""
    folder = tmp_path / ".grid.runs"
    args = ["grid", "--task", "wine", "--optimizers", "sgd,adam", "--lrs=-3:-2:2", "--steps", "3", "--repeats", "0",
            "--no-progress", "--checkpoints", str(folder), "--out", str(tmp_path / "grid.parquet")]
    real = grid._optimizer_grid

    def stopped_at(name):
        def grid_until(task, train, optimizer, *rest):
            if optimizer.value == name:
                raise KeyboardInterrupt
            return real(task, train, optimizer, *rest)
        return grid_until

    monkeypatch.setattr(grid, "_optimizer_grid", stopped_at("sgd"))
    assert cli.main(args) == 130  # Ctrl-C: one line, not a traceback
    assert capsys.readouterr().err == "natgrad: stopped; nothing was written\n"
    monkeypatch.setattr(grid, "_optimizer_grid", stopped_at("adam"))
    assert cli.main(args) == 130
    resumes = f"natgrad: stopped; 1 finished optimizer kept in {folder}, where the same command resumes\n"
    assert capsys.readouterr().err == resumes
    monkeypatch.setattr(grid, "_optimizer_grid", real)
    assert cli.main(args) == 0
    assert "(numpy, sgd kept from an interrupted run); wrote" in capsys.readouterr().out.splitlines()[-1]
    assert cli.main(args) == 0  # the finished grid cleared its pieces: all computed again
    assert "(numpy); wrote" in capsys.readouterr().out.splitlines()[-1]


def test_the_cli_removes_its_checkpoints_once_the_grid_is_written(tmp_path):
    out, folder = tmp_path / "grid.parquet", tmp_path / ".grid.runs"
    assert cli.main(["grid", "--task", "wine", "--optimizers", "sgd", "--lrs=-3:-2:2", "--steps", "3", "--repeats", "0",
                     "--no-progress", "--checkpoints", str(folder), "--out", str(out)]) == 0
    assert out.exists() and not folder.exists()
    # a folder of the user's own: the grid's pieces go, the rest (and the folder) stays
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert cli.main(["grid", "--task", "wine", "--optimizers", "sgd,adam", "--lrs=-3:-2:2", "--steps", "3",
                     "--repeats", "0", "--no-progress", "--checkpoints", str(folder), "--out", str(out)]) == 0
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_chaotic_best_runs_are_flagged(tmp_path):
    """DESIGN 4: ef at breastcancer's lr 0.1, damping 1e-10 moves by tens of percent under a 1e-14
    perturbation of theta0; ngd there does not."""
    result = grid.run_grid("breastcancer", ["ef", "ngd"], lrs=(-1, -1, 1), dampings=(-10, -10, 1), progress=False)
    best = {b.optimizer: b for b in result.best}
    assert best["ef"].chaotic and best["ef"].spread > 1e-3
    assert not best["ngd"].chaotic and best["ngd"].spread < 1e-8
    assert "CHAOTIC" in best["ef"].describe() and "not chaotic" in best["ngd"].describe()
    repeats = result.frame[(result.frame["repeat"] > 0)]
    assert sorted(repeats["repeat"].unique()) == [1, 2, 3, 4, 5]
    assert repeats["best"].all() and (repeats.groupby("optimizer", observed=True)["chaotic"].first() ==
                                      pd.Series({"ef": True, "ngd": False})).all()


def test_each_optimizer_is_reported_as_soon_as_it_is_done(monkeypatch):
    """on_done (the CLI's progress lines in a job log) comes once per optimizer, in order, with its
    best run and the time so far, before the next optimizer's grid starts."""
    calls = []
    started = []
    trajectories = grid.trajectories

    def spy(problem, x, y, optimizer, *args, **kwargs):
        started.append((optimizer.value, len(calls)))
        return trajectories(problem, x, y, optimizer, *args, **kwargs)

    monkeypatch.setattr(grid, "trajectories", spy)
    result = grid.run_grid("wine", ["sgd", "ngd"], lrs=(-3, -2, 2), dampings=(-2, -2, 1), steps=5, repeats=1,
                           progress=False, on_done=lambda o, b, s: calls.append((o.value, b, s)))
    assert [(o, b) for o, b, _ in calls] == [(b.optimizer, b) for b in result.best] and len(calls) == 2
    assert 0 < calls[0][2] <= calls[1][2] <= result.seconds
    # sgd's grid and repeats ran before it was reported, ngd's after
    assert started == [("sgd", 0), ("sgd", 0), ("ngd", 1), ("ngd", 1)]


def test_frame_layout_and_best_runs():
    result = grid.run_grid("wine", ["sgd", "ngd"], lrs=(-6, 0, 7), dampings=(-4, 0, 3), steps=10, repeats=2,
                           progress=False)
    frame = result.frame
    assert list(frame.columns[:13]) == ["task", "optimizer", "framework", "device", "dtype", "seed", "lr", "damping",
                                        "step", "loss", "time_s", "diverged", "grad_norm"]
    own = frame[frame["repeat"] == 0]
    assert own.groupby(["optimizer", "lr", "damping"], dropna=False, observed=True).ngroups == result.runs == 7 + 21
    assert own[own["optimizer"] == "sgd"]["damping"].isna().all()
    # one row per run and step, up to the last recorded one; the best run has the lowest last loss
    for optimizer, runs in own.groupby("optimizer", observed=True):
        last = runs.groupby(["lr", "damping"], dropna=False).tail(1)
        counts = runs.groupby(["lr", "damping"], dropna=False).size().to_numpy()
        assert np.array_equal(np.sort(counts), np.sort(last["step"].to_numpy() + 1))
        assert (last[~last["diverged"]]["step"] == 10).all() and (last["diverged"]).any() == (optimizer == "sgd")
        best = next(b for b in result.best if b.optimizer == optimizer)
        assert best.loss == last["loss"].min()
        marked = runs[runs["best"]]
        assert set(marked["lr"]) == {best.lr} and marked["chaotic"].notna().all()
    for column in ("time_s",):
        assert (own.groupby(["optimizer", "lr", "damping"], dropna=False)[column].diff().dropna() >= 0).all()


def test_the_best_run_has_the_lowest_last_loss_not_the_lowest_on_the_way():
    """DESIGN 4: the best run is the one with the lowest last recorded loss. sgd on breastcancer at
    lr 1e-4 dips to 0.45 and then oscillates up to 6.9 within 10 steps (without diverging), while
    lr 1e-6 descends slowly to 0.68: the best is lr 1e-6. Monotone runs would not tell the two
    rules apart."""
    result = grid.run_grid("breastcancer", ["sgd"], lrs=(-6, -4, 3), steps=10, repeats=0, progress=False)
    runs = result.frame.groupby("lr")
    last = runs.tail(1).set_index("lr")
    assert not last["diverged"].any() and (last["step"] == 10).all()
    lowest_last, lowest_anywhere = last["loss"].idxmin(), runs["loss"].min().idxmin()
    assert lowest_anywhere != lowest_last  # the case that tells the rules apart
    [best] = result.best
    assert (best.lr, best.loss) == (lowest_last, last.loc[lowest_last, "loss"]), (best.lr, lowest_last)
    assert set(result.frame[result.frame["best"]]["lr"]) == {lowest_last}


def test_paper_grid_is_the_default():
    assert np.array_equal(grid.logspace(grid.PAPER_LRS), np.logspace(-20, 10, 241))
    assert np.array_equal(grid.logspace(grid.PAPER_DAMPINGS), np.logspace(-10, 10, 41))
    args = cli._parser().parse_args(["grid", "--task", "wine", "--out", "x.csv"])
    assert grid.parse_bounds(args.lrs, "lrs") == grid.PAPER_LRS
    assert grid.parse_bounds(args.dampings, "dampings") == grid.PAPER_DAMPINGS
    assert args.optimizers == "sgd,ngd,ef" and args.framework == "numpy" and args.repeats == grid.DEFAULT_REPEATS


@pytest.mark.parametrize("bounds, text", [((-20.0, 10.0, 241), "-20:10:241"), ((-2.5, 0.1, 7), "-2.5:0.1:7"),
                                          ((1e-7, 3e16, 2), "1e-07:30000000000000000:2")])
def test_bounds_are_written_as_the_cli_reads_them(bounds, text):
    """The CLI's default and grid's error messages write bounds as `natgrad grid` reads them back."""
    assert hyperparameters.bounds_text(bounds) == text
    assert grid.parse_bounds(text, "lrs") == bounds


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^optimizers: 'sdg' is not one of sgd, adam, ef, ngd, kfac$"):
        grid.validate("wine", "sgd,sdg")
    with pytest.raises(ValueError, match=r"^task: 'digits-mlp' is not a full-batch convex task \(one of wine, "):
        grid.validate("digits-mlp", "sgd")
    with pytest.raises(ValueError, match=r"^dampings: '1:2' must be START:STOP:NUM"):
        grid.validate("wine", "ngd", dampings="1:2")
    with pytest.raises(ValueError, match=r"^fisher: 'exakt' is not one of exact, mc$"):
        grid.validate("wine", "ngd", hyperparameters={"fisher": "exakt"})
    with pytest.raises(ValueError, match=r"^fisher: not a hyperparameter of sgd, ef \(theirs beside lr and damping: "
                                         r"momentum\)$"):
        grid.validate("wine", "sgd,ef", hyperparameters={"fisher": "mc"})
    with pytest.raises(ValueError, match=r"^fisher: not a hyperparameter of ef \(lr and damping alone\)$"):
        grid.validate("wine", "ef", hyperparameters={"fisher": "mc"})
    with pytest.raises(ValueError, match=r"^momentum: not a hyperparameter of ngd \(theirs beside lr and damping: "
                                         r"fisher, samples\)$"):  # (not the run's seed)
        grid.validate("wine", "ngd", hyperparameters={"momentum": 0.5})


def test_a_grid_too_large_to_hold_is_refused_before_anything_is_allocated():
    """A mistyped NUM (1e8 lrs) ended in a MemoryError, or the kernel's kill, minutes later."""
    with pytest.raises(ValueError, match=r"^lrs: sgd's grid would record 10,100,000,000 rows \(lrs x \(steps \+ 1\)\)"):
        grid.validate("wine", "sgd", lrs="-3:0:100000000", steps=100)
    with pytest.raises(ValueError, match=r"^lrs x dampings: ngd's grid would record 20,200,000 rows"):
        grid.validate("wine", "sgd,ngd", lrs="-3:0:2000", dampings="-3:0:100", steps=100)
    grid.validate("wine", "sgd", lrs="-3:0:200000", steps=99)  # 20,000,000 rows: the limit itself
    grid.validate("wine", "ngd", lrs=grid.PAPER_LRS, dampings=grid.PAPER_DAMPINGS, steps=100)  # the paper's


def test_an_optimizer_without_a_batched_update_is_refused(monkeypatch):
    """The grid runs each optimizer's own update (grid.METHODS): one it lacks is refused by name before
    any work, where a fallback would run another optimizer's update and label it with this name."""
    assert set(grid.METHODS) == set(Optimizer)
    monkeypatch.delitem(grid.METHODS, Optimizer.ADAM)
    with pytest.raises(ValueError, match=r"^optimizers: 'adam' has no batched update in natgrad_impls\.grid\.METHODS "
                                         r"\(the grid runs sgd, ef, ngd, kfac\)$"):
        grid.validate("wine", "sgd,adam")


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cuda_grid_equals_the_cpu_grid(framework):
    """At every point that is not chaotic, to 1e-8 or 100 x the point's sensitivity, as the CPU
    frameworks' grids are compared (a GPU sums in another order). Exact Fisher: torch draws other
    random numbers on the GPU than on the CPU."""
    keys = ["optimizer", "lr", "damping", "step"]
    kwargs = dict(lrs=(-3, 0, 4), dampings=(-4, 0, 3), steps=STEPS, repeats=0, hyperparameters={"fisher": "exact"},
                  progress=False)
    on_gpu, on_cpu = (grid.run_grid("breastcancer", ["sgd", "ngd", "kfac"], f, d, **kwargs).frame
                      .set_index(keys).sort_index() for f, d in ((framework, "cuda"), ("numpy", "cpu")))
    assert on_gpu.index.equals(on_cpu.index) and (on_gpu["diverged"] == on_cpu["diverged"]).all()
    compared = 0
    for (optimizer, lr, damping), runs in on_cpu.groupby(keys[:3], observed=True, dropna=False):
        spread = _sensitivity("breastcancer", optimizer, lr, damping, fisher="exact")
        if spread <= 1e-8:
            np.testing.assert_allclose(on_gpu.loc[runs.index, "loss"], runs["loss"], rtol=max(1e-8, 100 * spread),
                                       err_msg=f"{optimizer} {lr} {damping}")
            compared += 1
    assert compared >= 20, compared  # of 28 points (torch on the CPU in its place: 27)


@pytest.mark.parametrize("optimizers, bounds, message", [
    ("kfac", {"dampings": "-400:0:2"}, r"^dampings: 0\.0 \(10\*\*-400\) must be a finite number > 0$"),  # ran as 0
    ("ngd", {"dampings": (0, 400, 2)}, r"^dampings: inf \(10\*\*400\) must be a finite number > 0$"),
    ("sgd", {"lrs": "-1:400:2"}, r"^lrs: inf \(10\*\*400\) must be a finite number > 0$"),  # ran as inf, warning
    ("ef", {"lrs": "-400:0:3"}, r"^lrs: 0\.0 \(10\*\*-400\) must be a finite number > 0$"),
])
def test_grid_values_must_be_finite_and_positive(optimizers, bounds, message):
    with np.errstate(all="raise"):  # the check itself warns of no overflow
        with pytest.raises(ValueError, match=message):
            grid.validate("wine", optimizers, **bounds)


def test_grid_is_checked_with_its_own_values(monkeypatch):
    """The optimizer's own checks see the grid's extreme lr and damping, not a stand-in 1."""
    seen = []
    monkeypatch.setattr(grid, "make_hyperparameters", lambda optimizer, values, seed=0: seen.append(values))
    grid.validate("wine", "sgd,kfac", lrs="-2:1:4", dampings="-3:0:2")
    assert seen == [{"lr": 0.01, "damping": None}, {"lr": 10.0, "damping": None},
                    {"lr": 0.01, "damping": 0.001}, {"lr": 0.01, "damping": 1.0},
                    {"lr": 10.0, "damping": 0.001}, {"lr": 10.0, "damping": 1.0}]


def test_bad_grid_values_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grid, "run_grid", lambda *args, **kwargs: pytest.fail("the grid ran"))
    out = tmp_path / "g.parquet"
    status = cli.main(["grid", "--task", "wine", "--optimizers", "kfac", "--lrs=-1:0:2", "--dampings=-400:0:2",
                       "--steps", "2", "--out", str(out)])
    assert status == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["natgrad: dampings: 0.0 (10**-400) must be a finite number > 0"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("optimizers", ["ngd,ngd", "sgd,ef,sgd"])
def test_each_optimizer_once(optimizers):
    twice = optimizers.split(",")[0]
    with pytest.raises(ValueError, match=rf"^optimizers: '{twice}' is given twice \(each optimizer once\)$"):
        grid.validate("wine", optimizers)


@pytest.mark.parametrize("option", ["--lrs", "--dampings"])
def test_help_says_to_write_negative_bounds_with_equals(option, capsys):
    with pytest.raises(SystemExit):
        cli.main(["grid", "--help"])
    assert f"{option}=-" in " ".join(capsys.readouterr().out.split())
    assert getattr(cli._parser().parse_args(["grid", "--task", "wine", "--out", "x.csv", f"{option}=-1:0:2"]),
                   option[2:]) == "-1:0:2"  # `option -1:0:2` would read -1:0:2 as an option


def test_a_kept_optimizer_grid_is_reused_only_under_the_same_setting(tmp_path, monkeypatch):
    """One checkpoint folder, one field changed at a time: every field that determines an
    optimizer's grid (the lr and damping bounds, steps, seed, repeats, its own hyperparameters,
    the task's variant and logit clip, the framework, the dtype) is in the name it is kept under,
    so a resumed grid with a changed setting computes it again rather than reuse a stale one; the
    same setting again reuses it."""
    computed, real = [], grid._optimizer_grid

    def counting(task, train, optimizer, *args):
        computed.append(optimizer.value)
        return real(task, train, optimizer, *args)

    monkeypatch.setattr(grid, "_optimizer_grid", counting)
    folder = tmp_path / ".grid.runs"
    base = dict(task="breastcancer", optimizers=["ngd"], lrs=(-2, 0, 2), dampings=(-2, 0, 2), steps=3, repeats=1,
                progress=False, checkpoints=folder)
    first = grid.run_grid(**base)
    assert computed == ["ngd"]
    again = grid.run_grid(**base)
    assert computed == ["ngd"]  # the same setting: kept
    pd.testing.assert_frame_equal(again.frame, first.frame)
    changes = [dict(lrs=(-2, 0, 3)), dict(dampings=(-1, 0, 2)), dict(steps=4), dict(seed=1), dict(repeats=2),
               dict(hyperparameters={"fisher": "mc"}), dict(logit_clip="none"), dict(framework="torch"),
               dict(framework="torch", dtype="float32"), dict(task="misspec", variant="logistic-correct"),
               dict(task="misspec", variant="logistic-misspecified-a")]
    for i, change in enumerate(changes):
        grid.run_grid(**{**base, **change})
        assert len(computed) == 2 + i, f"{change}: a stale grid was reused"
    grid.run_grid(**base)
    assert len(computed) == 1 + len(changes)  # the first setting is still kept


def test_the_chaos_repeats_start_from_theta0_plus_1e_14_noise(monkeypatch):
    """DESIGN 4: the repeats start from theta0 + 1e-14 x noise, the noise drawn from the seed's
    "chaos" stream (standard normals, repeats x D); theta0 = 0 on a convex task."""
    starts = []
    real = grid.trajectories

    def spy(*args, theta0=None, **kwargs):
        starts.append(theta0)
        return real(*args, theta0=theta0, **kwargs)

    monkeypatch.setattr(grid, "trajectories", spy)
    grid.run_grid("wine", ["ngd"], lrs=(-1, -1, 1), dampings=(-2, -2, 1), steps=2, seed=3, repeats=4, progress=False)
    d = get_task("wine").problem.model.num_params()
    expected = 1e-14 * models.random_stream(3, "chaos").standard_normal((4, d))
    assert starts[0] is None and len(starts) == 2  # the grid from 0, then the repeats
    np.testing.assert_array_equal(starts[1], expected)


def _fake_runs(finals) -> grid.Trajectories:
    """Runs that end at `finals` (each after 3 steps, none diverged)."""
    finals = np.asarray(finals, dtype=float)
    loss = np.column_stack([np.full((len(finals), 3), 10.0), finals])
    count = len(finals)
    return grid.Trajectories(loss, loss.copy(), np.zeros_like(loss), np.full(count, 3), np.zeros(count, bool))


@pytest.mark.parametrize("loss,moves,chaotic", [
    (1e3, [5e-6, -5e-6], False),  # 5e-9 relative (5e-6 absolute): within 1e-8 relative
    (1.0, [1e-7, 0.0], True),  # 1e-7 relative: past 1e-8
    (1.0, [5e-9, -5e-9], False),
])
def test_chaos_is_a_relative_change_of_the_final_loss_past_1e_8(loss, moves, chaotic):
    """DESIGN 4: chaotic when a repeat moves the final loss by more than 1e-8 relative (not
    absolute, not 1e-6)."""
    runs, rep = _fake_runs([loss]), _fake_runs(loss + np.asarray(moves))
    best = grid._best(grid.Optimizer.EF, 0.1, 1e-10, runs, 0, rep)
    assert best.chaotic is chaotic
    values = [*moves, 0.0]
    assert best.loss == loss and best.spread == pytest.approx((max(values) - min(values)) / loss, rel=1e-6)


@pytest.mark.parametrize("own", [{"fisher": "exact"}, {"fisher": "mc", "samples": 3}])
def test_a_grid_with_an_l2_term_equals_a_loop_of_runs(own):
    """vecfield carries an l2 term (prior variance 0.1), which wine and breastcancer lack: the grid's
    loss, gradient, NGD shift (l2 + damping) and K-FAC damping (damping + l2) must hold it as `natgrad
    run` does. lr 10 diverges in sgd, ngd and kfac while the smaller lrs of the same chunk go on; the
    fisher option reaches ngd and kfac alone (sgd, adam and ef have none), and the gaussian MC Fisher
    averages its 3 draws."""
    assert get_task("vecfield").problem.l2 > 0
    frame = grid.run_grid("vecfield", ALL.split(","), lrs=(-2, 1, 4), dampings=(-4, 0, 3), steps=STEPS, repeats=0,
                          hyperparameters=own, progress=False).frame
    diverged = 0
    for (optimizer, lr, damping), mine in frame.groupby(["optimizer", "lr", "damping"], dropna=False, observed=True):
        if optimizer == "ef" and lr > 1:
            continue  # ef at lr 10 oscillates: chaotic (DESIGN 4), agrees only to its spread
        hps = {"lr": lr, **({} if math.isnan(damping) else {"damping": damping}),
               **(own if optimizer in ("ngd", "kfac") else {})}
        loop = runner.run("vecfield", optimizer, "numpy", hyperparameters=hps, steps=STEPS, progress=False)
        assert mine["diverged"].tolist() == loop["diverged"].tolist(), (optimizer, lr, damping)
        diverged += bool(loop["diverged"].iloc[0])
        np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=1e-10, err_msg=f"{optimizer} {lr} {damping}")
    assert diverged >= 3


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_a_grid_of_several_chunks_keeps_each_run_with_its_lr(framework, monkeypatch):
    """Runs go through in chunks (a few thousand at most): 5000 lrs make several, the last one partial,
    some runs diverging, at different steps. Every run is plain gradient descent on wine's
    least squares with its own lr, worked out here for all lrs at once and cut at its divergence
    (DESIGN 4); the progress bar counts each run once."""
    counted = []

    class Bar:
        def __init__(self, total, desc, enabled, log_every_s=None):
            counted.append(total)

        def update(self, n):
            counted.append(-n)

        def close(self):
            pass

    monkeypatch.setattr(grid, "progress_bar", Bar)
    steps, lrs = 3, grid.logspace((-8, -3, 5000))
    frame = grid.run_grid("wine", ["sgd"], framework, lrs=(-8, -3, 5000), steps=steps, repeats=0, progress=False).frame
    assert counted[0] == 5000 and sum(counted[1:]) == -5000
    x, y = get_task("wine").load().train
    theta, losses = np.zeros((len(lrs), x.shape[1])), []
    for _ in range(steps + 1):
        r = theta @ x.T - y[:, 0]
        losses.append(0.5 * (r * r).mean(1))
        theta = theta - lrs[:, None] * (r @ x) / len(x)
    with np.errstate(invalid="ignore"):
        losses = np.column_stack(losses)
        bad = ~(losses <= 100 * losses[:, :1])
    diverged = bad.any(1)
    last = np.where(diverged, bad.argmax(1), steps)
    assert set(last[diverged]) == {1, 2, 3} and not diverged.all()  # divergence at each step, and none
    mine = frame.sort_values(["lr", "step"])
    np.testing.assert_array_equal(mine["lr"], np.repeat(lrs, last + 1))
    np.testing.assert_array_equal(mine["step"], np.concatenate([np.arange(n + 1) for n in last]))
    np.testing.assert_array_equal(mine["diverged"], np.repeat(diverged, last + 1))
    np.testing.assert_allclose(mine["loss"], losses[np.arange(steps + 1)[None, :] <= last[:, None]], rtol=1e-10)


def test_a_grid_in_a_job_log_says_how_far_it_is(monkeypatch, capsys):
    """Off a terminal (a pipeline job's log) a grid prints a line per chunk once PROGRESS_EVERY_S
    has passed since the last (0 here: every chunk but the last, which its optimizer's line follows);
    progress=False (--no-progress) prints none."""
    monkeypatch.setattr(grid, "PROGRESS_EVERY_S", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    grid.trajectories(get_task("wine").problem, *get_task("wine").load().train, "sgd",
                      grid.make_hyperparameters("sgd", {"lr": 1.0}), grid.logspace((-8, -3, 5000)),
                      np.full(5000, np.nan), 2, desc="wine sgd")
    lines = capsys.readouterr().out.splitlines()
    done = [int(re.fullmatch(r"wine sgd: (\d+)/5000 runs \(\d+%\), \d+ s", line).group(1)) for line in lines]
    assert len(done) >= 2 and done == sorted(done) and done[-1] < 5000, lines  # several chunks, counted up
    for every_s, progress in ((0, False), (3600, None)):  # --no-progress; no line before an hour has passed
        monkeypatch.setattr(grid, "PROGRESS_EVERY_S", every_s)
        grid.trajectories(get_task("wine").problem, *get_task("wine").load().train, "sgd",
                          grid.make_hyperparameters("sgd", {"lr": 1.0}), grid.logspace((-8, -3, 5000)),
                          np.full(5000, np.nan), 2, progress=progress)
        assert capsys.readouterr().out == "", (every_s, progress)


def test_when_every_run_diverges_the_best_is_the_lowest_last_loss_and_says_so():
    """DESIGN 4's best run (lowest last recorded loss) where every run diverged, as a loop of `natgrad
    run` finds it: the best keeps its own last step, not the grid's, and is marked diverged."""
    lrs = grid.logspace((-5, -3, 5))
    loop = {lr: runner.run("wine", "sgd", "numpy", hyperparameters={"lr": lr}, steps=10, progress=False) for lr in lrs}
    assert all(run["diverged"].all() for run in loop.values())
    lr = min(loop, key=lambda lr: loop[lr]["loss"].iloc[-1])
    [best] = grid.run_grid("wine", ["sgd"], lrs=(-5, -3, 5), steps=10, repeats=0, progress=False).best
    assert best.lr == lr and best.loss == pytest.approx(loop[lr]["loss"].iloc[-1], rel=1e-10)
    assert best.step == loop[lr]["step"].iloc[-1] < 10 and best.diverged
    assert "(diverged: every run did)" in best.describe()


def test_a_repeat_that_ends_in_nan_makes_the_best_run_chaotic():
    """A repeat whose last loss is NaN (its solve failed from theta0 + 1e-14 noise) changed the final
    loss by more than 1e-8 (DESIGN 4), though NaN compares as no change."""
    runs, rep = _fake_runs([1.0]), _fake_runs([1.0, math.nan])
    assert grid._best(grid.Optimizer.NGD, 0.1, 1e-2, runs, 0, rep).chaotic


def test_the_repeat_rows_are_the_best_runs_setting_and_carry_its_chaos_flag():
    """The repeats of ngd's best run on wine (not chaotic) run at the best's lr and damping from theta0
    + 1e-14 noise, so each equals a `natgrad run` of that setting to within the chaos tolerance; their
    rows say so (best, chaotic False), while the grid's other runs were not checked: chaotic empty, not
    False. The dampings are written high to low, so that the best (the smallest) is not the first."""
    result = grid.run_grid("wine", ["ngd"], lrs=(-1, 0, 2), dampings=(0, -4, 3), steps=10, repeats=2, progress=False)
    [best], frame = result.best, result.frame
    assert not best.chaotic and (best.lr, best.damping) == (1.0, 1e-4)
    repeats = frame[frame["repeat"] > 0]
    assert sorted(repeats["repeat"].unique()) == [1, 2] and repeats["best"].all()
    assert set(repeats["lr"]) == {best.lr} and set(repeats["damping"]) == {best.damping}
    loop = runner.run("wine", "ngd", "numpy", hyperparameters={"lr": best.lr, "damping": best.damping}, steps=10,
                      progress=False)
    for _, rows in repeats.groupby("repeat"):
        np.testing.assert_allclose(rows["loss"], loop["loss"], rtol=1e-8)
    assert repeats["chaotic"].notna().all() and not repeats["chaotic"].any()
    others = frame[(frame["repeat"] == 0) & ~frame["best"]]
    assert len(others) and others["chaotic"].isna().all()


@pytest.mark.parametrize("task, optimizer", [("breastcancer", "ngd"), ("wine", "ngd"), ("breastcancer", "kfac"),
                                             ("wine", "kfac")])
def test_a_monte_carlo_grid_draws_from_its_own_seed(task, optimizer):
    """--seed moves the grid's label draws as it moves `natgrad run`'s (the test above grids seed 0
    alone); 3 draws per input, in the bernoulli's and the gaussian's MC Fisher, in ngd and in K-FAC
    (refreshed every 2 steps: at theta0 = 0 every bernoulli draw gives the same K-FAC factor)."""
    own = {"fisher": "mc", "samples": 3, **({"kfac_update_period": 2} if optimizer == "kfac" else {})}
    frame = grid.run_grid(task, [optimizer], lrs=(-1, -1, 1), dampings=(-2, -2, 1), steps=10, seed=1, repeats=0,
                          hyperparameters=own, progress=False).frame
    hps = {"lr": 0.1, "damping": 0.01, **own}
    runs = [runner.run(task, optimizer, "numpy", hyperparameters=hps, steps=10, seed=s, progress=False) for s in (0, 1)]
    assert not np.allclose(runs[0]["loss"].iloc[1:], runs[1]["loss"].iloc[1:], rtol=1e-8)  # the seed matters
    np.testing.assert_allclose(frame["loss"], runs[1]["loss"], rtol=1e-10)
    assert (frame["seed"] == 1).all() and (runs[1]["seed"] == 1).all()  # and says so, as the run does


def test_a_float32_grid_computes_in_float32():
    """torch --dtype float32: the grid's numbers are float32 ones (every loss a float32 value), as
    `natgrad run --dtype float32` gives, not float64 numbers labelled float32."""
    frame = grid.run_grid("breastcancer", ["ngd"], "torch", dtype="float32", lrs=(-1, -1, 1), dampings=(-2, -2, 1),
                          steps=10, repeats=0, progress=False).frame
    run = runner.run("breastcancer", "ngd", "torch", dtype="float32", hyperparameters={"lr": 0.1, "damping": 0.01},
                     steps=10, progress=False)
    assert (frame["dtype"] == "float32").all()
    for losses in (frame["loss"].to_numpy(), run["loss"].to_numpy()):
        np.testing.assert_array_equal(losses.astype(np.float32).astype(np.float64), losses)
    np.testing.assert_allclose(frame["loss"], run["loss"], rtol=1e-5)


def test_time_s_is_each_runs_share_of_the_wall_clock():
    """time_s is a run's share of the batched computation (a chunk-step's time divided by the runs in
    it), 0 at step 0 as in `natgrad run`: summed over the runs it is at most the grid's wall-clock, not
    the number of runs times it."""
    result = grid.run_grid("wine", ["sgd"], lrs=(-8, -5, 300), steps=20, repeats=0, progress=False)
    frame = result.frame
    assert (frame[frame["step"] == 0]["time_s"] == 0).all()
    assert 0 < frame.groupby("lr")["time_s"].last().sum() <= result.seconds


def test_a_grid_of_no_points_is_refused():
    with pytest.raises(ValueError, match=r"^lrs: '0:1:0' must be START:STOP:NUM \(log10 bounds, NUM an integer >= 1\)"):
        grid.validate("wine", "sgd", lrs="0:1:0")


def test_an_optimizer_with_no_finite_run_has_no_best():
    """Every ngd run of the singular task fails its solve (NaN after step 0, as the test above shows):
    there is no best run to report or repeat, and on_done hears None."""
    done = []
    result = grid.run_grid(singular_task(), ["ngd"], "torch", lrs=(0, 0, 1), dampings=(-300, -300, 1), steps=3,
                           repeats=2, progress=False, on_done=lambda o, b, s: done.append(b))
    assert result.best == [] and done == [None]
    assert (result.frame["repeat"] == 0).all() and not result.frame["best"].any()


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_a_run_whose_first_loss_overflows_diverges_at_step_0(framework):
    """The first loss is inf, and inf <= 100 x inf held, so such a run never counted as diverged. The
    runner and the grid stop it at step 0."""
    task = overflowing_task()
    run = runner.run(task, "sgd", framework, hyperparameters={"lr": 1e-3}, steps=5, progress=False)
    result = grid.run_grid(task, ["sgd"], framework, lrs=(-3, -3, 1), steps=5, repeats=0, progress=False)
    for frame in (run, result.frame):
        assert frame["step"].tolist() == [0] and frame["diverged"].all() and np.isposinf(frame["loss"]).all()
    assert result.best == []


def test_a_grid_of_zero_steps_records_the_start():
    """steps 0, as `natgrad run --steps 0`: one row per run, the loss at theta0."""
    frame = grid.run_grid("wine", ["sgd", "ngd"], lrs=(-3, -2, 2), dampings=(-2, -2, 1), steps=0, repeats=0,
                          progress=False).frame
    run = runner.run("wine", "sgd", "numpy", hyperparameters={"lr": 1e-3}, steps=0, progress=False)
    assert len(frame) == 4 and (frame["step"] == 0).all() and len(run) == 1
    np.testing.assert_allclose(frame["loss"], run["loss"].iloc[0], rtol=1e-12)


def test_a_grid_stopped_while_keeping_an_optimizer_computes_it_again(tmp_path, monkeypatch):
    """An optimizer's kept grid is two files (its Best, its rows): a stop between the two writes must
    not leave a kept grid that a resumed run reads half of; it computes that optimizer again, and
    gives the rows and best of an uninterrupted grid."""
    kwargs = dict(lrs=(-2, 0, 2), dampings=(-2, 0, 2), steps=3, repeats=1, progress=False)
    folder, writes = tmp_path / ".grid.runs", []

    def second_write_stops(real):
        def write(*args, **options):
            writes.append(args)
            if len(writes) == 2:
                raise KeyboardInterrupt
            return real(*args, **options)
        return write

    monkeypatch.setattr(results, "write", second_write_stops(results.write))
    monkeypatch.setattr(results, "write_text", second_write_stops(results.write_text))
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid("wine", ["ngd"], checkpoints=folder, **kwargs)
    monkeypatch.undo()
    resumed = grid.run_grid("wine", ["ngd"], checkpoints=folder, **kwargs)
    whole = grid.run_grid("wine", ["ngd"], **kwargs)
    measured = [c for c in whole.frame.columns if c != "time_s"]
    pd.testing.assert_frame_equal(resumed.frame[measured], whole.frame[measured])
    assert [b.describe() for b in resumed.best] == [b.describe() for b in whole.best]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_ngd_runs_that_diverge_beside_runs_that_go_on_equal_a_loop_of_runs(framework):
    """ngd on breastcancer with the exact likelihood: lrs 10 and 100 diverge part way while lrs 0.1 and
    1 go on, in one chunk. numpy and torch keep each run's Fisher matrix and weights to skip forming
    it again; a diverged run leaves the chunk, and the kept matrices and weights must leave with it
    (the grid comparison above reaches lr 1 alone, where nothing diverges)."""
    frame = grid.run_grid("breastcancer", ["ngd"], framework, lrs=(-1, 2, 4), dampings=(-4, 0, 3), steps=STEPS,
                          repeats=0, logit_clip="none", progress=False).frame
    diverged = 0
    for (lr, damping), mine in frame.groupby(["lr", "damping"]):
        loop = runner.run("breastcancer", "ngd", framework, hyperparameters={"lr": lr, "damping": damping},
                          steps=STEPS, logit_clip="none", progress=False)
        assert mine["diverged"].tolist() == loop["diverged"].tolist(), (lr, damping)
        diverged += bool(loop["diverged"].iloc[0])
        # 1e-9: a diverging run's last loss sums logits in the thousands (torch's round-off: 1e-10 there)
        np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=1e-9, err_msg=f"{lr} {damping}")
    assert 0 < diverged < 12


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_kfac_runs_whose_logits_saturate_equal_a_loop_of_runs(framework):
    """kfac on breastcancer with the exact likelihood at lrs 1e2..1e8, inverses refreshed every step:
    after the first step every logit saturates and G is 0, kfac-jax's zero case (both inverses
    I / sqrt(lambda)). The grid and `natgrad run` take it alike; numpy's run raised ZeroDivisionError
    there, which would have stopped a whole tuning job."""
    hps = {"fisher": "exact", "kfac_ema": 0.0, "kfac_update_period": 1}
    frame = grid.run_grid("breastcancer", ["kfac"], framework, lrs=(2, 8, 4), dampings=(-4, -4, 1), steps=STEPS,
                          repeats=0, hyperparameters=hps, logit_clip="none", progress=False).frame
    for lr, mine in frame.groupby("lr"):
        loop = runner.run("breastcancer", "kfac", framework, hyperparameters={"lr": lr, "damping": 1e-4, **hps},
                          steps=STEPS, logit_clip="none", progress=False)
        assert mine["diverged"].tolist() == loop["diverged"].tolist(), lr
        np.testing.assert_allclose(mine["loss"], loop["loss"], rtol=1e-9, err_msg=str(lr))


def test_a_repeat_that_overflowed_is_described_as_chaotic():
    """A chaos repeat whose last loss is +inf (a float32 forward pass that overflowed) makes the best run
    chaotic with an infinite spread; `natgrad grid` prints it, and must not die on it before --out is
    written."""
    def runs(finals):
        finals = np.asarray(finals, float)
        loss = np.column_stack([np.full((len(finals), 3), 10.0), finals])
        return grid.Trajectories(loss, loss.copy(), np.zeros_like(loss), np.full(len(finals), 3), ~np.isfinite(finals))

    best = grid._best(grid.Optimizer.EF, 0.1, 1e-10, runs([0.5]), 0, runs([0.5, np.inf]))
    assert best.chaotic and best.spread == np.inf
    assert "CHAOTIC: 2 repeats" in best.describe() and "and inf" in best.describe()
