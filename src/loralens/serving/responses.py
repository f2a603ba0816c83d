"""HTTP response bodies of ``loralens serve``, declared in its OpenAPI schema.

Handlers return plain dicts; these models only document them (FastAPI's ``responses=``),
so a client, or a schema-driven fuzzer (Schemathesis, tests/unit/serving/test_server_fuzz.py),
can check every answer against the schema: each success body, and the
``{"error": "..."}`` body of every 4xx.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorOut(BaseModel):
    """Every client error: a message; 422s add pydantic's ``detail`` list."""
    error: str
    detail: list[dict[str, Any]] | None = None


class HealthOut(BaseModel):
    status: str
    backend: str
    adapters: int
    requests: int
    batches: int
    mixed_batches: int
    rows: int
    uptime_s: float


class AdapterOut(BaseModel):
    name: str
    source: str
    num_labels: int
    task: str | None
    label_names: list[str] | None


class AdaptersOut(BaseModel):
    adapters: list[AdapterOut]


class RemovedOut(BaseModel):
    removed: str


class ClassifyOut(BaseModel):
    adapter: str
    task: str | None
    labels: list[int]
    label_names: list[str] | None
    probabilities: list[list[float]]


class ClassificationData(BaseModel):
    """One input's answer in vLLM's shape: ``label`` its label's name (``LABEL_<i>`` for an
    adapter without label names, as transformers names them), ``probs`` the softmax over
    the ``num_classes`` labels."""
    index: int
    label: str
    probs: list[float]
    num_classes: int


class UsageOut(BaseModel):
    """Tokens read (after truncation to the server's max_length); a classifier writes none."""
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int


class OpenAIClassifyOut(BaseModel):
    """vLLM's and SGLang's classification response (``model`` is the adapter's name)."""
    id: str
    object: str
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageOut


class ModelOut(BaseModel):
    """An adapter as vLLM lists a LoRA adapter: ``root`` where it was loaded from,
    ``parent`` the base model's name."""
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelsOut(BaseModel):
    object: str
    data: list[ModelOut]


ERRORS = {
    400: "malformed JSON, or a bad Content-Length header",
    403: "an adapter path outside the server's adapter root (--adapter-root)",
    404: "unknown adapter, or no such path",
    405: "method not allowed",
    409: "an adapter of that name is already loaded",
    413: "body over the size limit, or too many inputs",
    422: "a body or value that does not fit the schema",
}


def responses(status: int, model: Any, *errors: int, links: dict | None = None) -> dict:
    """FastAPI ``responses=`` for a handler: its success body (a model, or a union of
    models) and its error bodies (every handler may answer 400, 413 (the body limit) and
    405)."""
    out: dict = {status: {"model": model, "description": "success"}}
    if links:
        out[status]["links"] = links
    for code in sorted({400, 405, 413, *errors}):
        out[code] = {"model": ErrorOut, "description": ERRORS[code]}
    return out


# OpenAPI links: what an added adapter's name can be used for (stateful fuzzing follows them)
ADDED_LINKS = {
    "ClassifyWithAdapter": {"operationId": "classify",
                            "requestBody": {"adapter": "$response.body#/name",
                                            "texts": ["a sentence"]}},
    "ClassifyWithModel": {"operationId": "classify_openai",
                          "requestBody": {"model": "$response.body#/name",
                                          "input": ["a sentence"]}},
    "RemoveAdapter": {"operationId": "remove_adapter",
                      "parameters": {"name": "$response.body#/name"}},
}

# GET /v1/models then POST /classify with data[0].id: what vLLM's example client does
MODELS_LINKS = {
    "ClassifyWithFirstModel": {"operationId": "classify_openai",
                               "requestBody": {"model": "$response.body#/data/0/id",
                                               "input": ["a sentence"]}},
}
