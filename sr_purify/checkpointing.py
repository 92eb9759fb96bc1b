"""Orbax checkpoints that are verified on restore and fall back to the last good step.

Orbax does not checksum array data (flipped bytes restore silently), so every step stores a
SHA-256 digest of the state beside it as a JSON item; restore recomputes it and, on a mismatch or
a missing or unreadable file (`is_damage`), falls back to the previous step. Any other error
(permissions, memory, a version mismatch) is raised as it is: retrying an older step would hide
it, and renaming good checkpoints aside would lose them. Saves are asynchronous and atomic (a
crash mid-save leaves a tmp folder that orbax ignores).
"""

import hashlib
import json
import logging
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from sr_purify import paths, sharding


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the state the config builds."""


class NoValidCheckpointError(ValueError):
    """Checkpoints exist but every one is damaged; `steps` names them."""

    def __init__(self, message: str, steps=()):
        super().__init__(message)
        self.steps = list(steps)


# How tensorstore (under orbax) reports a file that is missing, truncated or garbled: a
# ValueError starting with one of these status codes, or, for bytes that fail to decode, with no
# code but these words. Found by deleting, truncating and flipping bytes in saved steps.
_DAMAGE_CODES = ('NOT_FOUND', 'DATA_LOSS', 'OUT_OF_RANGE', 'FAILED_PRECONDITION')
_DAMAGE_WORDS = ('Error decoding', 'Data corruption')


def is_damage(error: BaseException) -> bool:
    """True when `error` says a step's files are missing or damaged, not that reading failed.

    Damage: a missing file (FileNotFoundError; a missing item folder is orbax's KeyError 'was not
    found in the checkpoint'), metadata that is not JSON (json.JSONDecodeError) and tensorstore's
    errors for missing, truncated or corrupt array files. Orbax wraps the tensorstore error of
    an array read in a plain Exception, so the explicit causes (`raise ... from`) are searched
    too; implicit contexts are not, since an error raised while handling another is its own.
    """
    while error is not None:
        message = str(error)
        if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
            return True
        if isinstance(error, KeyError) and 'was not found in the checkpoint' in message:
            return True
        if isinstance(error, ValueError) and (
            message.startswith(_DAMAGE_CODES) or any(w in message for w in _DAMAGE_WORDS)
        ):
            return True
        error = error.__cause__
    return False


def _path_str(path) -> str:
    """'params/head/kernel', the same for dict keys, dataclass fields and sequence indices."""
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def digest(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in path order.

    Paths are normalised (see `_path_str`) and sorted, so a state restored without a target (as
    nested dicts) has the same digest as the dataclass it was saved from.
    """
    leaves = sorted(
        (_path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    )
    h = hashlib.sha256()
    for path, leaf in leaves:
        # As restore returns it: without x64, orbax restores float64/int64 as float32/int32, and
        # hashing the wider saved bytes would call every such checkpoint damaged.
        x = sharding.to_host(leaf)
        x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
        h.update(path.encode())
        h.update(f'{x.dtype}{x.shape}'.encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _leaf_shapes(tree: Any) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, 'shape', None)
        out[_path_str(path)] = None if shape is None else tuple(shape)
    return out


def check_compatible(saved: Any, expected: Any, where: str) -> None:
    """Raises CheckpointMismatchError naming the first differing parameter (missing/extra/shape)."""
    saved_shapes, expected_shapes = _leaf_shapes(saved), _leaf_shapes(expected)
    missing = sorted(set(expected_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(expected_shapes))
    if missing:
        raise CheckpointMismatchError(
            f'checkpoint {where} lacks parameter {missing[0]} that the config expects '
            f'({len(missing)} missing); was it written with another model config?'
        )
    if extra:
        raise CheckpointMismatchError(
            f'checkpoint {where} has parameter {extra[0]} that the config does not '
            f'({len(extra)} extra); was it written with another model config?'
        )
    for k, shape in expected_shapes.items():
        if saved_shapes[k] is not None and shape is not None and saved_shapes[k] != shape:
            raise CheckpointMismatchError(
                f'checkpoint {where}: parameter {k} has shape {saved_shapes[k]}, the config '
                f'builds {shape}'
            )


class Checkpointer:
    """`CheckpointManager` in `directory` (a local folder or a gs:// URI), keeping the last
    `max_to_keep` steps."""

    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        self._path = paths.path(directory)
        self.directory = str(self._path)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous
        )
        self.manager = ocp.CheckpointManager(self._path, options=self._options)

    def quarantine(self, steps) -> None:
        """Moves damaged steps to `<step>.damaged` (kept for inspection, never loaded again),
        so training can write those step numbers afresh. On an object store the move is a copy,
        then a delete."""
        if not steps:
            return
        self.manager.close()
        if jax.process_index() == 0:
            for s in steps:
                src = self._path / str(s)
                dst, n = self._path / f'{s}.damaged', 1
                while dst.exists():
                    dst, n = self._path / f'{s}.damaged{n}', n + 1
                paths.move_aside(src, dst)
                logging.warning('moved damaged checkpoint %s to %s', src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices('checkpoint quarantine')
        self.manager = ocp.CheckpointManager(self._path, options=self._options)

    def save(self, step: int, state: Any, force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                digest=ocp.args.JsonSave({'sha256': digest(state)}),
            ),
            force=force,
        )

    def steps(self):
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(
        self, abstract_state: Any = None, step: Optional[int] = None, quarantine: bool = False
    ) -> Tuple[Any, Optional[int]]:
        """Newest step (or `step`) that reads and whose digest verifies; (None, None) if none.

        With `abstract_state` None the state comes back as saved (nested dicts of arrays), which
        is how a job restores only the parameters of another job's training state. A damaged step
        (`is_damage` or a failed digest) is logged and skipped; with `quarantine` it is moved to
        `<step>.damaged` once an older step has restored. When steps exist and every one is
        damaged, NoValidCheckpointError names them, and nothing is moved: the caller decides.
        Any other error is raised at once with its traceback and nothing is moved; so is an
        architecture mismatch, since an older step of the same run would not fit either.
        """
        candidates = [step] if step is not None else self.steps()
        damaged = []
        for s in candidates:
            try:
                if abstract_state is not None:
                    self._check_shapes(s, abstract_state)
                target = abstract_state if abstract_state is not None else self._as_saved(s)
                restored = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), digest=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:
                if not is_damage(e):
                    e.add_note(f'while restoring checkpoint step {s} from {self.directory}')
                    raise
                logging.warning(
                    'checkpoint step %d in %s is unreadable (%s: %s); trying an older one',
                    s,
                    self.directory,
                    type(e).__name__,
                    str(e)[:200],
                )
                damaged.append(s)
                continue
            state, saved = restored['state'], restored['digest']
            saved_digest = saved.get('sha256') if isinstance(saved, dict) else None
            if saved_digest is None or digest(state) != saved_digest:
                logging.warning(
                    'checkpoint step %d in %s fails its digest check; trying an older one',
                    s,
                    self.directory,
                )
                damaged.append(s)
                continue
            if quarantine:
                self.quarantine(damaged)
            return state, s
        if damaged:
            raise NoValidCheckpointError(
                f'no checkpoint in {self.directory} restores: step(s) '
                f'{", ".join(map(str, damaged))} are damaged (see the warnings above)',
                damaged,
            )
        return None, None

    def _as_saved(self, step: int) -> Any:
        """The saved tree as abstract arrays on this process's first device (None if unknown).

        Without a target orbax reuses the saving run's shardings and refuses another device
        count (a teacher trained on 8 devices, restored on 1); read everything to one device.
        """
        meta_tree = self._saved_tree(step)
        if meta_tree is None:
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda m: (
                jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                if hasattr(m, 'shape') and hasattr(m, 'dtype')
                else m
            ),
            meta_tree,
        )

    def _saved_tree(self, step: int) -> Any:
        """Metadata tree (shapes, dtypes) of the saved state, or None when it cannot be read.

        Read with a handler of its own: a fresh manager has no handler registered for 'state'
        until its first restore, and its `item_metadata` then returns None.
        """
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self._path / str(step) / 'state')
        except Exception:  # No metadata: let restore itself decide.
            return None
        return None if meta is None else getattr(meta, 'tree', meta)

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        meta_tree = self._saved_tree(step)
        if meta_tree is not None:
            check_compatible(meta_tree, abstract_state, f'{self.directory} step {step}')

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_directory(path: str) -> str:
    """The absolute checkpoints folder of `path`: a job's workdir or its checkpoints/ itself."""
    folder = paths.path(path)
    inner = folder / 'checkpoints'
    return str(inner if inner.is_dir() else folder)


