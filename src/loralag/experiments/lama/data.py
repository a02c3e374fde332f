"""The LAMA knowledge benchmark's data: articles, knowledge adapters' training texts, task families.

From LAMA T-REx files (any `*.jsonl` of LAMA records in a folder, plus an optional `relations.json`
with each relation's label and cloze template):

* one **article** per subject entity: its evidence sentences, `[MASK]` replaced by the object's surface
  form (`obj_surface` where the evidence has one, else `obj_label`); its **page** (what retrieval indexes and
  RAG puts in front) is the article under the entity's title, as KILT's Wikipedia pages begin;
* **synthetic rewrites** of each article (templated synthetic continued pretraining): every fact restated
  around the subject and around the object, and the article's sentences restated around each entity they
  name — what each knowledge adapter learns besides the article itself;
* four **task families** in KILT's forms, one dataset each: slot filling (`subject [SEP] relation label`
  -> object, the KILT T-REx/zsRE form), question answering (the relation's cloze template turned into a
  question -> object, the NQ form), fact checking (the template filled with the true object or with a wrong
  object of the same relation -> SUPPORTS / REFUTES, the FEVER form, answered with the bare label; the
  `recall` form, a harder named variant, recalls the true object before the verdict, see
  fact_checking_pairs) and entity linking (an evidence sentence with one mention of the subject marked
  `[START_ENT] ... [END_ENT]` -> the subject's title, the AIDA / WNED form).

Nothing depends on which relations a folder holds: questions and claims come from each relation's own cloze
template and label (relations.json, or a generic one).

The knowledge set (entities that get an adapter and are asked about) and the task-training pool (entities
whose facts train the task adapters) are disjoint, drawn deterministically from a seed, spread evenly
over the relations.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loralag.errors import LoralagError
from loralag.evaluation.answers import REFUTES, SUPPORTS
from loralag.evaluation.kilt import (
    Example,
    normalize_answer,
    read_lama,
    read_lama_relations,
)

# -- the families: dataset names as kilt.LAMA_FAMILIES spells them ---------------------------------------------
SLOT_FILLING, QA, FACT_CHECKING = "lama_slot_filling", "lama_qa", "lama_fact_checking"
ENTITY_LINKING = "lama_entity_linking"
DATASETS = (SLOT_FILLING, QA, FACT_CHECKING, ENTITY_LINKING)
FAMILY_OF = {SLOT_FILLING: "slot_filling", QA: "qa", FACT_CHECKING: "fact_checking", ENTITY_LINKING: "entity_linking"}
START_ENT, END_ENT = "[START_ENT]", "[END_ENT]"  # KILT's mention markers (AIDA, WNED)
FC_FORMS = ("label", "recall")  # fact checking's answer: the bare label (FEVER's), or object then verdict


@dataclass
class Relation:
    id: str
    label: str
    template: str  # LAMA cloze template with [X] and [Y]


@dataclass
class Fact:
    id: str  # the LAMA record's uuid (or "<relation>-<index>")
    relation: str
    subject: str
    object: str  # obj_label
    surfaces: list[str]  # the object's surface forms in the evidence sentences (obj_label first)
    sentences: list[str]  # evidence sentences, [MASK] filled


@dataclass
class Entity:
    """A subject entity: its adapter's name, its article and its facts."""

    name: str  # adapter name: a slug of the label plus its Wikidata id
    label: str  # sub_label
    uri: str
    facts: list[Fact]
    article: str = ""
    mentions: list[str] = field(default_factory=list)  # surface forms of the subject (sub_label first)

    @property
    def page(self) -> str:
        """What retrieval indexes and RAG puts in front: the article under its title, as a page of KILT's
        Wikipedia knowledge source begins with its title (the knowledge adapter learns the article itself)."""
        return f"{self.label}\n{self.article}"


@dataclass
class Question:
    """One benchmark question about one entity, in one family."""

    example: Example  # id, input (the KILT-form input), answers, provenance=[entity label], task
    dataset: str
    prompt: str  # what the model reads
    entity: str  # gold knowledge adapter
    subject: str  # the subject's mention, to find its tokens in the prompt
    fact: Fact


@dataclass
class Claim:
    """A fact of the task-training pool stated truly and falsely (a wrong object of the same relation)."""

    true: str
    false: str
    page: str  # the entity's page (Entity.page), in front of the claim in RAG form
    entity: str
    obj: str = ""  # the true object: the training answer recalls it before the verdict (fact_checking_pairs)
    # more wrong objects' claims, each paired with the true claim again (build_data's fc_false)
    more_false: tuple[str, ...] = ()


