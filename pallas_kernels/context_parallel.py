"""Context parallelism: the sequence split over a mesh axis, halos of keys exchanged.

Device d of the `axis` (size P) holds tokens [d·T/P, (d+1)·T/P) of q, k, v and
the segment ids. A band `Band(left, right)` that is bounded on both sides (a
sliding window, causal or not) needs from the other devices only the `left`
keys before the device's first token and the `right` keys after its last one:
the halos. Each comes by `lax.ppermute` from the neighbouring device, or from
several (hops) when a halo is longer than one device's T/P tokens; nothing
else crosses devices, so a sliding layer sends O(W·K·H) bytes per device,
whatever T. Autodiff of `ppermute` is the reverse `ppermute`: the backward
sends each halo's dK/dV back to the device that owns those keys.

Picture, P = 3 devices, T/P = 4, causal window W = 3 (halo = W - 1 = 2 keys):

    device 0: q0..q3   keys [ --  --  | k0 k1 k2 k3 ]   (no halo: masked)
    device 1: q4..q7   keys [ k2  k3  | k4 k5 k6 k7 ]   (k2, k3 from device 0)
    device 2: q8..q11  keys [ k6  k7  | k8 ... k11  ]   (k6, k7 from device 1)

The local computation is the op itself on [left halo | local | right halo]
rows, with T == S (bottom-right alignment puts every row at its place) and
segment ids: the halo rows carry their owner's segment ids (documents that
cross a device boundary stay whole), halo rows that fall before the first or
after the last token get an id no local query has, so they are invisible, and
the halo rows' queries are zeros whose outputs are dropped. The cost is
left + right extra query rows per device (W - 1 for a causal window).

A band unbounded on a side (window=None: full layers of hybrid models) has no
halo: those layers all-gather K/V and segment ids over `axis` and attend
densely (`reference.dense_attention`, an explicit [T/P, T] mask from
`mask.visible` on global positions): O(T) bytes and O(T/P · T) scores per
device. `kv_exchange="gather"` forces it on a sliding layer too (the
baseline `swajax bench context` compares against).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import api
from pallas_kernels.mask import visible
from pallas_kernels.numerics import matmul_precision
from pallas_kernels.reference import dense_attention
from pallas_kernels.validation import check_attention_args

CONTEXT_AXIS = "context"  # the default `axis`; swajax's training mesh names it so
KV_EXCHANGES = ("auto", "halo", "gather")


def context_parallel_attention(q, k, v, *, mesh, axis=CONTEXT_AXIS, window=None,
                               causal=True, segment_ids=None, softcap=None,
                               scale=None, impl="auto", batch_axes=None,
                               kv_exchange="auto"):
  """`sliding_window_attention` with the sequence sharded over mesh axis `axis`.

  q: [B, T, N, H]; k, v: [B, T, K, H] (T == S: self-attention); segment_ids
  int32 [B, T] or None. Global arrays; inside, device d of `axis` (size P)
  works on tokens [d·T/P, (d+1)·T/P). T must be a multiple of P (a
  ValueError otherwise: pad the sequence, e.g. with a segment of its own).
  window, causal, softcap, scale, impl: as `sliding_window_attention`, same
  semantics and result (out [B, T, N, H], sharded like q).

  mesh: a `jax.sharding.Mesh`, or the `AbstractMesh` of `jax.set_mesh` inside
    jit (`jax.sharding.get_abstract_mesh()`), with Auto axes.
  batch_axes: the mesh axes that split B (None: every other axis of `mesh`;
    B must be a multiple of their product). Heads are not split.
  kv_exchange: "halo" (ppermute of the `left` keys before / `right` keys
    after each device's tokens: needs a band bounded on both sides),
    "gather" (all-gather K/V over `axis`, dense local attention; `impl` is
    not used), or "auto": halo when the band is bounded, else gather.
  Segment ids must be above -2**31 (the id below a row's smallest marks the
  halo rows outside the sequence).
  """
  problem = check_attention_args(
      q, k, v, window=window, causal=causal, segment_ids=segment_ids,
      softcap=softcap, scale=scale)
  if problem.q_len != problem.kv_len:
    raise ValueError(
        f"q.shape[1]={problem.q_len}, k.shape[1]={problem.kv_len}: context "
        "parallelism is self-attention, expected equal lengths")
  if (not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh))
      or axis not in mesh.axis_names):
    raise ValueError(
        f"mesh={mesh!r}, axis={axis!r}: expected a jax.sharding.Mesh with the "
        f"axis {axis!r}")
  devices = mesh.shape[axis]
  if problem.q_len % devices:
    raise ValueError(
        f"q.shape[1]={problem.q_len}: expected a multiple of the {axis!r} axis "
        f"size {devices} (pad the sequence)")
  if batch_axes is None:
    batch_axes = tuple(a for a in mesh.axis_names if a != axis)
  batch_axes = tuple(batch_axes)
  batch_ways = 1
  for a in batch_axes:
    batch_ways *= mesh.shape[a]
  if problem.batch % batch_ways:
    raise ValueError(
        f"q.shape[0]={problem.batch}: expected a multiple of {batch_ways}, the "
        f"size of batch_axes={batch_axes!r}")
  band = problem.band
  bounded = band.left is not None and band.right is not None
  if kv_exchange not in KV_EXCHANGES:
    raise ValueError(f"kv_exchange={kv_exchange!r}: expected one of {KV_EXCHANGES}")
  if kv_exchange == "halo" and not bounded:
    raise ValueError(
        f"kv_exchange='halo' with window={window!r}, causal={causal!r}: a halo "
        "needs a window bounded on both sides; use 'gather' or 'auto'")
  use_halo = bounded and kv_exchange != "gather"
  if segment_ids is None:
    segment_ids = jnp.zeros((problem.batch, problem.q_len), jnp.int32)

  local_len = problem.q_len // devices
  seq = P(batch_axes or None, axis)
  qkv = P(batch_axes or None, axis, None, None)
  if use_halo:
    def local(q, k, v, seg):
      return _halo_attention(
          q, k, v, seg, axis=axis, devices=devices, band=band,
          options=dict(window=window, causal=causal, softcap=softcap,
                       scale=scale, impl=impl))
  else:
    def local(q, k, v, seg):
      return _gathered_attention(q, k, v, seg, axis=axis, problem=problem,
                                 local_len=local_len)
  # check_vma=False: the impls' loop carries are not annotated as varying.
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seq),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids)


def _shift(x, hops, axis, devices):
  """x of device d - hops on device d (hops < 0: of d + |hops|); zeros where
  that device does not exist. x: a local block [B, rows, ...]."""
  pairs = [(i, i + hops) for i in range(devices) if 0 <= i + hops < devices]
  return jax.lax.ppermute(x, axis, pairs)


def _halo(x, rows, side, axis, devices):
  """The `rows` rows of the global array just before (side=-1) or after
  (side=+1) this device's block x [B, T/P, ...], nearest hop last (before) or
  first (after); and bool [rows]: which of them exist (positions in [0, T)).
  A halo longer than T/P comes from several devices, one ppermute each."""
  local_len = x.shape[1]
  me = jax.lax.axis_index(axis)
  pieces, exists = [], []
  hop = 1
  while rows > 0:
    take = min(rows, local_len)
    block = x[:, local_len - take:] if side < 0 else x[:, :take]
    pieces.append(_shift(block, -side * hop, axis, devices))
    source = me + side * hop
    exists.append(jnp.broadcast_to((source >= 0) & (source < devices), (take,)))
    rows -= take
    hop += 1
  if side < 0:
    pieces, exists = pieces[::-1], exists[::-1]
  return jnp.concatenate(pieces, axis=1), jnp.concatenate(exists)


def _halo_attention(q, k, v, seg, *, axis, devices, band, options):
  """One device's block of the op, from its local rows and the two halos.

  q [B, T/P, N, H], k, v [B, T/P, K, H], seg [B, T/P] -> out [B, T/P, N, H].
  """
  # Keys beyond (P - 1)·T/P rows of halo are outside the sequence anyway.
  reach = (devices - 1) * q.shape[1]
  left, right = min(band.left, reach), min(band.right, reach)
  outside = jnp.min(seg, axis=1, keepdims=True) - 1  # [B, 1]: no local query's id
  rows_q, rows_k, rows_v, rows_seg = [], [], [], []
  for side, rows in ((-1, left), (+1, right)):
    if not rows:
      continue
    (hk, hv, hseg), exists = zip(*(_halo(x, rows, side, axis, devices)
                                   for x in (k, v, seg)))
    rows_q.append((side, jnp.zeros((q.shape[0], rows) + q.shape[2:], q.dtype)))
    rows_k.append((side, hk))
    rows_v.append((side, hv))
    rows_seg.append((side, jnp.where(exists[0][None, :], hseg, outside)))

  def with_halos(local, halos):
    before = [x for side, x in halos if side < 0]
    after = [x for side, x in halos if side > 0]
    return jnp.concatenate(before + [local] + after, axis=1)

  out = api.sliding_window_attention(
      with_halos(q, rows_q), with_halos(k, rows_k), with_halos(v, rows_v),
      segment_ids=with_halos(seg, rows_seg), **options)
  return out[:, left:left + q.shape[1]]


def _gathered_attention(q, k, v, seg, *, axis, problem, local_len):
  """One device's block with every key: K/V and segment ids all-gathered over
  `axis`, a dense [T/P, T] mask on global positions (any band).

  q [B, T/P, N, H], k, v [B, T/P, K, H], seg [B, T/P] -> out [B, T/P, N, H].
  """
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  k_all, v_all, seg_all = gather(k), gather(v), gather(seg)
  first = jax.lax.axis_index(axis) * local_len
  q_pos = first + jnp.arange(local_len, dtype=jnp.int32)[:, None]
  k_pos = jnp.arange(problem.kv_len, dtype=jnp.int32)[None, :]
  mask = visible(q_pos[None], k_pos[None], problem.band,
                 seg[:, :, None], seg_all[:, None, :])  # (B, T/P, T)
  local_problem = dataclasses.replace(problem, batch=q.shape[0],
                                      q_len=local_len)
  out, _ = dense_attention(q, k_all, v_all, mask[:, None, None], local_problem,
                           precision=matmul_precision(q.dtype),
                           probs_dtype=q.dtype)
  return out
