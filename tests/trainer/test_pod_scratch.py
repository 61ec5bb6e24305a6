"""Where a pod's processes keep their scratch, which checkpoint files a pod fetches, and which
failures a pod restart may fix: pure decisions of the trainer, without a model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kubetune.api import jobconfig
from kubetune_operator.render.training import WORK_DIR, trainer_env
from kubetune_trainer.__main__ import default_work_dir
from kubetune_trainer.checkpoints import needed_by, pod_ranks
from kubetune_trainer.failures import is_retryable

from .conftest import job_spec, make_config


def test_every_process_of_a_pod_shares_one_work_dir(tmp_path):
    spec = job_spec(tmp_path, tmp_path / "d.jsonl", tmp_path / "out")
    train = make_config(spec, name="w")
    trial = make_config(spec, name="w", stage=jobconfig.Stage(kind=jobconfig.STAGE_SWEEP))
    assert default_work_dir(train, Path("/tmp")) == default_work_dir(train, Path("/tmp"))  # never per process
    assert default_work_dir(train, Path("/tmp")) == Path("/tmp/kubetune-uid-w-train")
    assert default_work_dir(trial, Path("/tmp")) == Path("/tmp/kubetune-uid-w-sweep")
    rendered = {e["name"]: e.get("value") for e in trainer_env(spec)}
    assert rendered["KUBETUNE_WORK_DIR"] == WORK_DIR == "/var/cache/kubetune/work"  # on the pod's cache volume


def test_a_pod_fetches_the_shared_files_and_its_own_ranks_files():
    second_pod = pod_ranks(SimpleNamespace(rank=5, local_rank=1, local_world_size=4))
    assert second_pod == range(4, 8)
    assert needed_by("ds/zero_pp_rank_4_mp_rank_00_optim_states.pt", second_pod)
    assert needed_by("ds/bf16_zero_pp_rank_7_mp_rank_00_optim_states.pt", second_pod)
    assert not needed_by("ds/zero_pp_rank_3_mp_rank_00_model_states.pt", second_pod)
    assert needed_by("ds/rng_state_rank6.pt", second_pod) and not needed_by("ds/rng_state_rank10.pt", second_pod)
    assert needed_by("rng-rank4.pt", second_pod) and not needed_by("rng-rank0.pt", second_pod)
    assert needed_by("ds/best_rank5.pt", second_pod) and not needed_by("ds/best_rank1.pt", second_pod)
    for shared in ("state.pt", "latest", "ds/mp_rank_00_model_states.pt", "ds/latest"):
        assert needed_by(shared, second_pod)


def test_a_peer_lost_mid_collective_is_retryable_a_bug_is_not():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1675")
    try:
        try:
            raise gloo
        except RuntimeError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        assert is_retryable(wrapped)
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