@dataclass
class LamaData:
    relations: dict[str, Relation]
    entities: list[Entity]  # the knowledge set, in adapter order
    train_entities: list[Entity]  # the task-training pool (disjoint from the knowledge set)
    questions: dict[str, list[Question]]  # dataset -> questions about the knowledge set
    task_pairs: dict[str, list[tuple[str, str]]]  # dataset -> (prompt, answer) about the training pool
    claims: list[Claim] = field(default_factory=list)  # the fact-checking claim pool
    context_every: int = 3
    # per fact-checking pair: the training entity whose knowledge adapter it trains under (None: no adapter)
    fc_under: list[str | None] = field(default_factory=list)
    # dataset -> per task pair, whether its page is in front (RAG form)
    task_context: dict[str, list[bool]] = field(default_factory=dict)

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(name)


# -- reading ---------------------------------------------------------------------------------------------------
def read_relations(data_dir: Path, present: set[str]) -> dict[str, Relation]:
    """relations.json when the folder has one; a relation it does not describe gets a generic label and template."""
    known = {}
    path = data_dir / "relations.json"
    if path.is_file():
        for rid, rec in read_lama_relations(path).items():
            label = str(rec.get("label") or rid)
            known[rid] = Relation(rid, label, rec["template"])
    for rid in present - set(known):
        known[rid] = Relation(rid, rid, f"[X] has {rid} [Y] .")
    for rel in known.values():
        if "[X]" not in rel.template or "[Y]" not in rel.template:
            raise LoralagError(f"{path}: the template of {rel.id} needs both [X] and [Y]: {rel.template!r}")
    return known


