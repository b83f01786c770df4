"""The reference pages of the docs site, generated from the code at every build.

An mkdocs hook (``hooks:`` in mkdocs.yml): ``on_files`` adds the pages below as
generated files, so nothing in ``docs/reference/`` is written or copied by hand.
``tests/test_docs.py`` imports this module and checks the pages list every
configuration field, error code, counter and log event the source has.

- configuration: ``EmailConfig.model_fields`` (type, default, variable, description);
- error codes: the ``code`` of every exception class, every ``code="..."`` given
  to a call (an exception, a log event), and the reason codes of the inbound
  policy, read from the source with ``ast``;
- counters and log events: every ``metrics.inc`` / ``metrics.gauge`` and every
  ``log_event`` call, followed through the small helpers that pass an event name on;
- the Python API: one mkdocstrings block per name of ``prx_channel_email.__all__``.
"""

import ast
import functools
import sys
import types
import typing
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "prx_channel_email"
if str(ROOT) not in sys.path:  # document this checkout, whatever is installed
    sys.path.insert(0, str(ROOT))

GENERATED_NOTE = (
    "!!! note\n    Generated from the code when the site is built "
    "(`docs/_gen/reference.py`); do not edit.\n"
)


def _cell(text: str) -> str:
    """Text that fits one Markdown table cell; a ``<`` outside code is shown, not read
    as HTML (a message such as "<id> not found" must not vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _sources() -> tuple[tuple[Path, ast.Module], ...]:
    """Every module of the package, parsed once per process."""
    return tuple(
        (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    )


def _strings(node: ast.AST | None) -> list[str]:
    """The string values an expression can have: a constant, either branch of
    ``a if c else b``, or an f-string shown as a pattern (``{x}`` -> ``<x>``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BoolOp):  # `x or "default"`
        return [s for value in node.values for s in _strings(value)]
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            elif isinstance(part, ast.FormattedValue):
                out.append(f"<{_pattern_name(part.value)}>")
        return ["".join(out)]
    return []


def _pattern_name(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text.rsplit(".", 1)[-1]


def _message(node: ast.AST | None) -> str:
    """An exception's message as the reader would see it, with ``…`` for what varies."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            str(p.value) if isinstance(p, ast.Constant) else "…" for p in node.values
        ).strip()
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    return ""


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _local_strings(func: ast.AST | None, name: str, tree: ast.AST | None = None) -> list[str]:
    """Values assigned to a local variable ``name`` inside ``func``: ``event = "a" if x
    else "b"``, or ``code = _classify(exc)`` (the strings that function of ``tree`` returns)."""
    if func is None:
        return []
    out: list[str] = []
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            out += _strings(node.value)
            if tree is not None and isinstance(node.value, ast.Call):
                out += _returned_strings(tree, _call_name(node.value))
    return out


def _returned_strings(tree: ast.AST, func_name: str) -> list[str]:
    out: list[str] = []
    for func in _functions(tree):
        if func.name == func_name:
            for node in ast.walk(func):
                if isinstance(node, ast.Return):
                    out += _strings(node.value)
    return out


@functools.cache
def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


# --- configuration -------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'`"{a}"`' for a in args)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in kept)
        return f"{text} or none" if len(kept) < len(args) else text
    if origin is list:
        return f"list of {_type_text(args[0])}"
    names = {
        "str": "string",
        "int": "integer",
        "float": "number",
        "bool": "boolean",
        "SecretStr": "secret string",
        "Path": "path",
    }
    name = getattr(annotation, "__name__", str(annotation))
    return names.get(name, name)


def _constraints(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{sign} {value}")
    return ", ".join(words)


def _default_text(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()
        if not isinstance(value, list):  # computed where it runs (a path, a host name)
            return "see description"
    else:
        value = info.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[]`" if not value else "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if value is PydanticUndefined:  # pragma: no cover - is_required() covers it
        return "**required**"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value}`"


def config_sections() -> list[tuple[str, list[str]]]:
    """The fields in source order, under the ``# --- section ---`` comments of the class."""
    path = PACKAGE / "config" / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "EmailConfig")
    sections: list[tuple[str, list[str]]] = []
    title = "Fields"
    last = cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.target.id.startswith("_") or node.target.id == "model_config":
            last = node.end_lineno or node.lineno
            continue
        for line in lines[last : node.lineno - 1]:
            text = line.strip()
            if text.startswith("# ---") and text.endswith("---"):
                title = text.strip("#- ").split(" (")[0]
                title = title[:1].upper() + title[1:]
        if not sections or sections[-1][0] != title:
            sections.append((title, []))
        sections[-1][1].append(node.target.id)
        last = node.end_lineno or node.lineno
    return sections


