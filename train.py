"""Train one kdresearch job (or a sweep with -m). See README.md; `python train.py --help` lists the options.

The same job runs as `python -m kdresearch.train ...` or `kdresearch-train ...` once the package is installed.
"""

from kdresearch.train import main

if __name__ == "__main__":
    main()
