"""Block partitioning arithmetic (pure functions, no MPI)."""

from __future__ import annotations


def block_range(n_items: int, n_parts: int, part: int) -> tuple[int, int]:
    """Contiguous block ``[start, stop)`` of ``n_items`` owned by ``part`` of ``n_parts``.

    The first ``n_items % n_parts`` parts get one extra item, so block sizes differ by at
    most one and the blocks concatenated in part order are ``range(n_items)``.

    Parameters
    ----------
    n_items : int
        Number of items (images, orientations...), >= 0.
    n_parts : int
        Number of parts (MPI ranks), >= 1.
    part : int
        Index of the part, ``0 <= part < n_parts``.

    Returns
    -------
    (start, stop) : tuple of int
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    if not 0 <= part < n_parts:
        raise ValueError(f"part must be in [0, {n_parts}), got {part}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    base, extra = divmod(n_items, n_parts)
    start = part * base + min(part, extra)
    stop = start + base + (1 if part < extra else 0)
    return start, stop


def block_sizes(n_items: int, n_parts: int) -> list[int]:
    """Sizes of all blocks of :func:`block_range`, in part order."""
    return [b - a for a, b in (block_range(n_items, n_parts, p) for p in range(n_parts))]


def round_robin(n_items: int, n_parts: int, part: int) -> list[int]:
    """Indices ``part, part + n_parts, ...`` below ``n_items`` (the regularisation sweep)."""
    if not 0 <= part < n_parts:
        raise ValueError(f"part must be in [0, {n_parts}), got {part}")
    return list(range(part, n_items, n_parts))
