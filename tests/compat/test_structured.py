"""Structured output through the clients people use: the official `openai` client's
`response_format` and its `parse` helper with a pydantic model, and LangChain's
`with_structured_output` (langchain-openai), plain and with a steering `alignment` object.

TILT_URL is the running server's base URL (run.sh starts a server and sets it).
"""

import json
import os
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


QUESTION = [{"role": "user", "content": "Invent a pet and describe it."}]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=os.environ["TILT_URL"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_response_format_json_schema(client, model):
    schema = Pet.model_json_schema()
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=60, temperature=0.7, seed=3, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}},
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        Pet.model_validate(json.loads(choice.message.content))


def test_parse_helper_with_a_pydantic_model(client, model):
    r = client.chat.completions.parse(
        model=model, messages=QUESTION, max_tokens=60, temperature=0, response_format=Pet
    )
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert pet.species in ("cat", "dog", "fish")


def test_langchain_structured_output_plain_and_steered(model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=os.environ["TILT_URL"] + "/v1", api_key="unused",
                     max_tokens=60, temperature=0, max_retries=0)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke(QUESTION[0]["content"])
    assert isinstance(pet, Pet)
    steered = llm.bind(extra_body={"alignment": {"decoder": "genarm", "rewards": {"positive": 1.0}}})
    pet = steered.with_structured_output(Pet, method="json_schema").invoke(QUESTION[0]["content"])
    assert isinstance(pet, Pet)
