"""Built-in task: integer arithmetic word problems with a difficulty knob.

Every problem is a short story ("Q : Maria has 12 apples . Maria buys 345 more . How many
apples does Maria have now ? A :") or a bare expression ("Problem : compute 12 + 345 .
Answer :"), worded with many templates, names, objects and places, so that the built-in
word-level vocabulary has thousands of entries. All text is canonical: words, numbers and
punctuation are separated by single spaces, so tokenising a prompt and a response
separately gives the same tokens as tokenising their concatenation.

The gold answer is a non-negative integer below 1000 (one number token of the built-in
tokenizer). The reference response the warm start imitates is a short lead phrase followed
by ``\\boxed{ N }``, e.g. ``so the answer is \\boxed{ 357 }``.

The held-out split is fixed (its own seed, independent of the task seed) and disjoint from
training prompts: a prompt belongs to it when a hash of its text falls in one bucket out of
``HELDOUT_BUCKETS``; training draws reject such prompts.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from drpo.tasks.base import Example

MAX_ANSWER = 999
HELDOUT_BUCKETS = 20
HELDOUT_SEED = 20240917
DEFAULT_DIFFICULTY = 1


@dataclass(frozen=True)
class Level:
    """One difficulty setting: how many operands, how large, which operations."""

    n_operands: int
    max_value: int
    ops: str


LEVELS: dict[int, Level] = {
    1: Level(n_operands=2, max_value=20, ops="+"),
    2: Level(n_operands=2, max_value=30, ops="+-"),
    3: Level(n_operands=2, max_value=99, ops="+-"),
    4: Level(n_operands=3, max_value=99, ops="+-"),
    5: Level(n_operands=3, max_value=999, ops="+-"),
}

NAMES = """Maria John Aisha Wei Carlos Fatima Liam Olivia Noah Emma Ava Mia Lucas Sofia Ethan Chloe
Mateo Amara Yuki Hiro Priya Arjun Leila Omar Nina Ivan Elena Pavel Anna Tom Sara Ben Lily Jack
Grace Leo Ruby Max Zoe Sam Kofi Ama Tariq Hana Jin Mei Kenji Aiko Diego Lucia Pedro Ines Felix
Clara Hugo Alice Oscar Rosa Marco Giulia Luca Chiara Jonas Lea Finn Ida Emil Freya Nils Astrid
Sven Ingrid Lars Maja Ali Zara Hamza Noor Yusuf Layla Musa Amina David Rachel Daniel Hannah
Samuel Esther Peter Julia Paul Laura Mark Helen George Alma Victor Irene Adam Eva Robert Nora
Rahul Kavya Vikram Ananya Ravi Meera Sipho Thandi Kwame Abena Juan Camila Andres Valentina
Mikhail Olga Sergei Tatiana Chen Ling Tao Xiu Min Ji Hye Joon Sora Taro Emi Bruno Marta Tiago
Beatriz Henrik Sigrid Oskar Elsa Kai Mila Theo Isla Ezra Iris Jonah Ada Felipe Lorena""".split()

OBJECTS = """apples oranges pears plums lemons grapes cherries peaches mangoes bananas melons
berries carrots potatoes onions tomatoes peppers beans nuts cookies cakes muffins pies candies
sweets donuts pancakes eggs sandwiches pizzas buns marbles stickers stamps coins cards books
comics pens pencils crayons markers erasers notebooks shells stones rocks pebbles feathers
leaves flowers roses tulips daisies seeds acorns balloons kites toys dolls blocks puzzles
robots cars trucks trains boats planes bikes balls hats caps socks shirts scarves gloves
shoes buttons beads ribbons rings bracelets necklaces cups plates bowls spoons forks bottles
jars boxes bags baskets buckets candles lamps keys tickets letters photos paintings drawings
songs poems stories chairs tables bricks tiles nails screws bolts tools cans fish ducks
chickens cows sheep goats rabbits birds frogs bees ants snails""".split()

PLACES = """box bag basket garden kitchen shop store library classroom school park yard barn
shed garage attic cellar drawer closet room house farm market bakery office studio museum
truck car boat cart bucket jar chest crate tent camp village town city""".split()

BUY = ["buys {x} more", "gets {x} more {obj}", "finds {x} more {obj}", "picks {x} more {obj}",
       "receives {x} {obj} from {other}", "collects {x} more {obj}", "makes {x} more {obj}",
       "wins {x} more {obj}", "is given {x} {obj} by {other}", "adds {x} {obj} to the pile",
       "brings {x} more {obj} from the {place}", "gets another {x} {obj}"]
LOSE = ["gives {x} {obj} to {other}", "loses {x} {obj}", "sells {x} of them", "eats {x} of them",
        "gives away {x} {obj}", "uses {x} {obj}", "drops {x} {obj}", "leaves {x} {obj} at the {place}",
        "trades away {x} {obj}", "hands {x} {obj} to {other}", "breaks {x} {obj}",
        "donates {x} {obj} to the {place}"]
START = ["{name} has {x} {obj} .", "{name} owns {x} {obj} .", "{name} starts with {x} {obj} .",
         "{name} had {x} {obj} in the morning .", "{name} keeps {x} {obj} in the {place} .",
         "At first , {name} has {x} {obj} .", "There are {x} {obj} and they belong to {name} .",
         "{name} counts {x} {obj} in the {place} ."]
STEP = ["Then {name} {verb} .", "Later , {name} {verb} .", "Next , {name} {verb} .",
        "After that , {name} {verb} .", "{name} {verb} .", "On {day} , {name} {verb} ."]
QUESTION = ["How many {obj} does {name} have now ?", "How many {obj} are left ?",
            "How many {obj} does {name} have in the end ?", "What is the number of {obj} now ?",
            "How many {obj} does {name} own at the end ?", "Count the {obj} {name} has now .",
            "How many {obj} are there now ?", "What is the total number of {obj} ?"]
BARE = ["compute {expr} .", "what is {expr} ?", "evaluate {expr} .", "find {expr} .",
        "calculate {expr} .", "work out {expr} .", "what do you get for {expr} ?",
        "give the value of {expr} ."]
PREFIX = ["Q :", "Question :", "Problem :", "Task :", "Exercise :", "Puzzle :"]
SUFFIX = ["A :", "Answer :", "Solution :", "Reply :"]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
LEADS = ["so the answer is", "the answer is", "answer :", "so {name} has", "{name} has",
         "that makes", "the total is", "in total", "so there are", "this gives", "we get",
         "result :", "the result is", "it is", "so it is", "final answer :", "{name} ends with",
         "the count is", "so the count is", "{name} now has", "there are", "the number is",
         "so we get", "that leaves", "which gives", "thus", "hence", "clearly", "easy :",
         "the value is", "so {name} owns", "left with", "overall", "in the end"]
BOXED_OPEN, BOXED_CLOSE = "\\boxed{", "}"


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def in_heldout(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the fixed held-out split (never drawn for training)."""
    return _stable_hash(prompt) % HELDOUT_BUCKETS == 0


