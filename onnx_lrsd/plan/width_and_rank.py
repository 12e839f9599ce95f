"""One allocation over channel-group widths and low-rank factorizations.

Two kinds of decision share one budget:

- a group g (coupled channels, `model.channel_groups`) keeps k_g of its C_g channels, at
  predicted damage D_g(k_g) (its refit error curve times its measured sensitivity) and a cost
  k_g · c_g for the constants and ops that hold one value per channel (biases, BatchNorm,
  depthwise convs; the weight layers are costed below);
- a weight layer l (in n, out m) stays dense or takes a low-rank candidate j (rank r_j,
  damage D_lj, cost C_lj at full width). Narrowing scales its sides: a = k_in / C_in for
  the group it reads, b = k_out / C_out for the group it writes (1 when none; a layer reading
  a channel Concat reads a share σ_g = C_g / C of its C input channels from each part's group:
  a = 1 − Σ_g σ_g (1 − k_g / C_g)), so

      dense:     C_l · a · b              candidate j:  C_lj · (a·n + b·m) / (n + m),

  (exact for params and MACs of a chain r·(n + m); a measured latency is scaled the same way),
  and a candidate that no longer saves over the narrowed dense layer costs as that layer.

The damages add: a layer's low-rank error on top of its group's refit error is
orthogonal to it (the refit's residual is orthogonal to the span of the kept channels, the
low-rank error lies in it), so the squared output errors sum. The layer's candidate damage is
taken from its full-width curve, an upper bound of its narrowed one.

`allocate_width_and_rank` is a greedy marginal allocation: from the full model, repeatedly take
the move (a group to any narrower width, a layer to any cheaper option) with the least damage
added per unit of cost saved, until the budget is met (`budget`) or no move fits under the
damage bound (`max_damage`). Moves to any cheaper option, not only the next, keep it from
stalling on non-convex curves. Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["WidthUnit", "RankUnit", "WidthRankAllocation", "allocate_width_and_rank", "layer_cost"]


@dataclass(frozen=True)
class WidthUnit:
    """A channel group: candidate `widths` (ascending, the last = `channels`), the predicted
    damage at each, and the cost of its per-channel constants and ops per channel kept."""

    name: str
    channels: int
    widths: Tuple[int, ...]
    damages: Tuple[float, ...]
    cost_per_channel: float = 0.0

    def __post_init__(self) -> None:
        if not self.widths or self.widths[-1] != self.channels or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"{self.name}: widths must ascend to the full width {self.channels}")
        if len(self.damages) != len(self.widths):
            raise ValueError(f"{self.name}: one damage per width")


@dataclass(frozen=True)
class RankUnit:
    """A weight layer: its `dense` cost and its candidates' `costs` and `damages` at full
    width; `in_features` / `out_features` the sides a narrowing scales (`in_group` /
    `out_group`: the groups it reads and writes, None when none; `in_parts`: instead of
    `in_group`, (group, share of the input channels) of each group it reads through a channel
    Concat)."""

    name: str
    in_features: int
    out_features: int
    dense: float
    costs: Tuple[float, ...] = ()
    damages: Tuple[float, ...] = ()
    in_group: Optional[str] = None
    out_group: Optional[str] = None
    in_parts: Tuple[Tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.costs) != len(self.damages):
            raise ValueError(f"{self.name}: one damage per candidate")
        if self.in_parts and (self.in_group is not None or sum(share for _, share in self.in_parts) > 1 + 1e-9):
            raise ValueError(f"{self.name}: in_parts are shares of the input (and replace in_group)")

    @property
    def reads(self) -> Tuple[str, ...]:
        """The groups whose widths scale the input side."""
        return tuple(g for g, _ in self.in_parts) if self.in_parts else \
            ((self.in_group,) if self.in_group is not None else ())

    def in_scale(self, scale) -> float:
        """a from the groups' width ratios `scale(group)`."""
        if self.in_parts:
            return 1.0 - sum(share * (1.0 - scale(group)) for group, share in self.in_parts)
        return scale(self.in_group)


@dataclass(frozen=True)
class WidthRankAllocation:
    """Each group's width and each layer's choice (0 dense, j the candidate j − 1), with the
    predicted total cost and damage; `reached`: whether the budget was met."""

    widths: Dict[str, int]
    choices: Dict[str, int]
    cost: float
    damage: float
    reached: bool = True


def layer_cost(unit: RankUnit, choice: int, a: float, b: float) -> float:
    """The layer's cost at side scales a (input) and b (output): dense, or candidate
    `choice` − 1 unless it no longer saves over the narrowed dense layer."""
    dense = unit.dense * a * b
    if choice == 0:
        return dense
    n, m = unit.in_features, unit.out_features
    return min(unit.costs[choice - 1] * (a * n + b * m) / (n + m), dense)


