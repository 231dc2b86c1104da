"""The paper's figures (natgrad_impls.figures.paper) drawn from small tables, and the paper's
qualitative findings checked on the numbers behind them (natgrad_impls.toys, natgrad_impls.grid).

Figures are checked by what is drawn (artists carry a gid): lines per axis, their labels, colours
and line styles per optimizer, log scales, the band of a chaotic best run, notes for what is
missing. The findings: NGD's flow points at the minimum and the EF's does not (figure 1); the EF's
quadratic model differs from the Fisher's on misspecified sets and nearly matches it on the
correct ones (figure 2); tuned NGD beats tuned EF on breastcancer and wine in 100 steps (figure 3).
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.quiver import Quiver

from natgrad_impls import grid, runner, toys
from natgrad_impls.figures import paper, style
from natgrad_impls.names import Optimizer
from natgrad_impls.tasks import get_task
from conftest import same_dashes

SMALL_GRID = dict(lrs=(-3, 1, 5), dampings=(-6, 0, 4), steps=20, repeats=2)
ALL = [o.value for o in Optimizer]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _with_gid(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _same_color(a, b) -> bool:
    return np.allclose(mcolors.to_rgba(a)[:3], mcolors.to_rgba(b)[:3])


# -- figure 1 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vecfield_table():
    # Coarser than the defaults (flow time 30 in 60 Euler steps of 0.5; a 7 x 7 quiver): half a second.
    return toys.vecfield_table(steps=60, dt=0.5, grid_points=7, contour_points=21)


def test_vecfield_table_has_every_kind(vecfield_table):
    kinds = vecfield_table.groupby("kind").size()
    assert kinds["data"] == 1000 and kinds["minimum"] == 1 and kinds["contour"] == 21 * 21
    assert kinds["field"] == 3 * 7 * 7 and kinds["trajectory"] == 3 * 4 * 61
    lrs = vecfield_table[vecfield_table["kind"] == "trajectory"].groupby("optimizer")["lr"].first()
    assert lrs.to_dict() == pytest.approx({"sgd": 1 / 3, "ngd": 1.0, "ef": 3.0})


def test_vecfield_draws_a_panel_per_optimizer(vecfield_table):
    drawn = paper.vecfield(vecfield_table)
    axes = drawn.figure.axes
    assert [ax.get_title() for ax in axes] == ["Data", "SGD", "NGD", "EF"]
    assert len(_with_gid(axes[0], "data")) == 1 and len(_with_gid(axes[0], "fit")) == 1
    for ax, optimizer in zip(axes[1:], ["sgd", "ngd", "ef"]):
        paths = _with_gid(ax, "trajectory")
        assert len(paths) == 4
        assert all(_same_color(line.get_color(), style.COLORS[optimizer]) for line in paths)
        assert [line.get_label() for line in paths][0] == style.LABELS[optimizer]
        assert len(_with_gid(ax, "start")) == 4 and len(_with_gid(ax, "minimum")) == 1
        quivers = [c for c in ax.collections if isinstance(c, Quiver)]
        assert len(quivers) == 1 and quivers[0].N == 7 * 7
    assert drawn.notes and "EF 3" in drawn.notes[-1]


def test_vecfield_leaves_out_a_missing_optimizer(vecfield_table):
    drawn = paper.vecfield(vecfield_table[vecfield_table["optimizer"] != "ef"])
    assert [ax.get_title() for ax in drawn.figure.axes] == ["Data", "SGD", "NGD"]
    assert "EF: not in the table, left out." in drawn.notes


def _first_step_angles(table) -> pd.DataFrame:
    """Per optimizer and start, the angle (degrees) between its first step and theta* - theta0."""
    star = table[table["kind"] == "minimum"][["theta_0", "theta_1"]].to_numpy()[0]
    rows = []
    for (optimizer, start), path in table[table["kind"] == "trajectory"].groupby(["optimizer", "start"]):
        p = path.sort_values("step")[["theta_0", "theta_1"]].to_numpy()
        step, target = p[1] - p[0], star - p[0]
        cosine = step @ target / (np.linalg.norm(step) * np.linalg.norm(target))
        rows.append({"optimizer": optimizer, "start": start, "angle": np.degrees(np.arccos(np.clip(cosine, -1, 1)))})
    return pd.DataFrame(rows)


def test_ngd_points_at_the_minimum_and_the_ef_does_not(vecfield_table):
    """Figure 1's claim. Measured (seed 0): NGD within 1e-5 degrees at every start (F is the
    Hessian, up to the 1e-8 damping); EF 98.6, 71.2, 28.9 and 8.0 degrees off."""
    angles = _first_step_angles(vecfield_table).set_index(["optimizer", "start"])["angle"]
    assert (angles["ngd"] < 1e-4).all()
    assert angles["ef"].max() > 60 and (angles["ef"] > 5).all()
    # the same from the library's direction, without the Euler integration
    task = get_task("vecfield")
    X, y = task.load(0).train
    star = toys.minimiser(task.problem, (X, y))
    for point in toys.VECFIELD_STARTS:
        d = toys.direction(task.problem, (X, y), point, "ngd")
        target = star - np.asarray(point)
        np.testing.assert_allclose(d, target, atol=1e-6 * np.linalg.norm(target))  # the 1e-8 damping


def test_vecfield_draws_the_tables_numbers(vecfield_table):
    """The figure is drawn from the table: each trajectory is its start's (theta_0, theta_1) =
    (b, slope) path, not transposed, and the data panel's fit is y = b + slope x with (b, slope)
    the minimum, which is the ridge solution (prior variance 0.1: l2 = 1/(0.1 N)) solved here."""
    drawn = paper.vecfield(vecfield_table)
    data_ax, *panels = drawn.figure.axes
    task = get_task("vecfield")
    X, y = task.load(0).train
    star = np.linalg.solve(X.T @ X / len(X) + task.problem.l2 * np.eye(2), X.T @ y[:, 0] / len(X))
    minimum = vecfield_table[vecfield_table["kind"] == "minimum"]
    np.testing.assert_allclose(minimum[["theta_0", "theta_1"]].to_numpy()[0], star, rtol=1e-9)
    (fit,) = _with_gid(data_ax, "fit")
    xs = np.asarray(fit.get_xdata())
    assert xs[0] == 0 and xs[-1] > 0
    np.testing.assert_allclose(fit.get_ydata(), star[0] + star[1] * xs, rtol=1e-9)
    for ax, optimizer in zip(panels, ["sgd", "ngd", "ef"]):
        rows = vecfield_table[(vecfield_table["kind"] == "trajectory") & (vecfield_table["optimizer"] == optimizer)]
        for start, line, marker in zip(range(4), _with_gid(ax, "trajectory"), _with_gid(ax, "start")):
            path = rows[rows["start"] == start].sort_values("step")[["theta_0", "theta_1"]].to_numpy(dtype=float)
            np.testing.assert_array_equal(line.get_xydata(), path)
            np.testing.assert_array_equal(marker.get_xydata(), path[:1])
            np.testing.assert_array_equal(path[0], toys.VECFIELD_STARTS[start])
        (star_marker,) = _with_gid(ax, "minimum")
        np.testing.assert_allclose(star_marker.get_xydata()[0], star, rtol=1e-9)


def _hand_made_vecfield() -> pd.DataFrame:
    """A figure-1 table made by hand: three examples, the minimum b = 1, slope 2, a loss that
    depends on theta_0 alone on a 3 x 4 grid (so every contour is a vertical line), per optimizer
    two field rows of different lengths and one trajectory of three steps, its rows in reverse."""
    rows = [{"kind": "data", "x": x, "y": y} for x, y in ((1.0, 3.0), (2.0, 5.0), (4.0, 9.0))]
    rows.append({"kind": "minimum", "theta_0": 1.0, "theta_1": 2.0, "loss": 0.0})
    rows += [{"kind": "contour", "theta_0": a, "theta_1": b, "loss": a} for a in (0.0, 1.0, 2.0) for b in range(4)]
    fields = {"sgd": ((3, 4), (0, -0.5)), "ngd": ((-1, 0), (0, 2)), "ef": ((1, 1), (-6, 8))}
    for optimizer, ds in fields.items():
        rows += [{"kind": "field", "optimizer": optimizer, "lr": 1.0, "theta_0": float(i), "theta_1": 0.0,
                  "d_0": d[0], "d_1": d[1]} for i, d in enumerate(ds)]
        rows += [{"kind": "trajectory", "optimizer": optimizer, "lr": 1.0, "start": 0, "step": step,
                  "theta_0": 2.0 - step / 2, "theta_1": 3.0 - step} for step in (2, 1, 0)]
    return pd.DataFrame(rows)


def test_vecfield_draws_unit_arrows_of_each_optimizers_field():
    """Each panel's quiver is its own optimizer's field, at the table's points, with arrows of unit
    length (figure 1 shows directions only): sgd's d = (3, 4) is drawn as (0.6, 0.8). The data panel
    is y against x with the fit over 0..max x; the contours of a loss that depends on b alone are
    vertical lines at the levels equally spaced in sqrt(L - L*) (here L* = 0, max 2: 2 k^2 / 49);
    a trajectory is drawn in step order whatever the table's order; the axes are b and theta."""
    drawn = paper.vecfield(_hand_made_vecfield())
    data_ax, *panels = drawn.figure.axes
    (data,) = _with_gid(data_ax, "data")
    np.testing.assert_array_equal(data.get_xydata(), [[1, 3], [2, 5], [4, 9]])
    (fit,) = _with_gid(data_ax, "fit")
    assert fit.get_xdata()[0] == 0 and fit.get_xdata()[-1] == 4
    np.testing.assert_allclose(fit.get_ydata(), 1 + 2 * fit.get_xdata())
    unit = {"sgd": [[0.6, 0.8], [0, -1]], "ngd": [[-1, 0], [0, 1]], "ef": [[0.5**0.5, 0.5**0.5], [-0.6, 0.8]]}
    for ax, optimizer in zip(panels, ["sgd", "ngd", "ef"]):
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("$b$", r"$\theta$")
        (quiver,) = [c for c in ax.collections if isinstance(c, Quiver)]
        np.testing.assert_array_equal(np.column_stack([quiver.X, quiver.Y]), [[0, 0], [1, 0]])
        np.testing.assert_allclose(np.column_stack([quiver.U, quiver.V]), unit[optimizer], atol=1e-15)
        (path,) = _with_gid(ax, "trajectory")
        np.testing.assert_array_equal(path.get_xydata(), [[2, 3], [1.5, 2], [1, 1]])
        (contours,) = [c for c in ax.collections if not isinstance(c, Quiver)]
        np.testing.assert_allclose(contours.levels, 2 * np.arange(1, 7) ** 2 / 49)
        for level, contour in zip(contours.levels, contours.get_paths()):
            np.testing.assert_allclose(contour.vertices[:, 0], level)  # b = level, every theta
    assert not any("no data rows" in note for note in drawn.notes)
    table = _hand_made_vecfield()
    no_data = paper.vecfield(table[table["kind"] != "data"])
    assert "The table has no data rows: the data panel is empty." in no_data.notes


