"""Entry point of a local rank started by rank 0 (`python -m dayzero.distributed.spawned`, see
runtime.join): meet rank 0, load this rank's slice of the model, follow rank 0's steps."""
import sys

from dayzero.distributed.runtime import _spawned

if __name__ == "__main__":
    sys.exit(_spawned())
