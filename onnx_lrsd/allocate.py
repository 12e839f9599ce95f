"""Global allocation: one choice per layer for the whole model's budget (CMD's global search).

Each layer l offers options c with a cost C_l(c) (params, MACs or milliseconds) and a predicted
damage D_l(c) (its share of the model's squared output error). Two problems:

- `allocate_budget`:  min Σ_l D_l(c_l)  s.t.  Σ_l C_l(c_l) ≤ B
- `allocate_damage`:  min Σ_l C_l(c_l)  s.t.  Σ_l D_l(c_l) ≤ E

Both are multiple-choice knapsacks. The Lagrangian relaxation picks, for a multiplier λ, each
layer's argmin D + λC independently; the sums are monotone in λ, so bisection finds the λ at
the constraint. What the relaxation leaves between two hull points is then spent greedily, by
the best damage saved per unit of cost (or cost saved per unit of damage).
Pure numpy: no graph here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

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


def _lagrangian_choice(options: Sequence[Sequence[Option]], lam: float) -> List[int]:
    """Each layer's argmin D + λC (ties: the cheaper option)."""
    return [min(range(len(layer)), key=lambda i: (layer[i].damage + lam * layer[i].cost, layer[i].cost))
            for layer in options]


def _cost_scale(options: Sequence[Sequence[Option]]) -> tuple:
    """A λ range wide enough to go from 'cheapest everywhere' to 'least damage everywhere'."""
    damages = [o.damage for layer in options for o in layer if o.damage > 0]
    costs = [abs(o.cost) for layer in options for o in layer if o.cost != 0]
    d = max(damages) if damages else 1.0
    c = min(costs) if costs else 1.0
    lo = (min(damages) if damages else 1.0) / max(max(costs) if costs else 1.0, 1e-300) * 1e-6
    hi = d / max(c, 1e-300) * 1e6
    return max(lo, 1e-300), hi


def allocate_budget(options: Sequence[Sequence[Option]], budget: float) -> Allocation:
    """Least total damage with total cost ≤ `budget` (ValueError if even the cheapest
    choice of every layer costs more)."""
    _validate(options)
    cheapest = [min(range(len(layer)), key=lambda i: (layer[i].cost, layer[i].damage)) for layer in options]
    floor = _result(options, cheapest)
    if floor.cost > budget:
        raise ValueError(f"budget {budget:g} is below the cheapest allocation's cost {floor.cost:g}")
    lo, hi = _cost_scale(options)  # λ = hi: cheapest; λ = lo: least damage
    if _result(options, _lagrangian_choice(options, lo)).cost <= budget:
        best = _lagrangian_choice(options, lo)
    else:
        for _ in range(BISECTION_STEPS):
            mid = float(np.sqrt(lo * hi))
            if _result(options, _lagrangian_choice(options, mid)).cost <= budget:
                hi = mid
            else:
                lo = mid
            if hi / lo < 1 + 1e-9:
                break
        best = _lagrangian_choice(options, hi)
        if _result(options, best).cost > budget:
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
    """Least total cost with total damage ≤ `max_damage` (the least-damage choice of every
    layer is taken when nothing cheaper meets it)."""
    _validate(options)
    if max_damage < 0:
        raise ValueError(f"max_damage must be >= 0, got {max_damage}")
    lo, hi = _cost_scale(options)
    if _result(options, _lagrangian_choice(options, hi)).damage <= max_damage:
        return _result(options, _lagrangian_choice(options, hi))
    for _ in range(BISECTION_STEPS):
        mid = float(np.sqrt(lo * hi))
        if _result(options, _lagrangian_choice(options, mid)).damage <= max_damage:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    choice = _lagrangian_choice(options, lo)
    if _result(options, choice).damage > max_damage:
        choice = [min(range(len(layer)), key=lambda i: (layer[i].damage, layer[i].cost)) for layer in options]
    return _save(options, choice, max_damage)


def _save(options: Sequence[Sequence[Option]], choice: List[int], max_damage: float) -> Allocation:
    """Greedy downgrades within the damage left: most cost saved per unit of damage first."""
    choice = list(choice)
    damage = _result(options, choice).damage
    while True:
        best, best_gain = None, 0.0
        for l, layer in enumerate(options):
            current = layer[choice[l]]
            for i, option in enumerate(layer):
                saved = current.cost - option.cost
                extra = option.damage - current.damage
                if saved <= 0 or damage + extra > max_damage:
                    continue
                gain = saved / extra if extra > 0 else np.inf
                if gain > best_gain:
                    best, best_gain = (l, i), gain
        if best is None:
            return _result(options, choice)
        l, i = best
        damage += options[l][i].damage - options[l][choice[l]].damage
        choice[l] = i
