"""``python -m spinifel`` is the same as the ``spinifel-mpi`` command."""

from spinifel.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
