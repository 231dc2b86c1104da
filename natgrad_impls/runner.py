"""One training run (DESIGN 4, 7): a task, an optimizer, a framework, recorded step by step.

    frame = runner.run("breastcancer", "ngd", "torch", hyperparameters={"lr": 1.0, "damping": 1e-4})

Every run starts from parameters drawn in NumPy (`models.init_params`): theta0 = 0 on the convex
tasks (the Kunstner protocol), Glorot elsewhere. Rows are steps k = 0..steps, each describing the
parameters theta_k after k updates:

- loss, grad_norm: the objective and the norm of its gradient at theta_k, on the step's batch: the
  full-batch objective on the convex (full-batch) tasks, the mini-batch loss on networks. They are
  the `info` the optimizer returns for step k; the last row (k = steps) comes from one more step
  whose update is discarded.
- time_s: cumulative wall-clock of the steps 0..k-1 (each synchronised: torch.cuda.synchronize,
  jax.block_until_ready), after two warm-up steps (jit compilation, first-call costs; K-FAC's
  second runs its other program) that are not recorded; evaluation, logging and batch slicing are
  outside it.
- train_loss, train_accuracy, test_loss, test_accuracy: full-train and test evaluation, every
  `eval_every` steps and at the last step, on tasks trained with mini-batches or with a test split
  (the networks); empty on the other rows. Accuracy where the task has classes.
- cos_ef_ngd (optional): cosine between (EF + damping I)^-1 g and (F + damping I)^-1 g at theta_k
  on the step's batch (F includes the problem's l2 term, EF never does), with the run's damping;
  with it, cos_ngd_grad: cosine between (F + damping I)^-1 g and g. Near 1 (typically because the
  damping outweighs the Fisher along g) the NGD step is a gradient step, and so is the EF's where
  cos_ef_ngd is near 1 too. Each step's parameters and batch are held, and their cosines computed
  at the next evaluation (at most COSINES_HELD steps later): an exact-Fisher solve between two
  steps slowed the next step 2x (mnist1d-mlp ef, torch and jax), which time_s would have counted.
- diverged: the run stopped because its loss exceeded 100 x the first loss, or was NaN/inf (as
  after a step whose solve failed: a Cholesky that fails, or damping 0 with fewer columns than
  parameters, gives NaN parameters in every framework; NaturalGradient says what damping 0 does
  otherwise); the same value on every row of the run. A diverged run's last row is the step that diverged;
  nothing is raised. (jax brings losses to the host every 16 steps; a divergence seen late
  truncates the run at its step.)
- lr, damping and the optimizer's other hyperparameters; batch_size (empty for full batch).
- variant (misspec only) and logit_clip (Bernoulli tasks only: `paper`, the logits clipped as
  Kunstner et al.'s code does, or `none`, the exact likelihood).

Mini-batches: a per-epoch permutation drawn from the seed, cut into batches of batch_size (the
incomplete last one dropped, so that shapes never change), gathered on the device once per epoch.
Hyperparameters the optimizer does not have are empty (NaN), never zero. Same seed, same machine:
identical numbers (time_s aside). `frame.attrs` holds "setup_s", "loop_s", "step_s", "eval_s":
the wall-clock of setup (data, conversion, warm-up), of the whole step loop, of the timed steps
and of the evaluations, so that the runner's own overhead (loop_s - step_s) can be measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from natgrad_impls import hyperparameters as hp
from natgrad_impls import make_optimizer, models, results, timing
from natgrad_impls.names import Curvature, DType, Device, Fisher, Framework, Optimizer, parse
from natgrad_impls.tasks import Task, get_task

if TYPE_CHECKING:  # imported where a table is made (`results`: the command line starts without it)
    import pandas as pd

DIVERGENCE_FACTOR = 100.0
DEFAULT_EVAL_EVERY = 200
EVAL_CHUNK = 4096
HYPERPARAMETER_ORDER = ("lr", "damping", "momentum", "b1", "b2", "eps", "fisher", "samples", "kfac_update_period",
                        "kfac_ema")


# -- validation, shared with the command line and the grid ------------------------------------------

def is_convex(task: Task) -> bool:
    """One Dense layer with one output, gaussian or bernoulli: the tasks the numpy reference runs."""
    from natgrad_impls.numpy import check_problem

    try:
        check_problem(task.problem)
    except ValueError:
        return False
    return True


def frameworks_for(task: Task) -> tuple[Framework, ...]:
    return tuple(Framework) if is_convex(task) else (Framework.TORCH, Framework.JAX)


def available_devices(framework: Framework) -> tuple[Device, ...]:
    """cpu, plus cuda where the framework sees a GPU (numpy: cpu only)."""
    if framework == Framework.TORCH:
        import torch

        return (Device.CPU, Device.CUDA) if torch.cuda.is_available() else (Device.CPU,)
    if framework == Framework.JAX:
        import jax

        try:
            return (Device.CPU, Device.CUDA) if jax.devices("gpu") else (Device.CPU,)
        except RuntimeError:
            return (Device.CPU,)
    return (Device.CPU,)


def _allowed(values) -> str:
    return ", ".join(str(getattr(v, "value", v)) for v in values)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated run: names parsed into Enums, the task resolved, hyperparameters checked."""

    task: Task
    optimizer: Optimizer
    framework: Framework
    device: Device
    dtype: DType
    hyperparameters: Any  # the optimizer's hyperparameters dataclass

    def kwargs(self) -> dict:
        return optimizer_kwargs(self.optimizer, self.hyperparameters)


