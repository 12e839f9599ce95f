"""Global allocation: one choice per layer for the whole model's budget (CMD's global search).

Each layer l offers options c with a cost C_l(c) (params, MACs or milliseconds) and a predicted
damage D_l(c) (its share of the model's squared output error). Two problems:

- `allocate_budget`:  min Σ_l D_l(c_l)  s.t.  Σ_l C_l(c_l) ≤ B
- `allocate_damage`:  min Σ_l C_l(c_l)  s.t.  Σ_l D_l(c_l) ≤ E

Both are multiple-choice knapsacks. The Lagrangian relaxation picks, for a multiplier λ, each
layer's argmin D + λC independently; the sums are monotone in λ, so bisection finds the λ at
the constraint. What the relaxation leaves between two hull points is then spent greedily, by
the best damage saved per unit of cost; `allocate_damage` bisects on the budget.
`Sensitivity` turns a layer's reconstruction error into its predicted damage.
Pure numpy: no graph here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

BISECTION_STEPS = 100


@dataclass(frozen=True)
class Option:
    """One way of treating a layer: `cost` (lower is cheaper) and predicted `damage` (≥ 0)."""

    cost: float
    damage: float


@dataclass(frozen=True)
class Allocation:
    """The chosen option index of every layer, with the totals."""

    choice: tuple
    cost: float
    damage: float


def _validate(options: Sequence[Sequence[Option]]) -> None:
    if not options:
        raise ValueError("no layers to allocate")
    for index, layer in enumerate(options):
        if not layer:
            raise ValueError(f"layer {index} has no options")
        for option in layer:
            if not (np.isfinite(option.cost) and np.isfinite(option.damage) and option.damage >= 0):
                raise ValueError(f"layer {index}: option {option} must have finite cost and damage >= 0")


def _result(options: Sequence[Sequence[Option]], choice: List[int]) -> Allocation:
    cost = float(sum(layer[c].cost for layer, c in zip(options, choice)))
    damage = float(sum(layer[c].damage for layer, c in zip(options, choice)))
    return Allocation(tuple(choice), cost, damage)


def _tables(options: Sequence[Sequence[Option]]):
    """Costs and damages as [layers, most options] arrays, missing options at +inf."""
    width = max(len(layer) for layer in options)
    cost = np.full((len(options), width), np.inf)
    damage = np.full((len(options), width), np.inf)
    for l, layer in enumerate(options):
        cost[l, :len(layer)] = [o.cost for o in layer]
        damage[l, :len(layer)] = [o.damage for o in layer]
    return cost, damage


def _lagrangian_choice(tables, lam: float) -> List[int]:
    """Each layer's argmin D + λC (ties: the first, and options are tried cheapest first)."""
    cost, damage = tables
    order = np.argsort(np.where(np.isfinite(cost), cost, np.inf), axis=1, kind="stable")
    score = np.take_along_axis(damage + lam * np.where(np.isfinite(cost), cost, 0.0), order, axis=1)
    score[~np.isfinite(np.take_along_axis(cost, order, axis=1))] = np.inf
    return [int(i) for i in order[np.arange(len(order)), np.argmin(score, axis=1)]]


def _totals(tables, choice: List[int]) -> tuple:
    cost, damage = tables
    rows = np.arange(len(choice))
    return float(cost[rows, choice].sum()), float(damage[rows, choice].sum())


def _cost_scale(options: Sequence[Sequence[Option]]) -> tuple:
    """A λ range wide enough to go from 'cheapest everywhere' to 'least damage everywhere'."""
    damages = [o.damage for layer in options for o in layer if o.damage > 0]
    costs = [abs(o.cost) for layer in options for o in layer if o.cost != 0]
    d_lo, d_hi = (min(damages), max(damages)) if damages else (1.0, 1.0)
    c_lo, c_hi = (min(costs), max(costs)) if costs else (1.0, 1.0)
    return max(d_lo / c_hi * 1e-6, 1e-300), d_hi / max(c_lo, 1e-300) * 1e6


def allocate_budget(options: Sequence[Sequence[Option]], budget: float) -> Allocation:
    """Least total damage with total cost ≤ `budget` (ValueError if even the cheapest
    choice of every layer costs more)."""
    _validate(options)
    tables = _tables(options)
    cheapest = [min(range(len(layer)), key=lambda i: (layer[i].cost, layer[i].damage)) for layer in options]
    if _totals(tables, cheapest)[0] > budget + 1e-9 * max(abs(budget), 1.0):  # rounding of the sums
        raise ValueError(f"budget {budget:g} is below the cheapest allocation's cost {_totals(tables, cheapest)[0]:g}")
    lo, hi = _cost_scale(options)  # λ = hi: cheapest; λ = lo: least damage
    if _totals(tables, _lagrangian_choice(tables, lo))[0] <= budget:
        best = _lagrangian_choice(tables, lo)
    else:
        for _ in range(BISECTION_STEPS):
            mid = float(np.sqrt(lo * hi))
            if _totals(tables, _lagrangian_choice(tables, mid))[0] <= budget:
                hi = mid
            else:
                lo = mid
            if hi / lo < 1 + 1e-9:
                break
        best = _lagrangian_choice(tables, hi)
        if _totals(tables, best)[0] > budget:
            best = cheapest
    return _spend(options, best, budget)


