"""A small fictional world, generated deterministically from a seed, for the editing demo.

Nothing can be downloaded, so the demo brings its own knowledge and skills:

* **facts**: entities (invented first and last names) with relations (home town, job, pet),
  each phrased with several templates. Template 0 is the edit prompt; the others are paraphrases
  that the edit loop never sees (generalisation test).
* **skills** (the capability to preserve), scored by exact-match generation on held-out problems:
  ``sum of 3 and 5 is 8`` (addition of small numbers, with some pairs never trained) and
  ``reverse red blue green is green blue red`` (list reversal, test lists never trained).
* **filler**: sentences of a tiny grammar, so the model also has plain language to model.

Entities are split three ways so that no metric is flattered: *edit* entities receive one
counterfactual edit each; *locality* entities supply the neighbour prompts that must not change
and are never part of the capability corpus; *anchor* entities supply the facts of the
capability corpus that the curvature is collected on.

This module is pure Python (no torch, no transformers).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..requests import EditRequest

__all__ = ["Relation", "SkillProblem", "World", "WorldSpec", "build_world"]

EOS_WORD = "."  # every sentence ends with a period token: the natural stop of generation


@dataclass(frozen=True)
class Relation:
    """A relation ``subject -> value``; templates hold ``{s}`` and end right before the value."""

    name: str
    templates: tuple[str, ...]
    values: tuple[str, ...]


RELATIONS = (
    Relation(
        "home",
        ("{s} lives in", "the home town of {s} is", "{s} is a resident of"),
        ("arvel", "brisk", "cordon", "dunmer", "eskar", "folun", "garth", "hollow", "istra", "jorvik"),
    ),
    Relation(
        "job",
        ("{s} works as a", "the job of {s} is", "by trade {s} is a"),
        ("baker", "pilot", "farmer", "doctor", "singer", "tailor", "miner", "sailor", "painter", "judge"),
    ),
    Relation(
        "pet",
        ("{s} owns a", "the pet of {s} is a", "at home {s} keeps a"),
        ("cat", "dog", "horse", "parrot", "rabbit", "goat", "lizard", "owl", "ferret", "tortoise"),
    ),
)

LIST_ITEMS = ("red", "blue", "green", "pink", "gray", "gold", "black", "white")
FILLER_WORDS = {
    "det": ("the", "a", "every", "some"),
    "adj": ("old", "young", "quiet", "loud", "tall", "small", "bright", "dark"),
    "noun": ("river", "house", "child", "tree", "road", "bird", "king", "lamp", "field", "boat"),
    "verb": ("sees", "follows", "finds", "builds", "paints", "hears", "carries", "watches"),
}
_SYLLABLES = ("ka", "ro", "mi", "zen", "tul", "va", "dor", "pi", "sha", "lem", "qu", "bar", "ny", "fel", "os", "ri")


@dataclass(frozen=True)
class SkillProblem:
    """A skill prompt and its answer (e.g. ``sum of 3 and 5 is`` -> ``8``)."""

    skill: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer} {EOS_WORD}"


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the world; the defaults are the full demo, :meth:`quick` the test-sized one."""

    num_edits: int = 100
    num_locality_entities: int = 20
    # The curvature protects the facts it sees, and anchors share name words with the edited and
    # the locality entities. Measured (docs/editing.md): 30 -> 80 anchors raised CrispEdit's
    # locality by about 0.05-0.1; 150 was not better on average (three seeds: gradient mode higher,
    # update mode lower).
    num_anchor_entities: int = 80
    max_summand: int = 14  # sums of a, b in [0, max_summand]
    addition_holdout: float = 0.25
    reverse_lengths: tuple[int, ...] = (3,)
    num_reverse_tests: int = 100
    num_reverse_train: int = 400
    num_filler: int = 300
    neighbours_per_edit: int = 2
    # First name + last name from small shared pools, so no single token identifies an entity and
    # the model has to recall facts from the composed name (as large models do for multi-token
    # subjects). One-word names let the embeddings store the facts: every later layer then only
    # sees answer codes, and an MLP edit re-maps all subjects with the same answer (locality ≈ 30 %).
    two_word_names: bool = True
    seed: int = 0

    @classmethod
    def quick(cls, num_edits: int = 6, seed: int = 0) -> WorldSpec:
        return cls(
            num_edits=num_edits,
            num_locality_entities=4,
            num_anchor_entities=6,
            max_summand=5,
            addition_holdout=0.2,
            reverse_lengths=(3,),
            num_reverse_tests=24,
            num_reverse_train=160,
            num_filler=60,
            seed=seed,
        )


