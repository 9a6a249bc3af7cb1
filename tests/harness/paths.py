"""Where the project, its cache and the harness live."""

from __future__ import annotations

from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = HARNESS_DIR.parent.parent
CACHE_DIR = PROJECT_ROOT / ".cache"
VENV_DIR = PROJECT_ROOT / ".venv"
# Outside the checkout, in directories only root can write: the modules run only an emulator whose
# every directory is root's (a clone under /tmp would not do), and every clone of the project shares it.
SHARED_CACHE_DIR = Path("/var/cache/savestate-qemu")
