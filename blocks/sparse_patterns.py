"""Static sparse-attention patterns of video diffusion transformers as tables of the one block-sparse op.

Each builder turns a video token grid (T, H, W) into a `BlockPattern`: the order that makes its blocks
contiguous runs of tokens, the block sizes and the index table of `zoo.kernels.block_sparse_attention`, so
every pattern runs on every backend of the op and can be compared with the others at equal density.

- Generalized Neighborhood Attention (GNA; Hassani et al., "Generalized Neighborhood Attention:
  Multi-dimensional Sparse Attention at the Speed of Light", 2025; NATTEN): every query attends to a 3-D
  window of keys around it, shifted inward at the borders as neighborhood attention does; with a stride,
  the queries of each stride group share the window of the group's centre query. At block granularity:
  tokens are laid out tile by tile (one tile a block), and window and stride are odd multiples of the tile,
  which makes every window a union of whole tiles.
- Sliding Tile Attention (STA; Zhang et al., "Fast Video Generation with Sliding Tile Attention", 2025):
  the same with the stride of one tile: each query tile attends to the window of key tiles centred on it.
- Radial Attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
  Video Generation", 2025; github.com/mit-han-lab/radial-attention): a static token mask over frame-major
  tokens. Every query attends to the whole first frame (the attention sink); to the other frames, to the
  tokens within a band of the same position in the frame whose width halves with each doubling of the
  temporal distance (down to one block), and at larger distances to only every few frames. The token mask
  becomes a block mask by the authors' rule: a block is kept where, among its columns that any query
  reaches, more than 60% are reached by more than a third of its queries.

- VMoBA (Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", 2025; github.com/KwaiVGI/
  VMoBA): dynamic. Keys are cut into chunks, 1-D (runs of frames), 2-D (spatial patches through all frames) or
  3-D (cubes), the partition cycling with the layer; every query scores each chunk by its dot product with the
  chunk's mean key and attends, under one softmax, to its own chunk and to the best-scoring others: a fixed
  number (top-k) or as many as bring the min-max-normalised scores up to a share of their sum (threshold),
  ranked per query and head or over all queries of a head (global selection). Selection is per query token,
  so the op runs it with query blocks of one token.

Dense attention and PSA (`zoo.blocks.pyramid_sparse`) are the two ends these are compared with.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from zoo.kernels import block_sparse_attention, tables_from_level_map

from .video_order import video_token_order

__all__ = [
    "PATTERNS",
    "VMOBA_PARTITIONS",
    "BlockPattern",
    "neighborhood_pattern",
    "pattern_at_density",
    "radial_pattern",
    "sliding_tile_pattern",
    "vmoba_attention",
    "vmoba_chunk",
    "vmoba_selection",
]

PATTERNS = ("sta", "neighborhood", "radial")
RADIAL_MODELS = ("wan", "hunyuan")
VMOBA_PARTITIONS = ("1d", "2d", "3d")
VMOBA_SELECTIONS = ("threshold", "topk")
VMOBA_SCOPES = ("query_head", "head_global")


@dataclasses.dataclass(frozen=True)
class BlockPattern:
    """A static block-sparse pattern over a video token grid.

    Attributes:
        grid: (T, H, W) token grid; tokens come in row-major order.
        order: (T*H*W,) permutation into block order (`x[..., order, :]`), or None when row-major is it.
        kv_index: (1, 1, Mq, K) int32 key blocks per query block (-1: empty), shared by batch and heads.
        block_q, block_k: tokens per query / key block.
    """

    grid: tuple[int, int, int]
    order: torch.Tensor | None
    kv_index: torch.Tensor
    block_q: int
    block_k: int

    @property
    def block_mask(self) -> torch.Tensor:
        """(Mq, Mk) bool: which key blocks each query block attends to."""
        mk = -(-math.prod(self.grid) // self.block_k)
        index = self.kv_index[0, 0].long()
        mask = torch.zeros(index.shape[0], mk + 1, dtype=torch.bool)
        mask.scatter_(1, torch.where(index >= 0, index, mk), True)
        return mask[:, :mk]

    def density(self) -> float:
        """Fraction of dense attention's (query, key) pairs the pattern computes."""
        length = math.prod(self.grid)
        q_sizes = (length - torch.arange(self.block_mask.shape[0]) * self.block_q).clamp(max=self.block_q)
        k_sizes = (length - torch.arange(self.block_mask.shape[1]) * self.block_k).clamp(max=self.block_k)
        pairs = (self.block_mask.float() * q_sizes[:, None] * k_sizes[None, :]).sum()
        return float(pairs) / length**2

    def token_mask(self) -> torch.Tensor:
        """(L, L) bool over row-major tokens: which keys each query attends to (for checks; L^2 memory)."""
        length = math.prod(self.grid)
        blocks = self.block_mask
        qb = torch.arange(length) // self.block_q
        kb = torch.arange(length) // self.block_k
        mask = blocks[qb][:, kb]  # in block order
        if self.order is None:
            return mask
        inverse = torch.argsort(self.order)
        return mask[inverse][:, inverse]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Attention under the pattern. q, k: (B, Hh, L, D), v: (B, Hh, L, Dv), row-major tokens -> (B, Hh, L, Dv)."""
        length = math.prod(self.grid)
        if q.dim() != 4 or q.shape[2] != length or k.shape[2] != length or v.shape[2] != length:
            raise ValueError(
                f"the pattern is over {self.grid} = {length} tokens: q, k, v must be (B, H, {length}, D), "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        order = None if self.order is None else self.order.to(q.device)
        if order is not None:
            q, k, v = (x.index_select(2, order) for x in (q, k, v))
        out = block_sparse_attention(
            q, k, v, self.kv_index.to(q.device), block_q=self.block_q, block_k=self.block_k, scale=scale
        )
        return out if order is None else out.index_select(2, torch.argsort(order))


def _triple(name: str, value) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values):
        raise ValueError(f"{name} must be a positive int or 3 positive ints (t, h, w), got {value!r}")
    return values


def _window_starts(count: int, window: int, stride: int) -> torch.Tensor:
    """First tile of the window of every tile along one axis (all in tiles; window and stride odd).

    Neighborhood attention's window around position p starts at p - window // 2, shifted inward to stay
    within [0, count); with a stride, p is the centre of the tile's stride group (clamped to the axis).
    """
    tile = torch.arange(count)
    centre = (tile // stride * stride + stride // 2).clamp(max=count - 1)
    return (centre - window // 2).clamp(0, count - window)


def neighborhood_pattern(
    grid: tuple[int, int, int],
    tile: tuple[int, int, int] | int,
    window: tuple[int, int, int] | int,
    stride: tuple[int, int, int] | int | None = None,
) -> BlockPattern:
    """Generalized neighborhood attention (GNA) at tile granularity.

    Args:
        grid: (T, H, W) tokens, each a multiple of `tile`.
        tile: (t, h, w) tokens per tile; one tile is one block of the op.
        window: (t, h, w) window extent in tokens: odd multiples of the tile, at most the grid.
        stride: (t, h, w) stride in tokens (odd multiples of the tile); None: one tile (STA).

    Returns:
        The pattern (tokens in tile order).
    """
    grid, tile, window = _triple("grid", grid), _triple("tile", tile), _triple("window", window)
    stride = tile if stride is None else _triple("stride", stride)
    tiles = []
    for axis, (n, t, k, s) in enumerate(zip(grid, tile, window, stride, strict=True)):
        if n % t:
            raise ValueError(f"grid {grid} must be a multiple of the tile {tile} (axis {axis})")
        if k % t or (k // t) % 2 == 0 or k > n:
            raise ValueError(
                f"window {window} must be odd multiples of the tile {tile}, at most the grid {grid} (axis {axis}): "
                "then every window is a union of whole tiles"
            )
        if s % t or (s // t) % 2 == 0:
            raise ValueError(f"stride {stride} must be odd multiples of the tile {tile} (axis {axis})")
        tiles.append((n // t, k // t, s // t))
    starts = [_window_starts(n, k, s) for n, k, s in tiles]
    counts = [n for n, _, _ in tiles]
    # Every query tile lists the tiles of its window: the product of three ranges, in tile order.
    offsets = torch.cartesian_prod(*(torch.arange(k) for _, k, _ in tiles)).view(-1, 3)
    qt = torch.cartesian_prod(*(torch.arange(n) for n in counts)).view(-1, 3)
    first = torch.stack([starts[a][qt[:, a]] for a in range(3)], dim=1)  # (Mq, 3)
    coords = first[:, None, :] + offsets[None]  # (Mq, K, 3)
    index = (coords[..., 0] * counts[1] + coords[..., 1]) * counts[2] + coords[..., 2]
    order = video_token_order(grid, "tiles", tile)
    block = math.prod(tile)
    return BlockPattern(grid, order, index.to(torch.int32)[None, None], block, block)


def sliding_tile_pattern(
    grid: tuple[int, int, int], tile: tuple[int, int, int] | int, window_tiles: tuple[int, int, int] | int
) -> BlockPattern:
    """Sliding tile attention (STA): each query tile attends to the `window_tiles` (odd, in tiles) around it.

    Args:
        grid: (T, H, W) tokens, a multiple of `tile`.
        tile: (t, h, w) tokens per tile (the official HunyuanVideo setting is (6, 8, 8)).
        window_tiles: (t, h, w) window in tiles, odd.
    """
    tile, window_tiles = _triple("tile", tile), _triple("window_tiles", window_tiles)
    return neighborhood_pattern(grid, tile, tuple(w * t for w, t in zip(window_tiles, tile, strict=True)))


def _radial_rule(frames: int, per_frame: int, block: int, decay_factor: float, model: str):
    """Radial Attention's band width and frame-keeping rule per temporal distance 0 .. frames - 1.

    The authors' temporal groups: distance d falls in group 2 ** bit_length(d) (1, 2, 4, 4, 8, ...); the band
    halves from group to group, from 2 ** bit_length(tokens per frame), scaled by the decay factor and never
    narrower than a block; once the undecayed band is narrower than a block, only every
    floor(block / band)-th distance keeps its frames.
    """
    scale = 2.0 ** per_frame.bit_length()
    width, keep = [], []
    for d in range(frames):
        undecayed = scale / 2 ** d.bit_length()
        if d < 1 or (model == "hunyuan" and d == 1):
            w = float(per_frame)
        elif model == "wan" and d == 1:
            w = float(per_frame // 2)
        else:
            w = max(undecayed * decay_factor, float(block))
        width.append(w)
        keep.append(undecayed >= block or d % int(block / undecayed) == 0)
    return torch.tensor(width, dtype=torch.float64), torch.tensor(keep)


def _radial_allowed(query: torch.Tensor, key: torch.Tensor, per_frame: int, width: torch.Tensor, keep: torch.Tensor):
    """The token mask for row-major token indices `query` (n, 1) and `key` (1, m): the first frame (the
    attention sink) and, in kept frames, the band around the query's position in its frame."""
    fi, fj = query // per_frame, key // per_frame
    dist = (fi - fj).abs()
    band = ((query % per_frame) - (key % per_frame)).abs() <= width[dist]
    return (fj == 0) | (band & keep[dist])


