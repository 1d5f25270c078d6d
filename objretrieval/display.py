"""How objretrieval objects show themselves: configuration reprs and small HTML tables for notebooks.

- :func:`config_repr` lists an object's constructor arguments with their current values, read back from the
  attributes of the same names; losses, miners, samplers, models and evaluators print themselves with it
  (the :class:`ConfigRepr` mixin), so ``ContrastiveLoss()`` shows as
  ``ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, ...)``. Tensors and arrays other than single numbers
  (labels, proxies) and long sequences are state, never shown.
- :class:`SummaryRepr` prints the objects that hold data (shortlists, caches, descriptor files, results) as a
  summary, ``Shortlist(queries=70, depth=100, missing=0)``: a tensor or array in it shows its shape and dtype,
  never its values (:func:`summary_value`).
- :func:`html_table` is the one HTML table the ``_repr_html_`` methods of the result types build on
  (:class:`~objretrieval.metrics.RetrievalResult`, :class:`~objretrieval.metrics.revisited.RevisitedResult`,
  :class:`~objretrieval.metrics.revisited.GLDv2Result`, :class:`~objretrieval.search.Neighbors`); Jupyter
  calls them. Long per-query values and neighbour lists are truncated, with a note saying what is shown.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ConfigRepr",
    "SummaryRepr",
    "config_repr",
    "constructor_arguments",
    "gldv2_result_html",
    "html_table",
    "neighbors_html",
    "per_query_html",
    "retrieval_result_html",
    "revisited_result_html",
    "summary_value",
]

#: Sequences longer than this are state (labels, per-class values), not configuration: left out of reprs.
_MAX_SEQUENCE = 8
#: Reprs longer than this are replaced by the type's name.
_MAX_VALUE_REPR = 60
#: Rows and columns shown by the HTML tables before truncating.
MAX_ROWS = 10
MAX_COLUMNS = 8

_SKIP = object()  # a value that is not configuration (tensors, submodules, bound methods)


# ----------------------------------------------------------------------------------------------- reprs


def constructor_arguments(obj: Any) -> dict[str, str]:
    """The arguments of ``type(obj).__init__`` that ``obj`` stores, name -> the text of its current value.

    An argument is read from the attribute of the same name, or of the name a class declares in a
    ``config_attributes`` mapping (``{"argument": "attribute"}``; a dotted ``"part.attribute"`` reads it from
    a part, each step an attribute or a dict key; ``None`` hides an argument). Arguments stored under another
    name, transformed into tensors or submodules, or whose attribute raises, are skipped: a repr never fails.
    """
    try:
        parameters = inspect.signature(type(obj).__init__).parameters
    except (TypeError, ValueError):  # a constructor without a Python signature
        return {}
    renamed: Mapping[str, str | None] = getattr(type(obj), "config_attributes", {})
    found: dict[str, str] = {}
    for name, parameter in list(parameters.items())[1:]:  # the first is self
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        attribute = renamed.get(name, name)
        if attribute is None:
            continue
        try:
            value = _read(obj, attribute)
        except Exception:  # a missing or failing attribute only leaves the argument out
            continue
        value = _config_value(value)
        if value is not _SKIP:
            found[name] = value
    return found


def _read(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path="a.b"``, where a mapping on the way is indexed (``obj.a["b"]``)."""
    for name in path.split("."):
        obj = obj[name] if isinstance(obj, Mapping) else getattr(obj, name)
    return obj


def config_repr(obj: Any) -> str:
    """``"name=value, ..."`` of :func:`constructor_arguments`, for ``extra_repr`` or ``__repr__``."""
    return ", ".join(f"{name}={value}" for name, value in constructor_arguments(obj).items())


class ConfigRepr:
    """Mix in (first among the bases) to print the constructor arguments: ``Loss(margin=0.2, ...)``.

    An ``nn.Module`` keeps its own ``__repr__`` (children included), which calls :meth:`extra_repr`; any other
    class (samplers, evaluators) prints ``Name(extra_repr)``.
    """

    def extra_repr(self) -> str:
        """The constructor arguments and their values (see :func:`config_repr`)."""
        return config_repr(self)

    def __repr__(self) -> str:
        if isinstance(self, nn.Module):
            return super().__repr__()
        return f"{type(self).__name__}({self.extra_repr()})"


