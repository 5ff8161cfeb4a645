"""Synthetic GSM8K-style word problems with exact, controllable difficulty.

Real data gives no control over difficulty and is small; generated problems provide a
curriculum (1 to 6 arithmetic steps) and unlimited fresh examples whose intermediate
results are known, which later code uses for distractors and step-level rewards.

A problem is a chain: a starter step combines two given numbers, then each further step
applies one operation to the running quantity (add, take away, multiply, share equally,
take a percentage, convert units, price it ...). The running quantity has a kind (items,
money, time, distance, material, fuel) that decides which operations make sense next and
how they are phrased. All operands are chosen so that every result is a non-negative
integer.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from deepsynapse.data.problems import Problem

__all__ = [
    "HELDOUT_SHARE",
    "HELDOUT_SIZE",
    "MAX_DIFFICULTY",
    "VARIANTS",
    "check_variant_kinds",
    "generate_problems",
    "heldout_problems",
    "is_heldout",
    "training_problems",
]

MAX_DIFFICULTY = 6
_LIMIT = 50_000  # largest intermediate value; keeps numbers in a plausible range
_PERCENTS = (10, 20, 25, 30, 40, 50, 60, 75, 80, 90)


@dataclass(frozen=True, slots=True)
class _Person:
    name: str
    he: str
    his: str


@dataclass(frozen=True, slots=True)
class _Item:
    plural: str
    container: str  # plural
    container_one: str
    sizes: tuple[int, ...]
    food: bool
    adjectives: tuple[str, ...]
    price: tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Per:
    """The group that a per-group quantity refers to ("each friend", "each bag")."""

    one: str
    many: str
    animate: bool
    count: int  # how many groups share
    base: int  # the share as first computed; summing it back up would be pointless


_NAMES = tuple(
    _Person(name, *(("he", "his") if gender == "m" else ("she", "her")))
    for name, gender in (
        ("Tom", "m"), ("Anna", "f"), ("Liam", "m"), ("Maya", "f"), ("Noah", "m"),
        ("Sofia", "f"), ("Ethan", "m"), ("Chloe", "f"), ("Lucas", "m"), ("Priya", "f"),
        ("Omar", "m"), ("Hana", "f"), ("Diego", "m"), ("Grace", "f"), ("Kenji", "m"),
        ("Fatima", "f"), ("Jack", "m"), ("Elena", "f"), ("Samir", "m"), ("Olivia", "f"),
        ("Mateo", "m"), ("Zoe", "f"), ("Ben", "m"), ("Aisha", "f"), ("Leo", "m"),
        ("Mia", "f"), ("Ravi", "m"), ("Lucy", "f"), ("Felix", "m"), ("Nora", "f"),
        ("Carlos", "m"), ("Ines", "f"), ("Jamal", "m"), ("Yuki", "f"), ("Owen", "m"),
        ("Amara", "f"),
    )
)  # fmt: skip

_ITEMS = (
    _Item("pencils", "packs", "pack", (6, 8, 10, 12, 24), False, ("red", "blue"), (1, 3)),
    _Item("apples", "bags", "bag", (4, 5, 6, 8, 10), True, ("green", "red"), (1, 2)),
    _Item("stickers", "sheets", "sheet", (8, 10, 12, 20, 25), False, ("shiny", "gold"), (1, 2)),
    _Item("marbles", "jars", "jar", (10, 12, 15, 20, 25), False, ("blue", "glass"), (1, 2)),
    _Item("cookies", "boxes", "box", (6, 8, 12, 16, 24), True, ("chocolate", "oatmeal"), (1, 3)),
    _Item("eggs", "cartons", "carton", (6, 12, 18), True, ("brown", "white"), (1, 2)),
    _Item("cupcakes", "trays", "tray", (6, 12, 24), True, ("vanilla", "lemon"), (2, 5)),
    _Item("crayons", "boxes", "box", (8, 16, 24, 32), False, ("green", "purple"), (1, 2)),
    _Item("trading cards", "packs", "pack", (5, 8, 10, 12), False, ("rare", "holographic"), (1, 4)),
    _Item("tomatoes", "baskets", "basket", (10, 12, 15, 20), True, ("ripe", "cherry"), (1, 2)),
    _Item("books", "boxes", "box", (4, 5, 6, 8, 10), False, ("hardcover", "mystery"), (4, 15)),
    _Item("balloons", "bags", "bag", (10, 12, 20, 25), False, ("pink", "silver"), (1, 2)),
    _Item("roses", "bunches", "bunch", (6, 10, 12), False, ("red", "white"), (2, 4)),
    _Item("seashells", "buckets", "bucket", (10, 15, 20, 25), False, ("pink", "spiral"), (1, 2)),
    _Item("muffins", "boxes", "box", (4, 6, 12), True, ("blueberry", "banana"), (2, 4)),
    _Item("toy cars", "boxes", "box", (4, 5, 6, 10), False, ("red", "electric"), (3, 9)),
)
_THINGS = (
    "a new backpack", "lunch", "a movie ticket", "a gift for a friend", "art supplies",
    "a board game", "groceries", "a pair of socks", "bus fare", "a notebook",
)  # fmt: skip
_JOBS = (
    "babysitting", "walking dogs", "mowing lawns", "tutoring", "washing cars",
    "working at a cafe", "delivering newspapers",
)  # fmt: skip
_HOBBIES = (
    "reading", "practicing piano", "drawing", "studying", "gardening", "playing chess",
    "doing yoga",
)  # fmt: skip
_STUFF = ("flour", "rice", "sugar", "potatoes", "dog food", "sand", "clay")
_LENGTHY = ("ribbon", "rope", "fabric", "yarn", "wire")
# (verb, base verb, unit, speed range, per-hour phrase)
_TRAVEL = (
    ("drives", "drive", "miles", (30, 70), "miles per hour"),
    ("drives", "drive", "kilometers", (40, 100), "kilometers per hour"),
    ("cycles", "cycle", "kilometers", (10, 25), "kilometers per hour"),
    ("walks", "walk", "miles", (2, 5), "miles per hour"),
)


@dataclass(frozen=True, slots=True)
class _State:
    """The running quantity of a problem and everything needed to phrase the next step."""

    value: int
    kind: str  # items | money | time | distance | material | fuel
    unit: str  # plural noun or unit word: "red pencils", "dollars", "minutes", "miles"
    owner: _Person
    question: str
    mode: str = ""  # money: has/earned/spent; time: activity; distance: verb; material: stuff
    base_verb: str = ""  # distance only: "drive"
    item: _Item | None = None
    per: _Per | None = None
    used: frozenset[str] = frozenset()
    speed: int = 0  # distance: known speed, if any


@dataclass(frozen=True, slots=True)
class _Step:
    text: str  # sentence(s) added to the question; may be empty for pure conversions
    line: str  # one line of the worked solution
    state: _State


class _Ctx:
    """Random choices shared by the steps of one problem (keeps names distinct)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.people: list[_Person] = []

    def person(self) -> _Person:
        taken = {p.name for p in self.people}
        free = [p for p in _NAMES if p.name not in taken] or list(_NAMES)
        person = self.rng.choice(free)
        self.people.append(person)
        return person

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(list(options))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _amount(state: _State, value: int) -> str:
    """A value with its unit, phrased for the state's kind ("$12", "12 red pencils")."""
    if state.kind == "money":
        return f"${value}"
    if state.kind == "material" and state.mode:
        return f"{value} {state.unit} of {state.mode}"
    if state.kind == "time" and state.mode and state.per is None:
        return f"{value} {state.unit} {state.mode}"
    return f"{value} {state.unit}"


