"""The asv suite runs: every benchmark once, in quick mode, against the installed package, so that a
broken benchmark fails `make test`.

`asv run --quick --python=same --dry-run` runs each benchmark function once per parameter set in
this interpreter's environment and saves nothing; NATGRAD_ASV_QUICK=1 shrinks the parameters (one
tiny MLP, a few training steps). The numbers mean nothing here; only that every benchmark ran.
Also checked: the cost functions the suite and the pipeline share, on a tiny problem.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from natgrad_impls import make_optimizer, results, timing
from conftest import JaxImpl, TorchImpl

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# Benchmark functions of the suite; a new one is added here, so that one silently dropped (an import
# error in its module, a renamed method) fails the test rather than going unnoticed.
EXPECTED = {
    "bench_step.Step.time_step", "bench_step.Step.peakmem_step", "bench_step.PeerStep.time_step",
    "bench_step.PeerStep.peakmem_step", "bench_step.DeviceMemory.track_peak_device_memory",
    "bench_step.OverPeer.track_over_peer",
    "bench_step.Cost.track_gradient_equivalents", "bench_training.Training.track_loss",
    "bench_scaling.Scaling.track_gradient_equivalents", "bench_step.TorchOps.track_ops_over_gradient",
}


def _asv(args, env, timeout):
    return subprocess.run([sys.executable, "-m", "asv", *args], cwd=BENCHMARKS, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_asv_quick_run(tmp_path):
    env = dict(
        os.environ,
        HOME=str(tmp_path),  # asv keeps its machine description in ~/.asv-machine.json
        NATGRAD_ASV_QUICK="1",
        COLUMNS="200",  # asv shortens benchmark names to the terminal's width
        # One thread per process: on a loaded 2-core machine torch's thread pool can stall each op
        # for a scheduler tick; the numbers are thrown away anyway.
        OMP_NUM_THREADS="1",
        # The benchmarks of one setting compile the same jitted programs: compile each once.
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    # asv.conf.json with asv's results and html under tmp_path: a test writes nothing into the checkout
    config = json.loads(re.sub(r"^\s*//.*$", "", (BENCHMARKS / "asv.conf.json").read_text(), flags=re.M))
    config.update(repo=str(BENCHMARKS.parent), benchmark_dir=str(BENCHMARKS / "benchmarks"),
                  results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"), env_dir=str(tmp_path / "env"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(config))
    options = ["--config", str(tmp_path / "asv.conf.json"), "--machine", "natgrad-ci"]
    machine = _asv(["machine", "--yes", *options], env, 60)
    assert machine.returncode == 0, machine.stdout + machine.stderr
    run = _asv(["run", "--quick", "--python=same", "--dry-run", "--show-stderr", *options], env, 600)
    output = run.stdout + run.stderr
    # asv exits 2 when any benchmark failed; a failed one is reported as "failed" with its traceback.
    assert run.returncode == 0, output[-8000:]
    assert not re.search(r"\bfailed\b", output), output[-8000:]
    # "[ 50%] ··· bench_training.Training.track_loss    ok", long names shortened to "...name"
    ran = {name for shown in re.findall(r"··· (\S+)\s+ok$", output, flags=re.M)
           for name in EXPECTED if name == shown or (shown.startswith("...") and name.endswith(shown[3:]))}
    assert ran == EXPECTED, (sorted(EXPECTED - ran), output[-4000:])


def test_asv_devices_come_from_the_environment():
    """A GPU machine runs the cuda parameters alone (scripts/gpu_session.sh); a bad name says so.
    One process (the suite imports torch and jax): a failed import leaves no module behind, so the
    second import runs the module again, with a good value."""
    code = """if True:
        import os
        try:
            import benchmarks.common
        except ValueError as error:
            print(error)
        os.environ["NATGRAD_ASV_DEVICES"] = "cuda"
        import benchmarks.common
        print(benchmarks.common.DEVICES)
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, NATGRAD_ASV_DEVICES="gpu"))
    assert done.stdout.splitlines() == ["NATGRAD_ASV_DEVICES: 'gpu' is not a comma list of cpu, cuda", "['cuda']"], \
        done.stderr


