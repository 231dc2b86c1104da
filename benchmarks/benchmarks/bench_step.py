"""Cost of one optimizer step: ours and the peers', in seconds, peak memory and gradient-equivalents.

Every benchmark times through natgrad_impls.timing (the cost script and the pipeline do too) on the
MLP of `timing.mlp_problem` with the settings of `timing.SETTINGS`, in float32. `setup` builds the
optimizer, compiles (jax.jit, kfac-jax's internal jit) and warms it up (`timing.warm_up`: three full
periods at least), once per parameter set (`built`: asv runs `setup` again before each timed call);
each timed call is one step followed by a device synchronisation. A K-FAC step's cost depends on
where it falls in the inversion period, so every time sample spans `number` = one period (10)
consecutive steps of the same run: the reported time per step includes its share of the inversion.
cuda parameters are skipped (SkipNotImplemented) where the framework sees no GPU.
"""

from __future__ import annotations

import statistics

from natgrad_impls import timing

from .common import (
    DEVICES, DTYPE, FRAMEWORKS, REPEATS, ROUNDS, SETTINGS, SIZES, SkipNotImplemented, built, require_device, warm_up,
)

PERIOD = timing.SETTINGS["kfac"][1]["kfac_update_period"]


def our_step(label, framework, device, size):
    """(call, sync, period) of one step of our optimizer `label` (a `timing.SETTINGS` label), not warmed up."""
    width, batch_size = SIZES[size]
    problem, params, batch = timing.mlp_problem(width, batch_size)
    name, hyperparameters = timing.setting(label)
    return timing.step_call(framework, name, problem, params, batch, device, DTYPE, **hyperparameters)


def peer_step(peer, device, size):
    """(call, sync, period) of one step of `peer` with the hyperparameters of its setting of ours (timing.PEER_OF),
    not warmed up; SkipNotImplemented where the peer does not import (kfac-jax is a test extra)."""
    width, batch_size = SIZES[size]
    problem, params, batch = timing.mlp_problem(width, batch_size)
    _, hyperparameters = timing.setting(timing.PEER_OF[peer])
    try:
        return timing.peer_step_call(peer, problem, params, batch, device, DTYPE, **hyperparameters)
    except ImportError as error:
        raise SkipNotImplemented(f"{peer}: {error}") from None


class Step:
    """Our optimizers: `time_step` is the wall-clock time of one step (loss, gradient, curvature,
    update) after warm-up; `peakmem_step` the peak resident memory of a process that has built the
    optimizer and taken steps (imports included: compare across commits, not across settings)."""

    params = [SETTINGS, FRAMEWORKS, DEVICES, list(SIZES)]
    param_names = ["setting", "framework", "device", "size"]
    number = PERIOD  # one K-FAC inversion period per sample
    repeat = (3, 10, 10.0)  # 3 to 10 samples, stopping after 10 s
    processes = 1  # the suite is large for a 2-core machine; `-a processes=2` for steadier numbers
    warmup_time = 0.0  # setup warms up
    timeout = 600

    def setup(self, setting, framework, device, size):
        require_device(framework, device)
        self.call, self.sync = built(("ours", setting, framework, device, size),
                                     lambda: self.build(setting, framework, device, size))

    @staticmethod
    def build(setting, framework, device, size):
        call, sync, period = our_step(setting, framework, device, size)
        warm_up(call, sync, period)
        return call, sync

    def time_step(self, *params):
        self.sync(self.call())

    def peakmem_step(self, *params):
        self.sync(self.call())


class DeviceMemory:
    """Peak GPU memory of building our optimizer and taking two periods of steps (parameters, batch,
    optimizer state and the step's temporaries), from the framework's allocator
    (timing.peak_device_bytes): unlike `Step.peakmem_step`, which is the host process's resident
    memory, it compares settings with one another. cuda only; skipped without a GPU."""

    params = [SETTINGS, FRAMEWORKS, list(SIZES)]
    param_names = ["setting", "framework", "size"]
    unit = "MiB"
    processes = 1
    timeout = 600

    def setup(self, setting, framework, size):
        if "cuda" not in DEVICES:
            raise SkipNotImplemented("NATGRAD_ASV_DEVICES leaves out cuda")
        require_device(framework, "cuda")

    def track_peak_device_memory(self, setting, framework, size):
        build = lambda: Step.build(setting, framework, "cuda", size)
        return timing.peak_device_bytes(framework, "cuda", build) / 2**20


