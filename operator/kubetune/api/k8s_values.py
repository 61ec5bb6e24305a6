"""Kubernetes' value rules (k8s.io/apimachinery/pkg/util/validation, api/resource.Quantity) as pure
functions: each returns the API server's own messages ([] when valid), so a name, label, key or
quantity kubetune puts into a child object is refused before the child exists, in the server's words.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MAX_REQUEST_BYTES = 3 * 1024 * 1024      # the API server's request body limit (MaxRequestBodyBytes)
MAX_ANNOTATIONS_BYTES = 256 * 1024       # TotalAnnotationSizeLimitB
DNS1123_LABEL_MAX, DNS1123_SUBDOMAIN_MAX, LABEL_VALUE_MAX, QUALIFIED_NAME_MAX = 63, 253, 63, 63

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = rf"({_QUALIFIED_NAME})?"
_CONFIG_KEY = r"[-._a-zA-Z0-9]+"
_QUANTITY = re.compile(
    r"^([+-]?)((?:[0-9]+(?:\.[0-9]*)?)|(?:\.[0-9]+))((?:[KMGTPE]i)|[numkMGTPE]|(?:[eE][+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)))?$"
)
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}


def _full(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _too_long(value: str, limit: int) -> list[str]:
    return [f"must be no more than {limit} characters"] if len(value) > limit else []


def _checked(value: str, limit: int, pattern: str, rule: str) -> list[str]:
    """A length limit, then a pattern the API server names in its message (validation.go's shape)."""
    errors = _too_long(value, limit)
    if not _full(pattern, value):
        errors.append(f"{rule} (regex used for validation is '{pattern}')")
    return errors


def dns1123_label(value: str) -> list[str]:
    """Names of most namespaced objects' parts (container names, port names, namespace names)."""
    return _checked(value, DNS1123_LABEL_MAX, _DNS1123_LABEL,
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                    "must start and end with an alphanumeric character")


def dns1123_subdomain(value: str) -> list[str]:
    """Object names of most kinds (ConfigMaps, Secrets, Jobs, custom resources), PriorityClass names."""
    return _checked(value, DNS1123_SUBDOMAIN_MAX, _DNS1123_SUBDOMAIN,
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                    "'.', and must start and end with an alphanumeric character")


def dns1035_label(value: str) -> list[str]:
    """Service names (and the training operator's workload names)."""
    return _checked(value, DNS1123_LABEL_MAX, _DNS1035_LABEL,
                    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                    "alphabetic character, and end with an alphanumeric character")


def qualified_name(value: str) -> list[str]:
    """Label and annotation keys: an optional DNS-1123 subdomain prefix and '/', then a name."""
    prefix, slash, name = value.rpartition("/")
    errors: list[str] = []
    if slash and not prefix:
        errors.append("prefix part must be non-empty")
    elif slash:
        errors.extend(f"prefix part {message}" for message in dns1123_subdomain(prefix))
    if not name:
        errors.append("name part must be non-empty")
        return errors
    if len(name) > QUALIFIED_NAME_MAX:
        errors.append(f"name part must be no more than {QUALIFIED_NAME_MAX} characters")
    if not _full(_QUALIFIED_NAME, name):
        errors.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                      f"with an alphanumeric character (regex used for validation is '{_QUALIFIED_NAME}')")
    return errors


def label_value(value: str) -> list[str]:
    errors = _too_long(value, LABEL_VALUE_MAX)
    if not _full(_LABEL_VALUE, value):
        errors.append("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                      f"'.', and must start and end with an alphanumeric character (regex used for validation is "
                      f"'{_QUALIFIED_NAME}')")
    return errors


def config_map_key(value: str) -> list[str]:
    """Keys of ConfigMap/Secret data (and so a Secret key a spec names)."""
    errors = _too_long(value, DNS1123_SUBDOMAIN_MAX)
    if not _full(_CONFIG_KEY, value):
        errors.append(f"a valid config key must consist of alphanumeric characters, '-', '_' or '.' (regex used "
                      f"for validation is '{_CONFIG_KEY}')")
    if value in (".", ".."):
        errors.append(f"must not be '{value}'")
    elif value.startswith(".."):
        errors.append("must not start with '..'")
    return errors


def labels(mapping: dict) -> list[tuple[str, str]]:
    """(key, message) for every invalid key or value of a label map (or a matchLabels selector)."""
    found = []
    for key, value in mapping.items():
        found.extend((key, f"key {key!r}: {message}") for message in qualified_name(str(key)))
        if not isinstance(value, str):
            found.append((key, f"value of {key!r} must be a string"))
            continue
        found.extend((key, f"value {value!r}: {message}") for message in label_value(value))
    return found


def quantity(text: str) -> Decimal:
    """A resource.Quantity's value; ValueError with the API server's words when `text` is not one."""
    match = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if match is None or text != text.strip():
        raise ValueError("quantities must match the regular expression "
                         "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    sign, number, suffix = match.groups()
    suffix = suffix or ""
    try:
        scale = Decimal(_SUFFIX[suffix]) if suffix in _SUFFIX else Decimal("1" + suffix.lower())
        value = Decimal(number) * scale
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a quantity") from exc
    return -value if sign == "-" else value


def non_negative_quantity(text: str) -> list[str]:
    """Resource requests and limits: a quantity that is not negative."""
    try:
        value = quantity(text)
    except ValueError as exc:
        return [str(exc)]
    return ["must be greater than or equal to 0"] if value < 0 else []


# The same rules as patterns, for CRD fields that a child object takes as they are (anchored, RE2-safe).
DNS1123_SUBDOMAIN_PATTERN = f"^{_DNS1123_SUBDOMAIN}$"
DNS1035_LABEL_PATTERN = f"^{_DNS1035_LABEL}$"
LABEL_VALUE_PATTERN = f"^{_LABEL_VALUE}$"
# config_map_key without lookahead: an optional single leading dot, so never '.', '..' or '..x'
CONFIG_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"

def env_var_name(value: str) -> list[str]:
    """Container env names as the API server reads them since v1.34 (RelaxedEnvironmentVariableValidation)."""
    if value and all(" " <= c <= "~" and c != "=" for c in value):
        return []
    return ["a valid environment variable name must consist only of printable ASCII characters other than '='"]


def port_name(value: str) -> list[str]:
    """Container and Service port names (IsValidPortName: an IANA service name)."""
    errors = [] if len(value) <= 15 else ["must be no more than 15 characters"]
    if not _full(r"[-a-z0-9]+", value):
        errors.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", value):
        errors.append("must contain at least one letter (a-z)")
    if "--" in value:
        errors.append("must not contain consecutive hyphens")
    if value.startswith("-") or value.endswith("-"):
        errors.append("must not begin or end with a hyphen")
    return errors