def _common(monkeypatch, quick=None, devices=None):
    """benchmarks/benchmarks/common.py run afresh as a module of its own, with NATGRAD_ASV_QUICK and
    NATGRAD_ASV_DEVICES set to `quick` and `devices` (None: unset); the suite's modules keep theirs."""
    for name, value in (("NATGRAD_ASV_QUICK", quick), ("NATGRAD_ASV_DEVICES", devices)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("asv_common", BENCHMARKS / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_every_optimizer_has_a_timed_setting():
    """The cost tables, the asv suite and the summary's cost column time the labels of
    timing.SETTINGS: an optimizer without one would have no cost anywhere, without a word."""
    from natgrad_impls.names import Optimizer

    assert {Optimizer(optimizer) for optimizer, _ in timing.SETTINGS.values()} == set(Optimizer)


@pytest.mark.parametrize("quick", [None, "0"])
def test_a_full_asv_run_times_what_the_pipeline_and_the_readme_say(monkeypatch, quick):
    """Without NATGRAD_ASV_QUICK (or with 0) the suite times the pipeline's settings (config.yaml's
    timing: dtype, medians of `repeats`, the scaling sweep's settings and batch sizes, its widths and
    1024) on cpu and cuda, at the README's sizes: `small` timing.mlp_problem's default MLP and batch,
    `large` width 512 at batch 256. NATGRAD_ASV_QUICK=1 shrinks them; an empty device list is refused."""
    import inspect

    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["timing"]
    defaults = inspect.signature(timing.mlp_problem).parameters
    common = _common(monkeypatch, quick)
    assert common.SIZES == {"small": (defaults["width"].default, defaults["batch_size"].default), "large": (512, 256)}
    assert (common.DTYPE, common.REPEATS, common.SETTINGS) == (config["dtype"], config["repeats"], config["settings"])
    assert common.FRAMEWORKS == config["frameworks"] and common.DEVICES == ["cpu", "cuda"]
    assert common.SWEEP_SETTINGS == config["scaling"]["settings"] == list(timing.SCALING_SETTINGS)
    assert common.SWEEP_WIDTHS == config["scaling"]["widths"] + [1024]
    assert common.SWEEP_BATCH_SIZES == config["scaling"]["batch_sizes"]
    assert _common(monkeypatch, "1").SIZES == {"tiny": (32, 32)}
    monkeypatch.delenv("NATGRAD_ASV_ROUNDS", raising=False)
    assert (_common(monkeypatch, quick).ROUNDS, _common(monkeypatch, "1").ROUNDS) == (3, 1)
    monkeypatch.setenv("NATGRAD_ASV_ROUNDS", "1")  # scripts/gpu_session.sh's
    assert _common(monkeypatch, quick).ROUNDS == 1
    monkeypatch.setenv("NATGRAD_ASV_ROUNDS", "0")
    with pytest.raises(ValueError, match="NATGRAD_ASV_ROUNDS: '0' is not a whole number of at least 1"):
        _common(monkeypatch, quick)
    monkeypatch.delenv("NATGRAD_ASV_ROUNDS")
    with pytest.raises(ValueError, match="NATGRAD_ASV_DEVICES: '' is not a comma list"):
        _common(monkeypatch, devices="")


def _benchmark_classes(monkeypatch):
    """The suite's benchmark classes: those of its modules with asv parameters."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_scaling, bench_step, bench_training

    classes = [c for module in (bench_step, bench_scaling, bench_training) for c in vars(module).values()
               if isinstance(c, type) and c.__module__ == module.__name__ and hasattr(c, "params")]
    assert len(classes) == len({name.split(".")[1] for name in EXPECTED})
    return classes


def test_every_benchmark_names_its_parameters_in_their_order(monkeypatch):
    """asv labels a result by param_names, zipped with params: they must be the arguments that setup
    and the benchmark take, in that order (a swapped pair shows a width as a batch size), and the
    scaling sweep's lists must sit under the names width and batch_size."""
    import inspect

    classes = _benchmark_classes(monkeypatch)
    from benchmarks import bench_scaling

    for c in classes:
        assert len(c.params) == len(c.param_names), c.__name__
        for name, method in vars(c).items():
            if name == "setup" or name.startswith(("time_", "track_", "peakmem_")):
                arguments = list(inspect.signature(method).parameters)[1:]
                assert arguments in (c.param_names, ["params"]), (c.__name__, name)
    labelled = dict(zip(bench_scaling.Scaling.param_names, bench_scaling.Scaling.params))
    assert (labelled["width"], labelled["batch_size"]) == (bench_scaling.SWEEP_WIDTHS, bench_scaling.SWEEP_BATCH_SIZES)


def test_every_benchmark_skips_a_gpu_its_framework_does_not_see(monkeypatch):
    """A cuda parameter where the framework sees no GPU is skipped in setup (SkipNotImplemented: asv
    shows n/a), before anything is built or timed, rather than failing or timing something else."""
    from asv_runner.benchmarks.mark import SkipNotImplemented

    classes = _benchmark_classes(monkeypatch)
    monkeypatch.setattr(timing, "device_available", lambda framework, device: str(device) == "cpu")
    for c in classes:
        if not hasattr(c, "setup"):
            continue
        args = [values[0] for values in c.params]
        if "device" in c.param_names:
            args[c.param_names.index("device")] = "cuda"
        with pytest.raises(SkipNotImplemented):
            c().setup(*args)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_every_tracked_training_run_learns(monkeypatch, framework):
    """Training.track_loss can only tell a wrong step from a right one where the run learns: every
    setting lowers the loss of both runs (float64 tanh, float32 relu) within their steps."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_training

    for run in bench_training.RUNS:
        start = bench_training.train("sgd", framework, "cpu", run, steps=0)
        for label in timing.SETTINGS:
            assert bench_training.train(label, framework, "cpu", run, steps=50) < 0.85 * start, (run, label)


def test_the_tracked_training_loss_does_not_depend_on_torchs_threads(monkeypatch):
    """Run on one thread and on two, the float32 run that split its sums differently (mnist1d-mlp,
    ngd-exact: 0.76% apart over 50 steps) ends at the same loss, and the caller's thread count is kept."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    from benchmarks import bench_training

    threads = torch.get_num_threads()
    losses = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            losses.append(bench_training.train("ngd-exact", "torch", "cpu", "mnist1d-mlp-float32", steps=50))
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(threads)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_tracked_training_loss_is_the_whole_training_sets(monkeypatch, framework, steps):
    """Training.track_loss is the mean NLL over the whole training set at the run's last parameters
    (the initial ones after no step), not the loss of the last mini-batch: computed here apart, by
    tests/dense_reference.py, to 1e-12 in float64. A few steps stand in for STEPS."""
    import functools
    from types import SimpleNamespace

    import dense_reference as ref
    from natgrad_impls import models
    from natgrad_impls.tasks import get_task

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_training

    run = "digits-mlp-float64"
    name, dtype = bench_training.RUNS[run]
    assert dtype == "float64"
    task = get_task(name)
    last = [models.init_params(task.problem.model, bench_training.SEED)]
    make = bench_training.make_optimizer

    def recording(*args, **kwargs):
        opt = make(*args, **kwargs)

        def step(params, state, batch):
            out = opt.step(params, state, batch)
            last[0] = {k: np.asarray(v.detach().cpu() if framework == "torch" else v) for k, v in out[0].items()}
            return out

        return SimpleNamespace(init=opt.init, step=step)

    monkeypatch.setattr(bench_training, "make_optimizer", recording)
    monkeypatch.setattr(bench_training, "train", functools.partial(bench_training.train, steps=steps))
    tracked = bench_training.Training().track_loss("sgd", framework, "cpu", run)
    (X, y), _ = task.load(bench_training.SEED)
    assert tracked == pytest.approx(ref.loss(task.problem, last[0], X, y), rel=1e-12, abs=0)


def _training_steps(monkeypatch, bench_training):
    """bench_training's optimizers, stand-ins that take no step: they record (the parameters' dtype,
    the batch's inputs) of each step and hand the parameters back."""
    from types import SimpleNamespace

    seen = []

    def make(framework, optimizer, problem, **hyperparameters):
        def step(params, state, batch):
            seen.append((str(next(iter(params.values())).dtype).removeprefix("torch."), np.asarray(batch[0])))
            return params, state, None

        return SimpleNamespace(init=lambda params: None, step=step)

    monkeypatch.setattr(bench_training, "make_optimizer", make)
    return seen


def test_each_tracked_training_run_trains_its_own_task_in_its_own_dtype(monkeypatch):
    """Training.track_loss(run=...) trains that run's task (digits-mlp: 64 inputs, mnist1d-mlp: 40)
    in the dtype its name ends with: the float32 run is the timed benchmarks' path, not float64."""
    import functools

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_training

    seen = _training_steps(monkeypatch, bench_training)
    monkeypatch.setattr(bench_training, "train", functools.partial(bench_training.train, steps=1))
    for run, inputs in (("digits-mlp-float64", 64), ("mnist1d-mlp-float32", 40)):
        seen.clear()
        bench_training.Training().track_loss("sgd", "torch", "cpu", run)
        [(dtype, x)] = seen
        assert (dtype, x.dtype.name, x.shape[1]) == (run.rsplit("-", 1)[1],) * 2 + (inputs,), run


def test_the_tracked_training_run_cycles_one_fixed_order_of_its_batches(monkeypatch):
    """STEPS mini-batches of 32 in a fixed order, one permutation cycled: the batches of a pass are
    disjoint and each of 32 examples, the pass over the training set's whole batches starts again
    with the same first batch, and a second run sees the same batches."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_training
    from natgrad_impls.tasks import get_task

    (X, _), _ = get_task("digits-mlp").load(bench_training.SEED)
    passes = len(X) // 32  # whole batches in the training set
    seen = _training_steps(monkeypatch, bench_training)
    bench_training.train("sgd", "torch", steps=passes + 1)
    batches = [x for _, x in seen]
    assert [len(x) for x in batches] == [32] * (passes + 1)
    assert len({row.tobytes() for x in batches[:passes] for row in x}) == passes * 32  # no example twice
    np.testing.assert_array_equal(batches[passes], batches[0])
    seen.clear()
    bench_training.train("sgd", "torch", steps=passes + 1)
    assert all(np.array_equal(x, again) for x, (_, again) in zip(batches, seen))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_tracked_training_run_is_placed_on_its_device(monkeypatch, device):
    """A Training run's parameters and batches go to its device parameter: jax's device of that kind,
    torch's by name, not the framework's default (a GPU, where there is one). Without a GPU: a
    stand-in jax.devices lists a gpu apart from the cpu, and the placements record where they were
    asked to put each array, and put it on the CPU."""
    import jax
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_training

    _training_steps(monkeypatch, bench_training)
    cpu, placed = jax.devices("cpu")[0], {"jax": set(), "torch": set()}
    device_put, as_tensor = jax.device_put, torch.as_tensor
    monkeypatch.setattr(jax, "devices", lambda backend=None: [cpu] if backend == "cpu" else ["a gpu"])
    monkeypatch.setattr(jax, "device_put", lambda x, device=None: placed["jax"].add(device) or device_put(x, cpu))
    monkeypatch.setattr(torch, "as_tensor", lambda x, dtype=None, device=None: placed["torch"].add(device)
                        or as_tensor(x, dtype=dtype))
    for framework in placed:
        bench_training.train("sgd", framework, device, steps=1)
    assert placed == {"jax": {cpu if device == "cpu" else "a gpu"}, "torch": {device}}


def _stub(name, returns, calls):
    """A stand-in for a timing function: records its arguments and returns a fixed value."""
    return lambda *args, **kwargs: calls.append((name, args, kwargs)) or returns


def test_scaling_and_cost_track_the_gradient_equivalents_of_a_step(monkeypatch):
    """Scaling and Cost report a step in gradient-equivalents (their docstrings, unit "gradients"),
    not its time nor the gradient's: with a stand-in timing of step 3 s, gradient 1.5 s and ratio 2,
    both return 2.0."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_scaling, bench_step

    calls = []
    cost = {"step_s": 3.0, "gradient_s": 1.5, "gradient_equivalents": 2.0}
    monkeypatch.setattr(timing, "gradient_equivalents", _stub("gradient_equivalents", cost, calls))
    monkeypatch.setattr(timing, "device_available", lambda *args: True)
    assert bench_scaling.Scaling().track_gradient_equivalents("kfac", "torch", "cpu", 8, 4) == 2.0
    assert bench_step.Cost().track_gradient_equivalents("kfac", "jax", "cpu", next(iter(bench_step.SIZES))) == 2.0
    assert [(call[0], call[1][:2]) for call in calls] == [("gradient_equivalents", ("torch", "kfac"))] + [
        ("gradient_equivalents", ("jax", "kfac"))] * bench_step.ROUNDS  # Cost: the median of ROUNDS


def test_cost_and_over_peer_report_the_median_of_their_rounds(monkeypatch):
    """One of three measurements taken while another process held a core (a step 10x slow) does not
    move what Cost and OverPeer report: the median of their ROUNDS measurements."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step

    monkeypatch.setattr(bench_step, "ROUNDS", 3)
    ratios = iter([20.0, 2.2, 2.0])  # the median neither first nor last
    monkeypatch.setattr(timing, "gradient_equivalents", lambda *args, **kwargs: {"gradient_equivalents": next(ratios)})
    monkeypatch.setattr(timing, "device_available", lambda *args: True)
    assert bench_step.Cost().track_gradient_equivalents("kfac", "jax", "cpu", next(iter(bench_step.SIZES))) == 2.2
    assert next(ratios, None) is None  # all three taken
    times = iter([[30.0, 1.5], [2.2, 1.0], [3.0, 1.5]])
    monkeypatch.setattr(timing, "alternating_medians", lambda timed, repeats: next(times))
    bench = bench_step.OverPeer()
    bench.ours, bench.peer = ("our call", "our sync", 10), ("peer call", "peer sync", 10)
    assert bench.track_over_peer(next(iter(timing.PEERS)), "cpu", next(iter(bench_step.SIZES))) == 2.2
    assert next(times, None) is None


def test_scaling_times_its_own_grid_point_on_its_device(monkeypatch):
    """Scaling's point (width 8, batch size 4 here) is timed on the MLP of that width, a batch of that
    many examples, on its device, in float32 (README), and reported in gradients, as Cost is.
    Stand-in gradient_equivalents: records what it is asked to time."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_scaling, bench_step

    timed = []

    def cost(framework, optimizer, problem, params, batch, device, dtype, repeats, **hyperparameters):
        timed.append((problem.model.num_params(), len(batch[0]), str(device), str(dtype)))
        return {"step_s": 2.0, "gradient_s": 1.0, "gradient_equivalents": 2.0}

    monkeypatch.setattr(timing, "gradient_equivalents", cost)
    monkeypatch.setattr(timing, "device_available", lambda *args: True)
    assert bench_scaling.Scaling().track_gradient_equivalents("kfac", "torch", "cuda", 8, 4) == 2.0
    assert timed == [(784 * 8 + 8 + 8 * 10 + 10, 4, "cuda", "float32")]
    assert bench_scaling.Scaling.unit == bench_step.Cost.unit == "gradients"


def test_over_peer_tracks_our_step_time_over_the_peers(monkeypatch):
    """OverPeer is our step's median time over the peer's (unit "ours / peer"): with stand-in medians
    of 3 s for ours and 1.5 s for the peer's, 2.0; not either time, nor the peer's over ours."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step

    calls = []
    monkeypatch.setattr(timing, "alternating_medians", _stub("alternating_medians", [3.0, 1.5], calls))
    bench = bench_step.OverPeer()  # its setup builds both steps; stand-ins here
    bench.ours, bench.peer = ("our call", "our sync", 10), ("peer call", "peer sync", 10)
    assert bench.track_over_peer(next(iter(timing.PEERS)), "cpu", next(iter(bench_step.SIZES))) == 2.0
    assert len(calls) == bench_step.ROUNDS
    assert all([t.call for t in timed] == ["our call", "peer call"] for _, (timed, _), _ in calls)


@pytest.mark.parametrize("peer", timing.PEERS)
def test_over_peer_builds_both_steps_alike(monkeypatch, peer):
    """OverPeer's ratio is fair only if both steps run on one model, batch, device and dtype with the
    same hyperparameters, ours in the peer's framework: checked on the arguments each builder gets."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step

    calls = []
    monkeypatch.setattr(timing, "step_call", _stub("ours", ("our call", None, 1), calls))
    monkeypatch.setattr(timing, "peer_step_call", _stub("peer", ("peer call", None, 1), calls))
    monkeypatch.setattr(timing, "device_available", lambda *args: True)
    size = next(iter(bench_step.SIZES))
    bench_step.OverPeer().setup(peer, "cpu", size)
    assert len(calls) == 2
    built = {who: (args, hyperparameters) for who, args, hyperparameters in calls}
    (framework, name, *ours), our_hyperparameters = built["ours"]
    (peer_name, *theirs), peer_hyperparameters = built["peer"]
    label = timing.PEER_OF[peer]
    assert (framework, name, peer_name) == (timing.peer_framework(peer).value, timing.SETTINGS[label][0], peer)
    assert our_hyperparameters == peer_hyperparameters == timing.SETTINGS[label][1]
    problem, params, batch = timing.mlp_problem(*bench_step.SIZES[size])
    for args in (ours, theirs):
        assert args[0] == problem and args[3:] == ["cpu", bench_step.DTYPE]
        np.testing.assert_array_equal(np.concatenate([np.ravel(p) for p in args[1]]),
                                      np.concatenate([np.ravel(p) for p in params]))
        for built_array, array in zip(args[2], batch):
            np.testing.assert_array_equal(built_array, array)


def test_torch_ops_and_device_memory_track_what_they_say(monkeypatch):
    """TorchOps: a step's operators over the gradient's (30 over 15: 2.0); DeviceMemory: the peak
    in MiB (3 MiB of bytes: 3.0), from stand-in counts."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step

    calls = []
    ops = {"step_ops": 30.0, "gradient_ops": 15.0, "ops_over_gradient": 2.0}
    monkeypatch.setattr(timing, "torch_ops", _stub("torch_ops", ops, calls))
    monkeypatch.setattr(timing, "peak_device_bytes", _stub("peak_device_bytes", 3 * 2**20, calls))
    size = next(iter(bench_step.SIZES))
    assert bench_step.TorchOps().track_ops_over_gradient("ef", size) == 2.0
    assert bench_step.DeviceMemory().track_peak_device_memory("ef", "torch", size) == 3.0


def test_asv_setups_between_timed_calls_continue_one_run(monkeypatch):
    """asv_runner runs `setup` before each of a sample's `number` timed calls (its
    _SetupInterleavedTimer): Step builds and warms up once per parameter set, so a sample is
    `number` consecutive steps of one run, with one K-FAC inversion (two layers x A, G: four
    Choleskys) per period, as the README says, instead of a fresh run's first step each call."""
    from asv_runner.benchmarks.time import _SetupInterleavedTimer

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step
    from natgrad_impls.torch import curvature

    builds, choleskys = [], []
    step_call, cholesky = timing.step_call, curvature._cholesky
    monkeypatch.setattr(timing, "step_call", lambda *a, **k: builds.append(a[1]) or step_call(*a, **k))
    monkeypatch.setattr(curvature, "_cholesky", lambda m: choleskys.append(1) or cholesky(m))
    bench, args = bench_step.Step(), ("kfac", "torch", "cpu", next(iter(bench_step.SIZES)))
    sample = _SetupInterleavedTimer(lambda: bench.time_step(*args), lambda: bench.setup(*args), time.perf_counter)
    bench.setup(*args)  # asv's first setup: the build and its two warm-up periods
    choleskys.clear()
    for _ in range(3):
        sample.timeit(bench_step.PERIOD)
    assert builds == ["kfac"] and len(choleskys) == 3 * 4
    bench.setup("sgd", *args[1:])  # the next parameter set is built anew
    assert builds == ["kfac", "sgd"]


def test_step_setup_warms_up_whole_periods_before_asv_samples(monkeypatch):
    """Step's setup (asv's warmup_time is 0) compiles and warms up as every timing here does: whole
    K-FAC periods, so that asv's samples start on a period's first step, for timing.WARMUP_S at least
    after the first one. Stand-ins: a step of period 10 that moves a clock on by about a millisecond."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchmarks import bench_step, common

    ms, calls = 2.0**-10, []
    clock = SimpleNamespace(perf_counter=lambda: len(calls) * ms)
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(timing, "step_call", lambda *args, **kwargs: (lambda: calls.append(1), lambda out: None, 10))
    monkeypatch.setattr(common, "_BUILT", {})  # nothing built by an earlier test
    bench_step.Step().setup("kfac", "torch", "cpu", next(iter(bench_step.SIZES)))
    assert len(calls) % 10 == 0 and len(calls) >= 10 + timing.WARMUP_S / ms, len(calls)


def test_a_training_loss_that_moves_is_flagged_long_before_a_time_that_does():
    """asv's own threshold rule on our asv.conf.json: 10 % for times and memory, 0.01 % for the
    deterministic float64 loss of bench_training (a wrong step moves it; round-off does not)."""
    import json
    from types import SimpleNamespace

    from asv.plugins.regressions import _GraphDataFilter

    text = (BENCHMARKS / "asv.conf.json").read_text()
    conf = SimpleNamespace(regressions_thresholds=json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
                           ["regressions_thresholds"])
    threshold = lambda name: _GraphDataFilter._get_threshold(SimpleNamespace(conf=conf), SimpleNamespace(params={}),
                                                             None, name)
    assert threshold("bench_training.Training.track_loss") == 1e-4
    assert threshold("bench_step.Step.time_step") == threshold("bench_scaling.Scaling.track_gradient_equivalents") == 0.1


def test_asv_conf_keeps_results_inside_benchmarks():
    import json

    text = (BENCHMARKS / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    assert conf["repo"] == ".."
    for key in ("results_dir", "html_dir", "env_dir"):
        assert not Path(conf[key]).is_absolute() and ".." not in Path(conf[key]).parts, key


def test_scaling_sweep_long_format():
    table = timing.scaling_sweep("jax", "sgd", [8, 16], [4], "cpu", "float32", repeats=2)
    assert list(table.columns) == ["framework", "device", "dtype", "optimizer", "setting", "width", "batch_size",
                                   "num_params", "step_s", "gradient_s", "gradient_equivalents"]
    assert table["width"].tolist() == [8, 16] and (table["batch_size"] == 4).all()
    assert table["num_params"].tolist() == [784 * 8 + 8 + 8 * 10 + 10, 784 * 16 + 16 + 16 * 10 + 10]
    assert np.allclose(table["gradient_equivalents"], table["step_s"] / table["gradient_s"])
    with pytest.raises(ValueError, match="setting"):
        timing.scaling_sweep("jax", "newton", [8], [4])


def test_timing_synchronises_every_call_of_a_block():
    """A K-FAC step is timed in blocks of one period and the gradient in blocks of one: each call is
    synchronised in both, as the runner's steps are, or the step would be charged a tenth of the
    sync latency its unit pays (on a GPU, a large part of a small model's gradient time)."""
    calls, syncs = [], []
    call = lambda: calls.append(len(calls)) or len(calls)
    sync = lambda out: syncs.append(out)
    timing.alternating_medians([timing.Timed(call, sync, block=4)], repeats=3, warmup=1, warmup_s=0, min_sample_s=0)
    assert syncs == list(range(1, 3 * 4 + 2 * 4 + 1))  # warm-up (a first block, then 1) and samples: each its own
    calls.clear()
    syncs.clear()
    assert timing.affordable_repeats(call, sync, repeats=5, block=4) == 5
    assert syncs == list(range(1, 2 * 4 + 1))  # a block that may compile, then a timed one


@pytest.fixture
def clock(monkeypatch):
    """timing's clock replaced by one that stands still until a test moves it on (clock[0] += seconds)."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    return now


def test_alternating_medians_warm_up_then_sample_in_turn(clock):
    """On a clock that each call moves on by its own cost: every call is warmed up for warmup_s (a
    jax step right after its compile runs slow for milliseconds), its samples are whole blocks that
    last min_sample_s, and the calls' samples come in turn, so that a burst of load hits them all."""
    log = []

    def costing(name, seconds):
        def call():
            clock[0] += seconds
            log.append(name)
            return len(log)
        return call

    ms = 2.0**-10  # about a millisecond, and exact in binary: the clock's sums carry no round-off
    synced = []
    step = timing.Timed(costing("step", ms), synced.append, block=2)  # a K-FAC-like period of 2
    grad = timing.Timed(costing("grad", ms / 2), synced.append)
    medians = timing.alternating_medians([step, grad], repeats=3, warmup=2, warmup_s=10 * ms, min_sample_s=4 * ms,
                                         settle_s=0)
    assert medians == [ms, ms / 2]
    assert synced == list(range(1, len(log) + 1))  # every call's own output, each right after it
    # warm-up: a first block, then 10 ms of each (5 blocks of the step, 20 calls of the gradient);
    # then samples of 4 ms in whole blocks (2 of the step's, 8 of the gradient's calls), in turn
    expected = ["step"] * 12 + ["grad"] * 21 + (["step"] * 4 + ["grad"] * 8) * 3
    assert log == expected


def test_a_sample_lasts_at_least_min_sample_s(clock):
    """Calls of 3 ms with samples of at least 4 ms: two calls a sample (6 ms), not one (3 ms); after
    the warm-up's single call, 3 samples of 2 calls."""
    ms, calls = 2.0**-10, []

    def call():
        clock[0] += 3 * ms
        calls.append(1)

    medians = timing.alternating_medians([timing.Timed(call, lambda out: None)], repeats=3, warmup=0, warmup_s=0,
                                         min_sample_s=4 * ms)
    assert medians == [3 * ms] and len(calls) == 1 + 3 * 2


def test_alternating_medians_time_each_call_in_a_row_not_in_the_wake_of_another(clock):
    """A clock on which the two gradients after a long step cost 3 times their 1 ms (as jax's after
    an exact-NGD step did): sampled right after the step, the gradient would come out at 3 ms;
    after settle_s of untimed gradients, at its 1 ms in a row, and no longer than the step's sample
    took where settle_s is longer. The step, whose call is longer than settle_s or than the gradient's
    sample before it, is sampled without one (no 64 ms step runs untimed); a call timed alone
    follows itself and settles never."""
    log = []
    ms = 2.0**-10  # exact in binary: the clock's sums carry no round-off

    def step():
        clock[0] += 64 * ms
        log.append("step")

    def grad():
        clock[0] += (3 if "step" in log[-2:] else 1) * ms  # in the step's wake: one of the last two calls
        log.append("grad")

    def sample(settle_s):
        log.clear()
        return timing.alternating_medians([timing.Timed(step, lambda out: None), timing.Timed(grad, lambda out: None)],
                                          repeats=3, warmup=0, warmup_s=0, min_sample_s=0, settle_s=settle_s)

    assert sample(settle_s=0) == [64 * ms, 3 * ms]
    assert sample(settle_s=4 * ms) == [64 * ms, ms]
    # per turn: the step alone, then untimed gradients for 4 ms (two, both in the wake), then the sample
    assert log[2:] == ["step", "grad", "grad", "grad"] * 3
    assert sample(settle_s=1.0) == [64 * ms, ms]
    # untimed gradients for the step's 64 ms only: two in the wake (3 ms each) and 58 more, then the sample
    assert log[2:] == (["step"] + ["grad"] * 60 + ["grad"]) * 3
    log.clear()
    assert timing.alternating_medians([timing.Timed(grad, lambda out: None)], repeats=3, warmup=0, warmup_s=0,
                                      min_sample_s=4 * ms, settle_s=4 * ms) == [ms]
    assert log == ["grad"] * 13  # the warm-up's first call, then samples of 4 calls, none untimed between


def test_alternating_medians_take_the_middle_sample_not_the_mean_or_the_least(clock):
    """A sample hit by a burst of load must not pull the time up (the mean would) and one lucky
    quiet sample must not set it (the least would): on a clock where the step's samples cost 16, 1,
    8, 4 and 2 ms in turn, its time is the middle one, 4 ms; the gradient's steady samples are kept."""
    ms = 2.0**-10  # about a millisecond, exact in binary: the clock's sums carry no round-off
    costs = iter([ms] + [c * ms for c in (16, 1, 8, 4, 2)])  # the warm-up call, then one per sample

    def step():
        clock[0] += next(costs)

    def grad():
        clock[0] += ms / 2

    medians = timing.alternating_medians([timing.Timed(step, lambda out: None), timing.Timed(grad, lambda out: None)],
                                         repeats=5, warmup=0, warmup_s=0, min_sample_s=0, settle_s=0)
    assert next(costs, None) is None  # every cost was spent: one warm-up call and five samples of one call
    assert medians == [4 * ms, ms / 2]


def test_a_compile_neither_ends_the_warm_up_nor_sizes_the_samples(clock):
    """A jax call's first run compiles (here 250 ms, longer than the warm-up's 200): the warm-up
    still runs warm calls for 200 ms after it, and the samples are sized by a warm call (two calls
    of a millisecond for 2 ms), as in cost_table, which asks for no warm-up blocks beyond the time."""
    calls = []
    ms = 2.0**-10  # about a millisecond, exact in binary: the clock's sums carry no round-off

    def call():
        clock[0] += 2.0**-2 if not calls else ms
        calls.append(clock[0])
        return len(calls)

    (median,) = timing.alternating_medians([timing.Timed(call, lambda out: None)], repeats=3, warmup=0,
                                           warmup_s=200 * ms, min_sample_s=2 * ms)
    assert median == ms
    assert len(calls) == 1 + 200 + 3 * 2  # the compile, 200 ms of warm calls, 3 samples of 2 calls


def test_rows_timed_on_a_busy_machine_are_measured_again(capsys):
    """A row whose gradient took over twice the fastest gradient of the same model (a busy machine:
    torch's threads then wait 100x longer) is measured again until it is not, at most `tries` times;
    a new measurement whose step and gradient took longer together (a burst on the step's samples:
    ngd-mc's 400 s) is not taken; a row still slow is named in the log and marked contended. Rows of
    another model are compared among themselves."""
    import pandas as pd

    table = pd.DataFrame(dict(setting=["sgd", "adam", "ef", "ngd-mc", "sgd", "adam"], width=[8, 8, 8, 8, 64, 64],
                              batch_size=4, step_s=[40.0, 2.0, 90.0, 12.0, 9.0, 10.0],
                              gradient_s=[36.0, 1.0, 30.0, 5.0, 8.0, 9.0]))
    table["gradient_equivalents"] = table.step_s / table.gradient_s
    quiet = {"sgd": [dict(step_s=1.1, gradient_s=1.0, gradient_equivalents=1.1)],
             "ef": [dict(step_s=60.0, gradient_s=20.0, gradient_equivalents=3.0)] * 2,
             "ngd-mc": [dict(step_s=400.0, gradient_s=1.0, gradient_equivalents=400.0)] * 2}
    measured = []

    def measure(row):
        measured.append(row.setting)
        return quiet[row.setting].pop(0)

    out = timing.remeasure_contended(table, measure, ["width", "batch_size"], ratio=2.0, tries=2)
    assert measured == ["sgd", "ef", "ngd-mc", "ef", "ngd-mc"]  # the wide model's 9 s against 8 s is no contention
    assert out.step_s.tolist() == [1.1, 2.0, 60.0, 12.0, 9.0, 10.0]
    assert out.gradient_equivalents.tolist()[:4] == [1.1, 2.0, 3.0, 2.4]
    assert out.contended.tolist() == [False, False, True, True, False, False]
    log = capsys.readouterr().err
    assert "sgd width 8 batch 4: gradient 36 s, 36x the fastest" in log
    assert "ngd-mc width 8 batch 4: the new measurement took longer (step 400 s, gradient 1 s)" in log
    assert "ef width 8 batch 4: gradient still 20x the fastest after 2 new measurements" in log


def test_cost_table_measures_a_busy_row_again(monkeypatch):
    """cost_table passes its rows through remeasure_contended: a gradient sampled 50x slow at first
    (as on a loaded machine) is sampled again, and the row keeps the quiet numbers."""
    calls = []

    def medians(timed, repeats, **kwargs):
        calls.append(len(calls))
        return [3e-3, 50e-3] if len(calls) == 1 else [2e-3, 1e-3]

    monkeypatch.setattr(timing, "alternating_medians", medians)
    table = timing.cost_table("digits-mlp", "torch", settings=("sgd", "ef"), repeats=3)
    assert len(calls) == 3  # sgd, ef, then sgd again
    assert table.gradient_s.tolist() == [1e-3, 1e-3] and table.gradient_equivalents.tolist() == [2.0, 2.0]


def test_cost_table_times_the_gradient_where_it_times_the_steps(monkeypatch):
    """Gradient-equivalents divide a step by a gradient on the same framework and device (DESIGN 4):
    a GPU step over a CPU gradient would be no cost at all. Checked without a GPU: the builders are
    spies that record where they were asked to build (their defaults included) and build nothing."""
    import inspect

    built = []

    def spy(real, fake):
        def build(*args, **kwargs):
            bound = inspect.signature(real).bind(*args, **kwargs)
            bound.apply_defaults()
            where = bound.arguments
            built.append((real.__name__, str(where["framework"]), str(where["device"]), str(where["dtype"])))
            return fake
        return build

    monkeypatch.setattr(timing, "device_available", lambda framework, device: True)
    monkeypatch.setattr(timing, "gradient_call", spy(timing.gradient_call, (lambda: None, lambda out: None)))
    monkeypatch.setattr(timing, "step_call", spy(timing.step_call, (lambda: None, lambda out: None, 1)))
    monkeypatch.setattr(timing, "alternating_medians", lambda timed, repeats, **kwargs: [2e-3, 1e-3])
    table = timing.cost_table("digits-mlp", "jax", "cuda", "float64", settings=("sgd", "kfac"), repeats=3)
    assert set(built) == {("gradient_call", "jax", "cuda", "float64"), ("step_call", "jax", "cuda", "float64")}
    assert [name for name, *_ in built].count("step_call") == 2
    assert set(table.device) == {"cuda"} and set(table.framework) == {"jax"}


@pytest.mark.parametrize("framework, device, field", [("torch", "cpu", "device"), ("jax", "cpu", "device"),
                                                     ("numpy", "cuda", "framework")])
def test_peak_device_bytes_names_what_it_cannot_read(framework, device, field):
    with pytest.raises(ValueError, match=f"^{field}: .*not {framework if field == 'framework' else device}'s"):
        timing.peak_device_bytes(framework, device, lambda: None)


def test_torch_ops_counts_what_a_step_adds():
    """`timing.torch_ops` (the GPU launch proxy of TorchOps): momentum adds exactly its two foreach
    ops (scale the buffer, add the gradient) to an sgd step; counts are exact, so a repeat agrees."""
    problem, params, batch = timing.mlp_problem(width=8, batch_size=4)
    plain = timing.torch_ops("sgd", problem, params, batch, lr=0.1)
    heavy = timing.torch_ops("sgd", problem, params, batch, lr=0.1, momentum=0.9)
    assert heavy["step_ops"] - plain["step_ops"] == 2
    assert plain["gradient_ops"] == heavy["gradient_ops"] > 0
    assert plain["step_ops"] > plain["gradient_ops"]  # the update and the gradient norm
    kfac = timing.torch_ops("kfac", problem, params, batch, lr=0.1, damping=1e-2, kfac_update_period=4)
    assert kfac == timing.torch_ops("kfac", problem, params, batch, lr=0.1, damping=1e-2, kfac_update_period=4)
    assert kfac["ops_over_gradient"] > plain["ops_over_gradient"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax 0.0.8 uses deprecated jax names
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_kfac_jax_peer_takes_our_kfac_step(framework, kfac_jax):
    """kfac-jax's Optimizer, as the peer configures it, does the work of our `kfac` step: with the
    exact Fisher, its first steps (the first batch's factors, inverted once with M&G's factored
    Tikhonov damping, then reused) land on our parameters (float64). Its factor average differs
    from ours after the first step (a normalised weighted mean), which only matters for later
    inversions."""
    problem, params, batch = timing.mlp_problem(width=16, batch_size=8)
    hyperparameters = dict(lr=1.0, damping=1e-2, kfac_update_period=10, fisher="exact")
    theirs, _, period = timing.peer_step_call("kfac_jax.Optimizer", problem, params, batch, "cpu", "float64",
                                              **hyperparameters)
    ours, _, _ = timing.step_call(framework, "kfac", problem, params, batch, "cpu", "float64", **hyperparameters)
    assert period == 10
    for _ in range(3):
        (a, _), (b, _) = ours(), theirs()
        for index, name in enumerate(["dense0", "dense2"]):
            weight = np.asarray(a[f"{name}.weight"])
            update = np.abs(weight - params[f"{name}.weight"]).max()
            assert np.abs(np.asarray(b[index][0]).T - weight).max() <= 1e-10 * update, name
            np.testing.assert_allclose(np.asarray(b[index][1]), np.asarray(a[f"{name}.bias"]), rtol=1e-10, atol=1e-12)


def test_kfac_jax_shims_apply_only_where_jax_lacks_the_old_api():
    """natgrad_impls.kfac_jax_compat on stand-ins of jax 0.11's modules (the pinned jax needs no
    shim but the third): moved names are put back where missing and only there; ClosedJaxpr(jaxpr=,
    consts=) becomes the legacy positional Jaxpr call where ClosedJaxpr is Jaxpr, once, and the
    result is a ClosedJaxpr to isinstance, as before the merge."""
    from types import SimpleNamespace

    from natgrad_impls.kfac_jax_compat import _MOVED, accept_keyword_closed_jaxpr, restore_moved_names

    class Jaxpr:  # jax 0.11's merged class: the legacy ClosedJaxpr(jaxpr, consts) is positional
        def __init__(self, constvars, invars=None, consts=None):
            self.inner, self.consts = constvars, consts

    extend_core = SimpleNamespace(Jaxpr=Jaxpr, ClosedJaxpr=Jaxpr, DropVar="moved DropVar", Effects="moved Effects")
    core = SimpleNamespace(Effects="kept Effects")
    assert restore_moved_names(core, extend_core) == ["DropVar"]
    assert (core.DropVar, core.Effects) == ("moved DropVar", "kept Effects")
    assert not hasattr(core, "gensym") and "gensym" in _MOVED  # absent from both: left absent

    assert accept_keyword_closed_jaxpr(extend_core) and not accept_keyword_closed_jaxpr(extend_core)
    inner = Jaxpr("open")
    closed = extend_core.ClosedJaxpr(jaxpr=inner, consts=(1.0, 2.0))
    assert type(closed) is Jaxpr and closed.inner is inner and closed.consts == [1.0, 2.0]
    assert isinstance(inner, extend_core.ClosedJaxpr) and not isinstance("x", extend_core.ClosedJaxpr)
    assert not accept_keyword_closed_jaxpr(SimpleNamespace(Jaxpr=Jaxpr, ClosedJaxpr=object))  # jax 0.10


def test_kfac_jax_imports_with_every_name_it_takes_from_jax_core(kfac_jax):
    """After `import_kfac_jax` (the `kfac_jax` fixture), this jax's jax.core has every name kfac-jax
    0.0.8 takes from it, deprecated (jax 0.10) or put back (jax 0.11)."""
    import warnings

    import jax.core

    from natgrad_impls.kfac_jax_compat import _MOVED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert all(hasattr(jax.core, name) for name in _MOVED)


def test_the_moved_names_shim_does_nothing_on_the_pinned_jax():
    """The module's promise: on jax 0.10, which still has the moved names in jax.core (deprecated),
    restore_moved_names sets none (in a fresh process: the kfac_jax fixture may have run it here)."""
    import jax

    if not jax.__version__.startswith("0.10."):
        pytest.skip(f"the promise is about jax 0.10, this is {jax.__version__}")
    ask = ("import jax.core, jax.extend.core\nfrom natgrad_impls.kfac_jax_compat import restore_moved_names\n"
           "print(restore_moved_names(jax.core, jax.extend.core))")
    done = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax 0.0.8 uses deprecated jax names
def test_kfac_jax_peer_estimates_and_inverts_the_curvature_as_our_kfac_does(kfac_jax, monkeypatch):
    """The settings that the first steps' comparison above cannot see (its factors are inverted once):
    the factors estimated on every step as ours are, averaged with our decay kfac_ema (kfac-jax's
    curvature_ema weighs the old estimate), `samples` MC labels per example; inverses refreshed every
    kfac_update_period steps; a fixed lr and damping and no momentum, on every step."""
    built = {}

    class Recorder:  # kfac_jax.Optimizer as the peer builds it, never stepped
        def __init__(self, **kwargs):
            built.update(kwargs)

        def init(self, params, rng, batch):
            return None

    monkeypatch.setattr(kfac_jax, "Optimizer", Recorder)
    problem, params, batch = timing.mlp_problem(width=8, batch_size=4)
    _, _, period = timing.peer_step_call("kfac_jax.Optimizer", problem, params, batch, "cpu", "float64", lr=0.3,
                                         damping=0.02, kfac_update_period=4, kfac_ema=0.8, fisher="mc", samples=3)
    assert period == 4
    settings = ("estimation_mode", "num_estimator_samples", "curvature_ema", "curvature_update_period",
                "inverse_update_period", "num_burnin_steps", "l2_reg")
    assert {name: built[name] for name in settings} == {
        "estimation_mode": "fisher_gradients", "num_estimator_samples": 3, "curvature_ema": 0.8,
        "curvature_update_period": 1, "inverse_update_period": 4, "num_burnin_steps": 0, "l2_reg": 0.0}
    assert not (built["use_adaptive_learning_rate"] or built["use_adaptive_damping"] or built["use_adaptive_momentum"])
    for step in (0, 1, 7):
        assert (built["learning_rate_schedule"](step), built["damping_schedule"](step),
                built["momentum_schedule"](step)) == (0.3, 0.02, 0.0)


def test_kfac_jax_eval_jaxpr_eqn_takes_both_bind_param_conventions():
    """kfac_jax_compat.eval_jaxpr_eqn on a stand-in primitive: get_bind_params returning the params
    alone (jax 0.10 and newer) or (subfuns, params) (older jax): the subfuns lead the bound inputs;
    one output comes back as a list of one, several as they are."""
    from types import SimpleNamespace

    from natgrad_impls.kfac_jax_compat import eval_jaxpr_eqn

    class Primitive:
        def __init__(self, pair, outputs):
            self.pair, self.outputs, self.bound = pair, outputs, []

        def get_bind_params(self, params):
            return (["subfun"], {**params, "closed": True}) if self.pair else params

        def bind(self, *args, **params):
            self.bound.append((args, params))
            return self.outputs

    for pair, outputs, returned in ((False, 5.0, [5.0]), (True, 5.0, [5.0]), (False, [1.0, 2.0], [1.0, 2.0])):
        primitive = Primitive(pair, outputs)
        eqn = SimpleNamespace(primitive=primitive, params={"axis": 0}, source_info=SimpleNamespace(traceback=None))
        assert eval_jaxpr_eqn(eqn, [3.0, 4.0]) == returned
        expected = (("subfun", 3.0, 4.0), {"axis": 0, "closed": True}) if pair else ((3.0, 4.0), {"axis": 0})
        assert primitive.bound == [expected], pair


def test_kfac_jax_compat_moves_back_every_jax_core_name_of_kfac_jax_that_jax_extend_has(kfac_jax):
    """`_MOVED` holds every name that kfac-jax's source takes as jax.core.NAME and that jax.extend.core
    also has: the names jax moves out of jax.core (deprecated there in 0.10, gone in 0.11), which
    kfac-jax then fails to import without the shim."""
    import jax.extend.core

    from natgrad_impls.kfac_jax_compat import _MOVED

    source = "".join(path.read_text() for path in Path(kfac_jax.__file__).parent.rglob("*.py"))
    moved = {name for name in re.findall(r"\bjax\.core\.(\w+)", source) if hasattr(jax.extend.core, name)}
    assert moved, "kfac-jax takes nothing from jax.core that jax.extend.core has: nothing to check"
    assert moved <= set(_MOVED), sorted(moved - set(_MOVED))


def _script(name):
    """scripts/`name`.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_float32_directions_prints_the_step_against_woodbury(capsys):
    """scripts/float32_directions.py (the README's float32 NGD figures): a row per framework and damping,
    the step's direction within float32's reach of float64's where Woodbury's is off by its size."""
    _script("float32_directions").main(["--task", "digits-mlp", "--adam-steps", "3", "--batch-size", "32",
                                        "--dampings", "1e-8", "--frameworks", "torch,jax"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["torch", "1e-08"], ["jax", "1e-08"]]
    for _, _, step, woodbury in rows:
        assert float(step) < 1e-3 < 0.1 < float(woodbury)  # (measured: at most 5e-5 against 9 to 13)


@pytest.mark.parametrize("script, argv, said", [
    ("float32_directions", ["--task", "nope"], "--task: 'nope' is not a network task (one of digits-mlp,"),
    ("float32_directions", ["--dampings", "1e-2,nan"], "--dampings: '1e-2,nan' must be comma-separated numbers > 0"),
    ("float32_directions", ["--frameworks", "numpy"], "--frameworks: 'numpy' must be torch, jax or both"),
    ("run_overhead", ["--repeats", "0"], "--repeats must be >= 1"),
    ("grid_speed", ["--tasks", "digits-mlp"], "--tasks: task: 'digits-mlp' is not a full-batch convex task"),
    ("grid_speed", ["--fraction", "-1"], "--fraction: -1.0 must be in (0, 1]"),
])
def test_the_scripts_name_a_bad_argument_before_any_work(script, argv, said, capsys):
    """One line naming the option, exit 2 (a traceback, an empty min() or a silent run before)."""
    with pytest.raises(SystemExit) as stopped:
        _script(script).main(argv)
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def _step_cost_script():
    """scripts/step_cost.py as a module."""
    return _script("step_cost")


def test_step_cost_builds_each_step_once_and_keeps_every_measurement(monkeypatch):
    """scripts/step_cost.py: the steps are built (compiled) once, not once per round; the table
    reaches `on_update` after every measurement (a run stopped in its first round keeps the rows it
    timed), each row with its own count of rounds; a K-FAC row also has its inversion's time and
    amortised share."""
    step_cost = _step_cost_script()
    built = []
    step_call = timing.step_call
    monkeypatch.setattr(timing, "step_call", lambda *args, **kwargs: built.append(args[1]) or step_call(*args, **kwargs))
    measure = lambda rounds, on_update=None: step_cost.cost_table(  # noqa: E731
        ["torch"], ["sgd", "kfac"], repeats=2, peers=False, sizes=(6, 5, 3), batch_size=4, rounds=rounds,
        on_update=on_update)
    measure(1)
    once, updates = list(built), []
    table = measure(3, updates.append)
    assert set(once) == {"sgd", "kfac"} and built[len(once):] == once  # three rounds build what one does
    assert [list(t["rounds"]) for t in updates] == [[1], [1, 1], [2, 1], [2, 2], [3, 2], [3, 3]]
    assert table is updates[-1]
    kfac = table.set_index("optimizer").loc["kfac"]
    assert 0 < kfac.inverse_share < 1 and kfac.inverse_s > 0
    first = updates[1]
    assert (first.gradient_equivalents == first.step_s / first.gradient_s).all()
    assert np.isnan(table.set_index("optimizer").loc["sgd", "inverse_s"])


def test_step_cost_keeps_the_table_when_a_measurement_fails(monkeypatch, capsys):
    """A setting that fails to build, one whose step fails while timed, and a peer whose first call
    fails are reported and left out; the other rows are timed and kept (a borrowed GPU's one run)."""
    step_cost = _step_cost_script()
    step_call, peer_step_call, time_round = timing.step_call, timing.peer_step_call, step_cost._time_round

    def failing_step_call(framework, optimizer, *args, **kwargs):
        if optimizer == "ef":
            raise RuntimeError("no ef here")
        return step_call(framework, optimizer, *args, **kwargs)

    def failing_peer(peer, *args, **kwargs):
        call, sync, period = peer_step_call(peer, *args, **kwargs)
        return (lambda: (_ for _ in ()).throw(RuntimeError("peer broke"))), sync, period

    def failing_round(m, *args):
        if m.row["setting"] == "adam":
            raise RuntimeError("adam broke")
        return time_round(m, *args)

    monkeypatch.setattr(timing, "step_call", failing_step_call)
    monkeypatch.setattr(timing, "peer_step_call", failing_peer)
    monkeypatch.setattr(step_cost, "_time_round", failing_round)
    updates = []
    table = step_cost.cost_table(["torch"], ["sgd", "adam", "ef"], repeats=2, sizes=(6, 5, 3), batch_size=4,
                                 rounds=2, on_update=updates.append)
    said = capsys.readouterr().out
    assert "skipping torch ef: RuntimeError: no ef here" in said and "skipping torch.optim.SGD: RuntimeError" in said
    assert "stopped timing torch adam: RuntimeError: adam broke" in said
    assert list(table["setting"]) == ["sgd"] and list(table["rounds"]) == [2] and "over_torch" not in table


def test_step_cost_divides_each_row_by_its_own_frameworks_gradient(monkeypatch):
    """scripts/step_cost.py: a torch row is in torch gradients and a jax row in jax gradients (the
    two differ several-fold on one machine), and K-FAC's inversion share is one refresh spread over
    its period (the setting's kfac_update_period) against a step. Real calls are built; the times
    come from a stand-in for alternating_medians that knows each gradient call's framework."""
    step_cost = _step_cost_script()
    gradient_call = timing.gradient_call

    def tagged_gradient_call(framework, *args, **kwargs):
        call, sync = gradient_call(framework, *args, **kwargs)
        tagged = lambda: call()  # noqa: E731
        tagged.framework = str(framework)
        return tagged, sync

    ms = 2.0**-10
    gradient_s, step_s, inverse_s = {"torch": ms, "jax": 4 * ms}, 16 * ms, 32 * ms
    def medians(timed, repeats, **kwargs):  # step, gradient and, for kfac, the inversion
        return [step_s, gradient_s[timed[1].call.framework], inverse_s][:len(timed)]

    monkeypatch.setattr(timing, "gradient_call", tagged_gradient_call)
    monkeypatch.setattr(timing, "alternating_medians", medians)
    table = step_cost.cost_table(["torch", "jax"], ["sgd", "kfac"], repeats=2, peers=False, sizes=(6, 5, 3),
                                 batch_size=4)
    rows = table.set_index(["framework", "optimizer"])
    for framework in ("torch", "jax"):
        for optimizer in ("sgd", "kfac"):
            row = rows.loc[(framework, optimizer)]
            assert row.gradient_s == gradient_s[framework], (framework, optimizer)
            assert row.gradient_equivalents == step_s / gradient_s[framework], (framework, optimizer)
        period = timing.setting("kfac")[1]["kfac_update_period"]
        assert rows.loc[(framework, "kfac")].inverse_share == inverse_s / period / step_s  # 0.2, not 2


def test_step_cost_compares_sgd_with_momentum_with_the_peers_momentum(monkeypatch):
    """The sgd-momentum row has its peers too (torch.optim.SGD and optax.sgd, given momentum 0.9):
    peers are found by the row's optimizer, not by its label."""
    step_cost = _step_cost_script()
    built, peer_step_call = [], timing.peer_step_call

    def spy(peer, *args, **hyperparameters):
        built.append((peer, hyperparameters.get("momentum")))
        return peer_step_call(peer, *args, **hyperparameters)

    monkeypatch.setattr(timing, "peer_step_call", spy)
    monkeypatch.setattr(timing, "alternating_medians", lambda timed, repeats, **kwargs: [4e-3, 1e-3, 2e-3][:len(timed)])
    table = step_cost.cost_table(["torch", "jax"], ["sgd-momentum"], repeats=2, peers=True, sizes=(6, 5, 3),
                                 batch_size=4)
    assert sorted(built) == [("optax.sgd", 0.9), ("torch.optim.SGD", 0.9)]
    rows = table.set_index("framework")
    assert rows.loc["torch", "over_torch"] == rows.loc["jax", "over_optax"] == 2.0


def test_step_cost_table_names_the_cpu_it_ran_on(tmp_path):
    """A saved table's `machine` is the CPU's model (/proc/cpuinfo), not just "x86_64"; `versions`
    the frameworks' releases."""
    import torch

    step_cost = _step_cost_script()
    out = tmp_path / "cost.csv"
    step_cost.main(["--frameworks", "torch", "--settings", "sgd", "--sizes", "6,5,3", "--batch-size", "4",
                    "--repeats", "2", "--no-peers", "--out", str(out)])
    machine = set(results.read(out)["machine"])
    assert machine == {timing.device_name("cpu")}
    assert set(results.read(out)["versions"]) == {f"torch {torch.__version__}"}  # what it was measured with
    assert set(results.read(out)["threads"]) == {torch.get_num_threads()}  # jax's ratios move with it
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        model = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert machine == {model.split(":", 1)[1].strip()}


def test_a_tables_threads_are_what_each_framework_may_use(monkeypatch):
    """torch: its intra-op pool; jax: XLA's pool, PJRT_NPROC or NPROC where set
    (runner.thread_environment, as the pipeline's single-threaded jobs set it), else the cores this
    process may run on."""
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert timing.cpu_threads("torch") == 3
    monkeypatch.setenv("PJRT_NPROC", "1")
    monkeypatch.setenv("NPROC", "4")
    assert timing.cpu_threads("jax") == 1
    monkeypatch.delenv("PJRT_NPROC")
    assert timing.cpu_threads("jax") == 4
    monkeypatch.delenv("NPROC")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 5}, raising=False)
    assert timing.cpu_threads("jax") == 3
    with pytest.raises(ValueError, match="framework: numpy steps are not timed"):
        timing.cpu_threads("numpy")


def test_a_tables_versions_name_its_frameworks_and_peers_and_leave_out_what_is_missing(monkeypatch):
    """The `versions` column: each package once, in order, a missing one left out; every peer of
    timing.PEERS has the package whose release moves its over_<peer> ratio."""
    installed = {"torch": "2.13.0+cpu", "jax": "0.10.2", "optax": "0.2.9"}
    monkeypatch.setattr(timing, "package_version", installed.get)
    assert timing.package_versions(["torch", "jax", "torch", "optax", "kfac-jax"]) == \
        "torch 2.13.0+cpu, jax 0.10.2, optax 0.2.9"
    assert {peer.rsplit(".", 1)[0] for peer in timing.PEERS} == set(timing.PEER_PACKAGES)


@pytest.mark.parametrize("argv, message", [
    (["--frameworks", "tf"], "framework: 'tf' is not one of"),
    (["--frameworks", "numpy"], "framework: numpy is not timed here"),
    (["--dtype", "float16"], "dtype: 'float16' is not one of"),
    (["--settings", "ngd"], "setting: 'ngd' is not one of"),
    (["--sweep", "--widths", "64,x"], "widths: '64,x' must be integers >= 1"),
    (["--repeats", "0"], "repeats: '0' must be integers >= 1"),
])
def test_step_cost_refuses_bad_arguments_in_one_line_before_measuring(argv, message, capsys, monkeypatch):
    step_cost = _step_cost_script()
    monkeypatch.setattr(timing, "device_name", lambda *a: pytest.fail("measuring began"))
    with pytest.raises(SystemExit) as stop:
        step_cost.main(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and "Traceback" not in error


@pytest.mark.parametrize("impl", [TorchImpl(), JaxImpl()], ids=["torch", "jax"])
def test_kfac_inverse_call_inverts_what_a_kfac_step_inverts(impl):
    """The inversion step_cost.py times apart (`timing.kfac_inverse_call`) is the work a `kfac` step
    does at a refresh: the inverses of a run's first step (its factors and MC draws), float64."""
    problem, params, batch = timing.mlp_problem(width=16, batch_size=8)
    invert, sync = timing.kfac_inverse_call(impl.name, problem, params, batch, "cpu", "float64", damping=1e-2)
    inverse = invert()
    sync(inverse)
    A_inv, G_inv = (inverse.A, inverse.G) if impl.name == "torch" else inverse
    opt = make_optimizer(impl.name, "kfac", problem, lr=0.1, damping=1e-2, kfac_update_period=10)
    theta = impl.params(params)
    _, state, _ = opt.step(theta, opt.init(theta), impl.batch(*batch))
    assert set(A_inv) == set(state.A_inv) == {"dense0", "dense2"}
    for name in A_inv:
        for ours, step in ((A_inv, state.A_inv), (G_inv, state.G_inv)):
            np.testing.assert_allclose(impl.numpy(ours[name]), impl.numpy(step[name]), rtol=1e-10, atol=1e-12)


def assert_same_steps(ours, theirs, names, steps=3):
    """Both step calls (timing.step_call's and peer_step_call's) land on the same parameters after
    `steps` steps (float64)."""
    for _ in range(steps):
        (a, _), (b, _) = ours(), theirs()
    def as_numpy(x):  # a torch tensor that requires grad, or a jax array
        return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)

    for name in names:
        np.testing.assert_allclose(as_numpy(a[name]), as_numpy(b[name]), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("peer, momentum", [("torch.optim.SGD", 0.0), ("torch.optim.SGD", 0.9), ("torch.optim.Adam", 0.0),
                                            ("optax.sgd", 0.0), ("optax.sgd", 0.9), ("optax.adam", 0.0)])
def test_sgd_adam_peers_take_our_step(peer, momentum):
    """Each peer does what the optimizer it is compared with does: three steps from the same
    parameters on the same batch land on the same parameters (float64)."""
    problem, params, batch = timing.mlp_problem(width=8, batch_size=4)
    label = timing.PEER_OF[peer]
    _, hyperparameters = timing.setting(label)
    hyperparameters.update(lr=0.1, **({"momentum": momentum} if momentum else {}))
    framework = timing.peer_framework(peer).value
    ours, _, _ = timing.step_call(framework, label, problem, params, batch, "cpu", "float64", **hyperparameters)
    theirs, _, _ = timing.peer_step_call(peer, problem, params, batch, "cpu", "float64", **hyperparameters)
    assert_same_steps(ours, theirs, list(params))


@pytest.mark.parametrize("peer", ["torch.optim.Adam", "optax.adam"])
def test_adam_peers_take_our_defaults_not_theirs(monkeypatch, peer):
    """A peer is given every hyperparameter of ours, defaults included: were our Adam's eps to move
    from theirs (1e-8; here 1e-3), the peer would still take the step ours takes."""
    import dataclasses

    from natgrad_impls import hyperparameters
    from natgrad_impls.names import Optimizer

    @dataclasses.dataclass(frozen=True)
    class Adam(hyperparameters.Adam):
        eps: float = 1e-3

    monkeypatch.setitem(hyperparameters.HYPERPARAMETERS, Optimizer.ADAM, Adam)
    problem, params, batch = timing.mlp_problem(width=8, batch_size=4)
    framework = timing.peer_framework(peer).value
    ours, _, _ = timing.step_call(framework, "adam", problem, params, batch, "cpu", "float64", lr=0.1, eps=1e-3)
    theirs, _, _ = timing.peer_step_call(peer, problem, params, batch, "cpu", "float64", lr=0.1)
    assert_same_steps(ours, theirs, list(params))


def test_kfac_floor_counts_the_products_torch_does():
    """`timing.kfac_floor` (the arithmetic floor step_cost.py prints) counts the multiply-adds torch's
    flop counter sees: the gradient (less the bias columns, which torch adds rather than
    multiplies) and the preconditioning G V A of our K-FAC."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from natgrad_impls.torch import curvature as C
    from natgrad_impls.torch import model as M

    batch_size = 8
    problem, params, (x, y) = timing.mlp_problem(batch_size=batch_size, sizes=(12, 6, 5, 3))
    floor = timing.kfac_floor(problem.model, batch_size, period=10)
    p = M.to_torch(params)
    with FlopCounterMode(display=False) as counter:
        M.loss_and_grad(problem, p, (torch.as_tensor(x), torch.as_tensor(y)))
    bias_columns = sum(2 * batch_size * layer.out_features for _, layer in problem.model.parametric())
    assert floor["gradient"] == counter.get_total_flops() / 2 + bias_columns
    layers = C.to_layers(problem.model, p)
    identity = lambda n: torch.eye(n, dtype=torch.float64)
    kronecker = C.KroneckerCurvature(problem.model, {k: identity(w.shape[1]) for k, w in layers.items()},
                                     {k: identity(w.shape[0]) for k, w in layers.items()})
    with FlopCounterMode(display=False) as counter:
        kronecker.multiply(p)
    assert floor["precondition"] == counter.get_total_flops() / 2
    assert floor["floor"] == (floor["gradient"] + floor["precondition"]) / floor["gradient"]
    assert floor["with_factors"] > floor["floor"]


def test_kfac_floor_counts_factors_and_inverses_as_documented():
    """The counts the flop-counter test above cannot see, by hand for one dense layer 3 -> 2 with its
    bias (in' = 4, out = 2), N = 5, period 4: the factors' symmetric halves N (in'^2 + out^2) / 2 every
    step, and per period a Cholesky (n^3 / 6 multiply-adds) and the inverse from it (n^3 / 3) of
    A (n = 4) and G (n = 2); the gradient 2 N out in' (a first layer: no backward into its input)."""
    from natgrad_impls import models

    floor = timing.kfac_floor(models.mlp((3, 2)), batch_size=5, period=4)
    gradient, precondition = 2 * 5 * 2 * 4, 2 * 2 * 4 + 2 * 4 * 4
    factors = 5 * (4 * 4 + 2 * 2) / 2
    inverses = sum(n**3 / 6 + n**3 / 3 for n in (4, 2)) / 4
    assert floor["gradient"] == gradient and floor["precondition"] == precondition
    assert floor["factors"] == pytest.approx(factors) and floor["inverses"] == pytest.approx(inverses)
    assert floor["with_factors"] == pytest.approx((gradient + precondition + factors + inverses) / gradient)


def test_torch_ops_averages_one_period_after_a_period_of_warm_up(monkeypatch):
    """`torch_ops` counts a step's operators over one K-FAC period after a period of warm-up and
    divides by the period. Stand-ins: a step of one add (eleven on its first call, as K-FAC's first
    step, with no moving average yet, differs), a period of 4, a gradient of two adds."""
    import torch

    x, calls = torch.zeros(3), []

    def step():
        calls.append(1)
        for _ in range(11 if len(calls) == 1 else 1):
            x.add(1.0)

    def gradient():
        x.add(1.0)
        x.add(2.0)

    monkeypatch.setattr(timing, "step_call", lambda *args, **kwargs: (step, None, 4))
    monkeypatch.setattr(timing, "gradient_call", lambda *args, **kwargs: (gradient, None))
    ops = timing.torch_ops("kfac", None, None, None, lr=0.1, damping=1e-2)
    assert ops == {"step_ops": 1.0, "gradient_ops": 2.0, "ops_over_gradient": 0.5}
    assert len(calls) == 8


def test_gradient_equivalents_is_step_time_over_gradient_time(monkeypatch):
    """DESIGN 4: cost = time(step) / time(gradient), the step sampled in blocks of its K-FAC period
    (so that a sample holds the inversion and charges each step its share) and the gradient in
    blocks of one. Stand-ins: medians of 3 ms a step and 1 ms a gradient, a period of 10."""
    monkeypatch.setattr(timing, "step_call", lambda *args, **kwargs: ("step", "sync", 10))
    monkeypatch.setattr(timing, "gradient_call", lambda *args, **kwargs: ("gradient", "sync"))
    sampled = []

    def medians(timed, repeats, **kwargs):
        sampled.append([(t.call, t.block) for t in timed])
        return [{"step": 3e-3, "gradient": 1e-3}[t.call] for t in timed]

    monkeypatch.setattr(timing, "alternating_medians", medians)
    cost = timing.gradient_equivalents("torch", "kfac", None, None, None, repeats=5)
    assert cost["step_s"] == 3e-3 and cost["gradient_s"] == 1e-3
    assert cost["gradient_equivalents"] == pytest.approx(3.0)
    assert sampled == [[("step", 10), ("gradient", 1)]]


def test_device_available_asks_the_framework_that_would_run(monkeypatch):
    """cpu is always there; cuda is there for torch when torch.cuda sees a GPU, for jax when jax lists a
    gpu device (it raises RuntimeError without a GPU backend), never for numpy; cost_table refuses a
    device its framework does not see. Stand-ins answer for torch and jax, so the test means the same
    on a machine with a GPU as without."""
    import jax
    import torch

    for seen in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda seen=seen: seen)
        assert timing.device_available("torch", "cuda") is seen
    with pytest.raises(ValueError, match="^device: 'cuda' is not visible to torch"):
        timing.cost_table("digits-mlp", "torch", "cuda")

    def no_gpu(backend=None):
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "devices", no_gpu)
    assert timing.device_available("jax", "cuda") is False
    monkeypatch.setattr(jax, "devices", lambda backend=None: ["a gpu"])
    assert timing.device_available("jax", "cuda") is True
    assert timing.device_available("numpy", "cuda") is False
    assert all(timing.device_available(framework, "cpu") for framework in ("numpy", "torch", "jax"))


def test_each_timed_call_comes_with_its_frameworks_sync(monkeypatch):
    """A step and a gradient are timed up to their framework's sync: torch.cuda.synchronize on a GPU,
    jax's block_until_ready. A call handed back with a no-op sync would time how fast work is queued,
    not done. torch's cuda sync is checked with a stand-in torch.cuda.synchronize; step_call and
    gradient_call must hand back the very sync `_framework_io` gives them (a marked stand-in here)."""
    import jax
    import torch

    from natgrad_impls.names import Device, DType, Framework

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: synced.append(args))
    _, _, sync = timing._framework_io(Framework.TORCH, Device.CUDA, DType.FLOAT32)
    sync("a step's output")
    assert synced == [()]
    assert timing._framework_io(Framework.JAX, Device.CPU, DType.FLOAT32)[2] is jax.block_until_ready

    framework_io = timing._framework_io
    marked = {}

    def io(framework, device, dtype):
        to_params, to_batch, _ = framework_io(framework, device, dtype)
        marked[framework.value] = lambda out: None
        return to_params, to_batch, marked[framework.value]

    monkeypatch.setattr(timing, "_framework_io", io)
    problem, params, batch = timing.mlp_problem(width=8, batch_size=4)
    for framework in ("torch", "jax"):
        _, step_sync, _ = timing.step_call(framework, "sgd", problem, params, batch, lr=0.1)
        assert step_sync is marked[framework], framework
        _, gradient_sync = timing.gradient_call(framework, problem, params, batch)
        assert gradient_sync is marked[framework], framework


def test_peak_device_bytes_counts_the_runs_own_peak(monkeypatch):
    """torch: the allocator's peak is reset before `run` and read after it, so that it is the run's
    and not what an earlier allocation left (stand-in allocator: a 5 MiB peak from before, a run
    that peaks at 3 MiB: 3); jax: the device's peak_bytes_in_use, not the bytes still held after the
    run (stand-in device: 7 MiB peak, 1 MiB in use: 7)."""
    import jax
    import torch

    MiB = 2**20
    allocator = {"peak": 5 * MiB}

    def run():
        allocator["peak"] = max(allocator["peak"], 3 * MiB)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: allocator.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: allocator["peak"])
    assert timing.peak_device_bytes("torch", "cuda", run) == 3 * MiB

    class Device:
        def memory_stats(self):
            return {"bytes_in_use": 1 * MiB, "peak_bytes_in_use": 7 * MiB}

    monkeypatch.setattr(jax, "devices", lambda backend=None: [Device()])
    assert timing.peak_device_bytes("jax", "cuda", lambda: None) == 7 * MiB


def test_scaling_sweep_times_the_labels_optimizer_with_the_overrides_at_every_grid_point(monkeypatch):
    """scaling_sweep("ngd-mc", hyperparameters={"lr": 0.5}) times ngd with the label's
    hyperparameters, lr overridden, once per width and batch size, on the MLP of that width and a
    batch of that size; its rows name optimizer ngd and setting ngd-mc (the figure tells ngd-mc from
    ngd-exact by it). Stand-in gradient_equivalents: records what it was asked to time."""
    timed = []

    def cost(framework, optimizer, problem, params, batch, device, dtype, repeats, **hyperparameters):
        timed.append((optimizer, problem.model.num_params(), len(batch[0]), hyperparameters))
        return {"step_s": 2.0, "gradient_s": 1.0, "gradient_equivalents": 2.0}

    monkeypatch.setattr(timing, "gradient_equivalents", cost)
    table = timing.scaling_sweep("torch", "ngd-mc", [8, 16], [4, 32], hyperparameters={"lr": 0.5})
    size = lambda width: 784 * width + width + width * 10 + 10  # noqa: E731
    expected = {**timing.SETTINGS["ngd-mc"][1], "lr": 0.5}
    grid = [(8, 4), (8, 32), (16, 4), (16, 32)]
    assert sorted(timed, key=lambda t: (t[1], t[2])) == [("ngd", size(w), n, expected) for w, n in grid]
    assert sorted(zip(table.width, table.batch_size, table.num_params)) == [(w, n, size(w)) for w, n in grid]
    assert set(table.optimizer) == {"ngd"} and set(table.setting) == {"ngd-mc"}


def test_scaling_table_looks_for_contention_within_one_model_and_batch(monkeypatch):
    """A gradient over 8 x the examples takes 8 x as long on an idle machine: scaling_table compares
    a row's gradient only with those of the same width and batch size, so a sweep over batch sizes
    is not measured again. Stand-in sweep: gradient time width x batch x 1 us, steps 2 gradients."""
    import pandas as pd

    sweeps = []

    def sweep(framework, label, widths, batch_sizes, device, dtype, repeats, seed=0):
        sweeps.append((label, list(widths), list(batch_sizes)))
        return pd.DataFrame([dict(framework=framework, device=device, dtype=dtype, optimizer=timing.setting(label)[0],
                                  setting=label, width=w, batch_size=n, num_params=w,
                                  step_s=2e-6 * w * n, gradient_s=1e-6 * w * n, gradient_equivalents=2.0)
                             for w in widths for n in batch_sizes])

    monkeypatch.setattr(timing, "scaling_sweep", sweep)
    table = timing.scaling_table("torch", widths=(8,), batch_sizes=(4, 32), settings=("sgd", "adam"), repeats=2)
    assert sweeps == [("sgd", [8], [4, 32]), ("adam", [8], [4, 32])]  # nothing measured again
    assert table.gradient_s.tolist() == pytest.approx([32e-6, 256e-6] * 2)


def test_cost_table_samples_kfac_in_whole_periods(monkeypatch):
    """cost_table samples a K-FAC step in blocks of its period, so that each sample holds one
    inversion and charges each step its share, and other steps and the gradient in blocks of one."""
    blocks = []

    def medians(timed, repeats, **kwargs):
        blocks.append([t.block for t in timed])
        return [2e-3, 1e-3]

    monkeypatch.setattr(timing, "alternating_medians", medians)
    monkeypatch.setattr(timing, "affordable_repeats", lambda *args, **kwargs: 3)
    timing.cost_table("digits-mlp", "torch", settings=("sgd", "kfac"), repeats=3)
    assert blocks == [[1, 1], [timing.SETTINGS["kfac"][1]["kfac_update_period"], 1]]


def test_affordable_repeats_counts_samples_of_whole_blocks(clock):
    """A sample is a block of calls (K-FAC: a period): with calls of 1/16 s in blocks of 4 a sample
    takes 1/4 s, so a budget of 1 s affords 4 samples, not the 16 single calls it would hold; at
    least 3 however slow, at most `repeats`. Stand-in clock that each call moves on by 1/16 s."""

    def call():
        clock[0] += 2.0**-4

    sync = lambda out: None  # noqa: E731
    assert timing.affordable_repeats(call, sync, repeats=10, block=4, budget_s=1.0) == 4
    assert timing.affordable_repeats(call, sync, repeats=10, block=1, budget_s=1.0) == 10
    assert timing.affordable_repeats(call, sync, repeats=10, block=4, budget_s=0.25) == 3


def test_step_cost_rounds_warm_up_once_and_report_the_median_round(monkeypatch):
    """scripts/step_cost.py: round 1 warms every call up (timing.WARMUP_S), later rounds find them
    warm; each column is the median over the rounds (rounds of 1, 2 and 9 gradient-equivalents: 2,
    not the last round's 9 nor the mean 4). The row's width is its widest hidden layer (5 of
    6-3-5-2) and its setting the label. Stand-in alternating_medians."""
    step_cost = _step_cost_script()
    ms, warmups, rounds = 2.0**-10, [], iter([1.0, 2.0, 9.0])

    def medians(timed, repeats, warmup_s=timing.WARMUP_S, **kwargs):
        warmups.append(warmup_s)
        return [next(rounds) * ms, ms]

    monkeypatch.setattr(timing, "alternating_medians", medians)
    table = step_cost.cost_table(["torch"], ["ngd-mc"], repeats=2, peers=False, sizes=(6, 3, 5, 2), batch_size=4,
                                 rounds=3)
    assert warmups == [timing.WARMUP_S, 0.0, 0.0]
    row = table.iloc[0]
    assert (row.step_s, row.gradient_s, row.gradient_equivalents) == (2 * ms, ms, 2.0)
    assert (row.width, row.sizes, row.optimizer, row.setting) == (5, "6-3-5-2", "ngd", "ngd-mc")
    monkeypatch.setattr(timing, "alternating_medians", lambda timed, repeats, **kwargs: [ms, ms])
    no_hidden = step_cost.cost_table(["torch"], ["sgd"], repeats=2, peers=False, sizes=(6, 2), batch_size=4)
    assert no_hidden.iloc[0].width == 0  # a model without a hidden layer has no width (not --width's 128)


def test_step_cost_sweep_passes_widths_and_batch_sizes_in_their_places(monkeypatch):
    """scripts/step_cost.py --sweep hands --widths and --batch-sizes to timing.scaling_sweep as its
    widths and batch sizes, for every framework and setting (stand-in sweep: records its arguments)."""
    import pandas as pd

    step_cost = _step_cost_script()
    calls = []

    def sweep(framework, label, widths, batch_sizes, *args):
        calls.append((framework, label, widths, batch_sizes))
        return pd.DataFrame([{"framework": framework, "setting": label}])

    monkeypatch.setattr(timing, "scaling_sweep", sweep)
    step_cost.main(["--sweep", "--frameworks", "torch", "--settings", "sgd,kfac", "--widths", "8,16",
                    "--batch-sizes", "4"])
    assert calls == [("torch", "sgd", [8, 16], [4]), ("torch", "kfac", [8, 16], [4])]


def test_gpu_session_carries_only_pinned_packages():
    """scripts/gpu_session.sh takes every version it carries to a GPU machine from requirements.lock,
    and carries what its parts import beyond the image's stack: kfac-jax (the K-FAC peer), asv and
    asv_runner (benchmarks/common.py's), snakemake, and mnist1d (the data of mnist1d-mlp)."""
    script = (ROOT / "scripts" / "gpu_session.sh").read_text()
    lacks = re.search(r'LACKS="([^"]+)"', script).group(1).split()
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731  (pip's name comparison)
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pinned = {norm(line.split("==")[0]) for line in lock if "==" in line}
    assert len(lacks) > 40 and {norm(name) for name in lacks} <= pinned, sorted({norm(n) for n in lacks} - pinned)
    assert {"kfac-jax", "asv", "asv-runner", "snakemake", "mnist1d"} <= {norm(name) for name in lacks}


def _gpu_session_copy(tmp_path, stand_ins: dict | None = None) -> dict:
    """A copy of scripts/gpu_session.sh without .whl/ (nothing is installed), run with this
    environment's python3 and the given stand-in commands (name -> sh script) first on PATH, and its
    site folder in tmp_path; the environment to run it in."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_session.sh", tmp_path / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"python3": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', **(stand_ins or {})}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
                SITE=str(tmp_path / "site"))


def test_gpu_session_check_keeps_to_its_budget(tmp_path):
    """`check` runs its parts most needed first and stops at its budget: with none left it skips
    every part, says so, records each part, and succeeds (a device lease can end mid-way)."""
    env = _gpu_session_copy(tmp_path)
    done = subprocess.run(["bash", "scripts/gpu_session.sh", "check", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = (tmp_path / "out").glob("check_*.txt")
    parts = [line.split(":")[0] for line in record.read_text().splitlines() if not line.startswith("skipped")]
    assert parts == ["versions", "costs", "tests", "pipeline", "asv"]
    skipped = re.findall(r"^skipped \(-?\d+ s left\): (\S+ \S+)", done.stdout, flags=re.M)
    assert skipped == (["python3 scripts/step_cost.py"] * 2 + ["python3 -m"] + ["snakemake --workflow-profile"] * 2
                       + ["asv run"]), done.stdout
    assert record.read_text().count("skipped (") == 6  # said where the files come back, not only on stdout


def test_gpu_session_hands_asv_its_path_and_times_cuda_first(tmp_path):
    """What a rehearsal on a copy of the GPU image's Python, torch and jax found (README): asv
    drops PYTHONPATH from the processes it benchmarks in, so the script must hand it ASV_PYTHONPATH
    (the carried wheels and the package); and the default profile's report-after-run fails every
    `snakemake --until`, so the pipeline part runs without that profile, cuda's jobs first. asv and
    snakemake are stand-ins here that record how they were called."""
    calls = tmp_path / "calls.txt"
    record = f'#!/bin/sh\necho "$(basename "$0") [$ASV_PYTHONPATH] $*" >> "{calls}"\n'
    env = _gpu_session_copy(tmp_path, {"asv": record, "snakemake": record})
    env.pop("ASV_PYTHONPATH", None)
    (tmp_path / "benchmarks").mkdir()
    for part in ("asv", "pipeline"):
        done = subprocess.run(["bash", "scripts/gpu_session.sh", part, "300"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    (asv_run,) = [line for line in lines if line.startswith("asv") and " run " in line]
    asv_path = re.search(r"\[(.*?)\]", asv_run).group(1).split(os.pathsep)
    assert str(tmp_path) in asv_path and env["SITE"] in asv_path, asv_run
    pipeline = [line for line in lines if line.startswith("snakemake")]
    assert [re.search(r"devices=(\S+)", line).group(1) for line in pipeline] == ["[cuda]", "[cpu,cuda]"], pipeline
    assert all("--workflow-profile none" in line and "--until cost scaling" in line for line in pipeline), pipeline


def test_gpu_session_check_times_cuda_alone_and_gives_each_part_its_share(tmp_path):
    """`check` on a stand-in machine (torch and jax that see no GPU, recording stand-ins for
    step_cost.py, asv, snakemake and timeout): the costs are the header's MLPs on cuda, 784-1000-10
    at batch 512 first; each part ends at its share of the budget (35, 55, 75, 90 and 100%); the
    pipeline runs the cost rule alone; asv, last, runs with NATGRAD_ASV_DEVICES=cuda every benchmark
    with cuda parameters but the scaling sweep (half the suite's time), in quick mode, one round of
    Cost and OverPeer."""
    calls = tmp_path / "calls.txt"
    record = (f'#!/bin/sh\necho "$(basename "$0") [$NATGRAD_ASV_DEVICES] $* (rounds $NATGRAD_ASV_ROUNDS, '
              f'quick $NATGRAD_ASV_QUICK)" >> "{calls}"\n')
    limit = f'#!/bin/sh\necho "timeout $2 $3" >> "{calls}"\nshift 2\nexec "$@"\n'
    env = _gpu_session_copy(tmp_path, {"asv": record, "snakemake": record, "timeout": limit})
    site = Path(env["SITE"])
    site.mkdir()
    (site / "torch.py").write_text("__version__ = 'none'\n"
                                   "class cuda:\n    is_available = staticmethod(lambda: False)\n")
    (site / "jax.py").write_text("__version__ = 'none'\ndevices = lambda *args: []\n")
    (tmp_path / "scripts" / "step_cost.py").write_text(
        f"import sys\nopen({str(calls)!r}, 'a').write('step_cost ' + ' '.join(sys.argv[1:]) + '\\n')\n")
    (tmp_path / "benchmarks").mkdir()
    done = subprocess.run(["bash", "scripts/gpu_session.sh", "check", "400"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    costs = [re.search(r"--device (\S+) --width (\d+) --batch-size (\d+)", line).groups()
             for line in lines if line.startswith("step_cost")]
    assert costs == [("cuda", "1000", "512"), ("cuda", "128", "128")]
    (asv_run,) = [line for line in lines if line.startswith("asv") and " run " in line]
    assert asv_run.startswith("asv [cuda] ") and asv_run.endswith("(rounds 1, quick 1)"), asv_run  # held alone
    selected = re.search(r"--bench (\S+)", asv_run).group(1)
    cuda = {name for name in EXPECTED if not re.search("Scaling|TorchOps", name)}  # TorchOps counts on the CPU
    assert {name for name in EXPECTED if re.search(selected, name)} == cuda, selected
    limits = [int(line.split()[1]) for line in lines if line.startswith("timeout")]
    ends = [35, 55, 75, 90, 90, 100]  # step_cost twice, pytest, snakemake twice (cuda, then cpu beside), asv
    assert len(limits) == len(ends) and all(end * 4 - 15 <= limit <= end * 4 for limit, end in zip(limits, ends)), lines
    assert all("--until cost --config" in line for line in lines if line.startswith("snakemake")), lines


@pytest.mark.parametrize("task, optimizer, lr, damping", [
    ("breastcancer", "sgd", 10.0, np.nan),  # up to 17 x its first loss (clipped: never 100 x)
    ("wine", "sgd", 1e-5, np.nan),  # diverges at step 2
    ("breastcancer", "ngd", 1.0, 1e-4),
    ("breastcancer", "ef", 1e-2, 1e-4),  # lr <= 0.01: not chaotic (DESIGN 4)
])
def test_grid_speeds_loop_does_the_work_of_natgrad_run(task, optimizer, lr, damping):
    """scripts/grid_speed.py's loop, in the paper code's style, runs what the grid runs: the losses
    it logs are `natgrad run`'s (numpy, float64, zeros, the paper's clipping) to 1e-10, step for step,
    and it stops where the runner does, at the first loss above 100 x the first, and only there."""
    from natgrad_impls import runner
    from natgrad_impls.tasks import get_task

    grid_speed = _script("grid_speed")
    x, y = get_task(task).load().train
    losses = grid_speed.paper_run(grid_speed.PaperProblem(x, y[:, 0], task == "breastcancer"), optimizer, lr, damping)
    hyperparameters = {"lr": lr} if optimizer == "sgd" else {"lr": lr, "damping": damping}
    frame = runner.run(task, optimizer, "numpy", hyperparameters=hyperparameters, progress=False)
    np.testing.assert_allclose(losses, frame["loss"], rtol=1e-10, atol=0)


def test_grid_speed_extrapolates_the_loop_to_the_grid_and_divides_by_the_grid(monkeypatch, tmp_path):
    """scripts/grid_speed.py: the loop's time is its mean time per sampled run times the optimizer's
    grid points; the speed-up, that over the grid processes' time; the floor, N D^2 flops per computed
    ef/ngd step at the DGEMM rate, the chaos repeats' steps included. Stand-ins: a task of N = 5, D = 3;
    4 sgd and 6 ngd and ef grid points, half of them sampled (3 at least); a grid process of 2 s whose
    runs end at loss 0.5 after 7 steps, and whose two repeats of each best run stopped after 4 (sgd's
    not counted); a clock on which a loop run takes 1 s (sgd), 2 s (ngd) or 3 s (ef); DGEMM at 1 GFLOP/s."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    grid_speed = _script("grid_speed")
    clock = SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    points = {"sgd": [(lr, np.nan) for lr in (1.0, 2.0, 3.0, 4.0)],
              "ngd": [(lr, d) for lr in (1.0, 2.0) for d in (0.1, 0.2, 0.3)]}
    points["ef"] = points["ngd"]
    frame = pd.DataFrame([dict(optimizer=o, lr=lr, damping=d, step=7, loss=0.5, repeat=0, best=i == 0, chaotic=False)
                          for o, grid in points.items() for i, (lr, d) in enumerate(grid)]
                         + [dict(optimizer=o, lr=grid[0][0], damping=grid[0][1], step=4, loss=0.5, repeat=r, best=True,
                                 chaotic=False) for o, grid in points.items() for r in (1, 2)])

    def paper_run(problem, optimizer, lr, damping):
        clock.now += {"sgd": 1.0, "ngd": 2.0, "ef": 3.0}[optimizer]
        return [1.0, 0.5]

    task = SimpleNamespace(load=lambda: SimpleNamespace(train=(np.ones((5, 3)), np.ones((5, 1)))),
                           problem=SimpleNamespace(likelihood="gaussian"))
    monkeypatch.setattr(grid_speed, "time", clock)
    monkeypatch.setattr(grid_speed, "tempfile", SimpleNamespace(mkdtemp=lambda prefix: str(tmp_path)))
    monkeypatch.setattr(grid_speed, "dgemm_rate", lambda threads=None: 1e9 if threads is None else 0.5e9)
    monkeypatch.setattr(grid_speed, "run_grid_process", lambda task, out: (2.0, 3.0, "sgd best\nngd best\nef best"))
    monkeypatch.setattr(grid_speed, "results", SimpleNamespace(read=lambda out: frame))
    monkeypatch.setattr(grid_speed, "get_task", lambda name: task)
    monkeypatch.setattr(grid_speed.grid, "check_grid_task", lambda task: None)  # (a stand-in task)
    monkeypatch.setattr(grid_speed, "grid_points", points.get)
    monkeypatch.setattr(grid_speed, "paper_run", paper_run)
    assert grid_speed.main(["--tasks", "toy", "--fraction", "0.5", "--out", str(tmp_path / "speed.json")]) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    optimizers = report["tasks"]["toy"]["optimizers"].values()
    assert [(o["sampled_runs"], o["grid_runs"], o["loop_s_per_run"]) for o in optimizers] == [
        (3, 4, 1.0), (3, 6, 2.0), (3, 6, 3.0)]
    assert (report["loop_s"], report["grid_s"], report["ratio"]) == (1 * 4 + 2 * 6 + 3 * 6, 2.0, 17.0)
    assert report["floor_s"] == pytest.approx((12 * 7 + 2 * 2 * 4) * 5 * 3**2 / 1e9, rel=1e-12)


def test_grid_speed_times_the_grid_of_its_loop_and_counts_dgemm_flops(monkeypatch, tmp_path):
    """The grid process grid_speed.py times runs the loop's optimizers alone (`--optimizers sgd,ngd,ef`), and
    the DGEMM rate counts a product of n x n matrices as 2 n^3 flops (stand-in clock: 3 products, 2 s)."""
    from types import SimpleNamespace

    grid_speed = _script("grid_speed")
    commands = []
    monkeypatch.setattr(grid_speed, "subprocess", SimpleNamespace(
        run=lambda command, **kwargs: commands.append(command) or SimpleNamespace(stdout="")))
    grid_speed.run_grid_process("wine", tmp_path / "wine.parquet")
    [command] = commands
    assert command[command.index("grid"):] == ["grid", "--task", "wine", "--optimizers", "sgd,ngd,ef", "--out",
                                                str(tmp_path / "wine.parquet")]
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(grid_speed, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert grid_speed.dgemm_rate(size=4, repeats=3) == 2 * 4**3 * 3 / 2.0


def test_run_overhead_bare_loop_takes_the_runners_steps_timed_alike(monkeypatch):
    """scripts/run_overhead.py's bare loop is `natgrad run`'s steps without the runner: one run, each
    step continuing the last, on the runner's batches, after a warm-up, each synchronised. On a clock
    where the first step call ever costs 100, every other 1, a sync 0.5 and cutting a batch 0.25, its
    5 steps take 7.5 plus the cutting, 1.25, in the loop (every training loop cuts its batches), 7.5
    on batches cut beforehand: the runner's step_s for the same 5 steps, whose clock leaves cutting out."""
    from types import SimpleNamespace

    from natgrad_impls import runner
    from natgrad_impls.names import Framework

    run_overhead = _script("run_overhead")
    clock, steps, batches = SimpleNamespace(now=0.0), [], []
    clock.perf_counter = lambda: clock.now

    class Synced(runner._IO[Framework.TORCH]):
        def sync(self, tree):
            super().sync(tree)
            clock.now += 0.5

    class Cut(runner._Batches):
        def next(self):
            clock.now += 0.25
            batches.append(super().next())
            return batches[-1]

    def spied(*args, **kwargs):
        opt = make_optimizer(*args, **kwargs)

        def step(params, state, batch):
            clock.now += 1.0 if steps else 100.0
            out = opt.step(params, state, batch)
            steps.append((params, batch, out[0]))
            return out

        return SimpleNamespace(init=opt.init, step=step)

    monkeypatch.setitem(runner._IO, Framework.TORCH, Synced)
    monkeypatch.setattr(runner, "_Batches", Cut)
    for module in (run_overhead, runner):
        monkeypatch.setattr(module, "time", clock)
        monkeypatch.setattr(module, "make_optimizer", spied)
    case = ("digits-mlp", "sgd", "torch", {"lr": 0.05}, 5)
    assert run_overhead.bare_loop(*case) == 8.75
    assert steps[1][0] is steps[0][2]  # two warm-up steps, chained as the runner's
    bare = steps[2:]
    assert all(params is before for (params, _, _), (_, _, before) in zip(bare[1:], bare))
    assert [batch for _, batch, _ in bare] == batches  # each cut in the loop, in the runner's order
    steps.clear(), batches.clear()
    assert run_overhead.bare_loop(*case, precut=True) == 7.5
    assert [batch for _, batch, _ in steps[2:]] == batches
    labels = [batch[1].tolist() for batch in batches]
    steps.clear(), batches.clear()
    assert runner.run(*case[:3], hyperparameters=case[3], steps=case[4], progress=False).attrs["step_s"] == 7.5
    assert [batch[1].tolist() for _, batch, _ in steps[2:7]] == labels  # after its 2 warm-ups


def test_run_overhead_compares_the_least_disturbed_loops_of_the_same_case(monkeypatch, capsys):
    """overhead = the runner's fastest loop / the bare loop's fastest - 1, both on the case's very task,
    optimizer, framework, hyperparameters and steps; cutting = 1 - the fastest loop on batches cut
    beforehand / the bare loop's fastest. Stand-ins: bare loops of 4, 2 and 3 s, pre-cut loops of 1.9,
    1.5 and 1.8 s, runner loops of 2.5, 3 and 2.2 s: 2.2 / 2 - 1 = 10.0%, 1 - 1.5 / 2 = 25.0%."""
    import pandas as pd

    from natgrad_impls import runner

    run_overhead = _script("run_overhead")
    bare, precut_loops, loops, cases = iter([4.0, 2.0, 3.0]), iter([1.9, 1.5, 1.8]), iter([2.5, 3.0, 2.2]), []

    def run(task, optimizer, framework, hyperparameters=None, steps=None, progress=None):
        cases.append((task, optimizer, framework, hyperparameters, steps))
        frame = pd.DataFrame()
        frame.attrs.update(loop_s=next(loops), step_s=1.0, eval_s=0.2)
        return frame

    def bare_loop(*args, precut=False):
        cases.append(args)
        return next(precut_loops if precut else bare)

    case = ("wine", "ngd", "numpy", {"lr": 1.0, "damping": 1e-4}, 50)
    monkeypatch.setattr(run_overhead, "CASES", [case])
    monkeypatch.setattr(run_overhead, "bare_loop", bare_loop)
    monkeypatch.setattr(runner, "run", run)
    run_overhead.main(["--repeats", "3", "--torch-threads", "0"])
    assert cases == [case] * 9
    out = capsys.readouterr().out
    assert re.search(r"wine ngd numpy\s+50\s+2\.000\s+2\.200\s+10\.0%\s+25\.0%", out), out
    assert "worst overhead: 10.0%" in out
