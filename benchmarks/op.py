"""One save or restore at the module_utils level, in its own process.

benchmarks/run.py runs this as a child so that the child's peak RSS (what the
module itself would use, without Ansible) can be read from wait4(). Prints one
JSON object: the duration and the operation's own stats.

    python benchmarks/op.py save '{"name": "g", "path": "/x.save", "image_format": "raw"}'
    python benchmarks/op.py restore '{"path": "/x.save"}'
"""

from __future__ import annotations

import json
import sys
import time

from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, restore_guest
from ansible_collections.savestate.qemu.plugins.module_utils._save import SaveRequest, save_guest


def main() -> int:
    operation, arguments = sys.argv[1], json.loads(sys.argv[2])
    started = time.monotonic()
    if operation == "save":
        arguments["image_format"] = ImageFormat.from_name(arguments.get("image_format", "raw"))
        outcome = save_guest(SaveRequest(**arguments))
    else:
        outcome = restore_guest(RestoreRequest(**arguments))
    print(json.dumps({"seconds": time.monotonic() - started, "changed": outcome.changed,
                      "stats": outcome.stats, "state": outcome.guest.get("state")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
