"""``make test``'s serial group is one unit of pytest-xdist's ``--dist loadgroup`` (see conftest.py).

xdist reads a test's group from its nodeid suffix alone; when the suffix goes missing, every grouped test
runs wherever a worker is free, and nothing says so.
"""

import pytest


@pytest.mark.xdist_group("serial")
def test_a_serial_test_carries_its_group_to_the_scheduler(request):
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not on an xdist worker: nothing is scheduled")
    assert request.node.nodeid.endswith("@serial")
