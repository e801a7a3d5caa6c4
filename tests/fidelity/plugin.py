"""The autouse fixture that validates every JSON body any simulator serves against the spec.

Used by ``tests/fidelity/conftest.py`` and ``tests/sim/conftest.py``; ``tests/conftest.py``
can enable it for the whole suite with one line (see docs/simulator.md)::

    from fidelity.plugin import rc_spec_validation  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fidelity.spec import SpecMissing, SpecValidator, load_validator

from faxd.sim.observe import ServedJson, add_global_observer


def spec_validator() -> SpecValidator:
    """The process-wide validator; a missing spec FAILS the test (it never skips)."""
    try:
        return load_validator()
    except SpecMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(autouse=True)
def rc_spec_validation() -> Iterator[SpecValidator]:
    """Every JSON body served during the test must satisfy the OpenAPI spec; else the test errors."""
    validator = spec_validator()
    violations: list[str] = []

    def observe(served: ServedJson) -> None:
        violations.extend(validator.check(served))

    remove = add_global_observer(observe)
    try:
        yield validator
    finally:
        remove()
    if violations:
        shown = "\n  ".join(violations[:20])
        more = f"\n  … and {len(violations) - 20} more" if len(violations) > 20 else ""
        pytest.fail(
            f"the simulator served {len(violations)} JSON bodies that violate RingCentral's OpenAPI spec:\n"
            f"  {shown}{more}",
            pytrace=False,
        )
