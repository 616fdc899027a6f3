"""The documentation cannot rot: the site builds with --strict (a broken link or a missing page
fails), offline; its references list every route and setting the code has; its Python examples
(files the pages include) run against the tiny stack; every `make` target and `python -m`
module its shell blocks name exists; the README stays short and its links resolve."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from support import KEYS, ROOT, SPEECH

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PIPECAT_PYTHON = ROOT / ".venv-pipecat" / "bin" / "python"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_the_site_loads_nothing_from_other_hosts(site):
    """No fonts, scripts, styles or images from elsewhere: the site works offline and tells no one."""
    outside = re.compile(r"<(?:script|img|iframe)[^>]*\bsrc=[\"']https?://|<link[^>]*\bhref=[\"']https?://")
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 20
    for page in pages:
        found = outside.findall(page.read_text(errors="replace"))
        assert not found, f"{page.relative_to(site)} loads {found[:2]}"


def test_the_references_are_made_from_the_code(site):
    from frontend.app import create_app
    from frontend.settings import Settings

    api = (site / "reference" / "api" / "index.html").read_text()
    for path in create_app().openapi()["paths"]:
        assert path in api, f"{path} is missing from the API reference"
    for socket in ("/ws/live", "/sessions/{session_id}/speech"):
        assert socket in api
    settings = (site / "reference" / "settings" / "index.html").read_text()
    for name in Settings.model_fields:
        assert f"MUSETALK_{name.upper()}" in settings, name
    # and every MUSETALK_* variable the code reads, whichever part reads it
    read = set()
    for path in ROOT.rglob("*.py"):
        if not {".venv", ".venv-triton", ".venv-pipecat", "build"} & set(path.relative_to(ROOT).parts):
            read |= set(re.findall(r"MUSETALK_[A-Z][A-Z0-9_]+", path.read_text()))
    missing = sorted(name for name in read if name not in settings)
    assert len(read) > 40 and not missing, f"not in the settings reference: {missing}"


def test_every_example_is_on_a_page():
    included = {m for page in PAGES for m in re.findall(r'--8<-- "docs/examples/([\w.]+)"', page.read_text())}
    assert included == {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_the_examples_run_against_the_tiny_stack(example, keyed, triton, tmp_path):
    """Each against the front end with API keys, as a tenant would run it (MUSETALK_API_KEY)."""
    pipecat = example.startswith("pipecat")
    python = PIPECAT_PYTHON if pipecat else Path(sys.executable)
    assert python.exists(), "the Pipecat environment is missing: make pipecat-env"
    env = {**os.environ, "MUSETALK_URL": keyed.url, "MUSETALK_TRITON_URL": triton.grpc_url,
           "MUSETALK_SPEECH": str(SPEECH), "NO_COLOR": "1", "MUSETALK_API_KEY": KEYS["beta"]}
    ran = subprocess.run([str(python), str(EXAMPLES / example)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert ran.stdout.strip(), "an example says what it did"
    if example == "http_generate.py":
        assert (tmp_path / "speaking.mp4").stat().st_size > 10_000
    if example == "live_socket.py":
        assert (tmp_path / "live.mp4").stat().st_size > 10_000 and '"done"' in ran.stdout


def shell_lines() -> list[tuple[str, str]]:
    """(page, line) of every line of the shell blocks (``` with no language, sh, bash, console)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```(?:sh|bash|console)?\n(.*?)^```", page.read_text(), re.S | re.M):
            found += [(page.name, line.split("#")[0].strip()) for line in block.splitlines()]
    return [(page, line) for page, line in found if line]


def test_shell_blocks_name_targets_and_modules_that_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    checked = 0
    for page, line in shell_lines():
        for target in re.findall(r"^make ([\w-]+)", line):
            assert target in targets, f"{page}: `make {target}` is not a target of the Makefile"
            checked += 1
        for module in re.findall(r"python -m ([\w.]+)", line):
            assert find_spec(module) is not None, f"{page}: `python -m {module}`: no such module"
            checked += 1
        for script in re.findall(r"python ((?:[\w-]+/)+[\w-]+\.py)", line):
            assert (ROOT / script).is_file(), f"{page}: {script} does not exist"
            checked += 1
    assert checked >= 15


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    links = [link for link in re.findall(r"\]\(([^)#]+)\)", readme) if not link.startswith("http")]
    assert links
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"



def test_every_figure_in_the_docs_is_in_a_committed_result():
    """The docs build stops on a figure no result holds (mkdocs_hooks.unheld_figures); the README,
    which is not part of the site, is held to the same rule here."""
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    orphans = {page.relative_to(ROOT).as_posix(): unheld for page in PAGES
               if (unheld := hooks.unheld_figures(page.read_text()))}
    assert not orphans, f"figures no file in benchmarks/results/ holds: {orphans}"
    assert hooks.unheld_figures("a composite: about 190 frames/s") == ["190 frames/s"]