def has_checkpoints(directory: str) -> bool:
    folder = paths.path(directory)
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def restore_newest(directory: str, what: str = 'model') -> Tuple[Any, int]:
    """(state, step) of the newest valid checkpoint in a checkpoints folder (damaged skipped).

    NoValidCheckpointError when every step is damaged, FileNotFoundError when there is none."""
    ckpt = Checkpointer(directory, asynchronous=False)
    try:
        state, step = ckpt.restore(None)
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f'no {what} checkpoint in {directory!r}')
    return state, step


def _restore_state(directory: str, what: str) -> Tuple[str, Any, int]:
    directory = checkpoint_directory(directory)
    if not has_checkpoints(directory):
        raise FileNotFoundError(
            f'no {what} checkpoint in {directory!r}; pass the workdir of a finished {what} job '
            f'(or its checkpoints/ folder)'
        )
    state, step = restore_newest(directory, what)
    return directory, state, step


def fit_to(saved: Any, abstract: Any, where: str) -> Any:
    """`saved` checked against `abstract` and cast to its structure and dtypes, as numpy."""
    check_compatible(saved, abstract, where)
    return jax.tree.map(lambda a, x: np.asarray(x, a.dtype), abstract, _like(saved, abstract))


def restore_params(directory: str, abstract_params: Any, what: str = 'model') -> Tuple[Any, int]:
    """Parameters of the newest valid checkpoint under `directory` (a workdir or its checkpoints/).

    A missing directory raises FileNotFoundError at once naming the path and what to pass; a
    checkpoint of another architecture raises CheckpointMismatchError naming the parameter.
    """
    directory, state, step = _restore_state(directory, what)
    params = state['params'] if isinstance(state, dict) and 'params' in state else state
    return fit_to(params, abstract_params, f'{directory} step {step}'), step


def _like(tree: Any, reference: Any) -> Any:
    """`tree` (nested dicts as restored) rebuilt in the structure of `reference`."""
    flat = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(reference)
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_str(p)] for p, _ in paths])


def export_params(directory: str, step: int, params: Any) -> str:
    """Saves `{'params': params}` alone (a deliverable: no optimiser, adapters or teacher) under
    `directory`, restorable with `restore_params`; a no-op if that step is already there."""
    ckpt = Checkpointer(directory, max_to_keep=1, asynchronous=False)
    try:
        if step not in ckpt.steps():
            ckpt.save(step, {'params': params})
    finally:
        ckpt.close()
    return ckpt.directory
