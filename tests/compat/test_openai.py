"""tilt driven by the official `openai` Python client.

TILT_URL is the running server's base URL, e.g. http://127.0.0.1:8080 (run.sh starts a server
and sets it).
"""

import os

import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    # No retries: a 5xx must fail the test, not be retried away.
    return openai.OpenAI(
        base_url=os.environ["TILT_URL"] + "/v1", api_key="unused", max_retries=0
    )


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert models[0].role == "base"
    return models[0].id


def test_chat(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["alignment"]["decoder"] == "sample"


def test_chat_stream_matches_the_whole_answer(client, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions(client, model):
    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
    )
    assert r.object == "text_completion"
    choice = r.choices[0]
    assert choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert all(p <= 0 for p in lp.token_logprobs)


def test_completions_stream(client, model):
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert text == whole


def test_n_choices(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, max_tokens=8, temperature=1.0, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, max_tokens=8, temperature=1.0, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    r = client.completions.create(model=model, prompt="Hello", n=2, max_tokens=4)
    assert len(r.choices) == 2


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert bytes(b for t in content for b in t.bytes).decode() == r.choices[0].message.content


def test_alignment_extension(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=4,
        extra_body={"alignment": {"decoder": "sample"}, "top_k": 20},
    )
    assert r.model_extra["alignment"] == {"decoder": "sample"}


def test_equilibrium_ranking_answers_with_a_candidate(client, model):
    question = "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Mars"
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        extra_body={"alignment": {"decoder": "equilibrium", "candidates": ["A", "B", "C"]}},
    )
    report = r.model_extra["alignment"]
    assert report["decoder"] == "equilibrium"
    assert r.choices[0].message.content == ["A", "B", "C"][report["chosen"]]
    assert len(report["candidates"]) == 3


def test_errors_raise_the_matching_exceptions(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, temperature=5)
    assert e.value.param == "temperature"
    assert e.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=QUESTION, extra_body={"alignment": {"decoder": "nope"}}
        )
    assert e.value.param == "alignment.decoder"
    assert "sample" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi")
    assert e.value.code == "model_not_found"
