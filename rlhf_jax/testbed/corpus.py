"""Synthetic movie reviews for the sentiment testbed (after DPO, Rafailov et al. 2023, 6.1).

A small grammar writes short reviews (one to four sentences, ASCII, at most `max_chars`
bytes: 120 by default, so that a review plus BOS/EOS fits a byte-level model's
128-token context). Each review draws a latent sentiment `s ~ U(-1, 1)`; each sentence
is a neutral filler, a rating out of 10, or a polar sentence that is positive with
probability `0.46 + 0.48 s` (mostly matching `s`, sometimes not), so reviews run from
very negative through mixed to very positive. Polar sentences use adjectives, verbs and
verdicts of both signs (most from VADER's lexicon, some not: "tedious", "witty"),
negation ("is not good", "never", "didn't"), intensifiers ("very", "extremely", "really",
which VADER boosts), dampeners ("somewhat"), contrast ("..., but ...") and exclamation
marks. The latent `s` is never exposed: the gold reward is VADER.

Everything is a function of the seed: a `random.Random` per call, no global RNG state.
"""

import random
from typing import Sequence

import numpy as np

# Adjectives: (mild, strong) per polarity. Most are VADER lexicon words; a few are not,
# so the gold reward misses some of the sentiment a reader would see.
_POS_MILD = (
    "good", "nice", "fine", "fun", "funny", "enjoyable", "pleasant", "solid", "clever",
    "smart", "engaging", "interesting", "sweet", "warm", "cool", "lively", "original",
    "creative", "honest", "compelling", "fresh", "decent", "witty", "moving", "touching",
    "satisfying", "entertaining", "intelligent", "bold")
_POS_STRONG = (
    "great", "excellent", "wonderful", "brilliant", "amazing", "superb", "beautiful",
    "delightful", "fantastic", "gorgeous", "magnificent", "perfect", "remarkable",
    "stunning", "terrific", "thrilling", "awesome", "outstanding", "marvelous", "splendid",
    "glorious", "joyful", "fabulous", "triumphant", "hilarious", "impressive", "powerful",
    "inspiring", "exciting", "heartwarming", "lovely", "elegant", "charming", "graceful")
_NEG_MILD = (
    "weak", "dull", "boring", "messy", "confusing", "flat", "predictable", "bland",
    "tedious", "mediocre", "forgettable", "shallow", "clumsy", "cheap", "lame", "empty",
    "foolish", "ridiculous", "annoying", "overrated", "pretentious", "sloppy", "frustrating",
    "irritating", "lifeless")
_NEG_STRONG = (
    "bad", "awful", "terrible", "horrible", "stupid", "poor", "ugly", "painful", "pathetic",
    "disappointing", "dreadful", "disgusting", "worthless", "miserable", "depressing",
    "offensive", "idiotic", "dumb", "nasty", "crappy", "incompetent", "embarrassing",
    "disastrous", "insulting", "unpleasant", "lousy", "unbearable", "pointless", "gross")
_ADJ = {(1, False): _POS_MILD, (1, True): _POS_STRONG,
        (-1, False): _NEG_MILD, (-1, True): _NEG_STRONG}

# First-person verbs: (past, base) per polarity.
_VERB_1P = {
    1: (("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like"), ("adored", "adore"),
        ("admired", "admire"), ("appreciated", "appreciate"), ("cherished", "cherish")),
    -1: (("hated", "hate"), ("disliked", "dislike"), ("despised", "despise"),
         ("loathed", "loathe"), ("resented", "resent"), ("regretted", "regret")),
}
# Third-person verbs: (singular, plural) per polarity.
_VERB_3P = {
    1: (("succeeds", "succeed"), ("delights", "delight"), ("impresses", "impress"),
        ("excels", "excel"), ("entertains", "entertain"), ("inspires", "inspire"),
        ("charms", "charm"), ("amazes", "amaze"), ("satisfies", "satisfy"),
        ("works", "work"), ("shines", "shine")),
    -1: (("fails", "fail"), ("bores", "bore"), ("disappoints", "disappoint"),
         ("drags", "drag"), ("annoys", "annoy"), ("confuses", "confuse"),
         ("irritates", "irritate"), ("stinks", "stink"), ("sucks", "suck")),
}
_NOT_1P = ("did not", "didn't", "could not")
_VERB_TAIL = ("", "", " from start to finish", " at every turn", " in the end",
              " most of the time", " again and again")