def resolve_task(task: str | Task, variant: str | None = None, logit_clip: str | None = None) -> Task:
    """The task (a name or a Task), with the given misspec variant and logit clip (None: its own)."""
    if isinstance(task, Task):
        task = task.with_variant(variant) if variant is not None else task
    else:
        task = get_task(task, variant)
    return task.with_logit_clip(logit_clip) if logit_clip is not None else task


def check_setting(task: Task, framework: Framework, device: Device, dtype: DType) -> None:
    """ValueError naming the field and the allowed values for a framework/device/dtype that cannot
    run `task` here (numpy on a network, numpy in float32, cuda without a GPU)."""
    allowed = frameworks_for(task)
    if framework not in allowed:
        raise ValueError(f"framework: {framework.value!r} is not available for task {task.name!r} "
                         f"(one of {_allowed(allowed)})")
    if framework == Framework.NUMPY and dtype != DType.FLOAT64:
        raise ValueError(f"dtype: {dtype.value!r} is not available for numpy (one of float64)")
    devices = available_devices(framework)
    if device not in devices:
        raise ValueError(f"device: {device.value!r} is not available here for {framework.value} (one of {_allowed(devices)})")


def accepted(optimizer: Optimizer | str) -> tuple[str, ...]:
    """The hyperparameters an optimizer takes (the same in every framework; `ef` has no fisher)."""
    import inspect

    from natgrad_impls.numpy import OPTIMIZERS

    optimizer = parse(Optimizer, optimizer, "optimizer")
    if optimizer not in OPTIMIZERS:  # the numpy signature is the one source of the names
        raise ValueError(f"optimizer: {optimizer.value!r} has no numpy reference (natgrad_impls.numpy.OPTIMIZERS), "
                         "which names its hyperparameters")
    return tuple(name for name in inspect.signature(OPTIMIZERS[optimizer]).parameters if name != "problem")


def optimizer_kwargs(optimizer: Optimizer, h) -> dict:
    """The keyword arguments of `natgrad_impls.<framework>.<optimizer>` from its hyperparameters."""
    values = dataclasses.asdict(h)
    return {name: values[name] for name in accepted(optimizer)}


def make_hyperparameters(optimizer: Optimizer | str, values: dict, seed: int = 0):
    """The optimizer's validated hyperparameters from `values` (None entries are ignored); the
    run's seed seeds the optimizer's sampler unless `values` sets it. ValueError naming the field."""
    optimizer = parse(Optimizer, optimizer, "optimizer")
    cls = hp.HYPERPARAMETERS[optimizer]
    names = accepted(optimizer)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name in names}
    values = {k: v for k, v in (values or {}).items() if v is not None}
    listed = ", ".join(n for n in fields if n != "seed")  # (the seed is the run's unless given: not one to set)
    for name in values:
        if name not in fields:
            raise ValueError(f"{name}: not a hyperparameter of {optimizer.value} (one of {listed})")
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise ValueError(f"{name}: required by {optimizer.value} (its hyperparameters: {listed})")
    if "seed" in fields and "seed" not in values:
        values["seed"] = seed
    return cls(**values)


def resolve(task, optimizer, framework, device="cpu", dtype="float64", hyperparameters=None, seed=0,
            variant=None, logit_clip=None) -> Spec:
    """Parse and check everything about a run before any work is done (ValueError naming the field)."""
    optimizer = parse(Optimizer, optimizer, "optimizer")
    framework = parse(Framework, framework, "framework")
    device = parse(Device, device, "device")
    dtype = parse(DType, dtype, "dtype")
    task = resolve_task(task, variant, logit_clip)
    check_seed(seed)
    h = make_hyperparameters(optimizer, hyperparameters or {}, seed)
    if getattr(h, "damping", None) == 0 and not task.problem.l2 and not is_convex(task):
        # undamped and without l2, a network's curvature (rank <= batch x classes, far below its
        # parameters) is singular: the solve could only fail, after forming a D x D matrix
        raise ValueError(f"damping: 0 leaves {task.name}'s curvature singular; use a damping > 0")
    check_setting(task, framework, device, dtype)
    return Spec(task, optimizer, framework, device, dtype, h)


# float32 keeps ef's and ngd's directions at any damping while a batch gives the curvature factor
# far fewer columns than the network has parameters (push-through on the factor's span). As the
# columns near the parameters, Woodbury's kernel U^T U nears singular (a categorical network's U
# has a rank below D: a shift of every logit is in C's null space), and from D columns on the solve
# is dense (LU on C + damping I, which float32 resolves to eps ||C|| only). float32's exact-NGD
# direction against float64's at damping 1e-8 on a 16-32-10 MLP (874 parameters): 2e-5 at 450
# columns, 1e-4 at 630, 5% at 846; on a 4-6-5 MLP at 80 columns (dense), 150%; at 1e-4, at most
# 1e-4 in all of them. Below this damping a float32 batch must give fewer columns than D / 2.
FLOAT32_WIDE_BATCH_MIN_DAMPING = 1e-4


