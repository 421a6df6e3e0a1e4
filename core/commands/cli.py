"""The ``harvest`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..contract.recipe import Recipe, load_recipe
from ..contract.registry import KINDS, build_plugin, load_registry
from ..errors import HarvestError, UsageError, disk_full
from ..output.crypto import DEFAULT_KEY_FILE
from ..pipeline.stopping import StopSignals
from ..pipeline.summary import printable
from ..secrets import RedactingFilter

log = logging.getLogger("harvest")

# What `harvest run` exits with: the README's "Guarantees and limits" lists them.
EXIT_STATUS = {
    "complete": 0,      # every record found is stored, or dropped/rejected for good
    "failed": 1,        # the run itself broke (a bug, a crash of the engine)
    # 2: bad input (recipe, option, secret, argument, output folder), before any work
    "incomplete": 3,    # finished, but some records are not stored or a search failed
    "interrupted": 130,  # stopped by a signal; progress is saved
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harvest", description="Harvest image datasets "
                                     "from the web with YAML recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every record")
    parser.add_argument("--version", action="version", version=f"harvest {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe (resumes an interrupted run)")
    run.add_argument("recipe", type=Path)
    run.add_argument("--output", type=Path, help="override the recipe's output folder")
    run.add_argument("--limit", type=int, help="stop after this many records in all")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    run.add_argument("--verify-sinks", action="store_true",
                     help="first check that every sink has every record stored earlier, and "
                          "write again those it lacks")
    run.add_argument("--reconsider", metavar="STATUSES",
                     help="records that ended dropped, rejected or failed (comma-separated) "
                          "go through the pipeline again, e.g. after changing the recipe")
    run.add_argument("--cluster", metavar="ADDRESS",
                     help="run on this Dask cluster (its scheduler, e.g. tcp://host:8786)")
    run.add_argument("--local-workers", type=int, metavar="N",
                     help="run on a Dask cluster of N worker processes on this machine")
    run.set_defaults(handler=_cmd_run, logs=True, reads_recipe=True)

    from .get import add_parser as add_get_parser

    add_get_parser(commands)
    commands.choices["get"].set_defaults(handler=_cmd_get, logs=True)

    validate = commands.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.set_defaults(handler=_cmd_validate, logs=True, reads_recipe=True)

    credits = commands.add_parser("credits", help="write CREDITS.md and credits.csv for a harvest")
    credits.add_argument("output", type=Path, help="the harvest's output folder")
    credits.add_argument("--records", type=Path, help="records file (default OUTPUT/records.jsonl)")
    credits.set_defaults(handler=_cmd_credits)

    train = commands.add_parser("train", help="learn a classifier per term from your review "
                                "marks and the embeddings; writes learned.<term> scores")
    train.add_argument("output", type=Path, help="the harvest's output folder")
    train.add_argument("--mark-weight", type=float, default=10.0, metavar="W",
                       help="how much more a review mark weighs than a term's weak label "
                            "(default 10)")
    train.add_argument("--folds", type=int, default=5, metavar="K",
                       help="cross-validation folds over the marks (default 5)")
    train.set_defaults(handler=_cmd_train)

    keygen = commands.add_parser("keygen", help="make a Fernet key file (mode 0600)")
    keygen.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                        help="where to write the key (default ~/.config/harvest/harvest.key)")
    keygen.add_argument("--force", action="store_true", help="allow a path inside a git work tree")
    keygen.set_defaults(handler=_cmd_keygen)

    decrypt = commands.add_parser("decrypt", help="decrypt records (JSONL file or MongoDB) to a "
                                  "JSONL file of mode 0600")
    decrypt.add_argument("records", type=Path, nargs="?", help="a JSONL records file")
    decrypt.add_argument("-o", "--out", type=Path, required=True, help="the decrypted JSONL file")
    decrypt.add_argument("--mongo-uri", help="read a MongoDB collection instead of a file")
    decrypt.add_argument("--database", default="harvest")
    decrypt.add_argument("--collection", help="the collection (with --mongo-uri)")
    _key_arguments(decrypt)
    decrypt.set_defaults(handler=_cmd_decrypt)

    rekey = commands.add_parser("rekey", help="re-encrypt a recipe's sinks under a new key")
    rekey.add_argument("recipe", type=Path)
    rekey.add_argument("--new-key-file", type=Path)
    rekey.add_argument("--new-key-env", help="environment variable holding the new key")
    rekey.set_defaults(handler=_cmd_rekey, logs=True)

    export = commands.add_parser("export", help="export a harvest as a dataset (ImageFolder tree "
                                 "or manifest, with credits)")
    export.add_argument("output", type=Path, help="the harvest's output folder")
    export.add_argument("destination",
                        help="a folder, or an fsspec URL such as s3://bucket/prefix")
    export.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for a URL destination (e.g. endpoint_url=...); "
                             "credentials come from the environment")
    export.add_argument("--format", choices=("imagefolder", "manifest", "hf"),
                        default="imagefolder",
                        help="imagefolder: class folders; manifest: no copies; hf: class "
                             "folders and metadata.jsonl for Hugging Face datasets")
    export.add_argument("--records", type=Path, help="records file (default OUTPUT/records.jsonl)")
    export.add_argument("--by", default="term", help="field naming the class folders (term, "
                        "country, license...)")
    export.add_argument("--all", action="store_true",
                        help="include records marked keep: false or rejected in review")
    export.add_argument("--copy", action="store_true", help="copy files instead of hard links")
    export.add_argument("--embeddings", action="store_true",
                        help="also write embeddings.npy (float16, a row per exported picture) "
                             "and embeddings-ids.txt (each row's record id), from `embed`")
    export.add_argument("--recheck-opt-outs", action="store_true",
                        help="ask each image's host again (robots.txt, TDMRep, X-Robots-Tag) "
                             "and leave out those that opted out since the harvest")
    export.add_argument("--allow-private-addresses", action="store_true",
                        help="with --recheck-opt-outs, let hosts on private addresses be asked")
    _key_arguments(export, required=False)
    export.set_defaults(handler=_cmd_export)

    review = commands.add_parser("review", help="a local web page to choose thresholds and "
                                 "curate a harvest")
    review.add_argument("output", type=Path, help="the harvest's output folder")
    review.add_argument("--port", type=int, default=8765)
    review.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    review.add_argument("--allow-remote", action="store_true",
                        help="let --host be an address other machines reach")
    _key_arguments(review, required=False)
    review.set_defaults(handler=_cmd_review, logs=True)

    takedown = commands.add_parser(
        "takedown", help="remove a picture an owner asks to remove, everywhere, for good")
    takedown.add_argument("target", type=Path,
                          help="the recipe or its output folder (every sink of the recipe "
                               "its last run recorded; exit 3 naming those not reached)")
    what = takedown.add_mutually_exclusive_group(required=True)
    what.add_argument("--url", help="the image URL")
    what.add_argument("--sha256", help="the image's content hash")
    what.add_argument("--source-id", help="a record id (flickr:123) or a source's id (123)")
    what.add_argument("--owner", help="every picture of this owner (name, id or alias)")
    takedown.add_argument("--reason", help="why, for the audit log (no personal data)")
    takedown.add_argument("--near-duplicates", action="store_true",
                          help="also its near-duplicates, linked either way "
                               "(near_duplicate_of, or set aside for it)")
    _key_arguments(takedown, required=False)
    takedown.set_defaults(handler=_cmd_takedown, logs=True)

    purge = commands.add_parser("purge", help="delete stored images past their retention")
    purge.add_argument("target", type=Path, help="the recipe (its retain_days, every sink) or "
                       "its output folder (the recipe its last run recorded)")
    purge.add_argument("--older-than", help="e.g. 90d (default: the recipe's retain_days)")
    purge.add_argument("--keep-metadata", action="store_true",
                       help="delete the image files only, keep the records")
    purge.set_defaults(handler=_cmd_purge, logs=True)

    plugins = commands.add_parser("plugins", help="list plugins, their options and origin")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--markdown", action="store_true",
                         help="the options reference of the documentation (docs/reference.md)")
    plugins.add_argument("--fields", action="store_true",
                         help="the record field reference of the documentation "
                              "(docs/record-fields.md)")
    plugins.set_defaults(handler=_cmd_plugins)
    return parser


def _key_arguments(parser, required: bool = True) -> None:
    parser.add_argument("--key-file", type=Path, help="Fernet key file")
    parser.add_argument("--key-env", help="environment variable holding the key"
                        + ("" if required else " (only to decrypt)"))


def _keyring(args, required: bool = True):
    from ..output.crypto import Keyring

    if not required and not (args.key_file or args.key_env):
        return None
    return Keyring.load(args.key_file, args.key_env)


def _open_sinks(target: Path):
    """(output folder, [(label, sink)], recipe or None, [labels of sinks not reached]) for
    takedown and purge. A recipe opens every sink; an output folder opens those of the
    recipe its last run recorded, or, when that recipe is gone or names another output,
    reaches its JSONL records only and names the sinks it could not reach."""
    from ..output.takedown import remembered_sinks

    unreached: list[str] = []
    if target.is_dir():
        records = target / "records.jsonl"
        if not records.is_file():
            raise UsageError(f"{target}: no records.jsonl (give the recipe, or a harvest's "
                             f"output folder)")
        recipe_path, unreached = remembered_sinks(target)
        try:
            recipe = load_recipe(recipe_path, load_registry()) if recipe_path else None
        except HarvestError:
            recipe = None
        if recipe is None or recipe.output.resolve() != target.resolve():
            return target, [], None, unreached
    else:
        recipe = load_recipe(target, load_registry())
    sinks = []
    try:
        for spec in recipe.sinks:
            sink = build_plugin(recipe, spec)
            sink.open()
            sinks.append((spec.label, sink))
    except BaseException:
        _close_sinks(sinks)
        raise
    return recipe.output, sinks, recipe, []


def _close_sinks(sinks) -> None:
    for _, sink in sinks:
        sink.close()


class _Carried:
    """What takedown or purge removals did: records, files, each sink's count."""

    def __init__(self):
        from collections import Counter

        self.intents = self.records = self.files = 0
        self.removed: Counter = Counter()
        self.unreached: list[str] = []

    def report(self, heading: str, with_records: bool = True) -> int:
        parts = [_count(self.files, "image file")]
        if with_records:
            parts.insert(0, _count(self.records, "record"))
        print(f"{heading}: {', '.join(parts)}; "
              + "; ".join(f"{label}: {count} removed" for label, count in self.removed.items()))
        if not self.unreached:
            return 0
        print(f"harvest: error: not reached: {', '.join(self.unreached)} (the recipe the last "
              f"run recorded is gone or does not load); give the recipe instead of the output "
              f"folder to finish", file=sys.stderr)
        return EXIT_STATUS["incomplete"]


