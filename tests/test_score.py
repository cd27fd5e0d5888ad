"""The lab's score formula by hand, and its relative form."""

import pytest

from qsweep.score import compute_score, lab4, relative


@pytest.mark.parametrize("size,acc,expected", [
    (31.0, 85.9, 0),            # too big, too inaccurate
    (30.0, 85.0, 10),           # <= 30 MB
    (27.0, 85.0, 10),           # floor(27 - 27) = 0
    (22.43, 85.0, 10 + 2 * 4),  # floor(4.57) = 4 whole MB under 27
    (11.64, 86.0, 10 + 2 * 15 + 10),
    (11.64, 88.99, 10 + 2 * 15 + 10 + 2 * 2),
    (87.0, 90.99, 10 + 2 * 4),  # FP32 DeiT-S: only the accuracy part
])
def test_lab4(size, acc, expected):
    assert lab4(size, acc) == expected


def test_relative_maps_onto_the_lab_reference():
    # A model at 1/4 of its FP32 size and at its FP accuracy scores like DeiT-S at 86.9/4 MB, 90.99 %.
    assert relative(0.25, 97.0, 1.0, 97.0, 86.9, 90.99) == lab4(86.9 / 4, 90.99)
    assert compute_score("lab4", 20.0, 87.0, 1.0, 1.0, 86.9, 90.99) == lab4(20.0, 87.0)
    assert compute_score("relative", 20.0, 87.0, 86.9, 90.99, 86.9, 90.99) == lab4(20.0, 87.0)
