"""From a validated request to what the engine runs: model and sampling checks, routing options resolved
against the attached libraries, prompts tokenised (completions: text or ids; chat: the tokenizer's template),
sizes bounded by the context before anything is allocated.
"""

from __future__ import annotations

import gc

from pydantic import BaseModel

from loralag.generate import chat_text
from loralag.routing.routers import ROUTERS
from loralag.serve.context import ServerContext
from loralag.serve.engine import (
    Routing,
    SamplingParams,
)
from loralag.serve.groups import ROUTERS_WITH_K
from loralag.serve.protocol import APIError, ChatMessage, decode_json, validate


def _check_sizes(ctx: ServerContext, data: dict) -> None:
    """Cheap checks of a parsed body's lengths before validating or tokenising it: prompts of more token ids or
    characters than the context can hold and lists longer than the batch are refused here, so neither the
    validation nor the tokenizer works through (or allocates for) a request that cannot run."""
    limit, chars = ctx.max_model_len, ctx.max_prompt_chars

    def too_long(param: str, n: int, unit: str) -> APIError:
        what = f"{n} token ids" if unit == "ids" else f"{n} characters, more than {chars} (the most it could hold)"
        return APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt holds {what}. "
            "Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )

    prompt = data.get("prompt")
    if isinstance(prompt, str) and len(prompt) > chars:
        raise too_long("prompt", len(prompt), "chars")
    if isinstance(prompt, list):
        if prompt and not isinstance(prompt[0], (list, str)):  # one prompt of token ids
            if len(prompt) >= limit:
                raise too_long("prompt", len(prompt), "ids")
        else:
            if len(prompt) > ctx.engine.max_batch:
                raise APIError(
                    400,
                    f"the request holds {len(prompt)} prompts but this server runs at most "
                    f"{ctx.engine.max_batch} sequences at once",
                    param="prompt",
                    code="invalid_value",
                )
            for p in prompt:
                if isinstance(p, list) and len(p) >= limit:
                    raise too_long("prompt", len(p), "ids")
                if isinstance(p, str) and len(p) > chars:
                    raise too_long("prompt", len(p), "chars")
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the request holds "
                f"{len(messages)} messages.",
                param="messages",
                code="context_length_exceeded",
            )
        total = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(
                    len(c.get("text") or "") if isinstance(c, dict) and isinstance(c.get("text"), str) else 1
                    for c in content
                )
            if total > chars:
                raise too_long("messages", total, "chars")