def configuration_page() -> str:
    from prx_channel_email.config import ENV_PREFIX, EmailConfig

    fields = EmailConfig.model_fields
    out = [
        "# Configuration reference",
        "",
        GENERATED_NOTE,
        f"Every field of `EmailConfig` ({len(fields)}), in the order of the source. "
        "Set them in the `[channels_config.email]` table, in a host's table "
        "(snake_case or camelCase keys), as keyword arguments, or as the environment "
        f"variable `{ENV_PREFIX}<FIELD>`; the [configuration guide](../guides/configuration.md) "
        "says which source wins. Lists may be given to a variable as JSON or "
        "comma-separated. Secret fields are never printed, logged or put in an error.",
        "",
    ]
    for title, names in config_sections():
        out += [f"## {title}", "", "| field | type | default | description |", "|---|---|---|---|"]
        for name in names:
            info = fields[name]
            kind = _type_text(info.annotation)
            bounds = _constraints(info.metadata)
            if bounds:
                kind += f" ({bounds})"
            variable = f"`{ENV_PREFIX}{name.upper()}`"
            out.append(
                f"| `{name}`<br>{variable} | {_cell(kind)} | {_default_text(info)} "
                f"| {_cell(info.description or '')} |"
            )
        out.append("")
    return "\n".join(out)


# --- error codes ---------------------------------------------------------------------


@dataclass
class CodeUse:
    code: str
    module: str
    kind: str  # "exception <Class>" / "log event <name>" / "class default" / "reason"
    text: str = ""


@dataclass
class ErrorClass:
    name: str
    module: str
    code: str
    bases: list[str]
    doc: str
    public: bool


def error_classes() -> list[ErrorClass]:
    import prx_channel_email as pkg

    out = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "code" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    doc = (ast.get_docstring(node) or "").split("\n\n")[0]
                    out.append(
                        ErrorClass(
                            node.name,
                            _module_name(path),
                            stmt.value.value,
                            [ast.unparse(b) for b in node.bases],
                            " ".join(doc.split()),
                            node.name in pkg.__all__,
                        )
                    )
    return out


# Module-level constants that are reason codes (the policy's refusals, quarantine,
# deferral and attachment reasons): the module, and what its codes mean.
REASON_MODULES = {
    "prx_channel_email._inbound.policy": "refused by the policy: `inbound.skipped.<code>`, "
    "`RejectedMessage.reason`",
    "prx_channel_email._mail.addresses": "refused by the policy: no single, readable From",
    "prx_channel_email._inbound.pipeline": "quarantined: `inbound.quarantined`",
    "prx_channel_email._inbound.ratelimit": "deferred: waits in the state, handed on later",
    "prx_channel_email._inbound.attachments": "`Attachment.skipped_reason`: listed, not saved",
}


def reason_codes() -> list[CodeUse]:
    out = []
    for path, tree in _sources():
        module = _module_name(path)
        if module not in REASON_MODULES:
            continue
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and node.value.value.replace("_", "").isalpha()
                and node.value.value.islower()
            ):
                out.append(CodeUse(node.value.value, module, "reason", REASON_MODULES[module]))
    return out


