"""GitOps tracking metadata: labels and annotations by which Argo CD and Flux claim an object.

Argo CD tracks what an Application manages by the label `app.kubernetes.io/instance` (its default)
or the annotation `argocd.argoproj.io/tracking-id`; Flux by `kustomize.toolkit.fluxcd.io/*` and
`helm.toolkit.fluxcd.io/*` labels. An object the operator creates that carried its parent's keys would
be claimed by the parent's Application or Kustomization: shown out of sync, and pruned on the next
sync. So no child carries them: children get only the operator's own labels, and where user metadata
is copied (a drift retrain's FineTuneJob, from its template) it goes through `without_tracking`.
"""

from __future__ import annotations

TRACKING_KEYS = ("app.kubernetes.io/instance",)
TRACKING_PREFIXES = ("argocd.argoproj.io/", "kustomize.toolkit.fluxcd.io/", "helm.toolkit.fluxcd.io/")


def is_tracking_key(key: str) -> bool:
    """Whether a label or annotation key is one a GitOps tool tracks objects by."""
    return key in TRACKING_KEYS or key.startswith(TRACKING_PREFIXES)


def without_tracking(mapping: dict | None) -> dict:
    """A copy of labels or annotations without the GitOps tracking keys."""
    return {k: v for k, v in (mapping or {}).items() if not is_tracking_key(k)}
