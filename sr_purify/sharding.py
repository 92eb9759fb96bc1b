"""Data-parallel sharding: one mesh from the config, batch split on 'data', parameters replicated.

The same code runs on one CPU, fake CPU devices, a GPU host or a multi-host TPU slice.
"""

from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(axes: Sequence[Tuple[str, int]] = (('data', -1),)) -> Mesh:
    """A device mesh from `config.mesh`, e.g. [('data', -1)]; -1 takes the remaining devices."""
    axes = [tuple(a) for a in axes]
    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    n = jax.device_count()
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh {axes}: at most one axis may be -1')
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f'mesh {axes} does not divide the {n} devices')
        sizes[sizes.index(-1)] = n // known
    need = int(np.prod(sizes))
    if need > n:
        raise ValueError(f'mesh {axes} needs {need} devices; there are {n}')
    if need < n and jax.process_count() > 1:
        raise ValueError(
            f'mesh {axes} uses {need} of {n} devices; a multi-process run must use '
            f'all of them (use -1 for the data axis)'
        )
    # An explicit smaller mesh (e.g. [('data', 1)]) takes the first devices.
    devices = np.asarray(jax.devices()[:need]).reshape(sizes)
    return Mesh(devices, names)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape['data']
    if global_batch % n:
        raise ValueError(
            f'global batch {global_batch} is not divisible by the {n} devices of the '
            f"'data' mesh axis; use a multiple of {n}"
        )


def to_global(local_batch: Any, mesh: Mesh) -> Any:
    """Process-local numpy batch -> global jax arrays sharded on 'data' (multi-host safe)."""
    sharding = data_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-process) arrays.

    A replicated array that spans processes is not fully addressable, so `jax.device_get` would
    fail on it; its first local shard is the whole value. Sharded arrays are gathered.
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def first_rows(x: jax.Array, count: int, replicated: NamedSharding) -> np.ndarray:
    """The first `count` rows of a global (sharded) batch as numpy on every host."""
    return np.asarray(jax.device_get(jax.jit(lambda a: a[:count], out_shardings=replicated)(x)))


def batch_mask(index: int, global_batch: int, num_examples: int) -> np.ndarray:
    """1 for the real examples of global batch `index`, 0 for the padding of the last one."""
    positions = np.arange(index * global_batch, (index + 1) * global_batch)
    return (positions < num_examples).astype(np.float32)
