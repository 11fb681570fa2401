import pytest

from op_testing import poisoned_allocations


@pytest.fixture(autouse=True)
def _poison_new_tensors():
    """Every op test runs with NaN-filled allocations, so an unwritten output element fails the test."""
    with poisoned_allocations():
        yield