def boxed(answer: int | str) -> str:
    """The canonical final-answer text, ``\\boxed{ N }`` (parsed by math-verify)."""
    return f"{BOXED_OPEN} {answer} {BOXED_CLOSE}"


def vocabulary_words() -> list[str]:
    """Every word and punctuation mark the task can produce (numbers excluded), sorted."""
    texts = BUY + LOSE + START + STEP + QUESTION + BARE + PREFIX + SUFFIX + LEADS
    words = {w for t in texts for w in t.split() if not w.startswith("{")}
    words |= {w.capitalize() for t in BARE for w in t.split()[:1]}
    words |= set(NAMES) | set(OBJECTS) | set(PLACES) | set(DAYS)
    words |= {"+", "-", BOXED_OPEN, BOXED_CLOSE}
    return sorted(words)


class ArithmeticTask:
    """Arithmetic word problems; ``difficulty`` picks a :data:`LEVELS` entry (1 = easiest)."""

    def __init__(self, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0) -> None:
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty}")
        self.difficulty = difficulty
        self.level = LEVELS[difficulty]
        self.seed = seed

    @property
    def settings(self) -> dict:
        """Everything that defines the task's distribution (used in cache keys)."""
        return {"name": "arithmetic", "difficulty": self.difficulty, "seed": self.seed,
                "level": vars(self.level), "heldout": [HELDOUT_BUCKETS, HELDOUT_SEED]}

    def _operands(self, rng: random.Random) -> tuple[list[int], list[str], int]:
        """Operands, operations and the (non-negative, <= MAX_ANSWER) result."""
        lv = self.level
        total = rng.randint(0, lv.max_value)
        operands, ops = [total], []
        for _ in range(lv.n_operands - 1):
            op = rng.choice(lv.ops)
            hi = min(lv.max_value, total) if op == "-" else min(lv.max_value, MAX_ANSWER - total)
            x = rng.randint(0, hi)
            total = total - x if op == "-" else total + x
            operands.append(x)
            ops.append(op)
        return operands, ops, total

    def _draw(self, rng: random.Random, index: int) -> Example:
        operands, ops, answer = self._operands(rng)
        name, other = rng.sample(NAMES, 2)
        obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
        if rng.random() < 0.2:
            expr = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
            body = rng.choice(BARE).format(expr=expr)
            body = body[0].upper() + body[1:]
        else:
            fields = {"name": name, "other": other, "obj": obj, "place": place}
            sentences = [rng.choice(START).format(x=operands[0], **fields)]
            for op, x in zip(ops, operands[1:]):
                verb = rng.choice(BUY if op == "+" else LOSE).format(x=x, **fields)
                sentences.append(rng.choice(STEP).format(verb=verb, day=rng.choice(DAYS), **fields))
            sentences.append(rng.choice(QUESTION).format(**fields))
            body = " ".join(sentences)
        prompt = f"{rng.choice(PREFIX)} {body} {rng.choice(SUFFIX)}"
        meta = {"difficulty": self.difficulty, "operands": operands, "ops": ops, "name": name}
        return Example(prompt=prompt, answer=str(answer), id=f"arith-{self.difficulty}-{index}",
                       meta=meta)

    def sample(self, rng: random.Random, index: int = 0) -> Example:
        """One training example (never a held-out prompt)."""
        while True:
            ex = self._draw(rng, index)
            if not in_heldout(ex.prompt):
                return ex

    def train_examples(self, n: int, rng: random.Random | None = None) -> list[Example]:
        """``n`` training examples drawn with ``rng`` (default: a fresh one from the task seed)."""
        rng = rng if rng is not None else random.Random(self.seed)
        return [self.sample(rng, i) for i in range(n)]

    def __iter__(self) -> Iterator[Example]:
        """An endless stream of training examples, deterministic given the task seed."""
        rng, i = random.Random(self.seed), 0
        while True:
            yield self.sample(rng, i)
            i += 1

    def heldout(self, n: int = 256) -> list[Example]:
        """The first ``n`` examples of the fixed held-out split (same for every task seed)."""
        rng, seen, out = random.Random(HELDOUT_SEED * 10 + self.difficulty), set(), []
        while len(out) < n:
            ex = self._draw(rng, len(out))
            if in_heldout(ex.prompt) and ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(Example(ex.prompt, ex.answer, f"heldout-{ex.id}", ex.meta))
        return out

    @staticmethod
    def reference_response(example: Example, rng: random.Random, p_correct: float = 1.0) -> str:
        """A short demonstration: a random lead phrase, then ``\\boxed{ answer }``.

        With probability ``1 - p_correct`` the demonstrator takes a shortcut and boxes one of the
        problem's operands instead of the result (a shallow heuristic, as imperfect SFT data has).
        A model imitating it holds both behaviours, computing and copying, and samples between
        them; a verifier reward can teach it to prefer the one that is right.
        """
        lead = rng.choice(LEADS).format(name=example.meta.get("name", "it"))
        answer = int(example.answer)
        if rng.random() >= p_correct:
            answer = rng.choice(example.meta["operands"])
        return f"{lead} {boxed(answer)}"