_INTENSIFIERS = ("very", "extremely", "really", "so", "quite", "incredibly",
                 "absolutely", "totally", "truly", "utterly", "thoroughly", "deeply")
_DAMPENERS = ("somewhat", "slightly", "a bit", "kind of", "fairly", "rather")
_ADVERBS_1P = ("really", "truly", "absolutely", "totally", "just", "honestly")

# Subjects: (text, plural). Nouns that VADER scores ("villain", "jokes", "humor") are
# left out so that subjects are neutral.
_SUBJECTS = (
    ("the film", False), ("this movie", False), ("the movie", False),
    ("this film", False), ("the plot", False), ("the acting", False),
    ("the director", False), ("the script", False), ("the soundtrack", False),
    ("the ending", False), ("the dialogue", False), ("the cast", False),
    ("the story", False), ("the pacing", False), ("the cinematography", False),
    ("the score", False), ("the editing", False), ("the final act", False),
    ("the first half", False), ("the second half", False), ("the lead", False),
    ("the effects", True), ("the characters", True), ("the action scenes", True),
    ("the costumes", True), ("the visuals", True), ("the twists", True))
_NAMES = ("Anna Reyes", "Jack Morrow", "Lena Park", "Omar Haddad", "Sofia Marin",
          "David Cole", "Mia Chen", "Victor Hale", "Nora Quinn", "Sam Baker",
          "Ruth Adler", "Leo Grant", "Ines Duval", "Kofi Mensah", "Yuki Sato")
_ROLES = ("detective", "mother", "captain", "young doctor", "teacher", "pilot", "chef",
          "widow", "boxer", "painter", "journalist", "king", "stranger", "farmer")
_NOUNS = ("film", "movie", "story", "debut", "sequel", "ride", "script", "experience",
          "thriller", "comedy", "drama", "western", "musical", "mystery")
_OBJECTS = ("it", "it", "this movie", "the film", "the ending", "the acting",
            "every minute of it", "the story", "the soundtrack", "the cast")
_BE = {(False, False): ("is", "isn't"), (True, False): ("are", "aren't"),
       (False, True): ("was", "wasn't"), (True, True): ("were", "weren't")}

_VERDICTS = {
    1: ("A must see.", "Worth every minute.", "I would recommend it to anyone.",
        "Highly recommended.", "One of the best films of the year.",
        "Easily the best {noun} this year.", "I want to see it again.",
        "Go see it.", "A real treat."),
    -1: ("Avoid it at all costs.", "A total waste of time.", "Skip this one.",
         "One of the worst films of the year.", "Easily the worst {noun} this year.",
         "I want my two hours back.", "What a mess.", "Do not bother.",
         "I would not recommend it to anyone."),
}

_CITIES = ("Paris", "Tokyo", "Rome", "Berlin", "Chicago", "Cairo", "Lagos", "Seoul",
           "Mumbai", "Lisbon", "a small town", "the city", "a village")
_DAYS = ("Sunday", "Monday", "Friday", "Saturday", "Tuesday")
_RELATIVES = ("brother", "sister", "father", "mother", "wife", "husband", "cousin",
              "roommate", "son", "daughter")
_SOURCES = ("book", "comic", "short story", "stage show", "video game")
_FILLERS = (
    "I saw it on a {day}.", "It runs about {minutes} minutes.", "The film is set in {city}.",
    "My {relative} picked it.", "It is based on a {source}.", "I watched it at home.",
    "I saw it in the theater.", "The story follows a {role} in {city}.",
    "It came out in {year}.", "The film stars {name} and {name2}.",
    "{name} stars as a {role}.", "It is the second film by the director.",
    "I went in knowing nothing.", "The story takes place over one night.",
    "It was shot in {city}.", "We watched it after dinner.", "It is in black and white.",
    "The trailer shows most of the plot.", "It is a remake of an older film.")