def code_uses() -> list[CodeUse]:
    """Every ``code=`` string given to a call: an exception raised with it, a log event
    that carries it, an internal failure object."""
    wrappers = _event_wrappers()
    events = {place: names for place, names, *_ in _event_calls(wrappers)}
    exception_names = {c.name for c in error_classes()}
    out: list[CodeUse] = []
    for path, tree in _sources():
        module = _module_name(path)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg != "code":
                    continue
                values = _strings(kw.value)
                if isinstance(kw.value, ast.Name):  # code = "a" if ... else "b"; f(code=code)
                    values = _local_strings(_enclosing_function(node, parents), kw.value.id, tree)
                for code in values:
                    name = _call_name(node)
                    if (path, node.lineno, node.col_offset) in events:
                        shown = ", ".join(events[(path, node.lineno, node.col_offset)])
                        out.append(CodeUse(code, module, f"log event {shown}"))
                    elif name in exception_names or name.endswith(("Error", "Failure")):
                        text = _message(node.args[0]) if node.args else ""
                        out.append(CodeUse(code, module, f"`{name}`", text))
                    else:
                        out.append(CodeUse(code, module, f"`{name}(...)`"))
    return out


def all_codes() -> dict[str, list[CodeUse]]:
    codes: dict[str, list[CodeUse]] = defaultdict(list)
    for cls in error_classes():
        codes[cls.code].append(CodeUse(cls.code, cls.module, f"default of `{cls.name}`", cls.doc))
    for use in code_uses() + reason_codes():
        codes[use.code].append(use)
    return dict(sorted(codes.items()))


def errors_page() -> str:
    classes = error_classes()
    out = [
        "# Error codes",
        "",
        GENERATED_NOTE,
        "Every error the package raises is a `ChannelError` with a machine-readable "
        "`code`; the same codes appear in log records (`code=...`), in "
        "`ChannelStatus.code` and in `channel.status.last_error_code`. A host catches "
        "`ChannelError` (or one of its subclasses) and looks at `.code`.",
        "",
        "## Exception classes",
        "",
        "| class | code | is a | what it means |",
        "|---|---|---|---|",
    ]
    for cls in sorted(classes, key=lambda c: (not c.public, c.module, c.name)):
        where = "" if cls.public else f" (internal, `{cls.module}`)"
        out.append(
            f"| `{cls.name}`{where} | `{cls.code}` | {', '.join(f'`{b}`' for b in cls.bases)} "
            f"| {_cell(cls.doc)} |"
        )
    out += [
        "",
        "## Every code",
        "",
        "Where each code comes from: the exception raised with it (and its message, "
        "`…` standing for what varies), the log event that carries it, or the rule "
        "it names.",
        "",
        "| code | raised or logged as | where | message or meaning |",
        "|---|---|---|---|",
    ]
    for code, uses in all_codes().items():
        seen: set[tuple[str, str, str]] = set()
        rows = []
        for use in uses:
            key = (use.kind, use.module, use.text)
            if key in seen:
                continue
            seen.add(key)
            rows.append(use)
        kinds = "<br>".join(_cell(u.kind) for u in rows)
        modules = "<br>".join(f"`{u.module.removeprefix('prx_channel_email.')}`" for u in rows)
        texts = "<br>".join(_cell(u.text) or "-" for u in rows)
        out.append(f"| `{code}` | {kinds} | {modules} | {texts} |")
    out.append("")
    return "\n".join(out)


# --- counters and log events ---------------------------------------------------------


@dataclass
class Wrapper:
    """A function that passes one of its parameters on as a log event's name."""

    name: str
    event_index: int  # position of the event parameter among the call's arguments
    level_index: int | None
    is_method: bool
    fields: set[str] = field(default_factory=set)


