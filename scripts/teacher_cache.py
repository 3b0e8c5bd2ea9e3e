"""List or clear the teacher-output cache (see kdresearch/teacher/outputs.py).

    python scripts/teacher_cache.py            # list entries and total size
    python scripts/teacher_cache.py --clear    # delete them all
    python scripts/teacher_cache.py --dir PATH # another cache.dir
"""

import argparse
from pathlib import Path

from kdresearch.teacher.outputs import DEFAULT_CACHE_DIR, cache_entries, clear_cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="List or clear the teacher-output cache.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"cache folder (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--clear", action="store_true", help="delete every cached entry")
    args = parser.parse_args(argv)
    if args.clear:
        print(f"freed {clear_cache(args.dir) / 1e6:.1f} MB in {args.dir}")
        return
    entries = cache_entries(args.dir)
    for _, size, path in entries:
        print(f"{size / 1e6:10.1f} MB  {path.name}")
    print(f"{len(entries)} entries, {sum(size for _, size, _ in entries) / 1e6:.1f} MB in {args.dir}")


if __name__ == "__main__":
    main()