def _carry_out_removals(output: Path, sinks, unreached: list[str], carried: _Carried) -> None:
    """Carries out every takedown and purge recorded in the run state and not yet done
    (the one just decided, and any a crash interrupted): its audit line, the records out
    of each sink, the image files deleted. Each step can be done again, so a crash at any
    point is finished by the next takedown or purge; one that could not reach every sink
    stays pending."""
    from ..cleaning.curation import forget_in_overlays, forget_set_aside
    from ..contract.shards import state_dirs
    from ..output.derived import forget_derived
    from ..output.embeddings import forget_embeddings
    from ..output.records import filter_jsonl
    from ..output.state import RunState
    from ..output.takedown import crash_point, delete_files, write_audit

    state = RunState(output / ".harvest" / "state.sqlite")
    try:
        for intent, entry, paths, with_records in state.removals():
            write_audit(output, entry)
            crash_point("audited")
            ids = set(entry["ids"])
            if with_records:
                if not sinks:
                    carried.removed["records.jsonl"] += filter_jsonl(output / "records.jsonl",
                                                                     ids)
                for label, sink in sinks:
                    carried.removed[label] += sink.remove(ids)
                    crash_point(f"removed:{label}")
                carried.records += len(ids)
            carried.files += delete_files(output, set(paths))
            # What was computed from the pictures goes with them: embeddings, what plugins
            # keep in their own stores (a service's labels, perceptual hashes), learned
            # scores, the review page's thumbnails (a small copy of each).
            shas = set(entry.get("sha256") or ())
            forget_embeddings(state_dirs(output), shas)
            forget_derived(state_dirs(output), shas, ids)
            forget_in_overlays(output, ids)
            forget_set_aside(output, ids)
            for sha in shas:
                if len(sha) == 64 and sha.isalnum():
                    (output / ".harvest" / "thumbs" / f"{sha}.jpg").unlink(missing_ok=True)
            carried.intents += 1
            crash_point("deleted")
            if with_records and unreached:
                carried.unreached = unreached
            else:
                state.finish_removal(intent)
    finally:
        state.close()


