"""``license``: keep only records whose license allows the use you plan, with attribution."""

from __future__ import annotations

from typing import Any

from harvest.core import Bool, Enricher, ListOf, Option, Record, Str, hookimpl, license_family

PUBLIC_DOMAIN = {"CC0", "PDM", "NKCR", "US-GOV-WORK"}
PRESETS = {
    # Anyone may share copies, commercially too, with attribution where required.
    "redistributable": {"CC0", "PDM", "NKCR", "CC-BY", "CC-BY-SA"},
    # No NonCommercial clause.
    "commercial": PUBLIC_DOMAIN | {"CC-BY", "CC-BY-SA", "CC-BY-ND"},
    # Research use tolerates NonCommercial.
    "research": PUBLIC_DOMAIN | {"CC-BY", "CC-BY-SA", "CC-BY-ND", "CC-BY-NC", "CC-BY-NC-SA",
                                 "CC-BY-NC-ND"},
    # No NoDerivatives clause: crops and augmentations are allowed.
    "modifiable": PUBLIC_DOMAIN | {"CC-BY", "CC-BY-SA", "CC-BY-NC", "CC-BY-NC-SA"},
}
KNOWN_FAMILIES = set().union(*PRESETS.values()) | {"ARR"}


def _check_allow(values: list[str]) -> None:
    for value in values:
        if value not in PRESETS and license_family(value) not in KNOWN_FAMILIES \
                and not value.startswith("LicenseRef-"):
            raise ValueError(f"{value!r} is neither a preset ({', '.join(PRESETS)}) nor a license "
                             f"id such as CC-BY, CC-BY-SA-4.0, CC0")


def attribution(fields: dict[str, Any]) -> str:
    """``"Title" by Author, CC BY-SA 2.0 (license URL), page`` in the form CC recommends."""
    title = fields.get("title") or "Untitled"
    author = fields.get("owner_name") or fields.get("path_alias") or fields.get("owner") \
        or fields.get("author") or "unknown author"
    license_id = fields.get("license") or "unknown license"
    if license_family(license_id).startswith("CC-BY"):
        family, _, version = license_id.rpartition("-")
        license_text = f"{family.replace('CC-', 'CC ', 1)} {version}"  # CC BY-SA 2.0
    else:
        license_text = fields.get("license_name") or license_id
    line = f'"{title}" by {author}, {license_text}'
    if fields.get("license_url"):
        line += f" ({fields['license_url']})"
    if fields.get("page_url"):
        line += f", {fields['page_url']}"
    return line


class LicenseEnricher(Enricher):
    """Keeps records whose license is in an allow-list (or preset) and adds attribution."""

    options = (
        Option("allow", ListOf(Str()), ["redistributable"], check=_check_allow,
               help="presets (redistributable, commercial, research, modifiable) and/or "
                    "license ids or families (CC-BY, CC-BY-SA-4.0, CC0...)"),
        Option("keep_unknown", Bool(), False, help="keep records whose license is unknown"),
    )

    def open(self) -> None:
        self.families: set[str] = set()
        self.ids: set[str] = set()
        for value in self.config["allow"]:
            if value in PRESETS:
                self.families |= PRESETS[value]
            elif license_family(value) == value:
                self.families.add(value)
            else:
                self.ids.add(value)

    def source_hints(self) -> dict[str, Any]:
        return {"license_families": sorted(self.families), "license_ids": sorted(self.ids)}

    def allowed(self, license_id: str) -> bool:
        return license_id in self.ids or license_family(license_id) in self.families

    def enrich(self, records: list[Record]) -> None:
        for record in records:
            license_id = record.fields.get("license")
            if not license_id:
                if not self.config["keep_unknown"]:
                    record.drop("license unknown (keep_unknown: true keeps such records)")
                    continue
            elif not self.allowed(license_id):
                record.drop(f"license {license_id} not allowed")
                continue
            record.fields["attribution"] = attribution(record.fields)
            if record.personal & {"owner_name", "path_alias", "owner", "author"}:
                record.personal.add("attribution")  # it names the author


@hookimpl
def harvest_enrichers():
    return {"license": LicenseEnricher}