class PeerStep:
    """The libraries users would otherwise pick, timed exactly as `Step`: torch.optim.SGD/Adam
    (foreach), optax.sgd/adam (one jitted update), kfac-jax's K-FAC Optimizer (fixed lr and
    damping, no momentum, inverses every 10 steps, MC Fisher), with our hyperparameters."""

    params = [list(timing.PEERS), DEVICES, list(SIZES)]
    param_names = ["peer", "device", "size"]
    number = PERIOD
    repeat = (3, 10, 10.0)
    processes = 1
    warmup_time = 0.0
    timeout = 600

    def setup(self, peer, device, size):
        require_device(timing.peer_framework(peer).value, device)
        self.call, self.sync = built(("peer", peer, device, size), lambda: self.build(peer, device, size))

    @staticmethod
    def build(peer, device, size):
        call, sync, period = peer_step(peer, device, size)
        warm_up(call, sync, period)
        return call, sync

    def time_step(self, *params):
        self.sync(self.call())

    def peakmem_step(self, *params):
        self.sync(self.call())


class OverPeer:
    """Our step time over the peer's, both measured in one process, their samples (whole one-period
    blocks) taken in turn (timing.alternating_medians), the median of ROUNDS such ratios: the
    targets are <= 1.2 for sgd and adam over torch.optim and optax, and <= 1 for kfac over
    kfac-jax. A ratio is steadier across machines and load than either time."""

    params = [list(timing.PEERS), DEVICES, list(SIZES)]
    param_names = ["peer", "device", "size"]
    unit = "ours / peer"
    processes = 1
    timeout = 600

    def setup(self, peer, device, size):
        framework = timing.peer_framework(peer).value
        require_device(framework, device)
        self.peer = peer_step(peer, device, size)
        self.ours = our_step(timing.PEER_OF[peer], framework, device, size)

    def track_over_peer(self, *params):
        timed = [timing.Timed(*self.ours), timing.Timed(*self.peer)]
        return statistics.median(ours / peer for ours, peer in
                                 (timing.alternating_medians(timed, REPEATS) for _ in range(ROUNDS)))


class Cost:
    """One step in gradient-equivalents: time(step) / time(one mini-batch loss and gradient) on the
    same model, batch, framework and device (DESIGN 4), via timing.gradient_equivalents, the median
    of ROUNDS measurements (each builds, warms up and samples anew). sgd is
    one gradient and its update (1.0-1.4); ef and ngd-mc should stay under 4 on CPU; kfac (period
    10) cannot reach the target of 3 on the small MLP, whose arithmetic floor is 4.5 (README)."""

    params = [SETTINGS, FRAMEWORKS, DEVICES, list(SIZES)]
    param_names = ["setting", "framework", "device", "size"]
    unit = "gradients"
    processes = 1
    timeout = 600

    def setup(self, setting, framework, device, size):
        require_device(framework, device)

    def track_gradient_equivalents(self, setting, framework, device, size):
        width, batch_size = SIZES[size]
        problem, params, batch = timing.mlp_problem(width, batch_size)
        name, hyperparameters = timing.setting(setting)
        return statistics.median(
            timing.gradient_equivalents(framework, name, problem, params, batch, device, DTYPE, REPEATS,
                                        **hyperparameters)["gradient_equivalents"] for _ in range(ROUNDS))


class TorchOps:
    """Operators one torch step dispatches (views excluded), counted on the CPU, over those of the
    mini-batch gradient (timing.torch_ops). On a GPU a small model's step is bound by kernel
    launches, so this ratio tracks its cost there in gradient-equivalents on any machine, and,
    being a count, without noise: a change that adds kernels to a step shows up here exactly."""

    params = [SETTINGS, list(SIZES)]
    param_names = ["setting", "size"]
    unit = "ops / gradient's"
    processes = 1
    timeout = 600

    def track_ops_over_gradient(self, setting, size):
        width, batch_size = SIZES[size]
        problem, params, batch = timing.mlp_problem(width, batch_size)
        name, hyperparameters = timing.setting(setting)
        return timing.torch_ops(name, problem, params, batch, DTYPE, **hyperparameters)["ops_over_gradient"]