def _how_much(state: _State) -> str:
    if state.kind == "money":
        return "How much money"
    if state.kind == "material" and state.mode:
        return f"How many {state.unit} of {state.mode}"
    return f"How many {state.unit}"


def _divisors(value: int, low: int, high: int) -> list[int]:
    return [d for d in range(low, high + 1) if value % d == 0 and value // d >= 1]


# --------------------------------------------------------------------------- starters


def _start_groups(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    k, size = c.rng.randint(2, 9), c.rng.choice(item.sizes)
    r = k * size
    text = c.pick(
        (
            f"{o.name} buys {k} {item.container} of {item.plural}. "
            f"Each {item.container_one} has {size} {item.plural}.",
            f"{o.name} has {k} {item.container} with {size} {item.plural} in each.",
            f"A {item.container_one} holds {size} {item.plural}. "
            f"{o.name} fills {k} {item.container}.",
        )
    )
    line = (
        f"{o.name} has {k} {item.container} of {size} {item.plural}, "
        f"so {o.he} has {k} * {size} = {r} {item.plural}."
    )
    q = f"How many {item.plural} does {o.name} have?"
    return _Step(text, line, _State(r, "items", item.plural, o, q, item=item))


def _start_more(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    a, b = c.rng.randint(5, 60), c.rng.randint(2, 40)
    how = c.pick(
        (
            f"buys {b} more at the store",
            f"gets {b} more from {c.person().name}",
            f"finds {b} more",
            f"wins {b} more at a fair",
        )
    )
    text = f"{o.name} has {a} {item.plural}. {_cap(o.he)} {how}."
    line = f"{o.name} has {a} + {b} = {a + b} {item.plural}."
    q = f"How many {item.plural} does {o.name} have now?"
    return _Step(text, line, _State(a + b, "items", item.plural, o, q, item=item))


def _start_fewer(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    a = c.rng.randint(20, 90)
    b = c.rng.randint(2, a - 5)
    verbs = [f"gave {b} of them to {c.person().name}", f"lost {b} of them"]
    verbs.append(f"ate {b} of them" if item.food else f"sold {b} of them")
    text = f"{o.name} had {a} {item.plural}, but {o.he} {c.pick(verbs)}."
    line = f"{o.name} has {a} - {b} = {a - b} {item.plural} left."
    q = f"How many {item.plural} does {o.name} have left?"
    return _Step(text, line, _State(a - b, "items", item.plural, o, q, item=item))


def _start_percent(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    pct = c.rng.choice(_PERCENTS)
    step = 100 // _gcd(pct, 100)
    total = step * c.rng.randint(max(2, 10 // step), max(3, 200 // step))
    adj = c.rng.choice(item.adjectives)
    r = total * pct // 100
    text = c.pick(
        (
            f"{o.name} has {total} {item.plural}. {pct}% of them are {adj}.",
            f"Of the {total} {item.plural} that {o.name} owns, {pct}% are {adj}.",
        )
    )
    line = f"{o.name} has {total} * {pct} / 100 = {r} {adj} {item.plural}."
    q = f"How many {adj} {item.plural} does {o.name} have?"
    state = _State(r, "items", f"{adj} {item.plural}", o, q, item=item, used=frozenset({"pct"}))
    return _Step(text, line, state)


def _start_share(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    k = c.rng.randint(2, 8)
    total = k * c.rng.randint(2, 15)
    per = _Per("friend", "friends", True, k, total // k)
    text = c.pick(
        (
            f"{o.name} has {total} {item.plural} and shares them equally among {k} friends.",
            f"{o.name} splits {total} {item.plural} equally between {k} friends.",
        )
    )
    line = f"Each friend gets {total} / {k} = {total // k} {item.plural}."
    q = f"How many {item.plural} does each friend get?"
    return _Step(text, line, _State(total // k, "items", item.plural, o, q, item=item, per=per))


def _start_wage(c: _Ctx) -> _Step:
    o, job = c.person(), c.pick(_JOBS)
    rate, hours = c.rng.randint(8, 25), c.rng.randint(2, 30)
    text = c.pick(
        (
            f"{o.name} earns ${rate} an hour {job}. This week {o.he} works {hours} hours.",
            f"{o.name} works {hours} hours {job} and is paid ${rate} per hour.",
        )
    )
    line = f"{o.name} earns {rate} * {hours} = ${rate * hours}."
    q = f"How much money does {o.name} earn?"
    return _Step(text, line, _State(rate * hours, "money", "dollars", o, q, mode="earned"))


def _start_purchase(c: _Ctx) -> _Step:
    o, item = c.person(), c.rng.choice(_ITEMS)
    n, price = c.rng.randint(2, 12), c.rng.randint(*item.price)
    text = c.pick(
        (
            f"{o.name} buys {n} {item.plural} for ${price} each.",
            f"{item.plural.capitalize()} cost ${price} each, and {o.name} buys {n} of them.",
        )
    )
    line = f"{o.name} spends {n} * {price} = ${n * price}."
    q = f"How much money does {o.name} spend?"
    return _Step(text, line, _State(n * price, "money", "dollars", o, q, mode="spent"))


def _start_savings(c: _Ctx) -> _Step:
    o = c.person()
    a, b = c.rng.randint(10, 200), c.rng.randint(5, 100)
    text = c.pick(
        (
            f"{o.name} has saved ${a}. For {o.his} birthday {o.he} gets ${b} more.",
            f"{o.name} has ${a} in a piggy bank and adds ${b} from chores.",
        )
    )
    line = f"{o.name} has {a} + {b} = ${a + b}."
    q = f"How much money does {o.name} have now?"
    return _Step(text, line, _State(a + b, "money", "dollars", o, q, mode="has"))


def _start_daily_time(c: _Ctx) -> _Step:
    o, hobby = c.person(), c.pick(_HOBBIES)
    m, d = 5 * c.rng.randint(2, 12), c.rng.randint(2, 7)
    text = c.pick(
        (
            f"{o.name} spends {m} minutes {hobby} every day for {d} days.",
            f"For {d} days in a row, {o.name} spends {m} minutes a day {hobby}.",
        )
    )
    line = f"{o.name} spends {m} * {d} = {m * d} minutes {hobby}."
    q = f"How many minutes does {o.name} spend {hobby}?"
    return _Step(text, line, _State(m * d, "time", "minutes", o, q, mode=hobby))


def _start_episodes(c: _Ctx) -> _Step:
    o = c.person()
    k, m = c.rng.randint(2, 8), c.rng.choice((20, 22, 25, 30, 40, 45, 50, 60))
    show = c.pick(("a cooking show", "a cartoon", "a documentary series", "a podcast"))
    verb = "listens to" if show == "a podcast" else "watches"
    activity = "listening" if show == "a podcast" else "watching"
    text = f"{o.name} {verb} {k} episodes of {show}. Each episode is {m} minutes long."
    line = f"{o.name} spends {k} * {m} = {k * m} minutes {activity}."
    q = f"How many minutes does {o.name} spend {activity}?"
    return _Step(text, line, _State(k * m, "time", "minutes", o, q, mode=activity))


def _start_work_hours(c: _Ctx) -> _Step:
    o, job = c.person(), c.pick(_JOBS)
    h, d = c.rng.randint(2, 8), c.rng.randint(2, 6)
    text = f"{o.name} spends {h} hours a day {job} for {d} days."
    line = f"{o.name} spends {h} * {d} = {h * d} hours {job}."
    q = f"How many hours does {o.name} spend {job}?"
    state = _State(h * d, "time", "hours", o, q, mode=job, used=frozenset({"paid"}))
    return _Step(text, line, state)


def _start_travel(c: _Ctx) -> _Step:
    o = c.person()
    verb, base, unit, (lo, hi), per_hour = c.rng.choice(_TRAVEL)
    speed, hours = c.rng.randint(lo, hi), c.rng.randint(2, 6)
    text = c.pick(
        (
            f"{o.name} {verb} at {speed} {per_hour} for {hours} hours.",
            f"For {hours} hours, {o.name} {verb} at a steady {speed} {per_hour}.",
        )
    )
    line = f"{o.name} {verb} {speed} * {hours} = {speed * hours} {unit}."
    q = f"How many {unit} does {o.name} {base}?"
    state = _State(speed * hours, "distance", unit, o, q, mode=verb, base_verb=base, speed=speed)
    return _Step(text, line, state)


def _start_laps(c: _Ctx) -> _Step:
    o = c.person()
    k, m = c.rng.randint(2, 12), c.rng.choice((200, 250, 400, 500))
    verb, base = c.rng.choice((("runs", "run"), ("swims", "swim"), ("skates", "skate")))
    place = "pool" if verb == "swims" else "track"
    text = f"{o.name} {verb} {k} laps of a {m}-meter {place}."
    line = f"{o.name} {verb} {k} * {m} = {k * m} meters."
    q = f"How many meters does {o.name} {base}?"
    state = _State(k * m, "distance", "meters", o, q, mode=verb, base_verb=base)
    return _Step(text, line, state)


def _start_bags(c: _Ctx) -> _Step:
    o, stuff = c.person(), c.pick(_STUFF)
    k, w = c.rng.randint(2, 9), c.rng.choice((2, 3, 4, 5, 10, 12, 15, 20, 25))
    text = c.pick(
        (
            f"{o.name} buys {k} bags of {stuff}. Each bag weighs {w} kilograms.",
            f"{o.name} orders {k} sacks of {stuff} that weigh {w} kilograms each.",
        )
    )
    line = f"{o.name} has {k} * {w} = {k * w} kilograms of {stuff}."
    q = f"How many kilograms of {stuff} does {o.name} have?"
    return _Step(text, line, _State(k * w, "material", "kilograms", o, q, mode=stuff))


def _start_rolls(c: _Ctx) -> _Step:
    o, stuff = c.person(), c.pick(_LENGTHY)
    k, m = c.rng.randint(2, 8), c.rng.choice((3, 4, 5, 6, 8, 10, 12, 15, 20))
    text = c.pick(
        (
            f"{o.name} buys {k} rolls of {stuff}. Each roll is {m} meters long.",
            f"{o.name} has {k} pieces of {stuff} that are each {m} meters long.",
        )
    )
    line = f"{o.name} has {k} * {m} = {k * m} meters of {stuff}."
    q = f"How many meters of {stuff} does {o.name} have?"
    return _Step(text, line, _State(k * m, "material", "meters", o, q, mode=stuff))


def _start_cut(c: _Ctx) -> _Step:
    o, stuff = c.person(), c.pick(_LENGTHY)
    size, count = c.rng.choice((5, 10, 12, 15, 20, 25, 30)), c.rng.randint(3, 20)
    total = size * count
    text = (
        f"{o.name} has a piece of {stuff} that is {total} centimeters long. "
        f"{_cap(o.he)} cuts it into pieces that are {size} centimeters long."
    )
    line = f"{o.name} cuts {total} / {size} = {count} pieces."
    q = f"How many pieces does {o.name} cut?"
    return _Step(text, line, _State(count, "items", f"pieces of {stuff}", o, q))


_STARTERS: tuple[Callable[[_Ctx], _Step], ...] = (
    _start_groups,
    _start_more,
    _start_fewer,
    _start_percent,
    _start_share,
    _start_wage,
    _start_purchase,
    _start_savings,
    _start_daily_time,
    _start_episodes,
    _start_work_hours,
    _start_travel,
    _start_laps,
    _start_bags,
    _start_rolls,
    _start_cut,
)

# ---------------------------------------------------------------------- continuations
# Each takes (ctx, state, is_last) and returns a step, or None when it does not apply.

_Op = Callable[[_Ctx, _State, bool], "_Step | None"]


def _op_add(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None:
        return None
    o, v = s.owner, s.value
    b = (
        c.rng.randint(2, 30)
        if s.kind != "distance" or s.unit != "meters"
        else 100 * c.rng.randint(1, 9)
    )
    r = v + b
    if s.kind == "items":
        text = c.pick(
            (
                f"{o.name} then buys {b} more {s.unit}.",
                f"Later, {c.person().name} gives {o.name} {b} more {s.unit}.",
                f"The next day {o.name} gets {b} more {s.unit}.",
            )
        )
        line = f"{o.name} now has {v} + {b} = {r} {s.unit}."
        q = f"How many {s.unit} does {o.name} have now?"
    elif s.kind == "money" and s.mode == "spent":
        text = f"{o.name} also spends ${b} on {c.pick(_THINGS)}."
        line = f"{o.name} spends {v} + {b} = ${r} in total."
        q = f"How much money does {o.name} spend in total?"
    elif s.kind == "money":
        text = c.pick(
            (
                f"{o.name} then earns ${b} more doing chores.",
                f"{_cap(o.his)} grandmother gives {o.name} another ${b}.",
                f"{o.name} finds ${b} more in {o.his} coat pocket.",
            )
        )
        line = f"{o.name} now has {v} + {b} = ${r}."
        q = f"How much money does {o.name} have now?"
        s = replace(s, mode="has")
    elif s.kind == "time":
        text = f"{o.name} then spends another {b} {s.unit} {s.mode}."
        line = f"{o.name} spends {v} + {b} = {r} {s.unit} {s.mode} in total."
        q = f"How many {s.unit} does {o.name} spend {s.mode} in total?"
    elif s.kind == "distance":
        text = f"After a break, {o.name} {s.mode} another {b} {s.unit}."
        line = f"{o.name} {s.mode} {v} + {b} = {r} {s.unit} in total."
        q = f"How many {s.unit} does {o.name} {s.base_verb} in total?"
    elif s.kind == "material":
        text = f"{o.name} then buys another {b} {s.unit} of {s.mode}."
        line = f"{o.name} now has {v} + {b} = {r} {s.unit} of {s.mode}."
        q = f"How many {s.unit} of {s.mode} does {o.name} have now?"
    else:
        return None
    return _Step(text, line, replace(s, value=r, question=q))


def _op_take(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.value < 4 or s.kind in ("distance", "fuel", "time"):
        return None
    o, v = s.owner, s.value
    b = c.rng.randint(2, min(v - 2, v // 2 + 5))
    r = v - b
    if s.kind == "items":
        verbs = [f"gives {b} of the {s.unit} to {c.person().name}", f"loses {b} of the {s.unit}"]
        verbs.append(
            f"eats {b} of the {s.unit}" if s.item and s.item.food else f"sells {b} of them"
        )
        text = f"{o.name} {c.pick(verbs)}."
        line = f"{o.name} has {v} - {b} = {r} {s.unit} left."
        q = f"How many {s.unit} does {o.name} have left?"
    elif s.kind == "money" and s.mode == "spent":
        text = f"{o.name} has a coupon for ${b} off."
        line = f"{o.name} pays {v} - {b} = ${r}."
        q = f"How much money does {o.name} pay?"
    elif s.kind == "money":
        text = f"{o.name} spends ${b} on {c.pick(_THINGS)}."
        line = f"{o.name} has {v} - {b} = ${r} left."
        q = f"How much money does {o.name} have left?"
        s = replace(s, mode="has")
    elif s.kind == "material":
        if s.unit in ("meters", "centimeters"):
            use = c.pick(("to wrap presents", "for a craft project", "to fix a fence"))
        else:
            use = c.pick(("to bake bread", "for a project", "in the garden", "for a party"))
        text = f"{o.name} uses {b} {s.unit} of the {s.mode} {use}."
        line = f"{o.name} has {v} - {b} = {r} {s.unit} of {s.mode} left."
        q = f"How many {s.unit} of {s.mode} does {o.name} have left?"
    else:
        return None
    return _Step(text, line, replace(s, value=r, question=q))


def _op_times(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind not in ("items", "money", "time", "distance", "material"):
        return None
    k = c.rng.randint(2, 5)
    v, r = s.value, s.value * k
    if r > _LIMIT:
        return None
    o = s.owner
    if s.kind in ("time", "distance"):
        if "repeat" in s.used:
            return None
        period = c.pick(("days", "weeks"))
        if s.kind == "distance" and s.unit != "meters" and k == 2:
            text = f"{o.name} then makes the same trip back."
        else:
            text = f"{o.name} does the same thing every {period[:-1]} for {k} {period}."
        line = f"In total that is {k} * {v} = {_amount(s, r)}."
        verb = s.base_verb if s.kind == "distance" else f"spend {s.mode}"
        q = f"How many {s.unit} does {o.name} {verb} altogether?"
        return _Step(text, line, replace(s, value=r, question=q, used=s.used | {"repeat"}))
    f = c.person()
    times = "twice" if k == 2 else f"{k} times"
    if s.kind == "items":
        text = f"{f.name} has {times} as many {s.unit} as {o.name}."
        line = f"{f.name} has {k} * {v} = {r} {s.unit}."
        q = f"How many {s.unit} does {f.name} have?"
    elif s.kind == "money":
        verb = {"spent": "spends", "earned": "earns"}.get(s.mode, "has")
        text = f"{f.name} {verb} {times} as much money as {o.name}."
        line = f"{f.name} {verb} {k} * {v} = ${r}."
        q = f"How much money does {f.name} {verb.removesuffix('s')}?"
        if verb == "has":
            q = f"How much money does {f.name} have?"
    else:  # material
        text = f"{f.name} buys {times} as much {s.mode} as {o.name}."
        line = f"{f.name} buys {k} * {v} = {r} {s.unit} of {s.mode}."
        q = f"How many {s.unit} of {s.mode} does {f.name} buy?"
    return _Step(text, line, replace(s, value=r, owner=f, question=q))


def _op_half(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind not in ("items", "money") or s.value % 2 or s.value < 4:
        return None
    o, f, v, r = s.owner, c.person(), s.value, s.value // 2
    if s.kind == "items":
        text = f"{f.name} has half as many {s.unit} as {o.name}."
        line = f"{f.name} has {v} / 2 = {r} {s.unit}."
        q = f"How many {s.unit} does {f.name} have?"
    else:
        verb = {"spent": "spends", "earned": "earns"}.get(s.mode, "has")
        text = f"{f.name} {verb} half as much money as {o.name}."
        line = f"{f.name} {verb} {v} / 2 = ${r}."
        base = "have" if verb == "has" else verb.removesuffix("s")
        q = f"How much money does {f.name} {base}?"
    return _Step(text, line, replace(s, value=r, owner=f, question=q))


def _op_share(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind in ("fuel", "distance"):
        return None
    if s.kind == "material" and s.unit not in ("kilograms", "grams"):
        return None
    options = _divisors(s.value, 2, 10)
    options = [k for k in options if s.value // k >= 2]
    if not options:
        return None
    k = c.rng.choice(options)
    o, v, r = s.owner, s.value, s.value // k
    if s.kind == "items":
        per = c.rng.choice(
            (_Per("friend", "friends", True, k, r), _Per("bag", "bags", False, k, r))
        )
        if per.animate:
            text = f"{o.name} shares the {s.unit} equally among {k} friends."
            q = f"How many {s.unit} does each friend get?"
        else:
            text = f"{o.name} puts the {s.unit} into {k} bags, with the same number in each bag."
            q = f"How many {s.unit} are in each bag?"
        line = f"Each {per.one} gets {v} / {k} = {r} {s.unit}."
    elif s.kind == "money" and s.mode == "spent":
        per = _Per("person", "people", True, k, r)
        text = f"{o.name} splits the cost equally among the {k} people in {o.his} group."
        line = f"Each person pays {v} / {k} = ${r}."
        q = "How much money does each person pay?"
    elif s.kind == "money":
        group = c.rng.choice(
            (("cousin", "cousins"), ("friend", "friends"), ("sibling", "siblings"))
        )
        per = _Per(group[0], group[1], True, k, r)
        text = f"{o.name} divides the money equally among {k} {per.many}."
        line = f"Each {per.one} gets {v} / {k} = ${r}."
        q = f"How much money does each {per.one} get?"
    elif s.kind == "time":
        per = _Per("session", "sessions", False, k, r)
        text = f"{o.name} splits this time into {k} equal sessions."
        line = f"Each session is {v} / {k} = {r} {s.unit} long."
        q = f"How many {s.unit} long is each session?"
    else:  # material
        per = _Per("container", "containers", False, k, r)
        text = f"{o.name} divides the {s.mode} equally into {k} containers."
        line = f"Each container holds {v} / {k} = {r} {s.unit} of {s.mode}."
        q = f"How many {s.unit} of {s.mode} are in each container?"
    return _Step(text, line, replace(s, value=r, per=per, question=q))


def _op_per_change(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Add to or take from every share alike (the usual way a per-group quantity evolves)."""
    per = s.per
    if per is None:
        return None
    o, v = s.owner, s.value
    take = v >= 4 and c.rng.random() < 0.5
    b = c.rng.randint(2, min(v - 2, v // 2 + 5)) if take else c.rng.randint(2, 12)
    r = v - b if take else v + b
    plain = replace(s, per=None, mode="" if s.kind == "time" else s.mode)
    amount = _amount(plain, b)
    more = f"${b} more" if s.kind == "money" else _amount(plain, b).replace(" ", " more ", 1)
    if per.animate and s.kind == "money" and s.mode == "spent":
        text = (
            f"Each person gets ${b} back from a refund."
            if take
            else f"Each person also pays ${b} for {c.pick(_THINGS)}."
        )
    elif per.animate:
        if take:
            text = (
                f"Each {per.one} then {'spends' if s.kind == 'money' else 'gives away'} {amount}."
            )
        else:
            text = f"Each {per.one} then gets {more} from {c.person().name}."
    else:
        text = (
            f"{o.name} then takes {amount} out of each {per.one}."
            if take
            else f"{o.name} then adds {more} to each {per.one}."
        )
    sign = "-" if take else "+"
    line = f"Each {per.one} now has {v} {sign} {b} = {_amount(s, r)}."
    if s.kind == "time":
        line = f"Each {per.one} is now {v} {sign} {b} = {r} {s.unit} long."
    elif s.kind == "money" and s.mode == "spent":
        line = f"Each person pays {v} {sign} {b} = ${r}."
    if per.animate:
        q = f"{_how_much(s)} does each {per.one} have {'left' if take else 'now'}?"
        if s.kind == "money" and s.mode == "spent":
            q = "How much money does each person pay in the end?"
    elif s.kind == "time":
        q = f"How many {s.unit} long is each session now?"
    else:
        q = f"{_how_much(s)} are in each {per.one} now?"
    return _Step(text, line, replace(s, value=r, question=q))


def _op_per_total(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Back from one share to all shares; only as a last step (the owner changes)."""
    per = s.per
    if per is None or not last or s.kind == "time" or s.value == per.base:
        return None
    r = s.value * per.count
    if s.kind == "money" and s.mode == "spent":
        line = f"The {per.count} {per.many} pay {per.count} * {s.value} = ${r} in total."
        q = f"How much money do the {per.count} {per.many} pay altogether?"
    elif per.animate:
        line = f"The {per.count} {per.many} have {per.count} * {s.value} = {_amount(s, r)}."
        q = f"{_how_much(s)} do the {per.count} {per.many} have altogether?"
    else:
        line = f"The {per.count} {per.many} hold {per.count} * {s.value} = {_amount(s, r)}."
        q = f"{_how_much(s)} are in all {per.count} {per.many} together?"
    return _Step("", line, replace(s, value=r, per=None, question=q))


def _op_per_sell(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Each recipient sells their share: per-person items become per-person money."""
    per = s.per
    if per is None or not per.animate or s.kind != "items":
        return None
    price = c.rng.randint(2, 9)
    r = s.value * price
    text = f"Each {per.one} sells their {s.unit} for ${price} each."
    line = f"Each {per.one} earns {s.value} * {price} = ${r}."
    q = f"How much money does each {per.one} earn?"
    new_per = replace(per, base=-1)
    new = _State(r, "money", "dollars", s.owner, q, mode="earned", per=new_per, used=s.used)
    return _Step(text, line, new)


def _op_percent(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or "pct" in s.used or s.kind not in ("items", "money"):
        return None
    if s.kind == "items" and s.item is None:
        return None
    options = [p for p in _PERCENTS if s.value * p % 100 == 0 and s.value * p // 100 >= 1]
    if not options:
        return None
    pct = c.rng.choice(options)
    o, v, r = s.owner, s.value, s.value * pct // 100
    used = s.used | {"pct"}
    if s.kind == "items":
        assert s.item is not None
        adj = c.rng.choice(s.item.adjectives)
        unit = f"{adj} {s.unit}"
        text = f"{pct}% of {o.name}'s {s.unit} are {adj}."
        line = f"{o.name} has {v} * {pct} / 100 = {r} {unit}."
        q = f"How many {unit} does {o.name} have?"
        return _Step(text, line, replace(s, value=r, unit=unit, question=q, used=used))
    if s.mode == "spent":
        if not last:
            return None
        text = f"{o.name} leaves a {pct}% tip on top of that."
        line = f"The tip is {v} * {pct} / 100 = ${r}."
        q = "How much money is the tip?"
        return _Step(text, line, replace(s, value=r, question=q, used=used))
    text = c.pick(
        (
            f"{o.name} saves {pct}% of the money.",
            f"{o.name} puts {pct}% of it into a savings account.",
        )
    )
    line = f"{o.name} saves {v} * {pct} / 100 = ${r}."
    q = f"How much money does {o.name} save?"
    return _Step(text, line, replace(s, value=r, question=q, used=used, mode="has"))


def _op_pack(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind != "items" or s.item is None:
        return None
    options = [size for size in (*s.item.sizes, 2, 3, 4, 5) if s.value % size == 0]
    options = [size for size in options if s.value // size >= 2]
    if not options:
        return None
    size, o, item = c.rng.choice(options), s.owner, s.item
    r = s.value // size
    text = f"{o.name} packs the {s.unit} into {item.container} of {size}."
    line = f"{o.name} fills {s.value} / {size} = {r} {item.container}."
    q = f"How many {item.container} does {o.name} fill?"
    return _Step(text, line, replace(s, value=r, unit=item.container, item=None, question=q))


def _op_sell(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind not in ("items", "material"):
        return None
    price = c.rng.randint(1, 6) if s.kind == "material" else c.rng.randint(1, 9)
    o, v, r = s.owner, s.value, s.value * price
    if r > _LIMIT:
        return None
    if s.kind == "items":
        text = c.pick(
            (
                f"{o.name} sells each of the {s.unit} for ${price}.",
                f"At a market, {o.name} sells all the {s.unit} for ${price} each.",
            )
        )
    else:
        text = f"{o.name} sells all of the {s.mode} for ${price} per {s.unit[:-1]}."
    line = f"{o.name} earns {v} * {price} = ${r}."
    q = f"How much money does {o.name} earn?"
    return _Step(text, line, _State(r, "money", "dollars", o, q, mode="earned", used=s.used))


def _op_buy(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind != "money" or s.mode == "spent":
        return None
    item = c.rng.choice(_ITEMS)
    options = [p for p in range(2, 51) if s.value % p == 0 and 2 <= s.value // p <= 500]
    if not options:
        return None
    price, o = c.rng.choice(options), s.owner
    r = s.value // price
    text = f"{o.name} spends all of the money on {item.plural} that cost ${price} each."
    line = f"{o.name} buys {s.value} / {price} = {r} {item.plural}."
    q = f"How many {item.plural} does {o.name} buy?"
    return _Step(text, line, _State(r, "items", item.plural, o, q, item=item, used=s.used))


def _op_change(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if not last or s.per is not None or s.kind != "money" or s.mode != "spent":
        return None
    bill = next(b for b in (10, 20, 50, 100, 200, 500, 1000, 10**9) if b > s.value)
    if bill > 1000:
        bill = 1000 * (s.value // 1000 + 1)
    o, r = s.owner, bill - s.value
    text = f"{o.name} pays with a ${bill} bill."
    line = f"{o.name} gets {bill} - {s.value} = ${r} in change."
    q = f"How much change does {o.name} get?"
    return _Step(text, line, replace(s, value=r, question=q))


def _op_hours(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Convert minutes to hours (only when exact) or hours to minutes."""
    if s.per is not None or s.kind != "time" or "conv" in s.used:
        return None
    if s.unit == "minutes":
        if s.value % 60:
            return None
        r, unit, line = s.value // 60, "hours", f"That is {s.value} / 60 = {s.value // 60} hours."
    else:
        r, unit = s.value * 60, "minutes"
        line = f"That is {s.value} * 60 = {r} minutes."
    q = f"How many {unit} does {s.owner.name} spend {s.mode} in total?"
    new = replace(s, value=r, unit=unit, question=q, used=s.used | {"conv"})
    return _Step("", line, new)


def _op_paid(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Hours worked times an hourly rate; only for paid work."""
    if s.per is not None or s.kind != "time" or s.unit != "hours" or "paid" not in s.used:
        return None
    rate, o = c.rng.randint(8, 25), s.owner
    r = s.value * rate
    text = f"{o.name} is paid ${rate} for every hour of {s.mode}."
    line = f"{o.name} earns {s.value} * {rate} = ${r}."
    q = f"How much money does {o.name} earn?"
    return _Step(text, line, _State(r, "money", "dollars", o, q, mode="earned"))


def _op_fuel(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind != "distance" or s.mode != "drives":
        return None
    options = [m for m in range(10, 41) if s.value % m == 0 and s.value // m >= 2]
    if not options:
        return None
    m, o = c.rng.choice(options), s.owner
    r = s.value // m
    text = f"{o.name}'s car goes {m} {s.unit} on one gallon of gas."
    line = f"{o.name} uses {s.value} / {m} = {r} gallons of gas."
    q = f"How many gallons of gas does {o.name} use?"
    return _Step(text, line, _State(r, "fuel", "gallons", o, q, used=s.used))


def _op_gas_price(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.kind != "fuel":
        return None
    price, o = c.rng.randint(3, 6), s.owner
    text = f"Gas costs ${price} per gallon."
    line = f"The gas costs {s.value} * {price} = ${s.value * price}."
    q = f"How much money does {o.name} spend on gas?"
    return _Step(text, line, _State(s.value * price, "money", "dollars", o, q, mode="spent"))


def _op_travel_time(c: _Ctx, s: _State, last: bool) -> _Step | None:
    if s.per is not None or s.kind != "distance" or s.speed or s.unit == "meters":
        return None
    options = [v for v in range(2, 81) if s.value % v == 0 and 2 <= s.value // v <= 24]
    if not options:
        return None
    speed, f = c.rng.choice(options), c.person()
    r = s.value // speed
    text = f"{f.name} {s.mode} the same distance at {speed} {s.unit} per hour."
    line = f"It takes {f.name} {s.value} / {speed} = {r} hours."
    q = f"How many hours does it take {f.name}?"
    activity = {"drives": "driving", "cycles": "cycling", "walks": "walking"}.get(s.mode, "")
    return _Step(text, line, _State(r, "time", "hours", f, q, mode=activity, used=s.used))


def _op_metric(c: _Ctx, s: _State, last: bool) -> _Step | None:
    """Metric conversions: meters -> kilometers (exact only), kg -> g, m -> cm."""
    if s.per is not None or "conv" in s.used:
        return None
    if s.kind == "distance" and s.unit == "meters" and s.value % 1000 == 0:
        r, unit = s.value // 1000, "kilometers"
        line = f"That is {s.value} / 1000 = {r} kilometers."
    elif s.kind == "material" and s.unit == "kilograms" and s.value <= 50:
        r, unit = s.value * 1000, "grams"
        line = f"That is {s.value} * 1000 = {r} grams of {s.mode}."
    elif s.kind == "material" and s.unit == "meters" and s.value <= 200:
        r, unit = s.value * 100, "centimeters"
        line = f"That is {s.value} * 100 = {r} centimeters of {s.mode}."
    else:
        return None
    q = s.question.replace(s.unit, unit, 1)
    return _Step("", line, replace(s, value=r, unit=unit, question=q, used=s.used | {"conv"}))


_OPS: tuple[_Op, ...] = (
    _op_add,
    _op_take,
    _op_times,
    _op_half,
    _op_share,
    _op_per_change,
    _op_per_total,
    _op_per_sell,
    _op_percent,
    _op_pack,
    _op_sell,
    _op_buy,
    _op_change,
    _op_hours,
    _op_paid,
    _op_fuel,
    _op_gas_price,
    _op_travel_time,
    _op_metric,
)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _op_name(op: Callable[..., object]) -> str:
    return op.__name__.removeprefix("_op_")


def _try_chain(c: _Ctx, steps: int) -> tuple[list[_Step], list[str]] | None:
    """One attempt at a chain of ``steps`` steps; None if it paints itself into a corner."""
    starter = c.rng.choice(_STARTERS)
    chain, names = [starter(c)], [starter.__name__.removeprefix("_start_")]
    while len(chain) < steps:
        state = chain[-1].state
        is_last = len(chain) == steps - 1
        # Weighted random order: operations already used in this chain are tried later,
        # so long chains mix operations instead of repeating one.
        ops = sorted(
            _OPS,
            key=lambda op: c.rng.random() ** (1 + 3 * names.count(_op_name(op))),
            reverse=True,
        )
        for op in ops:
            step = op(c, state, is_last)
            if step is not None and 2 <= step.state.value <= _LIMIT:
                chain.append(step)
                names.append(_op_name(op))
                break
        else:
            return None
    return chain, names


def _make_problem(seed: int, index: int, steps: int) -> Problem:
    rng = random.Random(f"deepsynapse-synthetic:{seed}:{index}")
    for _attempt in range(1000):
        attempt = _try_chain(_Ctx(rng), steps)
        if attempt is not None:
            break
    else:  # pragma: no cover - every state has an always-applicable operation
        raise RuntimeError(f"could not build a {steps}-step problem (seed={seed}, i={index})")
    chain, names = attempt
    sentences = [step.text for step in chain if step.text]
    final = chain[-1].state
    return Problem(
        id=f"synthetic-{seed}-{index}",
        question=" ".join([*sentences, final.question]),
        answer=str(final.value),
        solution="\n".join(step.line for step in chain),
        difficulty=steps,
        source="synthetic",
        columns={
            "intermediates": [str(step.state.value) for step in chain],
            "steps": names,
        },
    )


# ------------------------------------------------------------------ SVAMP-style variations
# SVAMP (Patel et al., 2021) showed that models which solve simple word problems often read
# them shallowly: it varied each problem three ways, the question asked about the same facts,
# the structure of the reasoning, and facts that do not matter, and accuracy fell. Our chains
# state their facts in the order they are used and ask for the last result, which teaches
# exactly that shallow reading (measured: trained models stay at the untrained model's
# SVAMP score). These variations vary training problems the same three ways, with their own
# templates (none of SVAMP's problems); the held-out set of record is never varied.

VARIANTS = ("irrelevant", "inverse", "compare", "if_clause")
"""``irrelevant``: a fact with a number the question does not need; ``inverse``: the unknown
at the start or in the middle ("how many did she have at first?", "how many did he give
away?"); ``compare``: "how many more ... than ...?" (the chain's result against someone
else's amount, or two kinds of one person's things); ``if_clause``: the last fact becomes
the question's condition ("If ..., how many ...?")."""

_PRONOUNS = frozenset({"He", "She", "His", "Her"})


@dataclass(frozen=True, slots=True)
class _Varied:
    """A varied problem before it becomes a `Problem`: facts, question, worked solution."""

    facts: list[str]
    question: str
    lines: list[str]
    values: list[int]
    names: list[str]


def _chain_facts(chain: list[_Step]) -> list[str]:
    return [step.text for step in chain if step.text]


def _chain_solution(chain: list[_Step]) -> tuple[list[str], list[int]]:
    """A chain's worked lines and the value each computes."""
    return [step.line for step in chain], [step.state.value for step in chain]


def _fresh_number(c: _Ctx, low: int, high: int, taken: set[int]) -> int:
    """A number in ``low..high`` that the problem does not state or compute already, so an
    irrelevant fact can never be mistaken for a relevant one."""
    return c.rng.choice([n for n in range(low, high + 1) if n not in taken])


def _irrelevant_fact(c: _Ctx, final: _State, taken: set[int]) -> str:
    """A sentence with a number that the question does not need.

    Another person's amount of the *same* thing is the hardest kind (SVAMP's "Jack had 8
    pens and Mary had 5 pens"), so it is used where the question names its owner and cannot
    be read as including them; otherwise the fact is about something else entirely.
    """
    other, n = c.person(), _fresh_number(c, 2, 60, taken)
    owned = final.per is None and final.owner.name in final.question
    if owned and final.kind == "items" and c.rng.random() < 0.5:
        return f"{other.name} has {n} {final.unit}."
    if owned and final.kind == "money" and c.rng.random() < 0.5:
        return f"{other.name} has ${n} in {other.his} wallet."
    units = final.unit.split()
    item = c.rng.choice([i for i in _ITEMS if i.plural.split()[-1] not in units])
    return c.pick(
        (
            f"{other.name} has {n} {item.plural}.",
            f"{other.name} is {_fresh_number(c, 7, 70, taken)} years old.",
            f"{final.owner.name}'s school is {_fresh_number(c, 2, 15, taken)} miles from home.",
            f"There are {n} {item.plural} on the kitchen table.",
        )
    )


def _vary_irrelevant(c: _Ctx, steps: int) -> _Varied | None:
    built = _try_chain(c, steps)
    if built is None:
        return None
    chain, names = built
    facts, final = _chain_facts(chain), chain[-1].state
    # never between a sentence and the pronoun that refers back to it
    places = [
        i for i in range(len(facts) + 1) if i == len(facts) or facts[i].split()[0] not in _PRONOUNS
    ]
    taken = {int(n) for n in re.findall(r"\d+", " ".join(facts))}
    taken |= {s.state.value for s in chain}
    facts.insert(c.rng.choice(places), _irrelevant_fact(c, final, taken))
    return _Varied(facts, final.question, *_chain_solution(chain), names)


def _vary_inverse(c: _Ctx, steps: int) -> _Varied | None:
    """The unknown is where the story starts or the change in its middle: one step (undo a
    gain, a loss, a purchase; or find the change "some" stood for) or two (first work out
    what was bought)."""
    o, item = c.person(), c.rng.choice(_ITEMS)
    if steps == 1:
        a, b = c.rng.randint(5, 60), c.rng.randint(2, 40)
        kind = c.rng.randrange(5)
        if kind >= 3:  # the change is the unknown
            if kind == 3:
                other = c.person()
                facts = [
                    f"{o.name} had {a + b} {item.plural}. {_cap(o.he)} gave some of them to "
                    f"{other.name}. Now {o.he} has {a} {item.plural}."
                ]
                question = f"How many {item.plural} did {o.name} give to {other.name}?"
                line = f"{o.name} gave {a + b} - {a} = {b} {item.plural} to {other.name}."
            else:
                facts = [
                    f"{o.name} had {a} {item.plural}. {_cap(o.he)} found some more. Now {o.he} "
                    f"has {a + b} {item.plural}."
                ]
                question = f"How many {item.plural} did {o.name} find?"
                line = f"{o.name} found {a + b} - {a} = {b} {item.plural}."
            return _Varied(facts, question, [line], [b], ["inverse_change"])
        if kind == 0:
            how = c.pick(
                (
                    f"bought {b} more {item.plural}",
                    f"got {b} {item.plural} from {c.person().name}",
                    f"found {b} more {item.plural}",
                )
            )
            facts = [f"{o.name} {how}. Now {o.he} has {a + b} {item.plural}."]
            line = f"Before that, {o.name} had {a + b} - {b} = {a} {item.plural}."
        elif kind == 1:
            verbs = [f"gave {b} {item.plural} to {c.person().name}", f"lost {b} {item.plural}"]
            verbs.append(f"ate {b} {item.plural}" if item.food else f"sold {b} {item.plural}")
            facts = [f"{o.name} {c.pick(verbs)}. {_cap(o.he)} has {a} {item.plural} left."]
            line = f"At first, {o.name} had {a} + {b} = {a + b} {item.plural}."
        else:
            facts = [f"{o.name} spent ${b} on {c.pick(_THINGS)}. Now {o.he} has ${a} left."]
            line = f"At first, {o.name} had {a} + {b} = ${a + b}."
            question = f"How much money did {o.name} have at first?"
            return _Varied(facts, question, [line], [a + b], ["inverse_spent"])
        question = f"How many {item.plural} did {o.name} have at first?"
        if kind == 0:
            return _Varied(facts, question, [line], [a], ["inverse_gain"])
        return _Varied(facts, question, [line], [a + b], ["inverse_loss"])
    if steps != 2:
        return None
    if c.rng.random() < 0.5:  # bought whole containers, then counted
        k, size, a = c.rng.randint(2, 6), c.rng.choice(item.sizes), c.rng.randint(3, 40)
        bought = k * size
        facts = [
            f"{o.name} bought {k} {item.container} of {item.plural} with {size} in each. "
            f"Now {o.he} has {a + bought} {item.plural}."
        ]
        lines = [
            f"{o.name} bought {k} * {size} = {bought} {item.plural}.",
            f"Before that, {o.name} had {a + bought} - {bought} = {a} {item.plural}.",
        ]
        question = f"How many {item.plural} did {o.name} have before?"
        return _Varied(facts, question, lines, [bought, a], ["groups", "inverse_gain"])
    n, price, left = c.rng.randint(2, 9), c.rng.randint(*item.price), c.rng.randint(2, 60)
    spent = n * price
    facts = [f"{o.name} bought {n} {item.plural} for ${price} each and has ${left} left."]
    lines = [
        f"{o.name} spent {n} * {price} = ${spent}.",
        f"At first, {o.name} had {left} + {spent} = ${left + spent}.",
    ]
    question = f"How much money did {o.name} have at first?"
    return _Varied(facts, question, lines, [spent, left + spent], ["purchase", "inverse_spent"])


_COMPARE_VERBS = {"has": ("has", "have"), "spent": ("spends", "spend"), "earned": ("earns", "earn")}


def _vary_compare(c: _Ctx, steps: int) -> _Varied | None:
    """The question asks how many more one person has than another: after a chain of
    ``steps - 1`` steps about the first, or (one step) of two stated amounts."""
    if steps == 1 and c.rng.random() < 0.4:  # two kinds of one person's things
        o, item = c.person(), c.rng.choice(_ITEMS)
        (a, first), (b, second) = zip(c.rng.sample(range(3, 80), 2), item.adjectives, strict=True)
        if a < b:
            (a, first), (b, second) = (b, second), (a, first)
        facts = [f"{o.name} has {a} {first} {item.plural} and {b} {second} {item.plural}."]
        question = (
            f"How many more {first} {item.plural} than {second} {item.plural} does {o.name} have?"
        )
        line = f"{o.name} has {a} - {b} = {a - b} more {first} {item.plural} than {second} ones."
        return _Varied(facts, question, [line], [a - b], ["compare"])
    if steps == 1:
        o, other, item = c.person(), c.person(), c.rng.choice(_ITEMS)
        a, b = c.rng.sample(range(3, 80), 2)
        facts = [f"{o.name} has {a} {item.plural}. {other.name} has {b} {item.plural}."]
        chain_lines: list[str] = []
        chain_values: list[int] = []
        names: list[str] = []
        v, unit, kind, mode, owner = a, item.plural, "items", "has", o
    else:
        built = _try_chain(c, steps - 1)
        if built is None:
            return None
        chain, names = built
        final = chain[-1].state
        if final.per is not None or final.kind not in ("items", "money"):
            return None
        if final.kind == "money" and final.mode not in _COMPARE_VERBS:
            return None
        other = c.person()
        v, unit, kind, owner = final.value, final.unit, final.kind, final.owner
        mode = final.mode if kind == "money" else "has"
        gap = c.rng.randint(1, max(2, v // 2))
        b = v + gap if c.rng.random() < 0.5 or v - gap < 2 else v - gap
        verb = _COMPARE_VERBS[mode][0]
        amount = f"${b}" if kind == "money" else f"{b} {unit}"
        facts = [*_chain_facts(chain), f"{other.name} {verb} {amount}."]
        chain_lines, chain_values = _chain_solution(chain)
        a = v
    (big, big_v), (small, small_v) = sorted(((owner, a), (other, b)), key=lambda x: -x[1])
    r = big_v - small_v
    verbs, base = _COMPARE_VERBS[mode]
    if kind == "money":
        question = f"How much more money does {big.name} {base} than {small.name}?"
        line = f"{big.name} {verbs} {big_v} - {small_v} = ${r} more than {small.name}."
    elif c.rng.random() < 0.5:
        question = f"How many more {unit} does {big.name} have than {small.name}?"
        line = f"{big.name} has {big_v} - {small_v} = {r} more {unit} than {small.name}."
    else:
        question = f"How many fewer {unit} does {small.name} have than {big.name}?"
        line = f"{small.name} has {big_v} - {small_v} = {r} fewer {unit} than {big.name}."
    return _Varied(facts, question, [*chain_lines, line], [*chain_values, r], [*names, "compare"])


def _vary_if_clause(c: _Ctx, steps: int) -> _Varied | None:
    """The last fact moves into the question as a condition ("If she then buys 5 more, how
    many ...?"): the question no longer stands alone after the facts."""
    built = _try_chain(c, steps)
    if built is None:
        return None
    chain, names = built
    facts, final = _chain_facts(chain), chain[-1].state
    last = facts[-1] if facts else ""
    if (
        last.count(".") != 1
        or not last.endswith(".")
        or last.split()[0] not in {p.name for p in c.people}
    ):
        return None
    question = f"If {last[:-1]}, {final.question[:1].lower()}{final.question[1:]}"
    return _Varied(facts[:-1], question, *_chain_solution(chain), names)


_VARY: dict[str, Callable[[_Ctx, int], _Varied | None]] = {
    "irrelevant": _vary_irrelevant,
    "inverse": _vary_inverse,
    "compare": _vary_compare,
    "if_clause": _vary_if_clause,
}


def _variant_for(
    seed: int, index: int, steps: int, share: float, kinds: Sequence[str] = VARIANTS
) -> str | None:
    """Which variation problem ``index`` gets, if any, among ``kinds``: a stream of its own,
    so a share of 0 leaves every problem what it was (and all kinds, the stream as before
    kinds could be chosen). A problem no chosen kind can vary (``inverse`` alone, three
    steps or more) stays as it was."""
    if share <= 0:
        return None
    pick = random.Random(f"deepsynapse-variant:{seed}:{index}")
    if pick.random() >= share:
        return None
    fitting = [v for v in VARIANTS if v in kinds and (v != "inverse" or steps <= 2)]
    return pick.choice(fitting) if fitting else None


def check_variant_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple of known variations, or a ValueError naming what is expected."""
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown or not kinds or isinstance(kinds, str):
        raise ValueError(
            f"variant kinds must be a non-empty list of {', '.join(VARIANTS)}; got {kinds!r}"
        )
    return tuple(kinds)


def _fits(varied: _Varied) -> bool:
    """Values in range, and an answer the problem does not state: copying a number from
    the text must never be right."""
    *steps, answer = varied.values
    stated = {int(n) for n in re.findall(r"\d+", " ".join([*varied.facts, varied.question]))}
    return all(2 <= v <= _LIMIT for v in steps) and 1 <= answer <= _LIMIT and answer not in stated


def _make_varied(seed: int, index: int, steps: int, variant: str) -> Problem:
    rng = random.Random(f"deepsynapse-synthetic:{seed}:{index}:{variant}")
    for _attempt in range(1000):
        varied = _VARY[variant](_Ctx(rng), steps)
        if varied is not None and _fits(varied):
            break
    else:  # pragma: no cover - a one-step variation always exists
        raise RuntimeError(f"could not vary a {steps}-step problem as {variant} ({seed}, {index})")
    return Problem(
        id=f"synthetic-{seed}-{index}",
        question=" ".join([*varied.facts, varied.question]),
        answer=str(varied.values[-1]),
        solution="\n".join(varied.lines),
        difficulty=steps,
        source="synthetic",
        columns={
            "intermediates": [str(v) for v in varied.values],
            "steps": varied.names,
            "variant": variant,
        },
    )


def generate_problems(
    n: int,
    *,
    seed: int = 0,
    difficulty: int | tuple[int, int] = (1, 3),
    variants: float = 0.0,
    variant_kinds: Sequence[str] = VARIANTS,
) -> list[Problem]:
    """Generate ``n`` word problems whose difficulty is their number of arithmetic steps.

    ``difficulty`` is an exact step count or an inclusive ``(low, high)`` range (within
    1..6). ``variants``: the share of problems varied as SVAMP varies problems, each by one
    of ``variant_kinds`` (`VARIANTS`; 0 leaves the stream as it always was). The output
    depends only on ``(n, seed, difficulty, variants, variant_kinds)``; problem ``i`` only on
    ``(seed, i)`` and those settings, so a longer list extends a shorter one.

    >>> p = generate_problems(1, seed=3, difficulty=2)[0]
    >>> p.difficulty, len(p.solution.splitlines()), p.columns["intermediates"][-1] == p.answer
    (2, 2, True)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    low, high = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not 1 <= low <= high <= MAX_DIFFICULTY:
        raise ValueError(
            f"difficulty must be an int or (low, high) within 1..{MAX_DIFFICULTY}, "
            f"got {difficulty!r}"
        )
    if not 0.0 <= variants <= 1.0:
        raise ValueError(f"variants must be a share within 0..1, got {variants!r}")
    kinds = check_variant_kinds(variant_kinds)
    problems = []
    for index in range(n):
        pick = random.Random(f"deepsynapse-difficulty:{seed}:{index}")
        steps = pick.randint(low, high)
        variant = _variant_for(seed, index, steps, variants, kinds)
        if variant is None:
            problems.append(_make_problem(seed, index, steps))
        else:
            problems.append(_make_varied(seed, index, steps, variant))
    return problems


# ------------------------------------------------------------------ the held-out set of record

HELDOUT_SHARE = 8
"""One question text in ``HELDOUT_SHARE`` belongs to the held-out partition."""

HELDOUT_SIZE = 1536
"""Problems in the synthetic test split: 512 per difficulty over 1-3 steps; evaluations take a
prefix (``eval.limit``), 384 of which give a 95% interval of at most +-5 points."""


def is_heldout(question: str) -> bool:
    """Whether a question text lies in the held-out partition (a stable hash of the text).

    Training never sees these texts, whatever its seed: the generator's templates repeat
    (one-step problems collide within a few thousand draws), so disjointness by seed alone
    would leak; a partition of the text space cannot.
    """
    key = " ".join(question.split()).lower().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % HELDOUT_SHARE == 0


def heldout_problems(n: int, difficulty: int | tuple[int, int] = (1, 3)) -> list[Problem]:
    """The first ``n`` problems of the fixed held-out set, stratified by difficulty.

    Difficulties alternate (1, 2, 3, 1, 2, 3, ...), so every prefix is balanced and a quick
    evaluation on the first problems measures the same mix as the full one. Problems come
    from the held-out partition only (see `is_heldout`), without repeats, from a stream of
    their own: the set is the same for every run and training seed.

    >>> ps = heldout_problems(6)
    >>> [p.difficulty for p in ps], all(is_heldout(p.question) for p in ps)
    ([1, 2, 3, 1, 2, 3], True)
    """
    low, high = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not 1 <= low <= high <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must lie within 1..{MAX_DIFFICULTY}, got {difficulty!r}")
    return list(_heldout(n, low, high))


@functools.lru_cache(maxsize=8)
def _heldout(n: int, low: int, high: int) -> tuple[Problem, ...]:
    levels = list(range(low, high + 1))
    strata: dict[int, list[Problem]] = {d: [] for d in levels}
    want = {d: -(-n // len(levels)) for d in levels}  # ceil: a prefix is cut below
    for d in levels:
        seen: set[str] = set()
        index = 0
        while len(strata[d]) < want[d]:
            p = _make_problem(-d, index, d)  # negative seeds: a stream no training run draws
            index += 1
            if is_heldout(p.question) and p.question not in seen:
                seen.add(p.question)
                strata[d].append(replace(p, id=f"heldout-{d}-{index - 1}", source="heldout"))
    interleaved = [strata[d][i] for i in range(max(want.values())) for d in levels]
    return tuple(interleaved[:n])


def training_problems(
    n: int,
    *,
    seed: int,
    difficulty: int | tuple[int, int],
    variants: float = 0.0,
    variant_kinds: Sequence[str] = VARIANTS,
) -> list[Problem]:
    """``n`` generated problems outside the held-out partition (what training may see).

    The stream is ``generate_problems``'s with held-out texts skipped, so it depends only on
    its settings and a longer list extends a shorter one.
    """
    drawn = n + n // (HELDOUT_SHARE - 1) + 16
    while True:
        kept = [
            p
            for p in generate_problems(
                drawn,
                seed=seed,
                difficulty=difficulty,
                variants=variants,
                variant_kinds=variant_kinds,
            )
            if not is_heldout(p.question)
        ]
        if len(kept) >= n:
            return kept[:n]
        drawn *= 2
