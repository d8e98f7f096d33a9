"""``python -m echocare.experiments SPEC.json``: run one grid cell (what :func:`run_experiment` launches)."""

import sys

from echocare.experiments.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
