"""Dominance between the strategies of one node of a strategy graph: the test
behind reduce.Work.dominance.

Strategy a is dominated by b when switching a -> b never raises the cost,
whatever the neighbours choose: cost[b] - cost[a] + sum_e max_j (M_e[b, j] -
M_e[a, j]) <= 0 over the node's edge matrices M_e (its strategies as rows; a
column that a forbids never counts). The relation is transitive, so removing
dominated strategies one by one is exact. The whole test is O(k^2 m) per edge
(k strategies, m neighbour strategies); kept_strategies runs it exactly only
on the pairs a necessary test over a few sampled columns leaves, on each
edge's distinct columns, in blocks that stay in cache, and through a skyline
where many pairs are left.
"""
from __future__ import annotations

import numpy as np

INF = np.inf

_SAMPLE_COLUMNS = 6     # columns per edge in the necessary test of dominance
_PAIR_CHUNK = 1 << 17   # pair x column entries per block of the exact test
_FULL_TEST_MAX = 1 << 21   # k x k x columns up to which every pair is tested at once (no sampling)


# Stand-ins for inf in the dominance test, so that it runs on finite numbers with
# no masks: a strategy's forbidden pair is _AS_A when it is the one switched away
# from, _AS_B when it is the one switched to. Real costs are below FORBIDDEN (1e15),
# so b - a is then ~-_AS_A (a forbids that column: it never counts against b),
# ~+_AS_B (only b forbids it) or ~-_AS_A (both), as with inf and the masks; the
# sums of a test stay far from overflow (|sum| < 1e303 for any degree < 1000).
_AS_A, _AS_B = 1e300, 1e250


def _as_a(m):
    return np.where(np.isinf(m), _AS_A, m)


def _as_b(m):
    return np.where(np.isinf(m), _AS_B, m)


def _edge_gain(m_b, m_a):
    """max_j (m_b[., j] - m_a[., j]) row by row, on matrices from _as_b and
    _as_a: a column that a forbids never counts against b and one that only b
    forbids is (about) +_AS_B. Every finite entry gives the same value as
    with inf and masks. (An a whose row forbids every column of an edge gets
    about -_AS_A, which a sum would let outweigh another edge's +_AS_B:
    _dominated_pairs decides those rows apart.)"""
    return (m_b - m_a).max(axis=-1)


def _masked_gain(m_b, m_a):
    """_edge_gain on matrices with inf: a column that a forbids (m_a inf) never
    counts against b, one that only b forbids is +inf. With no mask: where a
    forbids, b - a is -inf, or nan when b forbids too, and fmax passes over
    nan; a row that is nan throughout (both forbid every column) is -inf, as
    masked. (4x faster than masking those columns to -inf, the same values.)"""
    with np.errstate(invalid="ignore"):
        gain = np.fmax.reduce(m_b - m_a, axis=-1)
    gain[np.isnan(gain)] = -INF
    return gain


def _dead_rows(dead, mats):
    """dom[a, b] for the strategies a that forbid every column of some edge:
    that edge's term is -inf, so a is dominated by every b except where
    another term is +inf (b forbids a column that a allows: -inf + inf)."""
    k = len(dead)
    out = np.zeros((int(dead.sum()), k), bool)
    for r, a in enumerate(np.flatnonzero(dead)):
        pos = np.zeros(k, bool)
        for m in mats:
            pos |= np.isinf(m[:, np.isfinite(m[a])]).any(axis=1)
        out[r] = ~pos
        out[r, a] = False
    return out


def _dominated_pairs(cost, mats):
    """dom[a, b]: switching strategy a to b never raises the cost, whatever
    the neighbours choose (cost[b] - cost[a] + sum_e max_j (M_e[b,j] - M_e[a,j]) <= 0).

    A lower bound of each edge's term comes from a few sampled columns (k x k
    work per column); the pairs it does not rule out get the exact term edge
    by edge, dropping every pair whose bound turns positive."""
    dead = np.zeros(len(cost), bool)
    for m in mats:
        dead |= np.isinf(m).all(axis=1)
    dom = _live_dominated_pairs(cost, mats, dead)
    if dead.any():
        dom[dead] = _dead_rows(dead, mats)
    return dom


