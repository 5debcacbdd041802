"""Words for the digit scenes: digit names, their synonyms, colour names, relations, captions.

``digit_scenes`` draws a scene (digits, colours, a relation) and asks this module for a caption;
the wording varies (synonyms "7", "seven", "the digit seven", "a handwritten seven", "the number
seven"; plural forms "three fives", "3 fives", "three 5s"; several sentence structures) so a
text-to-image model learns the meaning, not one template. Every caption is built from
``NounPhrase`` pieces, so the class, colour and relation it names are exactly those of the scene's
GenEval metadata.
"""
from __future__ import annotations

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL_NAMES = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights",
                "nines")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
# GenEval's relation names (djghosh13/geneval prompts) -> ways to say them.
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
RELATIONS = tuple(RELATION_PHRASES)


def article(word: str) -> str:
  """'a' or 'an' by the sound of ``word`` ('an eight', 'an 8', 'an orange', 'a one')."""
  if word == "8" or word.startswith("8") or word in ("eight", "eights", "eleven"):
    return "an"
  if word.startswith("one"):
    return "a"
  return "an" if word[:1] in "aeiou" else "a"


def singular(digit: int, rng: np.random.Generator, color: str | None = None) -> str:
  """A noun phrase naming one ``digit`` (and its ``color`` when given)."""
  name, numeral = DIGIT_NAMES[digit], str(digit)
  adj = f"{color} " if color else ""
  forms = [
      lambda: _with_article(f"{adj}{name}"),
      lambda: _with_article(f"{adj}{numeral}"),
      lambda: f"the {adj}digit {name}",
      lambda: f"the {adj}digit {numeral}",
      lambda: _with_article(f"{adj}handwritten {name}"),
      lambda: f"the number {name}" + (f" in {color}" if color else ""),
  ]
  return forms[int(rng.integers(len(forms)))]()


def plural(digit: int, count: int, rng: np.random.Generator, color: str | None = None) -> str:
  """A noun phrase naming ``count`` copies of ``digit`` ('three fives', '3 green 5s', ...)."""
  number = COUNT_WORDS[count] if rng.random() < 0.6 else str(count)
  name, numeral = PLURAL_NAMES[digit], f"{digit}s"
  adj = f"{color} " if color else ""
  forms = [
      lambda: f"{number} {adj}{name}",
      lambda: f"{number} {adj}{numeral}",
      lambda: f"{number} {adj}handwritten {name}",
      lambda: f"{number} copies of the digit {DIGIT_NAMES[digit]}" + (
          f" in {color}" if color else ""),
  ]
  return forms[int(rng.integers(len(forms)))]()


def _with_article(phrase: str) -> str:
  return f"{article(phrase.split()[0])} {phrase}"


def _frame(body: str, rng: np.random.Generator) -> str:
  frames = ("a photo of {}", "{}", "an image of {}", "a picture of {}")
  return frames[int(rng.integers(len(frames)))].format(body)


def single_digit_caption(digit: int, rng: np.random.Generator) -> str:
  """The single-digit mode's caption: 'a photo of <synonym>'."""
  return f"a photo of {singular(digit, rng)}"


def object_caption(digit: int, rng: np.random.Generator, color: str | None = None) -> str:
  """single_object and colors: one digit, named colour when given."""
  return _frame(singular(digit, rng, color), rng)


def pair_caption(digits: tuple[int, int], rng: np.random.Generator,
                 colors: tuple[str | None, str | None] = (None, None)) -> str:
  """two_object and color_attr: '<first> and <second>'."""
  first = singular(digits[0], rng, colors[0])
  second = singular(digits[1], rng, colors[1])
  return _frame(f"{first} and {second}", rng)


def counting_caption(digit: int, count: int, rng: np.random.Generator,
                     color: str | None = None) -> str:
  return _frame(plural(digit, count, rng, color), rng)


def position_caption(subject: int, relation: str, reference: int, rng: np.random.Generator,
                     colors: tuple[str | None, str | None] = (None, None)) -> str:
  """position: '<subject> <relation> <reference>' (GenEval: subject is include[1])."""
  phrases = RELATION_PHRASES[relation]
  said = phrases[int(rng.integers(len(phrases)))]
  return _frame(f"{singular(subject, rng, colors[0])} {said} "
                f"{singular(reference, rng, colors[1])}", rng)