def radial_pattern(
    grid: tuple[int, int, int],
    block: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    device: torch.device | str | None = None,
) -> BlockPattern:
    """Radial Attention's static energy-decay mask on frame-major tokens, as blocks.

    Args:
        grid: (T, H, W) tokens (frames of H * W tokens each, row-major).
        block: tokens per block (the authors' 128).
        decay_factor: scales the band width beyond the near frames (the authors' presets: 1 for
            HunyuanVideo, 0.5 to 1 for Wan); smaller is sparser.
        model: "wan" (own frame full, neighbouring frames half a frame wide) or "hunyuan" (both full).
        device: where the token masks are evaluated (block x L at a time, L^2 work in all: minutes on a CPU at
            Wan 480p's 32k tokens, well under a second on a GPU); the pattern's tables end on the CPU either way.

    Returns:
        The pattern (tokens stay in row-major, i.e. frame-major, order).
    """
    grid = _triple("grid", grid)
    if not (isinstance(block, int) and block > 0):
        raise ValueError(f"block must be a positive int, got {block!r}")
    if not (isinstance(decay_factor, (int, float)) and math.isfinite(decay_factor) and decay_factor > 0):
        raise ValueError(f"decay_factor must be a positive finite number, got {decay_factor!r}")
    if model not in RADIAL_MODELS:
        raise ValueError(f"model must be one of {RADIAL_MODELS}, got {model!r}")
    per_frame, length = grid[1] * grid[2], math.prod(grid)
    blocks = -(-length // block)
    keys = torch.arange(length, device=device).view(1, -1)
    width, keep = (t.to(keys.device) for t in _radial_rule(grid[0], per_frame, block, float(decay_factor), model))
    rows = []
    for a in range(blocks):  # one query block at a time: memory of block x L, not L x L
        queries = torch.arange(a * block, min(length, (a + 1) * block), device=keys.device).view(-1, 1)
        allowed = _radial_allowed(queries, keys, per_frame, width, keep).float()
        # (Mk, block): per key block, the share of this block's queries reaching each column (0 past the end)
        density = F.pad(allowed.mean(0), (0, blocks * block - length)).view(blocks, block)
        reached = (density > 0).sum(1)
        high = (density > 1 / 3).sum(1)
        rows.append(high > 0.6 * reached)
    level_map = torch.where(torch.stack(rows), 0, -1).cpu()[None, None]
    kv_index, _ = tables_from_level_map(level_map, max(1, int((level_map >= 0).sum(-1).max())))
    return BlockPattern(grid, None, kv_index, block, block)


def pattern_at_density(
    name: str,
    grid: tuple[int, int, int],
    density: float,
    tile: tuple[int, int, int] | int = (2, 4, 4),
    device: torch.device | str | None = None,
) -> BlockPattern:
    """The pattern of kind `name` whose density is closest to `density` among its settings.

    Args:
        name: "sta" (window in tiles), "neighborhood" (GNA: window in tiles and a stride of 3 tiles along one
            or more axes) or "radial" (decay factor; blocks of the tile's volume).
        grid: (T, H, W) tokens.
        density: target fraction of dense attention's pairs, in (0, 1].
        tile: tile of STA and GNA; its volume is Radial's block.
        device: where Radial evaluates its token masks (see `radial_pattern`); the others build on the CPU.
    """
    if name not in PATTERNS:
        raise ValueError(f"name must be one of {PATTERNS}, got {name!r}")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    grid, tile = _triple("grid", grid), _triple("tile", tile)
    counts = [n // t for n, t in zip(grid, tile, strict=True)]
    odd = [[w for w in range(1, n + 1, 2)] for n in counts]
    candidates = []
    if name in ("sta", "neighborhood"):
        # GNA proper: a stride of more than one tile along some axis (one tile everywhere is STA).
        strides = [(1, 1, 1)] if name == "sta" else [(1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 3, 3), (3, 3, 3)]
        for wt in odd[0]:
            for wh in odd[1]:
                for ww in odd[2]:
                    for st in strides:
                        if any(s > n for s, n in zip(st, counts, strict=True)):
                            continue
                        window = (wt * tile[0], wh * tile[1], ww * tile[2])
                        stride = tuple(s * t for s, t in zip(st, tile, strict=True))
                        candidates.append(lambda w=window, s=stride: neighborhood_pattern(grid, tile, w, s))
    else:
        block = math.prod(tile)
        for factor in (2.0**e for e in range(-6, 4)):
            candidates.append(lambda f=factor: radial_pattern(grid, block, f, device=device))
    best = None
    for make in candidates:
        pattern = make()
        gap = abs(pattern.density() - density)
        if best is None or gap < best[0]:
            best = (gap, pattern)
    return best[1]


# ----------------------------------------------------------------------------------------------- VMoBA


def vmoba_chunk(
    grid: tuple[int, int, int], layer: int, chunk: tuple[int, int, int] = (2, 4, 4)
) -> tuple[int, int, int]:
    """The chunk of layer `layer` under VMoBA's layer-wise recurrent 1-D / 2-D / 3-D partition.

    Args:
        grid: (T, H, W) tokens.
        layer: the layer's index; layers 0, 3, 6, ... take 1-D chunks, 1, 4, ... 2-D, 2, 5, ... 3-D.
        chunk: (t, h, w) extents: a 1-D chunk is t whole frames, a 2-D chunk an h x w patch through every
            frame, a 3-D chunk a t x h x w cube.

    Returns:
        (t, h, w) tokens per chunk.
    """
    grid, chunk = _triple("grid", grid), _triple("chunk", chunk)
    kind = VMOBA_PARTITIONS[layer % 3]
    t, h, w = chunk
    shape = {"1d": (t, grid[1], grid[2]), "2d": (grid[0], h, w), "3d": (t, h, w)}[kind]
    return tuple(min(c, n) for c, n in zip(shape, grid, strict=True))


def _select_threshold(norm: torch.Tensor, own: torch.Tensor, threshold: float, scope: str) -> torch.Tensor:
    """Own chunk plus the best others until the normalised scores reach `threshold` of their sum (VMoBA).

    norm: (B, H, L, C) min-max normalised scores; own: (B or 1, 1, L, C) bool, the query's own chunk.
    """
    eps = 1e-6
    reduce = (-1,) if scope == "query_head" else (-2, -1)
    total = norm.sum(reduce, keepdim=True)
    remain = (threshold - (norm * own).sum(reduce, keepdim=True) / (total + eps)).clamp_min(0.0)
    others = norm.masked_fill(own, 0.0)
    flat = others  # ranked per query and head
    if scope != "query_head":  # ranked over every (query, chunk) of a head
        flat, total, remain = others.flatten(-2), total.flatten(-2), remain.flatten(-2)
    # The own chunk ranks last whatever its score (a zero would tie with others' zeros): only others are ranked.
    own_flat = own.expand_as(norm) if scope == "query_head" else own.expand_as(norm).flatten(-2)
    order = torch.sort(flat.masked_fill(own_flat, -1.0), dim=-1, descending=True, stable=True).indices
    ranked = flat.gather(-1, order)
    reached = ranked.cumsum(-1) / (total + eps) >= remain
    count = flat.shape[-1]
    cutoff = torch.where(reached.any(-1, keepdim=True), reached.float().argmax(-1, keepdim=True), count - 1)
    keep = torch.arange(count, device=norm.device) <= cutoff
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, keep)
    return chosen.view_as(norm) | own


def vmoba_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    chunk_size: int,
    select: str = "threshold",
    threshold: float = 0.25,
    topk: int = 3,
    scope: str = "query_head",
) -> torch.Tensor:
    """Which key chunks every query attends to under VMoBA, on tokens already in chunk order.

    Args:
        q, k: (B, H, L, D), chunks as consecutive runs of `chunk_size` tokens (the last may be shorter).
        chunk_size: tokens per chunk.
        select: "threshold" (the authors' default, with `threshold` 0.25) or "topk" (own chunk plus the
            `topk` - 1 best others).
        threshold: share of the summed normalised scores to reach.
        topk: chunks per query under "topk", own included.
        scope: rank and normalise per query and head ("query_head", the authors' default) or over all
            queries of a head ("head_global", the paper's global selection; threshold only).

    Returns:
        (B, H, L, C) bool.
    """
    if select not in VMOBA_SELECTIONS:
        raise ValueError(f"select must be one of {VMOBA_SELECTIONS}, got {select!r}")
    if scope not in VMOBA_SCOPES:
        raise ValueError(f"scope must be one of {VMOBA_SCOPES}, got {scope!r}")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    if not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    b, h, length, d = k.shape
    count = -(-length // chunk_size)
    tokens = torch.arange(length, device=k.device)
    wide = torch.promote_types(q.dtype, torch.float32)
    means = torch.zeros(b, h, count, d, dtype=wide, device=k.device).index_add_(2, tokens // chunk_size, k.to(wide))
    means = means / torch.bincount(tokens // chunk_size, minlength=count).clamp_min(1)[:, None].to(wide)
    gate = torch.matmul(q.to(wide), means.transpose(-1, -2))  # (B, H, L, C), unscaled as the authors'
    own = (tokens // chunk_size)[:, None] == torch.arange(count, device=k.device)  # (L, C)
    own = own[None, None]
    if select == "topk":
        ranked = gate.masked_fill(own, float("inf"))
        index = ranked.topk(min(topk, count), dim=-1).indices
        return torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, index, True)
    dims = (-1,) if scope == "query_head" else (-2, -1)
    low, high = gate.amin(dims, keepdim=True), gate.amax(dims, keepdim=True)
    span = torch.where(high - low <= 1e-6, torch.ones_like(high), high - low)
    return _select_threshold((gate - low) / span, own, float(threshold), scope)


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    layer: int = 0,
    chunk: tuple[int, int, int] = (2, 4, 4),
    select: str = "threshold",
    threshold: float = 0.25,
    topk: int = 3,
    scope: str = "query_head",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VMoBA attention of row-major video tokens on the block-sparse op (query blocks of one token).

    Args:
        q, k: (B, H, L, D), v: (B, H, L, Dv), L = T * H * W.
        grid: (T, H, W).
        layer: picks the 1-D / 2-D / 3-D partition (`vmoba_chunk`).
        chunk, select, threshold, topk, scope: as in `vmoba_chunk` and `vmoba_selection`.
        scale: logit scale; defaults to D ** -0.5.

    Returns:
        (out (B, H, L, Dv), density: fraction of dense attention's pairs computed, a 0-dim tensor).
    """
    grid = _triple("grid", grid)
    length = math.prod(grid)
    if q.dim() != 4 or q.shape[2] != length or k.shape[2] != length or v.shape[2] != length:
        raise ValueError(
            f"grid {grid} holds {length} tokens: q, k, v must be (B, H, {length}, D), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    shape = vmoba_chunk(grid, layer, chunk)
    if any(n % c for n, c in zip(grid, shape, strict=True)):
        raise ValueError(f"grid {grid} must be a multiple of layer {layer}'s chunk {shape}")
    order = video_token_order(grid, "tiles", shape).to(q.device)
    q, k, v = (x.index_select(2, order) for x in (q, k, v))
    size = math.prod(shape)
    with torch.no_grad():
        chosen = vmoba_selection(q, k, size, select, threshold, topk, scope)
    level_map = torch.where(chosen, 0, -1)
    kv_index, _ = tables_from_level_map(level_map, max(1, int(chosen.sum(-1).max())))
    out = block_sparse_attention(q, k, v, kv_index, block_q=1, block_k=size, scale=scale)
    density = chosen.float().mean()  # every chunk holds `size` tokens
    return out.index_select(2, torch.argsort(order)), density
