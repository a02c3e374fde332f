"""Generation with routed libraries, and views of the routing: a per-token table and a heatmap.

    texts = generate(model, tokenizer, ["What is ...?"])
    texts, trace = generate(model, tokenizer, prompts, trace=True)
    console.print(routing_table(trace, tokenizer, trace.input_ids))
    routing_heatmap(trace, tokenizer, trace.input_ids, "routing.png")

A trace records one routing decision per token, module and library for every forward call:
the prompt (prefill), then one column per decoding step. `generate(trace=True)` stores on the
trace the sequences it produced (`trace.input_ids`: prompt + generated tokens, left padded),
which of their positions are real tokens (`trace.attention_mask`) and the padded prompt width
(`trace.prompt_length`), so the views below can label each routed column with its token.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch

from loralag.errors import LoralagError
from loralag.routing.state import state_of


# -- generation ----------------------------------------------------------------------------------------
def format_prompts(tokenizer, prompts: list[str], chat: bool = True) -> tuple[list[str], bool]:
    """The texts to tokenize, and whether the tokenizer should add its special tokens itself.

    With `chat` and a tokenizer that has a chat template, each prompt becomes one user turn
    followed by the assistant header (the template already holds the special tokens)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [chat_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts], False
    return list(prompts), True


def chat_text(tokenizer, messages: list[dict]) -> str:
    """A conversation as the model reads it: the tokenizer's chat template with the assistant's header opened
    (generate, eval and the server's chat endpoint all prompt this way)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def first_stop(text: str, stops, start: int = 0) -> int | None:
    """Where the first of the stop strings begins in `text` (looking from `start`), or None: the one stopping
    rule of generate, eval and the server."""
    hits = [i for i in (text.find(s, start) for s in stops or ()) if i >= 0]
    return min(hits) if hits else None


def encode_prompts(
    tokenizer, prompts: list[str], chat: bool = True, content_mask: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of the prompts, left padded (so every prompt ends where generation starts).

    `content_mask=True` adds "content_mask": the tokens of each prompt's own text, without the chat template's
    tokens around it (system prompt, role markers, assistant header); the attention mask without a template."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise LoralagError("no prompt given")
    texts, add_special = format_prompts(tokenizer, prompts, chat)
    if len(texts) > 1 and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoralagError("the tokenizer has neither a pad nor an eos token: cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    offsets = content_mask and not add_special and getattr(tokenizer, "is_fast", False)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=len(texts) > 1,
            add_special_tokens=add_special,
            return_offsets_mapping=offsets,
        )
    finally:
        tokenizer.padding_side = side
    if enc["input_ids"].shape[1] == 0:
        raise LoralagError("the prompt is empty after tokenization")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if content_mask:
        out["content_mask"] = out["attention_mask"].bool()
        if offsets:
            out["content_mask"] = _content_tokens(
                tokenizer, prompts, texts, enc["offset_mapping"], out["attention_mask"]
            )
    return out


_MARK = "\u2063loralag-user-content\u2063"


def _content_span(tokenizer, prompt: str, text: str) -> tuple[int, int] | None:
    """Where `prompt` sits in its chat-templated `text` (character offsets), or None if it cannot be found.

    The template is rendered around a marker to learn what it puts before and after the user's content; a
    template that changes the content (e.g. strips it) falls back to the last occurrence of the content."""
    marked = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    at = marked.find(_MARK)
    if at >= 0:
        before, after = marked[:at], marked[at + len(_MARK) :]
        if text == before + prompt + after:
            return len(before), len(before) + len(prompt)
    stripped = prompt.strip()
    at = text.rfind(stripped) if stripped else -1
    return (at, at + len(stripped)) if at >= 0 else None


def _content_tokens(tokenizer, prompts, texts, offset_mapping, attention_mask) -> torch.Tensor:
    """(batch, tokens) bool: real tokens whose characters overlap the user's content in the templated text.
    A prompt whose content cannot be located (or holds no token) counts all its tokens."""
    mask = attention_mask.bool().clone()
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        span = _content_span(tokenizer, prompt, text)
        if span is None:
            continue
        start, end = offset_mapping[row, :, 0], offset_mapping[row, :, 1]
        inside = attention_mask[row].bool() & (start < span[1]) & (end > span[0])
        if inside.any():
            mask[row] = inside
    return mask


def _generation_config(model, tokenizer, max_new_tokens: int, greedy: bool, gen_kwargs: dict):
    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens = max_new_tokens
    cfg.do_sample = not greedy
    cfg.use_cache = True
    if greedy:  # drop sampling settings the checkpoint may carry, they only raise warnings
        for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
            if hasattr(cfg, name):
                setattr(cfg, name, None)
    if tokenizer.eos_token_id is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    cfg.pad_token_id = pad
    for key, value in gen_kwargs.items():
        setattr(cfg, key, value)
    return cfg


def _real_tokens(sequences: torch.Tensor, prompt_mask: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """Attention mask over prompt + generated tokens: a generated token is real up to and including the first
    of end_ids (eos, pad); with none given, every generated token is real."""
    prompt_len = prompt_mask.shape[1]
    gen = sequences[:, prompt_len:]
    if not end_ids:
        gen_mask = torch.ones_like(gen)
    else:
        is_end = torch.isin(gen, torch.tensor(end_ids)).long()
        # an end seen strictly before position j: everything after the first one is padding
        before = torch.cumsum(is_end, dim=1) - is_end
        gen_mask = (before == 0).long()
    return torch.cat([prompt_mask.to(sequences.device).long(), gen_mask], dim=1)


class _StopOnStrings:
    """Stopping criterion: a sequence is done once its generated text contains one of `stops`."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([first_stop(t, self.stops) is not None for t in texts], device=input_ids.device)