def test_vecfield_rows_are_the_closed_form_flows(vecfield_table):
    """The table's numbers, from the closed forms of linear regression with unit noise and the prior
    l2 = 1/(0.1 N) (DESIGN 6), r = X theta - y: g = X^T r / N + l2 theta, F = X^T X / N + l2 I, EF =
    X^T diag(r^2) X / N (no prior). The data rows are the task's (x the lognormal input, not the
    ones); a field row is lr C^-1 g's flow -lr (C + 1e-8 I)^-1 g with the paper's lr (1/3 sgd with
    C = I, 1 ngd, 3 ef); each trajectory's first Euler step is theta0 + dt times it (dt 0.5 here).
    The angle tests see directions only, so a flow that lost its lr passed them."""
    task = get_task("vecfield")
    X, y = task.load(0).train
    n, l2 = len(X), task.problem.l2

    def flow(optimizer, theta):
        r = X @ theta - y[:, 0]
        g = X.T @ r / n + l2 * theta
        if optimizer == "sgd":
            return -g
        C = X.T @ X / n + l2 * np.eye(2) if optimizer == "ngd" else (X * r[:, None] ** 2).T @ X / n
        return -np.linalg.solve(C + 1e-8 * np.eye(2), g)

    data = vecfield_table[vecfield_table["kind"] == "data"]
    np.testing.assert_array_equal(data["x"].to_numpy(dtype=float), X[:, 1])
    np.testing.assert_array_equal(data["y"].to_numpy(dtype=float), y[:, 0])
    for optimizer, lr in {"sgd": 1 / 3, "ngd": 1.0, "ef": 3.0}.items():
        mine = vecfield_table[vecfield_table["optimizer"] == optimizer]
        field = mine[mine["kind"] == "field"]
        assert len(field) == 7 * 7
        for row in field.itertuples():
            expected = lr * flow(optimizer, np.array([row.theta_0, row.theta_1]))
            np.testing.assert_allclose([row.d_0, row.d_1], expected, rtol=1e-8, err_msg=optimizer)
        for start, path in mine[mine["kind"] == "trajectory"].groupby("start"):
            p = path.sort_values("step")[["theta_0", "theta_1"]].to_numpy(dtype=float)
            np.testing.assert_allclose(p[1], p[0] + 0.5 * lr * flow(optimizer, p[0]), rtol=1e-8,
                                       err_msg=f"{optimizer} {start}")


def test_the_default_ngd_flow_ends_at_the_minimum():
    """The default flow (500 Euler steps of 0.1: flow time 50 at lr 1, the paper's) is long enough
    for every NGD path to end at theta*, which a 10 x shorter one (flow time 5) would not reach.
    theta* is the ridge solution, solved here; the quiver and contour are cut to their least."""
    table = toys.vecfield_table(grid_points=2, contour_points=2, lrs={"ngd": toys.VECFIELD_LRS["ngd"]})
    task = get_task("vecfield")
    X, y = task.load(0).train
    star = np.linalg.solve(X.T @ X / len(X) + task.problem.l2 * np.eye(2), X.T @ y[:, 0] / len(X))
    paths = table[table["kind"] == "trajectory"]
    assert paths["start"].nunique() == 4 and toys.VECFIELD_LRS["ngd"] == 1.0
    for start, path in paths.groupby("start"):
        end = path.sort_values("step")[["theta_0", "theta_1"]].to_numpy(dtype=float)[-1]
        assert np.linalg.norm(end - star) < 1e-3, (start, end, star)


# -- figure 2 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def misspec_table():
    return toys.misspec_table(contour_points=21)


def _curvatures(table, variant):
    rows = table[(table["variant"] == variant) & (table["kind"] == "curvature")].set_index("curvature")
    return {name: paper._curvature_matrix(rows.loc[name]) for name in ("exact", "empirical")}


