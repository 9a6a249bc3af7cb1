"""No drift between the user guide and what the tests run.

The guide's playbooks are files in docs/examples/. The guide shows them verbatim
(each after a ``<!-- file: docs/examples/NAME -->`` marker), and the molecule
scenarios import the same files; these checks keep both true. No guests.
"""

from __future__ import annotations

import re

import pytest

from harness.paths import PROJECT_ROOT

GUIDE = PROJECT_ROOT / "docs" / "user-guide.md"
EXAMPLES = PROJECT_ROOT / "docs" / "examples"
SCENARIOS = PROJECT_ROOT / "extensions" / "molecule"
EMBEDDED = re.compile(r"<!-- file: (docs/examples/[\w.-]+) -->\n```yaml\n(.*?)```\n", re.DOTALL)
PLAYBOOKS = sorted(p.name for p in EXAMPLES.glob("*.yml") if p.name != "inventory.yml")


def embedded() -> dict[str, str]:
    return dict(EMBEDDED.findall(GUIDE.read_text()))


def test_every_example_is_in_the_guide() -> None:
    shown = embedded()
    for path in sorted(EXAMPLES.glob("*.yml")):
        assert f"docs/examples/{path.name}" in shown, f"the guide does not show {path.name}"


@pytest.mark.parametrize("name", sorted(embedded()))
def test_the_guide_shows_the_file_as_it_is(name: str) -> None:
    assert embedded()[name] == (PROJECT_ROOT / name).read_text(), \
        f"docs/user-guide.md shows an outdated copy of {name}; paste the file again"


@pytest.mark.parametrize("name", PLAYBOOKS)
def test_a_molecule_scenario_runs_every_example_playbook(name: str) -> None:
    importers = [p for p in SCENARIOS.glob("*/*.yml")
                 if re.search(rf"import_playbook:\s*\.\./\.\./\.\./docs/examples/{re.escape(name)}\s*$",
                              p.read_text(), re.MULTILINE)]
    assert importers, f"no molecule scenario imports docs/examples/{name}"