def _sampled_bound(cost, mats, dead):
    """lb[a, b] <= the exact dominance sum, from a few sampled columns per edge
    (k x k work per column), and each edge's sampled term; (None, None) when
    no pair is left (every lb > 0). Dead rows are left out (lb inf)."""
    k = len(cost)
    lb = cost[None, :] - cost[:, None]          # lb[a, b]: a lower bound of the exact sum
    np.fill_diagonal(lb, INF)
    lb[dead] = INF
    sampled = []
    with np.errstate(invalid="ignore"):     # (the masked form: faster here than the stand-ins, measured)
        for m in mats:
            spread = np.ptp(np.where(np.isfinite(m), m, 0.0), axis=0)   # columns that tell rows apart
            cols = np.unique(np.concatenate([np.argsort(-spread, kind="stable")[:_SAMPLE_COLUMNS // 2],
                                             np.linspace(0, m.shape[1] - 1, _SAMPLE_COLUMNS // 2).astype(int)]))
            best = np.full((k, k), -INF)
            for col in m[:, cols].T:
                # d[a, b] = col[b] - col[a]; where a forbids the column it is -inf or
                # nan (b forbids it too), and fmax passes over nan: a's term ignores it
                d = col[None, :] - col[:, None]
                np.fmax(best, d, out=best)
            lb += best
            sampled.append(best)
            if not (lb <= 0).any():
                return None, None
    return lb, sampled


def _live_dominated_pairs(cost, mats, dead):
    """_dominated_pairs for the rows not `dead` (those rows come out False)."""
    k = len(cost)
    none = np.zeros((k, k), bool)
    if k * k * sum(m.shape[1] for m in mats) <= _FULL_TEST_MAX:   # small: sampling would not pay
        d = cost[None, :] - cost[:, None]
        for m in mats:     # in blocks of a's rows: a k x k x columns temporary is up to 16 MB
            mb, ma = _as_b(m)[None, :, :], _as_a(m)[:, None, :]
            step = max(1, _PAIR_CHUNK // max(k * m.shape[1], 1))
            for lo in range(0, k, step):
                d[lo:lo + step] += _edge_gain(mb, ma[lo:lo + step])
        np.fill_diagonal(d, INF)
        d[dead] = INF
        return d <= 0
    lb, sampled = _sampled_bound(cost, mats, dead)
    return none if lb is None else _exact_pairs(cost, mats, lb, sampled)


def _exact_pairs(cost, mats, lb, sampled):
    """dom[a, b] for the pairs the sampled bound leaves (lb <= 0): each edge's
    sampled term made exact, cheapest edge first, a pair dropped as soon as
    its sum is positive."""
    k = len(cost)
    none = np.zeros((k, k), bool)
    with np.errstate(invalid="ignore"):
        a_ix, b_ix = np.nonzero(lb <= 0)
        order = sorted(range(len(mats)), key=lambda e: mats[e].shape[1])
        terms = np.array([sampled[e][a_ix, b_ix] for e in order]).reshape(len(order), len(a_ix))
        base = cost[b_ix] - cost[a_ix]
        for pos, e in enumerate(order):       # sampled terms become exact, cheapest edge first
            if len(a_ix) == 0:
                return none
            m = mats[e]
            step = max(1, _PAIR_CHUNK // max(m.shape[1], 1))
            for lo in range(0, len(a_ix), step):
                sl = slice(lo, lo + step)
                terms[pos, sl] = _masked_gain(m[b_ix[sl]], m[a_ix[sl]])
            keep = base + terms.sum(axis=0) <= 0    # recomputed, as terms may be -inf
            a_ix, b_ix, base, terms = a_ix[keep], b_ix[keep], base[keep], terms[:, keep]
    dom = none
    dom[a_ix, b_ix] = True
    return dom


_SKYLINE_PAIRS = 100  # candidate pairs per strategy above which a node's kept set comes from _skyline (measured: it loses below ~60)


def _undominated(dom):
    """The strategies the sequential removal keeps (dom[a, b]: b dominates a):
    a goes when some b still kept dominates it, in index order."""
    mask = np.ones(len(dom), bool)
    for a in np.flatnonzero(dom.any(axis=1)):
        if (dom[a] & mask).any():
            mask[a] = False
    return mask


def _skyline(cost, mats, cand, le):
    """_undominated of the full dominance relation without testing every
    candidate pair. The relation is transitive, so the sequential removal keeps
    exactly the strategies that no other beats (b beats a: b dominates a, and
    a does not dominate b or b has the larger index). If b dominates a, then
    g(b) <= g(a) for g = cost + each edge's row minimum (take a's cheapest
    column), so in the order of g a strategy can only be beaten by one before
    it (or by one of about equal g: those groups are settled pairwise) and one
    kept is never beaten later: each strategy is tested only against the kept
    ones that the sampled test (cand) leaves. le: usage condition or None."""
    k = len(cost)
    with np.errstate(invalid="ignore"):
        g = cost + sum(np.where(np.isfinite(m), m, INF).min(axis=1) for m in mats)
    order = np.argsort(g, kind="stable")
    tol = 1e-9 * (1.0 + np.abs(g[order]))      # well above rounding, far below any real difference
    kept: list = []
    i = 0
    while i < k:
        j = i + 1
        while j < k and g[order[j]] - g[order[i]] <= tol[i]:
            j += 1
        group = np.sort(order[i:j])
        alive = np.asarray(kept, dtype=int)
        left = []
        for a in group:
            bs = alive[cand[a, alive]] if len(alive) else alive
            if len(bs):
                total = cost[bs] - cost[a]
                with np.errstate(invalid="ignore"):
                    for m in mats:
                        total = total + _masked_gain(m[bs], m[a][None, :])
                if (total <= 0).any():
                    continue
            left.append(a)
        if len(left) > 1:      # about equal g: the sequential removal among them, by index
            sub = np.asarray(left)
            dom = _dominated_pairs(cost[sub], [m[sub] for m in mats])
            if le is not None:
                dom &= le[np.ix_(sub, sub)].T
            np.fill_diagonal(dom, False)
            left = list(sub[_undominated(dom)])
        kept += left
        i = j
    mask = np.zeros(k, bool)
    mask[kept] = True
    return mask


def _distinct_columns(m):
    """m without repeated columns (the first of each, in order). A column equal
    to another gives every pair the same difference, so the max over columns
    in the dominance test is the same bit for bit without it; consumers that
    want the same layout of a tensor make such columns (PaLM 540B both phases:
    39% of the k x k x columns work of the tests)."""
    if m.shape[1] < 2:
        return m
    rows = np.ascontiguousarray(m.T).view(np.dtype((np.void, m.shape[0] * m.itemsize))).ravel()
    _, first = np.unique(rows, return_index=True)
    return m if len(first) == m.shape[1] else m[:, np.sort(first)]


def kept_strategies(cost, mats, le=None):
    """The strategies dominance keeps: _undominated of _dominated_pairs (with
    the usage condition le[a, b]: a uses no more than b, for memory-relevant
    nodes), through _skyline when the sampled test leaves many candidate
    pairs (PaLM 540B: a 454-strategy node with 78k dominated pairs). The
    tests see each edge's distinct columns only (_distinct_columns)."""
    mats = [_distinct_columns(m) for m in mats]
    k = len(cost)
    dead = np.zeros(k, bool)
    for m in mats:
        dead |= np.isinf(m).all(axis=1)
    if k * k * sum(m.shape[1] for m in mats) > _FULL_TEST_MAX and not dead.any():
        lb, sampled = _sampled_bound(cost, mats, dead)
        if lb is None:
            return np.ones(k, bool)
        cand = lb <= 0
        if le is not None:
            cand &= le.T
        if cand.sum() > _SKYLINE_PAIRS * k:
            return _skyline(cost, mats, cand, le)
        dom = _exact_pairs(cost, mats, lb, sampled)    # (_dominated_pairs would sample again)
    else:
        dom = _dominated_pairs(cost, mats)
    if le is not None:
        dom &= le.T
    np.fill_diagonal(dom, False)
    return _undominated(dom)
