"""kfac-jax, the K-FAC peer (`timing.kfac_jax_step_call`) and an independent reference of the tests,
made to import and run on the jax at hand: `import_kfac_jax()`.

kfac-jax 0.0.8, its newest release, trails jax. Three shims, each applied only where this jax lacks
what kfac-jax calls, so that on the pinned jax (0.10) the first two do nothing:
- jax 0.11 removed names from `jax.core` that kfac-jax imports at module level (`_MOVED`); they
  live on in `jax.extend.core`, and are put back from there;
- jax 0.11 merged ClosedJaxpr into Jaxpr, which still takes the legacy positional
  ClosedJaxpr(jaxpr, consts) but not kfac-jax's keywords (`_KeywordClosedJaxpr`);
- since jax 0.10 `get_bind_params` returns the params alone, which kfac-jax's `eval_jaxpr_eqn`
  unpacks as a pair (`eval_jaxpr_eqn`, installed over it).
The peer's agreement with our K-FAC step (tests/test_benchmarks.py) is what shows that kfac-jax
still does its work through them.
"""

from __future__ import annotations

import importlib.util
import warnings

# What kfac-jax 0.0.8 takes from jax.core that jax 0.11 moved to jax.extend.core alone.
# (Var and Literal left jax.core before 0.10; kfac-jax takes them from jax.extend.core.)
_MOVED = ("Effects", "no_effects", "DebugInfo", "DropVar", "gensym", "new_jaxpr_eqn")


def import_kfac_jax():
    """The kfac_jax module, shimmed for this jax. ImportError where it is not installed, or where it
    still does not import (the error says which jax, and what broke), so that callers skip the peer
    as they do where kfac-jax is missing."""
    if importlib.util.find_spec("kfac_jax") is None:
        raise ImportError("No module named 'kfac_jax' (a test extra: pip install -e '.[test]')")
    import jax
    import jax.core
    import jax.extend.core

    try:
        restore_moved_names(jax.core, jax.extend.core)
        accept_keyword_closed_jaxpr(jax.extend.core)
        import kfac_jax
        from kfac_jax._src import tag_graph_matcher
    except Exception as error:  # an AttributeError, typically: a name that a newer jax removed
        raise ImportError(f"kfac-jax does not import on jax {jax.__version__}: {type(error).__name__}: {error}") from error
    tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
    return kfac_jax


def restore_moved_names(core, extend_core) -> list[str]:
    """Set the names of `_MOVED` that `core` lacks from `extend_core`; returns those it set. A name
    `core` still has, deprecated (jax 0.10), is left alone."""
    restored = []
    for name in _MOVED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            present = hasattr(core, name)
        if not present and hasattr(extend_core, name):
            setattr(core, name, getattr(extend_core, name))
            restored.append(name)
    return restored


def accept_keyword_closed_jaxpr(extend_core) -> bool:
    """Where `extend_core.ClosedJaxpr` is Jaxpr itself (jax 0.11), replace it by a stand-in that
    takes kfac-jax's ClosedJaxpr(jaxpr=..., consts=...), builds a Jaxpr by the legacy positional
    form and is Jaxpr to isinstance. Returns whether it replaced it (idempotent)."""
    if extend_core.ClosedJaxpr is not extend_core.Jaxpr:
        return False
    extend_core.ClosedJaxpr = _keyword_closed_jaxpr(extend_core.Jaxpr)
    return True


def _keyword_closed_jaxpr(jaxpr_type: type) -> type:
    class _KeywordClosedJaxpr(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, jaxpr_type)

        def __call__(cls, jaxpr, consts=()):
            return jaxpr_type(jaxpr, consts=list(consts))

    class ClosedJaxpr(metaclass=_KeywordClosedJaxpr):
        """A Jaxpr with its consts, built by the pre-0.11 keyword signature."""

    return ClosedJaxpr


def eval_jaxpr_eqn(eqn, in_values):
    """kfac-jax 0.0.8's tag_graph_matcher.eval_jaxpr_eqn unpacks `subfuns, params =
    primitive.get_bind_params(params)`; since jax 0.10 get_bind_params returns the params alone
    ("too many values to unpack"). This one takes both conventions."""
    import jax.extend as jex

    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, bind_params = ((), bound) if isinstance(bound, dict) else bound
    with jex.source_info_util.user_context(eqn.source_info.traceback):
        output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
    return output if isinstance(output, list) else [output]
