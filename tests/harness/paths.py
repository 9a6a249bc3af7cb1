"""Where the project, its cache and the harness live."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = HARNESS_DIR.parent.parent
CACHE_DIR = PROJECT_ROOT / ".cache"
VENV_DIR = PROJECT_ROOT / ".venv"
# Outside the checkout, in directories only root can write: the modules run only an emulator whose
# every directory is root's (a clone under /tmp would not do), and every clone of the project shares it.
SHARED_CACHE_DIR = Path("/var/cache/savestate-qemu")


def scratch_copy(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked files, minus ignored ones), for a build."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = PROJECT_ROOT / name
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(source.stat().st_mode & 0o777)
