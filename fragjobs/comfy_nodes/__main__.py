"""``python -m fragjobs.comfy_nodes /path/to/ComfyUI``: link the nodes into that ComfyUI."""

from __future__ import annotations

import sys

from fragjobs.comfy_nodes.install import link_into_comfyui
from fragjobs.errors import FragjobsError


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m fragjobs.comfy_nodes COMFYUI_FOLDER", file=sys.stderr)
        return 2
    try:
        link = link_into_comfyui(argv[0])
    except FragjobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"linked {link}; restart ComfyUI to load the fragjobs nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
