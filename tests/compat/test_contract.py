"""The contract both ways: schemathesis generates requests from openapi.yaml, valid and not,
and checks that the server accepts what the schema allows, rejects what it forbids (with the
documented statuses), never errs with a 5xx, and answers in the schema's shapes. Bounded in
cases and seeded, so every run tries the same requests.

One check is left out: `positive_data_acceptance`, which expects every schema-valid request to
be answered 2xx. Some rules depend on the model or join fields, and a schema cannot hold them: a
token id must be below the vocabulary's size, prompt plus `max_tokens` must fit the context, a
reward name must be loaded, `best_of` must equal `n`. Those are 400s by design (tests/api covers
each).
"""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_server_keeps_the_openapi_contract():
    result = subprocess.run(
        [
            "schemathesis", "run", str(ROOT / "openapi.yaml"),
            "--url", os.environ["TILT_URL"],
            "--checks", "all",
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "15",
            "--seed", "1",
            "--generation-database", "none",
            "--no-shrink",
            # One worker: with two, Hypothesis's cache of lambda sources races between threads
            # (KeyError / "AST constructor recursion depth mismatch" in 1 run of 3 here), and two
            # were no faster against one server on two cores (43 s either way).
            "--workers", "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "No issues found" in result.stdout, result.stdout[-5000:]
