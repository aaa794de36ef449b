"""Merging the candidate lists of several retrievers with per-source quotas (PR2's multi-source
retrieval, arXiv 2409.11281: QRCF, PDR and the content baseline feed one ranking stage).

`merge_sources(lists, quotas, k)`:

1. Each source s gets a quota of round(share_s * k) slots (shares normalised over the sources
   that returned something; rounding remainders go to the largest shares first).
2. Round robin over ranks: at rank r every source whose quota is not used up offers its r-th
   item; an item already taken (found by an earlier source) is not taken twice and does not use
   the quota. So every source's best items are in, in its own order.
3. Slots left (a source returned fewer items than its quota, or duplicates) are filled by the
   same round robin without quotas.

Every merged item lists every source whose list contains it (not only the one that took it)
with its rank there, so duplicates across sources are visible ("found by qrcf and pdr").
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence


@dataclasses.dataclass
class MergedItem:
    item_index: int
    taken_by: str  # the source whose slot it filled
    ranks: Dict[str, int]  # source -> rank (0 = best) in that source's list


def quota_slots(quotas: Mapping[str, float], sources: Sequence[str], k: int) -> Dict[str, int]:
    """Slots per source: shares of k normalised over `sources` (largest remainders first)."""
    shares = {s: max(float(quotas.get(s, 0.0)), 0.0) for s in sources}
    total = sum(shares.values())
    if total <= 0:
        shares = {s: 1.0 for s in sources}
        total = float(len(sources))
    raw = {s: shares[s] / total * k for s in sources}
    slots = {s: int(raw[s]) for s in sources}
    left = k - sum(slots.values())
    for s in sorted(sources, key=lambda s: (-(raw[s] - slots[s]), -shares[s]))[:max(left, 0)]:
        slots[s] += 1
    return slots


def merge_sources(lists: Mapping[str, Sequence[int]], quotas: Mapping[str, float], k: int
                  ) -> List[MergedItem]:
    """At most k distinct items from the ranked `lists` {source: item indices, best first},
    in merge order (module docstring). Sources are visited in the order of `lists`."""
    lists = {s: [int(i) for i in items] for s, items in lists.items()}
    sources = [s for s, items in lists.items() if items]
    if not sources or k < 1:
        return []
    ranks: Dict[int, Dict[str, int]] = {}
    for s in sources:
        for r, item in enumerate(lists[s]):
            ranks.setdefault(item, {}).setdefault(s, r)
    slots = quota_slots(quotas, sources, k)
    merged: List[MergedItem] = []
    taken = set()
    position = {s: 0 for s in sources}

    def run(limit_by_quota: bool) -> None:
        used = {s: sum(1 for m in merged if m.taken_by == s) for s in sources}
        while len(merged) < k:
            progressed = False
            for s in sources:
                if len(merged) >= k:
                    break
                if limit_by_quota and used[s] >= slots[s]:
                    continue
                while position[s] < len(lists[s]) and lists[s][position[s]] in taken:
                    position[s] += 1
                if position[s] >= len(lists[s]):
                    continue
                item = lists[s][position[s]]
                position[s] += 1
                taken.add(item)
                merged.append(MergedItem(item, s, dict(ranks[item])))
                used[s] += 1
                progressed = True
            if not progressed:
                return

    run(limit_by_quota=True)
    run(limit_by_quota=False)
    return merged
