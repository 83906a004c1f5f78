"""Exact graph reductions for the sharding-strategy ILP (see ``ilp.py``).

``Work`` holds a mutable copy of a strategy graph.  Every reduction keeps at
least one optimal solution of the original problem, and every eliminated node
leaves an entry on a reconstruction stack so that an assignment of the nodes
that remain maps back to a full assignment of the original graph.

``local_search`` (now in ``descent.py``, re-exported here) is the
memory-respecting block coordinate descent that gives the solver its start
solutions and repairs the answers of the soft-memory rounds.

Conventions: a forbidden choice is ``inf`` (inputs >= 1e15 are converted);
strategies are tracked by their ORIGINAL index (``strat[i]`` is sorted and only
ever shrinks); time is compressed to segments between liveness event points.

Memory.  With ``limit`` set, segment k holds the constraint
``sum_{i live at k} a_i[x_i] <= b_k`` where ``a_i = use_i - min(use_i)`` and
``b_k = limit - off_k - sum_{i live at k} min(use_i)``; ``off_k`` collects the
usage of eliminated nodes.  A segment is *binding* when
``sum max a_i > b_k``.  A node is *memory-free* when its usage is constant or it
is live in no binding segment; only memory-free nodes are eliminated (their
usage then cannot matter: binding status only ever goes down as strategies are
removed), and ``off`` gets their largest usage.  This keeps every reduction
exact with a memory limit, at the price of keeping memory-relevant leaves
(their pairs are Pareto-pruned instead).  A node merged through a functional
edge carries the usage of both: ``parts[i]`` is a list of (segment range,
usage per strategy).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from .dominance import INF, kept_strategies

FORBIDDEN = 1e15
_MAX_CHAIN = 2.5e7  # largest nu*nv*nw tensor for a degree-2 elimination
_CHAIN_BLOCK = 1 << 17   # entries of one block of rows of that tensor (_chain_min)


class Infeasible(Exception):
    """Raised by reductions when no assignment can satisfy the constraints."""


def _chain_min(a, cost_v, b):
    """(argmin over v, min) of a[u, v] + cost_v[v] + b[v, w], as (u, w) arrays,
    in blocks of u's rows of about _CHAIN_BLOCK entries: the whole u x v x w
    tensor reaches _MAX_CHAIN (2.5e7 entries, 200 MB) and costs page faults."""
    nu, nv = a.shape
    nw = b.shape[1]
    arg = np.empty((nu, nw), dtype=np.intp)
    mm = np.empty((nu, nw))
    step = max(1, _CHAIN_BLOCK // max(nv * nw, 1))
    for lo in range(0, nu, step):      # (summed in the order of the whole tensor: the same values)
        t = a[lo:lo + step, :, None] + cost_v[None, :, None] + b[None, :, :]
        arg[lo:lo + step] = np.argmin(t, axis=1)
        mm[lo:lo + step] = np.take_along_axis(t, arg[lo:lo + step, None, :], axis=1)[:, 0, :]
    return arg, mm


def _fin(a):
    a = np.asarray(a, dtype=np.float64)
    return np.where(a >= FORBIDDEN, INF, a)


REDUCTIONS = ("dominance", "leaf_pareto", "merge", "eliminate")   # the ones `skip` can turn off


class Work:
    def __init__(self, node_costs, node_usages, intervals, edges, edge_costs, usage_limit, skip=()):
        unknown = set(skip) - set(REDUCTIONS)
        if unknown:
            raise ValueError(f"unknown reduction {sorted(unknown)[0]!r} (known: {', '.join(REDUCTIONS)})")
        self.skip = frozenset(skip)
        n = len(node_costs)
        self.n = n
        self.alive = [True] * n
        self.strat = [np.arange(len(c)) for c in node_costs]
        self.cost = [_fin(c).copy() for c in node_costs]
        self.limit = None if usage_limit is None else float(usage_limit)
        pts = sorted({t for (s, e) in intervals if s < e for t in (s, e)})
        pos = {t: k for k, t in enumerate(pts)}
        # memory parts of a node: [(first segment, end segment, usage per strategy)]
        self.parts = [[(pos[s], pos[e], np.asarray(u, dtype=np.float64).copy())]
                      if s < e and self.limit is not None else []
                      for (s, e), u in zip(intervals, node_usages)]
        self.nseg = max(len(pts) - 1, 0)
        self.off = np.zeros(self.nseg)
        self.adj = [dict() for _ in range(n)]
        self.emat, self.ends = {}, {}
        self._eid = 0
        self.const = 0.0
        self.stack = []
        self.dirty = set(range(n))        # nodes whose dominance test may find more (dominance)
        self.with_usage: set = set()     # nodes last tested with the usage condition
        self.removed = defaultdict(int)
        self.times = defaultdict(float)
        for (u, v), m in zip(edges, edge_costs):
            self.add_edge(u, v, _fin(m))
        for i in range(n):
            if len(self.strat[i]) == 0:
                raise Infeasible(f"node {i} has no strategies")

    # ---- basic graph surgery -------------------------------------------------
    def add_edge(self, u, v, m):
        if u == v:  # self loop: only the diagonal can ever be chosen
            self.cost[u] = self.cost[u] + np.diag(m)
            self.removed["edges_self"] += 1
            return
        eid = self.adj[u].get(v)
        if eid is not None:  # parallel edge: costs add up
            self.emat[eid] = self.emat[eid] + (m if self.ends[eid][0] == u else m.T)
            self.removed["edges_parallel"] += 1
        else:
            eid = self._eid
            self._eid += 1
            self.emat[eid], self.ends[eid] = m, (u, v)
            self.adj[u][v] = eid
            self.adj[v][u] = eid
        self.dirty.update((u, v))

    def mat(self, eid, node):
        """Edge matrix with ``node``'s strategies as rows."""
        m = self.emat[eid]
        return m if self.ends[eid][0] == node else m.T

    def set_mat(self, eid, node, m):
        self.emat[eid] = m if self.ends[eid][0] == node else m.T
        self.dirty.update(self.ends[eid])

    def del_edge(self, eid):
        u, v = self.ends.pop(eid)
        del self.emat[eid], self.adj[u][v], self.adj[v][u]
        self.dirty.update((u, v))

    def keep(self, i, mask, why):
        if mask.all():
            return False
        if not mask.any():
            raise Infeasible(f"node {i}: every strategy is ruled out ({why})")
        self.removed[why] += int((~mask).sum())
        self.strat[i], self.cost[i] = self.strat[i][mask], self.cost[i][mask]
        self.parts[i] = [(a, b, u[mask]) for a, b, u in self.parts[i]]
        for nb, eid in self.adj[i].items():
            m = self.emat[eid]
            self.emat[eid] = m[mask] if self.ends[eid][0] == i else m[:, mask]
            self.dirty.add(nb)
        # i itself stays clean: dropping some of its strategies leaves every
        # other pair's dominance test as it was (the same rows against the same
        # columns), and the strategies dominance kept never dominate each other
        return True

    def kill(self, i, kind, entry, usage=True):
        """Remove node i (already detached from all edges) from the graph."""
        self.alive[i] = False
        self.removed[kind] += 1
        self.stack.append(entry)
        for a, b, u in self.parts[i] if usage else ():
            self.off[a:b] += u.max()

    def nodes(self):
        return [i for i in range(self.n) if self.alive[i]]

    def counts(self):
        alive = self.nodes()
        return {"nodes": len(alive), "edges": len(self.emat),
                "strategies": int(sum(len(self.strat[i]) for i in alive))}

    # ---- memory bookkeeping ----------------------------------------------------
    def mem_state(self):
        """(b, maxa_sum, memfree flags) for the current graph; None without a limit."""
        if self.limit is None:
            return None
        dmin = np.zeros(self.nseg + 1)
        dmax = np.zeros(self.nseg + 1)
        for i in self.nodes():
            for a, b, u in self.parts[i]:
                lo, hi = u.min(), u.max()
                dmin[a] += lo
                dmin[b] -= lo
                dmax[a] += hi - lo
                dmax[b] -= hi - lo
        bvec = self.limit - self.off - np.cumsum(dmin)[:-1]
        maxa = np.cumsum(dmax)[:-1]
        cb = np.concatenate([[0], np.cumsum(maxa > bvec)])
        free = [all(cb[b] == cb[a] or u.max() == u.min() for a, b, u in self.parts[i])
                for i in range(self.n)]
        return bvec, maxa, free

    def memory_constraints(self):
        """[({node: coefficients}, b_k)] for the binding segments k, minus those
        implied by another: k is implied by j when every variable-usage part
        live at k is live at j (j in the common window of those parts) and
        b_j <= b_k (ties: lower index wins), as coefficients are >= 0.
        Returns (constraints, number of binding segments)."""
        if self.limit is None:
            return [], 0
        bvec, maxa, _ = self.mem_state()
        live = [[] for _ in range(self.nseg)]
        for i in self.nodes():
            for a, b, u in self.parts[i]:
                if u.max() > u.min():
                    for k in range(a, b):
                        live[k].append((i, a, b, u))
        binding = np.flatnonzero(maxa > bvec)
        cons = []
        for k in binding:
            if not live[k]:  # maxa = 0 > b: over the limit at minimum usage
                raise Infeasible("memory limit exceeded even at minimum usage")
            lo = max(t[1] for t in live[k])
            hi = min(t[2] for t in live[k])
            j = lo + int(np.argmin(bvec[lo:hi]))
            if (bvec[j], j) < (bvec[k], k):
                continue
            terms = {}
            for i, _, _, u in live[k]:
                terms[i] = terms.get(i, 0.0) + (u - u.min())
            cons.append((terms, float(bvec[k])))
        return cons, len(binding)

    # ---- reductions -------------------------------------------------------------
    def drop_forbidden(self):
        """The only reduction of the plain model: strategies with forbidden cost."""
        for i in self.nodes():
            self.keep(i, np.isfinite(self.cost[i]), "strategies_forbidden")

    def prune(self):
        """Drop forbidden strategies, rows forbidden against a whole neighbour, and
        strategies whose extra usage exceeds the memory slack somewhere."""
        changed = False
        for i in self.nodes():
            mask = np.isfinite(self.cost[i])
            for eid in self.adj[i].values():
                mask &= np.isfinite(self.mat(eid, i)).any(axis=1)
            changed |= self.keep(i, mask, "strategies_forbidden")
        while self.limit is not None:
            bvec, _, _ = self.mem_state()
            again = False
            for i in self.nodes():
                mask = np.ones(len(self.strat[i]), bool)
                for a, b, u in self.parts[i]:
                    slack = bvec[a:b].min()
                    if slack < 0:
                        raise Infeasible(f"node {i}: memory limit exceeded even at minimum usage")
                    mask &= u - u.min() <= slack
                again |= self.keep(i, mask, "strategies_memory")
            changed |= again
            if not again:
                break
        return changed

    def normalize(self):
        """Move row and column minima of every edge into node costs; drop edges
        that become all zero (their cost is additive)."""
        changed = False
        for eid in list(self.emat):
            u, v = self.ends[eid]
            m = self.emat[eid]
            with np.errstate(invalid="ignore"):
                r = m.min(axis=1)
                if np.any(r != 0):
                    self.cost[u] = self.cost[u] + r
                    m = np.where(np.isfinite(r)[:, None], m - r[:, None], INF)
                c = m.min(axis=0)
                if np.any(c != 0):
                    self.cost[v] = self.cost[v] + c
                    m = np.where(np.isfinite(c)[None, :], m - c[None, :], INF)
            self.emat[eid] = m
            if not np.any(m):  # all zero (inf counts as nonzero)
                self.del_edge(eid)
                self.removed["edges_zero"] += 1
                changed = True
        return changed

    def fold_singletons(self):
        changed = False
        for i in self.nodes():
            if len(self.strat[i]) != 1:
                continue
            if not np.isfinite(self.cost[i][0]):
                raise Infeasible(f"node {i}: its only strategy is forbidden")
            for nb, eid in list(self.adj[i].items()):
                self.cost[nb] = self.cost[nb] + self.mat(eid, nb)[:, 0]
                self.del_edge(eid)
            self.const += float(self.cost[i][0])
            self.kill(i, "nodes_fixed", ("fix", i, int(self.strat[i][0])))
            changed = True
        return changed

    def _usage_le(self, i):
        """le[a, b]: strategy a uses no more memory than b in every part."""
        k = len(self.strat[i])
        le = np.ones((k, k), bool)
        for _, _, u in self.parts[i]:
            le &= u[:, None] <= u[None, :]
        return le

    def dominance(self, mem):
        """Remove strategy a of a node when some b is never worse: for every
        choice of the neighbours, switching a->b does not raise the cost
        (cost_b - cost_a + sum_e max_j (M_e[b,j] - M_e[a,j]) <= 0) and, for a
        memory-relevant node, use_b <= use_a.  This relation is transitive, so
        removing sequentially is exact; identical strategies merge.

        The full test is O(k^2 m) per edge (k strategies, m neighbour
        strategies); it runs only on the pairs that pass a necessary test over
        a few sampled columns of every edge (O(k^2) per edge), so its cost
        follows the (usually small) number of near-dominated pairs."""
        changed = False
        freed = {i for i in self.with_usage if mem is None or mem[2][i]}   # the usage test is gone
        self.with_usage -= freed
        # the cheapest tests first (strategies x neighbours' strategies): what they remove
        # makes the larger nodes' tests smaller and stronger (PaLM 540B both phases:
        # eliminate.solve 1.74 -> 1.53 s median)
        todo = sorted((i for i in self.dirty | freed if self.alive[i]),
                      key=lambda i: (len(self.strat[i]) * sum(len(self.strat[u]) for u in self.adj[i]), i))
        self.dirty = set()
        for i in todo:
            k = len(self.strat[i])
            if k <= 1:
                continue
            if not np.isfinite(self.cost[i]).all():
                self.dirty.add(i)   # untested: prune drops the forbidden strategies first
                continue
            mats = [self.mat(eid, i) for eid in self.adj[i].values()]
            usage = mem is not None and not mem[2][i]
            if usage:
                self.with_usage.add(i)
            mask = kept_strategies(self.cost[i], mats, self._usage_le(i) if usage else None)
            changed |= self.keep(i, mask, "strategies_dominated")
        return changed

    def leaf_pareto(self, mem):
        """For a memory-relevant leaf v with neighbour u: given u's strategy i,
        only v's strategies that are Pareto-optimal in (cost_v + M[i, .], usage)
        can be needed; the other pairs become forbidden.  Often this leaves one
        pair per row, and the functional edge is then merged."""
        changed = False
        for v in self.nodes():
            if len(self.adj[v]) != 1 or mem is None or mem[2][v]:
                continue
            (u, eid), = self.adj[v].items()
            m = self.mat(eid, u)
            t = m + self.cost[v][None, :]
            le = self._usage_le(v)
            k = len(self.strat[v])
            idx = np.arange(k)
            tie = le & (~le.T | (idx[:, None] < idx[None, :]))  # usage: weakly better, ties by index
            # j1 dominates j2 in row i
            dom = (t[:, :, None] < t[:, None, :]) & le[None] | (t[:, :, None] == t[:, None, :]) & tie[None]
            dom &= np.isfinite(t)[:, :, None]
            dom[:, idx, idx] = False
            bad = dom.any(axis=1) & np.isfinite(m)
            if bad.any():
                self.removed["pairs_leaf_pareto"] += int(bad.sum())
                self.set_mat(eid, u, np.where(bad, INF, m))
                changed = True
        return changed

    def merge_functional(self):
        """Edge on which each strategy of u allows exactly one strategy of v:
        v = f(u), so v merges into u (costs, usage parts and edges follow f)."""
        changed = False
        for eid in list(self.emat):
            if eid not in self.emat:
                continue
            u, v = self.ends[eid]
            fin = np.isfinite(self.emat[eid])
            if not (fin.sum(axis=1) == 1).all():
                if not (fin.sum(axis=0) == 1).all():
                    continue
                u, v = v, u
            m = self.mat(eid, u)
            f = np.argmax(np.isfinite(m), axis=1)
            self.cost[u] = self.cost[u] + self.cost[v][f] + m[np.arange(len(f)), f]
            self.parts[u] = self.parts[u] + [(a, b, w[f]) for a, b, w in self.parts[v]]
            self.del_edge(eid)
            for w, e2 in list(self.adj[v].items()):
                n = self.mat(e2, v)[f]
                self.del_edge(e2)
                self.add_edge(u, w, n)
            self.kill(v, "nodes_merged", ("leaf", v, u, self.strat[u].copy(), self.strat[v][f]), usage=False)
            changed = True
        return changed

    def eliminate(self, mem):
        """Eliminate memory-free nodes of degree 0, 1 and 2 (min over the node)."""
        free = mem[2] if mem is not None else [True] * self.n
        queue = [i for i in self.nodes() if free[i] and len(self.adj[i]) <= 2]
        changed = False
        while queue:
            v = queue.pop()
            if not self.alive[v] or not free[v]:
                continue
            deg = len(self.adj[v])
            if not np.isfinite(self.cost[v]).any():
                raise Infeasible(f"node {v}: every strategy is ruled out (forbidden)")
            if deg == 0:
                j = int(np.argmin(self.cost[v]))
                self.const += float(self.cost[v][j])
                self.kill(v, "nodes_isolated", ("fix", v, int(self.strat[v][j])))
            elif deg == 1:
                (u, eid), = self.adj[v].items()
                t = self.mat(eid, u) + self.cost[v][None, :]
                arg = np.argmin(t, axis=1)
                self.cost[u] = self.cost[u] + t[np.arange(len(arg)), arg]
                self.del_edge(eid)
                self.kill(v, "nodes_leaf", ("leaf", v, u, self.strat[u].copy(), self.strat[v][arg]))
                queue.append(u)
            elif deg == 2:
                (u, e1), (w, e2) = sorted(self.adj[v].items())
                a, b = self.mat(e1, u), self.mat(e2, v)
                if a.shape[0] * a.shape[1] * b.shape[1] > _MAX_CHAIN:
                    continue
                arg, mm = _chain_min(a, self.cost[v], b)
                self.del_edge(e1)
                self.del_edge(e2)
                self.add_edge(u, w, mm)
                self.kill(v, "nodes_chain", ("chain", v, u, w, self.strat[u].copy(),
                                              self.strat[w].copy(), self.strat[v][arg]))
                queue += [u, w]
            else:
                continue
            changed = True
        return changed

    def run(self):
        """Apply all reductions (but those in ``skip``) until nothing changes."""
        while True:
            changed = False
            for name, fn in (("normalize", self.normalize), ("prune", self.prune),
                             ("fold", self.fold_singletons)):
                t0 = time.perf_counter()
                changed |= fn()
                self.times[name] += time.perf_counter() - t0
            t0 = time.perf_counter()
            mem = self.mem_state()
            self.times["memory"] += time.perf_counter() - t0
            for name, fn in (("eliminate", self.eliminate), ("dominance", self.dominance),
                             ("leaf_pareto", self.leaf_pareto), ("merge", lambda _: self.merge_functional())):
                if name in self.skip:
                    continue
                t0 = time.perf_counter()
                changed |= fn(mem)
                self.times[name] += time.perf_counter() - t0
                if changed and mem is not None and name in ("leaf_pareto", "merge"):
                    mem = self.mem_state()  # merging adds usage parts to a node
            if not changed:
                return

    def lower_bound(self):
        """const + sum of node minima: valid once edges are normalized (residual >= 0)."""
        return self.const + sum(float(self.cost[i].min()) for i in self.nodes())

    def prune_by_bound(self, ub):
        """Exact for the optimum: every term of a solution of cost <= ub is at most
        ub - lower_bound() above its own minimum, so larger terms go."""
        self.normalize()
        slack = ub - self.lower_bound()
        slack += 1e-9 * max(1.0, abs(ub))
        if slack < 0:
            return False
        changed = False
        for i in self.nodes():
            changed |= self.keep(i, self.cost[i] - self.cost[i].min() <= slack, "strategies_bound")
        for eid, m in list(self.emat.items()):
            big = m > slack
            big &= np.isfinite(m)
            if big.any():
                self.removed["pairs_bound"] += int(big.sum())
                self.emat[eid] = np.where(big, INF, m)
                self.dirty.update(self.ends[eid])
                changed = True
        return changed

    # ---- reconstruction ---------------------------------------------------------
    def reconstruct(self, partial):
        """partial: {alive node: original strategy}. Returns the full assignment."""
        x = [-1] * self.n
        for i, s in partial.items():
            x[i] = int(s)
        for entry in reversed(self.stack):
            if entry[0] == "fix":
                x[entry[1]] = entry[2]
            elif entry[0] == "leaf":
                _, v, u, su, arg = entry
                x[v] = int(arg[np.searchsorted(su, x[u])])
            else:
                _, v, u, w, su, sw, arg = entry
                x[v] = int(arg[np.searchsorted(su, x[u]), np.searchsorted(sw, x[w])])
        return x



from .descent import local_search  # noqa: E402,F401  (re-exported: its historical home)
