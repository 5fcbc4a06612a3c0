"""Meshes and the logical-axis -> mesh-axis rule table. The only file that names mesh axes.

Mesh axes: ``data`` (pure data parallel: params replicated), ``fsdp`` (data parallel with
parameters and optimizer state sharded, ZeRO-3 style: gathered per layer by XLA), and
``tensor`` (Megatron-style tensor parallel over heads / MLP width / vocab). The batch is
sharded over ``data`` x ``fsdp``.

Parameters carry ``logical_axes`` metadata (see ``gptjax.layers.linear.param``);
``state_shardings`` turns any pytree holding them (params, the optimizer moments that
mirror them) into ``NamedSharding``s. A dimension that does not divide evenly over its mesh
axis is replicated instead of failing, so a tiny test model runs on any mesh.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.tree import is_variable

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("conv_in", None),
    ("patch", None),
    ("seq", None),
    ("position", None),  # rows of learned position tables
    ("layers", None),  # the stacked axis of ModelConfig.scan_layers=True blocks
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (= the remaining devices).

  Multi-host: pass nothing and all global devices are used (``jax.devices()``), in the
  order ``jax.experimental.mesh_utils`` finds best for the physical topology.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}): at most one may be -1")
  for name, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{name}={s} is invalid: must be a positive integer or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}) do not divide "
                       f"the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {int(np.prod(sizes))} must equal the number of "
                     f"devices ({len(devices)})")
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(tuple(sizes), devices=devices)
  except Exception:  # noqa: BLE001 - CPU / unusual topologies: plain row-major order
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array with the given logical axes; never reuses a mesh axis and
  replicates a dim whose size does not divide its mesh axes."""
  table: Mapping[str, Any] = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    mesh_axes = (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Same-structure tree of ``NamedSharding``: Variables with ``logical_axes`` are sharded by
  the rules, everything else (step counters, RNG, norms' scalars) is replicated."""

  def one(x):
    if is_variable(x):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value() if hasattr(x, "get_value") else x[...]
      spec = logical_to_spec(axes, value.shape, mesh, rules) if axes else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=is_variable)


def batch_spec() -> P:
  return P(("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> None:
  """Call ``jax.distributed.initialize()`` when this is one process of a multi-process job.

  Cloud TPU VMs (and SLURM / Kubernetes set-ups JAX knows) are detected automatically; an
  explicit ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` also works
  (e.g. several processes on one machine in tests).
  """
  import os
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "300")))
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # Cloud TPU: everything comes from the metadata server
