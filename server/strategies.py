"""Aggregation strategies by name: Flower's own `flwr.serverapp.strategy` classes, not rewritten.

`qana-server start --strategy fedprox --strategy-option proximal_mu=0.1` picks a class here
and passes options to its constructor. Options are checked against the constructor's real
signature (read with `inspect`), so a typo is a clear error instead of a silently ignored
setting. The keys that tie a strategy to the QANA-FL protocol (record names, the weighting
metric, the metric aggregation functions) and the sampling settings are set by the
coordinator and cannot be overridden.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from protocols.messages import M_NUM_EXAMPLES, MAX_REGULARISATION, REC_ARRAYS, REC_CONFIG

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
DEFAULT_STRATEGY = "fedavg"

# Set by the coordinator from its own settings; not user options.
_RESERVED = {
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
}


# Option ranges, checked before anything starts. Flower checks only fedtrimmedavg's beta, and
# only when the strategy is built (inside qana-sim's ServerApp, after Ray has started); the rest
# it never checks (a negative proximal_mu pushes clinics away from the global head, a negative
# num_malicious_nodes changes which heads krum scores). Bounds: (low, high, low allowed, whole
# number); the high bound itself is never allowed.
_OPTION_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "proximal_mu": (0.0, MAX_REGULARISATION, True, False),  # what clinics accept (protocols.messages)
    "eta": (0.0, math.inf, False, False),
    "eta_l": (0.0, math.inf, False, False),
    "beta_1": (0.0, 1.0, True, False),
    "beta_2": (0.0, 1.0, True, False),
    "tau": (0.0, math.inf, False, False),
    "beta": (0.0, 0.5, True, False),
    "num_malicious_nodes": (0, math.inf, True, True),
}


class StrategyError(ValueError):
    """Unknown strategy or option; the message lists what is valid."""


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return key


def strategy_options(name: str) -> dict[str, Any]:
    """The tunable constructor arguments of a strategy and their defaults."""
    cls = STRATEGIES[canonical_name(name)]
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "self" and p.name not in _RESERVED and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def parse_options(text: str) -> dict[str, float | int]:
    """`"eta=0.05, tau=1e-3"` -> {"eta": 0.05, "tau": 0.001} (numbers only; strategies take numbers)."""
    out: dict[str, float | int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StrategyError(f"strategy option {part!r} is not key=value")
        if key in out:
            raise StrategyError(f"strategy option {key} is given twice; give it once")
        try:
            number: float | int = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise StrategyError(f"strategy option {key}={value!r} is not a number") from None
        out[key] = number
    return out


def check_options(name: str, options: Mapping[str, float | int]) -> None:
    """Refuse options strategy `name` does not take, and values out of range, with the valid
    choices named (used by qana-server start and qana-sim before anything runs)."""
    key = canonical_name(name)
    allowed = strategy_options(key)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(f"{k} (default {v})" for k, v in allowed.items()) or "none"
        raise StrategyError(f"{key} does not take option(s) {', '.join(unknown)}; valid options: {valid}")
    for option, value in options.items():
        if option not in _OPTION_RANGES:
            continue  # an option a newer Flower added: its constructor is the only check
        low, high, low_ok, integer = _OPTION_RANGES[option]
        inside = (low <= value if low_ok else low < value) and value < high
        if (integer and not isinstance(value, int)) or not inside:  # NaN and inf are never inside
            kind = "a whole number" if integer else "a number"
            lower = f">= {low:g}" if low_ok else f"> {low:g}"
            upper = "" if high == math.inf else f" and < {high:g}"
            raise StrategyError(f"{key} option {option}={value}: must be {kind} {lower}{upper}")


def build_strategy(
    name: str,
    options: Mapping[str, float | int] | None = None,
    *,
    min_clinics: int = 2,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
) -> Strategy:
    """Instantiate Flower's strategy `name`, wired to the QANA-FL record and metric names."""
    key = canonical_name(name)
    options = dict(options or {})
    check_options(key, options)
    if min_clinics < 1:
        raise StrategyError("min_clinics must be at least 1")
    try:
        return STRATEGIES[key](
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_clinics,
            min_evaluate_nodes=min_clinics,
            min_available_nodes=min_clinics,
            weighted_by_key=M_NUM_EXAMPLES,
            arrayrecord_key=REC_ARRAYS,
            configrecord_key=REC_CONFIG,
            **options,
        )
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"{key}: {exc}") from None
