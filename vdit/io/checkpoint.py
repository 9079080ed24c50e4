"""The one checkpoint module: orbax, TrainState plus JSON metadata (data iterator, config), and
param-only checkpoints (`vdit export --to params`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `directory`; saves asynchronously."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Queue a save; arrays are copied off the device before this returns."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any | None, step: int | None = None, log=None) -> tuple[Any, dict]:
        """Restore into the structure, shapes and shardings of `target` (arrays or abstract);
        `target` None: the saved tree as nested dicts of numpy arrays (`restore_raw`).

        Without `step`, the newest checkpoint that reads back whole: a truncated or corrupt one
        is reported (through `log`), moved aside to `corrupt-STEP` and the next older is used."""
        if step is not None:
            if step not in self.all_steps():
                raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; "
                                        f"steps there: {self.all_steps() or 'none'}")
            return self._restore(target, step)
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                return self._restore(target, candidate)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                if "tree structures do not match" in str(e):
                    raise  # a checkpoint of another model or code version, not a damaged one
                bad = self.directory / str(candidate)
                aside = self.directory / f"corrupt-{candidate}"
                if bad.exists():
                    bad.rename(aside)
                self.manager.reload()
                message = (f"checkpoint step {candidate} in {self.directory} cannot be read "
                           f"({type(e).__name__}: {str(e)[:200]}); moved to {aside.name}, "
                           "trying the previous one")
                (log or print)(message)
        raise FileNotFoundError(f"no readable checkpoint in {self.directory}")

    def _restore(self, target: Any | None, step: int) -> tuple[Any, dict]:
        if target is None:
            out = self._restore_into(self._one_device_target(step), step)
            return jax.device_get(out["state"]), dict(out["meta"])
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = self._restore_into(abstract, step)
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            # Asynchronous saves drop empty dicts (the parameter-free autoencoder's
            # stats["autoencoder"] = {}); they hold no arrays, so restore without them and
            # put the arrays back into the full structure.
            out = self._restore_into(_drop_empty(abstract), step)
            state = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(out["state"]))
            return state, dict(out["meta"])
        return out["state"], dict(out["meta"])

    def _restore_into(self, abstract: Any, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))

    def restore_raw(self, step: int | None = None) -> tuple[dict, dict]:
        """The saved state as nested dicts of numpy arrays, without a target structure."""
        if self.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.restore(None, step)

    def _one_device_target(self, step: int) -> Any:
        """The saved arrays' shapes and dtypes, placed on this process's first device: a
        checkpoint written by many devices or hosts reads back whole on one (orbax refuses a
        target-less restore on another topology)."""
        reader = ocp.CheckpointManager(self.directory, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        saved = reader.item_metadata(step)["state"]
        reader.close()
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)

    def abandon(self) -> None:
        """After a failed save: drop unfinished temporary directories (orbax never promotes them
        to a step), so only complete checkpoints remain."""
        import contextlib
        import shutil

        # The failure that brought us here may resurface on close.
        with contextlib.suppress(Exception):
            self.manager.close()
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _drop_empty(tree: Any) -> Any:
    """`tree` without empty dicts (inside dicts and dataclass fields); the leaves are unchanged."""
    import dataclasses

    if isinstance(tree, dict):
        return {k: _drop_empty(v) for k, v in tree.items() if not (isinstance(v, dict) and not v)}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return tree.replace(**{f.name: _drop_empty(getattr(tree, f.name))
                               for f in dataclasses.fields(tree)})
    return tree


PARAMS_MARKER = "vdit-params.json"  # names a param-only checkpoint folder


def save_params(directory: str | Path, tensors: dict, info: dict) -> Path:
    """A param-only checkpoint ({"params", "stats"} + JSON info) restorable on one host.

    Written from numpy arrays, so a checkpoint sharded over many hosts and restored whole on
    one (`restore_raw`) is consolidated here."""
    import json

    directory = Path(directory).absolute()
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    step = int(info.get("step", 0))
    if step in ckpt.all_steps():  # an export written over (`vdit export --overwrite`)
        ckpt.manager.delete(step)
    ckpt.save(step, tensors, info)
    ckpt.close()
    (directory / PARAMS_MARKER).write_text(json.dumps(info, indent=2))
    return directory


def is_params_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / PARAMS_MARKER).is_file()


def load_params(directory: str | Path) -> tuple[dict, dict]:
    """(tensors {"params", "stats"} as numpy, info) of a `save_params` folder."""
    ckpt = Checkpointer(directory, async_save=False)
    tensors, info = ckpt.restore_raw()
    ckpt.close()
    return tensors, info
