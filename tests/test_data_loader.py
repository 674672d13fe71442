"""Deterministic, resumable loading with and without DataLoader workers."""

import pytest

from library.data.datasets import build_from_args
from library.data.loader import EpochSampler, ResumableLoader, resume_position, worker_count
from test_data_helpers import dataset_args, make_tree


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader"))
    make_tree(root, {"t/3_x": [((16, 16), f"a{i}, b{i}, c{i}, d{i}") for i in range(5)]})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension",
                                             ".txt", "--shuffle_caption", "--flip_aug", "--train_batch_size", "2",
                                             "--token_warmup_step", "6", "--token_warmup_min", "1", "--seed", "11"]))
    return train


def keys(batches):
    return [(tuple(b["image_keys"]), tuple(b["captions"]), tuple(b["flippeds"])) for b in batches]


def test_sampler_order_is_a_seeded_permutation():
    s = EpochSampler(10, seed=1)
    s.set_epoch(3)
    a = list(s)
    assert sorted(i for i, _, _ in a) == list(range(10))
    assert all(e == 3 for _, e, _ in a)
    assert [st for _, _, st in a] == list(range(20, 30))
    s2 = EpochSampler(10, seed=1)
    s2.set_epoch(3, start_batch=4)
    assert list(s2) == a[4:]
    assert len(s2) == 6
    s3 = EpochSampler(10, seed=1, gradient_accumulation_steps=4)
    s3.set_epoch(1)
    assert [st for _, _, st in s3] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_workers_produce_identical_batches(group):
    base = keys(ResumableLoader(group, seed=11, num_workers=0).iter_epoch(1))
    with_workers = keys(ResumableLoader(group, seed=11, num_workers=2).iter_epoch(1))
    assert base == with_workers
    assert len(base) == len(group) == 8


def test_token_warmup_sees_exact_step_in_workers(group):
    loader = ResumableLoader(group, seed=11, num_workers=2)
    first = next(iter(loader.iter_epoch(1)))
    # step 0 of a 6-step warm-up keeps token_warmup_min=1 token
    assert all(c.count(",") == 0 for c in first["captions"])
    batches = list(ResumableLoader(group, seed=11).iter_epoch(2))  # steps 8.. > warm-up: all 4 tokens
    assert all(c.count(",") == 3 for b in batches for c in b["captions"])


def test_resume_mid_epoch_continues_exactly(group):
    full = ResumableLoader(group, seed=11)
    e1 = keys(full.iter_epoch(1))
    e2 = keys(full.iter_epoch(2))
    assert full.state_dict() == {"epoch": 3, "batch": 0}

    resumed = ResumableLoader(group, seed=11, num_workers=1, persistent_workers=True)
    resumed.load_state_dict({"epoch": 1, "batch": 5})
    got = keys(resumed.iter_epoch())
    assert got == e1[5:]
    assert keys(resumed.iter_epoch(2)) == e2

    # stopping half-way records the position
    partial = ResumableLoader(group, seed=11)
    it = partial.iter_epoch(2)
    next(it), next(it), next(it)
    assert partial.state_dict() == {"epoch": 2, "batch": 3}


def test_resume_position_arithmetic():
    # 10 batches per epoch, grad accumulation 2 -> 5 steps per epoch
    assert resume_position(None, None, 10, 2) == (1, 0, 0)
    assert resume_position(7, None, 10, 2, skip_until_initial_step=True) == (2, 4, 7)
    assert resume_position(7, None, 10, 2, skip_until_initial_step=False) == (2, 0, 7)
    assert resume_position(None, 3, 10, 2, skip_until_initial_step=True) == (3, 0, 10)
    assert resume_position(12, 3, 10, 1, skip_until_initial_step=True) == (2, 2, 12)


def test_worker_count():
    assert worker_count(0) == 0 and worker_count(None) == 0
    assert 1 <= worker_count(64) <= 64
