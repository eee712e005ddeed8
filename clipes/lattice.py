"""The permutohedral lattice (Adams, Baek and Davis 2010) as tensor operations, for Gaussian filtering.

A Gaussian filter over d-dimensional features (position, colour) is approximated by splatting each
point's value onto the d + 1 vertices of the lattice simplex enclosing it (barycentric weights),
blurring the lattice along each of its d + 1 directions with the kernel [1/2, 1, 1/2], and slicing
back with the same weights. This follows Krähenbühl's dense CRF (the one pydensecrf wraps) step for
step and in float32, so that a CRF built on it gives pydensecrf's numbers: the same elevation and
scale factors, the same rounding to the nearest remainder-0 point (ties to even), the same ranks,
barycentric weights and wrap-around, the blur's un-normalised weights, and the slice's constant
``1 / (1 + 2**-d)``.

Lattice points are found with sorting (``torch.unique`` over integer codes) rather than a hash
table, so everything runs on any device. Several images filter at once: each point carries the
index of its image, which keeps the images' lattices apart.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Lattice", "blur", "build_lattice", "lattice_filter", "padding_points", "slice_values", "splat"]

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Lattice:
    """The lattice of N points with d features (several images at once).

    ``vertices`` (N, d + 1) int64: the lattice point of each vertex of each point's simplex;
    ``weights`` (N, d + 1) float32: the barycentric weights; ``splat_matrix`` (M, N) sparse CSR:
    the same weights, row by lattice point, columns in point order (the reference's order of
    accumulation); ``slice_matrix`` (N, M + 1) sparse CSR: the weights times alpha, in vertex
    order; ``neighbours`` (d + 1, 2, M + 1) int64: along each direction, the two
    neighbours of each lattice point, ``M`` (a row that stays zero) where the neighbour is not in
    the lattice; ``size`` M, the number of lattice points.
    """

    vertices: Tensor
    weights: Tensor
    splat_matrix: Tensor
    slice_matrix: Tensor
    neighbours: Tensor
    size: int

    @property
    def dim(self) -> int:
        return self.vertices.shape[1] - 1

    @property
    def alpha(self) -> float:
        return _alpha(self.dim)


def _alpha(d: int) -> float:
    """The slice's scaling constant, 1 / (1 + 2^-d), in float32 as the reference computes it."""
    return float(np.float32(1) / (np.float32(1) + np.float32(2.0 ** -d)))


def _scale_factors(d: int) -> list[float]:
    """The diagonal of the elevation matrix times the inverse expected standard deviation (float32)."""
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std)) for i in range(d)]


def _elevate(features: Tensor) -> Tensor:
    """(N, d) -> (N, d + 1): the features in the lattice's hyperplane, accumulated in the reference's order."""
    n, d = features.shape
    scale = _scale_factors(d)
    out = features.new_empty(n, d + 1)
    running = features.new_zeros(n)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        out[:, j] = running - float(j) * cf
        running = running + cf
    out[:, 0] = running
    return out