@pytest.mark.parametrize("model", ["logistic", "linear"])
def test_misspecification_draws_data_and_both_ellipses(misspec_table, model):
    drawn = paper.misspecification(misspec_table, model)
    axes = np.array(drawn.figure.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["Correct", "Misspecified (A)", "Misspecified (B)"]
    for top, bottom in zip(*axes):
        assert len(_with_gid(top, "data")) == (2 if model == "logistic" else 1)  # a line per class
        assert len(_with_gid(top, "fit")) == (0 if model == "logistic" else 1)
        for name, optimizer in (("exact", "ngd"), ("empirical", "ef")):
            (line,) = _with_gid(bottom, f"ellipse-{name}")
            assert _same_color(line.get_color(), style.COLORS[optimizer]) and same_dashes(line, optimizer)
        assert len(_with_gid(bottom, "minimum")) == 1
        assert bottom.collections  # the loss contours
    labels = [t.get_text() for t in drawn.figure.legends[0].get_texts()]
    assert labels == ["Loss contour", "Fisher", "Empirical Fisher", "Minimum"]
    assert drawn.notes == []


@pytest.mark.parametrize("model", ["logistic", "linear"])
def test_misspecification_draws_each_variants_own_numbers(misspec_table, model):
    """Each column is drawn from its own variant's rows: the data (logistic: (x_0, x_1) of each
    class, y = 0 then y = 1; linear: y against x_0, x_1 being the constant 1, and the fit y =
    theta_0 x_0 + theta_1), and under it the ellipses Delta^T C Delta = radius^2 of its own Fisher
    and EF around its own minimum, drawn in the legend's style, and the loss contours at L* + (radius
    s)^2 / 2, s = 1/2, 1, ..., 3 (so that s = 1 is the Fisher's ellipse's level)."""
    drawn = paper.misspecification(misspec_table, model)
    axes = np.array(drawn.figure.axes).reshape(2, 3)
    handles = {h.get_label(): h for h in drawn.figure.legends[0].legend_handles}
    for top, bottom, suffix in zip(*axes, ["correct", "misspecified-a", "misspecified-b"]):
        variant = f"{model}-{suffix}"
        rows = misspec_table[misspec_table["variant"] == variant]
        data = rows[rows["kind"] == "data"]
        minimum = rows[rows["kind"] == "minimum"]
        star = minimum[["theta_0", "theta_1"]].to_numpy(dtype=float)[0]
        if model == "logistic":
            for line, label in zip(_with_gid(top, "data"), (0, 1)):
                mine = data[data["y"] == label][["x_0", "x_1"]].to_numpy(dtype=float)
                assert line.get_label() == f"$y = {label}$" and len(mine) > 0
                np.testing.assert_array_equal(line.get_xydata(), mine, err_msg=variant)
        else:
            assert (data["x_1"] == 1).all()
            (line,) = _with_gid(top, "data")
            np.testing.assert_array_equal(line.get_xydata(), data[["x_0", "y"]].to_numpy(dtype=float), err_msg=variant)
            (fit,) = _with_gid(top, "fit")
            np.testing.assert_allclose(fit.get_ydata(), star[0] * fit.get_xdata() + star[1], err_msg=variant)
        radius = rows[rows["kind"] == "curvature"]["radius"].iloc[0]
        for name, optimizer, label in (("exact", "ngd", "Fisher"), ("empirical", "ef", "Empirical Fisher")):
            (line,) = _with_gid(bottom, f"ellipse-{name}")
            delta = line.get_xydata() - star
            C = _curvatures(misspec_table, variant)[name]
            np.testing.assert_allclose(np.einsum("ni,ij,nj->n", delta, C, delta), radius**2, rtol=1e-9)
            handle = handles[label]
            assert _same_color(handle.get_color(), style.COLORS[optimizer]) and same_dashes(handle, optimizer)
        (marker,) = _with_gid(bottom, "minimum")
        np.testing.assert_allclose(marker.get_xydata()[0], star, rtol=1e-12)
        (contours,) = bottom.collections
        s = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
        np.testing.assert_allclose(contours.levels, minimum["loss"].item() + (radius * s) ** 2 / 2, rtol=1e-12)


def test_fisher_ellipse_is_the_loss_contour(misspec_table):
    """The Fisher is the Hessian of these models, so its ellipse lies on the loss contour at the
    same level: the loss on the ellipse is L* + radius^2/2, exactly on the (quadratic) linear
    sets, to within the cubic term (here about 10%) on the logistic ones."""
    for variant, rtol in (("logistic-correct", 0.15), ("linear-misspecified-b", 1e-9)):
        task = get_task("misspec", variant)
        X, y = task.load(0).train
        rows = misspec_table[misspec_table["variant"] == variant]
        star = rows[rows["kind"] == "minimum"][["theta_0", "theta_1"]].to_numpy()[0]
        radius = rows[rows["kind"] == "curvature"]["radius"].iloc[0]
        points = paper.ellipse(star, _curvatures(misspec_table, variant)["exact"], radius, points=8)
        rise = [toys.loss_at(task.problem, (X, y), p) - toys.loss_at(task.problem, (X, y), star) for p in points]
        np.testing.assert_allclose(rise, radius**2 / 2, rtol=rtol)


def test_ellipse_radius_is_three_over_root_n(misspec_table):
    """The paper draws each curvature's level set at 3/sqrt(N), N the set's number of examples (the
    quadratic model rises by 9/(2N) there): N from the task itself, not from the table."""
    curvature = misspec_table[misspec_table["kind"] == "curvature"]
    assert len(curvature) == 2 * 6
    for variant, rows in curvature.groupby("variant"):
        n = len(get_task("misspec", variant).load(0).train.X)
        assert (rows["n"] == n).all(), variant
        np.testing.assert_allclose(rows["radius"].to_numpy(dtype=float), 3 / np.sqrt(n), rtol=1e-12)


def test_contour_window_holds_both_ellipses(misspec_table):
    """The contour rows span a square around theta* that holds the Fisher's and the EF's ellipse
    (with room to spare: 1.5 times their extent): the ellipse Delta^T C Delta = radius^2 reaches
    radius sqrt((C^-1)_ii) along axis i (Lagrange: max e_i^T Delta on it). C is the table's; its
    Fisher is held to the loss above. These C are near diagonal, so a window cut from C instead of
    C^-1 would pass here: the test below checks the reach on a strongly correlated C."""
    for variant, rows in misspec_table.groupby("variant"):
        star = rows[rows["kind"] == "minimum"][["theta_0", "theta_1"]].to_numpy(dtype=float)[0]
        contour = rows[rows["kind"] == "contour"]
        radius = rows[rows["kind"] == "curvature"]["radius"].iloc[0]
        for name, C in _curvatures(misspec_table, variant).items():
            reach = radius * np.sqrt(np.diag(np.linalg.inv(C)))
            for i in range(2):
                axis = contour[f"theta_{i}"].to_numpy(dtype=float)
                assert axis.min() < star[i] - reach[i] and star[i] + reach[i] < axis.max(), (variant, name, i)


def test_contour_window_is_the_ellipses_reach_for_a_strongly_correlated_curvature():
    """toys._window on a curvature with correlation 0.99, where an ellipse Delta^T C Delta = r^2
    reaches 7.1 times further along an axis than 1 / sqrt(C_ii) (the misspec tables' curvatures are
    near diagonal, so the table test above cannot tell the two apart): the half-width is the margin
    times the largest reach, measured on the ellipse itself."""
    from natgrad_impls import toys

    C, radius, margin = np.array([[1.0, 0.99], [0.99, 1.0]]), 0.3, 1.5
    # points of the ellipse: Delta = r L^-T u for unit u, with C = L L^T
    angles = np.linspace(0, 2 * np.pi, 200_001)
    ellipse = radius * np.linalg.solve(np.linalg.cholesky(C).T, np.stack([np.cos(angles), np.sin(angles)]))
    reach = np.abs(ellipse).max(axis=1)
    assert reach.max() > 7 * radius  # far beyond 1 / sqrt(C_ii) = 1
    window = toys._window([2.0, -1.0], [C], radius, margin)
    for centre, (low, high), r in zip([2.0, -1.0], window, reach):
        assert (high - centre) == pytest.approx(centre - low) == pytest.approx(margin * reach.max(), rel=1e-8)


def test_misspecification_leaves_out_a_missing_variant(misspec_table):
    drawn = paper.misspecification(misspec_table[misspec_table["variant"] != "logistic-misspecified-b"])
    assert [ax.get_title() for ax in drawn.figure.axes[:2]] == ["Correct", "Misspecified (A)"]
    assert len(drawn.figure.axes) == 4
    assert drawn.notes == ["Misspecified (B): not in the table, left out."]


def test_toy_figures_of_tables_without_a_kinds_rows_or_columns_leave_it_out(misspec_table, vecfield_table):
    """A table written without one kind's rows lacks that kind's columns too: a note, not a KeyError."""
    misspec = misspec_table[misspec_table["kind"] != "curvature"].drop(columns=["curvature", "radius"])
    assert "logistic-correct: no exact Fisher in the table, its ellipse left out." in (
        paper.misspecification(misspec).notes)
    vecfield = vecfield_table[vecfield_table["kind"] != "trajectory"].drop(columns=["start", "step"])
    drawn = paper.vecfield(vecfield)
    assert len(drawn.figure.axes) == len(paper.vecfield(vecfield_table).figure.axes)
    assert not [a for ax in drawn.figure.axes for a in ax.get_children() if a.get_gid() == "trajectory"]


def _relative_difference(matrices) -> tuple[float, float]:
    """(|EF - F|_F / |F|_F, max |log eigenvalue of F^-1 EF|): 0 and 0 when they coincide."""
    fisher, empirical = matrices["exact"], matrices["empirical"]
    eigenvalues = np.linalg.eigvals(np.linalg.solve(fisher, empirical)).real
    return np.linalg.norm(empirical - fisher) / np.linalg.norm(fisher), np.abs(np.log(eigenvalues)).max()


@pytest.mark.parametrize("model", ["logistic", "linear"])
def test_ef_matches_the_fisher_only_on_the_correct_model(misspec_table, model):
    """Figure 2's claim. Measured (seed 0, N = 1000), relative Frobenius difference and largest
    |log eigenvalue| of F^-1 EF: logistic correct 0.083 / 0.13, misspecified (A) 0.55 / 0.49,
    (B) 0.59 / 0.90; linear correct 0.075 / 0.10, (A) 2.7 / 1.36 (noise of variance 4: EF ~ 4 F),
    (B) 1.4 / 1.11."""
    differences = {s: _relative_difference(_curvatures(misspec_table, f"{model}-{s}"))
                   for s in ("correct", "misspecified-a", "misspecified-b")}
    frobenius, log_eig = differences["correct"]
    assert frobenius < 0.15 and log_eig < 0.2
    for suffix in ("misspecified-a", "misspecified-b"):
        frobenius, log_eig = differences[suffix]
        assert frobenius > 0.4 and log_eig > 0.4


# -- figure 3 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_grid():
    frames = [grid.run_grid(task, ALL, **SMALL_GRID).frame for task in ("breastcancer", "wine")]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def cos_frame(small_grid):
    frames = []
    for task in ("breastcancer", "wine"):
        h = toys.best_hyperparameters(small_grid[small_grid["task"] == task])["ef"]
        frames.append(runner.run(task, "ef", "numpy", hyperparameters=h, steps=20, cos_ef_ngd=True))
    return pd.concat(frames, ignore_index=True)


def _chaotic(frame, task, optimizer):
    """A copy of `frame` where the best run of optimizer on task is chaotic: flagged, and its
    repeats moved apart (so the band has a width)."""
    frame = frame.copy()
    rows = (frame["task"] == task) & (frame["optimizer"] == optimizer) & frame["best"]
    frame.loc[rows, "chaotic"] = True
    frame.loc[rows & (frame["repeat"] == 1), "loss"] *= 1.5
    return frame


def test_optimisation_draws_every_best_run(small_grid, cos_frame):
    frame = _chaotic(small_grid, "breastcancer", "ef")
    drawn = paper.optimisation(frame, cos_frame, tasks=["breastcancer"])
    loss_ax, cos_ax = drawn.figure.axes
    assert loss_ax.get_yscale() == "log" and loss_ax.get_title() == "breastcancer"
    lines = _with_gid(loss_ax, "best")
    assert [line.get_label() for line in lines] == ["SGD", "Adam", "EF", "NGD", "K-FAC"]
    for line, optimizer in zip(lines, ALL):
        assert _same_color(line.get_color(), style.COLORS[optimizer]) and same_dashes(line, optimizer)
        assert len(line.get_xdata()) == 21
    best = frame[frame["best"] & (frame["task"] == "breastcancer")]
    chaotic = sorted(best[best["chaotic"].fillna(False).astype(bool)]["optimizer"].unique())
    assert "ef" in chaotic
    bands = [c for c in loss_ax.collections if isinstance(c, PolyCollection) and c.get_gid() == "band"]
    assert sorted(o for o in ALL if any(_same_color(b.get_facecolor()[0], style.COLORS[o]) for b in bands)) == chaotic
    assert any("EF on breastcancer: the best run is chaotic" in note for note in drawn.notes)
    (cos_line,) = _with_gid(cos_ax, "cos")
    assert len(cos_line.get_xdata()) == 21 and np.all(np.abs(cos_line.get_ydata()) <= 1 + 1e-12)
    assert cos_ax.get_ylim() == pytest.approx((-1.1, 1.1))
    (gauge,) = _with_gid(cos_ax, "gauge")  # cos(NGD, gradient) along the same run, the EF's colour, dotted
    measured = cos_frame[cos_frame["task"] == "breastcancer"]
    np.testing.assert_array_equal(gauge.get_xydata(), measured[["step", "cos_ngd_grad"]].to_numpy())
    assert _same_color(gauge.get_color(), style.COLORS["ef"]) and gauge.get_linestyle() == ":"
    assert [t.get_text() for t in drawn.figure.legends[0].get_texts()] == ["SGD", "Adam", "EF", "NGD", "K-FAC",
                                                                           style.GAUGE_LABEL]


def test_optimisation_draws_several_tasks(small_grid, cos_frame):
    drawn = paper.optimisation(small_grid, cos_frame)
    titles = [ax.get_title() for ax in drawn.figure.axes if ax.get_title()]
    assert titles == ["wine", "breastcancer"]  # the registry's order
    assert len(drawn.figure.axes) == 4
    assert drawn.figure.get_figwidth() == style.COLUMN_WIDTH


def test_optimisation_leaves_out_what_is_missing(small_grid, cos_frame):
    frame = small_grid[small_grid["optimizer"] != "kfac"]
    drawn = paper.optimisation(frame, None, tasks=["breastcancer", "a1a"])
    (loss_ax,) = drawn.figure.axes
    assert [line.get_label() for line in _with_gid(loss_ax, "best")] == ["SGD", "Adam", "EF", "NGD"]
    assert "K-FAC: not in the table, left out." in drawn.notes
    assert "a1a: not in the grid frame, left out." in drawn.notes
    assert any(note.startswith("cos(EF, NGD): no cosine frame") for note in drawn.notes)
    # a cosine frame without this task: the panel says so instead of failing
    drawn = paper.optimisation(small_grid, cos_frame[cos_frame["task"] == "wine"], tasks=["breastcancer"])
    assert any("cos(EF, NGD) on breastcancer: not in the cosine frame" in note for note in drawn.notes)
    # a cosine measured along another setting is told apart, also at the paper grid's smallest
    # dampings, which differ by less than np.isclose's default atol (1e-8)
    best_ef = (small_grid["optimizer"] == "ef") & small_grid["best"]
    at_1e_10 = small_grid.assign(damping=small_grid["damping"].mask(best_ef, 1e-10))
    for damping, told in ((1e-9, True), (1e-3, True), (1e-10, False)):
        drawn = paper.optimisation(at_1e_10, cos_frame.assign(damping=damping), tasks=["breastcancer"])
        assert any("not along the best EF run" in note for note in drawn.notes) == told, damping
    # nothing at all to draw
    drawn = paper.optimisation(small_grid, cos_frame, tasks=["a1a"])
    assert drawn.notes == ["a1a: not in the grid frame, left out."]


def test_optimisation_legend_handles_show_a_whole_dash_pattern(small_grid, cos_frame):
    """A handle shorter than its line's dash and gap draws one dash: K-FAC's long dash read as
    NGD's solid line. Every handle spans its pattern once at least, in both figure widths."""
    for tasks in (["wine"], ["wine", "breastcancer", "a1a"]):
        legend = paper.optimisation(small_grid, cos_frame, tasks=tasks).figure.legends[0]
        span = legend.handlelength * legend.prop.get_size_in_points()
        optimizers = {label: o for o, label in style.LABELS.items()}
        for handle in legend.legend_handles:
            if handle.get_label() in optimizers:
                pattern = style.LINESTYLES[optimizers[handle.get_label()]]
                dashes = pattern[1] if isinstance(pattern, tuple) else ()  # "-": solid
                assert sum(dashes) * handle.get_linewidth() < span, (handle.get_label(), tasks)


def test_optimisation_legend_cosine_and_settings_follow_the_frames():
    """Hand-made frames: the best runs of sgd (lr 0.5), ef (lr 0.1, damping 1e-4) and ngd (lr 1,
    damping 1e-6) on wine, an ef run that is not best, and cosines along ef on wine and breastcancer
    (rows out of step order) and along sgd on wine. The legend's handles look like the lines they
    name, the cosine panel draws wine's ef cos_ef_ngd in step order, and the note gives each best
    run's own lr and damping."""
    steps = np.arange(4)
    runs = [("sgd", 0.5, np.nan, True, 1.0), ("ef", 0.1, 1e-4, True, 0.5), ("ngd", 1.0, 1e-6, True, 0.25),
            ("ef", 1.0, 1e-2, False, 0.75)]
    grid_frame = pd.concat([pd.DataFrame({"task": "wine", "optimizer": o, "lr": lr, "damping": d, "step": steps,
                                          "loss": scale / (1.0 + steps), "repeat": 0, "best": best, "chaotic": False,
                                          "diverged": False}) for o, lr, d, best, scale in runs], ignore_index=True)
    cos = pd.DataFrame({"task": ["wine"] * 4 + ["breastcancer"] * 4 + ["wine"] * 2, "lr": 0.1, "damping": 1e-4,
                        "optimizer": ["ef"] * 8 + ["sgd"] * 2, "step": [3, 1, 2, 0] * 2 + [0, 1],
                        "cos_ef_ngd": [0.0, 0.5, -0.25, 1.0, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2]})
    drawn = paper.optimisation(grid_frame, cos, tasks=["wine"])
    loss_ax, cos_ax = drawn.figure.axes
    lines = _with_gid(loss_ax, "best")
    handles = drawn.figure.legends[0].legend_handles
    assert [h.get_label() for h in handles] == [line.get_label() for line in lines] == ["SGD", "EF", "NGD"]
    for handle, line, (optimizer, *_, scale) in zip(handles, lines, runs):
        assert _same_color(handle.get_color(), style.COLORS[optimizer]) and same_dashes(handle, optimizer)
        assert _same_color(line.get_color(), style.COLORS[optimizer])
        np.testing.assert_allclose(line.get_ydata(), scale / (1.0 + steps))
    (cos_line,) = _with_gid(cos_ax, "cos")
    np.testing.assert_array_equal(cos_line.get_xydata(), [[0, 1.0], [1, 0.5], [2, -0.25], [3, 0.0]])
    assert "Best runs on wine: SGD lr 0.5; EF lr 0.1, damping 0.0001; NGD lr 1, damping 1e-06." in drawn.notes
    assert not any("not along the best EF run" in note for note in drawn.notes)
    # a frame written before cos(NGD, gradient) was recorded: no gauge, nor its legend entry, and a note
    assert not _with_gid(cos_ax, "gauge") and style.GAUGE_LABEL not in [h.get_label() for h in handles]
    assert f"{style.GAUGE_LABEL} on wine: not in the cosine frame, left out." in drawn.notes
    # with it: the gauge follows the cosine's rows, in step order, and gets its legend entry
    cos["cos_ngd_grad"] = [0.125, 0.25, 0.375, -0.5, 0.0, 0.0, 0.0, 0.0, 0.75, 0.75]
    drawn = paper.optimisation(grid_frame, cos, tasks=["wine"])
    (gauge,) = _with_gid(drawn.figure.axes[1], "gauge")
    np.testing.assert_array_equal(gauge.get_xydata(), [[0, -0.5], [1, 0.25], [2, 0.375], [3, 0.125]])
    gauge_handle = drawn.figure.legends[0].legend_handles[-1]
    assert gauge_handle.get_label() == style.GAUGE_LABEL and _same_color(gauge_handle.get_color(), style.COLORS["ef"])
    # a note gives its largest size, the other rows' 0.75 not counted: near 0 it lies on the zero line
    assert [note for note in drawn.notes if style.GAUGE_LABEL in note] == [
        f"{style.GAUGE_LABEL} on wine: within 0.5 of 0 throughout."]


def test_a_cosine_frame_without_tasks_is_refused(small_grid, cos_frame):
    """Without a task column the cosine of one task would be drawn under every task."""
    with pytest.raises(ValueError, match="cos: missing column task"):
        paper.optimisation(small_grid, cos_frame.drop(columns="task"))


def test_optimisation_draws_repeat_0_and_a_band_over_every_repeat():
    """The best line is repeat 0 (the run the grid chose), and the band spans min..max over it and
    its repeats: here repeat 0 is the band's lower edge and the last repeat lies inside the band."""
    steps = np.arange(6)
    base = 1.0 / (1.0 + steps)
    factors = {0: 1.0, 1: 1.5, 2: 1.2}
    frame = pd.concat([pd.DataFrame({"task": "wine", "optimizer": "ef", "lr": 0.1, "damping": 1e-4, "step": steps,
                                     "loss": f * base, "repeat": r, "best": True, "chaotic": True, "diverged": False})
                       for r, f in factors.items()], ignore_index=True)
    drawn = paper.optimisation(frame, None, tasks=["wine"])
    (ax,) = drawn.figure.axes
    (line,) = _with_gid(ax, "best")
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), base, rtol=1e-12)
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_gid() == "band"]
    vertices = band.get_paths()[0].vertices
    for step, low, high in zip(steps, base, 1.5 * base):
        ys = vertices[vertices[:, 0] == step][:, 1]
        assert ys.min() == pytest.approx(low, rel=1e-12) and ys.max() == pytest.approx(high, rel=1e-12), step
    # and the note gives its width at the last step (1/6 to 1.5/6), where on a log axis it may hide under the line
    assert ("EF on wine: the best run is chaotic; the band spans it and its 2 repeats from theta0 + 1e-14 noise "
            "(at step 5: 0.1667 to 0.25).") in drawn.notes