class _State:
    """Current widths (index into each unit's `widths`) and layer choices, with the costs of
    moves from them."""

    def __init__(self, groups: Sequence[WidthUnit], layers: Sequence[RankUnit]):
        self.groups = {g.name: g for g in groups}
        self.layers = list(layers)
        self.width_index = {g.name: len(g.widths) - 1 for g in groups}
        self.choice = [0] * len(self.layers)
        self.members: Dict[str, List[int]] = {g.name: [] for g in groups}
        for index, unit in enumerate(self.layers):
            for side in dict.fromkeys(unit.reads + ((unit.out_group,) if unit.out_group is not None else ())):
                if side not in self.groups:
                    raise ValueError(f"{unit.name}: unknown group {side!r}")
                self.members[side].append(index)

    def scale(self, group: Optional[str], override: Optional[Tuple[str, int]] = None) -> float:
        if group is None:
            return 1.0
        unit = self.groups[group]
        index = override[1] if override is not None and override[0] == group else self.width_index[group]
        return unit.widths[index] / unit.channels

    def layer_cost(self, index: int, choice: Optional[int] = None, override=None) -> float:
        unit = self.layers[index]
        return layer_cost(unit, self.choice[index] if choice is None else choice,
                          unit.in_scale(lambda g: self.scale(g, override)), self.scale(unit.out_group, override))

    def group_cost(self, name: str, width_index: Optional[int] = None) -> float:
        unit = self.groups[name]
        return unit.widths[self.width_index[name] if width_index is None else width_index] * unit.cost_per_channel

    def cost(self) -> float:
        return sum(self.group_cost(g) for g in self.groups) + sum(self.layer_cost(i) for i in range(len(self.layers)))

    def damage(self) -> float:
        return (sum(g.damages[self.width_index[name]] for name, g in self.groups.items())
                + sum(self.layers[i].damages[c - 1] for i, c in enumerate(self.choice) if c))

    def moves(self):
        """(saved cost, added damage, apply) of every move to a cheaper option."""
        for name, unit in self.groups.items():
            current = self.width_index[name]
            before = self.group_cost(name) + sum(self.layer_cost(i) for i in self.members[name])
            for index in range(current):
                after = self.group_cost(name, index) + sum(self.layer_cost(i, override=(name, index))
                                                           for i in self.members[name])
                yield before - after, unit.damages[index] - unit.damages[current], ("width", name, index)
        for index, unit in enumerate(self.layers):
            if not unit.costs:
                continue
            a, b = unit.in_scale(self.scale), self.scale(unit.out_group)
            current = self.choice[index]
            before = layer_cost(unit, current, a, b)
            was = unit.damages[current - 1] if current else 0.0
            dense = unit.dense * a * b
            n, m = unit.in_features, unit.out_features
            after = np.minimum(np.asarray(unit.costs) * (a * n + b * m) / (n + m), dense)
            added = np.asarray(unit.damages) - was
            for j in np.nonzero(after < before)[0]:
                yield before - float(after[j]), float(added[j]), ("layer", index, int(j) + 1)

    def apply(self, move) -> None:
        if move[0] == "width":
            self.width_index[move[1]] = move[2]
        else:
            self.choice[move[1]] = move[2]


def allocate_width_and_rank(groups: Sequence[WidthUnit], layers: Sequence[RankUnit], budget: Optional[float] = None,
                            max_damage: Optional[float] = None) -> WidthRankAllocation:
    """Widths and layer choices whose total cost (Σ groups' k·c + Σ layers' cost) is at most
    `budget` with the least predicted damage found greedily, or (`max_damage`) the least cost
    whose damage stays within it. When no sequence of moves reaches `budget`, the cheapest
    state found is returned with `reached=False`."""
    if (budget is None) == (max_damage is None):
        raise ValueError("give one of budget and max_damage")
    state = _State(groups, layers)
    cost, damage = state.cost(), state.damage()
    tolerance = 1e-9 * max(abs(cost), 1.0)
    while budget is None or cost > budget + tolerance:
        best, best_rate, finishing = None, np.inf, None
        for saved, added, move in state.moves():
            if saved <= 0:
                continue
            if max_damage is not None and damage + added > max_damage:
                continue
            rate = added / saved
            if rate < best_rate:
                best, best_rate = (saved, added, move), rate
            if budget is not None and cost - saved <= budget + tolerance and (finishing is None or added < finishing[1]):
                finishing = (saved, added, move)
        if best is None:
            break
        if finishing is not None and finishing[1] <= best[1]:
            best = finishing  # the last step: the least damage that reaches the budget
        state.apply(best[2])
        cost, damage = cost - best[0], damage + best[1]
    cost, damage = state.cost(), state.damage()
    widths = {name: g.widths[state.width_index[name]] for name, g in state.groups.items()}
    choices = {unit.name: c for unit, c in zip(state.layers, state.choice)}
    reached = budget is None or cost <= budget + tolerance
    return WidthRankAllocation(widths, choices, float(cost), float(damage), reached)


def width_units(curves: Mapping[str, np.ndarray], sensitivity: Mapping[str, float], cost_per_channel: Mapping[str, float],
                widths: Mapping[str, Sequence[int]]) -> List[WidthUnit]:
    """`WidthUnit`s from each group's error curve (indexed by width), sensitivity (damage per
    unit of curve error), per-channel cost and candidate widths."""
    units = []
    for name, curve in curves.items():
        ks = tuple(int(k) for k in widths[name])
        scale = sensitivity.get(name, 1.0)
        units.append(WidthUnit(name, ks[-1], ks, tuple(scale * float(curve[k]) for k in ks),
                               float(cost_per_channel.get(name, 0.0))))
    return units
