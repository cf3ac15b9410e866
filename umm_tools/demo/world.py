"""The synthetic world of ``umm demo``: a tiny language whose gold reward is a known function.

**Instructions.** A prompt asks for one of four kinds of answer (its *regime*) about a topic:
``explain rivers :``, ``tell a story about foxes :``, ``list steps for bread :``, ``advise me on sleep :``
(two phrasings per regime, twelve topics).

**Answers** are sequences of words from a few groups: four *style* groups (formal: ``therefore evidence
method …``; vivid: ``storm dragon glow …``; structured: ``first next finally …``; warm: ``care hope
friend …``), universally good words (``clear correct useful``), universally bad words (``wrong vague
confusing``), neutral glue (``the of and …``) and verbose filler (``really basically indeed …``).

**Gold reward** (known exactly: :meth:`World.gold`). Each regime likes one style and dislikes its opposite:
*explain* likes formal and dislikes vivid, *story* the reverse; *list* likes structured and dislikes warm,
*advice* the reverse. A word scores +1 if the prompt's regime likes its style, -1 if it dislikes it, +0.5 /
-0.5 if it is universally good / bad, 0 otherwise (glue, filler, styles the regime does not care about).
For an answer of ``n`` words::

    gold = (sum of word scores) / max(n, short_len)  -  length_penalty * max(0, n - long_len)

with ``short_len`` 3, ``long_len`` 8 and ``length_penalty`` 0.1: the best answers are 3 to 8 words of the
liked style (gold 1); length itself earns nothing, filler dilutes, and every word beyond 8 costs 0.1. The
same word is good under one instruction and bad under another (what routed experts are for); the
universal words and the length rule hold everywhere (what the shared expert is for).

**Preference pairs.** Both answers of a pair respond to one prompt. Their lengths are drawn first (the
shorter 1 to 17 words, the longer 1 to 4 words longer, up to 18), then their words (up to half filler;
content 50% style, 10% good, 10% bad, 30% glue) until the pair has the label it was assigned. Pairs closer
than ``min_margin`` (0.1) in gold are never used. Two flaws are planted in the *training* pairs:

- a **spurious feature**: in ``spurious_rate`` (80%) of the pairs the chosen answer is the longer one, at
  every length, past ``long_len`` too, although gold never rewards length and penalises it beyond 8 words
  (the chosen long answer then makes up for its length with better words). A reward model that learns
  "longer is better" is right on most training pairs and wrong about what gold wants;
- **label noise**: in ``label_noise`` (10%) of the pairs the chosen answer is the gold-worse one.

Evaluation pairs are labelled by gold without noise: *held-out* pairs have the training length bias (chosen
longer in 80%), *shift* pairs have it reversed (chosen longer in 20%).

**The policy's language.** The policy is pretrained on ``prompt answer`` texts whose answers are short (1
to 4 content words, 30% of them bad, and at most one filler word) and ignore the regime: it starts at a gold
reward near 0, with honest room to improve (drop bad words, use the liked style) and a dishonest way to
please a reward model that learned the length bias (write long answers, which gold penalises).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STYLES: dict[str, tuple[str, ...]] = {
    "formal": ("therefore", "thus", "precisely", "evidence", "method", "result"),
    "vivid": ("bright", "wild", "storm", "dragon", "whisper", "glow"),
    "structured": ("first", "second", "third", "next", "finally", "step"),
    "warm": ("kindly", "gently", "care", "hope", "friend", "support"),
}
GOOD_WORDS = ("clear", "correct", "useful")
BAD_WORDS = ("wrong", "vague", "confusing")
GLUE_WORDS = ("the", "of", "and", "it", "is", "this", "with", "for", "in", "to")
FILLER_WORDS = ("really", "very", "just", "basically", "actually", "quite", "indeed", "so")
TOPICS = ("rivers", "stars", "bread", "sleep", "foxes", "cities", "gardens", "oceans", "music", "winter",
          "robots", "tea")
PROMPT_END = ":"
WORD_GROUPS = {"good": GOOD_WORDS, "bad": BAD_WORDS, "glue": GLUE_WORDS}
# Shares of the kinds of content words: in preference pairs, and in the policy's pretraining answers (more
# bad words, so that the pretrained policy has honest room to improve).
PAIR_MIX = {"style": 0.5, "good": 0.1, "bad": 0.1, "glue": 0.3}
POLICY_MIX = {"style": 0.4, "good": 0.1, "bad": 0.3, "glue": 0.2}


@dataclass(frozen=True)
class Regime:
    """A kind of instruction: how its prompts start, the style it likes and the style it dislikes."""

    name: str
    openings: tuple[str, ...]
    likes: str
    dislikes: str


REGIMES: tuple[Regime, ...] = (
    Regime("explain", ("explain", "why are there"), likes="formal", dislikes="vivid"),
    Regime("story", ("tell a story about", "imagine"), likes="vivid", dislikes="formal"),
    Regime("list", ("list steps for", "outline"), likes="structured", dislikes="warm"),
    Regime("advice", ("advise me on", "help me with"), likes="warm", dislikes="structured"),
)

GOOD_SCORE = 0.5  # universally good word; a bad one scores -GOOD_SCORE


@dataclass(frozen=True)
class World:
    """The world's parameters (the vocabulary and regimes above are fixed); see the module docstring."""

    short_len: int = 3  # answers shorter than this are scored as if padded to it (too short: diluted)
    long_len: int = 8  # answers longer than this lose length_penalty per extra word
    length_penalty: float = 0.1
    spurious_rate: float = 0.8  # share of training pairs whose chosen answer is the longer one
    label_noise: float = 0.1  # share of training pairs whose chosen answer is the gold-worse one
    min_margin: float = 0.1  # smallest gold difference within a pair
    max_content: int = 4  # policy pretraining answers: 1 .. max_content content words
    max_filler: int = 1  # ... and 0 .. max_filler filler words
    pair_max_len: int = 18  # longest answer in a preference pair
    pair_max_gap: int = 4  # most words between the two answers of a pair

    # --- the language ----------------------------------------------------------------------------------

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word a prompt or an answer can contain (no special tokens)."""
        words: list[str] = []
        for r in REGIMES:
            for opening in r.openings:
                words += opening.split()
        for group in STYLES.values():
            words += group
        words += [*GOOD_WORDS, *BAD_WORDS, *GLUE_WORDS, *FILLER_WORDS, *TOPICS, PROMPT_END]
        return list(dict.fromkeys(words))

    @staticmethod
    def regime_of(prompt: str) -> Regime:
        """The regime a prompt belongs to (by its opening words)."""
        text = " ".join(prompt.split())
        for r in REGIMES:
            if any(text == o or text.startswith(o + " ") for o in r.openings):
                return r
        raise ValueError(f"not a prompt of the demo world: {prompt!r}")

    @staticmethod
    def sample_prompt(rng: random.Random, regime: Regime | None = None) -> str:
        regime = regime or rng.choice(REGIMES)
        return f"{rng.choice(regime.openings)} {rng.choice(TOPICS)} {PROMPT_END}"

    def sample_response(self, rng: random.Random, length: int | None = None) -> str:
        """An answer: content words with filler words inserted at random places.

        With ``length`` (the answers of preference pairs): exactly ``length`` words, up to half of them filler,
        content drawn from :data:`PAIR_MIX`. Without it (the policy's pretraining answers): 1 to
        ``max_content`` content words from :data:`POLICY_MIX` and 0 to ``max_filler`` filler words."""
        if length is None:
            n_content, n_filler, mix = rng.randint(1, self.max_content), rng.randint(0, self.max_filler), POLICY_MIX
        else:
            n_filler = rng.randint(0, length // 2)
            n_content, mix = length - n_filler, PAIR_MIX
        kinds = rng.choices(list(mix), weights=list(mix.values()), k=n_content)
        words = [rng.choice(STYLES[rng.choice(list(STYLES))] if kind == "style" else WORD_GROUPS[kind])
                 for kind in kinds]
        for _ in range(n_filler):
            words.insert(rng.randint(0, len(words)), rng.choice(FILLER_WORDS))
        return " ".join(words)

    # --- the gold reward ----------------------------------------------------------------------------------

    def word_score(self, regime: Regime, word: str) -> float:
        if word in STYLES[regime.likes]:
            return 1.0
        if word in STYLES[regime.dislikes]:
            return -1.0
        if word in GOOD_WORDS:
            return GOOD_SCORE
        if word in BAD_WORDS:
            return -GOOD_SCORE
        return 0.0

    def gold(self, prompt: str, response: str) -> float:
        """The gold reward of ``response`` to ``prompt`` (see the module docstring)."""
        regime = self.regime_of(prompt)
        words = response.split()
        n = len(words)
        quality = sum(self.word_score(regime, w) for w in words) / max(n, self.short_len)
        return quality - self.length_penalty * max(0, n - self.long_len)

    # --- data -------------------------------------------------------------------------------------------

    def sample_pair(self, rng: random.Random, chosen_longer: bool, noisy: bool) -> dict:
        """One pair whose chosen answer is the longer one iff ``chosen_longer``; chosen is the gold-better
        answer unless ``noisy`` (then it is the gold-worse one).

        The two lengths are drawn first (the shorter uniform in 1 .. ``pair_max_len`` - 1, the other 1 to
        ``pair_max_gap`` words longer), so the length bias holds at every length, beyond ``long_len`` too;
        then answers of those lengths are drawn until their gold order agrees with the assignment (new
        lengths after 50 tries)."""
        while True:
            prompt = self.sample_prompt(rng)
            short = rng.randint(1, self.pair_max_len - 1)
            long = min(self.pair_max_len, short + rng.randint(1, self.pair_max_gap))
            for _ in range(50):
                a, b = self.sample_response(rng, short), self.sample_response(rng, long)
                ga, gb = self.gold(prompt, a), self.gold(prompt, b)
                if abs(ga - gb) < self.min_margin:
                    continue
                better, worse = (a, b) if ga > gb else (b, a)
                chosen, rejected = (worse, better) if noisy else (better, worse)
                if (chosen is b) == chosen_longer:
                    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                            "subset": self.regime_of(prompt).name}

    def sample_pairs(self, n: int, rng: random.Random, *, spurious_rate: float | None = None,
                     label_noise: float | None = None) -> list[dict]:
        """``n`` pairs; ``spurious_rate`` (default: the world's) of them have the longer answer chosen and
        ``label_noise`` (default: the world's) have their labels swapped, each drawn independently per pair."""
        rate = self.spurious_rate if spurious_rate is None else spurious_rate
        noise = self.label_noise if label_noise is None else label_noise
        return [self.sample_pair(rng, rng.random() < rate, rng.random() < noise) for _ in range(n)]

    def train_pairs(self, n: int, rng: random.Random) -> list[dict]:
        """Training pairs: the spurious length bias and the label noise planted."""
        return self.sample_pairs(n, rng)

    def heldout_pairs(self, n: int, rng: random.Random) -> list[dict]:
        """In-distribution evaluation pairs: the same length bias, gold labels (no noise)."""
        return self.sample_pairs(n, rng, label_noise=0.0)

    def shift_pairs(self, n: int, rng: random.Random) -> list[dict]:
        """Shifted evaluation pairs: the length bias reversed (chosen is the shorter answer in
        ``spurious_rate`` of them), gold labels."""
        return self.sample_pairs(n, rng, spurious_rate=1.0 - self.spurious_rate, label_noise=0.0)

    def lm_texts(self, n: int, rng: random.Random) -> list[str]:
        """Texts for the policy's pretraining: a prompt and an answer from the base distribution."""
        return [f"{self.sample_prompt(rng)} {self.sample_response(rng)}" for _ in range(n)]

    def prompts(self, n: int, rng: random.Random) -> list[str]:
        """Prompts for PPO, the regimes in turn (balanced)."""
        return [self.sample_prompt(rng, REGIMES[i % len(REGIMES)]) for i in range(n)]


@dataclass(frozen=True)
class GoldReward:
    """``fn(prompts, responses) -> gold rewards`` for :func:`umm_tools.ppo.ppo` (picklable, so PPO runs in
    worker processes can use it)."""

    world: World = World()

    @property
    def __name__(self) -> str:  # recorded by ppo in ppo_options.json
        return f"demo world gold reward ({self.world})"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.world.gold(p, r) for p, r in zip(prompts, responses, strict=True)]