# -- appendix: starting points ----------------------------------------------------------------------

def test_starting_point_draws_every_start(small_grid):
    table = toys.starting_point_table(grid=small_grid, steps=10)
    assert set(table["problem"]) == {"quadratic", "wine"}
    drawn = paper.starting_point(table)
    quadratic, wine = drawn.figure.axes
    assert quadratic.get_yscale() == "log" and wine.get_yscale() == "log" and wine.get_title() == "wine"
    assert quadratic.get_title() == r"$(\theta^2 + 1/4)\,/\,2$"  # what is drawn: table's minimum is 1/8
    assert table.loc[(table["kind"] == "minimum") & (table["problem"] == "quadratic"), "loss"].item() == pytest.approx(1 / 8)
    for ax, optimizers in ((quadratic, ["ngd", "ef"]), (wine, ["sgd", "ngd", "ef"])):
        lines = _with_gid(ax, "run")
        assert len(lines) == 4 * len(optimizers)
        for optimizer in optimizers:
            mine = [line for line in lines if line.get_label() == style.LABELS[optimizer]]
            assert len(mine) == 4 and all(_same_color(line.get_color(), style.COLORS[optimizer]) for line in mine)
            assert sorted(line.get_alpha() for line in mine)[-1] == pytest.approx(1.0)
    # the 1-D problem: NGD contracts theta by 1 - lr = 1/2 per step from anywhere (excess theta^2/2);
    # the EF from theta0 = 4 moves by lr theta / (theta^2 + 1/4), 0.12 at first: after 10 steps
    # theta is still about 2.5 (excess 3.2 of 8), where NGD is at 8e-6
    run = table[(table["problem"] == "quadratic") & (table["start"] == 4.0)].set_index(["optimizer", "step"])["excess"]
    np.testing.assert_allclose(run["ngd"].to_numpy(), 8.0 * 0.25 ** np.arange(11), rtol=1e-4)
    assert run["ef"].iloc[-1] > 2.0
    # the caption: from theta0 = 1/2 the EF lands within the damping of theta* (theta1 = 1e-6 to
    # first order), where its step 2 theta flips theta's sign without shrinking it
    near = table[(table["problem"] == "quadratic") & (table["start"] == 0.5) & (table["optimizer"] == "ef")]
    np.testing.assert_allclose(near["excess"].to_numpy()[1:], toys.QUADRATIC_DAMPING ** 2 / 2, rtol=1e-3)


