"""Kubernetes' value rules, checked against cases from apimachinery's validation_test.go."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from kubetune.api import k8s_values as kv


@pytest.mark.parametrize("value", ["a", "abc", "a-1", "0", "a" * 63, "1-a"])
def test_dns1123_label_accepts(value):
    assert kv.dns1123_label(value) == []


@pytest.mark.parametrize("value", ["", "A", "-a", "a-", "a_b", "a.b", "a" * 64])
def test_dns1123_label_refuses(value):
    assert kv.dns1123_label(value)


def test_dns1035_label_needs_a_letter_first():
    assert kv.dns1035_label("abc-1") == []
    assert "start with an alphabetic character" in kv.dns1035_label("1abc")[0]
    assert kv.dns1035_label("a" * 64) == ["must be no more than 63 characters"]


@pytest.mark.parametrize("value", ["a.b", "a-b.c-d", "example.com", "a" * 253])
def test_dns1123_subdomain(value):
    assert kv.dns1123_subdomain(value) == []
    assert kv.dns1123_subdomain(value.upper())


@pytest.mark.parametrize("key", ["app", "kubetune.io/job", "a.b/c_d.e-f", "A/b"[2:], "Simple_Key"])
def test_qualified_name_accepts(key):
    assert kv.qualified_name(key) == []


@pytest.mark.parametrize("key,part", [("/a", "prefix part must be non-empty"), ("a/", "name part must be non-empty"),
                                      ("Example.com/a", "prefix part"), ("a/-b", "name part must consist"),
                                      ("x" * 64, "no more than 63")])
def test_qualified_name_refuses(key, part):
    assert any(part in message for message in kv.qualified_name(key))


def test_label_values():
    assert kv.label_value("") == [] and kv.label_value("v1.2_x-Y") == []
    assert kv.label_value("-a") and kv.label_value("a b") and kv.label_value("a" * 64)
    assert kv.labels({"ok": "fine", "bad key!": "x", "k": "bad value!"}) == [
        ("bad key!", "key 'bad key!': name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                     "start and end with an alphanumeric character (regex used for validation is "
                     "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"),
        ("k", "value 'bad value!': a valid label must be an empty string or consist of alphanumeric characters, "
              "'-', '_' or '.', and must start and end with an alphanumeric character (regex used for validation "
              "is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"),
    ]


def test_config_map_keys():
    assert kv.config_map_key("AWS_ACCESS_KEY_ID") == [] and kv.config_map_key("tls.crt") == []
    assert kv.config_map_key("a/b") and kv.config_map_key("..x") == ["must not start with '..'"]
    assert kv.config_map_key(".") == ["must not be '.'"]


@pytest.mark.parametrize("text,value", [("1", 1), ("1Gi", 2**30), ("500m", Decimal("0.5")), ("1e3", 1000),
                                        ("1.5k", 1500), ("-2", -2), (".5", Decimal("0.5")), ("2E2", 200)])
def test_quantities(text, value):
    assert kv.quantity(text) == value


@pytest.mark.parametrize("text", ["", "1GB", "abc", " 1", "1 ", "1.2.3", "Gi"])
def test_not_quantities(text):
    with pytest.raises(ValueError, match="quantities must match"):
        kv.quantity(text)


def test_negative_quantities_are_refused_for_resources():
    assert kv.non_negative_quantity("-1") == ["must be greater than or equal to 0"]
    assert kv.non_negative_quantity("0") == [] and kv.non_negative_quantity("4Gi") == []


@pytest.mark.parametrize("value", ["a", "team.s3-creds", "A", "-a", "a.", "", "..x", ".x", ".", "..", "a..b",
                                   "x" * 63, "x" * 64, "Tls.crt", "a_b", "a b"])
def test_patterns_agree_with_the_functions(value):
    """The CRD's patterns are the functions' rules (lengths are the schemas' maxLength)."""
    def matches(pattern):
        return re.search(pattern, value) is not None

    assert matches(kv.DNS1123_SUBDOMAIN_PATTERN) == (kv.dns1123_subdomain(value) == [])
    assert matches(kv.DNS1035_LABEL_PATTERN) == (not [m for m in kv.dns1035_label(value) if "regex" in m])
    assert matches(kv.LABEL_VALUE_PATTERN) == (not [m for m in kv.label_value(value) if "regex" in m])
    assert matches(kv.CONFIG_KEY_PATTERN) == (kv.config_map_key(value) == [])

def test_env_var_name_is_printable_ascii_without_equals():
    assert kv.env_var_name("KUBETUNE_JOB") == [] and kv.env_var_name("1.a-b") == []
    for bad in ("", "A=B", "tab\there", "é"):
        assert kv.env_var_name(bad) == ["a valid environment variable name must consist only of printable ASCII "
                                        "characters other than '='"]


def test_port_name_is_an_iana_service_name():
    assert kv.port_name("http") == [] and kv.port_name("metrics-2") == []
    assert kv.port_name("8080") == ["must contain at least one letter (a-z)"]
    assert kv.port_name("a--b") == ["must not contain consecutive hyphens"]
    assert kv.port_name("a" * 16) == ["must be no more than 15 characters"]
    assert "must not begin or end with a hyphen" in kv.port_name("-http")
