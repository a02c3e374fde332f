"""The API's shapes: request bodies as pydantic models (OpenAI's fields plus loralag's routing fields), the
OpenAI-shaped error, the OpenAPI schema, and turning body bytes into a validated request (JSON that is too deep,
NaN, lone surrogates refused). No serving logic.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi.responses import (
    JSONResponse,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/openapi.json"}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Body(BaseModel):
    # strict: "5" is not an integer, 1.0 is not an integer, 1 is not a boolean
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Common(_Body):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # loralag
    router: str | None = None
    k: int | None = None
    libraries: list[str] | None = None
    adapters: str | list[str] | dict[str, str | None] | None = None
    return_routing: bool | Literal["tokens"] | None = Field(
        False,
        description='true: `routing`, per library the adapters used and their shares; "tokens": also, per choice, '
        "`token_routing`: its tokens (prompt, then generated) and per library its adapted modules, `winners[m][t]` "
        "(an index into `adapters`) and `scores[m][t]` for every module m and position t, and the prompt's vote",
    )
    ignore_eos: bool | None = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None


def openapi_schema() -> dict:
    """The server's OpenAPI 3.1 description (GET /openapi.json): its paths and the request bodies it accepts."""
    components: dict = {}

    def body(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }

    error = {
        "description": "An error, as OpenAI answers it",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["message", "type"]}},
                }
            }
        },
    }
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    generation = {
        "description": "The completion, or a text/event-stream of chunks when `stream` is true",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }

    def op(summary: str, ok: dict, **extra) -> dict:
        return {"summary": summary, "responses": {"200": ok, "default": error}, **extra}

    paths = {
        "/health": {"get": op("Whether the engine runs, and its load", json_ok)},
        "/metrics": {
            "get": op(
                "Prometheus metrics", {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
            )
        },
        "/v1/models": {"get": op("The served model", json_ok)},
        "/v1/models/{model_id}": {
            "get": op(
                "One model",
                json_ok,
                parameters=[{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        "/v1/completions": {"post": op("A text completion", generation, requestBody=body(CompletionRequest))},
        "/v1/chat/completions": {"post": op("A chat completion", generation, requestBody=body(ChatRequest))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "loralag", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _field_names() -> set[str]:
    return {
        f for m in (CompletionRequest, ChatRequest, ChatMessage, ContentPart, StreamOptions) for f in m.model_fields
    }


def _param_path(loc: tuple, fields: set[str]) -> tuple[str, list[str]]:
    """OpenAI's way of naming a field ('messages.[0].content') and pydantic's union branches met on the way."""
    out, branches = "", []
    for part in loc:
        if isinstance(part, int):
            out += f".[{part}]"
        elif not out:
            out = str(part)
        elif part in fields:
            out += f".{part}"
        else:
            branches.append(str(part))
    return out, branches


def validate(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        fields = _field_names()
        errors = e.errors()
        err = errors[0]
        param, branches = _param_path(err["loc"], fields)
        if err["type"] == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        if branches:  # a union: name every accepted type
            accepted = []
            for other in errors:
                p, b = _param_path(other["loc"], fields)
                if b and b[0] not in accepted and p.startswith(param.split(".")[0]):
                    accepted.append(b[0])
            got = type(err.get("input")).__name__ if len(branches) == 1 else "a value of the wrong type"
            raise APIError(
                400,
                f"Invalid type for '{param}': expected one of {', '.join(accepted)}; got {got}.",
                param=param,
                code="invalid_type",
            ) from None
        got = type(err.get("input")).__name__
        raise APIError(
            400, f"Invalid type or value for '{param}': {err['msg']} (got {got}).", param=param, code="invalid_type"
        ) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def decode_json(body: bytes) -> dict:
    """Parse a request body into a dict, or raise APIError(400): not JSON (NaN and Infinity are not JSON),
    nested too deeply, holding a lone UTF-16 surrogate, or not an object."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(
            400,
            "We could not parse the JSON body of your request: send a JSON object with Content-Type: application/json.",
        ) from None
    except ValueError as e:  # NaN, Infinity, -Infinity
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.") from None
    except RecursionError:
        raise APIError(400, "The JSON body of your request is nested too deeply.") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.")
    if _SURROGATE_ESCAPE.search(body):  # \ud800-\udfff escaped: a pair is one character, a lone one no text
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, "The JSON body of your request holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text."
            ) from None
    return data