def test_starting_points_lie_on_the_segment_and_darker_is_closer():
    """theta0 = alpha theta* (alpha 0: the Kunstner start theta = 0), so |theta0 - theta*| =
    (1 - alpha) |theta*|, with theta* the least-squares solution solved here (wine has no prior);
    the alpha = 0 run starts at L(0) = mean(y^2)/2. The figure shades by that distance: darker
    (higher alpha) lines start closer to the minimum, as the docstring and caption say."""
    hyper = pd.DataFrame({"task": ["wine"], "optimizer": "ngd", "lr": 0.5, "damping": 1e-4, "best": True, "repeat": 0})
    table = toys.starting_point_table(grid=hyper, optimizers=("ngd",), steps=3)
    X, y = get_task("wine").load(0).train
    star = np.linalg.lstsq(X, y[:, 0], rcond=None)[0]
    wine = table[(table["kind"] == "run") & (table["problem"] == "wine")]
    first = wine[wine["step"] == 0].set_index("start")
    assert list(first.index) == list(toys.STARTING_ALPHAS)
    np.testing.assert_allclose(first["distance"], (1 - first.index.to_numpy()) * np.linalg.norm(star), rtol=1e-8)
    assert first.loc[0.0, "loss"] == pytest.approx(np.mean(y[:, 0] ** 2) / 2, rel=1e-12)
    drawn = paper.starting_point(table)
    assert any("darker lines start closer" in note for note in drawn.notes)
    for ax, problem in zip(drawn.figure.axes, ["quadratic", "wine"]):
        runs = table[(table["kind"] == "run") & (table["problem"] == problem)]
        for optimizer, rows in runs.groupby("optimizer", observed=True):
            mine = [line for line in _with_gid(ax, "run") if line.get_label() == style.LABELS[optimizer]]
            assert len(mine) == 4
            first = rows[rows["step"] == 0].set_index("excess")["distance"]  # each start's excess at step 0
            distance_of = [first.loc[line.get_ydata()[0]] for line in mine]  # each line's start
            by_alpha = [d for _, d in sorted(zip([line.get_alpha() for line in mine], distance_of))]
            assert by_alpha == sorted(distance_of, reverse=True), (problem, optimizer)  # darkest: closest
            assert max(line.get_alpha() for line in mine) == pytest.approx(1.0)


