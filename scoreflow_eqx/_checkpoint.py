"""Checkpoints with orbax's `CheckpointManager`: named pytrees of arrays stored keyed by
their tree paths, a JSON record, the grain iterator state, and checksums of every array
verified on restore; keep-last-N, and fallback to an older checkpoint when the latest
cannot be read or fails its checksums."""

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jaxtyping import PyTree


RECORD_ITEM = "record"
CHECKSUM_ITEM = "checksums"
DATA_ITEM = "data"
#: The JSON record's item in checkpoints of the first layout (leaf lists).
OLD_CONFIG_ITEM = "config"


class CheckpointMismatchError(ValueError):
    """A checkpoint holds other arrays than the structure it is restored into."""


def flatten_by_path(tree: PyTree) -> dict[str, Any]:
    """`{jax.tree_util.keystr(path): leaf}` for every leaf of `tree` (`None`s dropped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def unflatten_by_path(template: PyTree, flat: dict[str, Any], *, where: str) -> PyTree:
    """The tree of `template` with its leaves looked up by path in `flat`; a missing or
    an unexpected path is a `CheckpointMismatchError` naming them."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in paths]
    missing, extra = sorted(set(keys) - set(flat)), sorted(set(flat) - set(keys))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{where} does not match the structure it is restored into: missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}. It was written for another "
            "model or optimizer."
        )
    return jax.tree.unflatten(treedef, [flat[k] for k in keys])


