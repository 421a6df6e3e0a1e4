"""Recipes: YAML in, a validated :class:`Recipe` out, or one :class:`RecipeError` line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..download.faces import missing_detector
from ..download.shaping import IMAGE_OPTIONS, ImageSettings
from ..errors import RecipeError, RecipeErrors, UsageError
from ..options import (
    Bool,
    Float,
    Int,
    MapOf,
    Option,
    OptionError,
    OptionType,
    Secret,
    SecretValue,
    Size,
    Str,
    settings_class,
)
from ..options import Path as PathType
from ..output.remote import CREDENTIALS_IN_URL, check_storage_options, without_credentials
from ..record import Term
from ..secrets import REFERENCE, SecretResolver
from .registry import Registry

LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
TOP_LEVEL = ("name", "terms", "language", "output", "credentials", "retain_days", "run",
             "images", "sources", "enrichers", "sinks")

RUN_OPTIONS: tuple[Option, ...] = (
    Option("concurrency", Int(1, 256), 16, help="downloads in flight at once"),
    Option("workers", Int(0, 256), 0,
           help="processes that download and check images (0: one per core, at most "
                "concurrency; 1: none, threads in the run's own process)"),
    Option("rate_per_host", Float(0.01, 1_000_000), 8.0, help="requests per second to any one host"),
    Option("limit_per_term", Int(1), 100,
           help="records each source yields for each term in each language"),
    Option("timeout", Float(0.1, 600), 30.0, help="seconds to wait for a server to answer"),
    Option("retries", Int(0, 20), 5, help="retries on timeouts, 429 and 5xx"),
    Option("backoff", Float(0, 60), 0.5, help="first retry delay in seconds; doubles each retry"),
    Option("max_bytes", Size(), "25MB", help="largest image download accepted"),
    Option("max_pixels", Int(1), 100_000_000, help="decompression-bomb guard (width x height)"),
    Option("batch_size", Int(1, 10_000), 64, help="records per enricher/sink batch"),
    Option("user_agent", Str(), "harvest/0.1 (+https://github.com/harvest-dataset/harvest)",
           help="User-Agent sent with every request"),
    Option("verify_images", Bool(), True, help="decode every image fully to catch truncation"),
    Option("allow_private_addresses", Bool(), False,
           help="allow image URLs on loopback, private or link-local addresses"),
    Option("respect_opt_outs", Bool(), True,
           help="skip images served with X-Robots-Tag noai or noimageai"),
    Option("respect_robots", Bool(), True,
           help="obey each image host's robots.txt (Disallow, Crawl-delay) for harvest's "
                "user-agent token; false only with a logged warning"),
    Option("respect_tdmrep", Bool(), True,
           help="skip images whose host reserves text-and-data-mining rights (W3C TDMRep: "
                "the tdm-reservation header, /.well-known/tdmrep.json)"),
    Option("respect_noindex", Bool(), False,
           help="also skip images served with X-Robots-Tag noindex or noimageindex"),
    Option("sink_retry_seconds", Float(0, 86400), 60.0,
           help="at the end of a run, how long to keep retrying a sink that is down"),
    Option("download_deadline", Float(1, 86400), 120.0,
           help="most seconds one download may take, retries and slow servers included"),
    Option("max_retry_after", Float(0, 21600), 300.0,
           help="longest Retry-After honoured; a longer one fails the record until next run"),
    Option("api_deadline", Float(1, 86400), 120.0,
           help="most seconds one API call may take, retries and a dripping answer included"),
    Option("max_api_answer", Size(), "32MB", help="largest API answer read"),
    Option("max_api_calls", Int(1), 5000, help="most API calls one search may make"),
    Option("search_deadline", Float(1, 604800), 3600.0,
           help="most seconds one search may spend waiting on API answers"),
    Option("max_crawl_delay", Float(0.01, 86400), 60.0,
           help="longest robots.txt Crawl-delay honoured; a longer one is cut to this, and "
                "the summary names the host and what it asked for"),
    Option("decode_memory", Size(), "1GB",
           help="memory all image decodes may take at once (checking images)"),
    Option("allow_file_urls", Bool(), False,
           help="let URL lists and other sources read file: URLs from this machine"),
    Option("cluster_store", Str(), None,
           help="on a cluster whose workers share no folder with the client: an fsspec URL "
                "(s3://bucket/prefix) through which each finished shard travels whole"),
    Option("cluster_store_options", MapOf(Str()), None,
           help="fsspec options for cluster_store, e.g. {endpoint_url: ...} (no credentials)"),
)


RunSettings = settings_class(
    "RunSettings", RUN_OPTIONS,
    ("images", ImageSettings, field(default=ImageSettings())),  # the ``images:`` section
    module=__name__, doc="The recipe's ``run:`` section (every field a :data:`RUN_OPTIONS` entry) and its "
        "``images:`` section.")


# The run: options a download's final verdict (rejected) depends on: a change to one of
# them may turn a refusal into a picture, so the records it refused are tried again.
DOWNLOAD_VERDICT_OPTIONS = ("allow_private_addresses", "allow_file_urls", "respect_opt_outs",
                            "respect_robots", "respect_tdmrep", "respect_noindex", "max_bytes",
                            "max_pixels", "verify_images", "user_agent")
# The images: filters, what the images stage drops by (a resize setting drops nothing).
IMAGE_VERDICT_OPTIONS = ("min_image_size", "min_width", "min_height", "min_pixels",
                         "max_aspect_ratio")


@dataclass
class PluginSpec:
    kind: str  # sources | enrichers | sinks
    use: str
    label: str  # unique name within the recipe (``name:`` or ``use``)
    key_path: str
    cls: type
    options: dict[str, Any]


@dataclass
class Recipe:
    path: Path
    name: str
    terms: list[Term]
    output: Path
    run: RunSettings
    sources: list[PluginSpec]
    enrichers: list[PluginSpec]
    sinks: list[PluginSpec]
    resolver: SecretResolver = field(repr=False, default_factory=SecretResolver)
    # Days stored images may be kept (``harvest purge``; ``run`` warns past it); None: no limit.
    retain_days: int | None = None

    @property
    def directory(self) -> Path:
        return self.path.parent


MAX_RECIPE_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_VALUES = 100_000  # after aliases are expanded


def _check_shape(path: Path, root) -> None:
    """Refuses a document that is too deep, or that aliases make huge (a "billion laughs"
    bomb is a few lines whose expansion would take minutes and gigabytes to walk). Each
    node is measured once, so this is linear in the text, not in the expansion."""
    sizes: dict[int, int] = {}

    def size(node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise RecipeError(path, "", f"nested more than {MAX_DEPTH} levels deep",
                              node.start_mark.line + 1)
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node, depth + 1) + size(value_node, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item, depth + 1)
        sizes[id(node)] = total
        if total > MAX_VALUES:
            raise RecipeError(path, "", f"more than {MAX_VALUES:,} values once its aliases "
                                        f"are expanded", node.start_mark.line + 1)
        return total

    size(root, 0)


class _Lines:
    """Line numbers of YAML nodes by key path, from PyYAML's composed node tree."""

    def __init__(self, path: Path, root):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.seen: set[int] = set()
        if root is not None:
            self._walk(root, ())

    def _walk(self, node, key_path: tuple) -> None:
        self.lines[key_path] = node.start_mark.line + 1
        if id(node) in self.seen:
            return  # an alias: its lines are where it was defined
        self.seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    raise RecipeError(self.path, format_path(key_path + (key,)),
                                      f"duplicate key (first at line {seen[key]})",
                                      key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
                self.lines[key_path + (key,)] = key_node.start_mark.line + 1
                self._walk(value_node, key_path + (key,))
                self.lines[key_path + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, key_path + (index,))

    def line(self, key_path: tuple) -> int | None:
        while key_path not in self.lines and key_path:
            key_path = key_path[:-1]
        return self.lines.get(key_path)


def verdict_settings(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The settings each stage's final verdicts (rejected, dropped) depend on, by the stage
    the run state names in a verdict's reason (``download``, ``images``, ``enrich LABEL``),
    as JSON values: the run state keeps them, and the next run tries again the records a
    changed stage refused (a secret shows as its reference, never its value)."""
    import json

    def plain(values: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(values, default=str))

    images = {f"images.{name}": getattr(recipe.run.images, name)
              for name in IMAGE_VERDICT_OPTIONS}
    download = {f"run.{name}": getattr(recipe.run, name) for name in DOWNLOAD_VERDICT_OPTIONS}
    stages = {"download": plain(download), "images": plain(images)}
    for spec in recipe.enrichers:
        stages[f"enrich {spec.label}"] = plain(
            {"use": spec.use, **{f"options.{name}": value
                                 for name, value in spec.options.items()}})
    return stages


def format_path(key_path: Sequence) -> str:
    text = ""
    for part in key_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text



def did_you_mean(given, known) -> str:
    """``: did you mean 'folder'?`` for a name close to a known one, else nothing."""
    if not isinstance(given, str):
        return ""
    close = difflib.get_close_matches(given, [str(k) for k in known], n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else ""

class _Reported(Exception):
    """The errors of a part are in the checker's list already; the part has no value."""


class _Checker:
    def __init__(self, path: Path, lines: _Lines, resolver: SecretResolver,
                 errors: list[RecipeError] | None = None):
        self.path, self.lines, self.resolver = path, lines, resolver
        # Every error of the recipe, said together at the end (see ``collecting``).
        self.errors: list[RecipeError] = [] if errors is None else errors

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """An error in the block is kept for the report and checking goes on with the
        next part: one round of fixes, not one per error."""
        try:
            yield
        except RecipeError as exc:
            self.errors.append(exc)
        except _Reported:
            pass

    def fail(self, key_path: tuple, message: str) -> RecipeError:
        return RecipeError(self.path, format_path(key_path), message, self.lines.line(key_path))

    def interpolate(self, value: Any, key_path: tuple) -> Any:
        if isinstance(value, str):
            def substitute(match):
                found = self.resolver.lookup(match.group(1))
                if found is None:
                    raise self.fail(key_path, f"${{{match.group(1)}}} is not set in "
                                              f"{self.resolver.where()}")
                return found
            return REFERENCE.sub(substitute, value)
        if isinstance(value, list):
            return [self.interpolate(v, key_path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.interpolate(v, key_path + (k,)) for k, v in value.items()}
        return value

    def secret(self, value: Any, key_path: tuple) -> SecretValue:
        match = REFERENCE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise self.fail(key_path, "secrets are never written in a recipe: give a reference "
                                      "such as ${FLICKR_KEY} and set it in the environment or "
                                      "the credentials file")
        found = self.resolver.lookup(match.group(1))
        if found is None:
            raise self.fail(key_path, f"secret ${{{match.group(1)}}} is not set in "
                                      f"{self.resolver.where()}")
        return SecretValue(found, value)

    def options(self, declared: Sequence[Option], given: Any, key_path: tuple,
                base_dir: Path) -> dict[str, Any]:
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise self.fail(key_path, "expected a mapping of option: value")
        by_name = {option.name: option for option in declared}
        before = len(self.errors)
        for name in given:
            if name not in by_name:
                known = ", ".join(by_name) or "none"
                self.errors.append(self.fail(
                    key_path + (name,),
                    f"unknown option{did_you_mean(name, by_name)} (known: {known})"))
        result: dict[str, Any] = {}
        for option in declared:
            with self.collecting():
                result[option.name] = self._option(option, given, key_path, base_dir)
        if len(self.errors) > before:
            raise _Reported()
        return result

    def _option(self, option: Option, given: dict, key_path: tuple, base_dir: Path) -> Any:
        here = key_path + (option.name,)
        if option.name in given and given[option.name] is not None:
            value = given[option.name]
        elif option.required:
            raise self.fail(here, f"required option missing: expected {option.type.name}")
        else:
            value = option.default
        if value is None:
            return None
        converted = self.value(option.type, value, here, base_dir)
        if option.check is not None:
            try:
                option.check(converted)
            except ValueError as exc:
                raise self.fail(here, str(exc)) from None
        return converted

    def value(self, option_type: OptionType, value: Any, key_path: tuple, base_dir: Path) -> Any:
        if isinstance(option_type, Secret):
            return self.secret(value, key_path)
        written = value
        value = self.interpolate(value, key_path)
        try:
            converted = option_type.convert(value)
        except ValueError as exc:
            # Show what the recipe says, never what a ${NAME} in it resolved to.
            raise self.fail(key_path, f"{exc} (got {written!r})") from None
        if isinstance(option_type, PathType):
            converted = str((base_dir / Path(converted).expanduser()).resolve())
            expected = {"file": Path.is_file, "dir": Path.is_dir}.get(option_type.exists)
            if expected is not None and not expected(Path(converted)):
                what = "file" if option_type.exists == "file" else "folder"
                shown = written if written != value else converted
                raise self.fail(key_path, f"no such {what}: {shown}")
        return converted


def _parse_terms(checker: _Checker, raw: Any, default_language: str) -> list[Term]:
    if not isinstance(raw, list) or not raw:
        raise checker.fail(("terms",), "expected a non-empty list of terms, e.g. "
                                       "[monkey, {en: cage, ja: 檻}]")
    terms: list[Term] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        with checker.collecting():
            _parse_term(checker, item, ("terms", index), default_language, seen, terms)
    return terms


def _parse_term(checker: _Checker, item: Any, here: tuple, default_language: str,
                seen: set[str], terms: list[Term]) -> None:
    queries: list[tuple[str, str]] = []
    if isinstance(item, (str, int, float)) and not isinstance(item, bool):
        queries.append((default_language, str(item)))
    elif isinstance(item, dict) and item:
        for lang, texts in item.items():
            if not isinstance(lang, str) or not LANGUAGE.fullmatch(lang):
                raise checker.fail(here + (lang,), "expected a language code such as en, ja "
                                                   "or pt-BR as the key")
            for text in texts if isinstance(texts, list) else [texts]:
                if not isinstance(text, (str, int, float)) or isinstance(text, bool) \
                        or not str(text).strip():
                    raise checker.fail(here + (lang,), "expected a non-empty search text")
                queries.append((lang, str(text).strip()))
    else:
        raise checker.fail(here, "expected a term (text) or a mapping language: text")
    key = next((text for lang, text in queries if lang == "en"), queries[0][1])
    if key in seen:
        raise checker.fail(here, f"term {key!r} is listed twice")
    seen.add(key)
    terms.append(Term(key=key, queries=tuple(queries)))


def _parse_plugins(checker: _Checker, kind: str, raw: Any, registry: Registry,
                   base_dir: Path) -> list[PluginSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise checker.fail((kind,), f"expected a list of {kind}, each with `use: NAME`")
    specs: list[PluginSpec] = []
    labels: set[str] = set()
    for index, item in enumerate(raw):
        with checker.collecting():
            specs.append(_parse_plugin(checker, kind, (kind, index), item, registry, base_dir,
                                       labels))
    return specs


def _parse_plugin(checker: _Checker, kind: str, here: tuple, item: Any, registry: Registry,
                  base_dir: Path, labels: set[str]) -> PluginSpec:
    if isinstance(item, str):
        item = {"use": item}
    if not isinstance(item, dict) or "use" not in item:
        raise checker.fail(here, "expected a mapping with `use: NAME` (and `options:`)")
    unknown = set(item) - {"use", "name", "options"}
    if unknown:
        wrong = sorted(unknown)[0]
        raise checker.fail(here + (wrong,), f"unknown key"
                           f"{did_you_mean(wrong, ('use', 'name', 'options'))} "
                           "(expected use, name, options)")
    use = item["use"]
    info = registry.get(kind, use) if isinstance(use, str) else None
    if info is None:
        known = ", ".join(registry.names(kind)) or "none installed"
        raise checker.fail(here + ("use",), f"unknown {kind[:-1]} {use!r}"
                           f"{did_you_mean(use, registry.names(kind))} (known: {known})")
    label = str(item.get("name") or use)
    if label in labels:
        raise checker.fail(here, f"two {kind} are called {label!r}; give one a `name:`")
    labels.add(label)
    options = checker.options(info.cls.options, item.get("options"), here + ("options",),
                              base_dir)
    try:
        info.cls.check_options(options)
    except OptionError as exc:  # option None: the plugin itself (a missing extra)
        where = here + ("use",) if exc.option is None else here + ("options", exc.option)
        raise checker.fail(where, str(exc)) from None
    return PluginSpec(kind, use, label, format_path(here), info.cls, options)


def _tab_problem(text: str, mark) -> str:
    """PyYAML's "found character '\\t' that cannot start any token", said plainly."""
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    column = line.index("\t") + 1 if "\t" in line else mark.column + 1
    return (f"a tab at column {column}: YAML forbids tabs for indentation (and the reader "
            f"refuses them after ':' and '-' too): use spaces")


def load_recipe(path: str | Path, registry: Registry, *, environ: Mapping[str, str] | None = None,
                output: str | Path | None = None) -> Recipe:
    """Read, interpolate and validate a recipe; raise RecipeError naming what is wrong."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise UsageError(f"{path}: a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read recipe ({exc})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_shape(path, root)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if mark is not None and ("'\\t'" in problem or "tab" in problem):
            problem = _tab_problem(text, mark)
        raise RecipeError(path, "", f"YAML syntax error: {problem}",
                          mark.line + 1 if mark else None) from None
    except RecursionError:
        raise RecipeError(path, "", f"nested more than {MAX_DEPTH} levels deep") from None
    lines = _Lines(path, root)
    base_dir = path.resolve().parent
    if not isinstance(data, dict):
        raise RecipeError(path, "", "expected a YAML mapping with name, terms, sources, sinks")

    errors: list[RecipeError] = []
    resolver_file = None
    provisional = _Checker(path, lines, SecretResolver(environ=environ), errors)
    # A misspelt key (sorces) is one error: not also "sources: required".
    meant: set[str] = set()
    for key in data:
        if key not in TOP_LEVEL:
            meant.update(difflib.get_close_matches(str(key), TOP_LEVEL, n=1, cutoff=0.6))
            errors.append(provisional.fail((key,), f"unknown key{did_you_mean(key, TOP_LEVEL)} "
                                                   f"(expected one of {', '.join(TOP_LEVEL)})"))
    if data.get("credentials") is not None:
        with provisional.collecting():
            credentials = provisional.value(PathType(), data["credentials"], ("credentials",),
                                            base_dir)
            resolver_file = Path(credentials)
    resolver = SecretResolver(resolver_file, environ=environ)
    checker = _Checker(path, lines, resolver, errors)

    name = language = output_dir = images = run = None
    with checker.collecting():
        name = checker.value(Str(), data.get("name") or path.stem, ("name",), base_dir)
    with checker.collecting():
        language = checker.value(Str(LANGUAGE.pattern, "a language code such as en"),
                                 data.get("language", "en"), ("language",), base_dir)
    # Terms may be left out when no source searches by them (folders, URL lists).
    terms = None
    if data.get("terms") is not None:
        with checker.collecting():
            terms = _parse_terms(checker, data.get("terms"), language or "en")
    with checker.collecting():
        if output is not None:
            output_dir = Path(output).resolve()
        elif data.get("output") is not None:
            output_dir = Path(checker.value(PathType(), data["output"], ("output",), base_dir))
        elif "output" not in meant:
            raise checker.fail(("output",), "required: the folder images and run state go to")
    with checker.collecting():
        images = ImageSettings(**checker.options(IMAGE_OPTIONS, data.get("images"),
                                                 ("images",), base_dir))
        if images.blur_faces and (problem := missing_detector()):
            raise checker.fail(("images", "blur_faces"), problem)
    with checker.collecting():
        run = RunSettings(**checker.options(RUN_OPTIONS, data.get("run"), ("run",), base_dir),
                          images=images or ImageSettings())
        if run.cluster_store and without_credentials(run.cluster_store):
            raise checker.fail(("run", "cluster_store"), CREDENTIALS_IN_URL)
        if secret := check_storage_options(run.cluster_store_options):
            raise checker.fail(("run", "cluster_store_options", secret),
                               "credentials never go in a recipe; set them in the environment")
    sources: list[PluginSpec] = []
    with checker.collecting():
        sources = _parse_plugins(checker, "sources", data.get("sources"), registry, base_dir)
        if not sources and not data.get("sources") and "sources" not in meant:
            raise checker.fail(("sources",), "expected at least one source, e.g. "
                                             "[{use: flickr}]")
    if terms is None and data.get("terms") is None:
        searching = [spec.label for spec in sources if spec.cls.needs_terms(spec.options)]
        if searching and "terms" not in meant:
            verb = "searches" if len(searching) == 1 else "search"
            errors.append(checker.fail(("terms",), f"required: {', '.join(searching)} {verb} "
                                                   f"by terms (e.g. terms: [monkey, "
                                                   f"{{en: cage, ja: 檻}}])"))
        terms = []
    enrichers: list[PluginSpec] = []
    with checker.collecting():
        enrichers = _parse_plugins(checker, "enrichers", data.get("enrichers"), registry,
                                   base_dir)
    sinks: list[PluginSpec] = []
    with checker.collecting():
        sinks = _parse_plugins(checker, "sinks", data.get("sinks"), registry, base_dir)
        if not sinks and not data.get("sinks"):
            defaults = [info for info in registry.all("sinks") if info.cls.is_default]
            for info in defaults:
                options = checker.options(info.cls.options, {}, ("sinks",), base_dir)
                sinks.append(PluginSpec("sinks", info.name, info.name, "sinks (default)",
                                        info.cls, options))
            if not sinks:
                raise checker.fail(("sinks",), "expected at least one sink")
    retain_days = None
    if data.get("retain_days") is not None:
        with checker.collecting():
            retain_days = checker.value(Int(1, 36_500), data["retain_days"], ("retain_days",),
                                        base_dir)
    if errors:
        # In the order of the file, so the list reads as the recipe does.
        errors.sort(key=lambda error: error.line if error.line is not None else 10**9)
        raise RecipeErrors(errors) if len(errors) > 1 else errors[0]
    return Recipe(path=path, name=name, terms=terms, output=output_dir, run=run,
                  sources=sources, enrichers=enrichers, sinks=sinks, resolver=resolver,
                  retain_days=retain_days)