def test_starting_point_leaves_out_excess_at_round_off_and_names_the_starts():
    """A hand-made table: on the quadratic, ngd from theta0 = 2 and 4 reaches round-off (excess 0,
    then -1e-17: not drawn on the log axis); on wine, from alpha = 0 and 0.5. The notes name the
    starts as theta0 on the quadratic and as alpha on the task."""
    def run(problem, start, distance, excess):
        return pd.DataFrame({"kind": "run", "problem": problem, "optimizer": "ngd", "start": start,
                             "distance": distance, "step": [0, 1, 2], "excess": excess})

    table = pd.concat([run("quadratic", 4.0, 4.0, [8.0, 2.0, 0.0]), run("quadratic", 2.0, 2.0, [2.0, 0.5, -1e-17]),
                       run("wine", 0.0, 3.0, [1.0, 1e-3, 1e-6]), run("wine", 0.5, 1.5, [0.2, 1e-4, 1e-7])])
    drawn = paper.starting_point(table)
    quadratic, wine = drawn.figure.axes
    np.testing.assert_array_equal([line.get_ydata() for line in _with_gid(quadratic, "run")],
                                  [[8.0, 2.0, np.nan], [2.0, 0.5, np.nan]])
    np.testing.assert_array_equal([line.get_ydata() for line in _with_gid(wine, "run")],
                                  [[1.0, 1e-3, 1e-6], [0.2, 1e-4, 1e-7]])
    assert "quadratic: theta0 in 2, 4; darker lines start closer to the minimum." in drawn.notes
    assert "wine: theta0 = alpha theta*, alpha in 0, 0.5; darker lines start closer to the minimum." in drawn.notes


# -- figure 3's claim ------------------------------------------------------------------------------

def test_tuned_ngd_beats_tuned_ef():
    """Best last loss after 100 steps on a coarse grid (lr 1e-4..1e1, damping 1e-10..1, 11 x 11).
    Measured: breastcancer NGD 7.15e-4 (lr 1, damping 1e-10) vs EF 1.41e-2 (lr 0.0316, damping
    1e-10); wine NGD 0.0298386937329222, the minimum to round-off (lr 0.316, damping 1e-4), vs EF
    0.0298386994 (lr 0.0316, damping 1e-10), 1.9e-7 relative above it."""
    losses = {}
    for task in ("breastcancer", "wine"):
        result = grid.run_grid(task, ["ngd", "ef"], lrs=(-4, 1, 11), dampings=(-10, 0, 11), steps=100, repeats=0)
        losses[task] = {b.optimizer: b.loss for b in result.best}
        assert losses[task]["ngd"] < losses[task]["ef"]
    assert losses["breastcancer"]["ngd"] < 0.1 * losses["breastcancer"]["ef"]
    task = get_task("wine")
    X, y = task.load(0).train
    minimum = toys.loss_at(task.problem, (X, y), toys.minimiser(task.problem, (X, y)))
    assert abs(losses["wine"]["ngd"] - minimum) < 1e-12 * minimum
    assert losses["wine"]["ef"] - minimum > 1e-8 * minimum


# -- appendix: the paper code's logit clip against the exact likelihood ------------------------------