def _cut(text: str, stops) -> str:
    end = first_stop(text, stops)
    return text if end is None else text[:end]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    chat: bool = True,
    greedy: bool = True,
    trace: bool = False,
    stop: list[str] | None = None,
    granularity: str = "token",
    **gen_kwargs,
):
    """Generate one answer per prompt with whatever libraries are attached to `model`.

    Prompts are wrapped in the tokenizer's chat template when `chat` is true and it has one,
    batched with left padding, and decoded with the KV cache (greedy unless `greedy=False`).
    `stop`: strings that end a sequence (e.g. `["\\n"]`); each text is cut before the first of them.
    Extra keyword arguments go to the generation config (e.g. `repetition_penalty=1.2`).
    `granularity="sequence"`: route the prompts per token first, then serve each whole sequence with
    every library's most-voted adapter (`RoutingState.fix_by_vote`), counting only the tokens of the prompt's
    own text (not the chat template's); the routers are restored after.

    Returns the generated texts; with `trace=True`, `(texts, trace)` where trace is the
    RoutingTrace of the whole generation, or None when no library is attached to the model.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise LoralagError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if granularity not in ("token", "sequence"):
        raise LoralagError(f"granularity must be 'token' or 'sequence', got {granularity!r}")
    state = state_of(model)
    vote = granularity == "sequence" and state is not None
    enc = encode_prompts(tokenizer, prompts, chat, content_mask=vote)
    device = next(model.parameters()).device
    input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    cfg = _generation_config(model, tokenizer, max_new_tokens, greedy, gen_kwargs)
    recorded = None
    if vote:
        with state.configure():  # the caller's settings come back afterwards
            # only the user's own words vote: the chat template's tokens (a system prompt, role markers) would
            # otherwise outnumber a short question's and pick whichever adapter they happen to prefer
            state.fix_by_vote(input_ids, mask, count_mask=enc["content_mask"])
            return generate(model, tokenizer, prompts, max_new_tokens, chat, greedy, trace, stop, "token", **gen_kwargs)
    extra = (
        {"tokenizer": tokenizer} if getattr(cfg, "stop_strings", None) else {}
    )  # HF matches these through the tokenizer
    if stop:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, input_ids.shape[1])])
    if trace and state is not None:
        with state.tracing() as recorded:
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg, **extra)
    else:
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg, **extra)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt_len = input_ids.shape[1]
    texts = [_cut(t, stop).strip() for t in tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)]
    if not trace:
        return texts
    if recorded is not None:
        recorded.input_ids = sequences.cpu()
        # a row ended by a stop string is filled with pad tokens after it: those end it too
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
        ends = [t for t in (*eos, cfg.pad_token_id) if t is not None]
        recorded.attention_mask = _real_tokens(sequences.cpu(), mask.cpu(), ends)
        recorded.prompt_length = prompt_len
        recorded.prompts = list(prompts)
        recorded.texts = texts
    return texts, recorded


# -- reading a trace ------------------------------------------------------------------------------------
def _width(trace, library: str) -> int:
    modules = trace.modules(library)
    if not modules:
        raise LoralagError(f"the trace holds no routing decision for library '{library}'")
    return trace.winner_matrix(modules[0], library).shape[1]


def _libraries(trace, library: str | None) -> list[str]:
    libs = trace.libraries()
    if not libs:
        raise LoralagError("the trace is empty: nothing was routed (are libraries attached, was the model run?)")
    if library is None:
        return libs
    if library not in libs:
        raise LoralagError(f"the trace holds no library named '{library}'; it holds {libs}")
    return [library]


def _positions(
    trace, input_ids, seq: int, attention_mask, width: int, prompt_only: bool
) -> tuple[list[int], torch.Tensor]:
    """Routed positions of sequence `seq` to show (real tokens only) and the ids there.

    `input_ids` may be the prompt ids or the full generated sequences; positions beyond what was
    routed (the last generated token never went through the model) are left out."""
    if input_ids is None:
        input_ids = getattr(trace, "input_ids", None)
        if input_ids is None:
            raise LoralagError("give the input_ids: this trace was not made by loralag.generate")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if not 0 <= seq < ids.shape[0]:
        raise LoralagError(f"sequence {seq} is out of range: the batch holds {ids.shape[0]}")
    if attention_mask is None:
        attention_mask = getattr(trace, "attention_mask", None)
    if attention_mask is not None:
        m = torch.as_tensor(attention_mask)
        m = m.unsqueeze(0) if m.dim() == 1 else m
        row = torch.zeros(ids.shape[1], dtype=torch.long)
        n = min(ids.shape[1], m.shape[1])
        row[:n] = m[seq, :n].long()
    else:
        row = torch.ones(ids.shape[1], dtype=torch.long)
    end = min(ids.shape[1], width)
    prompt_length = getattr(trace, "prompt_length", None)
    if prompt_only and prompt_length is not None:
        end = min(end, prompt_length)
    positions = [p for p in range(end) if row[p]]
    return positions, ids[seq]


def token_label(tokenizer, token_id: int) -> str:
    """A printable form of one token: its decoded text with whitespace made visible."""
    text = tokenizer.decode([int(token_id)])
    text = text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
    if text.startswith(" "):
        text = "␣" + text[1:]
    return text or repr(tokenizer.convert_ids_to_tokens(int(token_id)))


def majority_per_token(trace, library: str, seq: int, positions: list[int]) -> list[tuple[str | None, float]]:
    """For each position: the adapter most of the library's modules chose, and the share of modules that did.

    None stands for no single adapter (a mixing router such as 'uniform', or the 'none' router)."""
    modules = trace.modules(library)
    picks = [trace.adapter_names(m, library, seq) for m in modules]
    out = []
    for p in positions:
        c = Counter(names[p] for names in picks)
        name, count = c.most_common(1)[0]
        out.append((name, count / len(modules)))
    return out


def majority_adapter(
    trace, library: str | None = None, seq: int = 0, input_ids=None, attention_mask=None, prompt_only: bool = True
) -> tuple[str | None, float]:
    """The adapter chosen most often over the real tokens and all modules of a library, and its share.

    By default only prompt tokens count (with a trace made by `generate`)."""
    lib = _libraries(trace, library)[0]
    mask = _count_mask(trace, lib, seq, input_ids, attention_mask, prompt_only)
    counts = trace.counts(lib, seq, mask)
    total = sum(counts.values())
    if not total:
        return None, 0.0
    # most decisions; a tie goes to the name that sorts first (as RoutingState.vote does)
    name, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return name, n / total


def _count_mask(trace, library, seq, input_ids, attention_mask, prompt_only) -> torch.Tensor | None:
    width = _width(trace, library)
    if input_ids is None and getattr(trace, "input_ids", None) is None:
        return None
    positions, _ = _positions(trace, input_ids, seq, attention_mask, width, prompt_only)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[positions] = True
    return mask


def summary_lines(
    trace, seq: int = 0, mask: torch.Tensor | None = None, library: str | None = None, top: int = 5
) -> list[str]:
    """Per library: adapters used, routed token×module decisions and entropy; then the top adapters' shares."""
    return trace.summary_lines(seq, mask, _libraries(trace, library), top)