def check_float32_wide_batches(spec: Spec, batch_size: int | None, cos_damping: float | None = None,
                               cos_field: str = "cos_damping") -> None:
    """ValueError naming the field where a float32 run on a network would solve with a factor of at
    least half as many columns as parameters (batch_size, None for the task's) at a damping below
    `FLOAT32_WIDE_BATCH_MIN_DAMPING`: ef's and ngd's steps, and the cosine's EF and exact-Fisher
    solves (cos_damping: None where the run records no cosine; `cos_field` its name)."""
    problem = spec.task.problem
    if spec.dtype != DType.FLOAT32 or is_convex(spec.task):
        return
    batch_size = batch_size or spec.task.batch_size or spec.task.n_train  # (None: the task's, or full batch)
    solves = []  # (field, damping, curvature, samples)
    if spec.optimizer in (Optimizer.EF, Optimizer.NGD):
        h = spec.hyperparameters
        curvature = Curvature.EMPIRICAL if spec.optimizer == Optimizer.EF else Curvature(h.fisher.value)
        solves.append(("damping", h.damping, curvature, h.samples))
    if cos_damping is not None:
        solves += [(cos_field, cos_damping, curvature, 1) for curvature in (Curvature.EMPIRICAL, Curvature.EXACT)]
    size = problem.model.num_params()
    for field, damping, curvature, samples in solves:
        columns = problem.factor_columns(curvature, batch_size, samples)
        shift = 0.0 if curvature == Curvature.EMPIRICAL else problem.l2  # (l2 enters the true Fisher only)
        if 2 * columns >= size and damping + shift < FLOAT32_WIDE_BATCH_MIN_DAMPING:
            raise ValueError(f"{field}: {damping:g} is below {FLOAT32_WIDE_BATCH_MIN_DAMPING:g}, where float32 loses "
                             f"the direction of a wide batch: batch_size {batch_size} gives the {curvature} "
                             f"curvature {columns} columns, at least half of {spec.task.name}'s {size} parameters; "
                             "use float64, a larger damping or a smaller batch_size")


def check_batch_size(task: Task, batch_size) -> None:
    """ValueError naming the field unless `batch_size` is None (the task's default) or an integer
    from 1 to the training set's size (a larger one would silently become full batch)."""
    if batch_size is None:
        return
    if not hp.is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be an integer >= 1")
    if batch_size > task.n_train:
        raise ValueError(f"batch_size: {batch_size} is more than {task.name}'s {task.n_train} training examples "
                         "(leave it out for the task's default)")


def check_seed(seed) -> None:
    """ValueError naming the field unless `seed` is an integer >= 0 (what NumPy's generators take)."""
    if not hp.is_integer(seed) or seed < 0:
        raise ValueError(f"seed: {seed!r} must be an integer >= 0")


def task_columns(task: Task) -> dict:
    """What a result records of the task beyond its name: the misspec variant and the Bernoulli
    likelihood's logit clip (`models.logit_clip_name`), each only where the task has one."""
    clip = models.logit_clip_name(task.problem)
    return {**({"variant": task.variant} if task.variant is not None else {}),
            **({"logit_clip": clip} if clip is not None else {})}


def hyperparameter_columns(optimizer: Optimizer, h) -> dict:
    """lr and damping always (NaN where the optimizer has none), then the optimizer's others; not
    `samples` where the Fisher is exact: no labels are drawn, so it is missing, and missing is empty."""
    values = optimizer_kwargs(optimizer, h)
    columns = {"lr": float(values.get("lr", math.nan)), "damping": float(values.get("damping", math.nan))}
    if values.get("fisher") == Fisher.EXACT:
        values.pop("samples", None)
    for name in HYPERPARAMETER_ORDER[2:]:
        if name in values:
            value = values[name]
            columns[name] = value.value if hasattr(value, "value") else value
    return columns


# -- framework plumbing ----------------------------------------------------------------------------

class _NumpyIO:
    fetch_every = 1  # steps between bringing losses to the host (and checking for divergence)

    def __init__(self, problem, device, dtype):
        self.problem = problem

    def params(self, arrays):
        return {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}

    def array(self, a):
        return np.asarray(a)

    def pair(self, x, y):
        return x, y

    def batches(self, data, order, size):
        """The batches of one epoch: data permuted by `order`, cut into consecutive `size` rows."""
        x, y = data[0][order], data[1][order]
        return [(x[i:i + size], y[i:i + size]) for i in range(0, len(order), size)]

    def sync(self, tree):
        pass

    def scalars(self, info):
        return float(info["loss"]), float(info["grad_norm"])

    def prepare_evaluation(self, params, splits, classes):
        pass

    def prepare_cosine(self, params, batch, damping):
        pass

    def evaluate(self, params, x, y, classes):
        import natgrad_impls.numpy as nn

        value = nn.loss(self.problem, params, (x, y))
        theta = models.flatten(self.problem.model, params)
        correct = math.nan
        if classes == 2:
            z = np.hstack([x, np.ones((len(x), 1))]) if self.problem.model.layers[0].bias else x
            correct = float(np.sum((z @ theta > 0) == (y[:, 0] > 0.5)))
        return value, correct / len(x)

    def cosine(self, params, batch, damping):
        import natgrad_impls.numpy as nn
        from natgrad_impls.numpy import reference

        g = nn.gradient(self.problem, params, batch)
        eye = np.eye(len(g))
        d_ef = reference.solve(nn.empirical_fisher(self.problem, params, batch) + damping * eye, g)
        d_ngd = reference.solve(nn.fisher(self.problem, params, batch) + damping * eye, g)
        return float(_vector_cosine(d_ef, d_ngd, np.linalg.norm)), float(_vector_cosine(d_ngd, g, np.linalg.norm))