def _config_value(value: Any) -> Any:
    """The text shown for a stored argument, or ``_SKIP`` when the value is state rather than configuration."""
    if value is None or isinstance(value, (bool, str)):
        return repr(value)
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        # a one-number tensor is an initial value (a learnable margin); larger ones (labels, proxies) are state
        if value.size != 1:
            return _SKIP
        value = value.reshape(())[()]
    if isinstance(value, np.generic):
        return str(value)  # numpy prints a float32 1.2 as 1.2, where float() would give 1.2000000476837158
    if isinstance(value, numbers.Number):
        return repr(value)
    # submodules print themselves as children; a bound method means the argument is stored elsewhere
    if isinstance(value, nn.Module) or inspect.ismethod(value):
        return _SKIP
    if isinstance(value, (tuple, list)):
        if len(value) > _MAX_SEQUENCE:
            return _SKIP
        items = [_config_value(v) for v in value]
        if any(item is _SKIP for item in items):
            return _SKIP
        return _bracketed(items, value)
    if inspect.isroutine(value) or inspect.isclass(value):  # e.g. a label_comparison function
        return getattr(value, "__qualname__", type(value).__name__)
    text = repr(value)
    # default object reprs (<... at 0x...>) and long ones say less than the type's name
    return type(value).__name__ if text.startswith("<") or len(text) > _MAX_VALUE_REPR else text


class SummaryRepr:
    """Mix in (first among the bases) to print an object that holds data as ``Name(field=value, ...)``.

    The fields are those :meth:`summary_fields` returns: by default a dataclass's fields (declare it with
    ``repr=False``, or the dataclass's own repr wins), each shown by :func:`summary_value`; a class overrides
    :meth:`summary_fields` to show counts instead (``queries=70``).
    """

    def summary_fields(self) -> dict[str, Any]:
        """Name -> value of what the repr shows."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(cast(Any, self)) if f.repr}

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={summary_value(value)}" for name, value in self.summary_fields().items())
        return f"{type(self).__name__}({fields})"


def summary_value(value: Any) -> str:
    """The text of one value of a summary: a tensor or array (other than a 0-d one) as its shape and dtype,
    ``Tensor(shape=(70, 100), dtype=float32)``; mappings and short sequences item by item; the rest as its
    repr."""
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim == 0:  # one number, e.g. a metric kept as a tensor
            return repr(value.item())
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={dtype})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {summary_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # NamedTuples print themselves
        if len(value) > _MAX_SEQUENCE:
            return f"{type(value).__name__}(len={len(value)})"
        return _bracketed([summary_value(v) for v in value], value)
    if isinstance(value, np.generic):
        return str(value)  # 0.5, where numpy 2's repr says np.float64(0.5)
    return repr(value)


def _bracketed(items: list[str], sequence: tuple[Any, ...] | list[Any]) -> str:
    """``(a, b)``, ``(a,)`` or ``[a, b]``: the texts of a sequence's items in its brackets."""
    inner = ", ".join(items) + ("," if isinstance(sequence, tuple) and len(items) == 1 else "")
    return f"({inner})" if isinstance(sequence, tuple) else f"[{inner}]"


# ----------------------------------------------------------------------------------------------- HTML


def _cell(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return html.escape(str(value))


def html_table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str] | None = None,
    *,
    caption: str | None = None,
    note: str | None = None,
) -> str:
    """A small HTML table; floats are shown with 4 decimals, every cell is escaped.

    Args:
        rows: the cells, row by row (the first cell of a row is its header cell).
        header: column titles.
        caption: a title above the table.
        note: a line under the table (counts, what a truncation left out).
    """
    parts = ["<table>"]
    if caption is not None:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    if header is not None:
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        first, *rest = row
        parts.append(f"<tr><th>{_cell(first)}</th>" + "".join(f"<td>{_cell(v)}</td>" for v in rest) + "</tr>")
    parts.append("</tbody></table>")
    if note is not None:
        parts.append(f"<p>{html.escape(note)}</p>")
    return "".join(parts)


