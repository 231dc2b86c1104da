"""The small computations behind the paper's toy figures, as tidy tables (no plotting here).

Kunstner, Balles & Hennig (2019) argue with three small pictures: the vector fields of GD, NGD and
the empirical Fisher (EF) on a 2-D linear regression (figure 1), the quadratic models that the
Fisher and the EF give at the minimum of correct and misspecified problems (figure 2 and its
appendix version), and the EF from starting points on the line between 0 and the optimum
(appendix). Each function here computes one of them with the float64 NumPy reference
(`natgrad_impls.numpy`) on the suite's tasks and returns a long pandas DataFrame with a `kind`
column saying what a row is, so that `natgrad_impls.figures.paper` can draw the figure from the
table alone (and a test can check the paper's claims on the same numbers).

Conventions (DESIGN 4): the loss is the mean NLL plus the task's prior term l2/2 |theta|^2; the
gradient g includes the prior, the true Fisher F includes its precision l2 I (so F is the Hessian
on these generalised linear models), the EF = (1/N) sum_n g_n g_n^T never does. theta_0, theta_1
are the two parameters in the canonical order of `models.flatten` (for `vecfield` the bias comes
first: theta = (b, slope); for the linear `misspec` sets the bias comes last).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from natgrad_impls import grid as grid_module
from natgrad_impls import models
from natgrad_impls import numpy as ref
from natgrad_impls.models import Problem
from natgrad_impls.names import Curvature, Likelihood
from natgrad_impls.tasks import MISSPEC_VARIANTS, get_task

# -- figure 1: vector fields ------------------------------------------------------------------------

# The paper's code (experiments/vecfield): four starting points, the flows -gamma C^-1 g with
# gamma = 1/3 (GD), 1 (NGD), 3 (EF), both curvatures damped by 1e-8 I, drawn on [-1, 5]^2.
VECFIELD_STARTS = ((2.0, 4.5), (1.0, 0.0), (4.5, 3.0), (-0.5, 3.0))
VECFIELD_LRS = {"sgd": 1 / 3, "ngd": 1.0, "ef": 3.0}
VECFIELD_DAMPING = 1e-8
VECFIELD_LIMITS = (-1.0, 5.0)

# -- figure 2: quadratic models at the minimum ------------------------------------------------------

# The paper draws the level set (theta - theta*)^T (N C) (theta - theta*) = 3^2 of each curvature C.
ELLIPSE_SCALE = 3.0

# -- appendix: starting points ----------------------------------------------------------------------

STARTING_ALPHAS = (0.0, 0.5, 0.75, 0.875)  # the paper's 1 - (1, 1/2, 1/4, 1/8): theta0 = alpha theta*
QUADRATIC_STARTS = (0.5, 1.0, 2.0, 4.0)  # the paper's 1-D problem (x - 1/2)^2 + (x + 1/2)^2
QUADRATIC_LR = 0.5
QUADRATIC_DAMPING = 1e-6
QUADRATIC_STEPS = 10


def _params(problem: Problem, theta) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in models.unflatten(problem.model, np.asarray(theta, dtype=np.float64)).items()}


def _curvature(problem: Problem, batch, theta, curvature: Curvature) -> np.ndarray:
    """The exact true Fisher (with the prior's l2 I) or the EF (without it) at theta, D x D."""
    params = _params(problem, theta)
    if curvature == Curvature.EXACT:
        return ref.fisher(problem, params, batch)
    return ref.empirical_fisher(problem, params, batch)


def direction(problem: Problem, batch, theta, optimizer: str, damping: float = VECFIELD_DAMPING) -> np.ndarray:
    """The update direction -C^-1 g at theta: C = I (sgd), F + damping I (ngd), EF + damping I (ef)."""
    g = ref.gradient(problem, _params(problem, theta), batch)
    if optimizer == "sgd":
        return -g
    curvature = {"ngd": Curvature.EXACT, "ef": Curvature.EMPIRICAL}[optimizer]
    matrix = _curvature(problem, batch, theta, curvature) + damping * np.eye(len(g))
    return -np.linalg.solve(matrix, g)


def minimiser(problem: Problem, batch, theta0=None, tol: float = 1e-12, iterations: int = 100) -> np.ndarray:
    """theta* by Newton's method with the true Fisher, which is the Hessian of these generalised
    linear models (gaussian and bernoulli with their canonical links): one step on the gaussian
    tasks, a handful on the logistic ones. Stops when |g| < tol."""
    theta = np.zeros(problem.model.num_params()) if theta0 is None else np.asarray(theta0, dtype=np.float64)
    for _ in range(iterations):
        params = _params(problem, theta)
        g = ref.gradient(problem, params, batch)
        if np.linalg.norm(g) < tol:
            break
        theta = theta - np.linalg.solve(ref.fisher(problem, params, batch), g)
    return theta


def loss_at(problem: Problem, batch, theta) -> float:
    """L(theta) of a flat parameter vector (the NumPy reference's loss)."""
    return ref.loss(problem, _params(problem, theta), batch)


def _loss_grid(problem: Problem, batch, axis_0, axis_1) -> pd.DataFrame:
    """kind="contour" rows: the loss at every (theta_0, theta_1) of the two axes (a 2-D problem)."""
    t0, t1 = (a.ravel() for a in np.meshgrid(axis_0, axis_1, indexing="ij"))
    losses = [loss_at(problem, batch, (a, b)) for a, b in zip(t0, t1)]
    return pd.DataFrame({"kind": "contour", "theta_0": t0, "theta_1": t1, "loss": losses})


def _flow(problem: Problem, batch, start, optimizer: str, lr: float, damping: float, steps: int, dt: float):
    """Euler steps theta <- theta + dt lr d(theta) of the flow of `direction`; (steps + 1) x 2."""
    path = np.empty((steps + 1, 2))
    path[0] = start
    for k in range(steps):
        path[k + 1] = path[k] + dt * lr * direction(problem, batch, path[k], optimizer, damping)
    return path


def vecfield_table(seed: int = 0, steps: int = 500, dt: float = 0.1, grid_points: int = 15,
                   contour_points: int = 61, lrs: dict | None = None, damping: float = VECFIELD_DAMPING) -> pd.DataFrame:
    """Figure 1 of Kunstner et al. (2019): GD, NGD and EF on the `vecfield` task (2-D linear
    regression y = b + theta x with a Gaussian prior of variance 0.1), as one tidy table.

    Why: the figure shows that the EF's vector field does not point at the minimum (its curvature
    is a function of the residuals, not of the model), while NGD's does (on a linear-gaussian
    model F is the Hessian: -F^-1 g = theta* - theta exactly).

    Rows, by `kind` (theta_0 is the bias b, theta_1 the slope):
    - "data": x (the non-constant input) and y of each example.
    - "minimum": theta_0, theta_1, loss of theta*.
    - "contour": theta_0, theta_1, loss on a contour_points^2 grid over VECFIELD_LIMITS^2.
    - "field": optimizer, lr, damping, theta_0, theta_1 and the flow d_0, d_1 = -lr C^-1 g on a
      grid_points^2 grid (the quiver of the figure).
    - "trajectory": optimizer, lr, damping, start (0..3, the paper's four starting points), step,
      theta_0, theta_1, loss, for steps 0..steps.

    Trajectories are the paper's flows theta' = -lr C^-1 g, integrated by Euler steps of length
    dt (the paper: 50,000 steps of 0.001; here by default 500 of 0.1, the same flow time 50 at
    lr 1): sgd with lr 1/3 (C = I), ngd with lr 1 (C = F + damping I), ef with lr 3 (C = EF +
    damping I). Each Euler step is thus the optimizer's own update with learning rate lr * dt.
    Damping: the paper's 1e-8 I on both curvatures (it only keeps the solves defined; F has the
    prior's l2 = 0.01 anyway). g includes the prior, the EF does not (DESIGN 6).
    """
    task = get_task("vecfield")
    problem = task.problem
    X, y = task.load(seed).train
    batch = (X, y)
    lrs = dict(VECFIELD_LRS if lrs is None else lrs)
    star = minimiser(problem, batch)
    frames = [
        pd.DataFrame({"kind": "data", "x": X[:, 1], "y": y[:, 0]}),
        pd.DataFrame({"kind": ["minimum"], "theta_0": [star[0]], "theta_1": [star[1]], "loss": [loss_at(problem, batch, star)]}),
        _loss_grid(problem, batch, *[np.linspace(*VECFIELD_LIMITS, contour_points)] * 2),
    ]
    axis = np.linspace(*VECFIELD_LIMITS, grid_points)
    t0, t1 = (a.ravel() for a in np.meshgrid(axis, axis, indexing="ij"))
    for optimizer, lr in lrs.items():
        d = np.array([lr * direction(problem, batch, (a, b), optimizer, damping) for a, b in zip(t0, t1)])
        frames.append(pd.DataFrame({"kind": "field", "optimizer": optimizer, "lr": lr, "damping": damping,
                                    "theta_0": t0, "theta_1": t1, "d_0": d[:, 0], "d_1": d[:, 1]}))
        for start, point in enumerate(VECFIELD_STARTS):
            path = _flow(problem, batch, point, optimizer, lr, damping, steps, dt)
            frames.append(pd.DataFrame({
                "kind": "trajectory", "optimizer": optimizer, "lr": lr, "damping": damping, "start": start,
                "step": np.arange(steps + 1), "theta_0": path[:, 0], "theta_1": path[:, 1],
                "loss": [loss_at(problem, batch, p) for p in path],
            }))
    return _tidy(pd.concat(frames, ignore_index=True))


def _tidy(frame: pd.DataFrame, integers=("start", "step")) -> pd.DataFrame:
    """Integer columns stay integers where some rows leave them empty (pandas' nullable Int64)."""
    for name in integers:
        if name in frame:
            frame[name] = frame[name].astype("Int64")
    return frame


# -- figure 2 ---------------------------------------------------------------------------------------

def _window(star, matrices, radius, margin=1.5):
    """Square window around theta* holding every ellipse {Delta : Delta^T C Delta = radius^2}:
    the ellipse reaches radius sqrt((C^-1)_ii) along axis i."""
    half = margin * radius * max(math.sqrt(np.linalg.inv(c)[i, i]) for c in matrices for i in range(2))
    return [np.array([s - half, s + half]) for s in star]


def _curvature_rows(variant, matrices: dict, n: int) -> pd.DataFrame:
    rows = [{"variant": variant, "kind": "curvature", "curvature": name, "c_00": c[0, 0], "c_01": c[0, 1],
             "c_11": c[1, 1], "n": n, "radius": ELLIPSE_SCALE / math.sqrt(n)} for name, c in matrices.items()]
    return pd.DataFrame(rows)


def misspec_variant_table(variant: str, seed: int = 0, contour_points: int = 41) -> pd.DataFrame:
    """misspec_table's rows for one variant (see there)."""
    task = get_task("misspec", variant)
    problem = task.problem
    X, y = task.load(seed).train
    batch = (X, y)
    star = minimiser(problem, batch)
    matrices = {name.value: _curvature(problem, batch, star, name) for name in (Curvature.EXACT, Curvature.EMPIRICAL)}
    radius = ELLIPSE_SCALE / math.sqrt(len(X))
    lo_hi = _window(star, matrices.values(), radius)
    contour = _loss_grid(problem, batch, *[np.linspace(a, b, contour_points) for a, b in lo_hi])
    frames = [
        pd.DataFrame({"kind": "data", "x_0": X[:, 0], "x_1": X[:, 1], "y": y[:, 0]}),
        pd.DataFrame({"kind": ["minimum"], "theta_0": [star[0]], "theta_1": [star[1]], "loss": [loss_at(problem, batch, star)]}),
        contour,
        _curvature_rows(variant, matrices, len(X)),
    ]
    frame = pd.concat(frames, ignore_index=True)
    frame["variant"] = variant
    frame["model"] = "logistic" if problem.likelihood == Likelihood.BERNOULLI else "linear"
    return frame


def misspec_table(seed: int = 0, contour_points: int = 41, variants=MISSPEC_VARIANTS) -> pd.DataFrame:
    """Figure 2 of Kunstner et al. (2019) and its appendix version: the Fisher and the EF as
    quadratic models of the loss at its minimum, on well-specified and misspecified problems.

    Why: the EF equals the Fisher at the minimum only when the model is correct (the residuals
    then have the model's own variance) and N is large; on the misspecified sets the EF's
    quadratic model is the wrong shape and size, so it is no Hessian approximation there.

    One block of rows per `variant` of the `misspec` task (column `variant`; column `model` is
    "logistic" or "linear"), by `kind`:
    - "data": x_0, x_1 (the two inputs; for the linear sets x_1 is the constant 1) and y.
    - "minimum": theta_0, theta_1, loss of theta* (Newton with the Fisher, |g| < 1e-12).
    - "contour": theta_0, theta_1, loss on a contour_points^2 square grid around theta*, wide
      enough for both ellipses (1.5 times their largest extent).
    - "curvature": curvature = "exact" (the true Fisher at theta*, with the prior's l2 I on the linear sets)
      or "empirical" (the EF at theta*), its entries c_00, c_01, c_11, the number of examples n
      and radius = 3 / sqrt(n): the paper's ellipse is theta* + radius C^-1/2 u, |u| = 1, the
      level set where the quadratic model (1/2) Delta^T C Delta rises by radius^2 / 2.
    """
    return pd.concat([misspec_variant_table(v, seed, contour_points) for v in variants], ignore_index=True)


# -- appendix: starting points ----------------------------------------------------------------------

def quadratic_problem() -> tuple[Problem, tuple[np.ndarray, np.ndarray]]:
    """The paper's 1-D problem (x - 1/2)^2 + (x + 1/2)^2 as a linear regression: two examples with
    input 1 and targets +-1/2, so L = (theta^2 + 1/4)/2, theta* = 0, F = 1, EF = theta^2 + 1/4."""
    problem = Problem(models.linear(1, 1), Likelihood.GAUSSIAN)
    return problem, (np.ones((2, 1)), np.array([[0.5], [-0.5]]))


def _run(problem: Problem, batch, optimizer: str, theta0, steps: int, lr: float, damping: float) -> np.ndarray:
    """Losses at steps 0..steps of the NumPy reference optimizer from theta0 (NaN after a
    non-finite loss)."""
    kwargs = {"lr": lr} if optimizer in ("sgd", "adam") else {"lr": lr, "damping": damping}
    opt = ref.OPTIMIZERS[optimizer](problem, **kwargs)
    params = _params(problem, theta0)
    state = opt.init(params)
    losses = np.full(steps + 1, np.nan)
    for k in range(steps + 1):
        losses[k] = ref.loss(problem, params, batch)
        if not np.isfinite(losses[k]):
            break
        try:
            params, state, _ = opt.step(params, state, batch)
        except np.linalg.LinAlgError:
            break
    return losses


def best_hyperparameters(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{optimizer: {"lr", "damping"}} of each optimizer's best run in a grid frame (rows with
    best and repeat == 0; damping NaN for optimizers without one)."""
    best = frame[frame["best"].astype(bool) & (frame["repeat"] == 0)]
    out = {}
    for optimizer, rows in best.groupby("optimizer", observed=True):
        out[str(optimizer)] = {"lr": float(rows["lr"].iloc[0]), "damping": float(rows["damping"].iloc[0])}
    return out


def _runs(problem_name, problem, batch, optimizer, starts, theta_of, star, hyper, steps, minimum):
    frames = []
    for start in starts:
        theta0 = np.asarray(theta_of(start), dtype=np.float64)
        losses = _run(problem, batch, optimizer, theta0, steps, hyper["lr"], hyper["damping"])
        frames.append(pd.DataFrame({
            "kind": "run", "problem": problem_name, "optimizer": optimizer, "lr": hyper["lr"],
            "damping": hyper["damping"], "start": float(start), "distance": float(np.linalg.norm(theta0 - star)),
            "step": np.arange(steps + 1), "loss": losses, "excess": losses - minimum,
        }))
    return frames


def starting_point_table(grid: pd.DataFrame | None = None, task: str = "wine", alphas=STARTING_ALPHAS,
                         steps: int = 20, optimizers=("sgd", "ngd", "ef"), lrs=grid_module.PAPER_LRS,
                         dampings=grid_module.PAPER_DAMPINGS, quadratic_starts=QUADRATIC_STARTS,
                         quadratic_steps: int = QUADRATIC_STEPS) -> pd.DataFrame:
    """The paper's starting-point figure (Kunstner et al. 2019, appendix): does the EF do better
    when it starts near the optimum, where one might hope it approximates the Fisher?

    Why: the EF's curvature scales with the squared residuals, not with the model's curvature, so
    its steps depend on where it starts in a way NGD's do not. On the 1-D problem
    (theta^2 + 1/4)/2 the EF step is lr theta / (theta^2 + 1/4): tiny far from theta* = 0, while
    NGD contracts theta by (1 - lr) from anywhere; on `task` (default `wine`, standing in for the
    paper's Boston) every optimizer runs with its best grid hyperparameters from
    theta0 = alpha theta*, for alpha in `alphas` (0: the Kunstner protocol's start).

    Rows, by `kind`:
    - "run": problem ("quadratic" or the task's name), optimizer, lr, damping, start (theta0 on
      the quadratic, alpha on the task), distance = |theta0 - theta*|, step 0..steps, loss,
      excess = loss - minimum (NaN after a divergence).
    - "minimum": problem, loss of theta*.

    Quadratic: ngd and ef at the paper's lr 0.5, damping 1e-6, for `quadratic_steps` steps from
    theta0 in `quadratic_starts`; sgd is left out there since F = 1 makes it NGD up to the
    damping. Task: the hyperparameters are the best runs of `grid` (a `run_grid` frame; rows with
    best & repeat == 0), or of a fresh `run_grid(task, optimizers, lrs=lrs, dampings=dampings)`
    (the paper's grid by default, without chaos repeats) when grid is None.
    """
    frames = []
    problem, batch = quadratic_problem()
    minimum = loss_at(problem, batch, [0.0])
    frames.append(pd.DataFrame({"kind": ["minimum"], "problem": ["quadratic"], "loss": [minimum]}))
    for optimizer in ("ngd", "ef"):
        hyper = {"lr": QUADRATIC_LR, "damping": QUADRATIC_DAMPING}
        frames += _runs("quadratic", problem, batch, optimizer, quadratic_starts, lambda s: [s], np.zeros(1), hyper,
                        quadratic_steps, minimum)
    if grid is None:
        grid = grid_module.run_grid(task, list(optimizers), lrs=lrs, dampings=dampings, repeats=0).frame
    hyperparameters = best_hyperparameters(grid[grid["task"] == task])
    t = get_task(task)
    X, y = t.load().train
    star = minimiser(t.problem, (X, y))
    minimum = loss_at(t.problem, (X, y), star)
    frames.append(pd.DataFrame({"kind": ["minimum"], "problem": [task], "loss": [minimum]}))
    for optimizer in optimizers:
        if optimizer in hyperparameters:
            frames += _runs(task, t.problem, (X, y), optimizer, alphas, lambda a: a * star, star,
                            hyperparameters[optimizer], steps, minimum)
    return _tidy(pd.concat(frames, ignore_index=True), integers=("step",))