def _array_bytes(x) -> bytes:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def checksums(flat: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of the bytes of every array of a flattened item."""
    return {k: hashlib.sha256(_array_bytes(v)).hexdigest() for k, v in flat.items()}


def abstract_like(tree, sharding: jax.sharding.Sharding | None = None):
    """`jax.ShapeDtypeStruct`s (with `sharding`) for every array leaf of `tree`."""

    def leaf(x):
        s: Any = ocp.utils.to_shape_dtype_struct(x)
        if sharding is not None:
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
        return s

    return jax.tree.map(leaf, tree)


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: `items` (the requested pytrees), `step`, and `record` (its
    JSON record, or `None`)."""

    items: dict[str, PyTree]
    step: int
    record: dict | None


def _same_array_type(stored, abstract) -> bool:
    if tuple(stored.shape) != tuple(abstract.shape):
        return False
    dtype = getattr(stored, "dtype", None)
    if dtype is None or jnp.issubdtype(abstract.dtype, jax.dtypes.prng_key):
        return True
    return np.dtype(dtype) == np.dtype(abstract.dtype)


class _ChecksumError(RuntimeError):
    pass


def _record_checksum(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager` for training runs.

    A checkpoint holds named pytrees of arrays (each stored as a dict keyed by the
    leaves' tree paths, so an added or reordered field can never load the wrong
    arrays), their SHA-256 checksums (verified on restore), a JSON `record` and,
    optionally, the state of a grain iterator. Saves are asynchronous; use it as a
    context manager (or call `close()`) so pending saves finish.

    **Arguments:**

    - `directory`: where checkpoints live (created if needed).
    - `max_to_keep`: keep only the last N checkpoints.
    - `enable_async`: save in a background thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        enable_async: bool = True,
    ):
        if not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(f"`max_to_keep` must be a positive integer, got {max_to_keep!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=enable_async,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Wait for pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        items: dict[str, PyTree],
        *,
        data_iterator: grain.DatasetIterator | None = None,
        record: dict | None = None,
    ) -> None:
        """Save the pytrees `items` (name -> pytree of arrays; the arrays must not be
        donated or changed until the save finishes), the JSON `record` and the iterator
        state at `step`."""
        reserved = {RECORD_ITEM, CHECKSUM_ITEM, DATA_ITEM} & set(items)
        if reserved:
            raise ValueError(f"Item names {sorted(reserved)} are reserved.")
        flat = {name: flatten_by_path(tree) for name, tree in items.items()}
        # orbax refuses empty items (e.g. the state of a stateless optimizer): their
        # (empty) checksums record them.
        args: dict[str, Any] = {n: ocp.args.StandardSave(f) for n, f in flat.items() if f}
        sums: dict[str, Any] = {n: checksums(f) for n, f in flat.items()}
        sums[RECORD_ITEM] = _record_checksum(record or {})
        args[CHECKSUM_ITEM] = ocp.args.JsonSave(sums)
        args[RECORD_ITEM] = ocp.args.JsonSave(record or {})
        if data_iterator is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def _item_tree(self, step: int, name: str):
        # The metadata tree (leaves: `ArrayMetadata` with `.shape`) of an array item, or
        # None when the checkpoint has no such item.
        path = epath.Path(self.directory) / str(step) / name
        if not path.exists():
            return None
        return ocp.StandardCheckpointHandler().metadata(path).tree

    def as_stored(self, step: int, name: str, template: PyTree) -> PyTree:
        """`template` (of `jax.ShapeDtypeStruct`s) with the floating-point dtypes that the
        checkpoint stores for item `name`: a model saved in float32 then loads as float32
        also under `jax_enable_x64` (whose templates are float64), and vice versa."""
        stored = self._item_tree(step, name) if self.layout(step) == "paths" else None
        if stored is None:
            return template
        stored = dict(stored)

        def leaf(path, x):
            meta = stored.get(jax.tree_util.keystr(path))
            dtype = getattr(meta, "dtype", None)
            if dtype is None or not (
                jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)
            ):
                return x
            return jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding)

        return jax.tree_util.tree_map_with_path(leaf, template)

    def layout(self, step: int) -> str:
        """`"paths"` (this layout) or `"leaf-lists"` (the first layout of the package,
        which stored every pytree as a list of leaves and its record as `config`)."""
        try:
            tree = self._item_tree(step, "params")
        except Exception:  # noqa: BLE001 - unreadable: restoring it will fail and say why
            return "paths"
        return "leaf-lists" if isinstance(tree, list | tuple) else "paths"

    def restore(
        self,
        templates: dict[str, PyTree],
        *,
        data_iterator: grain.DatasetIterator | None = None,
        step: int | None = None,
        quarantine: bool = False,
    ) -> Restored | None:
        """Restore the items named in `templates` (pytrees of `jax.ShapeDtypeStruct`,
        with `sharding` for placement) and, if given, the state of `data_iterator` (in
        place).

        With `step=None`, the latest checkpoint is tried first; if it cannot be read or
        fails its checksums, a warning is issued and the previous one is tried, and so
        on. Returns a [`scoreflow_eqx._checkpoint.Restored`][], or `None` when there is
        no checkpoint. A checkpoint holding other arrays than `templates` raises a
        `CheckpointMismatchError` (no fallback: it was written for another model).

        With `quarantine=True` (used when training resumes), unreadable checkpoints
        newer than the restored one are renamed to `corrupted-step-N` (kept for
        inspection, no longer seen as checkpoints) so that the run can write those steps
        again.
        """
        steps = self.all_steps() if step is None else [step]
        if not steps:
            return None
        errors, failed = [], []
        for s in reversed(steps):
            try:
                restored = self.restore_step(s, templates, data_iterator=data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                older = [t for t in steps if t < s]
                where = f"falling back to step {older[-1]}" if older else "none is left"
                warnings.warn(
                    f"Checkpoint at step {s} in {self.directory} could not be restored "
                    f"({type(e).__name__}: {str(e)[:300]}); {where}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                failed.append(s)
                continue
            if quarantine and failed:
                self._quarantine(failed)
            return restored
        raise RuntimeError(
            f"No checkpoint in {self.directory} could be restored:\n" + "\n".join(errors)
        )

    def _quarantine(self, steps: list[int]) -> None:
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst = os.path.join(self.directory, f"corrupted-step-{s}")
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                os.rename(src, dst)
        self._manager.reload()

    def _check_paths(self, step: int, templates: dict[str, PyTree]) -> dict[str, dict]:
        if self.layout(step) != "paths":
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self.directory} was written by an older "
                "version of scoreflow_eqx (arrays stored as lists of leaves): it cannot be "
                "resumed from; `sf.load_flow` still loads its model."
            )
        abstract = {}
        for name, template in templates.items():
            if not flatten_by_path(template):
                continue  # an empty item: nothing stored
            stored = self._item_tree(step, name)
            if stored is None:
                raise CheckpointMismatchError(f"The checkpoint at step {step} has no {name!r}.")
            flat = flatten_by_path(template)
            unflatten_by_path(template, dict(stored), where=f"{name!r} at step {step}")
            bad = [k for k, x in flat.items() if not _same_array_type(stored[k], x)]
            if bad:
                k = bad[0]
                raise CheckpointMismatchError(
                    f"{name!r} at step {step} holds arrays of other shapes or dtypes than the "
                    f"structure it is restored into, e.g. {k}: {tuple(stored[k].shape)} "
                    f"{stored[k].dtype} vs {tuple(flat[k].shape)} {flat[k].dtype}. It was "
                    "written for another model."
                )
            abstract[name] = flat
        return abstract

    def restore_step(
        self,
        step: int,
        templates: dict[str, PyTree],
        *,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> Restored:
        """Restore the checkpoint at `step` (no fallback): a `CheckpointMismatchError`
        if it holds other arrays than `templates`, another exception if it cannot be read
        or fails its checksums."""
        abstract = self._check_paths(step, templates)
        args: dict[str, Any] = {n: ocp.args.StandardRestore(a) for n, a in abstract.items()}
        args[CHECKSUM_ITEM] = ocp.args.JsonRestore()
        args[RECORD_ITEM] = ocp.args.JsonRestore()
        if data_iterator is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        expected = restored[CHECKSUM_ITEM]
        values = {n: restored[n] if n in abstract else {} for n in templates}
        for name in templates:
            got = checksums(values[name])
            if got != expected.get(name):
                bad = [k for k, v in got.items() if expected.get(name, {}).get(k) != v]
                raise _ChecksumError(f"{name!r} fails its checksums (e.g. {bad[:3]})")
        if _record_checksum(restored[RECORD_ITEM]) != expected.get(RECORD_ITEM):
            raise _ChecksumError("the run record fails its checksum")
        items = {
            n: unflatten_by_path(t, values[n], where=f"{n!r} at step {step}")
            for n, t in templates.items()
        }
        return Restored(items=items, step=step, record=restored[RECORD_ITEM])

    def read_record(self, step: int) -> dict | None:
        """The JSON record of the checkpoint at `step`, verified against its checksum
        (the unverified `config` of the older layout), or `None`."""
        if self.layout(step) != "paths":
            args = ocp.args.Composite(**{OLD_CONFIG_ITEM: ocp.args.JsonRestore()})
            return self._manager.restore(step, args=args)[OLD_CONFIG_ITEM]
        args = ocp.args.Composite(
            **{RECORD_ITEM: ocp.args.JsonRestore(), CHECKSUM_ITEM: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        record = restored[RECORD_ITEM]
        if _record_checksum(record) != restored[CHECKSUM_ITEM].get(RECORD_ITEM):
            raise _ChecksumError(f"The run record at step {step} fails its checksum.")
        return record

    def restore_leaf_list(self, step: int, name: str, template: PyTree) -> PyTree:
        """Restore item `name` of an older-layout checkpoint (a list of leaves) into the
        structure of `template`, refusing it unless the number, shapes and dtypes of
        the leaves agree."""
        leaves, treedef = jax.tree.flatten(template)
        stored = self._item_tree(step, name) or []
        shapes = [tuple(m.shape) for m in stored]
        wanted = [tuple(x.shape) for x in leaves]
        if shapes != wanted:
            raise CheckpointMismatchError(
                f"{name!r} of the older-layout checkpoint at step {step} holds "
                f"{len(shapes)} arrays that do not match this model's {len(wanted)} "
                "(in number or shape)."
            )
        args = ocp.args.Composite(**{name: ocp.args.StandardRestore(list(abstract_like(leaves)))})
        values = self._manager.restore(step, args=args)[name]
        return jax.tree.unflatten(treedef, list(values))