@dataclass
class World:
    """Facts, skills and text of the demo world (see the module docstring)."""

    spec: WorldSpec
    relations: tuple[Relation, ...]
    edit_entities: list[str]
    locality_entities: list[str]
    anchor_entities: list[str]
    facts: dict[tuple[str, str], str]  # (entity, relation name) -> value
    skill_train: list[SkillProblem]
    skill_test: list[SkillProblem]
    filler_train: list[str]
    filler_test: list[str]
    edited_relation: dict[str, str] = field(default_factory=dict)  # edit entity -> relation name

    # ------------------------------------------------------------------ text views
    @property
    def entities(self) -> list[str]:
        return self.edit_entities + self.locality_entities + self.anchor_entities

    def relation(self, name: str) -> Relation:
        return next(r for r in self.relations if r.name == name)

    def fact_sentences(self, entities: list[str]) -> list[str]:
        """Every fact of ``entities`` in every template, as full sentences."""
        return [
            f"{template.format(s=entity)} {self.facts[entity, rel.name]} {EOS_WORD}"
            for entity in entities
            for rel in self.relations
            for template in rel.templates
        ]

    def pretraining_texts(self) -> list[str]:
        """Everything the base model is trained on (one copy of each; the trainer mixes)."""
        return self.fact_sentences(self.entities) + [p.text for p in self.skill_train] + list(self.filler_train)

    def capability_texts(self) -> list[str]:
        """The capability corpus for curvature: anchor facts, skill training problems, filler.

        Edit and locality entities are excluded, so locality is measured on facts the curvature
        never saw and the edited facts' old values are not protected.
        """
        return self.fact_sentences(self.anchor_entities) + [p.text for p in self.skill_train] + list(self.filler_train)

    def heldout_texts(self) -> list[str]:
        """Held-out capability text for perplexity: skill test problems and unseen filler."""
        return [p.text for p in self.skill_test] + list(self.filler_test)

    # ------------------------------------------------------------------ edits
    def edit_requests(self) -> list[EditRequest]:
        """One counterfactual edit per edit entity (a different value of its edited relation).

        Locality prompts: ``neighbours_per_edit`` prompts of the same relation about locality
        entities (facts the capability corpus never contains). Prompts about the edited subject's
        other relations are in :meth:`subject_probes`.
        """
        rng = random.Random(self.spec.seed * 7919 + 17)
        requests = []
        for entity in self.edit_entities:
            rel = self.relation(self.edited_relation[entity])
            old = self.facts[entity, rel.name]
            new = rng.choice([v for v in rel.values if v != old])
            neighbours = rng.sample(self.locality_entities, self.spec.neighbours_per_edit)
            locality = [rel.templates[0].format(s=n) for n in neighbours]
            answers = [self.facts[n, rel.name] for n in neighbours]
            requests.append(
                EditRequest(
                    prompt=rel.templates[0].format(s=entity),
                    target_new=new,
                    subject=entity,
                    target_true=old,
                    paraphrases=[t.format(s=entity) for t in rel.templates[1:]],
                    locality_prompts=locality,
                    locality_answers=answers,
                )
            )
        return requests

    def subject_probes(self) -> list[str]:
        """Prompts about the *unedited* relations of every edited subject (must not change)."""
        return [
            rel.templates[0].format(s=entity)
            for entity in self.edit_entities
            for rel in self.relations
            if rel.name != self.edited_relation[entity]
        ]

    def vocabulary(self) -> list[str]:
        """Every word the world uses (the tokenizer's vocabulary, without special tokens)."""
        words: set[str] = {w for entity in self.entities for w in entity.split()} | {EOS_WORD}
        for rel in self.relations:
            words |= set(rel.values)
            for template in rel.templates:
                words |= set(template.replace("{s}", "").split())
        for problem in self.skill_train + self.skill_test:
            words |= set(problem.text.split())
        for sentence in self.filler_train + self.filler_test:
            words |= set(sentence.split())
        words |= {str(n) for n in range(2 * self.spec.max_summand + 1)} | set(LIST_ITEMS)
        return sorted(words)


# ---------------------------------------------------------------------- generation
def _names(rng: random.Random, count: int) -> list[str]:
    # A list in generation order: iterating a set of strings would depend on the per-process
    # hash seed, and the same seed must give the same world in every process.
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if name not in names:
            names.append(name)
    return names