@pytest.fixture(scope="module")
def clip_grids():
    """breastcancer's small grid with the paper code's clip and with the exact likelihood; lrs from
    1e-3, where GD already diverges without the clip (from 3.2e-4 on the paper grid)."""
    return {clip: grid.run_grid("breastcancer", ALL, logit_clip=clip, **SMALL_GRID) for clip in ("paper", "none")}


def test_the_logit_clip_comparison_agrees_with_each_grids_best_and_runs(clip_grids):
    from natgrad_impls.figures import tables

    frame = pd.concat([r.frame for r in clip_grids.values()], ignore_index=True)
    table = tables.logit_clip_comparison(frame).set_index("optimizer")
    assert list(table.index) == ALL
    for clip, result in clip_grids.items():
        for best in result.best:
            row = table.loc[best.optimizer]
            assert row[f"final_loss_{clip}"] == best.loss and row[f"lr_{clip}"] == best.lr
            assert row[f"chaotic_{clip}"] == best.chaotic
    # with the clip every example's loss is at most 18.42 < 100 x log 2: no run can diverge
    assert (table["diverged_runs_paper"] == 0).all()
    runs = ["optimizer", "lr", "damping"]
    last = {clip: r.frame[r.frame["repeat"] == 0].sort_values("step").groupby(runs, dropna=False).last()
            for clip, r in clip_grids.items()}
    for optimizer in ALL:
        paper, exact = last["paper"].loc[optimizer], last["none"].loc[optimizer]
        assert table.loc[optimizer, "diverged_runs_none"] == exact["diverged"].sum()
        differs = (paper["loss"] != exact["loss"]) | (paper["step"] != exact["step"])
        assert table.loc[optimizer, "changed_runs"] == differs.sum()
    sgd = table.loc["sgd"]  # every lr of the small grid is past GD's edge without the clip
    assert sgd["diverged_only_none"] == 5 and sgd["smallest_lr_diverged_only_none"] == pytest.approx(1e-3)
    assert 1 <= sgd["its_divergence_step"] <= 5
    ngd = table.loc["ngd"]
    paper_loss, exact_loss = ngd["final_loss_paper"], ngd["final_loss_none"]
    assert ngd["best_loss_change"] == pytest.approx((exact_loss - paper_loss) / paper_loss)


def test_the_divergence_step_is_the_earliest_at_the_smallest_lr():
    """Runs that diverge only without the clip: at lr 0.1 under dampings 1e-6 (step 9) and 1e-2
    (step 4), at lr 1 (step 2). The smallest such lr is 0.1, and its step the earliest of its runs,
    4 (not the first damping's 9, nor lr 1's 2)."""
    from natgrad_impls.figures import tables

    runs = [(0.1, 1e-6, 9), (0.1, 1e-2, 4), (1.0, 1e-6, 2)]
    rows = [{"task": "breastcancer", "optimizer": "ef", "lr": lr, "damping": d, "step": k, "loss": loss,
             "diverged": diverged, "repeat": 0, "best": False, "chaotic": False, "logit_clip": clip}
            for lr, d, last in runs for clip, diverged in (("paper", False), ("none", True))
            for k, loss in ((0, 1.0), (last, 1e3 if diverged else 0.5))]
    row = tables.logit_clip_comparison(pd.DataFrame(rows)).iloc[0]
    assert row["diverged_only_none"] == 3 and row["smallest_lr_diverged_only_none"] == 0.1
    assert row["its_divergence_step"] == 4


def test_a_chaotic_change_is_told_from_a_real_one():
    """beyond_chaos compares the ranges of the two best runs over their repeats."""
    from natgrad_impls.figures import tables

    def frame(clip, finals):  # one ef run and its repeats: one row each, at step 1
        return pd.DataFrame({"task": "breastcancer", "optimizer": "ef", "lr": 0.1, "damping": 1e-10, "step": 1,
                             "loss": finals, "diverged": False, "repeat": range(len(finals)), "best": True,
                             "chaotic": True, "logit_clip": clip})

    overlapping = pd.concat([frame("paper", [1.0, 0.9, 1.1]), frame("none", [0.95, 1.05, 0.85])])
    apart = pd.concat([frame("paper", [1.0, 0.99, 1.01]), frame("none", [0.5, 0.49, 0.51])])
    assert not tables.logit_clip_comparison(overlapping)["beyond_chaos"].item()
    row = tables.logit_clip_comparison(apart).iloc[0]
    assert row["beyond_chaos"] and row["best_loss_change"] == pytest.approx(-0.5) and row["changed_runs"] == 1


def test_the_logit_clip_comparison_of_runs_the_clip_leaves_alone():
    """Where the clip changes nothing, the two best runs are one run: its range is the same under both
    likelihoods, so nothing is beyond chaos, and the change is 0. A range spans the best run and its
    repeats: paper 1.0 with repeats 1.1 and 1.2 overlaps none 1.05 with repeats 0.9 and 0.95 (the
    repeats alone, 1.1..1.2 against 0.9..0.95, would not). A best run that diverged has no change."""
    from natgrad_impls.figures import tables

    def frame(clip, finals, diverged=False):  # one ef run and its repeats: one row each, at step 1
        return pd.DataFrame({"task": "breastcancer", "optimizer": "ef", "lr": 0.1, "damping": 1e-10, "step": 1,
                             "loss": finals, "diverged": diverged, "repeat": range(len(finals)), "best": True,
                             "chaotic": False, "logit_clip": clip})

    same = tables.logit_clip_comparison(pd.concat([frame("paper", [1.0]), frame("none", [1.0])])).iloc[0]
    assert not same["beyond_chaos"] and same["best_loss_change"] == 0 and same["changed_runs"] == 0
    spans = tables.logit_clip_comparison(pd.concat([frame("paper", [1.0, 1.1, 1.2]),
                                                    frame("none", [1.05, 0.9, 0.95])])).iloc[0]
    assert (spans["final_loss_min_paper"], spans["final_loss_max_paper"]) == (1.0, 1.2)
    assert (spans["final_loss_min_none"], spans["final_loss_max_none"]) == (0.9, 1.05)
    assert not spans["beyond_chaos"]
    lost = tables.logit_clip_comparison(pd.concat([frame("paper", [1.0]), frame("none", [3.0], diverged=True)])).iloc[0]
    assert lost["diverged_none"] and np.isnan(lost["best_loss_change"])


def test_logit_clip_figure_sweeps_lr_for_both_likelihoods(clip_grids):
    frame = pd.concat([r.frame for r in clip_grids.values()], ignore_index=True)
    drawn = paper.logit_clip(frame)
    axes = drawn.figure.axes
    assert [ax.get_title() for ax in axes] == ["SGD", "Adam", "EF", "NGD", "K-FAC"]
    assert axes[0].get_ylabel() == f"{frame['task'].iloc[0]}\nfinal loss"  # one task, named all the same
    for ax, optimizer in zip(axes, ALL):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        (clipped,) = _with_gid(ax, "sweep-paper")
        assert _same_color(clipped.get_color(), style.COLORS[optimizer]) and len(clipped.get_xdata()) == 5
        assert len(_with_gid(ax, "best-paper")) == 1
    # GD: every exact run diverges, so its sweep is empty and its panel is grey from the first lr
    (exact,) = _with_gid(axes[0], "sweep-none")
    assert len(exact.get_xdata()) == 0
    assert [p.get_gid() for p in axes[0].patches] == ["all-diverge"]
    (note,) = [n for n in drawn.notes if n.startswith("breastcancer, exact likelihood against clipped logits")]
    assert "SGD 5 (from lr 0.001, at step" in note and "Best final loss without the clip:" in note
    legend = [t.get_text() for t in drawn.figure.legends[0].get_texts()]
    assert legend == ["Logits clipped (paper code)", "Exact likelihood", "Exact: every run diverges"]


