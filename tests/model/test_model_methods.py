"""The methods interface: each method's declaration of what it needs from the data."""

import pytest

from model.methods import DataNeeds, data_needs


def test_myow_needs_a_pool_and_a_mining_view():
    assert data_needs("myow", 1.0) == DataNeeds(mining_view=True, candidate_pool=True)
    assert data_needs("myow", 1.0, pool="batch").candidate_pool is False  # the batch is the pool
    assert data_needs("myow", 1.0, mining_view="anchor").mining_view is False  # view 1 is mined with


def test_byol_and_myow_without_mining_need_pairs_only():
    assert data_needs("byol", 1.0) == DataNeeds()  # BYOL ignores lambda
    assert data_needs("myow", 0.0) == DataNeeds()


def test_supervised_trains_on_labels():
    needs = data_needs("supervised")
    assert needs.labels and not needs.self_supervised and not needs.augmented_pairs


def test_simclr_needs_pairs_only():
    assert data_needs("simclr", 1.0) == DataNeeds()  # contrasts the two views; mines nothing


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="vicreg"):
        data_needs("vicreg")
