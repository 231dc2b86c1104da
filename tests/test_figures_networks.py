"""Figures and tables beyond the paper (networks, cost, tables): each drawn from a small table
built here, checked for what is drawn (lines per panel, colours and line styles per optimizer, log
scales, bands, fitted slopes) and for notes instead of crashes when something is missing. The
timing tables get one tiny real call each (columns and positivity; no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from natgrad_impls import results, timing  # noqa: E402
from natgrad_impls.figures import Drawn, cost, networks, save, style, tables  # noqa: E402
from conftest import same_dashes  # noqa: E402

COMBOS = [("torch", "cpu"), ("jax", "cpu")]
RATES = {"sgd": 0.01, "adam": 0.02, "ef": 0.015, "ngd": 0.03, "kfac": 0.04}
SECONDS = {("numpy", "cpu"): 3e-3, ("torch", "cpu"): 2e-3, ("jax", "cpu"): 1e-3, ("torch", "cuda"): 5e-4, ("jax", "cuda"): 4e-4}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def runs(tasks=("digits-mlp",), optimizers=("sgd", "adam", "ngd"), combos=COMBOS, seeds=(0, 1), steps=100,
         lr=0.1) -> pd.DataFrame:
    """Runner-shaped frames: loss = exp(-rate * step) (+ a seed offset), time_s = step x a
    per-framework/device step time, test_accuracy every 25 steps, cos_ef_ngd every 10 on ef runs."""
    rows = []
    step = np.arange(steps + 1)
    for task in tasks:
        for optimizer in optimizers:
            for framework, device in combos:
                for seed in seeds:
                    loss = 2.3 * np.exp(-RATES[optimizer] * step) * (1 + 0.1 * seed) + 1e-3
                    every = step % 25 == 0
                    frame = pd.DataFrame({
                        "task": task, "optimizer": optimizer, "framework": framework, "device": device,
                        "dtype": "float32", "seed": seed, "lr": lr,
                        "damping": 1e-3 if optimizer in ("ef", "ngd", "kfac") else np.nan,
                        "step": step, "loss": loss, "time_s": step * SECONDS[framework, device] * (1 + 0.05 * seed),
                        "diverged": False, "grad_norm": loss,
                        "train_loss": np.where(every, loss, np.nan),
                        "test_loss": np.where(every, loss * 1.1, np.nan),
                        "test_accuracy": np.where(every, 1 - 0.9 * np.exp(-RATES[optimizer] * step), np.nan),
                        "cos_ef_ngd": np.where((step % 10 == 0) & (optimizer == "ef"), 0.5 + 0.4 * np.exp(-step / 50), np.nan),
                        "batch_size": 128.0,
                    })
                    rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def _color(line):
    return mcolors.to_rgb(line.get_color())


def _check_style(line, optimizer):
    assert _color(line) == pytest.approx(mcolors.to_rgb(style.COLORS[optimizer])), optimizer
    assert same_dashes(line, optimizer), optimizer


def _data_axes(drawn: Drawn):
    return [ax for ax in drawn.figure.axes if ax.get_lines()]


# -- networks -------------------------------------------------------------------------------------------

def test_training_draws_median_lines_and_bands_per_optimizer_and_panel(tmp_path):
    frame = runs()
    drawn = networks.training(frame)  # the full-train loss, at its evaluations
    axes = np.array(drawn.figure.axes).reshape(2, 2)  # rows: step, time; columns: PyTorch CPU, JAX CPU
    for row, ax in zip([0, 0, 1, 1], axes.ravel()):
        assert ax.get_yscale() == "log"
        assert ax.get_xscale() == ("linear", "log")[row]  # the clock: step costs span decades
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["SGD", "Adam", "NGD"]
        for line, optimizer in zip(lines, ["sgd", "adam", "ngd"]):
            _check_style(line, optimizer)
            # steps 0, 25, .., 100; on the log clock without step 0, at time 0
            assert line.get_marker() == "o" and len(line.get_xdata()) == (5, 4)[row]
            assert min(line.get_xdata()) > 0 or row == 0
        # dashed SGD over dotted, dotted-with-dots Adam over solid NGD: where lines coincide, the one
        # on top has gaps the others show through (style.STACKING)
        assert lines[0].get_zorder() > lines[1].get_zorder() > lines[2].get_zorder()
        assert len(ax.collections) == 3  # one min..max band per optimizer (two seeds)
    assert networks.LOG_X_NOTE in drawn.notes
    assert [ax.get_xlabel() for ax in axes[:, 0]] == ["step", "time [s]"]
    assert axes[0, 0].get_title() == "digits-mlp · PyTorch CPU" and axes[0, 1].get_title() == "digits-mlp · JAX CPU"
    # the band spans the seeds: seed 1's loss is 10 % above seed 0's
    sgd = frame[(frame.optimizer == "sgd") & (frame.framework == "torch")]
    band = axes[0, 0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(sgd.train_loss.min()) and band.max() == pytest.approx(sgd.train_loss.max())
    assert axes[0, 0].get_ylabel() == "train loss"
    # the median line at each step is the median over seeds, drawn against the median clock
    line = axes[1, 0].get_lines()[0]
    assert line.get_xdata()[-1] == pytest.approx(sgd[sgd.step == 100].time_s.median())
    # panels of a row share the x range; time panels compare frameworks on one clock
    assert axes[1, 0].get_xlim() == axes[1, 1].get_xlim()
    legend = drawn.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["SGD", "Adam", "NGD"]
    assert all(handle.get_marker() == "o" for handle in legend.legend_handles)  # as the lines are drawn
    for handle, optimizer in zip(legend.legend_handles, ["sgd", "adam", "ngd"]):
        _check_style(handle, optimizer)
    assert any("EF: not in the table" in n for n in drawn.notes) and any("K-FAC" in n for n in drawn.notes)
    written = save(drawn, tmp_path / "training.png")
    assert all(p.exists() for p in written)


def test_save_writes_each_format_as_named_and_the_notes_beside_it(tmp_path):
    """save writes one file per format, each in that format (a PDF that is a PNG inside fails to
    open as one), and, with notes, the caption notes joined by spaces beside them."""
    figure, _ = plt.subplots()
    notes = ["EF: not in the table, left out.", "Best runs on wine: NGD lr 1."]
    written = save(Drawn(figure, notes), tmp_path / "f.png")
    assert written == [tmp_path / "f.png", tmp_path / "f.pdf", tmp_path / "f.notes.txt"]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert (tmp_path / "f.notes.txt").read_text() == "EF: not in the table, left out. Best runs on wine: NGD lr 1.\n"


def test_training_smooths_minibatch_loss_and_says_so():
    frame = runs(steps=200)
    drawn = networks.training(frame, y="loss")
    assert any("running mean over 4 measurements" in n for n in drawn.notes)
    lines = _data_axes(drawn)[0].get_lines()
    assert all(len(line.get_xdata()) == 201 and line.get_marker() == "None" for line in lines)
    # SGD's line: each seed's mean over its last 4 losses (fewer at the start), then the median over
    # the two seeds, their mean
    sgd = frame[(frame.optimizer == "sgd") & (frame.framework == "torch")]
    means = [np.array([loss[max(0, k - 3):k + 1].mean() for k in range(201)])
             for loss in (sgd[sgd.seed == seed].sort_values("step").loss.to_numpy() for seed in (0, 1))]
    np.testing.assert_allclose(lines[0].get_ydata(), (means[0] + means[1]) / 2, rtol=1e-12)
    assert drawn.figure.axes[0].get_ylabel() == "mini-batch loss"
    assert not any("running mean" in n for n in networks.training(runs(steps=200)).notes)


def test_training_leaves_out_a_missing_device_with_a_note():
    frame = pd.concat([runs(tasks=("digits-mlp",), combos=[("torch", "cpu"), ("torch", "cuda")]),
                       runs(tasks=("mnist1d-mlp",), combos=[("torch", "cpu")], optimizers=("kfac",))])
    drawn = networks.training(frame, y="loss", smooth=1)
    axes = np.array(drawn.figure.axes).reshape(4, 2)
    assert "no runs" in [t.get_text() for t in axes[2, 1].texts]
    assert not axes[2, 1].get_lines() and len(axes[2, 0].get_lines()) == 1
    assert "mnist1d-mlp: no PyTorch GPU runs." in drawn.notes
    assert [line.get_label() for line in axes[0, 1].get_lines()] == ["SGD", "Adam", "NGD"]


def test_training_draws_the_best_of_several_settings_with_a_note():
    frame = pd.concat([runs(optimizers=("sgd",), lr=0.1),
                       runs(optimizers=("sgd",), lr=1.0).assign(loss=lambda f: f.loss * 3,
                                                                train_loss=lambda f: f.train_loss * 3)])
    drawn = networks.training(frame, y="loss", smooth=1)
    line = drawn.figure.axes[0].get_lines()[0]
    assert line.get_ydata()[-1] == pytest.approx(frame[(frame.lr == 0.1) & (frame.step == 100)].loss.median())
    assert any("2 hyperparameter settings" in n for n in drawn.notes)


def test_every_figure_draws_the_setting_the_best_hyperparameters_table_lists():
    """Three settings of sgd, three seeds each, that three wrong rules would choose instead: A has the
    lowest mini-batch loss at the end (but not the lowest train loss), B the lowest mean final train
    loss (one lucky seed; its median is worse than C's), D the lowest median but a seed diverged.
    The table's rule (median final train loss, diverged last) picks C, and so must every figure."""
    final_train = {0.1: [3.0, 3.0, 3.0], 0.2: [0.1, 2.5, 2.5], 0.3: [2.0, 2.0, 2.0], 0.4: [1.0, 1.0, -0.5]}
    parts = []
    for lr, finals in final_train.items():
        for seed, final in enumerate(finals):
            part = runs(optimizers=("sgd", "ef"), seeds=(seed,), lr=lr)
            part["train_loss"] *= abs(final) / part.train_loss.min()
            part["loss"] *= 1e-3 if lr == 0.1 else 1.0
            part["diverged"] = (final < 0) & (part.step == part.step.max())  # -: this seed diverged at the end
            parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    listed = tables.best_hyperparameters(frame)
    assert set(listed["lr"]) == {0.3}
    chosen = frame[frame.lr == 0.3]
    for draw, value in ((networks.training, "train_loss"), (networks.accuracy, "test_accuracy"),
                        (networks.cosine, "cos_ef_ngd")):
        drawn = draw(frame)
        line = drawn.figure.axes[0].get_lines()[0]
        rows = chosen[(chosen.optimizer == "sgd" if value != "cos_ef_ngd" else chosen.optimizer == "ef")
                      & (chosen.framework == "torch") & chosen[value].notna()]
        assert line.get_ydata()[-1] == pytest.approx(rows[rows.step == rows.step.max()][value].median())
        assert "digits-mlp, SGD, PyTorch CPU: 4 hyperparameter settings, the best-hyperparameters table's " \
               "(lowest median final loss) drawn." in drawn.notes


def test_training_says_where_columns_were_tuned_to_different_settings():
    frame = runs(optimizers=("sgd", "ngd"))
    frame.loc[(frame.optimizer == "ngd") & (frame.framework == "jax"), "lr"] = 0.3
    notes = networks.training(frame, y="loss", smooth=1).notes
    assert ("digits-mlp, NGD: tuned to different settings per column (JAX CPU: lr 0.3; PyTorch CPU: lr 0.1); "
            "the curves differ by that too.") in notes
    assert not any(n.startswith("digits-mlp, SGD: tuned") for n in notes)


def test_training_names_the_fisher_each_curvature_optimizer_ran_with():
    """NGD's legend name is the true Fisher's; a note says where the runs sampled it instead (and
    how many labels), for NGD and K-FAC together when they share it; no note without a Fisher."""
    frame = runs(optimizers=("sgd", "ngd", "kfac", "ef"))
    curvature = frame.optimizer.isin(["ngd", "kfac"])
    frame["fisher"], frame["samples"] = np.where(curvature, "mc", None), np.where(curvature, 1.0, np.nan)
    notes = networks.training(frame).notes
    assert "NGD, K-FAC: the Monte-Carlo Fisher, 1 sampled label per example (not the expectation over labels)." \
        in notes
    frame.loc[frame.optimizer == "ngd", ["fisher", "samples"]] = ["exact", 1.0]
    frame.loc[frame.optimizer == "kfac", "samples"] = 4.0
    notes = networks.training(frame).notes
    assert "NGD: the exact Fisher." in notes
    assert "K-FAC: the Monte-Carlo Fisher, 4 sampled labels per example (not the expectation over labels)." in notes
    assert not any("Fisher" in n for n in networks.training(runs(optimizers=("sgd", "ngd"))).notes)


def test_training_notes_diverged_seeds():
    frame = runs(optimizers=("sgd",))
    frame.loc[frame.seed == 1, "diverged"] = True
    drawn = networks.training(frame[~((frame.seed == 1) & (frame.step > 50))], y="loss", smooth=1)
    assert "digits-mlp, SGD, PyTorch CPU: 1 of 2 seeds diverged (drawn up to their divergence)." in drawn.notes


def test_notes_say_what_each_tasks_runs_were():
    """Model, batch size, steps, dtype and seeds per task, and SGD's momentum: what the config set
    and the caption cannot know."""
    frame = runs(tasks=("digits-mlp", "mnist1d-mlp"), optimizers=("sgd", "ef"), seeds=(0, 1, 2), steps=60)
    frame.loc[frame["optimizer"] == "sgd", "momentum"] = 0.9
    frame.loc[frame["task"] == "mnist1d-mlp", "batch_size"] = np.nan
    notes = networks.training(frame).notes
    assert "digits-mlp: MLP 64-128-10 (tanh), 9610 parameters; batch 128, 60 steps, float32, 3 seeds." in notes
    assert "mnist1d-mlp: MLP 40-100-100-10 (relu), 15210 parameters; full batch, 60 steps, float32, 3 seeds." in notes
    assert "SGD: momentum 0.9." in notes
    # the cosine figure draws the EF runs alone: their setup, and no word of SGD
    notes = networks.cosine(frame).notes
    assert "digits-mlp: MLP 64-128-10 (tanh), 9610 parameters; batch 128, 60 steps, float32, 3 seeds." in notes
    assert not any(n.startswith("SGD") for n in notes)
    # where every drawn run diverged, the runs' length is not known: the note says how far they went
    frame["diverged"] = True
    notes = networks.training(frame[frame["step"] <= 30]).notes
    assert "digits-mlp: MLP 64-128-10 (tanh), 9610 parameters; batch 128, 30 steps at most (every run diverged), " \
           "float32, 3 seeds." in notes


def test_cosine_draws_the_measured_rows_only():
    frame = runs(optimizers=("sgd", "ef"))
    drawn = networks.cosine(frame)
    for ax in drawn.figure.axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["EF"]
        assert len(lines[0].get_xdata()) == 11  # steps 0, 10, ..., 100
        assert ax.get_yscale() == "linear" and ax.get_ylim()[1] == pytest.approx(1.02)
        assert ax.get_ylabel() in ("cos(EF, NGD)", "")
    empty = networks.cosine(frame.drop(columns="cos_ef_ngd"))
    assert any("No cos_ef_ngd" in n for n in empty.notes) and not _data_axes(empty)


def test_cosine_draws_the_ngd_steps_cosine_with_the_gradient_beside_it():
    """cos_ngd_grad, where the table has it, is each optimizer's dotted gauge in its colour: the median
    over seeds on the rows measured, with one legend entry; a table without it (an older run) draws
    the cosine alone."""
    frame = runs(optimizers=("sgd", "ef"))
    measured = frame["cos_ef_ngd"].notna()
    frame["cos_ngd_grad"] = np.where(measured, 0.2 + 0.01 * frame["step"] + 0.1 * frame["seed"], np.nan)
    drawn = networks.cosine(frame)
    for ax in _data_axes(drawn):
        cosine, gauge = ax.get_lines()
        assert cosine.get_label() == "EF" and gauge.get_gid() == "gauge" and gauge.get_linestyle() == ":"
        assert _color(gauge) == pytest.approx(mcolors.to_rgb(style.COLORS["ef"]))
        np.testing.assert_allclose(gauge.get_ydata(), 0.25 + 0.01 * np.arange(0, 101, 10))  # seeds 0, 1: +0.05
    labels = [text.get_text() for text in drawn.figure.legends[0].get_texts()]
    assert labels == ["EF", style.GAUGE_LABEL]
    alone = networks.cosine(frame.drop(columns="cos_ngd_grad"))
    assert all(len(ax.get_lines()) == 1 for ax in _data_axes(alone))
    assert [text.get_text() for text in alone.figure.legends[0].get_texts()] == ["EF"]
    assert any("No cos_ngd_grad in the table" in note for note in alone.notes)


def test_cosine_gauge_is_smoothed_with_the_cosine_and_left_out_where_a_run_lacks_it():
    """With smoothing, the gauge is a running mean over the same window as the cosine (on a ramp that
    rises 0.01 a measurement, a mean over 3 lags it by 0.01; the first two rows average fewer); a
    framework whose runs predate the gauge draws the cosine alone, with a note naming it, while the
    legend keeps the gauge's entry."""
    frame = runs(optimizers=("ef",))
    frame["cos_ngd_grad"] = np.where(frame["cos_ef_ngd"].notna(), 0.2 + 0.001 * frame["step"], np.nan)
    frame.loc[frame["framework"] == "jax", "cos_ngd_grad"] = np.nan
    drawn = networks.cosine(frame, smooth=3)
    assert "Cosines as a running mean over 3 measurements." in drawn.notes
    note = "digits-mlp, EF, JAX CPU: no cos_ngd_grad in its table (runs made before it was recorded)."
    assert note in drawn.notes and sum("no cos_ngd_grad" in n for n in drawn.notes) == 1
    for ax in _data_axes(drawn):
        gauges = [line for line in ax.get_lines() if line.get_gid() == "gauge"]
        if "JAX" in ax.get_title():
            assert gauges == []
            continue
        (gauge,) = gauges
        expected = 0.2 + 0.001 * np.arange(0, 101, 10) - np.minimum(np.arange(11), 2) * 0.005  # first rows: partial
        np.testing.assert_allclose(gauge.get_ydata(), expected, atol=1e-12)
    assert [text.get_text() for text in drawn.figure.legends[0].get_texts()] == ["EF", style.GAUGE_LABEL]


def test_smoothing_accepts_tables_concatenated_as_read():
    """pd.concat of two tables as read repeats their row labels; the smoothed cosine is drawn as from
    the renumbered table (it raised a ValueError)."""
    stacked = pd.concat([runs(optimizers=("ef",), combos=[combo]) for combo in COMBOS])
    assert stacked.index.has_duplicates
    drawn, renumbered = (networks.cosine(f, smooth=3) for f in (stacked, stacked.reset_index(drop=True)))
    for ax, expected in zip(_data_axes(drawn), _data_axes(renumbered), strict=True):
        for line, same in zip(ax.get_lines(), expected.get_lines(), strict=True):
            np.testing.assert_array_equal(line.get_xydata(), same.get_xydata())


def test_accuracy_against_time_with_markers():
    drawn = networks.accuracy(runs())
    ax = drawn.figure.axes[0]
    assert ax.get_xlabel() == "time [s]" and ax.get_ylabel() == "test accuracy"
    lines = ax.get_lines()
    assert len(lines) == 3 and all(line.get_marker() == "o" for line in lines)
    assert len(lines[0].get_xdata()) == 4 and ax.get_xscale() == "log"  # steps 25, .., 100: not time 0
    # the axis starts below the worst final accuracy (sgd: 1 - 0.9 exp(-1) = 0.67) by twice its error
    worst = 1 - 0.9 * np.exp(-RATES["sgd"] * 100)
    assert ax.get_ylim() == pytest.approx((round(worst - 2 * (1 - worst), 2), 1.0)) == (0.01, 1.0)
    assert "digits-mlp: accuracy axis from 0.01; the first evaluations lie below." in drawn.notes


def test_accuracy_axis_keeps_its_own_limits_when_the_floor_is_below_zero():
    """A worst final accuracy under 2/3 puts the floor below 0: the axis is left as drawn, with no note."""
    frame = runs()
    frame["test_accuracy"] *= 0.9  # sgd ends at 0.60: 0.60 - 2 x 0.40 < 0
    drawn = networks.accuracy(frame)
    ax = drawn.figure.axes[0]
    lowest = min(line.get_ydata().min() for line in ax.get_lines())  # sgd's first evaluation: 0.27
    assert ax.get_ylim()[0] < lowest < 0.3  # matplotlib's own margin, every point in view
    assert not [note for note in drawn.notes if "accuracy axis from" in note]


def test_time_axes_label_each_decade_and_accuracy_axes_have_ticks_to_read_values_off():
    """Runs over four decades of time (1 ms to 10 s): a time axis labels each decade, not every third
    as matplotlib does on a panel this narrow; an accuracy axis has at least four ticks in view."""
    frame = runs()
    frame["time_s"] = 1e-3 * 10 ** (frame["step"] / 25)
    in_view = lambda ticks, limits: [t for t in ticks if min(limits) <= t <= max(limits)]  # noqa: E731
    training, accuracy = networks.training(frame), networks.accuracy(frame)
    time_axes = [ax for drawn in (training, accuracy) for ax in _data_axes(drawn) if ax.get_xscale() == "log"]
    assert len(time_axes) == 4
    for ax in time_axes:
        ax.figure.canvas.draw()
        decades = np.log10(in_view(ax.get_xticks(), ax.get_xlim()))
        assert list(decades[-4:]) == pytest.approx([-2, -1, 0, 1]) and np.diff(decades) == pytest.approx(1)
    for ax in _data_axes(accuracy):
        assert len(in_view(ax.get_yticks(), ax.get_ylim())) >= 4


def test_accuracy_axis_starts_per_task():
    """Each task's axis starts below its own worst final accuracy: a task where every optimizer ends
    near 1 is not squeezed into its top percent by another task's weak optimizer."""
    easy = runs(tasks=("digits-mlp",), optimizers=("adam", "ngd"))
    easy["test_accuracy"] = 0.98 + 0.01 * easy["test_accuracy"]  # final accuracies 0.98..0.99
    hard = runs(tasks=("mnist1d-mlp",))  # sgd ends at 0.67: an axis from 0
    drawn = networks.accuracy(pd.concat([easy, hard]))
    ncols = len(COMBOS)
    lows = [round(ax.get_ylim()[0], 2) for ax in drawn.figure.axes]
    final = 0.98 + 0.01 * (1 - 0.9 * np.exp(-RATES["adam"] * 100))  # adam's, the lower of the two
    assert lows[:ncols] == [round(final - 2 * (1 - final), 2)] * ncols and lows[:ncols][0] > 0.9
    assert all(low <= 0.67 for low in lows[ncols:])
    assert f"digits-mlp: accuracy axis from {lows[0]:.2f}; the first evaluations lie below." in drawn.notes


def test_accuracy_axis_starts_from_the_median_seed_not_an_outlier():
    """The floor is taken from each optimizer's median final accuracy over seeds: one seed of three
    that ended at 0.35 (a bad initialisation) does not pull the axis down to 0, as the mean (0.75)
    or the worst seed would, and squeeze the others' last percent."""
    frame = runs(optimizers=("adam", "ngd"), seeds=(0, 1, 2))
    last = frame["step"] == frame["step"].max()
    frame.loc[last, "test_accuracy"] = 0.95
    frame.loc[last & (frame["seed"] == 2), "test_accuracy"] = 0.35
    drawn = networks.accuracy(frame)
    assert drawn.figure.axes[0].get_ylim()[0] == pytest.approx(0.85)  # 0.95 - 2 x 0.05
    assert "digits-mlp: accuracy axis from 0.85; the first evaluations lie below." in drawn.notes


def test_networks_figures_accept_a_real_run():
    from natgrad_impls import runner

    frame = pd.concat([runner.run("digits-mlp", "ef", "torch", dtype="float32", steps=4, eval_every=2, seed=seed,
                                  hyperparameters={"lr": 0.01, "damping": 1e-2}, cos_ef_ngd=True, progress=False)
                       for seed in (0, 1)])
    for figure, lines in ((networks.training, 1), (networks.cosine, 2), (networks.accuracy, 1)):  # cosine: + gauge
        drawn = figure(frame)
        assert len(_data_axes(drawn)) >= 1 and len(_data_axes(drawn)[0].get_lines()) == lines
    table = tables.best_hyperparameters(frame)
    assert table.loc[0, "optimizer"] == "ef" and table.loc[0, "seeds"] == 2 and table.loc[0, "objective"] == "train_loss"


# -- cost -----------------------------------------------------------------------------------------------

def cost_rows(combos=COMBOS + [("torch", "cuda")], tasks=("digits-mlp", "mnist1d-mlp"), settings=tuple(timing.SETTINGS)):
    rows = []
    for task in tasks:
        for framework, device in combos:
            for i, label in enumerate(settings):
                optimizer = timing.setting(label)[0]
                gradient = SECONDS[framework, device]
                rows.append(dict(task=task, optimizer=optimizer, setting=label, framework=framework, device=device,
                                 dtype="float32", batch_size=128, num_params=9610, step_s=gradient * (1 + i),
                                 gradient_s=gradient, gradient_equivalents=1.0 + i))
    return pd.DataFrame(rows)


def test_step_cost_dots_per_setting_framework_and_device():
    drawn = cost.step_cost(cost_rows())
    axes = drawn.figure.axes
    assert len(axes) == 2 and all(ax.get_xscale() == "log" for ax in axes)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["SGD", "SGD (momentum)", "Adam", "EF", "NGD (exact)", "NGD (MC)", "K-FAC"]
    dots = [line for line in axes[0].get_lines() if line.get_linestyle() == "None"]
    assert len(dots) == 7 * 3
    kfac = [d for d in dots if d.get_xdata()[0] == 7.0]
    assert {d.get_marker() for d in kfac} == {"o", "^"}
    assert all(_color(d) == pytest.approx(mcolors.to_rgb(style.COLORS["kfac"])) for d in kfac)
    hollow = [d for d in kfac if d.get_markerfacecolor() in ("white", "w", (1.0, 1.0, 1.0, 1.0))]
    assert len(hollow) == 1  # the GPU one
    assert [t.get_text() for t in drawn.figure.legends[0].get_texts()] == ["PyTorch CPU", "JAX CPU", "PyTorch GPU"]
    partial = cost.step_cost(cost_rows(settings=("sgd", "ngd-mc")))
    assert any("Adam: not in the table" in n for n in partial.notes)


def test_cost_figures_name_the_rows_timed_on_a_busy_machine(tmp_path):
    """Rows `timing.remeasure_contended` marks contended are named in both cost figures' notes, from
    the table as the timing job writes it (a CSV: the column comes back as bools)."""
    table = cost_rows()
    table["contended"] = (table.setting == "ngd-mc") & (table.framework == "jax")
    table.to_csv(tmp_path / "cost.csv", index=False)
    read = pd.read_csv(tmp_path / "cost.csv")
    for drawn in (cost.step_cost(read), cost.devices(read)):
        (note,) = [n for n in drawn.notes if "busy machine" in n]
        assert note.endswith("after 2 new measurements): digits-mlp jax cpu ngd-mc, mnist1d-mlp jax cpu ngd-mc."), note
    assert not [n for n in cost.step_cost(cost_rows()).notes if "busy" in n]


@pytest.mark.parametrize("combos", [COMBOS[:1], COMBOS, COMBOS + [("torch", "cuda"), ("jax", "cuda")]])
def test_step_cost_dots_of_one_setting_stand_clear_of_each_other(combos):
    """Within a setting's row the framework/device dots sit one above another, at least a marker's
    height apart, so that equal costs (SGD's, near 1) stay four dots and not one blob; a lone dot
    sits on its row."""
    drawn = cost.step_cost(cost_rows(combos=combos, tasks=("digits-mlp",)))
    ax = drawn.figure.axes[0]
    drawn.figure.canvas.draw()
    sgd = [line for line in ax.get_lines() if line.get_linestyle() == "None" and abs(line.get_ydata()[0]) < 0.5]
    assert len(sgd) == len(combos)
    if len(combos) == 1:
        assert sgd[0].get_ydata()[0] == 0.0
        return
    points = sorted(ax.transData.transform(line.get_xydata())[0, 1] * 72 / drawn.figure.dpi for line in sgd)
    assert np.diff(points).min() >= sgd[0].get_markersize()


def test_step_cost_marks_the_kfac_floors_where_the_table_has_them():
    """Two bars on the K-FAC row: the multiply-adds of the gradient and the preconditioning (black)
    and of the whole step (grey), each in the legend; none where the table has no floor columns."""
    rows = cost_rows(tasks=("mlp",))
    rows["floor_gradient_equivalents"] = np.where(rows["setting"] == "kfac", 4.5, np.nan)
    rows["floor_with_factors"] = np.where(rows["setting"] == "kfac", 7.0, np.nan)
    drawn = cost.step_cost(rows)
    ax = drawn.figure.axes[0]
    bars = {line.get_xdata()[0]: line for line in ax.get_lines() if line.get_marker() == "|"}
    assert sorted(bars) == [4.5, 7.0]
    assert mcolors.to_rgb(bars[4.5].get_color()) == (0, 0, 0) and mcolors.to_rgb(bars[7.0].get_color()) != (0, 0, 0)
    assert {bar.get_ydata()[0] for bar in bars.values()} == {list(timing.SETTINGS).index("kfac")}  # on the K-FAC row
    legend = [t.get_text() for t in drawn.figure.legends[0].get_texts()]
    assert legend[-2:] == ["multiply-adds: gradient + preconditioning", "+ factors and inversions"]
    plain = cost.step_cost(cost_rows(tasks=("mlp",)))
    assert not [line for line in plain.figure.axes[0].get_lines() if line.get_marker() == "|"]


def scaling_rows(widths=(32, 64, 128, 256), batch_sizes=(16, 64, 256), settings=("sgd", "ngd-exact", "ngd-mc")):
    """Power laws: step time = c * width^2 * batch (ngd-exact: width * batch^2), small noise."""
    rng = np.random.default_rng(0)
    rows = []
    for combo in COMBOS:
        for label in settings:
            a, b = (1, 2) if label == "ngd-exact" else (2, 1)
            for w in widths:
                for n in batch_sizes:
                    step = 1e-9 * w**a * n**b * np.exp(rng.normal(0, 1e-3))
                    rows.append(dict(framework=combo[0], device=combo[1], dtype="float32",
                                     optimizer=timing.setting(label)[0], setting=label, width=w, batch_size=n,
                                     num_params=w * 794 + 10, step_s=step, gradient_s=1e-9 * w * n,
                                     gradient_equivalents=step / (1e-9 * w * n)))
    return pd.DataFrame(rows)


def test_fitted_slope_recovers_power_laws():
    x = np.array([32, 64, 128, 256.0])
    assert cost.fitted_slope(x, 3e-7 * x**2) == pytest.approx(2.0, abs=0.01)
    assert np.isnan(cost.fitted_slope([64, 64], [1.0, 2.0]))


def test_scaling_log_log_with_slopes_in_the_legend():
    drawn = cost.scaling(scaling_rows())
    axes = np.array(drawn.figure.axes).reshape(2, 2)
    for ax in axes.ravel():
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert len(ax.get_lines()) == 4  # three settings and the gradient
    by_width = [t.get_text() for t in axes[0, 0].get_legend().get_texts()]
    by_batch = [t.get_text() for t in axes[0, 1].get_legend().get_texts()]
    slope = lambda text: float(text.rsplit(": ", 1)[1])  # noqa: E731
    assert [t.rsplit(":", 1)[0] for t in by_width] == ["SGD", "NGD (exact)", "NGD (MC)", "gradient"]
    assert [slope(t) for t in by_width] == pytest.approx([2, 1, 2, 1], abs=0.01)
    assert [slope(t) for t in by_batch] == pytest.approx([1, 2, 1, 1], abs=0.01)
    exact, mc = axes[0, 0].get_lines()[1:3]
    assert _color(exact) == pytest.approx(mcolors.to_rgb(style.COLORS["ngd"]))
    assert _color(mc) != pytest.approx(_color(exact)) and mc.get_linestyle() == exact.get_linestyle()
    # markers as in the other cost figures: the framework's shape, filled on a CPU
    for row, (framework, _) in enumerate(COMBOS):
        for line in axes[row, 0].get_lines()[:3]:
            assert line.get_marker() == style.FRAMEWORK_MARKERS[framework]
            assert mcolors.to_rgb(line.get_markerfacecolor()) == pytest.approx(_color(line))
    assert "batch size 256" in axes[0, 0].get_xlabel()
    one_width = cost.scaling(scaling_rows(widths=(128,)))
    assert any("no width sweep" in n for n in one_width.notes)


def test_scaling_slope_is_that_of_the_largest_sizes():
    """A line flat over its small widths (per-call overhead) and quadratic over the largest two: its
    legend gives 2, the growth there, where a fit over all four would give about 1."""
    rows = scaling_rows(settings=("sgd",))
    rows["step_s"] = 1e-9 * np.maximum(rows["width"], 128) ** 2 * rows["batch_size"]  # widths 32 to 256
    legend = [t.get_text() for t in cost.scaling(rows).figure.axes[0].get_legend().get_texts()]
    assert legend[0] == "SGD: 2.00"
    assert cost.fitted_slope([32, 64, 128, 256], [128**2] * 3 + [256**2]) < 1.2  # what a fit over all gives


def test_a_variant_has_its_shade_whichever_siblings_a_table_has():
    """NGD (MC) is the lighter blue in every cost figure, also in a table without NGD (exact)."""
    alone, both = cost.setting_style("ngd-mc"), cost.setting_style("ngd-exact")
    assert both["color"] == style.COLORS["ngd"] and alone["color"] != both["color"]
    drawn = cost.scaling(scaling_rows(settings=("sgd", "ngd-mc")))
    assert _color(drawn.figure.axes[0].get_lines()[1]) == pytest.approx(alone["color"])


def test_cost_panels_share_their_time_axis_and_label_it_on_every_row():
    """Tasks compare at a glance: one x range per column (the step times differ by task), and each
    row says what its axis is."""
    rows = cost_rows(combos=COMBOS + [("torch", "cuda")])
    slower = rows["task"] == "mnist1d-mlp"
    rows.loc[slower, ["step_s", "gradient_s"]] *= 30  # a decade and a half apart
    rows.loc[slower & (rows["setting"] == "ngd-exact"), "gradient_equivalents"] *= 10
    drawn = cost.devices(rows)
    axes = np.array(drawn.figure.axes).reshape(2, 2)
    for column in axes.T:
        assert column[0].get_xlim() == column[1].get_xlim()
        assert [ax.get_xlabel() for ax in column] == ["time per step [s]"] * 2
        assert all(label.get_visible() for ax in column for label in ax.get_xticklabels())
    steps = cost.step_cost(rows)
    assert steps.figure.axes[0].get_xlim() == steps.figure.axes[1].get_xlim()
    # a task without GPU rows: its empty panel hides its own ticks, not those of the column it shares
    partial = cost.devices(rows[(rows["task"] == "digits-mlp") | (rows["device"] == "cpu")])
    (drawn_panel, empty_panel), _ = np.array(partial.figure.axes).reshape(2, 2).T
    partial.figure.canvas.draw()
    assert [t.get_text() for t in drawn_panel.get_xticklabels() if t.get_text()], "ticks of the drawn panel gone"
    assert not [t.get_text() for t in empty_panel.get_xticklabels() if t.get_text()]


def test_devices_pairs_and_a_note_without_gpu():
    drawn = cost.devices(cost_rows(combos=COMBOS + [("torch", "cuda"), ("jax", "cuda")], tasks=("digits-mlp",)))
    left, right = drawn.figure.axes
    assert left.get_xscale() == right.get_xscale() == "log"
    joins = lambda ax: [line for line in ax.get_lines() if line.get_linestyle() == "-"]  # noqa: E731
    assert len(joins(left)) == 7 * 2 and len(joins(right)) == 7 * 2  # per setting: per framework / per device
    assert not drawn.notes
    cpu_only = cost.devices(cost_rows(tasks=("digits-mlp",), combos=COMBOS))
    (right,) = cpu_only.figure.axes
    assert len(joins(right)) == 7 and right.get_title() == "digits-mlp: PyTorch against JAX"
    assert "CPU against GPU not drawn: no GPU rows." in cpu_only.notes
    one_task_gpu = cost.devices(pd.concat([cost_rows(tasks=("digits-mlp",)), cost_rows(tasks=("mnist1d-mlp",), combos=COMBOS)]))
    assert "mnist1d-mlp: CPU against GPU not drawn, no GPU rows." in one_task_gpu.notes
    nothing = cost.devices(cost_rows(tasks=("digits-mlp",), combos=[("torch", "cpu")]))
    assert not _data_axes(nothing) and len(nothing.notes) == 3


def test_devices_markers_show_framework_by_shape_and_device_by_fill():
    """In both comparisons a point's marker is its framework's (`style.FRAMEWORK_MARKERS`) and its
    fill its device's: filled on CPU, hollow on GPU, as in the step-cost figure. Each point is known
    by its time: the setting's row times its framework and device's gradient time (`cost_rows`)."""
    combos = COMBOS + [("torch", "cuda"), ("jax", "cuda")]
    drawn = cost.devices(cost_rows(combos=combos, tasks=("digits-mlp",)))
    for ax in drawn.figure.axes:
        seen = set()
        for dot in (line for line in ax.get_lines() if line.get_linestyle() == "None"):
            x, y = dot.get_xdata()[0], dot.get_ydata()[0]
            (combo,) = [c for c in combos if SECONDS[c] * (1 + round(y)) == pytest.approx(x)]
            seen.add(combo)
            framework, device = combo
            assert dot.get_marker() == style.FRAMEWORK_MARKERS[framework], (ax.get_title(), combo)
            hollow = mcolors.to_rgb(dot.get_markerfacecolor()) == (1.0, 1.0, 1.0)
            assert hollow == (device == "cuda"), (ax.get_title(), combo)
            if device == "cpu":
                assert mcolors.to_rgb(dot.get_markerfacecolor()) == pytest.approx(mcolors.to_rgb(dot.get_color()))
        assert seen == set(combos), ax.get_title()
    right = drawn.figure.axes[1]
    assert right.get_title() == "digits-mlp: PyTorch against JAX"
    markers = {dot.get_marker() for dot in right.get_lines() if dot.get_linestyle() == "None"}
    assert markers == {style.FRAMEWORK_MARKERS["torch"], style.FRAMEWORK_MARKERS["jax"]}


def test_panels_of_a_task_share_one_loss_axis():
    """Panels side by side compare on one scale: with torch's losses 100 x jax's, all four panels of
    the task (against step and time, PyTorch and JAX) span one y range, which covers both."""
    frame = runs(optimizers=("sgd",))
    frame.loc[frame.framework == "torch", "train_loss"] *= 100
    axes = networks.training(frame).figure.axes
    limits = {ax.get_ylim() for ax in axes}
    assert len(axes) == 4 and len(limits) == 1
    low, high = limits.pop()
    assert low <= frame.train_loss.min() and high >= frame.train_loss.max()


def test_time_panels_put_each_step_at_the_median_clock_over_seeds():
    """Seeds' clocks differ: with seed 2 twice as slow as seed 0 (and seed 1 5 % slower), a time panel
    puts each evaluation at the median time over seeds (seed 1's), not at the mean the slow seed pulls."""
    frame = runs(optimizers=("sgd",), combos=[("torch", "cpu")], seeds=(0, 1, 2))
    frame["time_s"] = frame.step * 1e-3 * frame.seed.map({0: 1.0, 1: 1.05, 2: 2.0})
    time_panel = networks.training(frame).figure.axes[1]
    assert time_panel.get_xlabel() == "time [s]"
    (line,) = time_panel.get_lines()
    assert line.get_xdata() == pytest.approx([step * 1.05e-3 for step in (25, 50, 75, 100)])


def test_optimizers_keep_the_papers_line_styles():
    """The paper drew GD dashed, NGD solid and EF dash-dot; Adam is dotted and K-FAC long-dashed
    (style's docstring), and no two optimizers share a line style or a colour, so that a figure
    printed in grey still tells them apart."""
    from matplotlib.lines import _get_dash_pattern

    pattern = {o: _get_dash_pattern(style.LINESTYLES[o])[1] for o in style.OPTIMIZERS}
    assert pattern["ngd"] is None  # solid
    assert len(pattern["sgd"]) == 2 and len(pattern["kfac"]) == 2  # one dash and one gap a period
    assert pattern["kfac"][0] > pattern["sgd"][0]  # long dashes
    assert len(pattern["adam"]) == 2 and pattern["adam"][0] <= 1  # dots
    on = pattern["ef"][0::2]
    assert len(on) == 2 and max(on) > 3 * min(on)  # a dash, then a dot
    distinct = len(style.OPTIMIZERS)
    assert len(set(pattern.values())) == distinct
    assert len({tuple(style.COLORS[o]) for o in style.OPTIMIZERS}) == distinct


def test_cost_figures_draw_the_median_of_a_settings_rounds():
    """A table of several rounds has several rows per setting: each figure draws their median, not
    the mean one busy round pulls up (rounds of 2, 3 and 40 gradient-equivalents: 3; step times 3 x
    each device's gradient time)."""
    rows = cost_rows(combos=[("torch", "cpu"), ("torch", "cuda")], tasks=("digits-mlp",), settings=("sgd",))
    rounds = pd.concat([rows.assign(gradient_equivalents=g, step_s=rows.gradient_s * g) for g in (2.0, 3.0, 40.0)])
    dots = [line.get_xdata()[0] for line in cost.step_cost(rounds).figure.axes[0].get_lines()
            if line.get_linestyle() == "None"]
    assert dots == [3.0, 3.0]
    (cpu_against_gpu,) = cost.devices(rounds).figure.axes
    points = sorted(line.get_xdata()[0] for line in cpu_against_gpu.get_lines() if line.get_linestyle() == "None")
    assert points == pytest.approx([3 * SECONDS["torch", "cuda"], 3 * SECONDS["torch", "cpu"]])


def test_step_cost_draws_each_tasks_own_costs_in_its_panel():
    """One panel per task, each with that task's costs: mnist1d-mlp's steps cost 10 x digits-mlp's
    here (1 and 2 against 10 and 20 gradient-equivalents for sgd and kfac)."""
    settings = ("sgd", "kfac")
    rows = pd.concat([cost_rows(tasks=("digits-mlp",), settings=settings),
                      cost_rows(tasks=("mnist1d-mlp",), settings=settings).assign(
                          gradient_equivalents=lambda f: 10 * f.gradient_equivalents)])
    axes = cost.step_cost(rows).figure.axes
    assert len(axes) == 2
    for ax, (task, scale) in zip(axes, [("digits-mlp", 1), ("mnist1d-mlp", 10)]):
        assert ax.get_title() == task
        dots = {(round(line.get_ydata()[0]), line.get_xdata()[0]) for line in ax.get_lines()
                if line.get_linestyle() == "None"}
        assert dots == {(0, 1.0 * scale), (1, 2.0 * scale)}, task


def test_cost_figures_list_settings_in_legend_order_whatever_the_tables_order():
    """Settings are listed in the order of timing.SETTINGS (SGD first, K-FAC last), as every legend
    is, not in the order the rows of a table happen to come in."""
    order = ["SGD", "SGD (momentum)", "Adam", "EF", "NGD (exact)", "NGD (MC)", "K-FAC"]
    shuffled = cost_rows(tasks=("digits-mlp",)).sample(frac=1.0, random_state=1)
    for draw in (cost.step_cost, cost.devices):
        ax = draw(shuffled).figure.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == order, draw.__name__


def test_fitted_slope_leaves_out_points_a_log_cannot_take():
    """A zero time (below the clock's resolution) or size has no logarithm: the power law is fitted to
    the other points, not turned into NaN or an error."""
    x = np.array([0.0, 32, 64, 128])
    assert cost.fitted_slope(x, 3e-7 * x**2) == pytest.approx(2.0)
    assert cost.fitted_slope([16, 32, 64, 128], [0.0, 2.0, 4.0, 8.0]) == pytest.approx(1.0)


def test_cost_table_real_call(capsys):
    table = timing.cost_table("digits-mlp", "torch", settings=("sgd", "kfac"), repeats=2)
    progress = [line for line in capsys.readouterr().out.splitlines() if "of 2)" in line]  # a line per setting
    assert [line.split(":")[1].strip() for line in progress] == ["digits-mlp torch cpu sgd", "digits-mlp torch cpu kfac"]
    assert re.search(r": [0-9.e+-]+ gradient-equivalents \(2 of 2\)$", progress[1])  # as first measured
    assert list(table.columns) == ["task", "optimizer", "setting", "framework", "device", "dtype", "batch_size",
                                   "num_params", "step_s", "gradient_s", "gradient_equivalents", "contended"]
    assert list(table.setting) == ["sgd", "kfac"] and set(table.task) == {"digits-mlp"}
    assert (table.batch_size == 128).all() and (table.num_params == 64 * 128 + 128 + 128 * 10 + 10).all()
    assert (table[["step_s", "gradient_s", "gradient_equivalents"]] > 0).all().all()
    with pytest.raises(ValueError, match="setting"):
        timing.cost_table("digits-mlp", "torch", settings=("newton",))


def test_scaling_table_real_call(capsys):
    table = timing.scaling_table("jax", "cpu", widths=(8, 16), batch_sizes=(4,), settings=("sgd", "ngd-mc"), repeats=2)
    assert "timing: jax cpu ngd-mc at width 16, batch 4: " in capsys.readouterr().out
    assert list(table.columns) == ["framework", "device", "dtype", "optimizer", "setting", "width", "batch_size",
                                   "num_params", "step_s", "gradient_s", "gradient_equivalents", "contended"]
    assert list(table.setting) == ["sgd", "sgd", "ngd-mc", "ngd-mc"] and list(table.optimizer)[-1] == "ngd"
    assert (table[["step_s", "gradient_s"]] > 0).all().all()
    cost.scaling(table)  # draws a real table


# -- tables ---------------------------------------------------------------------------------------------

def test_a_setting_that_diverged_on_a_seed_ranks_after_those_that_did_not():
    """Median 0.1 over seeds with one blown up loses to 0.2 on every seed: a setting at the edge of
    stability must not be chosen because two seeds of three survived it."""
    risky = runs(optimizers=("sgd",), seeds=(0, 1, 2), lr=1.0).assign(train_loss=lambda f: f.train_loss * 0.5)
    risky.loc[risky.seed == 2, "diverged"] = True
    safe = runs(optimizers=("sgd",), seeds=(0, 1, 2), lr=0.1)
    table = tables.best_hyperparameters(pd.concat([risky, safe]))
    assert (table.lr == 0.1).all() and not table.diverged.any()
    alone = tables.best_hyperparameters(risky)  # nothing safer: the best of what there is, marked diverged
    assert (alone.lr == 1.0).all() and alone.diverged.all()


def test_grid_edges_name_a_best_setting_on_the_edge_of_its_grid():
    tuning = pd.concat([runs(optimizers=("sgd", "ngd"), lr=lr).assign(train_loss=lambda f, lr=lr: f.train_loss / lr)
                        for lr in (0.01, 0.1, 1.0)])  # the largest lr is best
    middle = tuning.lr == 0.1
    tuning.loc[middle & (tuning.optimizer == "ngd"), "train_loss"] /= 100  # ngd: the middle one
    tuning = pd.concat([tuning, tuning[tuning.optimizer == "ngd"].assign(damping=1e-1, train_loss=lambda f: f.train_loss * 2)])
    table = tables.grid_edges(tuning).set_index(["optimizer", "framework"])
    edges = table["edge"]
    assert set(edges.xs("sgd")) == {"lr largest"}
    assert set(edges.xs("ngd")) == {"damping smallest"}  # lr inside; damping 1e-3 of {1e-3, 1e-1}
    # the tuning budgets: sgd 3 lrs; ngd 3 lrs at damping 1e-3 and 3 at 1e-1
    assert set(table["settings_tried"].xs("sgd")) == {3} and set(table["settings_tried"].xs("ngd")) == {6}
    one = tables.grid_edges(runs(optimizers=("sgd",)))  # one value tried: no edge to speak of
    assert (one["edge"] == "").all() and (one["settings_tried"] == 1).all()


def test_best_hyperparameters_of_tuned_runs_and_target_rule(tmp_path):
    frame = pd.concat([runs(optimizers=("sgd", "ngd"), lr=0.1),
                       runs(optimizers=("sgd",), lr=1.0).assign(train_loss=lambda f: f.train_loss * 3)])
    table = tables.best_hyperparameters(frame)
    assert list(table.optimizer) == ["sgd", "sgd", "ngd", "ngd"]
    assert (table.lr == 0.1).all() and (table.seeds == 2).all() and (table.objective == "train_loss").all()
    final = frame[(frame.lr == 0.1) & (frame.step == 100) & (frame.optimizer == "sgd")].train_loss.median()
    assert table.final_loss.iloc[0] == pytest.approx(final)
    last = frame[(frame.lr == 0.1) & (frame.step == 100) & (frame.optimizer == "sgd")]
    last = last.assign(test_accuracy=last.test_accuracy - 0.01 * last.seed)  # (the table's are the same)
    accuracy = tables.best_hyperparameters(pd.concat([frame[frame.step < 100], last]))
    assert accuracy[["final_test_accuracy_min", "final_test_accuracy", "final_test_accuracy_max"]].iloc[0].tolist() \
        == pytest.approx([last.test_accuracy.min(), last.test_accuracy.median(), last.test_accuracy.max()])
    # target: the worst of the best final losses (sgd, the slower), reached by everyone
    assert (table.target_loss == table.final_loss.max()).all()
    assert table.time_to_target_s.notna().all()
    ngd = table[table.optimizer == "ngd"].iloc[0]
    assert ngd.steps_to_target < 100 and ngd.time_to_target_s < table.time_to_target_s.iloc[0]
    html = tables.to_html(table)
    assert "<table" in html and "NGD" in html and "PyTorch" in html
    # counts are written as integers ("100", not "100.0"), also in a column with gaps
    written = pd.read_csv(results.write(table, tmp_path / "best.csv"), dtype=str)
    for column in ("seeds", "steps", "steps_to_target", "batch_size"):
        assert written[column].dropna().str.fullmatch(r"\d+").all(), written[column].tolist()


def test_tuning_on_several_seeds_picks_the_lowest_median_not_the_luckiest_seed():
    """The tune rule's choice (networks.tuning_seeds): lr 1 wins on seed 0 alone, lr 0.1 on the
    median of three seeds."""
    steady = runs(optimizers=("sgd",), seeds=(0, 1, 2), lr=0.1)
    lucky = runs(optimizers=("sgd",), seeds=(0, 1, 2), lr=1.0)
    lucky["train_loss"] *= lucky.seed.map({0: 0.5, 1: 2.0, 2: 2.0})
    table = tables.best_hyperparameters(pd.concat([steady, lucky]))
    assert (table.lr == 0.1).all() and (table.seeds == 3).all()
    one_seed = tables.best_hyperparameters(pd.concat([steady, lucky]).query("seed == 0"))
    assert (one_seed.lr == 1.0).all()


def test_best_hyperparameters_of_a_grid_frame():
    frame = runs(optimizers=("ef", "ngd"), seeds=(0,), combos=[("numpy", "cpu")]).drop(
        columns=["train_loss", "test_loss", "test_accuracy", "cos_ef_ngd"])
    other = frame.assign(lr=10.0, loss=np.inf, diverged=True)
    grid = pd.concat([frame.assign(best=True, repeat=0, chaotic=False), other.assign(best=False, repeat=0, chaotic=pd.NA),
                      frame.assign(best=True, repeat=1, chaotic=False, loss=frame.loss * 2)])
    table = tables.best_hyperparameters(grid)
    assert list(table.optimizer) == ["ef", "ngd"] and (table.lr == 0.1).all()
    assert (table.objective == "loss").all() and not table.chaotic.any()
    final = frame[frame.step == 100].groupby("optimizer").loss.first()
    assert table.final_loss.tolist() == pytest.approx(final.tolist())
    # one seed: the range is the chaos repeats' (repeat 1 ends at twice repeat 0's loss)
    assert table.final_loss_min.tolist() == pytest.approx(final.tolist())
    assert table.final_loss_max.tolist() == pytest.approx((2 * final).tolist())
    # a repeat that diverges widens the range to inf
    diverging = grid.assign(diverged=(grid.repeat == 1) & (grid.optimizer == "ef") | grid.diverged)
    assert tables.best_hyperparameters(diverging).final_loss_max.tolist() == [np.inf, pytest.approx(2 * final["ngd"])]


def test_time_to_target_counts_a_row_exactly_at_the_target():
    """The target is reached at the first row at or below it: sgd, the slowest, ends exactly at the
    target (its own final loss, 0.25, exact in binary) and gets there only at its last row."""
    frame = runs(optimizers=("sgd", "ngd"), seeds=(0,))
    sgd = frame.optimizer == "sgd"
    frame.loc[sgd, "train_loss"] = np.where(frame.loc[sgd, "train_loss"].notna(),
                                            0.25 + (100 - frame.loc[sgd, "step"]) / 64, np.nan)
    table = tables.best_hyperparameters(frame).set_index(["optimizer", "framework"])
    assert (table.target_loss == 0.25).all() and (table.loc["sgd"].final_loss == 0.25).all()
    assert (table.loc["sgd"].steps_to_target == 100).all()
    times = table.loc["sgd"].time_to_target_s.to_dict()
    assert times == pytest.approx({framework: 100 * SECONDS[framework, device] for framework, device in COMBOS})


def test_a_seed_that_never_reaches_the_target_counts_as_infinitely_slow():
    """Time to target is the low median over seeds with a seed that never gets there as inf: kfac's
    best (only) setting diverges on two seeds of three without reaching ngd's target, so it has no
    time to target, not the one seed's that got there."""
    frame = runs(optimizers=("ngd", "kfac"), seeds=(0, 1, 2))
    lost = (frame.optimizer == "kfac") & (frame.seed > 0)
    frame.loc[lost, "diverged"] = True
    frame.loc[lost & frame.train_loss.notna(), "train_loss"] = 5.0
    table = tables.best_hyperparameters(frame).set_index("optimizer")
    target = table.target_loss.iloc[0]
    reached = frame[(frame.optimizer == "kfac") & (frame.seed == 0) & (frame.train_loss <= target)]
    assert len(reached) and table.loc["ngd"].time_to_target_s.notna().all()  # seed 0 got there; ngd has times
    assert table.loc["kfac"].time_to_target_s.isna().all() and table.loc["kfac"].steps_to_target.isna().all()


def hand_runs(losses, lr=0.1, optimizer="sgd", framework="torch", every=10, step_s=0.5, diverged=()):
    """Runner-like rows by hand: per seed, the train loss at steps 0, every, 2 every, ... (`losses`, one
    list per seed), time_s = step x step_s; the seeds in `diverged` diverge at their last row."""
    rows = []
    for seed, seed_losses in enumerate(losses):
        for i, loss in enumerate(seed_losses):
            rows.append(dict(task="digits-mlp", optimizer=optimizer, framework=framework, device="cpu",
                             dtype="float32", seed=seed, lr=lr, step=i * every, loss=loss, train_loss=loss,
                             time_s=i * every * step_s, diverged=seed in diverged and i == len(seed_losses) - 1))
    return pd.DataFrame(rows)


def test_the_final_loss_is_where_a_run_ends_not_its_best_moment():
    """A setting that dips to 0.1 and climbs back to 3 ends at 3: ranked by its last train loss it
    loses to one that ends at 1, and the table gives 1 as the final loss."""
    frame = pd.concat([hand_runs([[4.0, 0.1, 3.0]], lr=1.0), hand_runs([[4.0, 2.0, 1.0]], lr=0.1)])
    table = tables.best_hyperparameters(frame)
    assert table.lr.tolist() == [0.1] and table.final_loss.tolist() == [1.0]


def test_a_setting_that_diverged_on_a_seed_sets_no_target():
    """sgd ends at 0.5 on three seeds; kfac's only setting ends at 2.0 but diverged on one seed of three.
    Its median is finite, yet it is one seed from blowing up: the target is sgd's 0.5, not 2.0."""
    frame = pd.concat([hand_runs([[4.0, 1.0, 0.5]] * 3), hand_runs([[4.0, 3.0, 2.0]] * 3, optimizer="kfac",
                                                                   diverged=(2,))])
    table = tables.best_hyperparameters(frame).set_index("optimizer")
    assert table.loc["kfac", "diverged"] and table.target_loss.tolist() == [0.5, 0.5]
    assert table.loc["sgd", "steps_to_target"] == 20 and pd.isna(table.loc["kfac", "steps_to_target"])


def test_where_every_setting_diverged_the_best_is_the_one_that_lasted_longest():
    """kfac's lr 0.01 falls to 0.2, then blows up at step 30; lr 1 is NaN at step 10. Both final
    losses are inf: the table took whichever its rows listed first, and the tuning job reruns that
    one on every seed. The one that lasted reached sgd's target (0.6) at step 10 on its way."""
    sgd = hand_runs([[4.0, 2.0, 1.0, 0.6]])
    lasted = hand_runs([[4.0, 0.5, 0.2, 900.0]], lr=0.01, optimizer="kfac").assign(diverged=True)  # (every row,
    early = hand_runs([[4.0, np.nan]], lr=1.0, optimizer="kfac").assign(diverged=True)  # as the runner writes)
    for order in ((sgd, lasted, early), (sgd, early, lasted)):
        table = tables.best_hyperparameters(pd.concat(order, ignore_index=True)).set_index("optimizer")
        assert table.loc["kfac", "lr"] == 0.01 and table.loc["kfac", "diverged"]
        assert table.target_loss.tolist() == [0.6, 0.6]
        assert table.loc["sgd", "steps_to_target"] == 30 and table.loc["kfac", "steps_to_target"] == 10
    # as the runner records them: the full-train loss at evaluations only (every 20 steps), the mini-batch
    # loss every step; both settings blow up between the same two evaluations, lr 0.01 later (step 39)
    def evaluated(lr, last):
        steps = np.arange(last + 1)
        return pd.DataFrame(dict(task="digits-mlp", optimizer="kfac", framework="torch", device="cpu",
                                 dtype="float32", seed=0, lr=lr, step=steps, loss=np.where(steps < last, 1.0, np.inf),
                                 train_loss=np.where(steps % 20 == 0, 2.0 - steps / 40, np.nan), time_s=steps * 0.1,
                                 diverged=True))
    for order in ((evaluated(0.01, 39), evaluated(1.0, 25)), (evaluated(1.0, 25), evaluated(0.01, 39))):
        assert tables.best_hyperparameters(pd.concat(order, ignore_index=True)).lr.tolist() == [0.01]
    # over seeds, the median of their last steps: lr 0.01's seeds last to steps 10, 30 and 30 (one blew
    # up earliest of all), lr 1's to 20 each
    lasted = hand_runs([[4.0, 900.0], [4.0, 2.0, 1.0, 900.0], [4.0, 2.0, 1.0, 900.0]], lr=0.01, diverged=(0, 1, 2))
    short = hand_runs([[4.0, 2.0, 900.0]] * 3, lr=1.0, diverged=(0, 1, 2))
    for order in ((lasted, short), (short, lasted)):
        assert tables.best_hyperparameters(pd.concat(order, ignore_index=True)).lr.tolist() == [0.01]


def test_a_best_setting_that_ends_above_its_start_sets_no_target():
    """sgd's best setting ends at 6, above the start (4): as the target, every run would reach it at
    step 0. The target is kfac's 0.5, which sgd never reaches."""
    frame = pd.concat([hand_runs([[4.0, 5.0, 6.0]]), hand_runs([[4.0, 1.0, 0.5]], optimizer="kfac")])
    table = tables.best_hyperparameters(frame).set_index("optimizer")
    assert table.target_loss.tolist() == [0.5, 0.5]
    assert table.loc["kfac", "steps_to_target"] == 20 and pd.isna(table.loc["sgd", "steps_to_target"])
    alone = tables.best_hyperparameters(hand_runs([[4.0, 5.0, 6.0]]))  # nothing improved: no target at all
    assert "target_loss" not in alone.columns or alone.target_loss.isna().all()
    level = pd.concat([hand_runs([[4.0, 4.0, 4.0]]), hand_runs([[4.0, 1.0, 0.5]], optimizer="kfac")])
    table = tables.best_hyperparameters(level).set_index("optimizer")  # ending at the start improved nothing
    assert table.target_loss.tolist() == [0.5, 0.5] and pd.isna(table.loc["sgd", "steps_to_target"])


def test_improvement_is_judged_against_the_median_start():
    """The start a setting must end below is the median over the seeds' step-0 losses (4 of 2, 4, 4):
    sgd ends at 3 on every seed, below 4, and sets the target (3), although seed 0 started at 2."""
    starts = [2.0, 4.0, 4.0]
    frame = pd.concat([hand_runs([[start, 3.0, 3.0] for start in starts]),
                       hand_runs([[start, 1.0, 0.5] for start in starts], optimizer="kfac")])
    assert tables.best_hyperparameters(frame).target_loss.tolist() == [3.0, 3.0]


def test_the_final_loss_and_its_range_are_the_median_min_and_max_over_seeds():
    """Three seeds ending at 0.5, 0.9 and 0.6: final loss 0.6, range 0.5 to 0.9, seeds 3."""
    row = tables.best_hyperparameters(hand_runs([[4.0, 1.0, 0.5], [4.0, 1.0, 0.9], [4.0, 1.0, 0.6]])).iloc[0]
    assert (row.final_loss_min, row.final_loss, row.final_loss_max, row.seeds) == (0.5, 0.6, 0.9, 3)


def test_a_grid_best_run_is_its_repeat_0_and_its_chaos_repeats_only_span_its_range():
    """A grid's best run is repeat 0; its chaos repeats (theta0 + 1e-14 noise) widen final_loss_min
    and _max only. A repeat that diverges makes the range reach inf, but neither makes the best run
    diverged nor moves its final loss (0.25), whatever order the rows come in."""
    run = pd.DataFrame(dict(task="breastcancer", optimizer="ef", framework="numpy", device="cpu", dtype="float64",
                            lr=0.1, damping=1e-3, step=[0, 1, 2], loss=[1.0, 0.5, 0.25], diverged=False, best=True,
                            repeat=0, chaotic=True))
    repeat = run.assign(repeat=1, loss=[1.0, 0.5, 8.0], diverged=[False, False, True])
    row = tables.best_hyperparameters(pd.concat([repeat, run], ignore_index=True)).iloc[0]
    assert row.final_loss == 0.25 and not row.diverged and row.chaotic
    assert (row.final_loss_min, row.final_loss_max) == (0.25, np.inf)
    assert row.steps_to_target == 2


def test_time_to_target_is_the_listed_settings_own():
    """Steps and time to target are those of the setting the table lists: lr 0.1 dips below the
    target (the best setting's final loss, 0.5) at step 10 but ends at 0.9; lr 1, the best, first
    gets there at step 20, at 10 s (0.5 s a step)."""
    frame = pd.concat([hand_runs([[4.0, 3.0, 0.5]], lr=1.0), hand_runs([[4.0, 0.4, 0.9]], lr=0.1)])
    row = tables.best_hyperparameters(frame).iloc[0]
    assert (row.lr, row.target_loss, row.steps_to_target, row.time_to_target_s) == (1.0, 0.5, 20, 10.0)


def test_grid_edges_judge_each_framework_by_its_own_grid():
    """torch tried lr 0.01 and 0.1 and is best at 0.1, the largest it tried; jax tried 0.1 and 1 and
    is best at 1. Against the two grids together (0.01, 0.1, 1) torch's best would look inside."""
    frame = pd.concat([hand_runs([[4.0, 2.0]], lr=0.01), hand_runs([[4.0, 1.0]], lr=0.1),
                       hand_runs([[4.0, 2.0]], lr=0.1, framework="jax"),
                       hand_runs([[4.0, 1.0]], lr=1.0, framework="jax")])
    edges = tables.grid_edges(frame).set_index("framework")["edge"]
    assert edges.to_dict() == {"torch": "lr largest", "jax": "lr largest"}


def test_html_tables_name_things_as_the_figures_do_to_four_significant_digits():
    """to_html: optimizer, framework and device by their legend names (K-FAC, JAX, GPU), floats to
    four significant digits (0.000123456 is 0.0001235, not 0.0001), gaps blank."""
    frame = pd.DataFrame(dict(optimizer=["kfac"], framework=["jax"], device=["cuda"], final_loss=[0.000123456],
                              time_to_target_s=[np.nan], diverged=[False]))
    page = tables.to_html(frame)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")  # a page the report can show
    left = set(re.findall(r"td:nth-child\((\d+)\)[^{]*\{ text-align: left", page))
    assert left == {"1", "2", "3", "6"}  # the names and the flag; the numbers stay right-aligned
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert cells == ["K-FAC", "JAX", "GPU", "0.0001235", "", "False"]


def test_the_tables_module_imports_no_plotting_library():
    """The pipeline's tune jobs pick their best setting through `tables`; seaborn and pyplot would
    add 2 s to each of them, and labels come from natgrad_impls.names, as the figures' do."""
    loaded = subprocess.run([sys.executable, "-c", "import sys; from natgrad_impls.figures import tables; "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('seaborn', 'scipy') "
                             "or m in ('matplotlib.pyplot', 'matplotlib.figure')))"],
                            capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    assert style.LABELS == {"sgd": "SGD", "adam": "Adam", "ef": "EF", "ngd": "NGD", "kfac": "K-FAC"}
    assert style.FRAMEWORK_LABELS == {"numpy": "NumPy", "torch": "PyTorch", "jax": "JAX"}


def test_environment_lists_versions_and_machine():
    env = tables.environment()
    assert list(env.columns) == ["key", "value"]
    keys = set(env.key)
    assert {"python", "numpy", "torch", "jax", "pandas", "cpu", "cpu cores (logical)"} <= keys
    assert env.set_index("key").loc["numpy", "value"] == np.__version__


# -- the summary ------------------------------------------------------------------------------------

def best_rows(task, framework, finals, dtype="float32", **columns) -> pd.DataFrame:
    """best_hyperparameters-shaped rows: {optimizer: final loss} on one task, framework and cpu, and
    `columns` (a value per row)."""
    return pd.DataFrame([{"task": task, "optimizer": o, "framework": framework, "device": "cpu", "dtype": dtype,
                          "final_loss": loss, "diverged": False} for o, loss in finals.items()]).assign(**columns)


def test_summary_ranks_each_place_apart_diverged_last_and_ties_to_round_off_together():
    """Ranks are per task, framework, device and dtype (torch's order is not jax's); a setting that
    diverged ranks last whatever its loss; losses equal to 1e-9 relative share a rank, 1e-6 apart do
    not; loss_over_best is the final loss over the lowest that did not diverge; the range over seeds
    (or chaos repeats) follows each row, blank where the best table has none."""
    best = pd.concat([
        best_rows("wine", "torch", {"sgd": 0.36, "ef": 0.03 * (1 + 1e-12), "ngd": 0.03, "kfac": 0.03 * (1 + 1e-6)},
                  dtype="float64"),
        best_rows("wine", "jax", {"sgd": 0.01, "ngd": 0.03}, dtype="float64"),
        best_rows("digits-mlp", "torch", {"adam": 0.001, "kfac": 1e-5}, final_loss_min=[9e-4, 1e-6],
                  final_loss_max=[2e-3, 0.1]).assign(diverged=[False, True]),
    ], ignore_index=True)
    table = tables.summary(best).set_index(["task", "framework", "optimizer"])
    assert list(table.columns[list(table.columns).index("final_loss"):][:4]) == [
        "final_loss", "loss_over_best", "final_loss_min", "final_loss_max"]
    assert table.loc[("digits-mlp", "torch", "adam"), ["final_loss_min", "final_loss_max"]].tolist() == [9e-4, 2e-3]
    assert table.loc[("digits-mlp", "torch", "kfac"), ["final_loss_min", "final_loss_max"]].tolist() == [1e-6, 0.1]
    assert table.loc[("wine", "torch"), "final_loss_min"].isna().all()
    assert table.loc[("wine", "torch"), "rank"].to_dict() == {"ef": 1, "ngd": 1, "kfac": 3, "sgd": 4}
    assert list(table.loc[("wine", "torch")].index) == ["ef", "ngd", "kfac", "sgd"]  # ties in the legend's order
    assert table.loc[("wine", "jax"), "rank"].to_dict() == {"sgd": 1, "ngd": 2}
    assert table.loc[("digits-mlp", "torch"), "rank"].to_dict() == {"adam": 1, "kfac": 2}
    assert table.loc[("wine", "torch", "sgd"), "loss_over_best"] == pytest.approx(12.0)
    assert table.loc[("digits-mlp", "torch", "kfac"), "loss_over_best"] == pytest.approx(0.01)
    assert "gradient_equivalents" not in table.columns  # no cost measured: no column
    # rounding the ratios to 9 digits split these two, 2e-15 apart across a rounding boundary
    straddle = best_rows("wine", "torch", {"ngd": 1.0, "ef": 1.0000000105 - 1e-15, "kfac": 1.0000000105 + 1e-15},
                         dtype="float64")
    assert tables.summary(straddle).set_index("optimizer")["rank"].to_dict() == {"ngd": 1, "ef": 2, "kfac": 2}
    # tables concatenated as read repeat index labels (the ranks were kept by label)
    repeated = pd.concat([best_rows("wine", "torch", {"sgd": 3.0, "adam": 1.0}, dtype="float64"),
                          best_rows("wine", "torch", {"ef": 2.0, "ngd": 0.5}, dtype="float64")])
    assert repeated.index.has_duplicates
    ranks = tables.summary(repeated).set_index("optimizer")["rank"].to_dict()
    assert ranks == {"ngd": 1, "adam": 2, "ef": 3, "sgd": 4}, ranks
    # a tie is judged from its smallest value, not link by link: kfac is 0.6e-9 above ef, 1.2e-9 above ngd
    chain = best_rows("wine", "torch", {"ngd": 1.0, "ef": 1.0 + 0.6e-9, "kfac": 1.0 + 1.2e-9}, dtype="float64")
    assert tables.summary(chain).set_index("optimizer")["rank"].to_dict() == {"ngd": 1, "ef": 1, "kfac": 3}
    # float32 and float64 runs of one framework are ranked apart
    dtypes = pd.concat([best_rows("wine", "torch", {"sgd": 0.1, "ngd": 0.2}, dtype="float64"),
                        best_rows("wine", "torch", {"sgd": 0.4, "ngd": 0.3}, dtype="float32")], ignore_index=True)
    table = tables.summary(dtypes).set_index(["dtype", "optimizer"])
    assert table["rank"].to_dict() == {("float64", "sgd"): 1, ("float64", "ngd"): 2, ("float32", "ngd"): 1,
                                       ("float32", "sgd"): 2}
    assert table.loc[("float32", "sgd"), "loss_over_best"] == pytest.approx(4 / 3)


def test_summary_keeps_the_best_tables_columns_with_their_optimizer():
    """Steps and time to target, test accuracy and the chaos flag come through, each on its own row."""
    best = best_rows("digits-mlp", "torch", {"sgd": 0.2, "kfac": 0.1}, steps_to_target=[50, 20],
                     time_to_target_s=[1.5, 0.4], final_test_accuracy=[0.9, 0.95], chaotic=[False, True])
    table = tables.summary(best)
    assert list(table.columns) == ["task", "framework", "device", "dtype", "optimizer", "rank", "final_loss",
                                   "loss_over_best", "steps_to_target", "time_to_target_s", "final_test_accuracy",
                                   "diverged", "chaotic"]
    table = table.set_index("optimizer")
    assert table["steps_to_target"].to_dict() == {"kfac": 20, "sgd": 50}
    assert table["time_to_target_s"].to_dict() == {"kfac": 0.4, "sgd": 1.5}
    assert table["final_test_accuracy"].to_dict() == {"kfac": 0.95, "sgd": 0.9}
    assert table["chaotic"].to_dict() == {"kfac": True, "sgd": False}


def test_summary_gives_each_best_setting_the_cost_of_the_step_it_ran():
    """The cost of the timing setting the row ran: SGD with momentum is sgd-momentum, NGD its
    Fisher's; a step no setting times (K-FAC with the exact Fisher, NGD drawing 4 labels) gets none,
    and so does a task, framework or device the cost rules did not time."""
    best = pd.concat([
        best_rows("digits-mlp", "torch", {"sgd": 0.1, "ngd": 0.2, "kfac": 0.3}, momentum=[0.9, np.nan, np.nan],
                  fisher=[np.nan, "mc", "mc"]),
        best_rows("digits-mlp", "jax", {"sgd": 0.1, "ngd": 0.2, "kfac": 0.3}, momentum=[0.0, np.nan, np.nan],
                  fisher=[np.nan, "exact", "exact"]),
        best_rows("mnist1d-mlp", "jax", {"ngd": 0.2}, fisher=["mc"], samples=[4]),
        best_rows("mnist1d-mlp", "torch", {"sgd": 0.1}, momentum=[0.9], fisher=[np.nan]),
    ], ignore_index=True)
    per_step = {"sgd": 1.1, "sgd-momentum": 1.5, "ngd-exact": 60.0, "ngd-mc": 6.5, "kfac": 4.8}
    cost = pd.DataFrame([{"task": t, "framework": f, "device": "cpu", "setting": s, "gradient_equivalents": g}
                         for t in ("digits-mlp", "mnist1d-mlp") for f in ("torch", "jax") for s, g in per_step.items()
                         if (t, f) != ("mnist1d-mlp", "torch")])
    summary = tables.summary(best, cost).set_index(["task", "framework", "optimizer"])
    assert summary.loc[("digits-mlp", "jax", "ngd"), "fisher"] == "exact"  # which NGD the row is
    assert summary.loc[("digits-mlp", "torch", "sgd"), "momentum"] == 0.9  # which SGD
    table = summary["gradient_equivalents"]
    assert table[("digits-mlp", "torch", "sgd")] == 1.5 and table[("digits-mlp", "jax", "sgd")] == 1.1
    assert table[("digits-mlp", "torch", "ngd")] == 6.5 and table[("digits-mlp", "jax", "ngd")] == 60.0
    assert table[("digits-mlp", "torch", "kfac")] == 4.8 and np.isnan(table[("digits-mlp", "jax", "kfac")])
    assert np.isnan(table[("mnist1d-mlp", "torch", "sgd")]) and np.isnan(table[("mnist1d-mlp", "jax", "ngd")])