def _simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The enclosing simplex of each point: (remainder-0 vertex, ranks, barycentric weights)."""
    d = elevated.shape[1] - 1
    down = float(np.float32(1) / np.float32(d + 1))
    v = torch.round(elevated * down)  # nearest, ties to even, as SSE's rounding
    rem0 = v * float(d + 1)
    total = v[:, 0].clone()
    for i in range(1, d + 1):
        total = total + v[:, i]
    # rank_i = #{j > i: diff_i < diff_j} + #{j < i: diff_j >= diff_i}: the place in a stable descending sort
    order = torch.sort(elevated - rem0, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d + 1, device=order.device).expand_as(order))
    rank = rank + total.round().to(torch.int64)[:, None]
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * low.long() - (d + 1) * high.long()
    rem0 = rem0 + float(d + 1) * low.float() - float(d + 1) * high.float()
    # barycentric coordinates: slot d - rank_i gets +v_i, slot d - rank_i + 1 gets -v_i
    v = (elevated - rem0) * down
    plus = torch.zeros(len(v), d + 2, dtype=v.dtype, device=v.device).scatter_(1, d - rank, v)
    minus = torch.zeros_like(plus).scatter_(1, d - rank + 1, v)
    bary = plus - minus
    bary[:, 0] = bary[:, 0] + (1.0 + bary[:, d + 1])
    return rem0.to(torch.int64), rank, bary[:, :d + 1].contiguous()


def _keys(rem0: Tensor, rank: Tensor) -> Tensor:
    """(N, d + 1, d) int64: the first d coordinates of each simplex vertex (the last one is minus their sum)."""
    d = rem0.shape[1] - 1
    r = torch.arange(d + 1, device=rem0.device)
    # canonical simplex: vertex r adds r where rank <= d - r, r - (d + 1) elsewhere
    canonical = r[:, None] - (d + 1) * (r[None, :] > d - r[:, None]).long()  # (vertex, rank)
    return rem0[:, None, :d] + canonical[:, rank[:, :d]].permute(1, 0, 2)


class _Codec:
    """One int64 code per (image, lattice point), mixed radix over (image, r, q_0 .. q_{d-1}).

    The coordinates of a vertex of remainder r are (d + 1) q_i + r. A vertex's q_i is its
    remainder-0 vertex's or one less, and a neighbour's differs by at most one more: the range of
    each digit leaves room for both, so that every neighbour's code is its own.
    """

    def __init__(self, images: int, q0: Tensor) -> None:
        self.d1 = q0.shape[1] + 1
        self.lo = q0.amin(dim=0) - 2
        self.spans = [images, self.d1, *(q0.amax(dim=0) - self.lo + 2).tolist()]
        self.radix: list[int] = []
        total = 1
        for s in reversed(self.spans):
            self.radix.insert(0, total)
            total *= s
        self.fits = total <= _INT64_MAX

    def vertex_codes(self, image: Tensor, q0: Tensor, rank: Tensor) -> Tensor:
        """(N, d + 1): the code of each simplex vertex, from the remainder-0 vertex and the ranks.

        Vertex r is the remainder-0 vertex plus r in every coordinate, minus d + 1 in those of
        rank > d - r: its q_i is q0_i less one there.
        """
        n, d = q0.shape
        base = image * self.radix[0]
        for i in range(d):
            base = base + (q0[:, i] - self.lo[i]) * self.radix[i + 2]
        by_rank = torch.zeros(n, d + 2, dtype=torch.int64, device=q0.device)
        by_rank.scatter_(1, rank[:, :d], torch.tensor(self.radix[2:], device=q0.device).expand(n, d))
        above = by_rank.flip(1).cumsum(1).flip(1)  # above[:, k] = sum of radices of ranks >= k
        r = torch.arange(d + 1, device=q0.device)
        return base[:, None] + r * self.radix[1] - above[:, d + 1 - r]

    def neighbour_codes(self, codes: Tensor, j: int, step: int) -> Tensor:
        """Codes of the neighbours along direction j: every coordinate + step, coordinate j - step * d.

        Within a remainder that is r + step; across the wrap (r = 0 going down, r = d going up) the
        remainder becomes d or 0 and every q but q_j moves by step instead.
        """
        d = self.d1 - 1
        r = (codes // self.radix[1]) % self.d1
        own = self.radix[j + 2] if j < d else 0
        plain = step * self.radix[1] - step * own
        wrapped = -step * d * self.radix[1] + step * (sum(self.radix[2:]) - own)
        return codes + torch.where(r == (0 if step < 0 else d), wrapped, plain)


def _sorted_runs(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of ``ids``: (permutation, start of each run of equal ids, run number of each sorted item)."""
    ordered, perm = torch.sort(ids, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return perm, first.nonzero().squeeze(1), torch.cumsum(first.long(), 0) - 1


def build_lattice(features: Tensor, image: Tensor | None = None, gpu_layout: bool | None = None,
                  extra: Tensor | None = None, extra_image: Tensor | None = None) -> Lattice:
    """The lattice of ``features`` (N, d) float32; ``image`` (N,) int64 says which image each point is in.

    Points of different images never share a lattice point, so one lattice filters a batch of
    images of any sizes as if each were filtered alone. ``gpu_layout`` (default: off the CPU)
    lays the sparse matrices out for cuSPARSE: 32-bit indices, sorted columns. ``extra`` (E, d)
    points (of images ``extra_image``) only add the vertices of their simplices to the lattice:
    they are neither splatted nor sliced (pydensecrf's padding points, see ``padding_points``).
    """
    if features.ndim != 2 or features.shape[1] < 1 or features.shape[0] < 1:
        raise ValueError(f"features must be (N, d) with N, d >= 1, not {tuple(features.shape)}")
    features = features.float()
    n, d = features.shape
    dev = features.device
    image = torch.zeros(n, dtype=torch.int64, device=dev) if image is None else image.long()
    if extra is not None and len(extra):
        extra_image = torch.zeros(len(extra), dtype=torch.int64, device=dev) if extra_image is None else extra_image
        features = torch.cat([features, extra.float()])
        image = torch.cat([image, extra_image.long()])
    rem0, rank, bary = _simplex(_elevate(features))
    q0 = torch.div(rem0[:, :d], d + 1, rounding_mode="floor")
    codec = _Codec(int(image.max()) + 1, q0)
    if codec.fits:
        codes = codec.vertex_codes(image, q0, rank).reshape(-1)  # point-major, as the reference visits them
        perm, starts, ids = _sorted_runs(codes)
        table, point_image, points = codes[perm[starts]], None, None
    else:  # too many distinct coordinates for one int64: unique over the rows themselves (slower)
        keys = _keys(rem0, rank).reshape(-1, d)
        owner = image.repeat_interleave(d + 1)
        _, unique_ids = torch.unique(torch.cat([owner[:, None], keys], 1), dim=0, return_inverse=True)
        perm, starts, ids = _sorted_runs(unique_ids)
        point_image, points = owner[perm[starts]], keys[perm[starts]]
        table = torch.cat([point_image[:, None], points], 1)
    m = len(starts)
    vertices = torch.empty_like(ids)
    vertices[perm] = ids
    vertices = vertices.reshape(-1, d + 1)[:n]
    bary = bary[:n]
    if len(features) > n:  # the extra points' entries leave the splat (their vertices stay in the table)
        real = perm < n * (d + 1)
        perm = perm[real]
        crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev),
                          torch.bincount(ids[real], minlength=m).cumsum(0)])
    else:
        crow = torch.cat([starts, torch.tensor([len(perm)], device=dev)])
    # the slice visits a point's vertices in order, each weight times alpha first (the reference's order);
    # cuSPARSE wants the columns of a row sorted, so on a GPU they are (the order of a sum of six changes)
    slice_cols, slice_weights = vertices, bary * _alpha(d)
    index = torch.int64
    if dev.type != "cpu" if gpu_layout is None else gpu_layout:
        slice_cols, order = vertices.sort(dim=1)
        slice_weights = slice_weights.gather(1, order)
        index = torch.int32 if n * (d + 1) < 2**31 else torch.int64  # cuSPARSE is faster on 32-bit indices
    with warnings.catch_warnings():  # CSR support is flagged beta; matrix-times-dense is all we use of it
        warnings.simplefilter("ignore", UserWarning)
        splat_matrix = torch.sparse_csr_tensor(crow.to(index), (perm // (d + 1)).to(index), bary.reshape(-1)[perm],
                                               size=(m, n))
        slice_matrix = torch.sparse_csr_tensor(torch.arange(0, n * (d + 1) + 1, d + 1, device=dev, dtype=index),
                                               slice_cols.reshape(-1).to(index), slice_weights.reshape(-1),
                                               size=(n, m + 1))
    neighbours = torch.full((d + 1, 2, m + 1), m, dtype=torch.int64, device=dev)
    arange = torch.arange(m, device=dev)
    for j in range(d + 1):
        down = _find(codec, table, point_image, points, j)
        neighbours[j, 0, :m] = down
        # the neighbour up from b is the point whose neighbour down is b
        found = down < m
        neighbours[j, 1, down[found]] = arange[found]
    return Lattice(vertices, bary, splat_matrix, slice_matrix, neighbours, m)


def padding_points(n: int, d: int, device: torch.device | None = None) -> Tensor:
    """(E, d) zeros: the points pydensecrf's SSE lattice adds to N points. Its ``Permutohedral::init``
    takes the points 4 at a time, pads the last block with zero features and still inserts their
    simplices into the hash table (``hash_table.find(key, true)``), so with N % 4 != 0 the lattice
    holds the vertices around the origin, and the blur passes values through them."""
    return torch.zeros((-n) % 4, d, device=device)


def _find(codec: _Codec, table: Tensor, image: Tensor | None, points: Tensor | None, j: int) -> Tensor:
    """Index of each lattice point's neighbour down direction j (every coordinate - 1, coordinate j + d); M if none."""
    m = len(table)
    if codec.fits:
        codes = codec.neighbour_codes(table, j, -1)
        pos = torch.searchsorted(table, codes).clamp(max=m - 1)
        return torch.where(table[pos] == codes, pos, m)
    d = codec.d1 - 1
    other = points - 1
    if j < d:
        other[:, j] += d + 1
    rows = torch.cat([image[:, None], other], 1)
    _, inverse = torch.unique(torch.cat([table, rows]), dim=0, return_inverse=True)
    # a row of ``rows`` is a lattice point when its unique id is one of the table's
    lookup = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64, device=table.device)
    lookup[inverse[:m]] = torch.arange(m, device=table.device)
    return lookup[inverse[m:]]