def _shown(total: int, limit: int, what: str) -> str:
    return f"first {limit} of {total} {what}" if total > limit else f"{total} {what}"


def per_query_html(
    columns: Mapping[str, Tensor], *, caption: str = "per query", max_rows: int = MAX_ROWS
) -> str:
    """The per-query values (name -> (Q,) tensor) as a table of the first ``max_rows`` queries."""
    if not columns:
        return ""
    values = {name: torch.as_tensor(v).reshape(-1).tolist() for name, v in columns.items()}
    total = max(len(v) for v in values.values())
    rows = [[q, *(v[q] if q < len(v) else "" for v in values.values())] for q in range(min(total, max_rows))]
    note = f"showing the {_shown(total, max_rows, 'queries')}" if total > max_rows else None
    return html_table(rows, ["query", *values], caption=caption, note=note)


def retrieval_result_html(result: Any) -> str:
    """:class:`~objretrieval.metrics.RetrievalResult`: metric values, counts, search stats, per-query values."""
    note = f"{result.num_queries} queries, {result.num_without_relevant} without relevant items"
    if result.search is not None:
        s = result.search
        note += f"; search: {s.screened} pairs screened ({s.precision}), {s.rescored} rescored exactly"
    table = html_table(list(result.metrics.items()), ["metric", "value"], note=note)
    return table + per_query_html(result.per_query)


def revisited_result_html(result: Any) -> str:
    """:class:`~objretrieval.metrics.revisited.RevisitedResult`: mAP and mP@k per protocol, per-query AP."""
    protocols = {"easy": result.easy, "medium": result.medium, "hard": result.hard}
    kappas = result.easy.kappas
    rows = [[name, p.map, *p.mean_precision.tolist()] for name, p in protocols.items()]
    table = html_table(rows, ["protocol", "mAP", *(f"mP@{k}" for k in kappas)], caption="revisited")
    return table + per_query_html(
        {f"AP {name}": p.ap for name, p in protocols.items()}, caption="AP per query"
    )


def gldv2_result_html(result: Any) -> str:
    """:class:`~objretrieval.metrics.revisited.GLDv2Result`: mAP (public/private splits), per-query AP."""
    rows = [["mAP", result.map]]
    rows += [
        [name, value]
        for name, value in (("public", result.public), ("private", result.private))
        if value is not None
    ]
    table = html_table(rows, ["split", "value"], caption="GLDv2", note=f"{result.ap.numel()} queries")
    return table + per_query_html({"AP": result.ap}, caption="AP per query")


def neighbors_html(neighbors: Any, *, max_rows: int = MAX_ROWS, max_columns: int = MAX_COLUMNS) -> str:
    """:class:`~objretrieval.search.Neighbors`: a (Q, k) table of ``index (score)``, truncated, missing slots
    shown as ``-``."""
    indices, scores = neighbors.indices, neighbors.scores
    num_queries, k = indices.shape
    rows = [
        [q, *(f"{i} ({s:.4f})" if i >= 0 else "-" for i, s in zip(idx, sc, strict=True))]
        for q, (idx, sc) in enumerate(
            zip(
                indices[:max_rows, :max_columns].tolist(),
                scores[:max_rows, :max_columns].tolist(),
                strict=True,
            )
        )
    ]
    header = ["query", *(f"#{j + 1}" for j in range(min(k, max_columns)))]
    note = f"{_shown(num_queries, max_rows, 'queries')}, {_shown(k, max_columns, 'neighbours')}"
    if neighbors.num_missing:
        note += f"; {neighbors.num_missing} missing slots"
    return html_table(rows, header, caption="nearest neighbours: index (score)", note=note)