def _pick(rng: random.Random, seq):
  return seq[int(rng.random() * len(seq))]


def _a(word: str) -> str:
  return ("an " if word[0] in "aeiou" or word.startswith("honest") else "a ") + word


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def _subject(rng: random.Random):
  if rng.random() < 0.15:
    return _pick(rng, _NAMES), False
  return _pick(rng, _SUBJECTS)


def _modifier(rng: random.Random, strength: float) -> str:
  """An intensifier (more likely for strong sentiment), a dampener, or nothing."""
  u = rng.random()
  if u < 0.1 + 0.35 * strength:
    return _pick(rng, _INTENSIFIERS) + " "
  if u < 0.1 + 0.35 * strength + 0.15 * (1.0 - strength):
    return _pick(rng, _DAMPENERS) + " "
  return ""


def _adjective(rng: random.Random, polarity: int, strength: float) -> str:
  return _pick(rng, _ADJ[polarity, rng.random() < 0.25 + 0.6 * strength])


def _end(rng: random.Random, strength: float) -> str:
  return "!" if rng.random() < 0.25 * strength else "."


def _copula(rng, polarity, strength, past):
  """'The plot is very good.' or, negated, 'The plot isn't good at all.'"""
  subj, plural = _subject(rng)
  be, be_not = _BE[plural, past]
  if rng.random() < 0.15:  # negating the opposite adjective keeps the polarity
    adj = _adjective(rng, -polarity, strength)
    form = _pick(rng, ("{be} not {adj}", "{be_not} {adj}", "{be} never {adj}",
                       "{be} not {adj} at all"))
    return f"{_cap(subj)} {form.format(be=be, be_not=be_not, adj=adj)}."
  adj = _adjective(rng, polarity, strength)
  return f"{_cap(subj)} {be} {_modifier(rng, strength)}{adj}{_end(rng, strength)}"


def _first_person(rng, polarity, strength):
  """'I really loved the ending.' or 'I didn't enjoy it.'"""
  obj = _pick(rng, _OBJECTS)
  if rng.random() < 0.15:
    _, base = _pick(rng, _VERB_1P[-polarity])
    return f"I {_pick(rng, _NOT_1P)} {base} {obj}."
  past, _ = _pick(rng, _VERB_1P[polarity])
  adv = _pick(rng, _ADVERBS_1P) + " " if rng.random() < 0.1 + 0.3 * strength else ""
  return f"I {adv}{past} {obj}{_end(rng, strength)}"


def _third_person(rng, polarity, strength):
  """'The cast shines from start to finish.' or 'The plot never fails.'"""
  subj, plural = _subject(rng)
  if rng.random() < 0.15:
    sing, plur = _pick(rng, _VERB_3P[-polarity])
    return f"{_cap(subj)} never {plur if plural else sing}."
  sing, plur = _pick(rng, _VERB_3P[polarity])
  verb = plur if plural else sing
  return f"{_cap(subj)} {verb}{_pick(rng, _VERB_TAIL)}{_end(rng, strength)}"


def _exclaim(rng, polarity, strength):
  """'What a brilliant film!'"""
  adj = _adjective(rng, polarity, strength)
  return f"What {_a(adj)} {_pick(rng, _NOUNS)}!"


def _actor(rng, polarity, strength, past):
  """'Mia Chen gives a superb performance.' / 'Leo Grant is dull as the captain.'"""
  name = _pick(rng, _NAMES)
  adj = _adjective(rng, polarity, strength)
  if rng.random() < 0.5:
    verb = "gave" if past else "gives"
    return (f"{name} {verb} {_a(_modifier(rng, strength) + adj)} "
            f"performance{_end(rng, strength)}")
  be = "was" if past else "is"
  return (f"{name} {be} {_modifier(rng, strength)}{adj} as the "
          f"{_pick(rng, _ROLES)}{_end(rng, strength)}")


