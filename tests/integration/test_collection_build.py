"""The collection as users get it: ``ansible-galaxy collection build`` in a scratch copy
of the working tree, installed into an empty collections path, documented by ansible-doc.

No guests: this is the cheap check that the tarball has what it needs (modules, module
utils, roles with their argument specs, meta/runtime.yml) and none of the development
tree (.venv, .cache, the test harness).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from harness.paths import PROJECT_ROOT, VENV_DIR, scratch_copy

BIN = VENV_DIR / "bin"
MODULES = sorted(p.stem for p in (PROJECT_ROOT / "plugins" / "modules").glob("*.py") if p.stem != "__init__")
ROLES = sorted(p.name for p in (PROJECT_ROOT / "roles").iterdir() if (p / "meta" / "argument_specs.yml").is_file())


class Installed(NamedTuple):
    tarball: Path
    collection: Path       # .../ansible_collections/savestate/qemu
    env: dict[str, str]    # sees only the installed copy


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the tarball and install it into an empty collections path."""
    root = tmp_path_factory.mktemp("build")
    source, output, collections = root / "src", root / "dist", root / "collections"
    source.mkdir()
    scratch_copy(source)
    run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(output)], cwd=source)
    tarballs = list(output.glob("savestate-qemu-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    # The development venv links the working tree in as savestate.qemu: hide it, and force
    # the install, so that everything below runs against the tarball's contents.
    env = {"ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
           "ANSIBLE_NOCOLOR": "1"}
    result = run([str(BIN / "ansible-galaxy"), "collection", "install", "--force", "-p", str(collections),
                  str(tarballs[0])], cwd=root, env=env)
    assert "was installed successfully" in result.stdout, result.stdout
    yield Installed(tarballs[0], collections / "ansible_collections" / "savestate" / "qemu", env)


def test_the_tarball_holds_the_collection_and_not_the_development_tree(installed: Installed) -> None:
    tarball = installed.tarball
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    for wanted in ("MANIFEST.json", "meta/runtime.yml", "README.md", "docs/user-guide.md",
                   *(f"plugins/modules/{m}.py" for m in MODULES),
                   *(f"roles/{r}/meta/argument_specs.yml" for r in ROLES)):
        assert wanted in names, f"{wanted} is missing from {tarball.name}"
    for unwanted in (".venv", ".cache", "tests/harness", "tests/output", ".git"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), f"{unwanted} is in the tarball"


def test_the_install_is_complete(installed: Installed) -> None:
    collection = installed.collection
    manifest = json.loads((collection / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "savestate"
    assert manifest["collection_info"]["name"] == "qemu"
    for module in MODULES:
        assert (collection / "plugins" / "modules" / f"{module}.py").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_reads_every_module_from_the_install(installed: Installed, module: str) -> None:
    collection, env = installed.collection, installed.env
    name = f"savestate.qemu.{module}"
    doc = json.loads(run([str(BIN / "ansible-doc"), "--json", name], cwd=collection.parent, env=env).stdout)[name]
    assert Path(doc["doc"]["filename"]).is_relative_to(collection), doc["doc"]["filename"]
    assert doc["doc"]["short_description"]
    assert doc["examples"].strip() and doc["return"]


def test_ansible_doc_lists_every_module_and_role(installed: Installed) -> None:
    collection, env = installed.collection, installed.env
    modules = json.loads(run([str(BIN / "ansible-doc"), "--list", "--json", "savestate.qemu"],
                             cwd=collection.parent, env=env).stdout)
    assert sorted(modules) == [f"savestate.qemu.{m}" for m in MODULES]
    roles = json.loads(run([str(BIN / "ansible-doc"), "--list", "--json", "-t", "role", "savestate.qemu"],
                           cwd=collection.parent, env=env).stdout)
    assert sorted(roles) == [f"savestate.qemu.{r}" for r in ROLES]


@pytest.mark.parametrize("role", ROLES)
def test_ansible_doc_reads_every_role_argument_spec(installed: Installed, role: str) -> None:
    collection, env = installed.collection, installed.env
    name = f"savestate.qemu.{role}"
    doc = json.loads(run([str(BIN / "ansible-doc"), "--json", "-t", "role", name],
                         cwd=collection.parent, env=env).stdout)[name]
    options = doc["entry_points"]["main"]["options"]
    assert options and all(option.startswith(f"{role}_") for option in options), sorted(options)
    assert all(spec.get("description") for spec in options.values())