class _TorchIO:
    fetch_every = 1

    def __init__(self, problem, device, dtype):
        import torch

        import natgrad_impls.torch as nt
        from natgrad_impls.torch import curvature, model

        self.torch, self.nt, self.C, self.M = torch, nt, curvature, model
        self.problem = problem
        self.device = torch.device(device.value)
        self.dtype = getattr(torch, dtype.value)
        self.cuda = device == Device.CUDA

    def params(self, arrays):
        return self.nt.to_torch(arrays, self.device, self.dtype)

    def array(self, a):
        a = np.asarray(a)
        return self.torch.as_tensor(a, device=self.device, dtype=self.dtype if a.dtype.kind == "f" else None)

    def pair(self, x, y):
        return self.array(x), self.array(y)

    def batches(self, data, order, size):
        index = self.torch.as_tensor(order, device=self.device)
        x, y = data[0].index_select(0, index), data[1].index_select(0, index)
        return list(zip(x.split(size), y.split(size)))  # views

    def sync(self, tree):
        if self.cuda:
            self.torch.cuda.synchronize()

    def scalars(self, info):
        return float(info["loss"]), float(info["grad_norm"])

    def prepare_evaluation(self, params, splits, classes):
        pass

    def prepare_cosine(self, params, batch, damping):
        pass

    def evaluate(self, params, x, y, classes):
        torch, total, correct = self.torch, 0.0, 0.0
        with torch.no_grad():
            for start in range(0, x.shape[0], EVAL_CHUNK):
                xc, yc = x[start:start + EVAL_CHUNK], y[start:start + EVAL_CHUNK]
                f = self.nt.output(self.problem.model, params, xc)
                total += float(self.M.nll(self.problem, f, yc).sum())
                correct += _correct(f, yc, classes)
            value = total / x.shape[0]
            if self.problem.l2:
                value += 0.5 * self.problem.l2 * float(sum((p**2).sum() for p in params.values()))
        return value, correct / x.shape[0]

    def cosine(self, params, batch, damping):
        C, problem = self.C, self.problem
        _, grad, ef = C.gradient_and_curvature(problem, params, batch, Curvature.EMPIRICAL)
        _, _, fisher = C.gradient_and_curvature(problem, params, batch, Curvature.EXACT, gradient=False)  # EF's
        a, b, g = (C.flatten(problem.model, C.from_layers(problem.model, layers)) for layers in (
            *_cosine_directions(C, problem, grad, ef, fisher, damping), grad))
        norm = self.torch.linalg.vector_norm
        return float(_vector_cosine(a, b, norm)), float(_vector_cosine(b, g, norm))


class _JaxIO:
    fetch_every = 16

    def __init__(self, problem, device, dtype):
        import jax
        import jax.numpy as jnp

        import natgrad_impls.jax as nj  # (turns on x64 before any array is placed: int64 labels stay int64)

        self.jax, self.jnp = jax, jnp
        self.problem = problem
        self.device = nj.jax_device(device)
        self.dtype = getattr(jnp, dtype.value)
        self.np_dtype = np.dtype(dtype.value)

    def params(self, arrays):
        return self.jax.device_put({k: np.asarray(v, dtype=self.np_dtype) for k, v in arrays.items()}, self.device)

    def _host(self, a):
        a = np.asarray(a)
        return a.astype(self.np_dtype, copy=False) if a.dtype.kind == "f" else a

    def array(self, a):
        return self.jax.device_put(self._host(a), self.device)

    def pair(self, x, y):
        return self.jax.device_put((self._host(x), self._host(y)), self.device)  # one transfer call

    def batches(self, data, order, size):
        """One compiled call per epoch cuts all its batches (eager slicing would dispatch, and
        compile, per batch; a compiled take per step costs twice as much here)."""
        return _jax_batch_cutter(size)(data, np.asarray(order))

    def scalars(self, info):
        return float(np.asarray(info["loss"])), float(np.asarray(info["grad_norm"]))  # the cheapest way out

    def prepare_evaluation(self, params, splits, classes):
        """Compile the evaluations during setup, not in the loop's first one."""
        for x, y in splits:
            self.evaluate(params, x, y, classes)

    def prepare_cosine(self, params, batch, damping):
        """Compile the cosine during setup (0.35 s on digits-mlp), not in the loop's eval_s."""
        self.cosine(params, batch, damping)

    def sync(self, tree):
        self.jax.block_until_ready(tree)

    def evaluate(self, params, x, y, classes):
        """One compiled call for a split of up to EVAL_CHUNK examples, else chunks of that size
        (the last one padded and masked): one compilation per split, done in setup."""
        jnp = self.jnp
        evaluate = _jax_evaluator(self.problem, classes)
        n = x.shape[0]
        size = n if n <= EVAL_CHUNK else EVAL_CHUNK
        totals = []
        for start in range(0, n, size):
            xc, yc = x[start:start + size], y[start:start + size]
            mask = jnp.ones(xc.shape[0], x.dtype)
            if xc.shape[0] < size:
                pad = size - xc.shape[0]
                xc = jnp.concatenate([xc, jnp.zeros((pad, *xc.shape[1:]), xc.dtype)])
                yc = jnp.concatenate([yc, jnp.zeros((pad, *yc.shape[1:]), yc.dtype)])
                mask = jnp.concatenate([mask, jnp.zeros(pad, x.dtype)])
            totals.append(evaluate(params, xc, yc, mask))
        total, correct = np.sum(np.asarray(self.jax.device_get(totals)), axis=0)
        value = float(total) / n
        if self.problem.l2:
            value += 0.5 * self.problem.l2 * float(sum((p**2).sum() for p in params.values()))
        return value, float(correct) / n

    def cosine(self, params, batch, damping):
        return tuple(float(c) for c in _jax_cosine(self.problem)(params, batch, float(damping)))