# -- views ----------------------------------------------------------------------------------------------
def routing_table(
    trace,
    tokenizer,
    input_ids=None,
    seq: int = 0,
    library: str | None = None,
    attention_mask=None,
    prompt_only: bool = True,
):
    """A rich Table: per real prompt token, the majority adapter over the modules of each library and its
    share of modules; the caption holds one summary line per library (over the same tokens).

    `input_ids`: the prompt ids, or the full sequences from `generate` (default: `trace.input_ids`);
    `prompt_only=False` also lists the generated tokens that were routed."""
    from rich.table import Table

    libs = _libraries(trace, library)
    width = _width(trace, libs[0])
    positions, ids = _positions(trace, input_ids, seq, attention_mask, width, prompt_only)
    prompt_length = getattr(trace, "prompt_length", None)
    table = Table(title=f"Routing of sequence {seq}", header_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    for lib in libs:
        title = f" ({lib})" if len(libs) > 1 else ""
        table.add_column(f"adapter{title}", style="cyan")
        table.add_column("modules", justify="right")
    majorities = {lib: majority_per_token(trace, lib, seq, positions) for lib in libs}
    for j, p in enumerate(positions):
        row = [str(p), token_label(tokenizer, ids[p])]
        if prompt_length is not None and p >= prompt_length:
            row[1] = f"[italic]{row[1]}[/]"  # generated token
        for lib in libs:
            name, share = majorities[lib][j]
            row += [name if name is not None else "—", f"{share:.0%}"]
        table.add_row(*row)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[positions] = True
    lines = summary_lines(trace, seq, mask, library)
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    table.min_width = min(76, max(len(line) for line in lines))  # so the summary does not wrap in a narrow table
    return table


def routing_heatmap(
    trace,
    tokenizer,
    input_ids=None,
    path="routing.png",
    seq: int = 0,
    library: str | None = None,
    attention_mask=None,
    prompt_only: bool = True,
    max_colors: int = 20,
):
    """Write a PNG: rows = routed modules in layer order, columns = tokens, colour = the adapter chosen.

    One panel per library. Beyond `max_colors` adapters, the rarer ones share a grey "other" colour.
    Returns the path written."""
    # The Agg canvas directly, not pyplot: no global backend switch, no figure manager, thread safe.
    from pathlib import Path

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    libs = _libraries(trace, library)
    width = _width(trace, libs[0])
    positions, ids = _positions(trace, input_ids, seq, attention_mask, width, prompt_only)
    if not positions:
        raise LoralagError(f"sequence {seq} has no routed token to show")
    labels = [token_label(tokenizer, ids[p]) for p in positions]
    prompt_length = getattr(trace, "prompt_length", None)

    panels = []
    for lib in libs:
        modules = trace.modules(lib)
        names = [[trace.adapter_names(m, lib, seq)[p] for p in positions] for m in modules]
        counts = Counter(n for row in names for n in row if n is not None)
        ranked = [n for n, _ in counts.most_common()]
        shown = ranked if len(ranked) <= max_colors else ranked[: max_colors - 1]
        code = {n: i for i, n in enumerate(shown)}
        other = len(shown)
        grid = [[code.get(n, other) if n is not None else -1 for n in row] for row in names]
        panels.append((lib, modules, grid, shown, len(ranked) > len(shown), counts))

    n_rows = sum(len(p[1]) for p in panels)
    fig_w = min(60.0, max(6.0, 0.28 * len(positions) + 4.5))
    fig_h = min(80.0, max(3.0, 0.14 * n_rows + 1.6 * len(panels) + 0.6))
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": [max(1, len(p[1])) for p in panels]}
    )
    many = max(len(p[3]) for p in panels) > 10
    base_colors = list(matplotlib.colormaps["tab20" if many else "tab10"].colors)
    for ax, (lib, modules, grid, shown, has_other, counts) in zip(axes[:, 0], panels):
        colors = [base_colors[i % len(base_colors)] for i in range(len(shown))] + [(0.6, 0.6, 0.6)]
        cmap = ListedColormap([(1.0, 1.0, 1.0)] + colors)  # -1 (no single adapter) is white
        data = torch.tensor(grid, dtype=torch.float32).numpy() + 1
        ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(colors) + 0.5)
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels([_short_module(m) for m in modules], fontsize=max(4, min(8, 600 // max(1, len(modules)))))
        ax.set_xticks(range(len(positions)))
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
        if prompt_length is not None:
            for tick, p in zip(ax.get_xticklabels(), positions):
                if p >= prompt_length:
                    tick.set_fontstyle("italic")
                    tick.set_color("tab:blue")
        ax.set_ylabel("module")
        ax.set_title(f"library '{lib}', sequence {seq}: adapter chosen per token and module", fontsize=10)
        handles = [Patch(color=colors[i], label=f"{n} ({counts[n]})") for i, n in enumerate(shown)]
        if has_other:
            handles.append(
                Patch(color=colors[-1], label=f"other ({sum(counts.values()) - sum(counts[n] for n in shown)})")
            )
        if any(v < 0 for row in grid for v in row):
            handles.append(Patch(facecolor="white", edgecolor="black", label="no single adapter"))
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            frameon=False,
            title="adapter (decisions)",
            title_fontsize=8,
        )
    axes[-1, 0].set_xlabel("token" + (" (generated in blue)" if prompt_length is not None and not prompt_only else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def _short_module(name: str) -> str:
    """'model.layers.12.mlp.down_proj' -> 'L12 mlp.down'."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = ".".join(parts[i + 1 :]).replace("_proj", "").replace("self_attn.", "attn.")
            return f"L{part} {rest}"
    return name
