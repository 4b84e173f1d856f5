"""CI is what it says it is: each environment .ci/run builds has every feature the tests need,
except those it leaves out on purpose (CPRD_CI_WITHOUT), and those are really missing: a C
module left over from an earlier build would otherwise let the pure-Python run test C code."""

from __future__ import annotations

import pytest

from conftest import FEATURES, ci_without, has, in_ci


@pytest.mark.skipif(not in_ci(), reason="only CI makes promises about its machine (set CI=1 to check this one)")
def test_ci_has_what_it_claims_and_lacks_what_it_leaves_out():
    wrong = {f: has(f) for f in FEATURES if has(f) == (f in ci_without())}
    assert not wrong, (f"CI environment with CPRD_CI_WITHOUT={sorted(ci_without())}: these features are present "
                       f"(True) or missing (False) against its claim: {wrong}")