def _decide_then_remove(output: Path, sinks, unreached, carried, entry: dict, ids, sha256s,
                        reason: str, **how) -> None:
    """Writes the decision (tombstones, statuses, the pending removal) durably, then
    carries it out: killed in between, the next takedown or purge finishes it."""
    from ..output.state import RunState
    from ..output.takedown import crash_point

    state = RunState(output / ".harvest" / "state.sqlite")
    try:
        state.take_down(ids, sha256s, reason, intent=entry["intent"], audit=entry, **how)
    finally:
        state.close()
    crash_point("decided")
    _carry_out_removals(output, sinks, unreached, carried)


def _cmd_takedown(args) -> int:
    from ..cleaning.curation import set_aside_copies
    from ..output.crypto import FieldCipher
    from ..output.lock import OutputLock
    from ..output.takedown import audit_entry, select

    output, sinks, _, unreached = _open_sinks(args.target)
    carried = _Carried()
    try:
        with OutputLock(output):
            keyring = _keyring(args, required=False)
            # A takedown a crash interrupted is finished first: its records may be gone
            # from records.jsonl already, and must not be chosen (and logged) twice.
            _carry_out_removals(output, sinks, unreached, carried)
            chosen = select(output / "records.jsonl", url=args.url, sha256=args.sha256,
                            source_id=args.source_id, owner=args.owner,
                            near_duplicates=args.near_duplicates,
                            set_aside_copies=set_aside_copies(output),
                            cipher=FieldCipher(keyring) if keyring else None)
            if args.sha256:
                chosen.sha256s.add(args.sha256.lower())
            if not chosen.ids and not chosen.sha256s:
                if carried.intents:
                    return carried.report("finished an interrupted takedown or purge")
                hint = (" (owner fields are not stored in clear: give --key-file for an "
                        "encrypted harvest; an omitted field cannot be matched)"
                        if args.owner else "")
                raise UsageError(f"takedown: no record matches{hint}")
            entry = audit_entry("takedown", chosen, args.reason,
                                **{k: v for k, v in (("url", args.url),
                                                     ("source_id", args.source_id),
                                                     ("owner", args.owner)) if v})
            _decide_then_remove(output, sinks, unreached, carried, entry, chosen.ids,
                                chosen.sha256s, args.reason or "takedown request",
                                paths=chosen.paths)
    finally:
        _close_sinks(sinks)
    status = carried.report("taken down")
    print("no later run stores them again; exports and credits made before this are not "
          "changed: make them again")
    return status


