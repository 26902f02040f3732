"""Low-overhead dispatch of a jit-compiled `fn(batch, state) -> (state, out)`.

`eqx.filter_jit` partitions and recombines its pytree arguments in Python on every call
(`eqx.partition`, `eqx.combine`): for the training state of a small MLP (69 arrays) an
identity function costs 0.51 ms per call that way and 0.26 ms here, on a step of ~1 ms
(`benchmarks/train_step.py`).
Here the state is flattened once per call (`jax.tree.flatten`, a C++ traversal), its
array leaves go through `jax.jit`'s C++ fast path, and its other leaves and structure are
part of the cache key, exactly as `eqx.filter_jit` treats them (non-arrays are static).
"""

import collections
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax


_State = TypeVar("_State")


def _merge(mask: tuple[bool, ...], arrays, static: tuple[Any, ...]) -> list[Any]:
    array_iter, static_iter = iter(arrays), iter(static)
    return [next(array_iter) if is_array else next(static_iter) for is_array in mask]


class StateStepJit:
    """`fn(batch, state) -> (new_state, out)` compiled with `jax.jit`, the array leaves of
    `state` donated. `new_state` must have the structure of `state` (a training step).

    Behaves like `eqx.filter_jit(fn, donate="all-except-first")`: array leaves (JAX or
    NumPy) are traced, every other leaf is static and must be hashable. Each distinct
    structure/static part compiles once (and `jax.jit` recompiles for new shapes).

    With `max_in_flight=n`, a call first waits until the call `n` calls back has
    finished, so that at most `n` dispatched calls run or wait at any time. Needed on
    several CPU devices: XLA:CPU's in-process collectives deadlock when many calls with
    all-reduces are queued at once (seen here with 4 CPU devices on 2 cores within 300
    quick steps; never with at most 2 in flight).
    """

    def __init__(
        self,
        fn: Callable[[Any, _State], tuple[_State, Any]],
        *,
        max_in_flight: int | None = None,
    ):
        self._fn = fn
        self._compiled: dict[Any, Callable] = {}
        self._in_flight = collections.deque() if max_in_flight else None
        self._max_in_flight = max_in_flight

    def _compile(self, treedef, mask, static) -> Callable:
        fn = self._fn

        def flat_step(batch, arrays):
            state = jax.tree.unflatten(treedef, _merge(mask, arrays, static))
            new_state, out = fn(batch, state)
            new_leaves, new_treedef = jax.tree.flatten(new_state)
            if new_treedef != treedef:
                raise ValueError(
                    "The step must return a state of the structure it was given; got "
                    f"{new_treedef} for {treedef}."
                )
            return [x for x, is_array in zip(new_leaves, mask) if is_array], out

        return jax.jit(flat_step, donate_argnums=1)

    def __call__(self, batch, state: _State) -> tuple[_State, Any]:
        leaves, treedef = jax.tree.flatten(state)
        mask = tuple(eqx.is_array(x) for x in leaves)
        static = tuple(x for x, is_array in zip(leaves, mask) if not is_array)
        cache_key = (treedef, mask, static)
        compiled = self._compiled.get(cache_key)
        if compiled is None:
            compiled = self._compiled[cache_key] = self._compile(treedef, mask, static)
        arrays = [x for x, is_array in zip(leaves, mask) if is_array]
        limit = self._max_in_flight
        if self._in_flight is not None and limit is not None and len(self._in_flight) >= limit:
            jax.block_until_ready(self._in_flight.popleft())
        new_arrays, out = compiled(batch, arrays)
        if self._in_flight is not None:
            self._in_flight.append(out)
        return jax.tree.unflatten(treedef, _merge(mask, new_arrays, static)), out
