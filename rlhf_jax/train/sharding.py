"""The device mesh, logical-axis rules and the shardings derived from them."""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-like axes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_config[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh: {len(devices)} devices do not divide by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} "
                     f"devices, {len(devices)} available")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def rules(config: ml_collections.ConfigDict):
  """Logical axis rules as a tuple of (logical name, mesh axes) pairs."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(boxed_tree: Any, mesh: Mesh, axis_rules) -> Any:
  """Shardings for a tree of (possibly abstract) values with logical partitioning boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, axis_rules):
  """Runs `init_fn(rng)` directly into its sharding; returns (unboxed tree, shardings).

  `init_fn` may return logically boxed values (flax `nn.Partitioned`); leaves
  without boxes are replicated. Nothing is materialised on one device first.
  """
  # Rules are passed explicitly and never set in context: flax would otherwise
  # constrain DenseGeneral kernels before reshaping them to their logical rank.
  abstract = jax.eval_shape(init_fn, rng)
  shardings = logical_shardings(abstract, mesh, axis_rules)
  check_divisible(abstract, shardings)
  tree = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return tree, shardings


def check_divisible(tree: Any, shardings: Any) -> None:
  """Raises a ValueError naming the leaf, dimension and mesh axes that do not divide."""
  names = nn.get_partition_spec(tree)
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  for (path, leaf), sharding, logical in zip(flat, jax.tree.leaves(shardings),
                                             jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, P))):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % parts:
        name = logical[dim] if dim < len(logical) else None
        raise ValueError(
            f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} (logical axis "
            f"{name!r}) of size {size} does not split over mesh axes {axes} of size {parts}; "
            "change config.mesh or config.sharding.rules")


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global arrays split over the batch axes.

  Each process passes its own slice of the global batch (the data pipeline
  shards by process), as `jax.make_array_from_process_local_data` expects.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_with_shardings(tree: Any) -> Any:
  """ShapeDtypeStructs that carry each leaf's sharding: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def to_host(tree: Any) -> Any:
  """Global arrays -> NumPy on every process, with the rows other processes hold.

  `jax.device_get` of an array sharded over several processes fails (its shards
  are not all addressable); this gathers them. Single-process it is device_get.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