@functools.cache
def _event_wrappers() -> dict[str, Wrapper]:
    """``log_event`` itself, and every function that forwards a parameter to it as
    the event name (``self._log(level, event, ...)`` and the like), to a fixpoint."""
    wrappers: dict[str, Wrapper] = {"log_event": Wrapper("log_event", 2, 1, False)}
    trees = [tree for _, tree in _sources()]
    changed = True
    while changed:
        changed = False
        for tree in trees:
            for func in _functions(tree):
                if func.name in wrappers:
                    continue
                params = [a.arg for a in func.args.posonlyargs + func.args.args]
                is_method = bool(params) and params[0] in ("self", "cls")
                for node in ast.walk(func):
                    if not (isinstance(node, ast.Call) and _call_name(node) in wrappers):
                        continue
                    inner = wrappers[_call_name(node)]
                    event_arg = _argument(node, inner, inner.event_index)
                    if isinstance(event_arg, ast.Name) and event_arg.id in params:
                        level_arg = (
                            _argument(node, inner, inner.level_index)
                            if inner.level_index is not None
                            else None
                        )
                        level_index = (
                            params.index(level_arg.id) - is_method
                            if isinstance(level_arg, ast.Name) and level_arg.id in params
                            else None
                        )
                        wrappers[func.name] = Wrapper(
                            func.name,
                            params.index(event_arg.id) - is_method,
                            level_index,
                            is_method,
                            {kw.arg for kw in node.keywords if kw.arg},
                        )
                        changed = True
                        break
    return wrappers


def _argument(call: ast.Call, wrapper: Wrapper, index: int | None) -> ast.AST | None:
    if index is None:
        return None
    if index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args):
        return call.args[index]
    return None


def _level(node: ast.AST | None) -> str:
    if isinstance(node, ast.Attribute) and node.attr.isupper():
        return node.attr.lower()
    return ""


def _loggers(tree: ast.Module, module: str) -> dict[str, str]:
    """Module-level ``log = logging.getLogger(...)`` names and the logger they name."""
    out = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _call_name(node.value) == "getLogger"
            and node.value.args
        ):
            arg = node.value.args[0]
            name = arg.value if isinstance(arg, ast.Constant) else module
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = str(name)
    return out


@dataclass
class Event:
    name: str
    level: str
    logger: str
    module: str
    fields: set[str]
    codes: set[str]


def _event_calls(
    wrappers: dict[str, Wrapper],
) -> Iterator[tuple[tuple[Path, int, int], list[str], str, str, str, set[str], set[str]]]:
    """Each call that logs an event: its place, event names, level, logger, module,
    fields and codes."""
    for path, tree in _sources():
        module = _module_name(path)
        loggers = _loggers(tree, module)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _call_name(node) in wrappers):
                continue
            wrapper = wrappers[_call_name(node)]
            enclosing = _enclosing_function(node, parents)
            if enclosing is not None and getattr(enclosing, "name", "") == wrapper.name:
                continue  # the wrapper's own forwarding call
            arg = _argument(node, wrapper, wrapper.event_index)
            names = _strings(arg)
            if isinstance(arg, ast.Name):
                names = _local_strings(enclosing, arg.id)
                if (
                    not names
                    and isinstance(enclosing, ast.FunctionDef | ast.AsyncFunctionDef)
                    and enclosing.name in wrappers
                ):
                    continue  # forwarded from a wrapper's parameter: its callers count
            if not names:
                continue
            level = _level(_argument(node, wrapper, wrapper.level_index))
            logger = ""
            if wrapper.name == "log_event" and node.args:
                first = node.args[0]
                logger = loggers.get(first.id, "") if isinstance(first, ast.Name) else ""
            fields = {kw.arg for kw in node.keywords if kw.arg} | wrapper.fields
            if "exc" in fields:  # log_event adds the exception's text and code
                fields |= {"error", "code"}
            fields -= {"exc", "level", "event"}
            codes = {c for kw in node.keywords if kw.arg == "code" for c in _strings(kw.value)}
            yield (path, node.lineno, node.col_offset), names, level, logger, module, fields, codes


def log_events() -> list[Event]:
    wrappers = _event_wrappers()
    events: dict[str, Event] = {}
    module_loggers: dict[str, set[str]] = defaultdict(set)
    for path, tree in _sources():
        for logger in _loggers(tree, _module_name(path)).values():
            module_loggers[_module_name(path)].add(logger)
    for _place, names, level, logger, module, fields, codes in _event_calls(wrappers):
        if not logger:
            logger = ", ".join(sorted(module_loggers.get(module, set())))
        for name in names:
            event = events.setdefault(name, Event(name, "", "", module, set(), set()))
            if level and level not in event.level.split("/"):
                event.level = "/".join(filter(None, [event.level, level]))
            if logger and logger not in event.logger.split(", "):
                event.logger = ", ".join(filter(None, [event.logger, logger]))
            event.fields |= fields
            event.codes |= codes
    return sorted(events.values(), key=lambda e: e.name)