def read_facts(data_dir: str | Path) -> tuple[list[Fact], dict[str, dict], dict[str, Relation]]:
    """Every fact of every LAMA jsonl file in `data_dir`; also each subject's uri and surface forms."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LoralagError(f"LAMA data folder {data_dir} does not exist")
    files = sorted(p for p in data_dir.glob("*.jsonl") if p.is_file())
    if not files:
        raise LoralagError(f"{data_dir} holds no LAMA *.jsonl file")
    facts, subjects = [], {}
    for path in files:
        for ex in read_lama(path):
            raw = ex.raw
            obj_label = ex.answers[0]
            surfaces, sentences, mentions = [obj_label], [], [ex.input.strip()]
            evidences = raw.get("evidences") or [
                {"masked_sentence": m} for m in raw.get("masked_sentences") or [] if isinstance(m, str)
            ]  # the other LAMA subsets' field
            for ev in evidences:
                masked = ev.get("masked_sentence") or ""
                surface = (ev.get("obj_surface") or "").strip() or obj_label
                if surface not in surfaces:
                    surfaces.append(surface)
                sub_surface = (ev.get("sub_surface") or "").strip()
                if sub_surface and sub_surface not in mentions:
                    mentions.append(sub_surface)
                if "[MASK]" in masked:
                    sent = " ".join(masked.replace("[MASK]", surface).split())
                    if sent not in sentences:
                        sentences.append(sent)
            if not ex.input.strip():
                continue
            fact = Fact(ex.id, str(raw["predicate_id"]), ex.input.strip(), obj_label, surfaces, sentences)
            facts.append(fact)
            key = _subject_key(raw)
            info = subjects.setdefault(key, {"uri": str(raw.get("sub_uri") or ""), "labels": set(), "mentions": []})
            info["labels"].add(fact.subject)
            for m in mentions:
                if m not in info["mentions"]:
                    info["mentions"].append(m)
    relations = read_relations(data_dir, {f.relation for f in facts})
    return facts, subjects, relations


def _subject_key(raw: dict) -> str:
    return str(raw.get("sub_uri") or raw["sub_label"].strip())


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "entity"


def _adapter_name(label: str, uri: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9]+", "", uri)
    return f"{slug(label)}-{tail}" if tail else slug(label, 60)


# -- articles and rewrites -------------------------------------------------------------------------------------
def article_text(facts: list[Fact]) -> str:
    sentences = []
    for f in facts:
        for s in f.sentences:
            if s not in sentences:
                sentences.append(s)
    return " ".join(sentences)


def fill_template(template: str, subject: str, obj: str) -> str:
    text = template.replace("[X]", subject).replace("[Y]", obj)
    return re.sub(r"\s+([.,;:?!])", r"\1", " ".join(text.split()))


def rewrites(entity: Entity, relations: dict[str, Relation], qa: bool = False) -> list[str]:
    """Templated synthetic continued pretraining: restate the article around each entity it names.

    Per fact: the relation's cloze sentence, the fact stated around the subject and around the object, and
    with qa a question-and-answer restatement ("Q: What is the place of birth of Ada? A: London."): facts a
    model has only read as statements it recalls poorly when asked; QA forms of them in training help
    (Allen-Zhu & Li, "Physics of Language Models 3.1"). Its form is none of the benchmark's prompts.
    Per named entity (the subject and each object): the article's sentences that mention it, introduced
    by that entity."""
    texts = []
    s = entity.label
    for f in entity.facts:
        rel = relations[f.relation]
        texts.append(fill_template(rel.template, s, f.object))
        texts.append(f"The {rel.label} of {s} is {f.object}.")
        texts.append(f"{f.object} is the {rel.label} of {s}.")
        if qa:
            texts.append(f"Q: What is the {rel.label} of {s}? A: {f.object}.")
    sentences = [x for f in entity.facts for x in f.sentences]
    named = [s] + [f.object for f in entity.facts]
    for e in dict.fromkeys(named):
        forms = [e] + [sf for f in entity.facts if f.object == e for sf in f.surfaces]
        about = [x for x in dict.fromkeys(sentences) if any(form.lower() in x.lower() for form in forms)]
        if about:
            texts.append(f"About {e}: " + " ".join(about))
    return list(dict.fromkeys(texts))


# -- task families ---------------------------------------------------------------------------------------------
def question_text(relation: Relation, subject: str) -> str:
    """The relation's cloze template as a question: [X] the subject, [Y] asked for ("[X] was born in [Y] ." ->
    "Ada Lovelace was born in what?", "[Y] is the capital of [X] ." -> "What is the capital of France?")."""
    text = fill_template(relation.template, subject, "\0").rstrip(" .!;")
    head, _, tail = text.partition("\0")
    return (f"{head}what{tail}" if head else f"What{tail}") + "?"


def slot_filling_input(relation: Relation, subject: str) -> str:
    return f"{subject} [SEP] {relation.label}"


def make_prompt(dataset: str, text: str) -> str:
    """The model's prompt for a KILT-form input (plain completion; no chat template). Each family ends in its
    own cue ("Value:", "Answer:", "Verdict ...:", "Title:"), so the tokens where the answer starts differ per
    task."""
    if dataset == SLOT_FILLING:
        return f"Fill the slot: {text}\nValue:"
    if dataset == QA:
        return f"Question: {text}\nAnswer:"
    if dataset == FACT_CHECKING:
        return f"Claim: {text}\nVerdict ({SUPPORTS} or {REFUTES}):"
    if dataset == ENTITY_LINKING:
        return f"Link the marked entity: {text}\nTitle:"
    raise LoralagError(f"unknown LAMA dataset {dataset!r}")


def linking_item(entity: Entity, i: int) -> tuple[str, list[str]] | None:
    """(KILT-form input, gold titles) of an entity-linking question about `entity`: one of its evidence sentences
    with a mention of it marked. Mentions other than the title come first ("Messmer" for Pierre Messmer: the
    link needs knowledge, not a copy); i picks among the candidates. None when no sentence names it."""
    sentences = list(dict.fromkeys(x for f in entity.facts for x in f.sentences))
    mentions = sorted(dict.fromkeys(entity.mentions), key=lambda m: (m == entity.label, -len(m)))
    found = []
    for m in mentions:
        for sent in sentences:
            hit = re.search(rf"(?<!\w){re.escape(m)}(?!\w)", sent)
            if hit:
                found.append(sent[: hit.start()] + f"{START_ENT} {m} {END_ENT}" + sent[hit.end() :])
        if found:
            break
    if not found:
        return None
    return found[i % len(found)], [entity.label]


def rag_prompt(page: str, prompt: str) -> str:
    """A prompt with a retrieved page (Entity.page) in front (RAG form)."""
    return f"{page}\n\n{prompt}"


def _wrong_object(fact: Fact, pool: list[str], true_objects: set[str], rng: random.Random) -> str | None:
    taken = {normalize_answer(o) for o in true_objects}
    choices = [o for o in pool if normalize_answer(o) not in taken]
    return rng.choice(choices) if choices else None


def family_item(
    dataset: str,
    fact: Fact,
    relations: dict[str, Relation],
    objects_by_relation: dict[str, list[str]],
    true_objects: set[str],
    rng: random.Random,
    verdict: str | None = None,
) -> tuple[str, list[str]]:
    """(KILT-form input, gold answers) of a fact in one family. Fact checking states the true object or a wrong
    object of the same relation (verdict SUPPORTS / REFUTES; by default a coin flip)."""
    rel = relations[fact.relation]
    if dataset == SLOT_FILLING:
        return slot_filling_input(rel, fact.subject), _answers(fact)
    if dataset == QA:
        return question_text(rel, fact.subject), _answers(fact)
    if verdict is None:
        verdict = SUPPORTS if rng.random() < 0.5 else REFUTES
    wrong = _wrong_object(fact, objects_by_relation[fact.relation], true_objects, rng) if verdict == REFUTES else None
    if wrong is None:
        return fill_template(rel.template, fact.subject, fact.object), [SUPPORTS]
    return fill_template(rel.template, fact.subject, wrong), [REFUTES]


def _answers(fact: Fact) -> list[str]:
    """obj_label, then those of the object's surface forms in the article that name it in full
    ("Queen Victoria" for Victoria, "Alexandra, Victoria" for Alexandra; not "Scottish" for Scotland)."""
    label = normalize_answer(fact.object)
    forms = [s for s in fact.surfaces if s.strip() and re.search(rf"\b{re.escape(label)}\b", normalize_answer(s))]
    return list(dict.fromkeys([fact.object] + forms))


# -- selection -------------------------------------------------------------------------------------------------
def _usable_fact(f: Fact, max_object_words: int) -> bool:
    if not f.sentences or not f.object.strip():
        return False
    if len(f.object.split()) > max_object_words:
        return False
    no, ns = normalize_answer(f.object), normalize_answer(f.subject)
    return bool(no) and no not in ns  # "Paris Saint-Germain" -> Paris would be trivial


def build_data(
    data_dir: str | Path,
    n_entities: int,
    questions_per_dataset: int | None = None,
    n_train_pairs: int = 64,
    seed: int = 0,
    max_article_chars: int = 600,
    max_object_words: int = 4,
    min_subject_mentions: int = 1,
    context_every: int = 3,
    claim_pool: int = 2,
    fc_bare_facts: int | None = None,
    fc_form: str = "label",
    fc_false: int = 1,
) -> LamaData:
    """Choose the knowledge set and the task-training pool; build articles, questions and task pairs.

    n_entities: knowledge adapters (one per subject entity). questions_per_dataset: at most this many
    questions per family (default n_entities: one per entity and family). n_train_pairs: prompt/answer
    pairs per family for the task adapters, about other entities; one in `context_every` of them has the
    entity's page in front (the RAG form; 0: none). Fact checking draws its pairs from a pool of
    claim_pool × n_train_pairs claims, at most fc_bare_facts of them bare, answered in fc_form (see
    fact_checking_pairs); each claim's fact is stated falsely with fc_false different wrong objects.
    Entities are picked round-robin over the
    relations (so every relation is represented), in a seeded order, among subjects whose label is
    unambiguous, whose article stays under max_article_chars and names the subject, and that have a fact
    whose object is not part of the subject's own name."""
    facts, subjects, relations = read_facts(data_dir)
    rng = random.Random(seed)
    by_subject: dict[str, list[Fact]] = defaultdict(list)
    key_of = {}
    for f in facts:
        by_subject[f.subject].append(f)
    # a label shared by two Wikidata subjects is ambiguous: asking about it has no single answer
    label_keys: dict[str, set[str]] = defaultdict(set)
    for key, info in subjects.items():
        for label in info["labels"]:
            label_keys[label].add(key)
            key_of[label] = key
    objects_by_relation: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        objects_by_relation[f.relation].append(f.object)
    for rid in objects_by_relation:
        objects_by_relation[rid] = sorted(set(objects_by_relation[rid]))

    candidates: dict[str, list[Entity]] = defaultdict(list)  # main relation -> entities
    for label in sorted(by_subject):
        if len(label_keys[label]) != 1:
            continue
        efacts = [f for f in by_subject[label] if _usable_fact(f, max_object_words)]
        if not efacts:
            continue
        info = subjects[key_of[label]]
        article = article_text(by_subject[label])
        if len(article) > max_article_chars:
            continue
        mentions = [m for m in info["mentions"] if m]
        if sum(article.lower().count(m.lower()) for m in mentions) < min_subject_mentions:
            continue
        ent = Entity(_adapter_name(label, info["uri"]), label, info["uri"], efacts, article, mentions)
        candidates[efacts[0].relation].append(ent)
    for rid in candidates:
        rng.shuffle(candidates[rid])
    order = _round_robin([candidates[r] for r in sorted(candidates)])
    if len(order) < n_entities + 1:
        raise LoralagError(
            f"{data_dir} has only {len(order)} usable subject entities; asked for {n_entities} "
            "plus a task-training pool"
        )
    entities = order[:n_entities]
    pool = order[n_entities:]
    names = [e.name for e in entities]
    if len(set(names)) != len(names):
        raise LoralagError("two knowledge entities got the same adapter name")  # uri makes this unreachable

    q_cap = n_entities if questions_per_dataset is None else questions_per_dataset
    questions: dict[str, list[Question]] = {}
    for d_i, dataset in enumerate(DATASETS):
        qrng = random.Random(f"{seed}-{dataset}")
        qs = []
        for i, ent in enumerate(entities):
            if len(qs) >= q_cap:
                break
            fact = ent.facts[(i + d_i) % len(ent.facts)]
            true = {f.object for f in ent.facts if f.relation == fact.relation}
            if dataset == ENTITY_LINKING:
                item = linking_item(ent, i)
                if item is None:
                    continue
            else:
                item = family_item(dataset, fact, relations, objects_by_relation, true, qrng)
            text, answers = item
            ex = Example(
                f"{dataset}-{fact.id}",
                text,
                answers,
                [ent.label],
                dataset,
                {"entity": ent.name, "relation": fact.relation},
            )
            qs.append(Question(ex, dataset, make_prompt(dataset, text), ent.name, ent.label, fact))
        questions[dataset] = qs

    task_pairs: dict[str, list[tuple[str, str]]] = {}
    task_context: dict[str, list[bool]] = {}
    train_entities: list[Entity] = []
    for dataset in (SLOT_FILLING, QA, ENTITY_LINKING):
        prng = random.Random(f"{seed}-train-{dataset}")
        pairs: list[tuple[str, str]] = []
        task_context[dataset] = []
        for j, ent in enumerate(pool):
            if len(pairs) >= n_train_pairs:
                break
            fact = ent.facts[j % len(ent.facts)]
            if dataset == ENTITY_LINKING:
                item = linking_item(ent, j)
                if item is None:
                    continue
                text, answers = item
            else:
                text, answers = family_item(dataset, fact, relations, objects_by_relation, set(), prng)
            prompt = make_prompt(dataset, text)
            # one fact in `context_every` in RAG form (its page in front), so one task adapter serves both
            with_context = context_every and j % context_every == 0
            pairs.append((rag_prompt(ent.page, prompt) if with_context else prompt, " " + answers[0]))
            task_context[dataset].append(bool(with_context))
            if ent not in train_entities:
                train_entities.append(ent)
        task_pairs[dataset] = pairs
    # fact checking: a pool of (true claim, false claim) about the same fact, so the verdict has to come from the
    # object, not the subject; which claims train the adapter is fact_checking_pairs' choice
    prng = random.Random(f"{seed}-train-{FACT_CHECKING}")
    more_rng = random.Random(f"{seed}-train-{FACT_CHECKING}-more-false")
    claims: list[Claim] = []
    for j, ent in enumerate(pool):
        if len(claims) >= claim_pool * n_train_pairs:
            break
        fact = ent.facts[j % len(ent.facts)]
        true = {f.object for f in ent.facts if f.relation == fact.relation}
        wrong = _wrong_object(fact, objects_by_relation[fact.relation], true, prng)
        if wrong is None:
            continue
        more: list[str] = []  # from their own generator: every claim's first wrong object is the same for any fc_false
        for _ in range(fc_false - 1):
            extra = _wrong_object(fact, objects_by_relation[fact.relation], true | {wrong, *more}, more_rng)
            if extra is not None:
                more.append(extra)
        rel = relations[fact.relation]
        claims.append(
            Claim(
                fill_template(rel.template, fact.subject, fact.object),
                fill_template(rel.template, fact.subject, wrong),
                ent.page,
                ent.name,
                fact.object,
                tuple(fill_template(rel.template, fact.subject, o) for o in more),
            )
        )
    fc = fact_checking_pairs(claims, n_train_pairs, context_every, fc_bare_facts, form=fc_form)
    task_pairs[FACT_CHECKING] = [(prompt, answer) for prompt, answer, _ in fc]
    used = {c.entity for c in claims[:n_train_pairs]}
    train_entities += [e for e in pool if e.name in used and e not in train_entities]
    return LamaData(
        relations,
        entities,
        train_entities,
        questions,
        task_pairs,
        claims,
        context_every,
        [under for _, _, under in fc],
        task_context,
    )