def _contrast(rng, polarity, strength, past):
  """'The acting is good, but the plot is awful.' The clause after 'but' has `polarity`."""
  s1, p1 = _subject(rng)
  s2, p2 = _subject(rng)
  while s2 == s1:
    s2, p2 = _subject(rng)
  a1 = _adjective(rng, -polarity, 0.0)
  a2 = _adjective(rng, polarity, strength)
  return (f"{_cap(s1)} {_BE[p1, past][0]} {a1}, but {s2} {_BE[p2, past][0]} "
          f"{_modifier(rng, strength)}{a2}{_end(rng, strength)}")


def _verdict(rng, polarity):
  return _pick(rng, _VERDICTS[polarity]).replace("{noun}", _pick(rng, _NOUNS))


def _rating(rng, s):
  """A score out of 10 that tracks the latent sentiment (VADER ignores it); and the score."""
  score = min(10, max(1, int(round(5.5 + 4.5 * s + 1.5 * rng.gauss(0.0, 1.0)))))
  template = _pick(rng, ("I give it {} out of 10.", "{}/10.", "{} out of 10."))
  return template.format(score), score


def _filler(rng):
  i = int(rng.random() * len(_NAMES))
  j = (i + 1 + int(rng.random() * (len(_NAMES) - 1))) % len(_NAMES)  # j != i
  return _pick(rng, _FILLERS).format(
      day=_pick(rng, _DAYS), minutes=90 + 5 * int(rng.random() * 13),
      city=_pick(rng, _CITIES), relative=_pick(rng, _RELATIVES),
      source=_pick(rng, _SOURCES), role=_pick(rng, _ROLES),
      year=1970 + int(rng.random() * 55), name=_NAMES[i], name2=_NAMES[j])


def sentence_and_polarity(rng: random.Random, s: float, past: bool) -> tuple[str, float]:
  """One sentence for a review with latent sentiment `s` in [-1, 1], and the polarity the
  grammar gave it: +1 / -1 for a polar sentence (its clause after 'but' for a contrast,
  the intended sign under a negation), (score - 5.5) / 4.5 for a rating, 0 for a filler."""
  u = rng.random()
  if u < 0.18:
    return _filler(rng), 0.0
  if u < 0.23:
    text, score = _rating(rng, s)
    return text, (score - 5.5) / 4.5
  strength = abs(s)
  # VADER scores positive words higher than negative ones; a slight tilt to negative
  # sentences centres the corpus.
  polarity = 1 if rng.random() < 0.46 + 0.48 * s else -1
  u = rng.random()
  if u < 0.34:
    text = _copula(rng, polarity, strength, past)
  elif u < 0.50:
    text = _first_person(rng, polarity, strength)
  elif u < 0.60:
    text = _third_person(rng, polarity, strength)
  elif u < 0.70:
    text = _exclaim(rng, polarity, strength)
  elif u < 0.82:
    text = _actor(rng, polarity, strength, past)
  elif u < 0.92:
    text = _contrast(rng, polarity, strength, past)
  else:
    text = _verdict(rng, polarity)
  return text, float(polarity)


def _sentence(rng: random.Random, s: float, past: bool) -> str:
  return sentence_and_polarity(rng, s, past)[0]


_NUM_SENTENCES_CDF = (0.15, 0.5, 0.82)  # P(<= 1), P(<= 2), P(<= 3) sentences; at most 4


def _review(rng: random.Random, max_chars: int) -> str:
  s = 2.0 * rng.random() - 1.0
  past = rng.random() < 0.3
  u = rng.random()
  num = 1 + sum(u >= c for c in _NUM_SENTENCES_CDF)
  text = ""
  for _ in range(num):
    sentence = _sentence(rng, s, past)
    if len(text) + 1 + len(sentence) > max_chars:
      break
    text = f"{text} {sentence}" if text else sentence
  # A prompt needs >= 2 words and a rest. (Also redraws a first sentence longer than a
  # small max_chars.)
  while text.count(" ") < 2:
    sentence = _sentence(rng, s, past)
    if len(text) + 1 + len(sentence) <= max_chars:
      text = f"{text} {sentence}" if text else sentence
  return text


def _check_seed(seed, where: str) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"corpus.{where}: seed must be an int, got {seed!r}")
  if seed < 0:
    raise ValueError(f"corpus.{where}: seed must be >= 0, got {seed}")
  return int(seed)


