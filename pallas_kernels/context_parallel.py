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
halo: those layers run a ring attention over `axis`. The K/V blocks (with
their segment ids) go around the ring, P - 1 ppermutes of T/P rows; each
device folds every block into an online softmax (masks from `mask.visible` on
global positions; blocks outside the band are skipped; each block's scores
are recomputed in the backward), so a device holds two K/V blocks and one
[T/P, T/P] score tile per head, and sends O(T·K·H) bytes per layer.
Attention sinks (one logit per query head, replicated: heads are not split)
reach the halo path's local op as they are; the ring starts each row's online
softmax at running max = sink and running sum = 1, so the sink joins the
denominator once. The halo rows' outputs are dropped, so their cotangent is
zero and they add nothing to dsinks; shard_map's transpose sums the devices'
dsinks (the sinks' in_spec mentions no mesh axis).
`kv_exchange="ring"` forces it on a sliding layer too: the baseline that
`swajax bench context` compares the halo against. (An all-gather of K/V moves
the same bytes and holds all T keys: the ring was chosen for the memory.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import api
from pallas_kernels.mask import visible
from pallas_kernels.numerics import matmul_precision, soft_cap
from pallas_kernels.validation import check_attention_args

CONTEXT_AXIS = "context"  # the default `axis`; swajax's training mesh names it so
KV_EXCHANGES = ("auto", "halo", "ring")


def context_parallel_attention(q, k, v, *, mesh, axis=CONTEXT_AXIS, window=None,
                               causal=True, segment_ids=None, softcap=None,
                               scale=None, sinks=None, impl="auto",
                               batch_axes=None, kv_exchange="auto"):
  """`sliding_window_attention` with the sequence sharded over mesh axis `axis`.

  q: [B, T, N, H]; k, v: [B, T, K, H] (T == S: self-attention); segment_ids
  int32 [B, T] or None. Global arrays; inside, device d of `axis` (size P)
  works on tokens [d·T/P, (d+1)·T/P). T must be a multiple of P (a
  ValueError otherwise: pad the sequence, e.g. with a segment of its own).
  window, causal, softcap, scale, sinks (float [N] or None), impl: as
  `sliding_window_attention`, same semantics and result (out [B, T, N, H],
  sharded like q); differentiable in q, k, v and sinks.

  mesh: a `jax.sharding.Mesh`, or the `AbstractMesh` of `jax.set_mesh` inside
    jit (`jax.sharding.get_abstract_mesh()`), with Auto or Explicit axes
    (`jax.make_mesh`'s default); on Explicit axes the inputs are resharded to
    the layout above first, and out comes back sharded so.
  batch_axes: the mesh axes that split B (None: every other axis of `mesh`;
    B must be a multiple of their product). Heads are not split.
  kv_exchange: "halo" (ppermute of the `left` keys before / `right` keys
    after each device's tokens: needs a band bounded on both sides),
    "ring" (K/V blocks passed around the ring, online softmax in plain XLA;
    `impl` is not used), or "auto": halo when the band is bounded, else ring.
  Segment ids must be above -2**31 (the id below a row's smallest marks the
  halo rows outside the sequence).
  """
  problem = check_attention_args(
      q, k, v, window=window, causal=causal, segment_ids=segment_ids,
      softcap=softcap, scale=scale, sinks=sinks)
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
        "needs a window bounded on both sides; use 'ring' or 'auto'")
  use_halo = bounded and kv_exchange != "ring"
  if segment_ids is None:
    segment_ids = jnp.zeros((problem.batch, problem.q_len), jnp.int32)

  local_len = problem.q_len // devices
  seq = P(batch_axes or None, axis)
  qkv = P(batch_axes or None, axis, None, None)
  if use_halo:
    def local(q, k, v, seg, sinks):
      return _halo_attention(
          q, k, v, seg, axis=axis, devices=devices, band=band,
          options=dict(window=window, causal=causal, softcap=softcap,
                       scale=scale, sinks=sinks, impl=impl))
  else:
    def local(q, k, v, seg, sinks):
      return _ring_attention(q, k, v, seg, sinks, axis=axis, devices=devices,
                             problem=problem)
  # check_vma=False: the impls' loop carries are not annotated as varying.
  # sinks: replicated (P(): on every device whole); the transpose psums their
  # cotangent over the mesh. None is an empty pytree and needs no spec.
  specs = (qkv, qkv, qkv, seq, P())
  args = _placed((q, k, v, segment_ids, sinks), specs, mesh)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv,
                       check_vma=False)(*args)


def has_explicit_axes(mesh) -> bool:
  """True if any axis of `mesh` is of type Explicit (`jax.make_mesh`'s default
  since jax 0.7): arrays on it carry their sharding in their type."""
  return any(t == jax.sharding.AxisType.Explicit
             for t in getattr(mesh, "axis_types", ()))


def _placed(args, specs, mesh):
  """`args` as shard_map's `specs` demand them on `mesh`.

  On a mesh with Explicit axes shard_map requires each input's sharding (part
  of its type) to equal its in_spec, so each input is resharded to it first
  (a no-op when it already is; the segment ids made here start replicated).
  On Auto axes shard_map places its inputs itself: unchanged.
  """
  if not has_explicit_axes(mesh):
    return args
  return tuple(
      None if x is None else jax.sharding.reshard(
          x, jax.sharding.NamedSharding(mesh, spec))
      for x, spec in zip(args, specs))


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
  before, after = [], []  # (q rows, k, v, segment ids) of each side's halo
  for side, rows in ((-1, left), (+1, right)):
    if rows:
      (hk, hv, hseg), (exists, *_) = zip(*(_halo(x, rows, side, axis, devices)
                                           for x in (k, v, seg)))
      zeros = jnp.zeros((q.shape[0], rows) + q.shape[2:], q.dtype)
      (before if side < 0 else after).append(
          (zeros, hk, hv, jnp.where(exists[None, :], hseg, outside)))
  q_ext, k_ext, v_ext, seg_ext = (jnp.concatenate(rows, axis=1) for rows in
                                  zip(*before, (q, k, v, seg), *after))
  out = api.sliding_window_attention(q_ext, k_ext, v_ext, segment_ids=seg_ext,
                                     **options)
  return out[:, left:left + q.shape[1]]


