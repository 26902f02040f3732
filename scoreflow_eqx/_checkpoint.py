"""Training checkpoints with orbax's `CheckpointManager` (parameters, EMA, optimizer
state, step, key, grain iterator state and the config), with keep-last-N, automatic
resume, and fallback to an older checkpoint when the latest cannot be read."""

import os
import shutil
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


#: The array items of a training checkpoint (each restorable on its own).
STATE_ITEMS: tuple[str, ...] = ("params", "ema_params", "opt_state", "meta")


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager` for training runs.

    Each checkpoint holds the items `params`, `ema_params`, `opt_state`, `meta` (step,
    key, ...), optionally `data` (a grain iterator, through
    `grain.checkpoint.CheckpointSave`) and `config` (JSON). Saves are asynchronous; use
    it as a context manager (or call `close()`) so pending saves finish.

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
        if max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be >= 1, got {max_to_keep!r}.")
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
        state: dict[str, Any],
        *,
        data_iterator: grain.DatasetIterator | None = None,
        config: dict | None = None,
    ) -> None:
        """Save `state` (a dict with the keys of `STATE_ITEMS`, array pytrees) at
        `step`."""
        missing = set(STATE_ITEMS) - set(state)
        if missing:
            raise ValueError(f"`state` lacks the items {sorted(missing)}.")
        items = {name: ocp.args.StandardSave(state[name]) for name in STATE_ITEMS}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self,
        abstract_state: dict[str, Any],
        *,
        data_iterator: grain.DatasetIterator | None = None,
        step: int | None = None,
        quarantine: bool = False,
    ) -> tuple[dict[str, Any], int] | None:
        """Restore the items named in `abstract_state` (pytrees of
        `jax.ShapeDtypeStruct`, with `sharding` for placement) and, if given, the state
        of `data_iterator` (in place).

        With `step=None`, the latest checkpoint is tried first; if it cannot be read
        (corrupted or incomplete), a warning is issued and the previous one is tried,
        and so on. Returns `(state, step)`, or `None` when there is no checkpoint.

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
                restored = self._restore_step(s, abstract_state, data_iterator)
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
            return restored, s
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

    def _restore_step(self, step, abstract_state, data_iterator):
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_state.items()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] for name in abstract_state}

    def restore_config(self, step: int | None = None) -> dict | None:
        """The JSON config saved with a checkpoint (latest by default), or `None`."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]


def abstract_like(tree, sharding: jax.sharding.Sharding | None = None):
    """`jax.ShapeDtypeStruct`s (with `sharding`) for every array leaf of `tree`."""

    def leaf(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        if sharding is not None:
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
        return s

    return jax.tree.map(leaf, tree)
