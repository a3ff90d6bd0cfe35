"""Merging instances seen by overlapping tiles, so that one slump becomes one instance.

Two instances from different tiles are the same slump when their masks agree inside
the area both tiles saw (IoU over that shared window >= `min_shared_iou`). This one
rule removes duplicates (a slump seen whole by two tiles) and joins fragments (a slump
cut by a tile edge: inside the shared strip both fragments cover the same pixels),
while two distinct slumps that merely touch share few pixels and stay apart.
Same-tile instances are never merged: the detector already separated them.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.strtree import STRtree

from rts_thaw.mapping.instances import SceneInstance


def _shared_window_iou(a: SceneInstance, b: SceneInstance) -> float:
    """IoU of the two masks restricted to the intersection of the two tiles' windows."""
    (ar, ac, ah, aw), (br, bc, bh, bw) = a.window, b.window
    r0, c0 = max(ar, br), max(ac, bc)
    r1, c1 = min(ar + ah, br + bh), min(ac + aw, bc + bw)
    if r0 >= r1 or c0 >= c1:
        return 0.0
    # paint both masks onto the shared window
    canvas = np.zeros((2, r1 - r0, c1 - c0), dtype=bool)
    for k, inst in enumerate((a, b)):
        ir0, ic0, ir1, ic1 = inst.bounds
        sr0, sc0, sr1, sc1 = max(ir0, r0), max(ic0, c0), min(ir1, r1), min(ic1, c1)
        if sr0 < sr1 and sc0 < sc1:
            canvas[k, sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = inst.mask[sr0 - ir0:sr1 - ir0, sc0 - ic0:sc1 - ic0]
    union = np.logical_or(canvas[0], canvas[1]).sum()
    return float(np.logical_and(canvas[0], canvas[1]).sum() / union) if union else 0.0


def _union(group: list[SceneInstance]) -> SceneInstance:
    r0 = min(i.bounds[0] for i in group)
    c0 = min(i.bounds[1] for i in group)
    r1 = max(i.bounds[2] for i in group)
    c1 = max(i.bounds[3] for i in group)
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for inst in group:
        ir0, ic0, ir1, ic1 = inst.bounds
        mask[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] |= inst.mask
    # the most confident view of the slump speaks for it; it was seen with every input of any
    # view, listed in the order of the fullest view (the model's order)
    fullest = max((i.modalities for i in group), key=len)
    used = tuple(dict.fromkeys(fullest + tuple(m for i in group for m in i.modalities)))
    return SceneInstance(r0, c0, mask, max(i.score for i in group), None, -1, len({i.tile for i in group}), used)


def merge_across_seams(instances: list[SceneInstance], min_shared_iou: float = 0.3) -> list[SceneInstance]:
    if len(instances) < 2:
        return [_union([i]) for i in instances]
    parent = list(range(len(instances)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    # candidate pairs: boxes that overlap (end-exclusive, so touching boxes do not pair)
    boxes = [shapely.box(c0, r0, c1 - 1e-6, r1 - 1e-6) for r0, c0, r1, c1 in (i.bounds for i in instances)]
    left, right = STRtree(boxes).query(boxes, predicate="intersects")
    for a, b in zip(left, right):
        if a >= b or instances[a].tile == instances[b].tile or find(a) == find(b):
            continue
        if _shared_window_iou(instances[a], instances[b]) >= min_shared_iou:
            parent[find(a)] = find(b)

    groups: dict[int, list[SceneInstance]] = {}
    for k, inst in enumerate(instances):
        groups.setdefault(find(k), []).append(inst)
    merged = [_union(group) for group in groups.values()]
    merged.sort(key=lambda i: (i.row, i.col))
    return merged