def generate_reviews(seed: int, n: int, max_chars: int = 120) -> list[str]:
  """`n` reviews, a deterministic function of `seed` (at most `max_chars` bytes each)."""
  if n < 0:
    raise ValueError(f"corpus.generate_reviews: n must be >= 0, got {n}")
  if max_chars < 60:
    raise ValueError(f"corpus.generate_reviews: max_chars must be >= 60, got {max_chars}")
  rng = random.Random(_check_seed(seed, "generate_reviews"))
  return [_review(rng, max_chars) for _ in range(n)]


def _stream_seed(seed: int, stream: int) -> int:
  """An independent 128-bit seed for sub-stream `stream` of `seed`."""
  state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(4, np.uint32)
  return int.from_bytes(state.astype("<u4").tobytes(), "little")


_TRAIN_STREAM, _TEST_STREAM, _PROMPT_STREAM = 0, 1, 2


def corpus_splits(seed: int, num_train: int = 100_000, num_test: int = 5_000,
                  max_chars: int = 120) -> dict[str, list[str]]:
  """{'train': [...], 'test': [...]} from independent seed streams of `seed`.

  The test split is held out in the sense of being drawn independently; short reviews
  can occur in both (see `split_overlap`).
  """
  seed = _check_seed(seed, "corpus_splits")
  return {
      "train": generate_reviews(_stream_seed(seed, _TRAIN_STREAM), num_train, max_chars),
      "test": generate_reviews(_stream_seed(seed, _TEST_STREAM), num_test, max_chars),
  }


def split_overlap(train: Sequence[str], test: Sequence[str]) -> float:
  """Fraction of `test` reviews that also occur verbatim in `train`."""
  if not test:
    return 0.0
  train_set = set(train)
  return sum(r in train_set for r in test) / len(test)


def _split_points(reviews: Sequence[str], seed: int, min_words: int, max_words: int,
                  where: str) -> list[int]:
  """Character index where each prompt ends: after 2..8 words, never the whole review."""
  if not 1 <= min_words <= max_words:
    raise ValueError(f"corpus.{where}: need 1 <= min_words <= max_words, "
                     f"got min_words={min_words}, max_words={max_words}")
  rng = random.Random(_stream_seed(_check_seed(seed, where), _PROMPT_STREAM))
  ends = []
  for i, review in enumerate(reviews):
    if not isinstance(review, str):
      raise ValueError(f"corpus.{where}: reviews[{i}] is {type(review).__name__}, not str")
    words = review.split(" ")
    if any(not w for w in words):
      raise ValueError(f"corpus.{where}: reviews[{i}] must be words joined by single "
                       f"spaces, got {review!r}")
    hi = min(max_words, len(words) - 1)  # leave at least one word to continue
    if hi < min_words:
      raise ValueError(f"corpus.{where}: reviews[{i}] has {len(words)} words, needs "
                       f"more than min_words={min_words}: {review!r}")
    k = min_words + int(rng.random() * (hi - min_words + 1))
    ends.append(sum(len(w) for w in words[:k]) + k - 1)
  return ends


def prompts_from_reviews(reviews: Sequence[str], seed: int, min_words: int = 2,
                         max_words: int = 8) -> list[str]:
  """Prefixes of `reviews` of `min_words..max_words` words (uniform), without the space.

  A prompt never covers a whole review, so the policy always has something to write.
  """
  ends = _split_points(reviews, seed, min_words, max_words, "prompts_from_reviews")
  return [r[:e] for r, e in zip(reviews, ends)]


def demonstrations(reviews: Sequence[str], seed: int, min_words: int = 2,
                   max_words: int = 8) -> list[dict[str, str]]:
  """SFT demonstrations: [{'prompt': prefix, 'response': rest}], prompt + response == review.

  The split point is that of `prompts_from_reviews` with the same seed; the response
  starts with the space that followed the prompt.
  """
  ends = _split_points(reviews, seed, min_words, max_words, "demonstrations")
  return [{"prompt": r[:e], "response": r[e:]} for r, e in zip(reviews, ends)]