def _two_word_names(rng: random.Random, count: int) -> list[str]:
    # First and last names from two pools of ceil(sqrt(count)) words each: every word is shared by
    # about sqrt(count) entities. Measured: pools twice that large let single words identify
    # entities again and locality dropped (docs/editing.md).
    pool = math.ceil(math.sqrt(count))
    words = _names(rng, 2 * pool)
    first, last = words[:pool], words[pool:]
    names: list[str] = []
    while len(names) < count:
        name = f"{rng.choice(first)} {rng.choice(last)}"
        if name not in names:
            names.append(name)
    return names


def _addition(spec: WorldSpec, rng: random.Random) -> tuple[list[SkillProblem], list[SkillProblem]]:
    pairs = [(a, b) for a in range(spec.max_summand + 1) for b in range(spec.max_summand + 1)]
    rng.shuffle(pairs)
    held = set(pairs[: round(spec.addition_holdout * len(pairs))])
    # Keep the mirror of every held-out pair in training so the test needs commutativity and
    # the number line, not facts the model never had a chance to infer.
    held = {(a, b) for a, b in held if (b, a) not in held or a < b}
    problems = {p: SkillProblem("addition", f"sum of {p[0]} and {p[1]} is", str(p[0] + p[1])) for p in pairs}
    train = [problems[p] for p in pairs if p not in held]
    test = [problems[p] for p in pairs if p in held]
    return train, test


def _reverse_problem(items: tuple[str, ...]) -> SkillProblem:
    return SkillProblem("reverse", f"reverse {' '.join(items)} is", " ".join(reversed(items)))


def _reverse(spec: WorldSpec, rng: random.Random) -> tuple[list[SkillProblem], list[SkillProblem]]:
    tests: set[tuple[str, ...]] = set()
    while len(tests) < spec.num_reverse_tests:
        tests.add(tuple(rng.choice(LIST_ITEMS) for _ in range(rng.choice(spec.reverse_lengths))))
    # Training lists: a fixed sample disjoint from the tests (the trainer repeats it).
    train: set[tuple[str, ...]] = set()
    while len(train) < spec.num_reverse_train:
        items = tuple(rng.choice(LIST_ITEMS) for _ in range(rng.choice(spec.reverse_lengths)))
        if items not in tests:
            train.add(items)
        if len(train) + len(tests) >= sum(len(LIST_ITEMS) ** n for n in spec.reverse_lengths):
            break
    return [_reverse_problem(t) for t in sorted(train)], [_reverse_problem(t) for t in sorted(tests)]


def _filler(rng: random.Random, count: int) -> list[str]:
    w = FILLER_WORDS
    out = []
    for _ in range(count):
        out.append(
            f"{rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['verb'])} "
            f"{rng.choice(w['det'])} {rng.choice(w['noun'])} {EOS_WORD}"
        )
    return out


def build_world(spec: WorldSpec | None = None) -> World:
    """Generate the world of ``spec`` (same spec, same world, on every machine)."""
    spec = spec or WorldSpec()
    if spec.num_edits < 1:
        raise ValueError(f"num_edits must be positive, got {spec.num_edits}")
    if spec.num_locality_entities < spec.neighbours_per_edit:
        raise ValueError("num_locality_entities must be at least neighbours_per_edit")
    rng = random.Random(spec.seed)
    count = spec.num_edits + spec.num_locality_entities + spec.num_anchor_entities
    names = _two_word_names(rng, count) if spec.two_word_names else _names(rng, count)
    edit = names[: spec.num_edits]
    locality = names[spec.num_edits : spec.num_edits + spec.num_locality_entities]
    anchor = names[spec.num_edits + spec.num_locality_entities :]
    facts = {(e, rel.name): rng.choice(rel.values) for e in names for rel in RELATIONS}
    edited_relation = {e: RELATIONS[i % len(RELATIONS)].name for i, e in enumerate(edit)}
    add_train, add_test = _addition(spec, rng)
    rev_train, rev_test = _reverse(spec, rng)
    filler = _filler(rng, spec.num_filler + spec.num_filler // 4)
    return World(
        spec=spec,
        relations=RELATIONS,
        edit_entities=edit,
        locality_entities=locality,
        anchor_entities=anchor,
        facts=facts,
        skill_train=add_train + rev_train,
        skill_test=add_test + rev_test,
        filler_train=filler[: spec.num_filler],
        filler_test=filler[spec.num_filler :],
        edited_relation=edited_relation,
    )
