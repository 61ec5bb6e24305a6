"""What the property tests of both state machines share: settings, any JSON, the writable-status check."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kubetune.api.schema import strict_json_schema
from kubetune.api.validation import root_schema

PROPERTIES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NS = "team-a"
NOW = "2026-11-28T12:00:00Z"
TIMES = st.sampled_from(["2026-11-28T11:00:00Z", "2026-11-28T11:59:30Z", NOW, "2026-11-28T12:00:30Z",
                         "2026-11-20T00:00:00Z"])
DIGESTS = tuple("sha256:" + c * 64 for c in "abc")
RANKS = (4, 8, 16, 32, 64)
FTJ_STATUS_SCHEMA = jsonschema.Draft4Validator(strict_json_schema(root_schema("FineTuneJob")["properties"]["status"]))
ADEP_STATUS_SCHEMA = jsonschema.Draft4Validator(
    strict_json_schema(root_schema("AdapterDeployment")["properties"]["status"]))

# --- any JSON (what json.loads gives for a file or an annotation; Python reads NaN and Infinity too) ------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)
NUMBERISH = st.one_of(st.floats(), st.integers(-5, 10**6), st.none(), st.text(max_size=6), st.booleans(),
                      st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 2.0]))
METRIC_NAMES = st.sampled_from(["eval_loss", "accuracy", "macro_f1", "perplexity", "loss", ""])
GARBAGE_METRICS = st.one_of(ANY_JSON, st.dictionaries(METRIC_NAMES, NUMBERISH, max_size=4))
FINITE = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)


def status_errors(validator: jsonschema.Draft4Validator, status: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(status)]


def pruned(value: object) -> object:
    """The API server prunes null fields (not `nullable`) before it validates, as a merge patch drops them."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def assert_writable(status: dict, validator: jsonschema.Draft4Validator) -> None:
    """What the API server's status subresource would accept."""
    json.dumps(status, allow_nan=False)  # ValueError on NaN/Infinity anywhere
    assert status_errors(validator, pruned(status)) == []