def fact_checking_pairs(
    claims: list[Claim],
    n_pairs: int | None,
    context_every: int,
    max_bare: int | None = None,
    known: list[bool] | None = None,
    form: str = "label",
    under: set[str] | None = None,
) -> list[tuple[str, str, str | None]]:
    """Fact-checking training pairs (prompt, answer, under): each fact's true claim (SUPPORTS) and false claim
    (REFUTES), the first in `context_every` facts in RAG form (its page in front: the verdict is in the
    context; under = None), the others bare. form "label" answers the bare label (" SUPPORTS"), as KILT's FEVER
    is scored; form "recall", the harder named variant, recalls the true object first, then gives the verdict
    (" French, so SUPPORTS" / " French, so REFUTES"): a copy and compare that attention does easily, but one
    whose second half a per-token router must keep on the same task adapter.

    A bare claim about a training entity can only be checked against knowledge of that entity. The first
    `max_bare` bare facts (None: all) are trained under the entity's own knowledge adapter (under = the
    entity; the LAMA benchmark trains it), so the task adapter learns to check a claim against what a knowledge
    adapter injects, as at test time. Past that cap a bare fact is used only if `known[i]` (the base model
    already ranks the true claim above the false one), without an adapter, to check against the model's own
    knowledge; with known=None the list ends at the cap.

    With `under` (entity names that have a knowledge adapter), every claim about one of them trains bare under
    that adapter and every other claim with its page in front, whatever `context_every`, `max_bare` and `known`
    say. A claim's more wrong objects (Claim.more_false) each add a (true, false) pair like the first. n_pairs
    None: every claim's pairs."""
    if form not in FC_FORMS:
        raise LoralagError(f"fact-checking form must be one of {FC_FORMS}, got {form!r}")
    out: list[tuple[str, str, str | None]] = []
    bare = 0
    for j, c in enumerate(claims):
        if n_pairs is not None and len(out) >= n_pairs:
            break
        entity = None  # the knowledge adapter the pair trains under
        if under is not None:
            with_context = c.entity not in under
            entity = None if with_context else c.entity
        else:
            with_context = bool(context_every) and j % context_every == 0
            if not with_context:
                if max_bare is None or bare < max_bare:
                    entity, bare = c.entity, bare + 1
                elif known is None:
                    break
                elif not known[j]:
                    continue
        for false in (c.false, *c.more_false):
            for text, label in ((c.true, SUPPORTS), (false, REFUTES)):
                prompt = make_prompt(FACT_CHECKING, text)
                answer = f" {c.obj}, so {label}" if form == "recall" and c.obj else " " + label
                out.append((rag_prompt(c.page, prompt) if with_context else prompt, answer, entity))
    return out if n_pairs is None else out[:n_pairs]


