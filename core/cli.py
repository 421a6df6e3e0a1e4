"""The ``harvest`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import HarvestError, UsageError
from .recipe import Recipe, load_recipe
from .registry import KINDS, load_registry
from .secrets import RedactingFilter

log = logging.getLogger("harvest")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harvest", description="Harvest image datasets "
                                     "from the web with YAML recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every record")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe (resumes an interrupted run)")
    run.add_argument("recipe", type=Path)
    run.add_argument("--output", type=Path, help="override the recipe's output folder")
    run.add_argument("--limit", type=int, help="stop after this many records in all")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")

    validate = commands.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)

    credits = commands.add_parser("credits", help="write CREDITS.md and credits.csv for a harvest")
    credits.add_argument("output", type=Path, help="the harvest's output folder")
    credits.add_argument("--records", type=Path, help="records file (default OUTPUT/records.jsonl)")

    plugins = commands.add_parser("plugins", help="list plugins, their options and origin")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _setup_logging(verbose: bool, recipe: Recipe | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers = [console]
    if recipe is not None:
        state_dir = recipe.output / ".harvest"
        state_dir.mkdir(parents=True, exist_ok=True)
        logfile = logging.FileHandler(state_dir / "harvest.log", encoding="utf-8")
        logfile.setLevel(logging.DEBUG if verbose else logging.INFO)
        logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(logfile)
    for handler in handlers:
        if recipe is not None:
            handler.addFilter(RedactingFilter(recipe.resolver))
        root.addHandler(handler)
    # urllib3 logs every retry with the full URL; our summary reports retries' outcomes.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _cmd_plugins(as_json: bool) -> int:
    registry = load_registry()
    listing = {}
    for kind in KINDS:
        listing[kind] = [{
            "name": info.name, "origin": info.origin, "summary": info.cls.summary(),
            "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
            "options": [{"name": o.name, "type": o.type.name, "default": _plain(o.default),
                         "required": o.required, "help": o.help} for o in info.cls.options],
        } for info in registry.all(kind)]
    if as_json:
        print(json.dumps(listing, ensure_ascii=False, indent=2))
        return 0
    for kind, plugins in listing.items():
        print(f"{kind}:")
        for plugin in plugins:
            print(f"  {plugin['name']}  [{plugin['origin']}]  {plugin['summary']}")
            for option in plugin["options"]:
                bits = [option["type"]]
                if option["required"]:
                    bits.append("required")
                elif option["default"] is not None:
                    bits.append(f"default {option['default']!r}")
                print(f"      {option['name']} ({', '.join(bits)}): {option['help']}")
    return 0


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plugins":
            return _cmd_plugins(args.json)
        if args.command == "credits":
            from .credits import write_credits

            markdown, table, count = write_credits(args.output, args.records)
            print(f"{count} credits written to {markdown} and {table}")
            return 0
        _setup_logging(args.verbose)
        registry = load_registry()
        recipe = load_recipe(args.recipe, registry, output=getattr(args, "output", None))
        if args.command == "validate":
            print(f"{args.recipe}: ok ({len(recipe.terms)} terms, {len(recipe.sources)} sources, "
                  f"{len(recipe.enrichers)} enrichers, {len(recipe.sinks)} sinks)")
            return 0
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit {args.limit}: expected a positive number")
        _setup_logging(args.verbose, recipe)
        from .engine import Engine

        summary = Engine(recipe, limit=args.limit, progress=not args.no_progress).run()
        print(summary.render())
        return 130 if summary.outcome == "interrupted" else 0
    except HarvestError as exc:
        print(f"harvest: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("harvest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
