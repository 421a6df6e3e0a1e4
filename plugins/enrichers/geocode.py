"""``geocode``: country, region and nearest city from latitude/longitude, offline."""

from __future__ import annotations

import threading
import unicodedata

import pycountry

from harvest.core import Bool, Choice, Enricher, ListOf, Option, Record, Str, hookimpl

_geocoders: dict[int, object] = {}
_lock = threading.Lock()


def geocoder(mode: int):
    """The k-d tree over GeoNames' cities, built once per process (about a second)."""
    with _lock:
        if mode not in _geocoders:
            import reverse_geocoder

            _geocoders[mode] = reverse_geocoder.RGeocoder(mode=mode, verbose=False)
        return _geocoders[mode]


def country_name(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    if country is None:
        return {"XK": "Kosovo"}.get(code, code)
    return getattr(country, "common_name", None) or country.name


def _fold(text: str) -> str:
    """Case- and accent-insensitive form, so `Zurich` matches GeoNames' `Zürich`."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).strip()


class GeocodeEnricher(Enricher):
    """Country, admin regions and nearest city from each record's position (offline)."""

    options = (
        Option("countries", ListOf(Str()), None,
               help="keep only these countries (ISO codes such as PH, or English names)"),
        Option("cities", ListOf(Str()), None, help="keep only records nearest these cities"),
        Option("admin1", ListOf(Str()), None, help="keep only these first-level regions"),
        Option("keep_unplaced", Bool(), False,
               help="with a place filter, keep records that have no position"),
        Option("mode", Choice("single", "multi"), "single",
               help="single process (fastest for batches up to ~100k on few cores) or "
                    "reverse_geocoder's multiprocessing"),
    )

    def open(self) -> None:
        self.countries = {_fold(c) for c in self.config["countries"] or []}
        self.cities = {_fold(c) for c in self.config["cities"] or []}
        self.admin1 = {_fold(c) for c in self.config["admin1"] or []}
        self.filtering = bool(self.countries or self.cities or self.admin1)

    def enrich(self, records: list[Record]) -> None:
        placed = [r for r in records if _position(r) is not None]
        if placed:
            mode = 2 if self.config["mode"] == "multi" else 1
            results = geocoder(mode).query([_position(r) for r in placed])
            for record, place in zip(placed, results, strict=True):
                code = place["cc"]
                record.fields.update(country_code=code, country=country_name(code),
                                     admin1=place["admin1"] or None,
                                     admin2=place["admin2"] or None, city=place["name"] or None)
        if self.filtering:
            for record in records:
                self._filter(record)

    def _filter(self, record: Record) -> None:
        if record.fields.get("country_code") is None:
            if not self.config["keep_unplaced"]:
                record.drop("no position to filter places by")
            return
        fields = record.fields
        if self.countries and not {_fold(fields["country_code"]), _fold(fields["country"])} \
                & self.countries:
            record.drop(f"country {fields['country_code']} not in the recipe's countries")
        elif self.cities and _fold(fields.get("city") or "") not in self.cities:
            record.drop("city not in the recipe's cities")
        elif self.admin1 and _fold(fields.get("admin1") or "") not in self.admin1:
            record.drop("region not in the recipe's admin1")


def _position(record: Record) -> tuple[float, float] | None:
    latitude, longitude = record.fields.get("latitude"), record.fields.get("longitude")
    if latitude is None or longitude is None:
        return None
    if latitude == 0 and longitude == 0:
        return None  # Flickr's and many cameras' "no position"
    return float(latitude), float(longitude)


@hookimpl
def harvest_enrichers():
    return {"geocode": GeocodeEnricher}
