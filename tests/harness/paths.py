"""Where the project, its cache and the harness live."""

from __future__ import annotations

from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = HARNESS_DIR.parent.parent
CACHE_DIR = PROJECT_ROOT / ".cache"
VENV_DIR = PROJECT_ROOT / ".venv"
