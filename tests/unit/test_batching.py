"""Data order is a pure function of the step: deterministic, disjoint across processes."""

from potstill.data.batching import StepBatcher


def test_each_epoch_is_a_permutation_and_order_is_seeded():
    b = StepBatcher(10, batch_size=2, grad_accum=1, seed=3)
    first_epoch = [i for s in range(5) for mb in b.micro_batches(s) for i in mb]
    assert sorted(first_epoch) == list(range(10))
    assert first_epoch != list(range(10))
    again = StepBatcher(10, batch_size=2, grad_accum=1, seed=3)
    assert [again.micro_batches(s) for s in range(8)] == [b.micro_batches(s) for s in range(8)]
    other = StepBatcher(10, batch_size=2, grad_accum=1, seed=4)
    assert [other.micro_batches(s) for s in range(5)] != [b.micro_batches(s) for s in range(5)]


def test_processes_and_micro_batches_share_out_one_global_batch():
    single = StepBatcher(16, batch_size=2, grad_accum=2, world_size=1, seed=0)
    ranks = [StepBatcher(16, batch_size=1, grad_accum=2, world_size=2, rank=r, seed=0) for r in range(2)]
    for step in range(6):
        one = sorted(i for mb in single.micro_batches(step) for i in mb)
        many = sorted(i for b in ranks for mb in b.micro_batches(step) for i in mb)
        assert one == many
        a, b = ([i for mb in r.micro_batches(step) for i in mb] for r in ranks)
        assert not set(a) & set(b)


def test_steps_for_epochs():
    b = StepBatcher(100, batch_size=4, grad_accum=2, world_size=2)
    assert b.examples_per_step == 16
    assert b.steps_for_epochs(1) == 7
    assert b.steps_for_epochs(0.5) == 4
