"""Regenerate the intent-classification example data (train.jsonl, validation.jsonl).

The utterances are written for this project: a handful of hand-written templates per intent, filled from small
slot lists, shuffled with a fixed seed. Every template contributes, no line repeats (ignoring case and trailing
punctuation), and the output is byte-identical on every run:

    python examples/data/intents/make_intents.py            # writes next to this script
    python examples/data/intents/make_intents.py --check    # exits 1 if the files on disk differ
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import string
import sys
from pathlib import Path

SEED = 20240611
PER_INTENT = 55
TRAIN_PER_INTENT = 45
MIN_WORDS, MAX_WORDS = 3, 20

ACCOUNT = ["checking", "savings", "joint account", "business account", "current account", "main account"]
AMOUNT = ["$50", "200 dollars", "75 bucks", "1,200 euros", "£30", "$1500", "twenty dollars", "400"]
PERSON = ["my mom", "Alex", "my landlord", "Priya", "my brother", "Jordan", "the babysitter", "Tomasz"]
CITY = ["Lisbon", "Denver", "Osaka", "Nairobi", "Toronto", "Bogota", "Edinburgh", "Perth", "Chicago"]
DAY = ["tomorrow", "on Friday", "next Monday", "this weekend", "on the 14th", "tonight", "next week"]
TIME = ["6am", "7:30", "half past five", "6:45 am", "noon", "8 in the morning", "5:15"]
AIRLINE = ["UA", "LH", "BA", "AF", "QF", "DL"]
FLIGHT_NO = ["212", "1034", "87", "455", "2910"]
ARTIST = ["Nina Simone", "Daft Punk", "Fleetwood Mac", "Kendrick Lamar", "Bach", "Radiohead", "Adele"]
GENRE = ["jazz", "lo-fi beats", "classical", "some rock", "90s hip hop", "chill acoustic", "bossa nova"]
FOOD = ["a pepperoni pizza", "pad thai", "two burritos", "sushi", "a veggie burger", "chicken tikka", "ramen"]
CUISINE = ["Italian", "Thai", "Mexican", "Indian", "Japanese", "Greek", "Ethiopian"]
PARTY = ["two", "four", "6", "3 people", "a party of five", "eight of us", "2"]
LANGUAGE = ["Spanish", "French", "German", "Japanese", "Portuguese", "Italian", "Korean"]
PHRASE = [
    "where is the train station",
    "thank you very much",
    "I am allergic to peanuts",
    "how much is this",
    "good morning",
    "the bill please",
    "I need a doctor",
]
CARD = ["debit card", "credit card", "visa", "bank card", "mastercard"]
VENUE = [
    "an Italian place",
    "that Thai spot",
    "the Mexican place downtown",
    "an Indian restaurant",
    "the sushi bar on 5th",
    "a Greek taverna",
    "the Ethiopian restaurant",
]
WEEKDAY = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

INTENTS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "check_balance": (
        [
            "what's my {account} balance",
            "how much money is in my {account}",
            "show me the balance on my {account}",
            "can you tell me how much I have in my {account}",
            "balance of {account} please",
            "do I have enough in my {account} to pay {amount}",
            "how much is left in the {account} after rent",
            "whats the current ballance on my {account}",
            "am I overdrawn on my {account}",
            "check {account} funds",
        ],
        {"account": ACCOUNT, "amount": AMOUNT},
    ),
    "transfer_money": (
        [
            "send {amount} to {person}",
            "transfer {amount} from my {account} to {person}",
            "move {amount} into my {account}",
            "can you wire {amount} to {person} {day}",
            "I need to pay {person} {amount}",
            "please transfer {amount} to {person}'s account",
            "schedule a transfer of {amount} to {person} {day}",
            "tranfer {amount} to {person}",
            "shift {amount} from my {account} over to {account2}",
        ],
        {"amount": AMOUNT, "person": PERSON, "account": ACCOUNT, "account2": ACCOUNT[:3], "day": DAY},
    ),
    "card_lost": (
        [
            "I lost my {card}",
            "my {card} was stolen",
            "I can't find my {card} anywhere",
            "please freeze my {card}, I think I dropped it",
            "someone took my wallet with my {card} in it",
            "block my {card} right now",
            "I left my {card} at a bar {when} and it's gone",
            "need to report a lost {card}",
            "my {card} is missing, can you cancel it",
            "how do I get a replacement {card}, mine is lost",
        ],
        {"card": CARD, "when": ["last night", "yesterday", "on saturday", "earlier today"]},
    ),
    "book_flight": (
        [
            "book me a flight to {city} {day}",
            "I want to fly from {city} to {city2}",
            "find flights to {city} leaving {day}",
            "get me a one way ticket to {city}",
            "can you book a round trip to {city} {day}",
            "I need a plane ticket to {city}",
            "any cheap flights from {city} to {city2} {day}",
            "reserve a seat on a flight to {city}",
            "book a flght to {city} for two adults",
        ],
        {"city": CITY, "city2": list(reversed(CITY)), "day": DAY},
    ),
    "flight_status": (
        [
            "is flight {airline} {number} on time",
            "has {airline}{number} been delayed",
            "what's the status of my flight to {city}",
            "when does flight {airline} {number} land",
            "is my {city} flight delayed",
            "did the {airline} {number} from {city} take off yet",
            "check the status of {airline}{number}",
            "which gate does {airline} {number} leave from",
            "is my flight to {city} cancelled",
        ],
        {"airline": AIRLINE, "number": FLIGHT_NO, "city": CITY},
    ),
    "weather": (
        [
            "what's the weather in {city} {day}",
            "will it rain {day}",
            "is it going to be cold in {city}",
            "do I need an umbrella {day}",
            "weather forecast for {city}",
            "how hot will it get {day}",
            "is it snowing in {city} right now",
            "what's the temperature outside",
            "any storms expected in {city} {day}",
            "whats the wether like {day}",
        ],
        {"city": CITY, "day": DAY},
    ),
    "set_alarm": (
        [
            "set an alarm for {time}",
            "wake me up at {time} {day}",
            "alarm at {time} please",
            "can you set my alarm to {time}",
            "I need to get up at {time}",
            "make an alarm for {time} every {weekday}",
            "set a wake up alarm {day} at {time}",
            "put an alrm on for {time}",
        ],
        {
            "time": TIME,
            "day": ["tomorrow", "on Friday", "next Monday", "on the 14th", "on saturday"],
            "weekday": WEEKDAY,
        },
    ),
    "play_music": (
        [
            "play {artist}",
            "put on some {artist}",
            "play {genre}",
            "I want to listen to {genre}",
            "can you play something by {artist}",
            "start a {genre} playlist",
            "shuffle songs by {artist}",
            "put some {genre} on in the kitchen",
            "play music by {artist} on the speaker",
        ],
        {"artist": ARTIST, "genre": GENRE},
    ),
    "order_food": (
        [
            "order {food}",
            "I want {food} delivered",
            "get me {food} for delivery",
            "can you order {food} from the usual place",
            "I'm hungry, order some {cuisine} food",
            "order {cuisine} takeout for {party}",
            "have {food} delivered to my house",
            "place a delivery order for {food} {day}",
            "ordr {food} please",
        ],
        {"food": FOOD, "cuisine": CUISINE, "party": PARTY, "day": ["tonight", "at 7", "for lunch", "right now"]},
    ),
    "restaurant_reservation": (
        [
            "book a table for {party} {day}",
            "reserve a table at {venue} for {party}",
            "can I get a reservation for {party} at {time}",
            "make a dinner reservation for {party} {day}",
            "I'd like to book {venue} {day}",
            "get us a table for {party} at {time} {day}",
            "is there a table free for {party} tonight",
            "reserve dinner at {venue} {day}",
            "book a resturant for {party} {day}",
        ],
        {"party": PARTY, "day": DAY, "venue": VENUE, "time": ["7pm", "8:30", "19:00", "half seven"]},
    ),
    "translate": (
        [
            "how do you say {phrase} in {language}",
            "translate {phrase} to {language}",
            "what is '{phrase}' in {language}",
            "translate this into {language}: {phrase}",
            "can you say {phrase} in {language} for me",
            "{language} for {phrase}",
            "how would I say {phrase} in {language}",
            "i need {phrase} translated to {language}",
        ],
        {"phrase": PHRASE, "language": LANGUAGE},
    ),
    "greeting": (
        [
            "{hello} {name}, how are you",
            "{hello}, how's it going {when}",
            "{hello} {name}, nice to meet you",
            "good {part}, {name}",
            "good {part}, how are you doing",
            "{hello}! what's up {name}",
            "{hello} {name}, you awake",
            "{hello}, is anyone listening",
            "{hello} {name}, long time no see",
        ],
        {
            "hello": ["hi", "hello", "hey", "hiya", "yo", "howdy", "helo", "hey hey"],
            "name": ["assistant", "buddy", "there", "friend"],
            "when": ["today", "this morning", "tonight"],
            "part": ["morning", "afternoon", "evening"],
        },
    ),
}

# an utterance starting with one of these gets a "?" rather than a "." or "!"
QUESTION_WORDS = {"what's", "whats", "what", "which", "when", "how"} | {"is", "are", "can", "do", "did", "does", "has"}
QUESTION_WORDS |= {"will", "am", "any"}
FIELD = re.compile(r"\{(\w+)\}")


def expand(template: str, slots: dict[str, list[str]]) -> list[str]:
    """Every filling of one template (the slots it names, in order of first appearance)."""
    names = list(dict.fromkeys(FIELD.findall(template)))
    return [
        template.format(**dict(zip(names, values, strict=True)))
        for values in itertools.product(*(slots[n] for n in names))
        if len(set(values)) == len(values)  # no "from Lisbon to Lisbon"
    ]


def key(text: str) -> str:
    return text.lower().rstrip(string.punctuation + " ")


def style(text: str, rng: random.Random) -> str:
    """Vary casing and end punctuation the way people type."""
    roll = rng.random()
    if roll < 0.45:
        text = text[0].upper() + text[1:]
    elif roll < 0.52:
        text = text.lower()
    end = rng.random()
    if end < 0.32:
        if text.split()[0].lower() in QUESTION_WORDS:
            text += "?"
        else:
            text += "." if end < 0.25 else "!"
    return text


def generate(seed: int = SEED) -> dict[str, list[str]]:
    """PER_INTENT unique utterances per intent, templates taken round-robin so every one of them contributes."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for label, (templates, slots) in INTENTS.items():
        pools = []
        for template in templates:
            filled = expand(template, slots)
            rng.shuffle(filled)
            pools.append(filled)
        picked: list[str] = []
        while len(picked) < PER_INTENT and any(pools):
            for pool in pools:
                while pool and len(picked) < PER_INTENT:
                    text = pool.pop()
                    words = len(text.split())
                    if not MIN_WORDS <= words <= MAX_WORDS:
                        continue
                    if key(text) in seen:
                        continue
                    seen[key(text)] = label
                    picked.append(style(text, rng))
                    break
        if len(picked) < PER_INTENT:
            raise SystemExit(f"{label}: only {len(picked)} unique utterances, want {PER_INTENT}")
        rng.shuffle(picked)
        out[label] = picked
    return out


def render(rows: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows)


def build(seed: int = SEED) -> dict[str, str]:
    """File name -> content: the first TRAIN_PER_INTENT of each intent train, the rest validation, both shuffled."""
    rng = random.Random(seed + 1)
    train: list[tuple[str, str]] = []
    validation: list[tuple[str, str]] = []
    for label, texts in generate(seed).items():
        train += [(t, label) for t in texts[:TRAIN_PER_INTENT]]
        validation += [(t, label) for t in texts[TRAIN_PER_INTENT:]]
    rng.shuffle(train)
    rng.shuffle(validation)
    return {"train.jsonl": render(train), "validation.jsonl": render(validation)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            path.write_text(content, encoding="utf-8", newline="\n")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run make_intents.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