def _round_robin(groups: list[list]) -> list:
    out, i = [], 0
    while any(i < len(g) for g in groups):
        for g in groups:
            if i < len(g):
                out.append(g[i])
        i += 1
    return out


def describe(data: LamaData) -> dict:
    """A json-able summary of the data a run used."""
    return {
        "entities": [
            {
                "name": e.name,
                "label": e.label,
                "facts": [[f.relation, f.object] for f in e.facts],
                "article_chars": len(e.article),
            }
            for e in data.entities
        ],
        "questions": {d: len(q) for d, q in data.questions.items()},
        "task_pairs": {d: len(p) for d, p in data.task_pairs.items()},
        "task_training_entities": len(data.train_entities),
        "relations": sorted({f.relation for e in data.entities for f in e.facts}),
    }


def write_questions(path: str | Path, data: LamaData) -> None:
    """The questions as KILT-format gold files' records (one jsonl, all datasets), for inspection."""
    with open(path, "w", encoding="utf-8") as fh:
        for dataset, qs in data.questions.items():
            for q in qs:
                fh.write(
                    json.dumps(
                        {
                            "id": q.example.id,
                            "dataset": dataset,
                            "input": q.example.input,
                            "output": [{"answer": a} for a in q.example.answers],
                            "provenance": [q.example.provenance[0]],
                            "entity": q.entity,
                            "prompt": q.prompt,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
