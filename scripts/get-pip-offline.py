"""Stand-in for the get-pip.py that ``ansible-test --venv`` downloads.

ansible-test fetches its pip bootstrap script from ci-files.testing.ansible.com,
which is out of reach on hosts that only see the package registries. This script
does the same job from what the venv already has: ``ensurepip`` (in a subprocess,
so that pip keeps the machine's index and CA settings), then ``pip install`` of the
pinned packages ansible-test asks for.
"""

from __future__ import annotations

import subprocess
import sys

IGNORED_OPTIONS = {"--no-setuptools", "--no-wheel"}


def main() -> int:
    packages = [arg for arg in sys.argv[1:] if arg not in IGNORED_OPTIONS]
    subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True,
                   stdout=subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "pip", "install", *packages], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
