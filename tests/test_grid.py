"""`natgrad grid` (natgrad_impls.grid): the vectorised grid gives the numbers of a plain loop of
`natgrad run` calls (to 1e-10 relative in float64, runs that are not chaotic), in numpy, torch and
jax; diverged runs are recorded up to their divergence and masked out; best runs are checked for
chaos as DESIGN 4 defines it."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from conftest import singular_task
from natgrad_impls import cli, grid, models, results, runner
from natgrad_impls.tasks import get_task

LRS, DAMPINGS, STEPS = "-3:0:4", "-4:0:3", 20
ALL = "sgd,adam,ef,ngd,kfac"
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


def _sensitivity(task, optimizer, lr, damping, steps=STEPS, repeats=3, logit_clip=None) -> float:
    """How far runs from theta0 + 1e-14 noise move the recorded losses (max relative change over
    the steps; inf when they stop at another step): a property of the dynamics, measured with the
    numpy grid. Above 1e-8 the run is chaotic (DESIGN 4)."""
    t = runner.resolve_task(task, logit_clip=logit_clip)
    x, y = t.load().train
    hp = {"lr": 1.0, **({} if math.isnan(damping) else {"damping": 1.0})}
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
    measured = [c for c in whole.frame.columns if c != "time_s"]
    pd.testing.assert_frame_equal(resumed.frame[measured], whole.frame[measured])
    assert [b.describe() for b in resumed.best] == [b.describe() for b in whole.best]
    grid.run_grid("breastcancer", ["sgd"], checkpoints=folder, **{**kwargs, "steps": 11})
    assert computed == ["sgd", "ef", "sgd"]


def test_the_cli_removes_its_checkpoints_once_the_grid_is_written(tmp_path):
    out, folder = tmp_path / "grid.parquet", tmp_path / ".grid.runs"
    assert cli.main(["grid", "--task", "wine", "--optimizers", "sgd", "--lrs=-3:-2:2", "--steps", "3", "--repeats", "0",
                     "--no-progress", "--checkpoints", str(folder), "--out", str(out)]) == 0
    assert out.exists() and not folder.exists()


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
    assert args.optimizers == "sgd,ngd,ef" and args.framework == "numpy"


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^optimizers: 'sdg' is not one of sgd, adam, ef, ngd, kfac$"):
        grid.validate("wine", "sgd,sdg")
    with pytest.raises(ValueError, match=r"^task: 'digits-mlp' is not a full-batch convex task \(one of wine, "):
        grid.validate("digits-mlp", "sgd")
    with pytest.raises(ValueError, match=r"^dampings: '1:2' must be START:STOP:NUM"):
        grid.validate("wine", "ngd", dampings="1:2")
    with pytest.raises(ValueError, match=r"^fisher: 'exakt' is not one of exact, mc$"):
        grid.validate("wine", "ngd", hyperparameters={"fisher": "exakt"})
    with pytest.raises(ValueError, match=r"^fisher: not a hyperparameter of sgd, ef \(theirs: momentum\)$"):
        grid.validate("wine", "sgd,ef", hyperparameters={"fisher": "mc"})


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cuda_grid_equals_the_cpu_grid(framework):
    # exact Fisher: torch draws other random numbers on the GPU than on the CPU
    kwargs = dict(lrs=(-3, 0, 4), dampings=(-4, 0, 3), steps=20, repeats=0, hyperparameters={"fisher": "exact"},
                  progress=False)
    on_gpu = grid.run_grid("breastcancer", ["sgd", "ngd", "kfac"], framework, "cuda", **kwargs).frame
    on_cpu = grid.run_grid("breastcancer", ["sgd", "ngd", "kfac"], "numpy", **kwargs).frame
    assert len(on_gpu) == len(on_cpu)
    np.testing.assert_allclose(on_gpu["loss"], on_cpu["loss"], rtol=1e-8)


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
