"""When long work shows a progress bar: ``progress=None`` (the default) decides from the size of the work.

``True`` always shows a ``tqdm.auto`` bar (a widget in notebooks), ``False`` never does, and ``None`` shows
one only when the call is long: its work, counted in multiply-adds of the products (or pairs for a learnt
scorer), is above the threshold of its kind, about ten seconds on a 2-core CPU.
"""

from __future__ import annotations

from typing import Literal

#: Work above which ``progress=None`` shows a bar, per kind of work.
AUTO_THRESHOLDS: dict[str, float] = {
    "products": 1e12,  # multiply-adds of a kNN search (queries x gallery x dim)
    "scorer_pairs": 1e5,  # (query, gallery) pairs given to a learnt pairwise scorer (AVSL, AMES)
    "images": 1e4,  # images projected or embedded by a network
}


def show_progress(
    progress: bool | None,
    work: float | None,
    kind: Literal["products", "scorer_pairs", "images"] = "products",
) -> bool:
    """Whether to show a bar: ``progress`` if given, else whether ``work`` (None: unknown) is large.

    Raises:
        TypeError: if ``progress`` is not a bool or None.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (decide from the work), got {progress!r}")
    if progress is not None:
        return progress
    return work is not None and work >= AUTO_THRESHOLDS[kind]