def _spend(options: Sequence[Sequence[Option]], choice: List[int], budget: float) -> Allocation:
    """Greedy upgrades with the leftover budget: best damage saved per unit of cost first."""
    choice = list(choice)
    spent = _result(options, choice).cost
    while True:
        best, best_gain = None, 0.0
        for l, layer in enumerate(options):
            current = layer[choice[l]]
            for i, option in enumerate(layer):
                extra = option.cost - current.cost
                saved = current.damage - option.damage
                if saved <= 0 or spent + extra > budget:
                    continue
                gain = saved / extra if extra > 0 else np.inf
                if gain > best_gain:
                    best, best_gain = (l, i), gain
        if best is None:
            return _result(options, choice)
        l, i = best
        spent += options[l][i].cost - options[l][choice[l]].cost
        choice[l] = i


def allocate_damage(options: Sequence[Sequence[Option]], max_damage: float) -> Allocation:
    """Least total cost with total damage ≤ `max_damage`: the smallest budget whose
    `allocate_budget` stays within it, by bisection on the budget (the least-damage choice of
    every layer when nothing cheaper meets it)."""
    _validate(options)
    if max_damage < 0:
        raise ValueError(f"max_damage must be >= 0, got {max_damage}")
    least = _result(options, [min(range(len(layer)), key=lambda i: (layer[i].damage, layer[i].cost))
                              for layer in options])
    lo = sum(min(o.cost for o in layer) for layer in options)
    best = allocate_budget(options, lo)
    if best.damage <= max_damage:
        return best
    if least.damage > max_damage:
        return least
    best, hi = least, least.cost
    for _ in range(BISECTION_STEPS):
        if hi - lo <= 1e-9 * max(abs(hi), 1.0):
            break
        mid = 0.5 * (lo + hi)
        trial = allocate_budget(options, mid)
        if trial.damage <= max_damage:
            best, hi = (trial if trial.cost <= best.cost else best), mid
        else:
            lo = mid
    return best


_TINY = 1e-12

MAX_EXPONENT = 8.0


@dataclass(frozen=True)
class Sensitivity:
    """A layer's predicted share of the model's squared relative output error at
    reconstruction error e: D(e) = d₁(e/e₁)² up to the first probe, d₁(e/e₁)^p beyond, with p
    from the two probes (clipped to [1, `MAX_EXPONENT`]; 2 with one probe)."""

    error: float
    damage: float
    exponent: float = 2.0

    def at(self, e: float) -> float:
        ratio = max(e, 0.0) / self.error
        return self.damage * ratio ** (2.0 if ratio <= 1 else self.exponent)

    @classmethod
    def fitted(cls, points: Sequence[Tuple[float, float]]) -> "Sensitivity":
        """From (reconstruction error, squared output error) probe points."""
        points = sorted((max(e, _TINY), max(d, _TINY)) for e, d in points)
        (e1, d1), (e2, d2) = points[0], points[-1]
        exponent = 2.0 if e2 <= e1 * 1.05 else float(np.clip(np.log(d2 / d1) / np.log(e2 / e1), 1.0, MAX_EXPONENT))
        return cls(e1, d1, exponent)


UNIT = Sensitivity(1.0, 1.0)
"""D(e) = e²: every layer alike (no probes)."""


FRONTIER_POINTS = 256
"""Most options a compound unit keeps (evenly thinned along its cost)."""


def compound_frontier(members: Sequence[Sequence[Option]],
                      limit: int = FRONTIER_POINTS) -> List[Tuple[Option, Tuple[int, ...]]]:
    """The layers of a group treated separately, as options of one unit: the Pareto frontier
    (least damage for the cost) of the members' summed choices, merged member by member and
    thinned to `limit` points, cheapest first, each with the members' option indices."""
    _validate(members)
    front = [(0.0, 0.0, ())]
    for layer in members:
        merged = sorted(((c + o.cost, d + o.damage, choice + (i,)) for c, d, choice in front
                         for i, o in enumerate(layer)), key=lambda p: (p[0], p[1]))
        front, best = [], np.inf
        for point in merged:
            if point[1] < best:
                front.append(point)
                best = point[1]
        if len(front) > limit:
            front = [front[i] for i in np.unique(np.linspace(0, len(front) - 1, limit).round().astype(int))]
    return [(Option(c, d), choice) for c, d, choice in front]
