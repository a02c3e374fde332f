"""The continuous-batching engine behind `loralag serve`.

One thread owns the model. Each turn of its loop it

  1. admits waiting requests while the running batch has room (FIFO; a request takes one slot per
     sequence it generates: prompts × n),
  2. prefills the admitted prompts in one forward pass per routing group (left padded, explicit
     position ids) and samples each sequence's first token,
  3. runs one decoding step for every running sequence: one forward pass per routing group, one
     token sampled per sequence. A sequence that finishes (eos, stop string, max_tokens, the context
     length, its request cancelled or past its deadline) leaves the batch at once; a waiting one
     joins at the next turn.

KV cache. Each running group keeps one batched `DynamicCache` whose rows are left padded so that all
rows end at the same column: row i holds its sequence's `length` real positions at the right end.
A decoding step feeds each row its last token with position id = its own length and an attention
mask over [padding | real positions | new token], so every row computes exactly what it would alone.
When the members of a group change, the cache is rebuilt: each staying row's real positions are cut
out, newcomers' prefill caches added, and all restacked with zero padding to the new longest length.

Routing. Router settings are model-wide (`RoutingState.specs`), so sequences are grouped by their
routing settings and each group runs its own forward pass with its specs set. Per library a sequence
is either routed (`router`, `k`: the group key holds them) or fixed to one adapter (or to none): all
fixed/none sequences share one group whatever their adapters, through the `fixed` router's per-row
adapter list (dimension 0 of the routed layer's input is the row). Every forward pass is traced to
count, per sequence, the tokens routed to each adapter (once per adapted module); a request that asks for its
per-token routing (`token_routing`) also keeps, per sequence, every position's winner and score at every adapted
module (only then: it costs memory in proportion to tokens × modules).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from loralag.generate import first_stop
from loralag.routing.state import state_of
from loralag.serve.groups import Routing, RoutingGroup, group_specs
from loralag.serve.metrics import ServerMetrics
from loralag.serve.sampling import SamplingParams, holdback, sample_tokens

log = logging.getLogger("loralag.serve")

PREFILL_TOKEN_BUDGET = 16384  # padded prompt tokens per prefill pass, bounding its memory
_ids = itertools.count()


class QueueFull(Exception):
    """The waiting queue is full: the server answers 429."""


class EngineStopped(Exception):
    """The engine is not running (shutting down, or its thread died)."""


class EngineRequest:
    """One HTTP request: its prompts (token ids), n sequences per prompt, and a channel back to the event loop.

    Events put on `events` (an asyncio.Queue of the caller's loop):
      ("text", index, delta)                                  new text of choice `index`
      ("done", index, finish_reason, completion_tokens, counts, tokens)
                                   counts: {library: LongTensor (n_adapters,)}; tokens: None, or when the request
                                   asked for `token_routing` its sequence's per-token routing (Engine._token_record)
      ("error", status, type, code, message)                  the whole request failed
    """

    def __init__(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingParams,
        routing: Routing,
        timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
        token_routing: bool = False,
    ):
        self.id = next(_ids)
        self.token_routing = token_routing  # keep every position's winners and scores (costs memory)
        self.prompts = prompts
        self.n = n
        self.sampling = sampling
        self.routing = routing
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.failed = False
        self.remaining = len(prompts) * n
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Seq:
    req: EngineRequest
    index: int  # choice index in the response
    length: int  # positions in the KV cache
    kv: list | None  # own cache [(K, V)] per layer while not yet in a group's batched cache
    counts: dict = field(default_factory=dict)  # library -> LongTensor (n_adapters,)
    evidence: dict = field(default_factory=dict)  # library -> lag-prefix's counts for this sequence, like its KV cache
    routes: dict | None = None  # when its request wants token routing: library -> [(winners, scores) (modules, t)]
    generator: torch.Generator | None = None
    tokens: list = field(default_factory=list)  # generated ids, eos included
    text_ids: list = field(default_factory=list)  # generated ids that make text
    last: int = -1
    emitted: int = 0  # characters of text already sent
    finished: bool = False
    uid: int = field(default_factory=lambda: next(_ids))


class Engine:
    """Continuous batching over one model with its attached libraries. Thread-safe `submit` / `cancel`."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        max_model_len: int | None = None,
        metrics: ServerMetrics | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_model_len = max_model_len or model_context_length(model)
        self.metrics = metrics or ServerMetrics()
        self.state = state_of(model)
        self.libraries = list(self.state.specs) if self.state is not None else []
        self.base_specs = dict(self.state.specs) if self.state is not None else {}
        self.adapter_names = {lib: list(self.state.libraries[lib].names) for lib in self.libraries}
        # bank index -> library-wide adapter index: per library one table of every module's bank, at offsets
        self._offsets: dict[str, dict[str, int]] = {lib: {} for lib in self.libraries}
        self.modules: dict[str, list[str]] = {lib: [] for lib in self.libraries}  # adapted modules, in model order
        self._tables: dict[str, torch.Tensor] = {}
        if self.state is not None:
            parts: dict[str, list] = {lib: [] for lib in self.libraries}
            for module, layer in self.state.layers.items():
                for lib, bank in layer.banks.items():
                    where = {n: i for i, n in enumerate(self.adapter_names[lib])}
                    self._offsets[lib][module] = sum(len(p) for p in parts[lib])
                    self.modules[lib].append(module)
                    parts[lib].append([where[n] for n in bank.names])
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            for mods in self.modules.values():
                mods.sort(key=lambda m: order.get(m, len(order)))  # layer by layer, as the model runs them
            for lib in self.libraries:  # the last entry (-1) is where "no adapter" points
                self._tables[lib] = torch.tensor([i for p in parts[lib] for i in p] + [-1], dtype=torch.long)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos_ids) if self.eos_ids else 0)
        )
        from loralag.models import cache_kwarg  # transformers is loaded by now: the model is

        params = inspect.signature(model.forward).parameters
        self._cache_kw = cache_kwarg(model)
        self._logits_to_keep = "logits_to_keep" in params
        self._cv = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._jobs: deque = deque()  # (fn, future): work run on this thread between steps (run_on_engine)
        self._groups: dict[tuple, RoutingGroup] = {}
        self._running = 0  # unfinished sequences in groups
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics.queue_depth.set_function(lambda: len(self._waiting))
        self.metrics.running.set_function(lambda: self._running)
        self.metrics.max_batch.set(max_batch)
        self.metrics.queue_capacity.set(max_queue)

    # -- control -------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loralag-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for req in self._all_requests():
            req.emit("error", 503, "server_error", "server_shutting_down", "the server is shutting down")
        self._waiting.clear()
        self._groups.clear()
        self._running = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, req: EngineRequest) -> None:
        """Queue a request, or raise QueueFull (answer 429) / EngineStopped / ValueError (too many sequences)."""
        if req.size > self.max_batch:
            raise ValueError(f"the request asks for {req.size} sequences but a batch holds at most {self.max_batch}")
        if not self.alive:
            self.start()
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # FIFO admission: the requests that will not find a slot at the next step are the queue
            free, queued = self.max_batch - self._running, 0
            for r in [*self._waiting, req]:
                if queued == 0 and r.size <= free:
                    free -= r.size
                elif not r.cancelled:
                    queued += 1
            if queued > self.max_queue:
                raise QueueFull(f"the server is busy: {queued - 1} requests are waiting (at most {self.max_queue})")
            self._waiting.append(req)
            self._cv.notify_all()

    def cancel(self, req: EngineRequest) -> None:
        """The client went away: drop the request wherever it is (its slots free up at the next step)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify_all()

    # -- the loop -------------------------------------------------------------------------------------------
    def run_on_engine(self, fn) -> concurrent.futures.Future:
        """Run fn() on the engine's thread between two steps (the model is used by one thread only, and its
        routing settings are the engine's to change); the future holds what it returns or raises."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            self.start()
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._jobs.append((fn, future))
            self._cv.notify_all()
        return future

    def _run_jobs(self, jobs: list) -> None:
        for fn, future in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # the job's own error, answered to its caller; the engine goes on
                    future.set_exception(e)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running and not self._jobs:
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    for _, future in self._jobs:
                        future.cancel()
                    return
                admitted = self._admit()
                jobs, self._jobs = list(self._jobs), deque()
            self._run_jobs(jobs)
            try:
                self._reap()
                if admitted:
                    self._prefill(admitted)
                self._decode()
            except Exception:  # never let the engine die: fail what was running, keep serving
                log.exception("engine step failed")
                self.metrics.engine_errors.inc()
                for group in list(self._groups.values()):
                    for s in group.seqs:
                        if not s.finished:
                            self._fail(s.req, 500, "server_error", "engine_error", "internal error while generating")
                self._groups.clear()
                self._running = 0
            if not self._running and self._waiting:
                with self._cv:  # waiting requests that are neither admitted nor expired yet: do not spin
                    if not self._stopping:
                        self._cv.wait(timeout=0.01)

    def _admit(self) -> list[EngineRequest]:
        """Pop the requests that fit in the batch (FIFO); drop cancelled and expired ones. Holds the lock."""
        now = time.monotonic()
        kept: deque[EngineRequest] = deque()
        admitted = []
        free = self.max_batch - self._running
        blocked = False
        for req in self._waiting:
            if req.cancelled:
                continue
            if now > req.deadline:
                self._fail(
                    req,
                    408,
                    "timeout_error",
                    "request_timeout",
                    "the request timed out while waiting for a slot in the batch",
                )
                continue
            if not blocked and req.size <= free:
                free -= req.size
                req.admitted_at = now
                self.metrics.queue_wait.observe(now - req.arrival)
                admitted.append(req)
            else:
                blocked = True  # strict FIFO: a big request is not overtaken forever
                kept.append(req)
        self._waiting = kept
        return admitted

    def _reap(self) -> None:
        """Finish the sequences of cancelled requests and of requests past their deadline."""
        now = time.monotonic()
        for group in self._groups.values():
            for s in group.seqs:
                if s.finished:
                    continue
                if s.req.cancelled:
                    self._finish_quietly(s)
                elif now > s.req.deadline:
                    self._fail(
                        s.req,
                        408,
                        "timeout_error",
                        "request_timeout",
                        "the request ran past the server's time limit and was stopped",
                    )

    # -- forward passes ------------------------------------------------------------------------------------
    def _group_specs(self, key: tuple, routings: list[Routing]) -> dict:
        return group_specs(key, routings, self.base_specs)

    def _forward(self, kind, key, routings, input_ids, mask, position_ids, cache, token_mask, tokens=False):
        """Run the model; return last-position logits (B, V) float, per-row routed counts {lib: (B, N)} and, when
        `tokens`, every position's routing {lib: (winners, scores)} (`_token_routing`; else None)."""
        t0 = time.perf_counter()
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.state is not None:
            with self.state.configure(self._group_specs(key, routings)), self.state.tracing() as trace:
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
            counts = self._routed_counts(trace, token_mask)
            routes = self._token_routing(trace, len(input_ids)) if tokens else None
        else:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
            counts, routes = {}, ({} if tokens else None)
        logits = out.logits[:, -1].float()
        self.metrics.forward_passes.inc(kind=kind)
        self.metrics.batch_size.observe(len(input_ids), kind=kind)
        self.metrics.forward_seconds.observe(time.perf_counter() - t0, kind=kind)
        return logits, counts, routes

    def _set_evidence(self, seqs: list[_Seq]) -> None:
        """lag-prefix's per-sequence counts for a decoding step, in the batch's row order (prefill starts them
        fresh: its cache is empty)."""
        if self.state is not None:
            for lib, ev in self.state.evidence.items():
                ev.set_rows([s.evidence.get(lib) for s in seqs])

    def _evidence_rows(self, row: int) -> dict:
        """Row `row`'s lag-prefix counts after a forward pass, per library (none where no lag-prefix ran)."""
        if self.state is None:
            return {}
        return {lib: ev.counts[row].clone() for lib, ev in self.state.evidence.items() if ev.counts is not None}

    def _routed_counts(self, trace, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{library: (B, n_adapters)} tokens of each row routed to each adapter, summed over modules."""
        B = token_mask.shape[0]
        keep = token_mask.bool().reshape(1, B, -1)
        out = {}
        for lib in self.libraries:
            N, table, offsets = len(self.adapter_names[lib]), self._tables[lib], self._offsets[lib]
            Ws, offs = [], []
            for (module, name), winners in trace.winners.items():
                if name == lib:
                    for W in winners:
                        Ws.append(W.reshape(B, -1))
                        offs.append(offsets[module])
            if not Ws or N == 0:
                continue
            W = torch.stack(Ws)  # (modules, B, tokens) bank indices, -1 for none
            at = torch.where(W >= 0, W + torch.tensor(offs).view(-1, 1, 1), len(table) - 1)
            G = table[at].masked_fill_(~keep, -1)  # library-wide adapter indices
            valid = G >= 0
            rows = torch.arange(B).view(1, B, 1).expand_as(G)
            c = torch.bincount((rows * N + G)[valid], minlength=B * N).view(B, N)
            out[lib] = c
            total = c.sum(0)
            for i in total.nonzero().squeeze(1).tolist():
                self.metrics.routed.inc(int(total[i]), library=lib, adapter=self.adapter_names[lib][i])
        return out

    def _token_routing(self, trace, B: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{library: (winners, scores)}, each (B, modules, tokens) over `self.modules[library]`: the library-wide
        index of the adapter each position chose at each module (-1: none) and the router's score of it (NaN
        where none was chosen). Libraries that made no decision in this pass (router "none") are left out."""
        out = {}
        for lib in self.libraries:
            mods, table, offsets = self.modules[lib], self._tables[lib], self._offsets[lib]
            recorded = [(m, trace.winners.get((m, lib)), trace.scores.get((m, lib))) for m in mods]
            shape = next((w[0].reshape(B, -1).shape for _, w, _ in recorded if w), None)
            if shape is None:
                continue
            W = torch.full((len(mods), *shape), -1, dtype=torch.long)
            S = torch.full((len(mods), *shape), float("nan"))
            for i, (m, w, sc) in enumerate(recorded):
                if w:  # one record per module and forward pass
                    bank_w = w[-1].reshape(shape)
                    at = torch.where(bank_w >= 0, bank_w + offsets[m], len(table) - 1)
                    W[i] = table[at]
                    S[i] = sc[-1].reshape(shape).float()
            S.masked_fill_(W < 0, float("nan"))
            out[lib] = (W.transpose(0, 1), S.transpose(0, 1))
        return out

    @staticmethod
    def _keep_routes(seq: _Seq, routes: dict | None, row: int, n: int) -> None:
        """Append row `row`'s last `n` positions of a pass's token routing to the sequence's own."""
        if routes is None or seq.routes is None:
            return
        for lib, (W, S) in routes.items():
            seq.routes.setdefault(lib, []).append((W[row, :, -n:].clone(), S[row, :, -n:].clone()))

    def _token_record(self, seq: _Seq) -> dict | None:
        """What a "done" event carries of a sequence's token routing: its token ids (prompt, then generated) and
        per library the modules, winners (modules, positions) and scores; one position per token fed to the model
        (the last generated token never is)."""
        if seq.routes is None:
            return None
        req = seq.req
        libs = {}
        for lib, parts in seq.routes.items():
            libs[lib] = {
                "modules": self.modules[lib],
                "winners": torch.cat([w for w, _ in parts], dim=1),
                "scores": torch.cat([s for _, s in parts], dim=1),
            }
        prompt = req.prompts[seq.index // req.n]
        fed = len(prompt) + max(0, len(seq.tokens) - 1)
        return {"token_ids": (list(prompt) + seq.tokens)[:fed], "prompt_tokens": len(prompt), "libraries": libs}

    def _prefill(self, admitted: list[EngineRequest]) -> None:
        rows_by_key: dict[tuple, list] = {}
        for req in admitted:
            if req.cancelled:
                continue
            for p, ids in enumerate(req.prompts):
                rows_by_key.setdefault(req.routing.key, []).append((req, p, ids))
        for key, rows in rows_by_key.items():
            chunk: list = []
            for row in rows:
                width = max([len(r[2]) for r in chunk] + [len(row[2])])
                if chunk and width * (len(chunk) + 1) > PREFILL_TOKEN_BUDGET:
                    self._prefill_rows(key, chunk)
                    chunk = []
                chunk.append(row)
            if chunk:
                self._prefill_rows(key, chunk)

    def _prefill_rows(self, key: tuple, rows: list) -> None:
        R = len(rows)
        T = max(len(ids) for _, _, ids in rows)
        input_ids = torch.full((R, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(R, T, dtype=torch.long)
        for r, (_, _, ids) in enumerate(rows):
            input_ids[r, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[r, T - len(ids) :] = 1
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        try:
            logits, counts, routes = self._forward(
                "prefill",
                key,
                [req.routing for req, _, _ in rows],
                input_ids,
                mask,
                position_ids,
                cache,
                mask,
                tokens=any(req.token_routing for req, _, _ in rows),
            )
        except Exception:
            log.exception("prefill failed")
            self.metrics.engine_errors.inc()
            for req, _, _ in rows:
                self._fail(req, 500, "server_error", "engine_error", "internal error while reading the prompt")
            return
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = RoutingGroup(key)
        for r, (req, p, ids) in enumerate(rows):
            if req.failed or req.cancelled:
                continue
            n = len(ids)
            kv = [(layer.keys[r : r + 1, :, T - n :], layer.values[r : r + 1, :, T - n :]) for layer in cache.layers]
            for j in range(req.n):
                index = p * req.n + j
                gen = None
                if req.sampling.temperature > 0:
                    seed = req.sampling.seed + index if req.sampling.seed is not None else secrets.randbits(63)
                    gen = torch.Generator().manual_seed(seed)
                seq = _Seq(
                    req,
                    index,
                    n,
                    kv,
                    {lib: c[r].clone() for lib, c in counts.items()},
                    generator=gen,
                    evidence=self._evidence_rows(r),
                    routes={} if req.token_routing else None,
                )
                self._keep_routes(seq, routes, r, n)
                self._running += 1
                group.seqs.append(seq)
                self._accept(seq, self._sample(logits[r : r + 1].clone(), [seq])[0])

    def _rebuild(self, group: RoutingGroup, live: list[_Seq]) -> None:
        """Restack the group's cache for `live`: each row's real positions at the right end, zeros before."""
        from transformers import DynamicCache

        old_rows = {uid: i for i, uid in enumerate(group.members)}
        old_layers = group.cache.layers if group.cache is not None else []
        L = max(s.length for s in live)
        B = len(live)
        n_layers = len(live[0].kv) if live[0].kv is not None else len(old_layers)

        def piece(s, layer):
            if s.kv is not None:
                return s.kv[layer]
            r = old_rows[s.uid]
            k, v = old_layers[layer].keys, old_layers[layer].values
            return k[r : r + 1, :, group.cache_len - s.length :], v[r : r + 1, :, group.cache_len - s.length :]

        cache = DynamicCache()
        for layer in range(n_layers):
            k0, v0 = piece(live[0], layer)
            K = k0.new_zeros(B, k0.shape[1], L, k0.shape[3])
            V = v0.new_zeros(B, v0.shape[1], L, v0.shape[3])
            for i, s in enumerate(live):
                k, v = piece(s, layer)
                K[i, :, L - s.length :] = k[0]
                V[i, :, L - s.length :] = v[0]
            cache.update(K, V, layer)
        for s in live:
            s.kv = None
        group.cache, group.members, group.cache_len = cache, [s.uid for s in live], L

    def _decode(self) -> None:
        for key in list(self._groups):
            group = self._groups[key]
            live = [s for s in group.seqs if not s.finished]
            group.seqs = live
            if not live:
                del self._groups[key]
                continue
            if [s.uid for s in live] != group.members:
                self._rebuild(group, live)
            B, L = len(live), group.cache_len
            lengths = torch.tensor([s.length for s in live], dtype=torch.long)
            input_ids = torch.tensor([[s.last] for s in live], dtype=torch.long)
            mask = (torch.arange(L + 1).unsqueeze(0) >= (L - lengths).unsqueeze(1)).long()
            position_ids = lengths.unsqueeze(1)
            try:
                self._set_evidence(live)
                logits, counts, routes = self._forward(
                    "decode",
                    key,
                    [s.req.routing for s in live],
                    input_ids,
                    mask,
                    position_ids,
                    group.cache,
                    torch.ones(B, 1, dtype=torch.long),
                    tokens=any(s.req.token_routing for s in live),
                )
            except Exception:
                log.exception("decoding step failed")
                self.metrics.engine_errors.inc()
                for s in live:
                    self._fail(s.req, 500, "server_error", "engine_error", "internal error while generating")
                del self._groups[key]
                continue
            group.cache_len += 1
            tokens = self._sample(logits, live)
            for i, s in enumerate(live):
                s.evidence = self._evidence_rows(i)
                s.length += 1
                self._keep_routes(s, routes, i, 1)
                for lib, c in counts.items():
                    s.counts[lib] = s.counts[lib] + c[i] if lib in s.counts else c[i].clone()
                if not s.finished:  # a sibling's failure may have ended it
                    self._accept(s, tokens[i])

    # -- sampling and text ---------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int | None]:
        """One token per sequence (sampling.sample_tokens); a row that fails fails its own request alone."""
        params = [s.req.sampling for s in seqs]
        tokens, failures = sample_tokens(logits, params, [s.generator for s in seqs], self.eos_ids)
        for i, (code, message) in failures.items():
            self._fail_alone(seqs[i].req, code, message)
        return tokens

    def _fail_alone(self, req: EngineRequest, code: str, message: str) -> None:
        """A numerical failure of one request: answer it 500 and count it; nothing else is touched."""
        if not req.failed and not req.cancelled:
            log.warning("request %d failed: %s", req.id, code)
            self.metrics.request_errors.inc(code=code)
        self._fail(req, 500, "server_error", code, message)

    def _accept(self, seq: _Seq, token: int | None) -> None:
        req, sp = seq.req, seq.req.sampling
        if token is None or req.failed:  # its request failed (maybe a sibling sequence's sampling): end it too
            return self._end(seq)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        seq.tokens.append(token)
        seq.last = token
        self.metrics.generation_tokens.inc()
        if token in self.eos_ids and not sp.ignore_eos:
            return self._finish(seq, "stop", None)
        seq.text_ids.append(token)
        text = self.tokenizer.decode(seq.text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if sp.stop:
            end = first_stop(text, sp.stop, start=max(0, seq.emitted - max(len(s) for s in sp.stop)))
            if end is not None:
                return self._finish(seq, "stop", text, end=end)
        if len(seq.tokens) >= sp.max_tokens or seq.length >= self.max_model_len:
            return self._finish(seq, "length", text)
        safe = len(text) - holdback(text, sp.stop)
        if safe > seq.emitted:
            req.emit("text", seq.index, text[seq.emitted : safe])
            seq.emitted = safe

    def _finish(self, seq: _Seq, reason: str, text: str | None, end: int | None = None) -> None:
        req = seq.req
        if text is None:
            text = self.tokenizer.decode(seq.text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        end = len(text) if end is None else end
        if end > seq.emitted:
            req.emit("text", seq.index, text[seq.emitted : end])
            seq.emitted = end
        req.emit("done", seq.index, reason, len(seq.tokens), seq.counts, self._token_record(seq))
        self._end(seq)

    def _finish_quietly(self, seq: _Seq) -> None:
        self._end(seq)

    def _end(self, seq: _Seq) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.kv = None
        self._running -= 1
        req = seq.req
        req.remaining -= 1
        if req.remaining == 0:
            req.finished_at = time.monotonic()
        with self._cv:
            self._cv.notify_all()

    def _fail(self, req: EngineRequest, status: int, type_: str, code: str, message: str) -> None:
        """End every sequence of `req` and send one error event."""
        if not req.failed and not req.cancelled:
            req.emit("error", status, type_, code, message)
        req.failed = True
        for group in self._groups.values():
            for s in group.seqs:
                if s.req is req:
                    self._end(s)

    def _all_requests(self) -> list[EngineRequest]:
        reqs = {id(r): r for r in self._waiting}
        for group in self._groups.values():
            for s in group.seqs:
                if not s.finished:
                    reqs[id(s.req)] = s.req
        return list(reqs.values())


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the tokenizer's eos (as `loralag.generate` does), else the model's."""
    if tokenizer.eos_token_id is not None:
        return {int(tokenizer.eos_token_id)}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def model_context_length(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048
