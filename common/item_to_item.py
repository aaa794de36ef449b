"""The item-to-item table of QRCF retrieval (PR2, arXiv 2409.11281): file layout and reader.

`python -m preprocessing.item_to_item` writes it beside the TFRecords; `serving.qrcf` reads it.
This module holds only the format (no Beam, no TensorFlow), so the serving side can read the
table without importing the pipeline.

Layout
------
```
OUT/item_to_item/manifest.json           how the table was built (written last: a table
                                         without a manifest is incomplete and is refused)
OUT/item_to_item/part-SSSSS-of-NNNNN.jsonl  one line per item with neighbours:
    {"item": 17, "neighbours": [[42, 0.31], [5, 0.12], ...]}
```
Items are vocabulary indices (`OUT/vocab/items.txt`, index 0 = unknown, never present).
Neighbours are sorted by weight descending, equal weights by neighbour index ascending, at most
`manifest["neighbours"]` per item; an item with no co-occurring item has no line. The weight
formula is in the manifest (`algorithm`) and in preprocessing/item_to_item.py.

Why JSON lines: Beam writes them sharded and in parallel without a combining step, they stay
readable with `head`, and the same lines load into BigQuery or a key-value store keyed by item.
Weights are written with Python's shortest round-trip float repr, so reading gives back exactly
the computed float64 weights.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Tuple

ITEM_TO_ITEM_DIR = "item_to_item"
MANIFEST_FILE = "manifest.json"
PART_PREFIX = "part"
PART_SUFFIX = ".jsonl"
FORMAT_VERSION = 1

_PART_NAME = re.compile(r"^part-(\d+)-of-(\d+)\.jsonl$")

ItemToItemTable = Dict[int, List[Tuple[int, float]]]


def table_dir(path: str) -> str:
    """The table directory, given either the preprocessing output OUT or OUT/item_to_item."""
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        return path
    return os.path.join(path, ITEM_TO_ITEM_DIR)


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the table under `path` (OUT or OUT/item_to_item)."""
    directory = table_dir(path)
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(
            f"no item-to-item table at {directory} ({MANIFEST_FILE} missing: the build did not "
            f"run or did not finish); build it with `python -m preprocessing.item_to_item "
            f"--data OUT`")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has format_version "
                         f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION}: "
                         f"rebuild the table")
    return manifest


def part_files(directory: str) -> List[str]:
    """The shard files of a finished table, checked complete (all N of N present)."""
    paths = sorted(glob.glob(os.path.join(directory, f"{PART_PREFIX}-*{PART_SUFFIX}")))
    totals = set()
    indices = set()
    for path in paths:
        match = _PART_NAME.match(os.path.basename(path))
        if match is None:
            raise ValueError(f"unexpected file {path} in the item-to-item table")
        indices.add(int(match.group(1)))
        totals.add(int(match.group(2)))
    if len(totals) > 1 or (totals and indices != set(range(next(iter(totals))))):
        raise ValueError(f"the item-to-item table at {directory} has an incomplete or mixed set "
                         f"of shards ({len(paths)} files); rebuild it")
    return paths


def read_item_to_item(path: str) -> ItemToItemTable:
    """{item_index: [(neighbour_index, weight), ...]} sorted by weight descending.

    `path` is the preprocessing output OUT or OUT/item_to_item. Raises FileNotFoundError when
    the table is missing or unfinished, ValueError when a line is malformed."""
    directory = table_dir(path)
    read_manifest(directory)
    table: ItemToItemTable = {}
    for part in part_files(directory):
        with open(part, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    item = int(record["item"])
                    neighbours = [(int(j), float(w)) for j, w in record["neighbours"]]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{part}:{line_number}: malformed item-to-item line "
                                     f"({exc})") from exc
                if item in table:
                    raise ValueError(f"{part}:{line_number}: item {item} appears twice")
                # the writer sorts already; sorting again makes the contract hold for any writer
                table[item] = sorted(neighbours, key=lambda nw: (-nw[1], nw[0]))
    return table
