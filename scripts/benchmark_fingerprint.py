"""Time the sampled fingerprint of an ImageNet-layout folder (kdresearch.data.image_folder.folder_fingerprint)
against a read of every byte.

    python scripts/benchmark_fingerprint.py                      # 10,000 files of 110 kB (ImageNet's mean JPEG)
    python scripts/benchmark_fingerprint.py --files 50000 --folder /tmp/fp-bench --repeats 5

The folder (`train/<class>/`, `val/<class>/`, 100 classes) is generated once and reused; its files hold
random bytes with a .JPEG suffix: the fingerprint stats every file and reads a sample, never decodes.
The second and later passes find the files in the page cache, as every job after the first does.
"""

import argparse
import hashlib
import os
import time
from pathlib import Path

from kdresearch.data.imagenet import load_imagenet

CLASSES = 100


def generate(folder: Path, files: int, size: int) -> None:
    """`files` files of `size` random bytes, nine in ten under train/, spread over CLASSES classes."""
    if (folder / "complete").exists():
        return
    for number in range(files):
        split = "val" if (number // CLASSES) % 10 == 9 else "train"
        path = folder / split / f"n{number % CLASSES:08d}" / f"{number:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    (folder / "complete").touch()


def read_every_byte(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.JPEG")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Time the sampled folder fingerprint against reading every byte.")
    parser.add_argument("--files", type=int, default=10_000, help="files in the generated folder (default 10000)")
    parser.add_argument("--file-kb", type=int, default=110, help="size of each file in kB (default 110)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where to generate the folder (default /tmp/kdresearch-fingerprint-<files>x<kB>)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each (default 3)")
    args = parser.parse_args(argv)
    folder = args.folder or Path(f"/tmp/kdresearch-fingerprint-{args.files}x{args.file_kb}kB")
    started = time.perf_counter()
    generate(folder, args.files, args.file_kb * 1000)
    print(f"folder: {folder} ({args.files} files of {args.file_kb} kB; ready in {time.perf_counter() - started:.1f} s)")
    for name, measure in (("sampled fingerprint (list + stat + 64 sampled files)",
                           lambda: load_imagenet(str(folder), num_classes=CLASSES, num_workers=0).fingerprint()),
                          ("read of every byte (sha256)", lambda: read_every_byte(folder))):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            measure()
            times.append(time.perf_counter() - started)
        print(f"{name}: " + ", ".join(f"{seconds:.3f} s" for seconds in times))


if __name__ == "__main__":
    main()
