"""Wall-clock cost of one optimizer step and of one mini-batch gradient (DESIGN 4: "Time").

Both are timed the same way: built and warmed up (jit compilation, allocator) first, then each call
synchronised (torch.cuda.synchronize, jax block_until_ready) and the median of `repeats` taken.
Cost in gradient-equivalents = time(step) / time(gradient) on the same task, framework, device.
The asv suite, the cost script and the pipeline's timing rules all time through here.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from natgrad_impls import make_optimizer
from natgrad_impls.models import Problem
from natgrad_impls.names import Device, DType, Framework, parse


def _framework_io(framework: Framework, device: Device, dtype: DType):
    """(to params, to batch, synchronise) for a framework on a device."""
    if framework == Framework.TORCH:
        import torch

        import natgrad_impls.torch as nt

        torch_dtype = getattr(torch, dtype.value)

        def batch(x, y):
            y = torch.as_tensor(y, device=device.value)
            return torch.as_tensor(x, dtype=torch_dtype, device=device.value), (y.to(torch_dtype) if y.is_floating_point() else y)

        sync = torch.cuda.synchronize if device == Device.CUDA else (lambda *_: None)
        return (lambda p: nt.to_torch(p, device.value, torch_dtype)), batch, (lambda out: sync())
    if framework == Framework.JAX:
        import jax
        import jax.numpy as jnp

        import natgrad_impls.jax as nj

        jax_device = jax.devices("gpu" if device == Device.CUDA else "cpu")[0]
        jax_dtype = getattr(jnp, dtype.value)
        put = lambda a, t=None: jax.device_put(jnp.asarray(a, dtype=t), jax_device)

        def batch(x, y):
            return put(x, jax_dtype), put(y, jax_dtype if np.issubdtype(np.asarray(y).dtype, np.floating) else None)

        return (lambda p: {k: put(v, jax_dtype) for k, v in p.items()}), batch, jax.block_until_ready
    if device != Device.CPU or dtype != DType.FLOAT64:
        raise ValueError("framework: numpy runs on cpu in float64 only")
    return (lambda p: {k: np.asarray(v, np.float64) for k, v in p.items()}), (lambda x, y: (x, y)), (lambda out: None)


def median_seconds(call: Callable[[], object], sync: Callable[[object], None], repeats: int, block: int = 1,
                   warmup: int = 2) -> float:
    """Median over `repeats` samples of the mean time of `block` consecutive calls. A block of one
    K-FAC update period charges each step its share of the periodic inversion."""
    for _ in range(warmup * block):
        sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(block):
            out = call()
        sync(out)
        times.append((time.perf_counter() - start) / block)
    return statistics.median(times)


def step_call(framework, optimizer, problem: Problem, params, batch, device="cpu", dtype="float32", **hyperparameters):
    """A zero-argument callable that performs one optimizer step (carrying its state along), the
    matching sync, and the number of steps over which the step's cost repeats (K-FAC's period).
    Steps keep updating the same run, as in training."""
    framework, device, dtype = parse(Framework, framework, "framework"), parse(Device, device, "device"), parse(DType, dtype, "dtype")
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    opt = make_optimizer(framework, optimizer, problem, **hyperparameters)
    carry = {"params": to_params(params)}
    carry["state"] = opt.init(carry["params"])
    data = to_batch(*batch)

    def call():
        carry["params"], carry["state"], info = opt.step(carry["params"], carry["state"], data)
        return carry["params"]

    return call, sync, getattr(opt.hyperparameters, "kfac_update_period", 1)


def gradient_call(framework, problem: Problem, params, batch, device="cpu", dtype="float32"):
    """A zero-argument callable computing one mini-batch loss and gradient: the unit of cost."""
    framework, device, dtype = parse(Framework, framework, "framework"), parse(Device, device, "device"), parse(DType, dtype, "dtype")
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    p, data = to_params(params), to_batch(*batch)
    if framework == Framework.TORCH:
        import torch

        import natgrad_impls.torch as nt

        grad = torch.func.grad_and_value(lambda q: nt.loss(problem, q, data))
        return (lambda: grad(p)), sync
    if framework == Framework.JAX:
        import jax

        import natgrad_impls.jax as nj

        grad = jax.jit(jax.value_and_grad(lambda q, b: nj.loss(problem, q, b)))
        return (lambda: grad(p, data)), sync
    import natgrad_impls.numpy as nn

    return (lambda: nn.gradient(problem, p, data)), sync


def gradient_equivalents(framework, optimizer, problem, params, batch, device="cpu", dtype="float32", repeats=20,
                         **hyperparameters) -> dict:
    """Median step time, median gradient time and their ratio, measured in the same process."""
    step, sync, period = step_call(framework, optimizer, problem, params, batch, device, dtype, **hyperparameters)
    grad, _ = gradient_call(framework, problem, params, batch, device, dtype)
    step_s = median_seconds(step, sync, repeats, block=period)
    grad_s = median_seconds(grad, sync, repeats)
    return {"step_s": step_s, "gradient_s": grad_s, "gradient_equivalents": step_s / grad_s}


PEERS = ("torch.optim.SGD", "torch.optim.Adam", "optax.sgd", "optax.adam")


def peer_step_call(peer: str, problem: Problem, params, batch, device="cpu", dtype="float32", **hyperparameters):
    """One training step (loss, gradient, update) of a library users would otherwise pick, on the
    same parameters and batch as `step_call`: torch.optim (foreach) or optax (jitted)."""
    if peer not in PEERS:
        raise ValueError(f"peer: {peer!r} is not one of {', '.join(PEERS)}")
    framework = Framework.TORCH if peer.startswith("torch") else Framework.JAX
    device, dtype = parse(Device, device, "device"), parse(DType, dtype, "dtype")
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    data = to_batch(*batch)
    if framework == Framework.TORCH:
        import torch

        import natgrad_impls.torch as nt

        leaves = {k: v.requires_grad_() for k, v in to_params(params).items()}
        make = torch.optim.SGD if peer.endswith("SGD") else torch.optim.Adam
        opt = make(list(leaves.values()), foreach=True, **_torch_names(hyperparameters))

        def call():
            opt.zero_grad(set_to_none=True)
            nt.loss(problem, leaves, data).backward()
            opt.step()
            return leaves

        return call, sync
    import jax
    import optax

    import natgrad_impls.jax as nj

    transform = optax.sgd(**hyperparameters) if peer.endswith("sgd") else optax.adam(**hyperparameters)

    @jax.jit
    def update(p, state, b):
        grads = jax.grad(lambda q: nj.loss(problem, q, b))(p)
        updates, state = transform.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    carry = {"params": to_params(params)}
    carry["state"] = transform.init(carry["params"])

    def call():
        carry["params"], carry["state"] = update(carry["params"], carry["state"], data)
        return carry["params"]

    return call, sync


def _torch_names(hyperparameters: dict) -> dict:
    """Our Adam names (b1, b2) in torch.optim's (betas)."""
    out = dict(hyperparameters)
    if "b1" in out or "b2" in out:
        out["betas"] = (out.pop("b1", 0.9), out.pop("b2", 0.999))
    return out