def read_request(ctx: ServerContext, model: type[BaseModel], body: bytes):
    """Body bytes -> the validated request (runs off the event loop, one at a time). The cyclic garbage collector
    waits meanwhile: a body of a million small objects would otherwise start collections that hold the GIL, and
    with it the event loop, for hundreds of milliseconds; what the body allocated is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        data = decode_json(body)
        _check_sizes(ctx, data)
        return validate(model, data)
    finally:
        if enabled:
            gc.enable()


def model_card(ctx: ServerContext) -> dict:
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "loralag",
        "max_model_len": ctx.max_model_len,
        "routers": sorted(ROUTERS),  # what a request's `router` may name ("fixed" wants `adapters`)
        "routers_with_k": list(ROUTERS_WITH_K),
        "libraries": [
            {
                "name": name,
                "adapters": len(lib),
                "base_model": lib.base_model,
                "router": ctx.default_specs[name].router,
                "k": ctx.default_specs[name].k,
            }
            for name, lib in ctx.libraries.items()
        ],
    }


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist on this server.", param="model", code="model_not_found")


def check_model(ctx: ServerContext, model: str) -> None:
    if model not in ctx.aliases:
        err = model_not_found(model)
        err.message += f" It serves '{ctx.model_name}' (GET /v1/models)."
        raise err


def refuse_unsupported(body, defaults: dict) -> None:
    for name, default in defaults.items():
        value = getattr(body, name, None)
        if value is not None and value != default:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def check_sampling_values(body) -> None:
    """Sampling parameters in range and finite, checked before anything is tokenised (400 otherwise)."""

    def bad(param: str, rule: str, value) -> APIError:
        return APIError(400, f"'{param}' must be {rule}, got {value}", param=param, code="invalid_value")

    if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:  # NaN fails every comparison
        raise bad("temperature", "between 0 and 2", body.temperature)
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise bad("top_p", "in (0, 1]", body.top_p)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise bad(name, "between -2 and 2", value)
    for token, bias in (body.logit_bias or {}).items():
        if not -100.0 <= bias <= 100.0:
            raise bad("logit_bias", f"a map of token ids to numbers between -100 and 100 (token {token!r})", bias)


def resolve_routing(ctx: ServerContext, body) -> Routing:
    """Per attached library, how this request is routed: from router / k / libraries / adapters and the defaults."""
    libs = list(ctx.libraries)
    if body.router is not None and body.router not in ROUTERS:
        raise APIError(
            400,
            f"unknown router '{body.router}'; choose one of {sorted(ROUTERS)}",
            param="router",
            code="invalid_value",
        )
    if body.k is not None and body.k < 1:
        raise APIError(400, f"k must be a positive integer, got {body.k}", param="k", code="invalid_value")
    if body.libraries is not None:
        for lib in body.libraries:
            if lib not in ctx.libraries:
                raise APIError(
                    404,
                    f"no library named '{lib}' is served; libraries: {libs}",
                    param="libraries",
                    code="library_not_found",
                )
    fixed: dict[str, str | None] = {}
    adapters = body.adapters
    if isinstance(adapters, dict):
        for lib, name in adapters.items():
            if lib not in ctx.libraries:
                raise APIError(
                    404,
                    f"no library named '{lib}' is served; libraries: {libs}",
                    param="adapters",
                    code="library_not_found",
                )
            if name is not None and name not in ctx.adapter_sets[lib]:
                raise APIError(
                    404, f"library '{lib}' holds no adapter named '{name}'", param="adapters", code="adapter_not_found"
                )
            fixed[lib] = name
    elif adapters is not None:
        for item in [adapters] if isinstance(adapters, str) else adapters:
            lib, name = _find_adapter(ctx, item)
            if lib in fixed:
                raise APIError(
                    400,
                    f"two adapters given for library '{lib}': '{fixed[lib]}' and '{name}'; "
                    "a sequence uses at most one fixed adapter per library",
                    param="adapters",
                    code="invalid_value",
                )
            fixed[lib] = name
    if body.router == "fixed" and not any(v is not None for v in fixed.values()):
        raise APIError(
            400,
            "router 'fixed' needs 'adapters': the adapter to use in each library",
            param="adapters",
            code="missing_required_parameter",
        )
    if body.libraries is not None:
        selected = set(body.libraries)
    else:
        selected = set(libs) if adapters is None else set()
    modes = []
    for lib in libs:
        if lib in fixed:
            modes.append((lib, ("fixed", fixed[lib])))
            continue
        if lib not in selected:
            modes.append((lib, ("fixed", None)))
            continue
        spec = ctx.default_specs[lib]
        router = body.router or spec.router
        if router in ("none", "fixed"):
            modes.append((lib, ("fixed", None)))
            continue
        k = body.k if body.k is not None else spec.k
        modes.append((lib, ("route", router, k if router in ROUTERS_WITH_K else 1)))
    return Routing(tuple(modes))


def _find_adapter(ctx: ServerContext, item: str) -> tuple[str, str]:
    if "/" in item:
        lib, _, name = item.partition("/")
        if lib in ctx.libraries:
            if name not in ctx.adapter_sets[lib]:
                raise APIError(
                    404, f"library '{lib}' holds no adapter named '{name}'", param="adapters", code="adapter_not_found"
                )
            return lib, name
    owners = [lib for lib, names in ctx.adapter_sets.items() if item in names]
    if not owners:
        raise APIError(
            404, f"no served library holds an adapter named '{item}'", param="adapters", code="adapter_not_found"
        )
    if len(owners) > 1:
        raise APIError(
            400,
            f"adapter '{item}' is in several libraries {owners}: write it 'library/{item}'",
            param="adapters",
            code="invalid_value",
        )
    return owners[0], item


def completion_prompts(ctx: ServerContext, prompt) -> list[list[int]]:
    tok = ctx.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = list(tok(p, add_special_tokens=True)["input_ids"])
        else:
            bad = [t for t in p if not 0 <= t < ctx.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} is out of the vocabulary [0, {ctx.vocab_size})",
                    param="prompt",
                    code="invalid_value",
                )
            ids = list(p)
        if not ids:
            if tok.bos_token_id is None:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            ids = [tok.bos_token_id]
        out.append(ids)
    return out


def chat_prompt(ctx: ServerContext, messages: list[ChatMessage]) -> list[int]:
    tok = ctx.tokenizer
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400, "this model has no chat template: use /v1/completions", param="messages", code="no_chat_template"
        )
    plain = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"unknown role '{m.role}'", param=f"messages.[{i}].role", code="invalid_value")
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"only text content is supported, got a part of type '{part.type}'",
                        param=f"messages.[{i}].content",
                        code="invalid_value",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        text = chat_text(tok, plain)
    except Exception as e:  # the template itself rejects the conversation (roles out of order, ...)
        raise APIError(
            400,
            f"the chat template rejected these messages: {type(e).__name__}: {e}",
            param="messages",
            code="invalid_value",
        ) from None
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise APIError(400, "the conversation is empty after the chat template", param="messages", code="invalid_value")
    return ids


def sampling_params(
    ctx: ServerContext, body, prompts: list[list[int]], max_tokens, default: int, param: str
) -> SamplingParams:
    limit = ctx.max_model_len
    longest = max(len(p) for p in prompts)
    prompt_param = "messages" if hasattr(body, "messages") else "prompt"
    if longest >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt holds {longest} "
            "tokens (at least one must be left to generate). Please shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(default, limit - longest)
    elif max_tokens < 1:
        raise APIError(400, f"'{param}' must be at least 1, got {max_tokens}", param=param, code="invalid_value")
    elif longest + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or '{param}'.",
            param=param,
            code="context_length_exceeded",
        )
    temperature = 1.0 if body.temperature is None else body.temperature  # in range: check_sampling_values
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"'stop' holds at most 4 sequences, got {len(stop)}", param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' sequences must not be empty", param="stop", code="invalid_value")
    seed = None if body.seed is None else body.seed % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stop),
        seed=seed,
        ignore_eos=bool(body.ignore_eos),
    )