def _cmd_purge(args) -> int:
    from ..output.lock import OutputLock
    from ..output.records import read_records
    from ..output.takedown import Selection, audit_entry, parse_age

    output, sinks, recipe, unreached = _open_sinks(args.target)
    carried = _Carried()
    try:
        if args.older_than:
            age = parse_age(args.older_than)
        elif recipe is not None and recipe.retain_days:
            age = recipe.retain_days * 86400
        else:
            raise UsageError("purge: give --older-than (or a recipe with retain_days)")
        with OutputLock(output):
            # An interrupted purge first: its files are gone, so it would not be chosen
            # again by their age, while its records may still be in the sinks.
            _carry_out_removals(output, sinks, unreached, carried)
            cutoff = time.time() - age
            chosen = Selection()
            for record in read_records(output / "records.jsonl"):
                path = (record.get("file") or {}).get("path")
                if not path:
                    continue
                try:
                    stored = (output / path).stat().st_mtime
                except OSError:
                    continue
                if stored < cutoff:
                    chosen.paths.add(path)
                    chosen.ids.add(record["id"])
                    if record["file"].get("sha256"):
                        chosen.sha256s.add(record["file"]["sha256"])
            if chosen.ids or not carried.intents:
                reason = (f"older than {args.older_than}" if args.older_than
                          else f"older than {recipe.retain_days} days")
                entry = audit_entry("purge", chosen, reason, keep_metadata=args.keep_metadata)
                # Final ("purged"), so that a re-run does not collect them again unasked.
                _decide_then_remove(output, sinks, unreached, carried, entry,
                                    set() if args.keep_metadata else chosen.ids, set(),
                                    "purged: past retention", status="purged",
                                    paths=chosen.paths,
                                    records=bool(chosen.ids) and not args.keep_metadata)
    finally:
        _close_sinks(sinks)
    return carried.report("purged", with_records=not args.keep_metadata)


