"""metav1.Condition helpers (pure)."""

from __future__ import annotations


def find(conditions: list[dict] | None, kind: str) -> dict | None:
    for condition in conditions or []:
        if condition.get("type") == kind:
            return condition
    return None


def is_true(conditions: list[dict] | None, kind: str) -> bool:
    condition = find(conditions, kind)
    return bool(condition) and condition.get("status") == "True"


def set_condition(
    conditions: list[dict] | None,
    kind: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict]:
    """Return a new list with `kind` set; lastTransitionTime moves only when the status changes."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    result = []
    replaced = False
    for condition in conditions or []:
        if condition.get("type") != kind:
            result.append(dict(condition))
            continue
        replaced = True
        changed = condition.get("status") != status_text
        result.append(
            {
                "type": kind,
                "status": status_text,
                "observedGeneration": generation,
                "lastTransitionTime": now if changed else condition.get("lastTransitionTime", now),
                "reason": reason,
                "message": message,
            }
        )
    if not replaced:
        result.append(
            {
                "type": kind,
                "status": status_text,
                "observedGeneration": generation,
                "lastTransitionTime": now,
                "reason": reason,
                "message": message,
            }
        )
    return result
