"""Run statistics: counters and length histograms merged by one Beam CombineFn.

Transforms emit small events: ("count", name, n) or ("hist", name, value). `StatsCombineFn`
merges them into {"counts": {name: n}, "hists": {name: {value: n}}}; histograms of sequence
lengths are bounded by the sequence length, so the accumulator stays small at any scale and the
distribution (min / mean / percentiles / max) is exact.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, Mapping, Tuple

import apache_beam as beam

PERCENTILES = (50, 90, 99)


def count(name: str, n: int = 1) -> Tuple[str, str, int]:
    return ("count", name, int(n))


def hist(name: str, value: int) -> Tuple[str, str, int]:
    return ("hist", name, int(value))


class StatsCombineFn(beam.CombineFn):
    def create_accumulator(self):
        return (collections.Counter(), collections.defaultdict(collections.Counter))

    def add_input(self, acc, event):
        kind, name, value = event
        if kind == "count":
            acc[0][name] += value
        else:
            acc[1][name][value] += 1
        return acc

    def merge_accumulators(self, accumulators):
        counts, hists = self.create_accumulator()
        for c, h in accumulators:
            counts.update(c)
            for name, values in h.items():
                hists[name].update(values)
        return counts, hists

    def extract_output(self, acc):
        return {"counts": dict(sorted(acc[0].items())),
                "hists": {name: {str(k): v for k, v in sorted(values.items())}
                          for name, values in sorted(acc[1].items())}}


def distribution(histogram: Mapping[Any, int]) -> Dict[str, float]:
    """count, min, mean, p50/p90/p99 (nearest rank) and max of a {value: count} histogram."""
    items = sorted((int(k), int(v)) for k, v in histogram.items() if int(v) > 0)
    total = sum(v for _, v in items)
    if total == 0:
        return {"count": 0}
    out: Dict[str, float] = {"count": total, "min": items[0][0],
                             "mean": sum(k * v for k, v in items) / total}
    for p in PERCENTILES:
        rank, seen = max(1, -(-p * total // 100)), 0  # nearest-rank percentile
        for value, n in items:
            seen += n
            if seen >= rank:
                out[f"p{p}"] = value
                break
    out["max"] = items[-1][0]
    return out


def grouped(counts: Mapping[str, int], prefix: str) -> Dict[str, int]:
    """{reason: n} of counters named '<prefix>/<reason>'."""
    return {k[len(prefix) + 1:]: v for k, v in counts.items() if k.startswith(prefix + "/")}


def summarise(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """stats.json content from the combined events."""
    counts, hists = raw.get("counts", {}), raw.get("hists", {})
    return {
        "requests_read": counts.get("requests_read", 0),
        "requests": counts.get("examples", 0),
        "examples": counts.get("examples", 0),
        "examples_by_split": grouped(counts, "split"),
        "candidates": counts.get("candidates", 0),
        "candidates_truncated": counts.get("candidates_truncated", 0),
        "candidates_rejected": grouped(counts, "candidates_rejected"),
        "behaviours_read": counts.get("behaviours_read", 0),
        "behaviours": counts.get("behaviours", 0),
        "behaviours_rejected": grouped(counts, "behaviours_rejected"),
        "requests_rejected": grouped(counts, "requests_rejected"),
        "items_rejected": grouped(counts, "items_rejected"),
        "users_rejected": grouped(counts, "users_rejected"),
        "items_without_embedding": counts.get("items_without_embedding", 0),
        "requests_with_empty_history": counts.get("requests_with_empty_history", 0),
        "dead_letters": grouped(counts, "dead_letter"),
        "sequence_length": {name: distribution(h) for name, h in hists.items()
                            if name != "candidates"},
        "candidates_per_request": distribution(hists.get("candidates", {})),
    }


def format_summary(stats: Mapping[str, Any]) -> str:
    """A few human-readable lines for the end of a run."""
    lines = [f"requests read {stats['requests_read']}, examples written {stats['examples']} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(stats['examples_by_split'].items()))})",
             f"candidates written {stats['candidates']}, truncated "
             f"{stats['candidates_truncated']}, rejected {stats['candidates_rejected'] or 0}",
             f"behaviours read {stats['behaviours_read']}, kept {stats['behaviours']}, rejected "
             f"{stats['behaviours_rejected'] or 0}",
             f"requests rejected {stats['requests_rejected'] or 0}; items rejected "
             f"{stats['items_rejected'] or 0}; users rejected {stats['users_rejected'] or 0}"]
    for name, d in sorted(stats["sequence_length"].items()):
        if d.get("count"):
            lines.append(f"{name} sequence length: min {d['min']} mean {d['mean']:.1f} "
                         f"p50 {d['p50']} p90 {d['p90']} p99 {d['p99']} max {d['max']}")
    if "display_order" in stats:
        lines.append("display order: " + (
            f"kept, candidates carry their shown position ({stats.get('display_order_source')})"
            if stats["display_order"] else
            f"NOT known ({stats.get('display_order_source')}): no position-bias term"))
    total_dead = sum(stats["dead_letters"].values())
    lines.append(f"dead letters {total_dead}" + (
        f": {stats['dead_letters']}" if total_dead else ""))
    return "\n".join(lines)