# The jax runs' own programs, built once per process for what they depend on (as the optimizers'
# steps, natgrad_impls.jax.optimizers._shared): the runs of a tuning job reuse them compiled.

@functools.lru_cache(maxsize=8)
def _jax_batch_cutter(size: int):
    import jax

    def cut(d, o):
        x, y = d[0][o], d[1][o]
        return [(x[i:i + size], y[i:i + size]) for i in range(0, o.shape[0], size)]

    return jax.jit(cut)


@functools.lru_cache(maxsize=8)
def _jax_evaluator(problem, classes):
    """Summed NLL and correct predictions of one masked chunk."""
    import jax
    import jax.numpy as jnp

    import natgrad_impls.jax as nj
    from natgrad_impls.jax import model as M

    def chunk(p, xc, yc, mask):
        f = nj.output(problem.model, p, xc)
        hits = _correct(f, yc, classes, jnp)
        return jnp.stack([(M.nll(problem, f, yc) * mask).sum(), (hits * mask).sum() if classes else hits])

    return jax.jit(chunk)


@functools.lru_cache(maxsize=8)
def _jax_cosine(problem):
    """cos_ef_ngd and cos_ngd_grad of one batch."""
    import jax
    import jax.numpy as jnp

    from natgrad_impls.jax import curvature as C

    model = problem.model

    def cosine(p, b, lam):
        _, grad, ef = C.gradient_and_curvature(problem, p, b, Curvature.EMPIRICAL)
        _, _, fisher = C.gradient_and_curvature(problem, p, b, Curvature.EXACT)
        a, c, g = (C.flatten(model, C.from_layers(model, layers)) for layers in (
            *_cosine_directions(C, problem, grad, ef, fisher, lam), grad))
        return _vector_cosine(a, c, jnp.linalg.norm), _vector_cosine(c, g, jnp.linalg.norm)

    return jax.jit(cosine, static_argnums=2)  # damping static: the solves branch on 0 (dense solve)


def _cosine_directions(C, problem, grad: dict, ef, fisher, damping):
    """EF's and the exact Fisher's directions for the gradient `grad`, as layer matrices, as their
    steps take them (`C.precondition`: push-through where the gradient lies in the factor's span,
    without Woodbury's cancellation), from one batch's EF and exact Fisher factors (the latter
    holds the same gradient in its own columns); `C` the framework's curvature module."""
    ngd, _ = C.precondition(problem, Curvature.EXACT, grad, fisher, damping)
    ef_direction, _ = C.precondition(problem, Curvature.EMPIRICAL, grad, ef, damping)
    return ef_direction, ngd


def _vector_cosine(a, b, norm):
    """cos(a, b) of two flat vectors, in the framework of `norm` (its vector 2-norm)."""
    return a @ b / (norm(a) * norm(b))


def _correct(f, y, classes, xp=None):
    """Number of correct predictions: argmax for categorical outputs, f > 0 for one bernoulli output."""
    if classes is None:
        return math.nan if xp is None else xp.asarray(math.nan)
    if f.shape[-1] == 1:
        hits = (f[:, 0] > 0) == (y[:, 0] > 0.5)
    else:
        hits = f.argmax(-1) == y
    return float(hits.sum()) if xp is None else hits.astype(f.dtype)


_IO = {Framework.NUMPY: _NumpyIO, Framework.TORCH: _TorchIO, Framework.JAX: _JaxIO}