def splat(lattice: Lattice, values: Tensor) -> Tensor:
    """(N, C) -> (M + 1, C): each point's value spread over its simplex's vertices (last row zero).

    Each lattice point sums its contributions in point order, as the reference does.
    """
    return torch.cat([lattice.splat_matrix @ values, values.new_zeros(1, values.shape[1])])


def blur(lattice: Lattice, grid: Tensor, reverse: bool = False) -> Tensor:
    """Blur lattice values (M + 1, C) along each direction with [1/2, 1, 1/2] (missing neighbours are zero)."""
    order = range(lattice.dim, -1, -1) if reverse else range(lattice.dim + 1)
    for j in order:
        both = grid.index_select(0, lattice.neighbours[j].reshape(-1)).view(2, *grid.shape)  # one gather for the two
        grid = grid + 0.5 * (both[0] + both[1])
    return grid


def slice_values(lattice: Lattice, grid: Tensor) -> Tensor:
    """(M + 1, C) -> (N, C): the barycentric interpolation of the lattice at each point, times alpha.

    The reference sums (w * alpha) * value over the vertices when there are more than two
    channels (a sparse product here), and (w * value) * alpha with one or two: both kept, so that
    the float32 results agree.
    """
    if grid.shape[1] > 2:
        return lattice.slice_matrix @ grid
    out = grid.new_zeros(lattice.vertices.shape[0], grid.shape[1])
    for j in range(lattice.dim + 1):
        out = out + (lattice.weights[:, j:j + 1] * grid.index_select(0, lattice.vertices[:, j])) * lattice.alpha
    return out


def lattice_filter(lattice: Lattice, values: Tensor, reverse: bool = False) -> Tensor:
    """Approximate Gaussian filter of ``values`` (N, C) over the lattice's features: splat, blur, slice."""
    return slice_values(lattice, blur(lattice, splat(lattice, values.float()), reverse))
