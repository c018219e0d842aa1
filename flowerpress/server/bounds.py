"""Server-side bounds on validated updates, applied before any strategy sees them.

Every accepted update is clipped to an L2 norm bound ``M`` (Sun et al., "Can
You Really Backdoor Federated Learning?", 2019, https://arxiv.org/abs/1911.07963:
norm bounding limits what a few attacking devices can do at little cost in
accuracy). We clip (``delta / max(1, ||delta|| / M)``) rather than reject, so
an honest device whose update is large still counts, with its direction kept.

The bound is never off. :class:`UpdateNormBound` chooses it per round:

- ``max-update-norm = M > 0``: ``M``, fixed.
- ``max-update-norm = 0`` (the default): derived from the model and the run.
  Before any update was accepted, ``M_1 = max(||w_0||, 0.01 sqrt(d))``: one
  round of honest training moves a model by less than its own initial norm
  (measured on the bundled tasks: first-round update norms are 0.10x of
  ``||w_0||`` for the digits MLP, 0.46x for logistic regression; the
  ``0.01 sqrt(d)`` floor, an RMS step of 0.01 per weight, covers a model
  initialised at zero). After a round that accepted updates,
  ``M_{t+1} = AUTO_FACTOR * median_i min(||delta_i||, M_t)``: a few times the
  typical honest update of the run so far. A minority of hostile devices
  cannot move the median out of the honest norms; a hostile majority can grow
  the bound by at most ``AUTO_FACTOR`` per round.
- Under differential privacy: :func:`dp_update_bound` (the device's clip ``C``
  plus a high-probability bound on the norm of its noise), so that the bound
  holds whatever a device claims, and an honest noised update is clipped with
  probability at most ``exp(-DP_NOISE_TAIL**2 / 2)``; docs/privacy.md derives it.

Why "never off": Flower's ``FedAdam``, ``FedAdagrad`` and ``FedYogi`` (and the
built-in server optimizers) divide each step by the root of a running mean of
squared aggregated deltas, which decays by ``beta_2`` (0.99) per round. One
update ``r`` times the honest scale multiplies that root by about ``r/k`` (a
cohort of ``k``), so the model barely moves for some ``200 ln(r/k)`` rounds; at
float32-max it overflows to infinity and the model never moves again (issue 20:
accuracy 0.50 against 0.84). A bound within a small factor of honest norms keeps
that factor near 1.

It complements, and does not replace, robust strategies: a clipped update is
still a device's choice of direction, weighted by the ``num-examples`` it
reports (capped by ``max-client-weight``). Clipping an update that was already
privatized is post-processing of that device's release.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

# The DP bound's formula lives with the mechanisms (privacy/ is below server/).
from flowerpress.privacy.mechanisms import DP_NOISE_TAIL, dp_update_bound

__all__ = ["AUTO_FACTOR", "AUTO_FLOOR_RMS", "DP_NOISE_TAIL", "DpBound", "UpdateNormBound",
           "bound_update_norm", "dp_update_bound", "l2_norm"]

Weights = list[NDArray[np.float32]]
#: The DP bound of the round being collected, given the model's element count
#: (``flowerpress.privacy.ServerPrivacy.update_bound``).
DpBound = Callable[[int], float]

#: Elements handled at a time (bounds the temporary memory).
_CHUNK = 1 << 14
#: ``M_{t+1} = AUTO_FACTOR * median`` of the last round's (bounded) norms: honest
#: norms on the bundled tasks change by at most 1.2x per round and spread by
#: less than 1.2x within an iid round (tests/server/test_bounds.py measures the
#: digits run), so honest updates are not clipped.
AUTO_FACTOR = 4.0
#: RMS per-weight step of the first-round floor ``0.01 sqrt(d)`` (a zero model).
AUTO_FLOOR_RMS = 0.01
_STATE_VERSION = 1


def l2_norm(update: Sequence[NDArray[np.float32]]) -> float:
    """The L2 norm of all tensors together; finite for any finite float32 input.

    Squares of float32 values up to 3.4e38 overflow float32, so each chunk is
    scaled by its largest magnitude first (``||x|| = m ||x / m||``) and the
    scaled squares summed into a float64 total. One reused float32 buffer of
    ``_CHUNK`` elements is the only temporary memory.
    """
    total = 0.0
    size = max((int(np.size(t)) for t in update), default=0)
    buffer = np.empty(min(_CHUNK, size), np.float32)
    for tensor in update:
        flat = np.asarray(tensor, dtype=np.float32).reshape(-1)
        for lo in range(0, flat.size, _CHUNK):
            chunk = buffer[:min(_CHUNK, flat.size - lo)]
            np.abs(flat[lo:lo + _CHUNK], out=chunk)
            peak = float(chunk.max())
            if peak == 0.0:
                continue
            np.multiply(chunk, np.float32(1.0 / peak), out=chunk)
            total += peak * peak * float(np.dot(chunk, chunk))
    return math.sqrt(total)


def bound_update_norm(delta: Sequence[NDArray[np.float32]], max_norm: float
                      ) -> tuple[Weights, float, bool]:
    """Clip ``delta`` to L2 norm ``max_norm`` (Sun et al. 2019); ``max_norm <= 0`` is off.

    The fixed-bound primitive; the round loop uses :class:`UpdateNormBound`,
    whose bound is never off.

    Parameters
    ----------
    delta
        A validated update (finite float32 tensors).
    max_norm
        The bound ``M``; ``0`` (or less) returns ``delta`` unchanged.

    Returns
    -------
    tuple
        ``(delta', norm, clipped)``: the update scaled by ``min(1, M / ||delta||)``
        as new float32 arrays when clipped (the input is never modified), its
        norm before clipping (``nan`` when the bound is off and the norm was not
        computed), and whether it was scaled.

    Raises
    ------
    ValueError
        ``max_norm`` is not finite.
    """
    if not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be finite, got {max_norm!r}")
    if max_norm <= 0.0:
        return list(delta), math.nan, False
    norm = l2_norm(delta)
    if norm <= max_norm:
        return list(delta), norm, False
    scale = max_norm / norm
    out = [np.multiply(d, scale, dtype=np.float32) for d in delta]
    # float32 rounding can leave the result a few ulps above the bound.
    while l2_norm(out) > max_norm:
        scale *= 1.0 - 1e-6
        out = [np.multiply(d, scale, dtype=np.float32) for d in delta]
    return out, norm, True


class UpdateNormBound:
    """The per-update L2 bound of a run (module docstring): fixed, derived, or DP.

    Sun et al. 2019 (norm bounding), with the bound derived from the model and
    the norms accepted so far when the run config does not fix one.

    Parameters
    ----------
    initial_weights
        The run's initial global model: ``M_1 = max(||w_0||, 0.01 sqrt(d))``.
    max_norm
        Run-config ``max-update-norm``: ``> 0`` fixes the bound; ``0`` derives it.
    dp_bound
        Under DP, the ledger's bound for the round being collected, given ``d``
        (``ServerPrivacy.update_bound``); it replaces both. ``None`` without DP.
    factor
        ``AUTO_FACTOR``.

    Raises
    ------
    ValueError
        ``max_norm`` negative or not finite, ``factor`` below 1, or an empty model.
    """

    def __init__(self, initial_weights: Sequence[NDArray[np.float32]], *,
                 max_norm: float = 0.0, dp_bound: DpBound | None = None,
                 factor: float = AUTO_FACTOR) -> None:
        if not (math.isfinite(max_norm) and max_norm >= 0.0):
            raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
        self.elements = sum(int(np.size(w)) for w in initial_weights)
        if self.elements < 1:
            raise ValueError("the model has no elements")
        self.max_norm = max_norm
        self.factor = factor
        self.dp_bound = dp_bound
        self.initial = max(l2_norm(initial_weights),
                           AUTO_FLOOR_RMS * math.sqrt(self.elements))
        self._derived = self.initial  # M_t of the derived rule
        self._round: int | None = None  # the round whose norms are pending
        self._norms: list[float] = []

    @property
    def mode(self) -> str:
        """``dp``, ``fixed`` or ``derived``: what decides :meth:`current`."""
        if self.dp_bound is not None:
            return "dp"
        return "fixed" if self.max_norm > 0 else "derived"

    def current(self) -> float:
        """The bound for updates of the round being collected."""
        if self.dp_bound is not None:
            return float(self.dp_bound(self.elements))
        return self.max_norm if self.max_norm > 0 else self._derived

    def _roll(self, server_round: int) -> None:
        if self._round is not None and server_round != self._round and self._norms:
            self._derived = self.factor * float(np.median(self._norms))
            self._norms = []
        self._round = server_round

    def apply(self, delta: Sequence[NDArray[np.float32]], *, server_round: int
              ) -> tuple[Weights, float, bool]:
        """Clip one accepted update to :meth:`current` and remember its norm.

        The first call of a new ``server_round`` closes the previous round
        (its median sets the derived bound), so the loop needs no other call.

        Returns
        -------
        tuple
            ``(delta', norm, clipped)`` as :func:`bound_update_norm`.
        """
        self._roll(server_round)
        bound = self.current()
        if not (math.isfinite(bound) and bound > 0.0):  # a bug in dp_bound, not a device
            raise ValueError(f"update bound must be a finite number > 0, got {bound!r}")
        out, norm, clipped = bound_update_norm(delta, bound)
        self._norms.append(min(norm, bound))
        return out, norm, clipped

    def describe(self) -> dict[str, Any]:
        """For results.json: the rule and the bound the next update gets."""
        return {"mode": self.mode, "bound": self.current(), "initial": self.initial,
                "factor": self.factor}

    def state_dict(self) -> dict[str, Any]:
        """JSON state; :meth:`load_state_dict` restores it exactly."""
        return {"version": _STATE_VERSION, "derived": self._derived, "round": self._round,
                "norms": list(self._norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (ValueError naming a bad field)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"update bound state: version must be {_STATE_VERSION}")
        derived = float(state["derived"])
        norms = [float(n) for n in state["norms"]]
        if not (math.isfinite(derived) and derived > 0):
            raise ValueError(f"update bound state: derived must be > 0, got {derived!r}")
        if not all(math.isfinite(n) and n >= 0 for n in norms):
            raise ValueError("update bound state: norms must be finite and >= 0")
        raw_round = state["round"]
        if raw_round is not None and (isinstance(raw_round, bool)
                                      or not isinstance(raw_round, int)):
            raise ValueError(f"update bound state: round must be an int, got {raw_round!r}")
        self._derived, self._norms, self._round = derived, norms, raw_round
