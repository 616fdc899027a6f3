"""MkDocs hooks (mkdocs.yml): the reference pages are made from the code as the site is built.

    <!-- openapi -->        the HTTP API, from the service's own OpenAPI schema, and its WebSockets
    <!-- settings -->       every MUSETALK_* setting, from frontend/settings.py
    <!-- result: NAME -->   a benchmark's result, benchmarks/results/NAME.md (its tables, the command
                            that made them, the machine and the date), as the benchmark wrote it

So the reference cannot drift from the service, nor a figure from its result: a route, a setting
or a result that changes changes them. A figure typed into a page (a number with the unit of a
measurement) that no committed result holds stops the build (`unheld_figures`).
"""
from __future__ import annotations

import inspect
import os
import re
import tempfile
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "benchmarks" / "results"
# A measured figure: a number with the unit of a measurement (not seconds: timeouts and settings
# are in seconds too).
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(ms|x|dB|frames/s|MB|%)(?!\w)")


def unheld_figures(markdown: str) -> list[str]:
    """The figures of `markdown` that no committed result holds, as written there or rounded to
    the figure's digits (a percentage may be a result's fraction): typed by hand, a composite of
    rows from different runs, or from a run that was never committed."""
    text = " ".join(path.read_text() for path in RESULTS.iterdir() if path.suffix in (".md", ".json"))
    numbers = [Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]
    numbers = [n for n in numbers if n.adjusted() < 12]

    def held(figure: str, unit: str) -> bool:
        wanted = Decimal(figure)
        step = Decimal(1).scaleb(wanted.as_tuple().exponent)  # the figure's last digit
        candidates = numbers + ([n * 100 for n in numbers] if unit == "%" else [])
        return any(n.quantize(step, rounding=ROUND_HALF_UP) == wanted for n in candidates)

    return [m.group(0).replace("\n", " ") for m in FIGURE.finditer(markdown) if not held(m.group(1), m.group(2))]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if unheld := unheld_figures(markdown):
        raise ValueError(f"{page.file.src_path}: figures that no file in benchmarks/results/ holds: {unheld}")
    if "<!-- openapi -->" in markdown:
        markdown = markdown.replace("<!-- openapi -->", api_reference())
    if "<!-- settings -->" in markdown:
        markdown = markdown.replace("<!-- settings -->", settings_reference())
    return re.sub(r"<!-- result: ([\w.-]+) -->", lambda m: result(m.group(1)), markdown)


def result(name: str, deeper: int = 2) -> str:
    """A result file without its title, its headings `deeper` levels down (under the page's own)."""
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"the docs include {path}, which no benchmark has written")
    lines = path.read_text().splitlines()[1:]
    return "\n".join("#" * deeper + line if line.startswith("#") else line for line in lines)


def _app():
    os.environ.setdefault("MUSETALK_AVATAR_DIR", tempfile.mkdtemp(prefix="musetalk-docs-"))
    from frontend.app import create_app

    return create_app()


def _cell(text) -> str:
    """Text for a table cell: one line, its pipes and angle brackets escaped (not HTML)."""
    text = " ".join(str("" if text is None else text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _type(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    return schema.get("format") if schema.get("format") == "binary" else schema.get("type", "object")


def api_reference() -> str:
    from starlette.routing import WebSocketRoute

    app = _app()
    spec = app.openapi()
    components = spec.get("components", {}).get("schemas", {})
    out = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            about = operation.get("description") or operation.get("summary", "")
            out += [f"## `{method.upper()} {path}`", "", about, ""]
            parameters = operation.get("parameters", [])
            if parameters:
                out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                out += [f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | {p.get('required', False)} | "
                        f"{_cell(p.get('description') or p.get('schema', {}).get('description'))} |"
                        for p in parameters]
                out.append("")
            body = operation.get("requestBody", {}).get("content", {})
            for content_type, media in body.items():
                schema = media.get("schema", {})
                schema = components.get(schema.get("$ref", "").rsplit("/", 1)[-1], schema)
                fields = schema.get("properties", {})
                out += [f"Body (`{content_type}`):", ""]
                if fields:
                    required = set(schema.get("required", []))
                    out += ["| field | type | default | description |", "|---|---|---|---|"]
                    out += [f"| `{name}`{' (required)' if name in required else ''} | {_type(field)} | "
                            f"{_cell(field.get('default', ''))} | {_cell(field.get('description'))} |"
                            for name, field in fields.items()]
                out.append("")
            answers = operation.get("responses", {})
            out += ["Answers: " + "; ".join(f"{code} {_cell(r.get('description'))}" for code, r in answers.items()), ""]
    sockets = [r for r in _routes(app.routes) if isinstance(r, WebSocketRoute)]
    if sockets:
        out += ["## WebSockets", ""]
        for route in sockets:
            module = inspect.getmodule(route.endpoint)
            out += [f"### `WS {route.path}`", "", "```", (inspect.getdoc(module) or "").strip(), "```", ""]
    return "\n".join(out)


def _routes(routes):
    """Every route, those of included routers too (FastAPI keeps them in the router it was given)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _routes(included.routes) if included is not None else [route]


def settings_reference() -> str:
    from contract.environment import VARIABLES
    from frontend.settings import Settings

    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        rows.append(f"| `MUSETALK_{name.upper()}` | `{_cell(default if default is not None else 'unset')}` | "
                    f"{_cell(field.description)} |")
    rows += ["", "Read by other parts of the project:", "", "| variable | default | read by | what |",
             "|---|---|---|---|"]
    rows += [f"| `{v.name}` | `{_cell(v.default)}` | {_cell(v.read_by)} | {_cell(v.what)} |" for v in VARIABLES]
    return "\n".join(rows)