class _Batches:
    """Full batch, or mini-batches of a fixed size in a per-epoch permutation drawn from the seed
    (the last incomplete batch of an epoch is dropped, so that every step sees the same shapes).
    The training set lives on the device; each epoch is split into its batches there at once."""

    def __init__(self, io, x, y, batch_size, seed):
        self.io = io
        self.n = int(x.shape[0])
        self.full = batch_size is None or batch_size >= self.n
        self.size = self.n if self.full else int(batch_size)
        self.rng = models.random_stream(seed, "batches")
        self.data = io.pair(x, y)  # on the device, once
        self.epoch: list = []

    def first(self):
        """A batch for the warm-up step, cut as every epoch's are (so jax compiles that here)."""
        if self.full:
            return self.data
        return self.io.batches(self.data, np.arange(self.n // self.size * self.size), self.size)[0]

    def next(self):
        if self.full:
            return self.data
        if not self.epoch:
            order = self.rng.permutation(self.n)[: self.n // self.size * self.size]
            self.epoch = self.io.batches(self.data, order, self.size)[::-1]
        return self.epoch.pop()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that keep torch, BLAS and XLA:CPU to `threads` cores. Set them before
    torch or jax is imported in a process that shares the machine with other jobs: a multi-threaded
    step that loses a core to another process slows down several-fold.

    XLA sizes its thread pools from PJRT_NPROC (or NPROC) where it is set, else from the CPU
    affinity (PJRT's DefaultThreadPoolSize). The XLA_FLAGS often quoted for this
    (`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`) left a 2000 x 2000 matmul
    on both cores of a 2-core machine under jax 0.10.2; PJRT_NPROC=1 keeps it on one, as taskset
    does. PJRT_NPROC, not NPROC: other tools read NPROC as a build parallelism."""
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "PJRT_NPROC": n}


def progress_bar(total: int, desc: str, enabled: bool | None = None, log_every_s: float | None = None):
    """A tqdm bar on a terminal, nothing otherwise (enabled=None: decide by stderr being a tty).
    log_every_s: with enabled None and no terminal (a job log), a line on stdout at most this often."""
    from tqdm.auto import tqdm

    if enabled is None and log_every_s is not None and not sys.stderr.isatty():
        return LogProgress(total, desc, log_every_s)
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5)


class LogProgress:
    """Progress as whole lines, for a job log ("wine ngd: 4096/9881 runs (41%), 30 s"); tqdm's
    output off a terminal is one line of carriage returns. None at the end: the caller says it."""

    def __init__(self, total: int, desc: str, every_s: float):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            print(f"{self.desc}: {self.done}/{self.total} runs ({self.done / self.total:.0%}), "
                  f"{now - self.start:.0f} s", flush=True)

    def close(self) -> None:
        pass


# -- the run ---------------------------------------------------------------------------------------

def run(task, optimizer, framework, device="cpu", dtype="float64", hyperparameters=None, steps=None,
        batch_size=None, seed=0, *, variant=None, logit_clip=None, eval_every=None, cos_ef_ngd=False, cos_damping=None,
        init=None, progress=None) -> pd.DataFrame:
    """Train once and return the long-format table of DESIGN 7 (see the module docstring).

    task: a name or a Task, with `variant` (misspec) and `logit_clip` (paper or none; default: the
    task's own); hyperparameters: a dict of the optimizer's hyperparameters (lr, damping, ...);
    steps and batch_size default to the task's (batch_size None = full batch);
    eval_every: steps between full-train/test evaluations on networks (default 200: with the
    final one, six on a 1000-step run, a few percent of its time);
    cos_ef_ngd: also record the EF/NGD cosine, with `cos_damping` (default: the run's damping);
    init: "zeros" or "glorot" (default: zeros on the convex tasks, glorot elsewhere);
    progress: None = a bar when stderr is a terminal.
    """
    setup_start = time.perf_counter()
    spec = resolve(task, optimizer, framework, device, dtype, hyperparameters, seed, variant, logit_clip)
    task = spec.task
    steps, batch_size, eval_every = _check_lengths(task, steps, batch_size, eval_every)
    cos_damping = _check_cos_damping(spec, cos_damping) if cos_ef_ngd else None
    check_float32_wide_batches(spec, batch_size, cos_damping)

    data = task.load(seed)
    io = _IO[spec.framework](task.problem, spec.device, spec.dtype)
    batches = _Batches(io, data.train.X, data.train.y, batch_size, seed)
    test = None if data.test is None else io.pair(data.test.X, data.test.y)
    evaluate = test is not None or not batches.full
    init = init or ("zeros" if is_convex(task) else "glorot")
    params = io.params(models.init_params(task.problem.model, seed, init))
    opt = make_optimizer(spec.framework, spec.optimizer, task.problem, **spec.kwargs())
    state = opt.init(params)
    warm_up(io, opt, params, state, batches.first())
    if evaluate:
        io.prepare_evaluation(params, [batches.data] + ([test] if test is not None else []), task.classes)
    if cos_ef_ngd:
        io.prepare_cosine(params, batches.first(), cos_damping)
    record = _Record(steps + 1, cos_ef_ngd)
    diverged, last, initial, pending, held = False, steps, math.nan, [], []
    bar = progress_bar(steps, f"{task.name} {spec.optimizer.value} {spec.framework.value}", progress)
    with _frozen_heap():
        setup_s = time.perf_counter() - setup_start
        loop_start = time.perf_counter()
        for k in range(steps + 1):
            batch = batches.next()
            evaluating = evaluate and (k % eval_every == 0 or k == steps)
            if cos_ef_ngd:
                held.append((k, params, batch))  # (the steps return new parameters: nothing is copied)
            if evaluating:
                record.evaluation(k, io, params, batches.data, test, task.classes)
            if evaluating or len(held) >= COSINES_HELD:
                record.cosine(io, held, cos_damping)
            start = time.perf_counter()
            new_params, new_state, info = opt.step(params, state, batch)
            io.sync(new_params)
            took = time.perf_counter() - start
            record.time_s[k] = record.step_s
            pending.append((k, info))
            if len(pending) >= io.fetch_every or k == steps:
                # Losses come to the host in groups (jax: every 16 steps, each fetch costs a few us);
                # a divergence found late truncates the run at its step, as if it had stopped there.
                found, initial = _fetch(io, pending, record.loss, record.grad_norm, initial)
                if found is not None:
                    diverged, last = True, found
                    break
            if k == steps:  # the extra step only measured the final parameters
                break
            record.step_s += took
            params, state = new_params, new_state
            bar.update(1)
        record.cosine(io, [h for h in held if h[0] <= last], cos_damping)
    loop_s = time.perf_counter() - loop_start
    bar.close()

    import pandas as pd

    frame = pd.DataFrame({
        "task": task.name, "optimizer": spec.optimizer.value, "framework": spec.framework.value,
        "device": spec.device.value, "dtype": spec.dtype.value, "seed": seed,
        **hyperparameter_columns(spec.optimizer, spec.hyperparameters),
        "batch_size": math.nan if batches.full else batches.size,
        **record.columns(last + 1, diverged, evaluate, test is not None, task.classes is not None),
        **task_columns(task),
    })
    # a count: "128" in a CSV and empty for full batch, where a float column would write "128.0"
    frame = frame[ordered_columns(frame.columns)].astype({"batch_size": "Int64"})
    frame.attrs.update(setup_s=setup_s, loop_s=loop_s, step_s=record.step_s, eval_s=record.eval_s)
    return frame


@contextlib.contextmanager
def _frozen_heap():
    """The objects made so far (torch's or jax's, the data, the setup) moved out of the garbage
    collector's reach for the loop, and back after it: a full collection over them took 50-70 ms
    (torch, digits-mlp), and one that fell in a step added 70-85 ms to a run of 0.2 ms steps.
    Moving them is cheap, a collection is not: none is made here. A heap the caller froze (before a
    fork, say) is left as it is: unfreezing is global, it would undo theirs."""
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


def _check_lengths(task: Task, steps, batch_size, eval_every) -> tuple[int, int | None, int]:
    """steps, batch_size and eval_every, each checked (ValueError naming the field) or the default."""
    steps = task.steps if steps is None else steps
    if not hp.is_integer(steps) or steps < 0:  # (not int(): 2.7 steps would silently be 2)
        raise ValueError(f"steps: {steps!r} must be an integer >= 0")
    check_batch_size(task, batch_size)
    eval_every = DEFAULT_EVAL_EVERY if eval_every is None else eval_every
    if not hp.is_integer(eval_every) or eval_every < 1:
        raise ValueError(f"eval_every: {eval_every!r} must be an integer >= 1")
    return steps, task.batch_size if batch_size is None else batch_size, eval_every


def _check_cos_damping(spec: Spec, cos_damping):
    """The cosine's damping: the given one, else the run's (ValueError naming the field)."""
    cos_damping = spec.kwargs().get("damping") if cos_damping is None else cos_damping
    if cos_damping is None:
        raise ValueError(f"cos_damping: {spec.optimizer.value} has no damping; pass cos_damping (a number >= 0)")
    if not hp.is_finite_number(cos_damping) or cos_damping < 0:
        raise ValueError(f"cos_damping: {cos_damping!r} must be a finite number >= 0")
    return cos_damping


COSINES = ("cos_ef_ngd", "cos_ngd_grad")  # what io.cosine returns, in its order
COSINES_HELD = 64  # steps whose cosines wait for an evaluation at most (each holds its parameters)


class _Record:
    """What the loop records, one entry per row (NaN where nothing was recorded), and the seconds of
    the timed steps (step_s) and of the evaluations (eval_s)."""

    EVALUATIONS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")

    def __init__(self, rows: int, cos_ef_ngd: bool):
        self.loss, self.grad_norm, self.time_s = np.full(rows, np.nan), np.full(rows, np.nan), np.zeros(rows)
        self.cosines = np.full((rows, len(COSINES)), np.nan) if cos_ef_ngd else None
        self.evaluations = {name: np.full(rows, np.nan) for name in self.EVALUATIONS}
        self.step_s = self.eval_s = 0.0

    def evaluation(self, k, io, params, train, test, classes) -> None:
        start, e = time.perf_counter(), self.evaluations
        e["train_loss"][k], e["train_accuracy"][k] = io.evaluate(params, *train, classes)
        if test is not None:
            e["test_loss"][k], e["test_accuracy"][k] = io.evaluate(params, *test, classes)
        self.eval_s += time.perf_counter() - start

    def cosine(self, io, held: list, damping) -> None:
        """The cosines of the held (step, parameters, batch), which it empties; their time is the
        evaluations' (eval_s), not the steps'."""
        start = time.perf_counter()
        for k, params, batch in held:
            self.cosines[k] = io.cosine(params, batch, damping)  # cos_ef_ngd, cos_ngd_grad
        held.clear()
        self.eval_s += time.perf_counter() - start

    def columns(self, n: int, diverged: bool, evaluate: bool, has_test: bool, has_classes: bool) -> dict:
        """The first n rows: the evaluations where the run made them (accuracy where the task has
        classes, test where it has a test split), the cosine where it was asked for."""
        columns = {"step": np.arange(n), "loss": self.loss[:n], "time_s": self.time_s[:n],
                   "diverged": np.full(n, diverged), "grad_norm": self.grad_norm[:n]}
        if evaluate:
            for name, values in self.evaluations.items():
                if (has_classes or not name.endswith("accuracy")) and (has_test or not name.startswith("test")):
                    columns[name] = values[:n]
        if self.cosines is not None:
            columns.update(zip(COSINES, self.cosines[:n].T))
        return columns


def warm_up(io, opt, params, state, batch) -> None:
    """Steps from (params, state) on `batch` whose results are discarded: compilation and first-call
    costs (numpy's first step too takes 3-9 steps' time). Two, as K-FAC's second runs its other
    program (no inverse refresh)."""
    warm = (params, state)
    for _ in range(2):
        warm = opt.step(*warm, batch)[:2]
    io.sync(warm[0])


def diverged(loss, initial):
    """DESIGN 4's rule, for a loss or an array of them (the grid's runs): above DIVERGENCE_FACTOR x the
    initial loss, or NaN/inf (at step 0 too: an initial inf would otherwise bound nothing)."""
    return ~(np.isfinite(loss) & (loss <= DIVERGENCE_FACTOR * initial))


def _fetch(io, pending, loss, grad_norm, initial):
    """Record the pending steps' loss and gradient norm; the first step that diverged (loss above
    100 x the first one, or NaN/inf) or None, and the first loss."""
    found = None
    for j, info in pending:
        loss[j], grad_norm[j] = io.scalars(info)
        if j == 0:
            initial = loss[0]
        if diverged(loss[j], initial):
            found = j
            break
    pending.clear()
    return found, initial


LEADING = ("task", "optimizer", "framework", "device", "dtype", "seed", "lr", "damping", "step", "loss", "time_s",
           "diverged", "grad_norm", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "cos_ef_ngd",
           "cos_ngd_grad", "variant", "logit_clip")


def ordered_columns(columns) -> list[str]:
    """DESIGN 7's columns first, in a fixed order, then the rest as they come."""
    present = list(columns)
    return [c for c in LEADING if c in present] + [c for c in present if c not in LEADING]


# -- many runs in one process, resumable ---------------------------------------------------------------

def run_many(task, optimizer, framework, device, settings, seeds, checkpoints=None, log=print,
             **protocol) -> pd.DataFrame:
    """Every setting (a dict of hyperparameters) on every seed, one long table: the pipeline's tune
    and train jobs. `protocol`: run()'s keyword arguments shared by all (dtype, steps, eval_every,
    cos_ef_ngd, ...). `checkpoints`: a folder that keeps each finished run, so that a job killed
    part way (a cluster's time limit, Ctrl-C) starts again where it stopped rather than from the
    first run; a run is kept under a name made from everything that determines it (this code and
    the machine included: a fix, or another node, never reuses a run), and the caller clears the
    folder once the table is written (`clear_checkpoints`). `log`: one line per run, counted as the timing rules count ("... (3 of 48)")."""
    import pandas as pd

    frames, total = [], len(settings) * len(seeds)
    machine = None if checkpoints is None else timing.device_name(device, framework)  # kept runs keep their time_s
    for hyperparameters in settings:
        for seed in seeds:
            kept = None if checkpoints is None else checkpoint_path(checkpoints, task, optimizer, framework, device,
                                                               hyperparameters, seed, protocol, machine, code_version())
            if kept is not None and kept.exists():
                frame, how = results.read(kept), "kept from the interrupted job"
            else:
                frame, how = run(task, optimizer, framework, device, hyperparameters=hyperparameters, seed=seed,
                                 progress=False, **protocol), ""
                if kept is not None:
                    results.write(frame, kept)
            log(f"{_run_line(frame, hyperparameters, seed, how)} ({len(frames) + 1} of {total})")
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _run_line(frame, hyperparameters, seed, how="") -> str:
    """'{'lr': 0.1} seed 0: final loss 0.12 (full-train 0.1) at step 400, 0.3 s of steps': the last
    step's loss, and the full-train loss that tuning ranks settings by where the last step has one
    (a mini-batch loss can sit far from it: 2e-4 against 0.015 on digits-mlp)."""
    last = frame.iloc[-1]
    train = last.get("train_loss", math.nan)
    line = f"{hyperparameters} seed {seed}: {'diverged' if last['diverged'] else 'final'} loss {last['loss']:.6g}"
    line += f" (full-train {train:.6g})" if not math.isnan(train) else ""
    return line + f" at step {int(last['step'])}, {last['time_s']:.3g} s of steps{', ' + how if how else ''}"


@functools.cache
def code_version(leave_out: tuple[str, ...] = ()) -> str:
    """A hash of the package's source files and of the numerical libraries' versions: what a kept
    run was computed by (a new torch or jax moves float32 results, and so invalidates it too).
    `leave_out`: source files not counted, as paths in the package ("figures/paper.py")."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(timing.package_versions(("numpy", "scipy", "torch", "jax", "jaxlib")).encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        name = path.relative_to(Path(__file__).parent).as_posix()
        if name not in leave_out:
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()


CHECKPOINT_HASH = 20  # hex digits of a kept piece's name (`checkpoint_path`, `clear_checkpoints`)


def checkpoint_path(folder, *determining):
    """Where a finished piece of a job is kept (a run of `run_many`, an optimizer's grid): a file
    named by a hash of what determines it (task, optimizer, framework, device, hyperparameters,
    seed, protocol, machine, code), so that a change never reuses one."""
    import hashlib
    import json
    from pathlib import Path

    key = json.dumps(determining, sort_keys=True, default=str)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:CHECKPOINT_HASH]}.parquet"


def checkpoint_pieces(folder) -> list:
    """The files of `folder` that `checkpoint_path` names (a grid keeps a .json beside each) and the
    temporaries of their writing: never anything else, should a user name a folder of their own."""
    import re
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        return []
    piece = re.compile(rf"\.?[0-9a-f]{{{CHECKPOINT_HASH}}}\.(parquet|json)(\..+\.part)?")
    return sorted(path for path in folder.iterdir() if path.is_file() and piece.fullmatch(path.name))


def clear_checkpoints(folder) -> None:
    """Remove the `checkpoint_pieces` of `folder`, then the folder if that empties it."""
    from pathlib import Path

    folder = Path(folder)
    for path in checkpoint_pieces(folder):
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is in it
