"""The `natgrad` command line (DESIGN 7): the interface scripts, pipeline rules and users share.

    natgrad tasks
    natgrad run  --task T --optimizer O --framework F [--device cpu|cuda] [--dtype ..] [--lr ..]
                 [--damping ..] [--hyperparameters FILE.json] [--steps ..] [--batch-size ..] [--seed ..]
                 [--logit-clip paper|none] --out FILE
    natgrad grid --task T --optimizers sgd,ngd,ef,... [--framework F] [--lrs=START:STOP:NUM]
                 [--dampings=START:STOP:NUM] [--steps ..] [--logit-clip paper|none] [--checkpoints FOLDER]
                 --out FILE
    (and more options: `natgrad run --help`, `natgrad grid --help`)

FILE ends in .csv or .parquet and is written atomically. Bad input (an unknown name, a negative lr,
numpy on a network task, cuda without a GPU, ...) exits with status 2 and one line on stderr naming
the field and the allowed values, before any work is done and without writing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from natgrad_impls import results
from natgrad_impls.hyperparameters import ARGUMENTS, HYPERPARAMETERS, PAPER_DAMPINGS, PAPER_LRS, bounds_text
from natgrad_impls.names import Optimizer
from natgrad_impls.runner import DEFAULT_EVAL_EVERY, accepted
from natgrad_impls.tasks import MISSPEC_VARIANTS

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 1
EXIT_NOT_WRITTEN = 1


def number(text: str) -> float:
    """A float from the command line or a JSON file, refusing one that float64 rounds to 0 (1e-400):
    a damping or lr that small is a typo, and as 0 it would run another method without a word."""
    value = float(text)
    if value == 0 and any(digit in "123456789" for digit in text.lower().partition("e")[0]):
        raise argparse.ArgumentTypeError(f"{text} is below float64's smallest number and would be read as 0")
    return value


# Optimizer hyperparameters beyond lr and damping, as (option, name, type).
EXTRA_HYPERPARAMETERS = (
    ("--momentum", "momentum", number),
    ("--b1", "b1", number),
    ("--b2", "b2", number),
    ("--eps", "eps", number),
    ("--fisher", "fisher", str),
    ("--samples", "samples", int),
    ("--kfac-update-period", "kfac_update_period", int),
    ("--kfac-ema", "kfac_ema", number),
)


GRID_BOUNDS = {"lrs": PAPER_LRS, "dampings": PAPER_DAMPINGS}  # `natgrad grid`'s log10 START:STOP:NUM options


class BadInput(Exception):
    """Raised instead of argparse's multi-line usage errors: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviations: grid's --damping would otherwise be read as --dampings, run's --step as --steps
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        for option in GRID_BOUNDS:  # argparse reads a value that starts with '-' as an option
            if message.startswith(f"argument --{option}: expected one argument"):
                message += f" (write --{option}=START:STOP:NUM: after a space, a '-' is read as an option)"
        raise BadInput(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="natgrad", description="Natural-gradient benchmarks: tasks, single runs and Kunstner grids.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("tasks", help="list the tasks: task, N, inputs, classes, params, offline or download, source")

    run = commands.add_parser("run", help="one training run, recorded step by step")
    run.add_argument("--task", required=True, help="a task of `natgrad tasks`")
    run.add_argument("--variant", help=f"misspec only: which of its data sets ({', '.join(MISSPEC_VARIANTS)})")
    _logit_clip(run)
    *others, last = (o.value for o in Optimizer)
    run.add_argument("--optimizer", required=True, help=f"{', '.join(others)} or {last}")
    run.add_argument("--framework", required=True, help="numpy (convex tasks only), torch or jax")
    _common(run, "the initial parameters (glorot; the convex tasks start at 0), the mini-batch order, the MC labels")
    run.add_argument("--lr", type=number, help=_hyperparameter_help("lr"))
    run.add_argument("--damping", type=number, help=_hyperparameter_help("damping"))
    for option, name, kind in EXTRA_HYPERPARAMETERS:
        run.add_argument(option, dest=name, type=kind, help=_hyperparameter_help(name))
    run.add_argument("--hyperparameters", metavar="FILE.json",
                     help="hyperparameters from a JSON object (e.g. a pipeline's best setting); options given here win")
    run.add_argument("--steps", type=int, help="default: the task's")
    run.add_argument("--batch-size", type=int, help="default: the task's (full batch on the convex tasks)")
    run.add_argument("--eval-every", type=int,
                     help=f"steps between full-train/test evaluations on networks (default {DEFAULT_EVAL_EVERY})")
    run.add_argument("--cos-ef-ngd", action="store_true",
                     help="record at every step the EF/NGD cosine (run's damping) and the NGD step's with the gradient")
    run.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")

    grid = commands.add_parser("grid", help="a Kunstner lr x damping grid on a full-batch convex task, vectorised")
    grid.add_argument("--task", required=True, help="a full-batch convex task of `natgrad tasks`")
    grid.add_argument("--variant", help=f"misspec only: which of its data sets ({', '.join(MISSPEC_VARIANTS)})")
    _logit_clip(grid)
    grid.add_argument("--optimizers", default="sgd,ngd,ef", help="comma-separated (default: sgd,ngd,ef)")
    grid.add_argument("--framework", default="numpy", help="numpy (default), torch or jax")
    _common(grid, "the MC labels, the chaos check's noise")
    for field, bounds in GRID_BOUNDS.items():  # the paper's grid; '=' keeps a negative START from reading as an option
        text = bounds_text(bounds)
        grid.add_argument(f"--{field}", default=text,
                          help=f"log10 START:STOP:NUM (default {text}); write --{field}={text}")
    for option, name, kind in EXTRA_HYPERPARAMETERS:
        grid.add_argument(option, dest=name, type=kind, help=_hyperparameter_help(name))
    grid.add_argument("--steps", type=int, help="default: the task's (100)")
    grid.add_argument("--repeats", type=int, default=5, help="runs from theta0 + 1e-14 noise that check each best run "
                      "for chaos (default 5; 0 skips the check)")
    grid.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    grid.add_argument("--checkpoints", metavar="FOLDER", help="keep each optimizer's finished grid in FOLDER, so that "
                      "the same command stopped part way resumes at its next optimizer; they (and FOLDER, if that "
                      "empties it) are removed once --out is written")
    commands.metavar = "{" + ",".join(commands.choices) + "}"  # named in the error when none is given
    return parser


def _hyperparameter_help(name: str) -> str:
    """The hyperparameter's description, then which optimizers take it with their defaults, e.g.
    "step size, >= 0 [sgd, ef, ngd, kfac: required; adam: 0.001]", from the validated dataclasses."""
    takers: dict[str, list[str]] = {}
    for optimizer in Optimizer:
        if name in accepted(optimizer):
            field = next(f for f in dataclasses.fields(HYPERPARAMETERS[optimizer]) if f.name == name)
            default = "required" if field.default is dataclasses.MISSING else getattr(field.default, "value", field.default)
            takers.setdefault(str(default), []).append(optimizer.value)
    groups = "; ".join(", ".join(names) + f": {default}" for default, names in takers.items())
    return f"{ARGUMENTS[name]} [{groups}]"


def _logit_clip(parser):
    parser.add_argument("--logit-clip", help="Bernoulli tasks: paper (logits clipped as Kunstner et al.'s code does, "
                        "the default of the Kunstner tasks) or none (the exact likelihood)")


def _common(parser, seeds: str):
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float64", help="float64 (default) or float32")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"seeds {seeds} and the toy tasks' generated data (vecfield, misspec) (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def _hyperparameters(args, names=("lr", "damping")) -> dict:
    values = {name: getattr(args, name) for name in names}
    values.update({name: getattr(args, name) for _, name, _ in EXTRA_HYPERPARAMETERS})
    return {k: v for k, v in values.items() if v is not None}


def cmd_tasks(args) -> int:
    from natgrad_impls.tasks import TASKS

    rows = [("task", "N", "inputs", "classes", "params", "offline", "source")]
    for name, task in TASKS.items():
        model = task.problem.model
        rows.append((name, str(task.n_train), str(math.prod(model.input_shape)), str(task.classes or "-"),
                     str(model.num_params()), "yes" if task.offline else "download", task.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1])
    print("\nN: training examples. inputs: numbers per example the model sees, the linear tasks' column of "
          "ones included (wine: 13 features and 1).")
    return 0


def _hyperparameters_file(path) -> dict:
    """The JSON object of `--hyperparameters`, or BadInput naming the field."""
    import json

    names = ("lr", "damping", *(name for _, name, _ in EXTRA_HYPERPARAMETERS))
    try:
        with open(path) as handle:
            values = json.load(handle, parse_float=number)
    except (OSError, ValueError, argparse.ArgumentTypeError) as error:
        raise BadInput(f"hyperparameters: cannot read {path!r} as JSON ({error})") from None
    if not isinstance(values, dict):
        raise BadInput(f"hyperparameters: {path!r} must hold a JSON object of {', '.join(names)}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise BadInput(f"hyperparameters: {unknown[0]!r} in {path!r} is not one of {', '.join(names)}")
    return values


def cmd_run(args) -> int:
    from natgrad_impls import runner

    hps = {**(_hyperparameters_file(args.hyperparameters) if args.hyperparameters else {}), **_hyperparameters(args)}
    for name, value in (("steps", args.steps), ("batch_size", args.batch_size), ("eval_every", args.eval_every)):
        if value is not None and value < (0 if name == "steps" else 1):
            raise BadInput(f"{name}: {value!r} must be an integer >= {0 if name == 'steps' else 1}")
    _checked(lambda: results.check_path(args.out))
    spec = _checked(lambda: runner.resolve(args.task, args.optimizer, args.framework, args.device, args.dtype, hps,
                                           args.seed, args.variant, args.logit_clip))
    _checked(lambda: runner.check_batch_size(spec.task, args.batch_size))
    if args.cos_ef_ngd and "damping" not in spec.kwargs():
        raise BadInput(f"cos_ef_ngd: needs the run's damping; {spec.optimizer.value} has none (use ef, ngd or kfac)")
    cos_damping = spec.kwargs()["damping"] if args.cos_ef_ngd else None  # (the cosine's: the run's)
    _checked(lambda: runner.check_float32_wide_batches(spec, args.batch_size, cos_damping, cos_field="damping"))
    out = _checked(lambda: results.check_writable(args.out))  # last: it makes the folder
    frame = _unavailable(lambda: runner.run(
        spec.task, spec.optimizer, spec.framework, spec.device, spec.dtype, hps, args.steps, args.batch_size, args.seed,
        eval_every=args.eval_every, cos_ef_ngd=args.cos_ef_ngd, progress=False if args.no_progress else None))
    _write(frame, out)
    last = frame.iloc[-1]
    state = "diverged" if last["diverged"] else "final"
    print(f"{spec.task.name} {spec.optimizer.value} {spec.framework.value}: {state} {_objective(frame)}, "
          f"{last['time_s']:.3g} s of steps; wrote {len(frame)} rows to {out}")
    return 0


def _objective(frame) -> str:
    """The last full-train loss where the run evaluated one (a mini-batch run: its `loss` is one
    batch's), else the last `loss` (a full-batch run's objective), and its step."""
    evaluated = frame.dropna(subset=["train_loss"]) if "train_loss" in frame.columns else frame.iloc[:0]
    name = "train_loss" if len(evaluated) else "loss"
    row = (evaluated if len(evaluated) else frame).iloc[-1]
    return f"{name} {row[name]:.6g} at step {int(row['step'])}"


def cmd_grid(args) -> int:
    from natgrad_impls import grid, runner

    hps = _hyperparameters(args, names=())
    _checked(lambda: results.check_path(args.out))
    checked = _checked(lambda: grid.validate(args.task, args.optimizers, args.framework, args.device, args.dtype,
                                             args.lrs, args.dampings, args.steps, args.repeats, args.variant, hps,
                                             args.logit_clip, args.seed))
    if args.checkpoints:
        _checked(lambda: results.check_folder(args.checkpoints, "checkpoints"))
    out = _checked(lambda: results.check_writable(args.out))  # last: it makes the folder
    task, optimizers, framework, device, dtype, lrs, dampings, steps = checked
    result = _unavailable(lambda: grid.run_grid(task, optimizers, framework, device, dtype, lrs, dampings, steps, args.seed,
                                                args.repeats, None, hps, progress=False if args.no_progress else None,
                                                on_done=_print_best, checkpoints=args.checkpoints))
    _write(result.frame, out)
    if args.checkpoints:
        runner.clear_checkpoints(args.checkpoints)
    resumed = f", {', '.join(o.value for o in result.resumed)} kept from an interrupted run" if result.resumed else ""
    print(f"{task.name}: {result.runs} runs x {steps} steps in {result.seconds:.3g} s ({framework.value}{resumed}); "
          f"wrote {len(result.frame)} rows to {out}")
    return 0


def _print_best(optimizer, best, seconds) -> None:
    """One optimizer's best as soon as it is known, flushed: a pipeline job's log is a file."""
    line = best.describe() if best else f"{optimizer.value:5s} no run stayed finite"
    print(f"{line}  [{seconds:.3g} s]", flush=True)


def _write(frame, out) -> None:
    """The result, or one line saying why it could not be written (checked before the run, but a
    disk can fill or a folder vanish while it runs). The temporaries that earlier runs killed while
    writing this same file left beside it are removed once they are stale."""
    try:
        results.write(frame, out)
    except OSError as error:
        raise SystemExit(_fail(f"out: cannot write {str(out)!r} ({error.strerror or error})", EXIT_NOT_WRITTEN)) from None
    results.remove_stale_temporaries(out.parent, results.STALE_WRITE_AGE_S, name=out.name)


def _checked(call):
    try:
        return call()
    except ValueError as error:
        raise BadInput(str(error)) from None


def _unavailable(call):
    from natgrad_impls.data import DataUnavailable

    try:
        return call()
    except DataUnavailable as error:
        raise SystemExit(_fail(str(error), EXIT_UNAVAILABLE)) from None


def _fail(message: str, status: int) -> int:
    print(f"natgrad: {' '.join(str(message).split())}", file=sys.stderr)
    return status


COMMANDS = {"tasks": cmd_tasks, "run": cmd_run, "grid": cmd_grid}


def _exit_on_sigterm(signum, frame):
    raise results.Stopped(128 + signum)  # unwinds, so a result being written removes its temporary file


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `kill`, or a pipeline stopping its jobs
    args = None
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BadInput as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except (KeyboardInterrupt, results.Stopped) as stop:  # one line, not a traceback: the status says how it ended
        status = getattr(stop, "code", 128 + signal.SIGINT)  # results.Stopped: SIGTERM's; else Ctrl-C's
        return _fail(f"stopped; {_kept(getattr(args, 'checkpoints', None))}", status)


def _kept(checkpoints) -> str:
    """What a stopped command leaves to resume from: the optimizers a grid finished, if any."""
    from natgrad_impls import runner

    finished = [p for p in runner.checkpoint_pieces(checkpoints) if p.suffix == ".parquet"] if checkpoints else []
    if not finished:
        return "nothing was written"
    n = len(finished)
    return f"{n} finished optimizer{'s' * (n != 1)} kept in {checkpoints}, where the same command resumes"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
