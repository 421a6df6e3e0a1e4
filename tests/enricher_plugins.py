"""Test-only plugins, registered as a third party would be."""

from harvest.core import PROTECTION_OPTIONS, Enricher, Sink, check_protection, hookimpl


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


class ForgetfulSink(Sink):
    """Encrypts (so rekey concerns it), stores nothing, and cannot re-encrypt."""

    options = PROTECTION_OPTIONS

    @classmethod
    def check_options(cls, options) -> None:
        check_protection(options)

    def write(self, records):
        return None


@hookimpl
def harvest_sinks():
    return {"forgetful": ForgetfulSink}