def _cmd_rekey(args) -> int:
    from ..contract.plugin import Sink
    from ..output.crypto import Keyring
    from ..output.lock import OutputLock
    from ..output.records import rotation
    from ..output.takedown import crash_point

    if not (args.new_key_file or args.new_key_env):
        raise UsageError("rekey: give --new-key-file or --new-key-env")
    new = Keyring.load(args.new_key_file, args.new_key_env)
    recipe = load_recipe(args.recipe, load_registry())
    encrypted = [spec for spec in recipe.sinks
                 if spec.options.get("personal_fields") == "encrypt"]
    # Every sink must be able to re-encrypt before any is touched: half an output under
    # the new key and half under the old is worse than either.
    for spec in encrypted:
        if spec.cls.rekey is Sink.rekey:
            raise UsageError(f"{recipe.path}: {spec.key_path}: the {spec.use} sink cannot "
                             f"re-encrypt; nothing was changed")
    # A rekey renames its rewrite over the files a run appends to: never beside a run.
    with OutputLock(recipe.output):
        for spec in encrypted:
            old = Keyring.load(spec.options.get("key_file"), spec.options.get("key_env"))
            sink = build_plugin(recipe, spec)
            sink.open()
            try:
                changed = sink.rekey(rotation(old, new))
            finally:
                sink.close()
            print(f"{spec.label}: {changed} record(s) re-encrypted under key id "
                  f"{new.current_id}", flush=True)
            crash_point(f"rekeyed:{spec.label}")
    print("now point the recipe's key_file/key_env at the new key")
    return 0


