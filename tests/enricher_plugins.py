"""Test-only plugins, registered as a third party would be."""

from harvest.core import Enricher, hookimpl


class FlakyEnricher(Enricher):
    """Fails on records whose title says boom."""

    def enrich(self, records):
        for record in records:
            if "boom" in record.fields.get("title", ""):
                raise RuntimeError("boom")
            record.fields["flaky_seen"] = True


@hookimpl
def harvest_enrichers():
    return {"flaky": FlakyEnricher}