@dataclass
class Counter:
    name: str
    kind: str  # counter / level
    modules: set[str]


def counters() -> list[Counter]:
    found: dict[str, Counter] = {}
    for path, tree in _sources():
        module = _module_name(path)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _call_name(node) in ("inc", "gauge")):
                continue
            if not (isinstance(node.func, ast.Attribute) and node.args):
                continue
            owner = ast.unparse(node.func.value)
            if "metrics" not in owner:
                continue
            arg = node.args[0]
            names = _strings(arg)
            if isinstance(arg, ast.Name):
                enclosing = _enclosing_function(node, parents)
                names = _local_strings(enclosing, arg.id) or _parameter_values(
                    tree, enclosing, arg.id
                )
            kind = "level" if _call_name(node) == "gauge" else "counter"
            for name in names:
                entry = found.setdefault(name, Counter(name, kind, set()))
                entry.modules.add(module.removeprefix("prx_channel_email."))
    return sorted(found.values(), key=lambda c: c.name)


def _parameter_values(tree: ast.AST, func: ast.AST | None, param: str) -> list[str]:
    """String values callers in the same module pass for ``param`` of ``func`` (by keyword
    or by position): ``counter="outbound.retries"``."""
    if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
        return []
    params = [a.arg for a in func.args.posonlyargs + func.args.args]
    offset = 1 if params and params[0] in ("self", "cls") else 0
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) == func.name:
            for kw in node.keywords:
                if kw.arg == param:
                    out += _strings(kw.value)
            if param in params:
                index = params.index(param) - offset
                if index < len(node.args):
                    out += _strings(node.args[index])
    return out


def prometheus_names() -> dict[str, tuple[str, str]]:
    """Dotted counter name (or ``prefix.`` of a family) -> (Prometheus metric, help),
    from the operations endpoint's tables when that module is there."""
    try:
        from prx_channel_email._ops import prometheus
    except ImportError:  # no operations endpoint in this version, or no prometheus_client
        return {}
    prefix = getattr(prometheus, "PREFIX", "prx_email")
    out: dict[str, tuple[str, str]] = {}
    for table, labels in (
        ("_FOLDER_COUNTERS", "account, folder"),
        ("_ACCOUNT_COUNTERS", "account"),
    ):
        for name, (metric, doc) in getattr(prometheus, table, {}).items():
            out[name] = (f"{prefix}_{metric}_total{{{labels}}}", doc)
    for start, (metric, label, doc, *_rest) in getattr(prometheus, "_FAMILIES", {}).items():
        out[start] = (f"{prefix}_{metric}_total{{account, {label}}}", doc)
    for start, (metric, label, doc) in getattr(prometheus, "_GAUGE_FAMILIES", {}).items():
        out[start] = (f"{prefix}_{metric}{{account, {label}}}", doc)
    return out