def _setup_logging(verbose: bool, recipe: Recipe | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # -v is harvest's own per-record log; libraries stay at WARNING, because their DEBUG
    # output quotes what they parse (Pillow prints every EXIF value, an Artist included).
    root.setLevel(logging.WARNING)
    logging.getLogger("harvest").setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers = [console]
    if recipe is not None:
        state_dir = recipe.output / ".harvest"
        state_dir.mkdir(parents=True, exist_ok=True)
        logfile = _LogFile(state_dir / "harvest.log", encoding="utf-8")
        logfile.setLevel(logging.DEBUG if verbose else logging.INFO)
        logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(logfile)
    for handler in handlers:
        if recipe is not None:
            handler.addFilter(RedactingFilter(recipe.resolver))
        root.addHandler(handler)
    # urllib3 logs every retry with the full URL; our summary reports retries' outcomes.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


class _LogFile(logging.FileHandler):
    """The run's log file. When it cannot be written (a full disk) it says so once and
    goes quiet, instead of a traceback for every line (which buried the one line that
    said why the run stopped)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            if not disk_full(sys.exc_info()[1]):  # a full disk: the run's error says so
                sys.stderr.write(f"harvest: warning: cannot write {self.baseFilename}; "
                                 f"the log goes to the terminal only\n")


def _cmd_plugins(args) -> int:
    if args.fields:
        from ..fields import fields_reference

        print(fields_reference(), end="")
        return 0
    if args.markdown:
        print(options_reference(), end="")
        return 0
    registry = load_registry()
    listing = {}
    for kind in KINDS:
        listing[kind] = [{
            "name": info.name, "origin": info.origin, "summary": info.cls.summary(),
            "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
            "options": [{"name": o.name, "type": o.type.name, "default": _plain(o.default),
                         "required": o.required, "help": o.help} for o in info.cls.options],
        } for info in registry.all(kind)]
    if args.json:
        print(json.dumps(listing, ensure_ascii=False, indent=2))
        return 0
    for kind in KINDS:
        print(f"{kind}:")
        for info in registry.all(kind):
            print(f"  {info.name}  [{info.origin}]  {info.cls.summary()}")
            for option in info.cls.options:
                print(f"      {option.describe()}")
    return 0


def options_reference() -> str:
    """Every option of the recipe's own sections and of the built-in plugins, as Markdown:
    the docs' reference page is this output, so code and docs cannot drift apart (a test
    compares them, and fails on an option without a description)."""
    from ..contract.recipe import RUN_OPTIONS
    from ..download.shaping import IMAGE_OPTIONS

    def table(options) -> list[str]:
        rows = ["| option | type | default | what it does |", "|---|---|---|---|"]
        for option in options:
            value = option.default
            shown = str(value).lower() if isinstance(value, bool) else _plain(value)
            default = "required" if option.required else (
                "" if value is None else f"`{shown}`")
            rows.append(f"| `{option.name}` | {option.type.name} | {default} | "
                        f"{option.help.replace('|', '/')} |")
        return rows + [""]

    lines = ["# Options reference", "",
             "Generated by `harvest plugins --markdown` from the options each part declares "
             "(a test keeps this page equal to that output). The guides say more about each "
             "plugin: [Built-in plugins](plugins.md), [Recipe reference](recipe.md).", "",
             "## `run:`", "", *table(RUN_OPTIONS), "## `images:`", "", *table(IMAGE_OPTIONS)]
    registry = load_registry()
    for kind in KINDS:
        lines += [f"## {kind.capitalize()}", ""]
        for info in registry.all(kind):
            if info.origin != "built-in":
                continue
            lines += [f"### `{info.name}`", "", info.cls.summary(), "", *table(info.cls.options)]
    return "\n".join(lines).rstrip() + "\n"


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("harvest-dataset")
    except PackageNotFoundError:
        return "(not installed)"


def _cmd_export(args) -> int:
    from ..output.remote import Remote, check_storage_options, is_url
    from .export import export_dataset

    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {item}: expected KEY=VALUE")
        options[key] = value
    if check_storage_options(options):
        raise UsageError(f"--storage-option {check_storage_options(options)}: credentials "
                         "never go on a command line; set them in the environment")
    remote = None
    if is_url(args.destination):
        remote = Remote(args.destination, options, "export")
        if remote.names():
            raise UsageError(f"{args.destination}: exists and is not empty")
        remote.check()
    with tempfile.TemporaryDirectory(prefix="harvest-export-") as scratch:
        recheck = None
        if args.recheck_opt_outs:
            from ..contract.recipe import RunSettings
            from ..download.fetch import Fetcher

            # A fresh cache: the hosts are asked now, not as they answered at harvest time.
            (Path(scratch) / "state" / "tmp").mkdir(parents=True)
            settings = RunSettings(allow_private_addresses=args.allow_private_addresses,
                                   respect_noindex=False)
            recheck = Fetcher.for_run(settings, Path(scratch) / "state" / "tmp").opted_out
        # A remote export is written here first (copies, since links cannot leave the
        # machine), then put there file by file.
        local = Path(scratch) / "dataset" if remote else Path(args.destination)
        counts = export_dataset(args.output, local, fmt=args.format,
                                records_path=args.records, by=args.by,
                                keyring=_keyring(args, required=False),
                                only_kept=not args.all, copy=args.copy, recheck=recheck,
                                embeddings=args.embeddings)
        if remote is not None:
            remote.put_tree(local)
    print(f"{_count(sum(counts.values()), 'image')} in "
          f"{_count(len(counts), 'class')} exported to {args.destination}")
    return 0


def _cmd_credits(args) -> int:
    from ..output.credits import write_credits

    markdown, table, count = write_credits(args.output, args.records)
    print(f"{count} credits written to {markdown} and {table}")
    return 0


def _cmd_train(args) -> int:
    from .train import train

    if args.mark_weight <= 0 or args.folds < 2:
        raise UsageError("--mark-weight must be above 0 and --folds at least 2")
    report = train(args.output, mark_weight=args.mark_weight, folds=args.folds)
    print(report.table())
    print(f"learned scores for {_count(report.scored, 'picture')} written to "
          f"{args.output / '.harvest' / 'scores' / 'learned.json'}"
          + (f"; {report.without_embedding} without an embedding" if report.without_embedding
             else ""))
    return 0


def _cmd_keygen(args) -> int:
    from ..output.crypto import generate_key_file

    identifier = generate_key_file(args.key_file, force=args.force)
    print(f"key {identifier} written to {args.key_file.expanduser()} (mode 0600)")
    return 0


def _cmd_decrypt(args) -> int:
    from ..output.records import decrypt_records, mongo_records, read_records

    keyring = _keyring(args)
    if args.mongo_uri:
        if not args.collection:
            raise UsageError("decrypt: --mongo-uri needs --collection")
        records = mongo_records(args.mongo_uri, args.database, args.collection)
    elif args.records:
        records = read_records(args.records)
    else:
        raise UsageError("decrypt: give a JSONL records file or --mongo-uri")
    count = decrypt_records(records, keyring, args.out)
    print(f"{count} records decrypted to {args.out} (mode 0600)")
    return 0


def _cmd_review(args) -> int:
    from .review import serve

    serve(args.output, args.host, args.port, _keyring(args, required=False),
          allow_remote=args.allow_remote)
    return 0


def _cmd_validate(args, recipe: Recipe) -> int:
    from ..output.storage import check_output

    check_output(recipe.output)
    counts = ", ".join(_count(len(items), noun) for items, noun in (
        (recipe.terms, "term"), (recipe.sources, "source"),
        (recipe.enrichers, "enricher"), (recipe.sinks, "sink")))
    print(f"{args.recipe}: ok ({counts})")
    return 0


def _cmd_run(args, recipe: Recipe) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: expected a positive number")
    from ..output.storage import prepare_output

    prepare_output(recipe.output)
    _setup_logging(args.verbose, recipe)
    if args.cluster or args.local_workers is not None:
        if args.cluster and args.local_workers is not None:
            raise UsageError("give --cluster or --local-workers, not both")
        if args.local_workers is not None and args.local_workers < 1:
            raise UsageError(f"--local-workers {args.local_workers}: expected a positive "
                             f"number")
        if args.limit is not None:
            raise UsageError("--limit works on one machine only; on a cluster set "
                             "run.limit_per_term or a source's count in the recipe")
        if args.verify_sinks or args.reconsider:
            option = "--verify-sinks" if args.verify_sinks else "--reconsider"
            raise UsageError(f"{option} works on one machine only: run it without "
                             "--cluster/--local-workers, then go on with the cluster")
        from ..cluster.client import ClusterRun

        summary = ClusterRun(recipe, address=args.cluster, local_workers=args.local_workers,
                             progress=not args.no_progress).run()
    else:
        from ..pipeline.engine import Engine

        # From here to the process's exit a signal is a stop request: honoured once
        # the output is locked (the engine's first step), and harmless after the run
        # ended (the exit status stays the run's, not "killed by a signal").
        stop = threading.Event()
        StopSignals(stop).install()
        summary = Engine(recipe, limit=args.limit, progress=not args.no_progress,
                         verify_sinks=args.verify_sinks, stop_requested=stop,
                         reconsider=_reconsider(args.reconsider)).run()
    print(summary.render())
    if summary.error:
        print(f"harvest: error: {printable(summary.error, 2000)}", file=sys.stderr)
    return EXIT_STATUS.get(summary.outcome, 1)


def _cmd_get(args) -> int:
    from .get import forget_recipe, prepare_recipe

    made_output = not args.output.exists()
    path, new = prepare_recipe(args)
    try:
        recipe = load_recipe(path, load_registry())
    except HarvestError:
        if new:
            forget_recipe(path, made_output)
        raise
    args.limit = args.cluster = args.local_workers = args.reconsider = None
    args.verify_sinks = False
    status = _cmd_run(args, recipe)
    print(f"the recipe is {path}: this command again or `harvest run {path}` resumes; "
          f"edit it for more (docs/recipe.md)")
    return status


def _reconsider(text: str | None) -> set[str]:
    if not text:
        return set()
    statuses = {part.strip() for part in text.split(",") if part.strip()}
    unknown = statuses - {"dropped", "rejected", "failed"}
    if unknown or not statuses:
        raise UsageError(f"--reconsider {text}: expected dropped, rejected and/or failed, "
                         f"comma-separated")
    return statuses


def _count(n: int, noun: str) -> str:
    plural = "es" if noun.endswith(("s", "sh", "ch", "x")) else "s"
    return f"{n} {noun}" + ("" if n == 1 else plural)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`harvest plugins | head`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = None
    try:
        if getattr(args, "logs", False):
            _setup_logging(args.verbose)
        if not getattr(args, "reads_recipe", False):
            return args.handler(args)
        recipe = load_recipe(args.recipe, load_registry(), output=getattr(args, "output", None))
        return args.handler(args, recipe)
    except HarvestError as exc:
        for line in exc.lines():
            message = recipe.resolver.redact(line) if recipe is not None else line
            print(f"harvest: error: {printable(message, 2000)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("harvest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
