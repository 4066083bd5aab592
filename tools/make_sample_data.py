#!/usr/bin/env python3
"""Write configs/data/qa_sample.jsonl: the sample QA data shipped with moe-orch.

Deterministic (a fixed seed, no input): run it again and the file is byte-identical, so a diff
shows only intended changes. Five expert labels, all three answer forms of the seed's format
(string, list of strings, {"text": ...}), short regular answers that a tiny model (d_model 64,
2 layers, BPE vocab 512) picks up within about a minute on CPU.

    python tools/make_sample_data.py            # writes configs/data/qa_sample.jsonl
    python tools/make_sample_data.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20261128
OUT = Path(__file__).resolve().parent.parent / "configs" / "data" / "qa_sample.jsonl"

Row = dict[str, object]

# fmt: off
# ---------------------------------------------------------------- factual_lookup
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"),
]
SYMBOLS = [
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("sodium", "Na"), ("iron", "Fe"), ("gold", "Au"), ("silver", "Ag"), ("copper", "Cu"),
    ("lead", "Pb"), ("tin", "Sn"), ("zinc", "Zn"), ("calcium", "Ca"), ("potassium", "K"),
    ("neon", "Ne"), ("sulfur", "S"), ("mercury", "Hg"), ("chlorine", "Cl"), ("uranium", "U"),
]
CAPITAL_QUESTIONS = [
    "What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}.",
    "what's the capital of {x}", "The capital of {x} is which city?",
]
SYMBOL_QUESTIONS = [
    "What is the chemical symbol for {x}?", "Which symbol stands for {x} in the periodic table?",
    "Give the element symbol of {x}.", "how is {x} written as a chemical symbol",
]

# ---------------------------------------------------------------- arithmetic
ARITH_QUESTIONS = {
    "+": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
          "what is the sum of {a} and {b}"],
    "-": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
          "how much is {a} take away {b}"],
    "*": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}.",
          "what is the product of {a} and {b}"],
}

# ---------------------------------------------------------------- unit_conversion
# (from unit, to unit, factor, smallest and largest amount)
CONVERSIONS = [
    ("meters", "centimeters", 100, 1, 9), ("kilometers", "meters", 1000, 1, 9),
    ("kilograms", "grams", 1000, 1, 9), ("liters", "milliliters", 1000, 1, 9),
    ("hours", "minutes", 60, 1, 9), ("minutes", "seconds", 60, 1, 9), ("days", "hours", 24, 1, 7),
    ("weeks", "days", 7, 1, 9), ("feet", "inches", 12, 1, 9), ("yards", "feet", 3, 1, 9),
    ("dozen", "items", 12, 1, 9),
]
CONVERSION_QUESTIONS = [
    "How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "{n} {frm} is how many {to}?",
    "how many {to} make {n} {frm}", "Express {n} {frm} in {to}.",
]

# ---------------------------------------------------------------- definition
DEFINITIONS = [
    ("triangle", "a shape with three sides"), ("square", "a shape with four equal sides"),
    ("pentagon", "a shape with five sides"), ("hexagon", "a shape with six sides"),
    ("circle", "a round shape with no corners"), ("noun", "a word that names a thing"),
    ("verb", "a word that names an action"), ("adjective", "a word that describes a noun"),
    ("planet", "a large body that orbits a star"), ("moon", "a body that orbits a planet"),
    ("island", "land with water all around it"), ("river", "a stream of water that flows to the sea"),
    ("desert", "a very dry area of land"), ("volcano", "a mountain that can erupt lava"),
    ("mammal", "an animal that feeds its young milk"), ("insect", "a small animal with six legs"),
    ("herbivore", "an animal that eats only plants"), ("carnivore", "an animal that eats meat"),
    ("thermometer", "a tool that measures temperature"), ("compass", "a tool that shows north"),
    ("dictionary", "a book that lists words and their meanings"), ("atlas", "a book of maps"),
    ("century", "a period of one hundred years"), ("decade", "a period of ten years"),
    ("prime number", "a number with exactly two divisors"), ("even number", "a number divisible by two"),
]
DEFINITION_QUESTIONS = [
    "What is {art} {x}?", "Define {x}.", "What does the word {x} mean?", "Give a short definition of {x}.",
    "explain what {art} {x} is",
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
    ("early", "late"), ("full", "empty"), ("open", "closed"), ("happy", "sad"), ("old", "new"),
    ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"), ("long", "short"), ("strong", "weak"),
]
OPPOSITE_QUESTIONS = [
    "What is the opposite of {x}?", "Give an antonym of {x}.", "what word means the opposite of {x}",
]

# ---------------------------------------------------------------- list_recall (list answers)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SETS = [
    ("the primary colors", ["red", "yellow", "blue"]),
    ("the colors of a traffic light", ["red", "yellow", "green"]),
    ("the states of matter", ["solid", "liquid", "gas"]),
    ("the four seasons", ["spring", "summer", "autumn", "winter"]),
    ("the four compass directions", ["north", "east", "south", "west"]),
    ("the gas giant planets", ["Jupiter", "Saturn", "Uranus", "Neptune"]),
    ("the inner planets", ["Mercury", "Venus", "Earth", "Mars"]),
    ("the vowels of the English alphabet", ["a", "e", "i", "o", "u"]),
    ("the days of the weekend", ["Saturday", "Sunday"]),
    ("the three branches of the US government", ["legislative", "executive", "judicial"]),
    ("the noble gases in the first three periods", ["helium", "neon", "argon"]),
    ("the first five prime numbers", ["2", "3", "5", "7", "11"]),
]
SET_QUESTIONS = ["Name {x}.", "List {x}.", "What are {x}?", "which are {x}"]
# fmt: on


def factual_lookup(rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for country, city in CAPITALS:
        for template in rng.sample(CAPITAL_QUESTIONS, 2):
            rows.append({"question": template.format(x=country), "answer": city})
    for element, symbol in SYMBOLS:
        for template in rng.sample(SYMBOL_QUESTIONS, 2):
            rows.append({"question": template.format(x=element), "answer": {"text": symbol}})
    return rows


def arithmetic(rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for _ in range(80):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        else:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            if op == "-" and b > a:
                a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(ARITH_QUESTIONS[op]).format(a=a, b=b)
        # Mostly plain strings; some {"text": ...} so every form shows up under several labels.
        answer: object = str(value) if rng.random() < 0.8 else {"text": str(value)}
        rows.append({"question": question, "answer": answer})
    return rows


def unit_conversion(rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for frm, to, factor, lo, hi in CONVERSIONS:
        for n in rng.sample(range(lo, hi + 1), 6):
            unit = frm if n != 1 or frm == "dozen" else frm.rstrip("s")
            if frm == "feet" and n == 1:
                unit = "foot"
            question = rng.choice(CONVERSION_QUESTIONS).format(n=n, frm=unit, to=to)
            answer = f"{n * factor} {to}"
            rows.append({"question": question, "answer": {"text": answer} if rng.random() < 0.5 else answer})
    return rows


def definition(rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for word, meaning in DEFINITIONS:
        for template in rng.sample(DEFINITION_QUESTIONS, 2):
            article = "an" if word[0] in "aeiou" else "a"
            rows.append({"question": template.format(x=word, art=article), "answer": meaning})
    for word, opposite in OPPOSITES:
        rows.append({"question": rng.choice(OPPOSITE_QUESTIONS).format(x=word), "answer": {"text": opposite}})
        rows.append({"question": rng.choice(OPPOSITE_QUESTIONS).format(x=opposite), "answer": word})
    return rows


def list_recall(rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for name, items in SETS:
        for template in rng.sample(SET_QUESTIONS, 2):
            answer: object = items if rng.random() < 0.75 else {"text": items}
            rows.append({"question": template.format(x=name), "answer": answer})
    for seq, kind in ((MONTHS, "months"), (DAYS, "days")):
        for i in range(len(seq) - 2):
            n = rng.choice((2, 3))
            after = seq[i]
            rows.append(
                {"question": f"Which {n} {kind} come after {after}?", "answer": seq[i + 1 : i + 1 + n]}
            )
    return rows


GENERATORS: dict[str, Callable[[random.Random], list[Row]]] = {
    "factual_lookup": factual_lookup,
    "arithmetic": arithmetic,
    "unit_conversion": unit_conversion,
    "definition": definition,
    "list_recall": list_recall,
}


def build() -> str:
    rng = random.Random(SEED)
    rows: list[Row] = []
    for label, make in GENERATORS.items():
        for row in make(rng):
            rows.append({**row, "expert_label": label})
    rng.shuffle(rows)
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = build()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run python tools/make_sample_data.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {text.count(chr(10))} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
