"""The emulator's authentication stand-in: tokens, rotation, and what it tells the API server's
other parts about the user."""

from __future__ import annotations

import pytest

from kubetune.clients import kube
from kubetune_testing import auth


async def test_tokens_are_required_and_rotated_tokens_refused(k8s, tmp_path):
    authenticator = k8s.authenticator  # installed by the conftest, as on every integration test
    k8s.enforcement.authorizer.uses = set()  # a probe, not a flow: not counted for RBAC coverage
    anonymous = kube.KubeClient(str(k8s.url), retries=0)
    with pytest.raises(kube.ApiError) as refused:
        await anonymous.list(kube.CONFIGMAPS, "team-a")
    assert refused.value.status == 401

    token_file = tmp_path / "token"
    token = authenticator.issue(auth.service_account("kubetune-system", "kubetune"), token_file)
    assert token_file.read_text() == token
    client = kube.KubeClient(str(k8s.url), token=token, retries=0)
    assert await client.list(kube.CONFIGMAPS, "team-a") == []

    new = authenticator.rotate(token)
    assert token_file.read_text() == new != token
    with pytest.raises(kube.ApiError) as expired:
        await client.list(kube.CONFIGMAPS, "team-a")
    assert expired.value.status == 401
    fresh = kube.KubeClient(str(k8s.url), token=new, retries=0)
    assert await fresh.list(kube.CONFIGMAPS, "team-a") == []
    assert authenticator.refused == {"anonymous": 1, "unknown or expired token": 1}
    for c in (anonymous, client, fresh):
        await c.close()


def test_pod_bound_service_account_tokens_name_their_pod():
    user = auth.service_account("team-a", "agent", pod="serving-0", pod_uid="u-1")
    assert user.username == "system:serviceaccount:team-a:agent"
    assert "system:serviceaccounts:team-a" in user.groups
    assert user.extra_map == {auth.POD_NAME: ["serving-0"], auth.POD_UID: ["u-1"]}