def _ring_attention(q, k, v, seg, sinks, *, axis, devices, problem):
  """One device's block against every device's keys, passed around the ring.

  q [B, T/P, N, H], k, v [B, T/P, K, H], seg [B, T/P], sinks [N] or None
  -> out [B, T/P, N, H].
  Step s holds the K/V block of device d - s (mod P): an online softmax of
  unnormalised partial sums across the P blocks (`_ring_block`: query tiles
  of up to RING_TILE rows, recomputed in the backward, so one [RING_TILE,
  T/P] score tile per head at a time), and a block outside this device's
  band is skipped (`lax.cond`). With sinks, each row starts at running
  max = its sink and running sum = 1 (exp(sink - max)).
  """
  local_len = q.shape[1]
  me = jax.lax.axis_index(axis)
  q_first = me * local_len
  band = problem.band
  block = functools.partial(_ring_block, problem=problem)
  b, _, n, h = q.shape
  kv_heads = k.shape[2]
  shape = (b, kv_heads, n // kv_heads, local_len)
  if sinks is None:
    m = jnp.full(shape, _NO_SCORE, jnp.float32)
    l = jnp.zeros(shape, jnp.float32)
  else:  # head n = k·G + g
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, n // kv_heads, 1)
    m, l = jnp.broadcast_to(sink, shape), jnp.ones(shape, jnp.float32)
  o = jnp.zeros(shape + (h,), jnp.float32)
  ring = [(i, (i + 1) % devices) for i in range(devices)]
  skip = lambda *_: (jnp.full_like(m, _NO_SCORE), jnp.zeros_like(l), jnp.zeros_like(o))
  seg_k = seg
  for step in range(devices):
    k_first = ((me - step) % devices) * local_len
    touches = jnp.bool_(True)
    if band.left is not None:
      touches &= k_first + local_len - 1 >= q_first - band.left
    if band.right is not None:
      touches &= k_first <= q_first + local_len - 1 + band.right
    m_s, l_s, o_s = jax.lax.cond(touches, block, skip, q, k, v, seg, seg_k,
                                 q_first, k_first)
    m_new = jnp.maximum(m, m_s)
    a, c = jnp.exp(m - m_new), jnp.exp(m_s - m_new)
    m, l, o = m_new, a * l + c * l_s, a[..., None] * o + c[..., None] * o_s
    if step < devices - 1:
      k, v, seg_k = (jax.lax.ppermute(x, axis, ring) for x in (k, v, seg_k))
  out = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  # (B, K, G, T/P, H) -> (B, T/P, N, H)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, local_len, n, h).astype(q.dtype)


# The running max of a row that has seen no key yet: finite, so that
# exp(m - m_new) is never exp(-inf - -inf).
_NO_SCORE = -1e30


def _ring_block(q, k, v, q_seg, k_seg, q_first, k_first, *, problem):
  """Unnormalised softmax sums of local queries over one block of keys.

  q [B, T/P, N, H] (at positions q_first + t), k, v [B, T/P, K, H] (at
  k_first + s), segment ids [B, T/P] each. Returns (m, l, o): the row max of
  the visible scores (_NO_SCORE if none; no gradient: it only shifts),
  sum exp(score - m), and sum exp(score - m)·v, in fp32, [B, K, G, T/P](, H).
  Query tiles of `_tile_rows` rows go through `lax.map`, each rematerialised.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  rows = _tile_rows(t)
  tiles = t // rows
  precision = matmul_precision(q.dtype)
  k_pos = k_first + jnp.arange(t, dtype=jnp.int32)

  @jax.checkpoint
  def tile(args):
    q, q_seg, first = args  # (B, rows, N, H), (B, rows), ()
    q5 = q.reshape(b, rows, kv_heads, n // kv_heads, h)
    s = jnp.einsum("btkgh,bskh->bkgts", q5, k, precision=precision,
                   preferred_element_type=jnp.float32) * problem.scale
    s, _ = soft_cap(s, problem.softcap)
    q_pos = first + jnp.arange(rows, dtype=jnp.int32)
    seen = visible(q_pos[None, :, None], k_pos[None, None, :], problem.band,
                   q_seg[:, :, None], k_seg[:, None, :])[:, None, None]  # (B, 1, 1, rows, S)
    s = jnp.where(seen, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(s, axis=-1), _NO_SCORE))
    p = jnp.where(seen, jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1), o

  split = lambda x: jnp.moveaxis(x.reshape(b, tiles, rows, *x.shape[2:]), 1, 0)
  firsts = q_first + rows * jnp.arange(tiles, dtype=jnp.int32)
  m, l, o = jax.lax.map(tile, (split(q), split(q_seg), firsts))  # (tiles, B, K, G, rows, ...)
  join = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], t, *x.shape[5:])
  return join(m), join(l), join(o)


# Query rows per score tile of the ring (fewer when they do not divide T/P).
RING_TILE = 512


def _tile_rows(local_len: int) -> int:
  """The largest divisor of local_len that is at most RING_TILE."""
  return max(d for d in range(1, min(local_len, RING_TILE) + 1) if local_len % d == 0)