def test_logit_clip_figure_draws_the_grids_numbers():
    """Hand-made grids of ef (lrs 1e-3..10, dampings 1e-4 and 1e-2) and sgd on breastcancer. With the
    clip: best ef lr 0.1, damping 1e-2, final loss 0.2; exact: best lr 0.1, damping 1e-4, 0.1, and
    every run from lr 1 on diverges; every exact sgd run diverges. The sweep is the lowest final
    loss over dampings of the runs that did not diverge, the dots sit on each grid's best run (filled:
    clipped, open: exact), grey spans the lrs on which every exact run diverges, the lines are drawn as
    the legend says (clipped solid), and the note counts 6 of 10 ef runs changed and a -50 % best."""
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    finals = {  # clip: {(lr, damping): final loss}, inf where the run diverges
        "paper": dict(zip([(lr, d) for lr in lrs for d in (1e-4, 1e-2)],
                          [0.6, 0.65, 0.4, 0.5, 0.3, 0.2, 0.35, 0.45, 0.9, 0.95])),
        "none": dict(zip([(lr, d) for lr in lrs for d in (1e-4, 1e-2)],
                         [0.6, 0.65, 0.4, 0.5, 0.1, 0.25, np.inf, np.inf, np.inf, np.inf])),
    }
    best = {"paper": (0.1, 1e-2), "none": (0.1, 1e-4)}

    def rows(optimizer, clip, lr, damping, loss, is_best):
        return pd.DataFrame({"task": "breastcancer", "optimizer": optimizer, "logit_clip": clip, "lr": lr,
                             "damping": damping, "step": [0, 1], "loss": [0.69, loss], "repeat": 0, "best": is_best,
                             "chaotic": False, "diverged": not np.isfinite(loss)})

    frames = [rows("ef", clip, lr, d, loss, (lr, d) == best[clip])
              for clip in finals for (lr, d), loss in finals[clip].items()]
    frames += [rows("sgd", clip, lr, np.nan, 0.5 if clip == "paper" else np.inf, lr == 1e-2)
               for clip in finals for lr in lrs]
    drawn = paper.logit_clip(pd.concat(frames, ignore_index=True))
    sgd_ax, ef_ax = drawn.figure.axes
    assert [sgd_ax.get_title(), ef_ax.get_title()] == ["SGD", "EF"]
    (clipped,) = _with_gid(ef_ax, "sweep-paper")
    np.testing.assert_array_equal(clipped.get_xydata(), [[1e-3, 0.6], [1e-2, 0.4], [1e-1, 0.2], [1, 0.35], [10, 0.9]])
    (exact,) = _with_gid(ef_ax, "sweep-none")
    np.testing.assert_array_equal(exact.get_xydata(), [[1e-3, 0.6], [1e-2, 0.4], [1e-1, 0.1]])
    legend = {h.get_label(): h for h in drawn.figure.legends[0].legend_handles}
    assert clipped.get_linestyle() == legend["Logits clipped (paper code)"].get_linestyle() == "-"
    assert exact.get_linestyle() == legend["Exact likelihood"].get_linestyle() != "-"
    (dot_paper,) = _with_gid(ef_ax, "best-paper")
    (dot_none,) = _with_gid(ef_ax, "best-none")
    np.testing.assert_array_equal(dot_paper.get_xydata(), [[0.1, 0.2]])
    np.testing.assert_array_equal(dot_none.get_xydata(), [[0.1, 0.1]])
    assert _same_color(dot_paper.get_markerfacecolor(), style.COLORS["ef"])  # filled: clipped
    assert _same_color(dot_none.get_markerfacecolor(), "white")  # open: exact
    for ax, first in ((ef_ax, 1.0), (sgd_ax, 1e-3)):
        (span,) = [p for p in ax.patches if p.get_gid() == "all-diverge"]
        assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((first, 10.0))
    (note,) = [n for n in drawn.notes if n.startswith("breastcancer, exact likelihood")]
    assert "the clip changes 11 of 15 runs (none with lr below 0.001)" in note
    assert "EF 4 (from lr 1, at step 1)" in note
    assert "Best final loss without the clip: SGD none (every run diverges without it), EF -50 %." in note


def test_logit_clip_lr_axis_starts_a_thousand_times_below_the_first_lr_that_moves():
    """The caption's promise: the shared lr axis starts 1000 x below the smallest lr at which a
    panel's sweep leaves its flat start. Here sgd's final loss moves from lr 1e-5 on, ngd's from
    lr 0.1 on (both best at lr 1, the same with and without the clip): the axis starts at 1e-8."""
    def rows(optimizer, clip, damping, first_move):
        return pd.concat([pd.DataFrame({"task": "breastcancer", "optimizer": optimizer, "logit_clip": clip, "lr": lr,
                                        "damping": damping, "step": [0, 1], "repeat": 0, "best": lr == 1.0,
                                        "loss": [0.69, 0.69 if lr < first_move else 0.69 / (1 + lr / first_move)],
                                        "chaotic": False, "diverged": False}) for lr in 10.0 ** np.arange(-9, 1)])

    frame = pd.concat([rows("sgd", clip, np.nan, 5e-6) for clip in ("paper", "none")]
                      + [rows("ngd", clip, 1e-4, 0.05) for clip in ("paper", "none")], ignore_index=True)
    drawn = paper.logit_clip(frame)
    for ax in drawn.figure.axes:
        assert ax.get_xlim()[0] == pytest.approx(1e-8), ax.get_title()
    # lr ticks at round powers, 1e-10, 1, 1e10, whatever the axis' start
    drawn.figure.canvas.draw()
    low, high = drawn.figure.axes[0].get_xlim()
    ticks = [t for t in drawn.figure.axes[0].get_xticks() if low <= t <= high]
    assert ticks and all(np.log10(t) % 10 == 0 for t in ticks), ticks


def test_logit_clip_note_names_the_smallest_changed_lr():
    """The note's "none with lr below" is the smallest lr the clip changes at all, which can lie
    below the smallest lr that diverges only without it: here lr 0.01 changes (a different loss)
    and lr 0.1 diverges without the clip."""
    def frame(clip, losses, diverged):  # ef runs at lr 0.01 and 0.1, steps 0..2
        return pd.concat([pd.DataFrame({"task": "breastcancer", "optimizer": "ef", "lr": lr, "damping": 1e-4,
                                        "step": [0, 1, 2], "loss": [0.69, 0.6, loss], "diverged": [False, False, d],
                                        "repeat": 0, "best": best, "chaotic": False, "logit_clip": clip})
                          for lr, loss, d, best in zip((0.01, 0.1), losses, diverged,
                                                       (clip == "none", clip == "paper"))])

    both = pd.concat([frame("paper", (0.5, 0.4), (False, False)), frame("none", (0.45, np.inf), (False, True))],
                     ignore_index=True)
    (note,) = [n for n in paper.logit_clip(both).notes if n.startswith("breastcancer, exact likelihood")]
    assert "the clip changes 2 of 2 runs (none with lr below 0.01)" in note
    assert "EF 1 (from lr 0.1, at step 2)" in note


def test_logit_clip_figure_says_when_a_likelihood_is_missing(clip_grids):
    drawn = paper.logit_clip(clip_grids["paper"].frame)
    assert drawn.notes == ["no Bernoulli task has grids with both logit_clip paper and none."]
    gaussian = clip_grids["paper"].frame.drop(columns="logit_clip")  # as a Gaussian task's grid has none
    assert paper.logit_clip(gaussian).notes == drawn.notes
