"""rocketkv_split against numbers worked out by hand from docs/algorithm.md's formulas."""

import math

import pytest

from rocketkv_jax.methods import rocketkv_split

# (M, L, N, D) -> (capacity, prompt_budget, k_top, page, r), worked by hand:
#   c = L / M, a = 0.2 + 0.06 log2 c, capacity = int(L / c**a) (at least min(2N, L)),
#   c2 = capacity / M, page = ceil(sqrt c2) if <= c2 else 1, r = int(D page / c2).
CASES = [
    # Paper-like: c = 16, a = 0.44, 16**0.44 = 2**1.76 = 3.3870, 4096 / 3.3870 = 1209.3;
    # c2 = 1209 / 256 = 4.7227, sqrt = 2.173 -> page 3; r = int(128 * 3 / 4.7227) = 81.
    ((256, 4096, 32, 128), (1209, 1177, 128, 3, 81)),
    # c = 8.125, a = 0.2 + 0.06 * 3.0224 = 0.38134, 8.125**0.38134 = 2.2246, 2080 / 2.2246
    # = 935.0; c2 = 935 / 256 = 3.652, sqrt = 1.911 -> page 2; r = int(64 * 2 / 3.652) = 35.
    ((256, 2080, 32, 64), (935, 903, 128, 2, 35)),
    # c = 2, a = 0.26, 2**0.26 = 1.1975, 4096 / 1.1975 = 3420.4; c2 = 3420 / 2048 = 1.670,
    # ceil(sqrt) = 2 > 1.670 -> page 1; r = int(128 / 1.670) = 76.
    ((2048, 4096, 32, 128), (3420, 3388, 1024, 1, 76)),
    # c = 15.625, a = 0.43795, 15.625**0.43795 = 3.3285, 1000 / 3.3285 = 300.4 and
    # min(2N, L) = 200 is smaller; c2 = 300 / 64 = 4.6875 -> page 3; r = int(64*3/4.6875) = 40.
    ((64, 1000, 100, 64), (300, 200, 32, 3, 40)),
    # Many new tokens: c = 18.75, a = 0.45373, 18.75**0.45373 = 3.781, int(600 / 3.781) =
    # 158 < min(2N, L) = 400, so capacity = 400;
    # c2 = 400 / 32 = 12.5, sqrt = 3.54 -> page 4; r = int(32 * 4 / 12.5) = 10.
    ((32, 600, 200, 32), (400, 200, 16, 4, 10)),
    # M >= L: M clamps to L, c = 1, a = 0.2, capacity = L, c2 = 1, page 1, r = D.
    ((5000, 4096, 32, 128), (4096, 4064, 2048, 1, 128)),
]


@pytest.mark.parametrize(("args", "want"), CASES)
def test_rocketkv_split_hand_computed(args, want):
    s = rocketkv_split(*args)
    assert (s.capacity, s.prompt_budget, s.k_top, s.page_size, s.top_r) == want
    M, L, N, D = args
    assert s.token_budget == min(M, L)
    assert s.compression == pytest.approx(max(1.0, L / min(M, L)))
    assert s.c2 == pytest.approx(max(1.0, s.capacity / s.token_budget))


def test_paper_split_reads_about_the_budget():
    s = rocketkv_split(256, 4096, 32, 128)
    assert s.stage1_share == pytest.approx(0.44)
    scoring = math.ceil(s.capacity / s.page_size) * s.top_r / (2 * 128)
    assert scoring + s.k_top == pytest.approx(256, abs=2)


def test_split_clamps_r_to_one():
    # c = 1e5, a = 0.8 (capped), capacity = int(1e5 / 1e5**0.8) = int(9.99..) = 9, c2 = 9,
    # page = 3, int(D * page / c2) = int(2 * 3 / 9) = 0 -> clamped to 1.
    s = rocketkv_split(1, 100_000, 1, 2)
    assert (s.stage1_share, s.capacity, s.page_size, s.top_r) == (0.8, 9, 3, 1)


def test_split_rejects_nonsense():
    with pytest.raises(ValueError, match="M, L, D > 0"):
        rocketkv_split(0, 100, 10, 64)
