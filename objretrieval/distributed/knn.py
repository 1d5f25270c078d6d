"""Exact kNN over queries and a gallery sharded across processes, bit-identical to one process.

Each rank holds a shard of the queries and of the gallery, with global ids. The search reproduces, score for
score, what :func:`objretrieval.search.knn` computes in one process on all queries (ordered by query id)
against all gallery rows (ordered by gallery id), without ever gathering the gallery:

1. Rows are *re-sharded* by global position: the rows ordered by id are cut into the blocks that the
   one-process search uses (``block_size`` gallery rows, ``query_block_size`` query rows), and block ``b``
   goes to rank ``b % world`` (one ``all_to_all``; each rank then holds about 1/world of each set).
2. Query blocks take turns: the owner broadcasts block ``t``, every rank screens it against its own gallery
   blocks and keeps the local exact top-k (:class:`~objretrieval.search.exact.ExactTopK`), and the block's
   owner gathers the ``world`` candidate lists and merges them by (exact score, global id).
3. The results travel back to the ranks and rows the queries came from.

Why the result is bit-identical: the ranking uses exact scores (:mod:`objretrieval.search.exact`), one fixed
summation per pair, so a score does not depend on which rank, block or product computed it; the local top-k
lists are exact, and the global top-k is the best k of their union, ties to the lower global id. (The
blocks also keep the shapes and address alignment of one process's, which made the float32 products
themselves equal before the ranking became exact.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from objretrieval._validation import (
    check_choice,
    check_embeddings,
    check_positive_int,
    to_tensor,
)
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    check_on_every_rank,
    comm_device,
    gather_row_counts,
    global_rank,
    rank,
    shard_offsets,
    world_size,
)
from objretrieval.search.exact import (
    PRECISIONS,
    ExactTopK,
    Precision,
    Screen,
    ScreenRows,
    SearchStats,
    check_stats,
)
from objretrieval.search.knn import Neighbors, check_k, default_block_size, knn
from objretrieval.search.scoring import (
    ORIGIN_SAMPLE,
    Metric,
    Prepared,
    l2_origin,
    prepare,
    to_user_scores,
)
from objretrieval.search.topk import sort_by_score_then_index

#: Operands are placed at the address (modulo this many bytes) they would have in one process.
_ALIGN = 64


def sharded_knn(
    queries: Tensor,
    gallery: Tensor | None = None,
    *,
    k: int,
    metric: Metric = "cosine",
    gallery_ids: Tensor | None = None,
    query_ids: Tensor | None = None,
    block_size: int | None = None,
    query_block_size: int = 1024,
    device: torch.device | str | None = None,
    precision: Precision = "float32",
    stats: SearchStats | None = None,
    group: Group = None,
) -> Neighbors:
    """Exact kNN of this rank's queries in a gallery sharded over the ranks of ``group``.

    A collective: every rank of ``group`` calls it, with its own shards (of any size, 0 rows included) and
    the same ``k``, ``metric``, block sizes and modes. Outside ``torch.distributed`` or in a world of one it
    is :func:`~objretrieval.search.knn` on the local data, with the ids applied.

    **Exactness.** The result equals, bit for bit (scores and indices, ties included), the rows of this
    rank's queries in ``knn(Q, G, k=k, metric=metric, block_size=block_size,
    query_block_size=query_block_size)`` run in one process, with ``Q`` all queries ordered by query id and
    ``G`` all gallery rows ordered by gallery id (leave-one-out: ``knn(X, k=k, block_size=block_size)`` on all
    rows ordered by id), returned indices being gallery ids. This holds for freshly allocated inputs on the
    compute device and the same BLAS threading; it is tested on CPU (MKL) with 2 and 3 processes.

    **Memory per rank.** O((N / world + block_size) x D) for the gallery blocks it owns, the same for its
    query blocks, one broadcast query block, O(query_block_size x k x world) for the gathered candidates,
    one (query block x gallery block) score matrix, and, only when ids are given, the N (and Q) global ids
    (int64). The gallery is never gathered: each gallery row crosses the network at most once, each query
    block is broadcast once.

    Args:
        queries: this rank's (q_r, D) queries; q_r may differ between ranks and be 0.
        gallery: this rank's (n_r, D) gallery shard, or ``None`` for leave-one-out over the union of the query
            shards (each query's own row, identified by its global id, is excluded).
        k: neighbours per query; at most the global gallery size (minus one for leave-one-out).
        metric: ``"cosine"``, ``"ip"`` or ``"l2"``, as in :func:`~objretrieval.search.knn`.
        gallery_ids: optional (n_r,) int64 global ids (>= 0) of this rank's gallery rows, unique over all
            ranks; default rank-major order (rank r's rows follow those of ranks < r). With ``gallery=None``
            they are the ids of the query rows (``query_ids`` may then be given instead, or be equal).
        query_ids: optional (q_r,) int64 global ids of this rank's queries, unique over all ranks; they fix
            the global query order of the equivalent one-process search (default rank-major). Results keep
            the order of ``queries`` either way.
        block_size: gallery rows per block, as in :func:`~objretrieval.search.knn` (default: the same
            choice, from the global query count).
        query_block_size: query rows scored at once, and exchanged per round (ignored for leave-one-out,
            which uses ``block_size`` blocks as one process does).
        device: where to compute; default the queries' device. Results are returned there.
        precision: the screening products, ``"float32"`` or ``"bf16-exact"`` (same results, see
            :func:`~objretrieval.search.knn`).
        stats: optional :class:`~objretrieval.search.exact.SearchStats`, filled in with this rank's counts.
        group: the ``torch.distributed`` process group; ``None`` means the default group.

    Returns:
        :class:`~objretrieval.search.Neighbors` of this rank's queries: (q_r, k) scores and global gallery ids.

    Raises:
        ValueError, TypeError: on every rank together, if any rank passes bad input (shape, dtype, NaN/inf,
            ids), if the ranks disagree on layout (dim, dtype), on ``k``, the metric, block sizes or mode,
            if global ids repeat across ranks, or if ``k`` exceeds the global gallery.
    """
    if world_size(group) == 1:
        return _local_knn(
            queries,
            gallery,
            k,
            metric,
            gallery_ids,
            query_ids,
            block_size,
            query_block_size,
            device,
            precision,
            stats,
        )
    q, g, gids, qids, (k, metric, block_size, query_block_size) = check_on_every_rank(
        lambda: _check_local(
            queries, gallery, k, metric, gallery_ids, query_ids, block_size, query_block_size
        ),
        "sharded_knn",
        group,
    )
    compute_device = torch.device(device) if device is not None else q.device
    precision = check_choice(precision, "precision", PRECISIONS)
    check_stats(stats)
    search = ShardedSearch(k, metric, compute_device, group, Screen(metric, precision), stats)
    if stats is not None:
        stats.precision, stats.queries = precision, stats.queries + q.shape[0]
    if g is None:  # leave-one-out: the rows' ids, under whichever name the caller gave them
        name, ids = ("query_ids", qids) if gids is None else ("gallery_ids", gids)
        return search.leave_one_out(q, ids, name, block_size)
    return search.query_gallery(q, g, qids, gids, block_size, query_block_size)


class QueryRound(NamedTuple):
    """One query block of a sharded search, as every rank sees it.

    Attributes:
        start: global position of its first query.
        owner: the rank that holds the block (and collects its results).
        queries: the block, prepared as one process prepares it.
        gallery: this rank's gallery blocks, ``(global column, prepared rows)``.
        buffer: scratch memory for one (query block x gallery block) score matrix.
    """

    start: int
    owner: int
    queries: Prepared
    gallery: list[tuple[int, Prepared]]
    buffer: Tensor


class ShardedSearch:
    """The collective steps shared by both modes; one instance per call."""

    def __init__(
        self,
        k: int,
        metric: Metric,
        device: torch.device,
        group: Group,
        screen: Screen | None = None,
        stats: SearchStats | None = None,
    ) -> None:
        self.k, self.metric, self.device, self.group = k, metric, device, group
        self.screen, self.stats = screen or Screen(metric), stats
        self.world, self.rank = world_size(group), rank(group)
        probe = torch.empty(0, device=device)
        self.comm = comm_device(probe, group)

    def query_gallery(
        self, q: Tensor, g: Tensor, qids: Tensor | None, gids: Tensor | None, block_size: int | None, qbs: int
    ) -> Neighbors:
        q_sizes = gather_row_counts(q, "queries", self.group)
        g_sizes = gather_row_counts(g, "gallery", self.group)
        if q.shape[1] != g.shape[1]:  # layouts agree across ranks, so every rank raises here
            raise ValueError(f"gallery has dim {g.shape[1]} but queries have dim {q.shape[1]}")
        num_q, num_g = sum(q_sizes), sum(g_sizes)
        if num_q == 0:
            raise ValueError("queries are empty on every rank: expected at least one query row")
        check_k(self.k, num_g, "the gallery")
        if block_size is None:
            block_size = default_block_size(min(num_q, qbs))
        q_pos, _ = self._positions(qids, q.shape[0], q_sizes, "query_ids")
        g_pos, g_table = self._positions(gids, g.shape[0], g_sizes, "gallery_ids")

        moves, rounds = self.query_rounds(q, q_pos, g, g_pos, num_q, block_size, qbs)
        results: list[tuple[Tensor, Tensor]] = []
        screened: dict[int, ScreenRows] = {}  # this rank's gallery blocks, ready for screening once
        for r in rounds:
            qs = self.screen.rows(r.queries, "queries")
            state = ExactTopK(len(r.queries), self.k, self.device, self.stats)
            for col, gal in r.gallery:
                gs = screened.get(col)
                if gs is None:
                    gs = screened[col] = self.screen.rows(gal, "gallery", col)
                s = self.screen.scores(qs, gs, out=r.buffer)
                state.update(0, s, col, qs.points, gs.points, self.metric, self.screen.bounds(qs, gs))
            merged = self._gather_merge(state.scores, state.indices, r.owner)
            if merged is not None:
                results.append(merged)
        return self._return(results, moves, g_table)

    def query_rounds(
        self, q: Tensor, q_pos: Tensor, g: Tensor, g_pos: Tensor, num_q: int, block_size: int, qbs: int
    ) -> tuple[Exchange, Iterator[QueryRound]]:
        """Re-shard queries and gallery into the blocks one process uses, then each query block in turn.

        Gallery block ``b`` (``block_size`` rows in global order) lives on rank ``b % world``, prepared as one
        process prepares it; each round, the owner of the next query block (``qbs`` rows) broadcasts it.
        Returns the queries' :class:`Exchange` (to send results back) and the rounds, which every rank must
        walk through together.
        """
        q_moves = self.exchange(q_pos // qbs)
        q_rows, q_held = self.reshard(q, q_pos, q_moves)
        g_rows, g_held = self.reshard(g, g_pos, self.exchange(g_pos // block_size))
        like = self.origin(q_rows, q_held, num_q)
        g_f32 = g.dtype == torch.float32
        gallery = [
            (start, self.prepare(rows, start, g_f32, like, whole=False))
            for start, rows in split_blocks(g_rows, g_held, block_size)
        ]
        del g_rows
        q_blocks = dict(split_blocks(q_rows, q_held, qbs))
        q_f32, dim = q.dtype == torch.float32, q.shape[1]
        buffer = torch.empty(min(qbs, num_q) * block_size, device=self.device)

        def rounds() -> Iterator[QueryRound]:
            for start in range(0, num_q, qbs):
                owner = start // qbs % self.world
                block = self.broadcast(q_blocks.get(start), (min(qbs, num_q - start), dim), owner)
                yield QueryRound(
                    start, owner, self.prepare(block, start, q_f32, like, whole=True), gallery, buffer
                )

        return q_moves, rounds()

    def leave_one_out(self, x: Tensor, ids: Tensor | None, name: str, block_size: int | None) -> Neighbors:
        sizes = gather_row_counts(x, "queries", self.group)
        n = sum(sizes)
        check_k(self.k, n - 1, "the queries minus the excluded query itself")
        bs = 4096 if block_size is None else block_size
        pos, table = self._positions(ids, x.shape[0], sizes, name)
        moves = self.exchange(pos // bs)
        rows, held = self.reshard(x, pos, moves)
        like = self.origin(rows, held, n)
        f32 = x.dtype == torch.float32
        raw = dict(split_blocks(rows, held, bs))
        screen, metric = self.screen, self.metric
        own = {  # this rank's blocks: rows ready for screening and the running top-k of those rows
            start: (
                screen.rows(self.prepare(block, start, f32, like, whole=True), "queries", start),
                ExactTopK(len(block), self.k, self.device, self.stats),
            )
            for start, block in raw.items()
        }
        buffer = screen.buffer(min(bs, n), min(bs, n), self.device)
        for a in range(0, n, bs):
            count, owner = min(bs, n - a), a // bs % self.world
            block = self.broadcast(raw.get(a), (count, x.shape[1]), owner)
            # blocks (a, c) with c > a: scored once, here, for the queries of both a and c
            later = [c for c in own if c > a]
            from_later = ExactTopK(count, self.k, self.device, self.stats)
            if later:
                ra = (
                    own[a][0]
                    if a in own
                    else screen.rows(self.prepare(block, a, f32, like, whole=True), "queries", a)
                )
                for c in later:
                    rc = own[c][0]
                    s = screen.scores(ra, rc, out=buffer)
                    from_later.update(0, s, c, ra.points, rc.points, metric, screen.bounds(ra, rc))
                    own[c][1].update(0, s.T, a, rc.points, ra.points, metric, screen.bounds(rc, ra))
            if a in own:
                ra, state = own[a]
                s = screen.scores(ra, ra, out=buffer)
                s.fill_diagonal_(float("-inf"))
                state.update(0, s, a, ra.points, ra.points, metric, screen.bounds(ra, ra))
            mine = own[a][1] if a in own else None
            merged = self._gather_merge(from_later.scores, from_later.indices, owner, mine)
            if mine is not None and merged is not None:
                mine.scores, mine.indices = merged
        results = [(state.scores, state.indices) for _, (_, state) in sorted(own.items())]
        return self._return(results, moves, table)

    # -- steps ---------------------------------------------------------------------------------------------

    def _positions(
        self, ids: Tensor | None, n: int, sizes: list[int], name: str
    ) -> tuple[Tensor, Tensor | None]:
        """Each local row's position in the global id order, and the sorted global ids (None: 0..N-1)."""
        if ids is None:
            offset = shard_offsets(sizes)[self.rank]
            return torch.arange(offset, offset + n), None
        everything, _ = all_gather_uneven(ids.to(self.comm), self.group, name)
        owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        table = _unique_ids(everything.cpu(), name, owners)
        return torch.searchsorted(table, ids.cpu()), table

    def exchange(self, blocks: Tensor) -> Exchange:
        """Block ``b`` goes to rank ``b % world``: cyclic, so leave-one-out's triangle of pairs is balanced."""
        return Exchange(blocks % self.world, self.comm, self.group)

    def reshard(self, x: Tensor, pos: Tensor, moves: Exchange) -> tuple[Tensor, Tensor]:
        """Send rows (as float32, which is all the search reads) to their block owners; sorted by position."""
        rows = moves.forward(x.detach().to(self.comm, torch.float32))
        held = moves.forward(pos.to(self.comm))
        order = held.argsort()
        moves.arrival_order = order
        return rows[order].to(self.device), held[order].cpu()

    def origin(self, rows: Tensor, held: Tensor, total: int) -> Prepared | None:
        """For L2, what one process measures vectors from: chosen from the first queries in global order."""
        if self.metric != "l2":
            return None
        mine = rows[: int((held < min(total, ORIGIN_SAMPLE)).sum())]
        first, _ = all_gather_uneven(mine.to(self.comm), self.group, "origin sample")
        positions, _ = all_gather_uneven(held[: mine.shape[0]].to(self.comm), self.group, "origin positions")
        sample = first.to(self.device)[positions.cpu().argsort().to(self.device)]
        return Prepared(sample[:0], origin=l2_origin(sample))

    def prepare(
        self, rows: Tensor, start: int, was_f32: bool, like: Prepared | None, *, whole: bool
    ) -> Prepared:
        """Prepare a block as one process would, its operands at the same address alignment.

        One process either prepares the whole set and slices it (``whole``: queries, leave-one-out), so row
        ``start`` sits ``start * D * 4`` bytes past an aligned base, or prepares each gallery block on its own,
        which copies it (fresh, aligned) unless it is already float32 and needs no transform (then it stays a
        slice of the caller's float32 tensor).
        """
        row_bytes = rows.shape[1] * 4
        x = _placed(rows, start * row_bytes if whole or was_f32 else 0)
        prepared = prepare(x, self.metric, self.device, like=like)
        if whole:
            prepared = dataclasses.replace(prepared, vectors=_placed(prepared.vectors, start * row_bytes))
        return prepared

    def broadcast(self, block: Tensor | None, shape: tuple[int, int], owner: int) -> Tensor:
        t = block.to(self.comm) if block is not None else torch.empty(shape, device=self.comm)
        dist.broadcast(t, src=global_rank(self.group, owner), group=self.group)
        return t.to(self.device)

    def _gather_merge(
        self, scores: Tensor, indices: Tensor, owner: int, state: ExactTopK | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """Gather every rank's (rows, k) candidates at ``owner`` and keep the k best by (score, position)."""
        is_owner = self.rank == owner
        dst = global_rank(self.group, owner)
        gathered: list[list[Tensor]] = []
        for t in (scores, indices):
            t = t.to(self.comm).contiguous()
            parts = [torch.empty_like(t) for _ in range(self.world)] if is_owner else None
            dist.gather(t, parts, dst=dst, group=self.group)
            gathered.append([p.to(self.device) for p in parts or []])
        if not is_owner:
            return None
        all_scores, all_indices = gathered
        if state is not None:
            all_scores.append(state.scores)
            all_indices.append(state.indices)
        merged_scores, merged_indices = sort_by_score_then_index(
            torch.cat(all_scores, 1), torch.cat(all_indices, 1)
        )
        return merged_scores[:, : self.k].contiguous(), merged_indices[:, : self.k].contiguous()

    def _return(
        self, results: list[tuple[Tensor, Tensor]], moves: Exchange, table: Tensor | None
    ) -> Neighbors:
        """Send each query's result back to the rank and row it came from; positions become gallery ids."""
        k = self.k
        scores = torch.cat([s for s, _ in results]) if results else torch.empty(0, k, device=self.device)
        indices = torch.cat([i for _, i in results]) if results else torch.empty(0, k, dtype=torch.int64)
        scores = moves.backward(scores.to(self.comm))
        indices = moves.backward(indices.to(self.comm))
        if table is not None:
            indices = table[indices.cpu()]
        return Neighbors(to_user_scores(scores.to(self.device), self.metric), indices.to(self.device))


class Exchange:
    """Rows of this rank sent to a destination rank each (``all_to_all``), and results sent back the same way.

    ``forward`` delivers rows grouped by source rank; :attr:`arrival_order` (set by the receiver) says how it
    reordered them, and ``backward`` undoes both steps, so each row's result arrives at its original row.
    """

    def __init__(self, dest: Tensor, device: torch.device, group: Group) -> None:
        self.group = group
        self.order = dest.argsort(stable=True)
        self.send = torch.bincount(dest, minlength=world_size(group)).tolist()
        counts = torch.tensor(self.send, dtype=torch.int64, device=device)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        self.recv = received.tolist()
        self.arrival_order: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return _all_to_all(x[self.order.to(x.device)], self.recv, self.send, self.group)

    def backward(self, y: Tensor) -> Tensor:
        if self.arrival_order is not None:
            unsorted = torch.empty_like(y)
            unsorted[self.arrival_order.to(y.device)] = y
            y = unsorted
        back = _all_to_all(y, self.send, self.recv, self.group)
        out = torch.empty_like(back)
        out[self.order.to(back.device)] = back
        return out


def _all_to_all(x: Tensor, recv: list[int], send: list[int], group: Group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def split_blocks(rows: Tensor, held: Tensor, size: int) -> list[tuple[int, Tensor]]:
    """``(start, rows)`` of each whole block of ``size`` positions in ``rows`` (sorted by position)."""
    blocks, i = [], 0
    while i < len(held):
        start = int(held[i]) // size * size
        n = int((held[i : i + size] < start + size).sum())
        blocks.append((start, rows[i : i + n]))
        i += n
    return blocks


def _placed(x: Tensor, offset_bytes: int) -> Tensor:
    """``x`` as a contiguous tensor whose address is ``offset_bytes`` past a 64-byte boundary (modulo 64).

    One process slices its operands out of larger tensors; a BLAS may round differently at another alignment.
    """
    want = offset_bytes % _ALIGN
    if x.is_contiguous() and x.data_ptr() % _ALIGN == want:
        return x
    item = x.element_size()
    buffer = torch.empty(x.numel() + _ALIGN // item, dtype=x.dtype, device=x.device)
    shift = (want - buffer.data_ptr()) % _ALIGN // item
    out = buffer[shift : shift + x.numel()].view(x.shape)
    out.copy_(x)
    return out


# -- validation ----------------------------------------------------------------------------------------------


def _check_shard(x: Any, name: str) -> Tensor:
    """``x`` as a (rows, D) floating tensor of finite values; unlike a whole set, a shard may have no rows."""
    t = to_tensor(x, name)
    if t.ndim == 2 and t.shape[0] == 0 and t.shape[1] > 0:
        check_embeddings(t.new_zeros(1, t.shape[1]), name)  # the dtype checks, on a stand-in row
        return t
    return check_embeddings(t, name)


def _check_ids(ids: Any, n: int, name: str) -> Tensor | None:
    if ids is None:
        return None
    t = to_tensor(ids, name)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one global id per row), got {tuple(t.shape)}")
    t = t.to(torch.int64).cpu().contiguous()
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} must be >= 0 (global ids), got {int(t.min())}")
    return t


def _check_local(
    queries: Any,
    gallery: Any,
    k: Any,
    metric: Any,
    gallery_ids: Any,
    query_ids: Any,
    block_size: Any,
    query_block_size: Any,
) -> tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]]:
    """This rank's arguments, checked, and the settings every rank must agree on."""
    k = check_positive_int(k, "k")
    metric = check_choice(metric, "metric", Metric)
    query_block_size = check_positive_int(query_block_size, "query_block_size")
    if block_size is not None:
        block_size = check_positive_int(block_size, "block_size")
    q = _check_shard(queries, "queries")
    g = None if gallery is None else _check_shard(gallery, "gallery")
    qids = _check_ids(query_ids, q.shape[0], "query_ids")
    gids = _check_ids(gallery_ids, q.shape[0] if g is None else g.shape[0], "gallery_ids")
    if g is None and qids is not None and gids is not None and not torch.equal(qids, gids):
        raise ValueError(
            "with gallery=None the gallery is the queries: give their ids once (gallery_ids or query_ids), "
            "or equal tensors"
        )
    settings = (k, metric, block_size, query_block_size)
    modes = {"k": k, "metric": metric, "block_size": block_size, "query_block_size": query_block_size}
    modes |= {
        "gallery is None": g is None,
        "query_ids is None": qids is None,
        "gallery_ids is None": gids is None,
    }
    return (q, g, gids, qids, settings), tuple(modes.items())


def _unique_ids(ids: Tensor, name: str, owners: Tensor | None = None) -> Tensor:
    """``ids`` sorted, after refusing a repeated one (naming the ranks that give it, with ``owners``)."""
    table, _ = ids.sort()
    repeated = table[1:][table[1:] == table[:-1]]
    if repeated.numel():
        dup = int(repeated[0])
        on = (
            ""
            if owners is None
            else f" (on rank(s) {', '.join(map(str, sorted(set(owners[ids == dup].tolist()))))})"
        )
        raise ValueError(
            f"{name} must be unique over all ranks: id {dup} is given more than once{on}; "
            f"{repeated.unique().numel()} id(s) repeat"
        )
    return table


def _local_knn(
    queries: Any,
    gallery: Any,
    k: int,
    metric: Metric,
    gallery_ids: Any,
    query_ids: Any,
    block_size: int | None,
    query_block_size: int,
    device: torch.device | str | None,
    precision: Precision = "float32",
    stats: SearchStats | None = None,
) -> Neighbors:
    """A world of one: :func:`knn` on the rows ordered by id, answered in the caller's order and ids."""
    (q, g, gids, qids, _), _ = _check_local(
        queries, gallery, k, metric, gallery_ids, query_ids, block_size, query_block_size
    )
    if g is None:
        gids = gids if gids is not None else qids
        qids = gids
    for ids, name in ((qids, "query_ids"), (gids, "gallery_ids")):
        if ids is not None:
            _unique_ids(ids.cpu(), name)
    q_order = None if qids is None else qids.argsort()
    g_order = None if gids is None else gids.argsort()
    if q_order is not None:
        q = q[q_order.to(q.device)]
    if g is not None and g_order is not None:
        g = g[g_order.to(g.device)]
    found = knn(
        q,
        g,
        k=k,
        metric=metric,
        block_size=block_size,
        query_block_size=query_block_size,
        device=device,
        precision=precision,
        stats=stats,
    )
    scores, indices = found
    if gids is not None and g_order is not None:
        indices = gids[g_order][indices.cpu()].to(indices.device)
    if q_order is not None:
        inverse = torch.empty_like(q_order)
        inverse[q_order] = torch.arange(len(q_order))
        scores, indices = scores[inverse.to(scores.device)], indices[inverse.to(indices.device)]
    return Neighbors(scores, indices)
