"""``FullDataMeasure``: an accumulator that holds the pooled features for a full-data measure.

CKA streams (its states are sums over batches, :mod:`hf_cka.metric`, :mod:`hf_cka.streaming`);
the measures of :mod:`hf_cka.measures` beyond CKA (mutual k-NN, Procrustes, SVCCA, PWCCA, RSA)
need every sample at once. This accumulator keeps each layer's pooled ``(n, d)`` rows (float64,
on the device they arrive on) and computes the ``(La, Lb)`` matrix of the measure once, in
:meth:`~FullDataMeasure.compute`. Its memory grows with ``n``: it is checked against
``max_bytes`` (:func:`hf_cka.measures.estimate_bytes`) before every batch is kept, and the runner
checks it once up front when the data size and layer widths are known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import torch

from .accumulation import Features, SidedAccumulator
from .errors import InvalidInputError, ShapeMismatchError
from .measures import Measure, estimate_bytes, similarity


class FullDataMeasure(SidedAccumulator):
    """Holds the pooled features of ``La`` layers of side A and ``Lb`` of side B.

    Args:
        measure: a measure of :data:`hf_cka.measures.MEASURES` other than ``"cka"``.
        params: its keyword parameters (``{"k": 10}`` for ``"mutual_knn"``).
        num_layers_a: layers on side A.
        num_layers_b: layers on side B; ``None`` compares side A with itself (``update`` then
            takes no ``features_b``).
        layer_names_a: names of side A's layers (default ``A[0], A[1], ...``).
        layer_names_b: names of side B's layers.
        max_bytes: refuse (``FullDataMemoryError``) a batch that would take the held features
            and the measure's temporaries beyond this many bytes.
    """

    def __init__(
        self,
        measure: Measure,
        params: Mapping[str, Any],
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if measure == "cka":
            raise InvalidInputError(
                "measure='cka' streams (MinibatchCKA, StreamingLinearCKA); FullDataMeasure "
                "holds the features of the other measures"
            )
        super().__init__(num_layers_a, num_layers_b, layer_names_a, layer_names_b)
        self.measure, self.params, self.max_bytes = measure, dict(params), max_bytes
        self.rows_a: list[list[torch.Tensor]] = [[] for _ in range(num_layers_a)]
        self.rows_b: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers_b)]
        self._batches = 0

    @property
    def n_batches(self) -> int:
        """Number of batches held."""
        return self._batches

    @property
    def n_samples(self) -> int:
        """Number of samples held."""
        return sum(rows.shape[0] for rows in self.rows_a[0])

    def _add(self, features_a: Features, features_b: Features | None, batch_index: int) -> None:
        """Keep one batch, each layer's rows flattened to ``(n, d)`` (``FullDataMemoryError``
        when holding it would exceed ``max_bytes``)."""
        sides = [(features_a, self.rows_a)]
        if features_b is not None:
            sides.append((features_b, self.rows_b))
        for features, store in sides:
            if len(features) != len(store):
                raise ShapeMismatchError(
                    f"expected {len(store)} layer feature tensors, got {len(features)}"
                )
        counts = {f.shape[0] for features, _ in sides for f in features}
        if len(counts) != 1:
            raise ShapeMismatchError(
                f"every layer of both sides must hold the same samples, got row counts {counts}"
            )
        flat = [[f.detach().reshape(f.shape[0], -1) for f in features] for features, _ in sides]
        dims_b = None if self.self_similarity else [f.shape[1] for f in flat[-1]]
        estimate_bytes(
            self.n_samples + counts.pop(),
            [f.shape[1] for f in flat[0]],
            dims_b,
            measure=self.measure,
            max_bytes=self.max_bytes,
        )
        for rows, (_, store) in zip(flat, sides, strict=True):
            for layer_rows, held in zip(rows, store, strict=True):
                held.append(layer_rows.to(torch.float64))
        self._batches += 1

    def compute(self) -> torch.Tensor:
        """The ``(La, Lb)`` float64 matrix of the measure over every held sample (on the CPU)."""
        self._require_batches(1)
        side_a = [torch.cat(rows) for rows in self.rows_a]
        side_b = side_a if self.self_similarity else [torch.cat(rows) for rows in self.rows_b]
        matrix = torch.empty(self.num_layers_a, self.num_layers_b, dtype=torch.float64)
        for i, x in enumerate(side_a):
            for j, y in enumerate(side_b):
                matrix[i, j] = similarity(x, y, self.measure, **self.params).cpu()
        return matrix

    def reset(self) -> None:
        """Forget every batch."""
        for held in (*self.rows_a, *self.rows_b):
            held.clear()
        self._batches = 0

    def merge(self, other: Self) -> Self:
        """Append ``other``'s samples (same measure and layers) after this one's; returns self."""
        if (other.measure, other.num_layers_a, other.num_layers_b, other.self_similarity) != (
            self.measure, self.num_layers_a, self.num_layers_b, self.self_similarity
        ):  # fmt: skip
            raise ShapeMismatchError(
                f"cannot merge a {other.measure} {other.num_layers_a}x{other.num_layers_b} "
                f"accumulator into a {self.measure} {self.num_layers_a}x{self.num_layers_b} one"
            )
        pairs = zip((*self.rows_a, *self.rows_b), (*other.rows_a, *other.rows_b), strict=True)
        for mine, theirs in pairs:
            mine.extend(theirs)
        self._batches += other._batches
        return self

    def sync(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Nothing to do in one process; the runner refuses a distributed full-data run (the
        features would have to be gathered, not summed)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the held features, one ``(n, d)`` tensor per layer and side."""
        if not self._batches:
            return {}
        out = {f"a.{i}": torch.cat(rows).cpu() for i, rows in enumerate(self.rows_a)}
        if not self.self_similarity:
            out |= {f"b.{j}": torch.cat(rows).cpu() for j, rows in enumerate(self.rows_b)}
        out["n_batches"] = torch.tensor(self._batches)
        return out

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the held features by ``states`` (as returned by :meth:`state_dict`)."""
        self.reset()
        if not states:
            return
        for side, store in (("a", self.rows_a), ("b", self.rows_b)):
            if side == "b" and self.self_similarity:
                continue
            for index, held in enumerate(store):
                key = f"{side}.{index}"
                if key not in states:
                    raise ShapeMismatchError(f"state dict lacks {key!r}; was it saved by hf_cka?")
                held.append(states[key].to(torch.float64))
        self._batches = int(states["n_batches"])
