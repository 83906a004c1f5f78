"""Exact graph reductions for the sharding-strategy ILP (see ``ilp.py``).

``Work`` holds a mutable copy of a strategy graph.  Every reduction keeps at
least one optimal solution of the original problem, and every eliminated node
leaves an entry on a reconstruction stack so that an assignment of the nodes
that remain maps back to a full assignment of the original graph.

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
exact with a memory limit, at the price of keeping memory-relevant leaves.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

INF = np.inf
FORBIDDEN = 1e15
_MAX_CHAIN = 2.5e7  # largest nu*nv*nw tensor for a degree-2 elimination


class Infeasible(Exception):
    """Raised by reductions when no assignment can satisfy the constraints."""


def _fin(a):
    a = np.asarray(a, dtype=np.float64)
    return np.where(a >= FORBIDDEN, INF, a)


class Work:
    def __init__(self, node_costs, node_usages, intervals, edges, edge_costs, usage_limit):
        n = len(node_costs)
        self.n = n
        self.alive = [True] * n
        self.strat = [np.arange(len(c)) for c in node_costs]
        self.cost = [_fin(c).copy() for c in node_costs]
        self.use = [np.asarray(u, dtype=np.float64).copy() for u in node_usages]
        self.limit = None if usage_limit is None else float(usage_limit)
        pts = sorted({t for (s, e) in intervals if s < e for t in (s, e)})
        pos = {t: k for k, t in enumerate(pts)}
        self.seg = [(pos[s], pos[e]) if s < e else (0, 0) for (s, e) in intervals]
        self.nseg = max(len(pts) - 1, 0)
        self.off = np.zeros(self.nseg)
        self.adj = [dict() for _ in range(n)]
        self.emat, self.ends = {}, {}
        self._eid = 0
        self.const = 0.0
        self.stack = []
        self.dirty = set(range(n))
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
        self.strat[i], self.cost[i], self.use[i] = self.strat[i][mask], self.cost[i][mask], self.use[i][mask]
        for nb, eid in self.adj[i].items():
            m = self.emat[eid]
            self.emat[eid] = m[mask] if self.ends[eid][0] == i else m[:, mask]
            self.dirty.add(nb)
        self.dirty.add(i)
        return True

    def kill(self, i, kind, entry):
        """Remove node i (already detached from all edges) from the graph."""
        self.alive[i] = False
        self.removed[kind] += 1
        self.stack.append(entry)
        a, b = self.seg[i]
        if a < b:
            self.off[a:b] += self.use[i].max()

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
            a, b = self.seg[i]
            if a < b:
                lo = self.use[i].min()
                dmin[a] += lo
                dmin[b] -= lo
                dmax[a] += self.use[i].max() - lo
                dmax[b] -= self.use[i].max() - lo
        bvec = self.limit - self.off - np.cumsum(dmin)[:-1]
        maxa = np.cumsum(dmax)[:-1]
        binding = maxa > bvec
        cb = np.concatenate([[0], np.cumsum(binding)])
        free = [True] * self.n
        for i in self.nodes():
            a, b = self.seg[i]
            if a < b and cb[b] > cb[a] and self.use[i].max() > self.use[i].min():
                free[i] = False
        return bvec, maxa, free

    # ---- reductions -------------------------------------------------------------
    def prune(self):
        """Drop forbidden strategies, rows forbidden against a whole neighbour, and
        strategies whose extra usage exceeds the memory slack somewhere."""
        changed = False
        for i in self.nodes():
            mask = np.isfinite(self.cost[i])
            changed |= self.keep(i, mask, "strategies_forbidden")
            mask = np.ones(len(self.strat[i]), bool)
            for eid in self.adj[i].values():
                mask &= np.isfinite(self.mat(eid, i)).any(axis=1)
            changed |= self.keep(i, mask, "strategies_forbidden")
        while self.limit is not None:
            bvec, _, _ = self.mem_state()
            again = False
            for i in self.nodes():
                a, b = self.seg[i]
                if a < b:
                    slack = bvec[a:b].min()
                    if slack < 0:
                        raise Infeasible(f"node {i}: memory limit exceeded even at minimum usage")
                    again |= self.keep(i, self.use[i] - self.use[i].min() <= slack, "strategies_memory")
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
            for nb, eid in list(self.adj[i].items()):
                self.cost[nb] = self.cost[nb] + self.mat(eid, nb)[:, 0]
                self.del_edge(eid)
            self.const += float(self.cost[i][0])
            self.kill(i, "nodes_fixed", ("fix", i, int(self.strat[i][0])))
            changed = True
        return changed

    def dominance(self, mem):
        """Remove strategy a of a node when some b is never worse: for every
        choice of the neighbours, switching a->b does not raise the cost
        (cost_b - cost_a + sum_e max_j (M_e[b,j] - M_e[a,j]) <= 0) and, for a
        memory-relevant node, use_b <= use_a.  This relation is transitive, so
        removing sequentially is exact; identical strategies merge."""
        changed = False
        todo, self.dirty = sorted(i for i in self.dirty if self.alive[i]), set()
        for i in todo:
            k = len(self.strat[i])
            if k <= 1:
                continue
            if not np.isfinite(self.cost[i]).all():
                continue
            d = self.cost[i][None, :] - self.cost[i][:, None]  # d[a, b]
            for eid in self.adj[i].values():
                m = self.mat(eid, i)
                with np.errstate(invalid="ignore"):
                    diff = m[None, :, :] - m[:, None, :]
                diff[np.broadcast_to(np.isinf(m)[:, None, :], diff.shape)] = -INF
                d += diff.max(axis=2) if m.shape[1] else 0.0
            if mem is not None and not mem[2][i]:
                d[self.use[i][None, :] > self.use[i][:, None]] = INF
            np.fill_diagonal(d, INF)
            dom = d <= 0
            if not dom.any():
                continue
            mask = np.ones(k, bool)
            for a in range(k):
                if (dom[a] & mask).any():
                    mask[a] = False
            changed |= self.keep(i, mask, "strategies_dominated")
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
                t = a[:, :, None] + self.cost[v][None, :, None] + b[None, :, :]
                arg = np.argmin(t, axis=1)
                mm = np.take_along_axis(t, arg[:, None, :], axis=1)[:, 0, :]
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
        """Apply all reductions until nothing changes."""
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
            for name, fn in (("dominance", self.dominance), ("eliminate", self.eliminate)):
                t0 = time.perf_counter()
                changed |= fn(mem)
                self.times[name] += time.perf_counter() - t0
            if not changed:
                return

    def drop_forbidden(self):
        """The only reduction of the plain model: strategies with forbidden cost."""
        for i in self.nodes():
            self.keep(i, np.isfinite(self.cost[i]), "strategies_forbidden")

    def memory_constraints(self):
        """[(memory-relevant nodes live in segment k, b_k)] for the binding
        segments, minus those implied by another: segment k is implied by j when
        every node of k is live at j (j lies in the common window of k's
        intervals) and b_j <= b_k (ties: lower index wins), as coefficients
        a_i >= 0.  Returns (constraints, number of binding segments)."""
        if self.limit is None:
            return [], 0
        bvec, maxa, _ = self.mem_state()
        live = [[] for _ in range(self.nseg)]
        for i in self.nodes():
            a, b = self.seg[i]
            if a < b and self.use[i].max() > self.use[i].min():
                for k in range(a, b):
                    live[k].append(i)
        binding = np.flatnonzero(maxa > bvec)
        cons = []
        for k in binding:
            lo = max(self.seg[i][0] for i in live[k])
            hi = min(self.seg[i][1] for i in live[k])
            j = lo + int(np.argmin(bvec[lo:hi]))
            if (bvec[j], j) < (bvec[k], k):
                continue
            cons.append((live[k], float(bvec[k])))
        return cons, len(binding)

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


def local_search(work, start=None, t_cap=None, passes=60):
    """Memory-respecting greedy start + coordinate descent + edge pair moves on
    the graph left in ``work``.  Moves are ranked by (number of forbidden pairs,
    cost).  Returns {node: original strategy} or None when forbidden pairs
    remain.  Deterministic unless ``t_cap`` (seconds) cuts it short."""
    t0 = time.perf_counter()
    nodes = work.nodes()
    if not nodes:
        return {}
    pos = {i: p for p, i in enumerate(nodes)}
    P = len(nodes)
    cost = [work.cost[i] for i in nodes]
    nbr = [dict() for _ in range(P)]
    for eid, (u, v) in work.ends.items():
        m = work.emat[eid]
        nbr[pos[u]][pos[v]] = (m, np.isinf(m), np.where(np.isinf(m), 0.0, m))
        nbr[pos[v]][pos[u]] = (m.T, np.isinf(m).T, np.where(np.isinf(m), 0.0, m).T)
    cons, _ = work.memory_constraints()
    a = [work.use[i] - work.use[i].min() for i in nodes]
    ncons = [set() for _ in range(P)]
    for c, (members, _) in enumerate(cons):
        for i in members:
            ncons[pos[i]].add(c)
    bvec = np.array([b for _, b in cons], dtype=np.float64)
    used = np.zeros(len(cons))
    x = [-1] * P

    def local(p, skip=-1):
        viol = np.zeros(len(cost[p]))
        loc = cost[p].copy()
        for q, (m, bad, fin) in nbr[p].items():
            if q == skip:
                continue
            if x[q] < 0:  # unassigned neighbour: optimistic row minimum
                loc += np.where(bad, INF, m).min(axis=1)
            else:
                viol += bad[:, x[q]]
                loc += fin[:, x[q]]
        return viol, loc

    def room(p):
        ok = np.ones(len(cost[p]), bool)
        cur = a[p][x[p]] if x[p] >= 0 else 0.0
        for c in ncons[p]:
            ok &= a[p] <= bvec[c] - used[c] + cur
        return ok

    def move(p, s):
        if x[p] >= 0:
            for c in ncons[p]:
                used[c] -= a[p][x[p]]
        x[p] = int(s)
        for c in ncons[p]:
            used[c] += a[p][s]

    def pick(viol, loc, ok):
        viol = np.where(ok, viol, INF)
        best = viol.min()
        return int(np.argmin(np.where(viol == best, loc, INF)))

    if start is not None:
        for p, i in enumerate(nodes):
            s = np.searchsorted(work.strat[i], start.get(i, -1))
            if s < len(work.strat[i]) and work.strat[i][s] == start.get(i, -1) and room(p)[s]:
                move(p, s)
    # greedy for the rest, breadth first from the best-connected nodes
    order, seen = [], set()
    for r in sorted(range(P), key=lambda p: -len(nbr[p])):
        if r in seen:
            continue
        seen.add(r)
        queue = [r]
        while queue:
            p = queue.pop(0)
            order.append(p)
            for q in sorted(nbr[p], key=lambda q: -len(nbr[q])):
                if q not in seen:
                    seen.add(q)
                    queue.append(q)
    for p in order:
        if x[p] < 0:
            move(p, pick(*local(p), room(p)))
    key = lambda v, l: (v, l)
    for _ in range(passes):
        improved = False
        for p in order:
            viol, loc = local(p)
            s = pick(viol, loc, room(p))
            if key(viol[s], loc[s]) < key(viol[x[p]], loc[x[p]] - 1e-9 * abs(loc[x[p]])):
                move(p, s)
                improved = True
        for p in order:
            for q, (m, bad, fin) in nbr[p].items():
                if q < p:
                    continue
                vp, lp = local(p, q)
                vq, lq = local(q, p)
                vv = vp[:, None] + vq[None, :] + bad
                ll = lp[:, None] + lq[None, :] + fin
                ok = np.ones(m.shape, bool)
                for c in ncons[p] | ncons[q]:
                    base = used[c]
                    add = np.zeros(m.shape)
                    if c in ncons[p]:
                        base -= a[p][x[p]]
                        add += a[p][:, None]
                    if c in ncons[q]:
                        base -= a[q][x[q]]
                        add += a[q][None, :]
                    ok &= base + add <= bvec[c]
                vv = np.where(ok, vv, INF)
                best = vv.min()
                flat = int(np.argmin(np.where(vv == best, ll, INF)))
                s, t = divmod(flat, m.shape[1])
                cur = (vv[x[p], x[q]], ll[x[p], x[q]])
                if key(vv[s, t], ll[s, t]) < key(cur[0], cur[1] - 1e-9 * abs(cur[1])):
                    move(p, s)
                    move(q, t)
                    improved = True
        if not improved or (t_cap is not None and time.perf_counter() - t0 > t_cap):
            break
    if any(local(p)[0][x[p]] for p in range(P)):
        return None
    return {i: int(work.strat[i][x[p]]) for p, i in enumerate(nodes)}
