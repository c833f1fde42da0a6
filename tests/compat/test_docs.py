"""Every HTTP example in README.md and docs/ runs against the live server, so the docs cannot
drift from the server: each `sh`/`bash` block that calls curl (its `tilt serve` lines are what
the running server stands in for) and each Python block that uses the `openai` client (the
blocks of one file run in order, sharing their names, as a reader would run them).

The examples' address, 127.0.0.1:8080 or localhost:8080, becomes TILT_URL's. A curl example
passes when curl succeeds with an HTTP 2xx and no error event in its output; a Python one when
it raises nothing. The command-line examples (training, evals, benchmarks) are run in small
form by their own tests (tests/train.rs, tests/eval.rs, tests/prefs.rs, tests/api/bench.rs).
"""

import os
import pathlib
import re
import subprocess
import textwrap
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def blocks():
    """(file, line, language, code) for each example that talks to the server."""
    found = []
    for name in FILES:
        text = (ROOT / name).read_text()
        for m in FENCE.finditer(text):
            lang, code = m.group(2), textwrap.dedent(m.group(3))
            line = text[: m.start()].count("\n") + 1
            if lang in ("sh", "bash") and "curl " in code:
                found.append((name, line, "sh", code))
            elif lang == "python" and ("OpenAI(" in code or "client." in code):
                found.append((name, line, "python", code))
    return found


EXAMPLES = blocks()


def here(code):
    address = urllib.parse.urlsplit(os.environ["TILT_URL"]).netloc
    return re.sub(r"(localhost|127\.0\.0\.1):8080", address, code)


def test_the_docs_have_examples_to_run():
    langs = {lang for _, _, lang, _ in EXAMPLES}
    assert len(EXAMPLES) >= 15 and langs == {"sh", "python"}, EXAMPLES


@pytest.mark.parametrize(
    "name,line,code",
    [(n, l, c) for n, l, lang, c in EXAMPLES if lang == "sh"],
    ids=[f"{n}:{l}" for n, l, lang, _ in EXAMPLES if lang == "sh"],
)
def test_curl_example(name, line, code):
    lines = [l for l in code.splitlines() if not l.lstrip().startswith("tilt serve")]
    script = here("\n".join(lines)).replace("curl ", "curl --fail-with-body -sS ")
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120
    )
    where = f"{name}:{line}"
    assert run.returncode == 0, f"{where}: exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert run.stdout.strip(), f"{where}: no output"
    assert '"error"' not in run.stdout, f"{where}: {run.stdout}"


# The blocks of one file run in order in one namespace (later ones use earlier ones' `client`).
PYTHON_FILES = sorted({n for n, _, lang, _ in EXAMPLES if lang == "python"})


@pytest.mark.parametrize("name", PYTHON_FILES)
def test_python_examples(name):
    namespace = {}
    for file, line, lang, code in EXAMPLES:
        if file == name and lang == "python":
            try:
                exec(compile(here(code), f"{file}:{line}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{file}:{line}: {e!r}") from e