def _prometheus_for(name: str, table: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if name in table:
        return table[name]
    for start, entry in table.items():
        if start.endswith(".") and name.startswith(start):
            return entry
    return ("", "")


def metric_families() -> list[tuple[str, str, str]]:
    """Prometheus families built directly (``GaugeMetricFamily(f"{PREFIX}_name", "help")``):
    (name, kind, help)."""
    out = []
    for _path, tree in _sources():
        for node in ast.walk(tree):
            kind = _call_name(node) if isinstance(node, ast.Call) else ""
            if kind not in ("CounterMetricFamily", "GaugeMetricFamily") or len(node.args) < 2:
                continue
            assert isinstance(node, ast.Call)
            name_node, doc_node = node.args[0], node.args[1]
            if not isinstance(name_node, ast.JoinedStr) or not isinstance(doc_node, ast.Constant):
                continue  # built from a table: listed with its counter
            parts = name_node.values
            if any(isinstance(p, ast.FormattedValue) for p in parts[1:]):
                continue
            tail = "".join(str(p.value) for p in parts if isinstance(p, ast.Constant))
            suffix = "_total" if kind == "CounterMetricFamily" else ""
            out.append(
                (f"prx_email{tail}{suffix}", kind[: -len("MetricFamily")].lower(), doc_node.value)
            )
    return sorted(set(out))


def observability_page() -> str:
    prom = prometheus_names()
    out = [
        "# Counters and log events",
        "",
        GENERATED_NOTE,
        "`channel.stats()` returns the counters as a dict (names are dotted; a "
        "*level* is the current value, not a running count). Log records go to "
        "loggers under `prx_channel_email` as `event key=value ...`, with the same "
        "fields as a dict in `record.prx`; they never hold a password or a token.",
        "",
        "## Counters",
        "",
        "`<x>` in a name stands for a value (a reason code, an error code).",
    ]
    if prom:
        out += [
            "With `metrics_port` set, `/metrics` serves them in the Prometheus format, "
            "under the metric named beside each (with its help text).",
            "",
            "| name | kind | Prometheus metric | meaning | counted in |",
            "|---|---|---|---|---|",
        ]
    else:
        out += ["", "| name | kind | counted in |", "|---|---|---|"]
    families = metric_families()
    catch_all = next((n for n, _kind, _doc in families if n.endswith("_events_total")), "")
    for c in counters():
        where = ", ".join(f"`{m}`" for m in sorted(c.modules))
        if prom:
            metric, doc = _prometheus_for(c.name, prom)
            if metric:
                shown = f"`{metric}`"
            else:  # counted under its own name in the catch-all family
                shown = f"`{catch_all}{{account, event}}`" if catch_all else "-"
            out.append(f"| `{c.name}` | {c.kind} | {shown} | {_cell(doc) or '-'} | {where} |")
        else:
            out.append(f"| `{c.name}` | {c.kind} | {where} |")
    if families:
        out += [
            "",
            "## Other Prometheus metrics",
            "",
            "| metric | kind | meaning |",
            "|---|---|---|",
        ]
        out += [f"| `{name}` | {kind} | {_cell(doc)} |" for name, kind, doc in families]
    out += [
        "",
        "## Log events",
        "",
        "| event | level | logger | fields | codes |",
        "|---|---|---|---|---|",
    ]
    for e in log_events():
        fields = ", ".join(f"`{f}`" for f in sorted(e.fields))
        codes = ", ".join(f"`{c}`" for c in sorted(e.codes))
        out.append(f"| `{e.name}` | {e.level or 'varies'} | `{e.logger}` | {fields} | {codes} |")
    out.append("")
    return "\n".join(out)


# --- the command line -----------------------------------------------------------------


def _plain(markup: str) -> str:
    """Help text without rich's markup (``[bold]x[/]``)."""
    from rich.text import Text

    return Text.from_markup(markup).plain


def _commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    for name in sorted(getattr(command, "commands", {}) or {}):
        yield from _commands(command.commands[name], [*path, name])


def cli_page() -> str:
    """Every command of ``prx-email`` (and of ``prx``) with its options, from the typer app."""
    import typer

    from prx_channel_email import cli

    out = [
        "# Command line",
        "",
        GENERATED_NOTE,
        "Every command and option, from the command line's own definitions "
        "(`prx-email COMMAND --help` prints the same). How to use them: "
        "[command line and operations](../guides/cli.md), [doctor](../guides/doctor.md).",
        "",
    ]
    for app, name in ((cli.app, "prx-email"), (cli.prx_app, "prx")):
        for path, command in _commands(typer.main.get_command(app), [name]):
            params = [p for p in command.params if not getattr(p, "hidden", False)]
            if getattr(command, "commands", None) and len(path) > 1:
                continue  # a group: its commands follow
            if len(path) == 1:
                if name == "prx":
                    out += [f"## `{name}`", "", _plain(command.help or "").strip(), ""]
                continue
            args = " ".join(
                (p.name or "").upper() if p.required else f"[{(p.name or '').upper()}]"
                for p in params
                if getattr(p, "param_type_name", "") == "argument"
            )
            out += [f"## `{' '.join(path)}`", ""]
            out += [f"`{' '.join(path)} [OPTIONS]{' ' + args if args else ''}`", ""]
            out += [_plain(command.help or "").strip(), ""]
            rows = []
            for p in params:
                kind = getattr(p, "param_type_name", "")
                if kind == "argument":
                    shown = (p.name or "").upper()
                else:
                    shown = ", ".join(p.opts + p.secondary_opts)
                    if not p.is_flag and p.metavar:
                        shown += f" {p.metavar}"
                help_text = _plain(getattr(p, "help", None) or "")
                default = p.default
                if default not in (None, False, (), []) and not callable(default):
                    help_text += f" (default: {default})"
                rows.append(f"| `{shown}` | {_cell(help_text) or '-'} |")
            if rows:
                out += ["| option | what |", "|---|---|", *rows, ""]
    return "\n".join(out)


# --- providers -----------------------------------------------------------------------


def providers_page() -> str:
    """The provider table (``config/providers.py``), which config, OAuth and the doctor read."""
    from prx_channel_email.config import providers

    out = [
        "# Providers",
        "",
        GENERATED_NOTE,
        "What the package knows about each provider, from its one table "
        "(`config/providers.py`): the config presets `trusted_authserv_ids` from it, "
        "OAuth takes its endpoints and scopes from it, and the doctor recognises the "
        "provider from the host and words its fixes with it. How to set a provider up: "
        "[providers and OAuth](../guides/providers.md).",
        "",
        "| provider | IMAP | SMTP | trusted authserv-ids (preset) | OAuth "
        "| when a password login is refused |",
        "|---|---|---|---|---|---|",
    ]

    def server(s: Any) -> str:
        return f"`{s.host}` {s.port} ({s.security})" if s is not None else "-"

    for row in providers.PROVIDERS:
        ids = ", ".join(f"`{i}`" for i in row.authserv_ids) or "-"
        if row.oauth is None:
            oauth = "-"
        elif not row.oauth.token_url:
            oauth = '`oauth_provider = "custom"`: the config names every endpoint'
        else:
            scopes = ", ".join(f"`{s}`" for s in row.oauth.scopes)
            device = (
                "no device flow"
                if row.oauth.device_refusal
                else ("device flow" if row.oauth.device_url else "no device flow")
            )
            oauth = f'`oauth_provider = "{row.oauth.name}"`; scopes {scopes}; {device}'
        names = ", ".join(f"`{h}`" for h in row.imap_aliases)
        label = row.label + (f" (also {names})" if names else "")
        out.append(
            f"| {_cell(label)} | {server(row.imap)} | {server(row.smtp)} | {ids} "
            f"| {_cell(oauth)} | {_cell(row.login_hint or '-')} |"
        )
    out.append("")
    return "\n".join(out)


# --- the Python API ------------------------------------------------------------------


def python_api_page() -> str:
    import prx_channel_email as pkg

    out = [
        "# Python API",
        "",
        GENERATED_NOTE,
        "What `prx_channel_email` exports (its `__all__`), documented from the "
        "docstrings. Modules not exported here are internal: their names may change "
        "in any release. How the pieces fit: "
        "[using the channel from Python](../guides/embedding.md).",
        "",
        f"The package version is `prx_channel_email.__version__` (`{pkg.__version__}` "
        "when this page was built).",
        "",
    ]
    members = {"EmailConfig": ["from_table"]}
    for name in pkg.__all__:
        if name.startswith("__"):
            continue
        out.append(f"::: prx_channel_email.{name}")
        if name in members:
            out += ["    options:", f"      members: {members[name]}"]
        out.append("")
    return "\n".join(out)


def pages() -> dict[str, str]:
    """Every generated page, by its path under docs/."""
    return {
        "reference/configuration.md": configuration_page(),
        "reference/errors.md": errors_page(),
        "reference/observability.md": observability_page(),
        "reference/providers.md": providers_page(),
        "reference/cli.md": cli_page(),
        "reference/python-api.md": python_api_page(),
    }


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated pages to the site."""
    from mkdocs.structure.files import File

    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    return files
