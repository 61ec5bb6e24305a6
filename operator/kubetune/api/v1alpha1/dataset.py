"""FineTuneJob's spec.dataset: where the data is, its format, how it is split and checked."""

from __future__ import annotations

from ..schema import integer, number, obj, string
from .common import STORAGE_URI, s3_credentials, s3_endpoint

DATASET_FORMATS = ("prompt-completion", "chat", "text", "text-label")
LEAKAGE_POLICIES = ("Drop", "Fail", "Warn")

DATASET = obj(
    "Training data: JSON Lines, one example per line.",
    {
        "uri": string("JSONL file: s3://BUCKET/KEY or file:///PATH.", pattern=STORAGE_URI, max_length=1024),
        "format": string(
            "Line format. prompt-completion: {prompt, completion}; chat: {messages: [{role, content}]}; "
            "text: {text}; text-label: {text, label} for sequence classification.",
            enum=DATASET_FORMATS,
        ),
        "validationUri": string(
            "Optional separate validation file; when set, validationSplit is not used.",
            pattern=STORAGE_URI,
            max_length=1024,
        ),
        "validationSplit": number(
            "Fraction of the data held out for evaluation when no validationUri is given.",
            default=0.1,
            minimum=0,
            maximum=0.5,
        ),
        "stratifyBy": string(
            "Field whose values must appear in both splits in proportion (defaults to the label for "
            "text-label data).",
            max_length=128,
        ),
        "seed": integer("Seed of the shuffle and the split.", default=42, minimum=0),
        "leakage": string(
            "Validation rows whose text also appears in training (matched ignoring case, whitespace and "
            "punctuation). Drop: remove them from validation; Fail: refuse the dataset; Warn: keep them. "
            "Counted in status.data.leakage and an Event.",
            default="Drop",
            enum=list(LEAKAGE_POLICIES),
        ),
        "maxInvalidFraction": number(
            "Share of invalid lines tolerated (skipped and reported). 0 rejects the dataset on the first "
            "error class, before any GPU time is spent.",
            default=0.0,
            minimum=0,
            maximum=1,
        ),
        "s3": obj(
            "Access to the data when uri is s3://. Defaults to the output's endpoint and credentials.",
            {"endpoint": s3_endpoint(), "credentials": s3_credentials("the data bucket")},
        ),
    },
    required=["uri", "format"],
)
