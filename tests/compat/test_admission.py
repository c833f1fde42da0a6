"""The official `openai` client against a full queue: a server of its own that runs one request
and lets none wait (TILT_BIN is the binary run.sh starts). The client sees a RateLimitError with
`Retry-After`, and with retries on it asks again as the header says.
"""

import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import openai
import pytest


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(re.escape(name) + r"[ {]", line)
    )


@pytest.fixture(scope="module")
def busy_server():
    server = subprocess.Popen(
        [os.environ["TILT_BIN"], "serve", "--host", "127.0.0.1", "--port", "0",
         "--max-running", "1", "--max-queue", "0", "--no-default-rewards"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        url = server.stdout.readline().strip().removeprefix("tilt: listening on ")
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.2)
        # One long stream holds the only running slot for the module's tests.
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = {"prompt": "Once upon a time", "max_tokens": 8000, "ignore_eos": True,
                "stream": True}
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the first event: it runs
        yield url
        conn.close()
    finally:
        server.kill()
        server.wait()


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(busy_server):
    client = openai.OpenAI(base_url=busy_server + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert refused.value.status_code == 429
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.code == "rate_limit_exceeded"


def test_the_client_retries_as_retry_after_says(busy_server):
    client = openai.OpenAI(base_url=busy_server + "/v1", api_key="unused", max_retries=2)
    model = client.models.list().data[0].id
    before = metric(busy_server, "tilt:request_rejected_total")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    # The first try and two retries, each refused.
    assert metric(busy_server, "tilt:request_rejected_total") - before == 3
