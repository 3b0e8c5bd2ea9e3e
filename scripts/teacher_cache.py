"""List or clear the teacher-output cache (see kdresearch/teacher_outputs.py).

    python scripts/teacher_cache.py            # list entries and total size
    python scripts/teacher_cache.py --clear    # delete them all
    python scripts/teacher_cache.py --dir PATH # another cache.dir
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdresearch.teacher.outputs import DEFAULT_CACHE_DIR, clear_cache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="List or clear the teacher-output cache.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"cache folder (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--clear", action="store_true", help="delete every cached entry")
    args = parser.parse_args()
    if args.clear:
        print(f"freed {clear_cache(args.dir) / 1e6:.1f} MB in {args.dir}")
        return
    entries = sorted(args.dir.glob("*.pt"), key=lambda path: path.stat().st_mtime)
    for path in entries:
        print(f"{path.stat().st_size / 1e6:10.1f} MB  {path.name}")
    print(f"{len(entries)} entries, {sum(p.stat().st_size for p in entries) / 1e6:.1f} MB in {args.dir}")


if __name__ == "__main__":
    main()
