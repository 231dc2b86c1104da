"""JAX implementations: `natgrad_impls.jax.<optimizer>(problem, **hyperparameters)`."""

import jax

# Without x64, JAX silently stores float64 arrays as float32; the float64 runs (the Kunstner protocol
# and the cross-framework parity checks, DESIGN 4) need real doubles. float32 runs are unaffected:
# their dtype comes from the params and data, not from the default.
jax.config.update("jax_enable_x64", True)
# float32 means float32: on Ampere and newer GPUs XLA otherwise runs float32 matmuls and convolutions
# in TF32 (about 1e-3 relative): on an H100, 20 float32 steps of sgd, adam or kfac on a small CNN then
# ended 1e-4 to 1e-2 away from the CPU run, where torch's GPU run (full float32 matmuls by default) and
# this setting stay within 1e-6.
jax.config.update("jax_default_matmul_precision", "highest")


def _one_thread_for_scipy_openblas() -> None:
    """jaxlib's CPU LAPACK kernels (the Cholesky and triangular solves of the Woodbury and K-FAC
    inverses) call the OpenBLAS that SciPy's wheel bundles. Multi-threaded, its threads and XLA's
    own pool compete for the same cores: on 2 cores the ef step on the 784-1000-10 MLP at batch 512
    took 64 ms instead of 37 (the 512 x 512 Cholesky alone 20 ms instead of 2). Only that library is
    limited (the wheel's scipy.libs/ copy); NumPy's OpenBLAS and torch's threads are separate and keep
    theirs. Where one OpenBLAS serves both (conda-forge builds) nothing is changed."""
    from pathlib import Path

    import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, so that threadpoolctl sees it)
    from threadpoolctl import ThreadpoolController

    for library in ThreadpoolController().lib_controllers:
        if library.internal_api == "openblas" and Path(library.filepath).parent.name == "scipy.libs":
            library.set_num_threads(1)


_one_thread_for_scipy_openblas()

from natgrad_impls.jax.model import jax_device, loss, output, to_jax  # noqa: E402
from natgrad_impls.jax.optimizers import FunctionalOptimizer, adam, ef, kfac, ngd, sgd  # noqa: E402
from natgrad_impls.names import Optimizer  # noqa: E402

OPTIMIZERS = {Optimizer.SGD: sgd, Optimizer.ADAM: adam, Optimizer.EF: ef, Optimizer.NGD: ngd, Optimizer.KFAC: kfac}

__all__ = ["OPTIMIZERS", "FunctionalOptimizer", "adam", "ef", "jax_device", "kfac", "loss", "ngd", "output", "sgd",
           "to_jax"]
