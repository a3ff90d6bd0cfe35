"""Relations between the slumps of two consecutive dates, from the graph of significant overlaps.

Earlier and later polygons are the two sides of a bipartite graph whose edges are the
significant overlaps; each connected component is one event: one earlier and one later polygon
(continued or stabilised, decided by the growth measures), several earlier and one later
(merged), one earlier and several later (split). A polygon with no edge is new (later) or
disappeared (earlier). A component with several polygons on both sides is cut into such stars
by dropping its weakest links, weakest first, as long as both ends of the link keep another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

ONE_TO_ONE, MERGED, SPLIT = "one_to_one", "merged", "split"


@dataclass
class Links:
    """The kept edges (before[i] -> after[j]) with each edge's event kind, plus the unlinked polygons."""

    edge: np.ndarray  # indices into the significant pairs given to `relate`
    kind: np.ndarray  # ONE_TO_ONE | MERGED | SPLIT per kept edge
    new: np.ndarray  # indices of later polygons with no earlier one
    disappeared: np.ndarray  # indices of earlier polygons with no later one


def _components(n_before: int, n_after: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    n = n_before + n_after
    graph = coo_matrix((np.ones(len(i)), (i, n_before + j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _cut_into_stars(i: np.ndarray, j: np.ndarray, strength: np.ndarray, edges: np.ndarray) -> list[int]:
    """Edges of one many-to-many component to drop so that no kept edge joins two polygons
    that both have other links (what is left is one-to-one, merge or split events)."""
    degree_i = {k: int((i[edges] == k).sum()) for k in set(i[edges].tolist())}
    degree_j = {k: int((j[edges] == k).sum()) for k in set(j[edges].tolist())}
    dropped = []
    for e in edges[np.argsort(strength[edges], kind="stable")]:
        if degree_i[i[e]] > 1 and degree_j[j[e]] > 1:
            degree_i[i[e]] -= 1
            degree_j[j[e]] -= 1
            dropped.append(int(e))
    return dropped


def relate(n_before: int, n_after: int, i: np.ndarray, j: np.ndarray, strength: np.ndarray) -> Links:
    """Events of the significant pairs (before[i], after[j]) of two dates."""
    keep = np.ones(len(i), dtype=bool)
    label = _components(n_before, n_after, i, j)
    edge_label = label[i]
    per_before = np.bincount(label[:n_before], minlength=len(label))
    per_after = np.bincount(label[n_before:], minlength=len(label))
    tangled = np.flatnonzero((per_before > 1) & (per_after > 1))
    if len(tangled):
        for component in tangled:
            keep[_cut_into_stars(i, j, strength, np.flatnonzero(edge_label == component))] = False
        label = _components(n_before, n_after, i[keep], j[keep])
        per_before = np.bincount(label[:n_before], minlength=len(label))
        per_after = np.bincount(label[n_before:], minlength=len(label))
    edge = np.flatnonzero(keep)
    component = label[i[edge]]
    kind = np.where(per_before[component] > 1, MERGED, np.where(per_after[component] > 1, SPLIT, ONE_TO_ONE))
    linked_before = np.zeros(n_before, dtype=bool)
    linked_after = np.zeros(n_after, dtype=bool)
    linked_before[i[edge]] = True
    linked_after[j[edge]] = True
    return Links(edge, kind.astype(object), np.flatnonzero(~linked_after), np.flatnonzero(~linked_before))
