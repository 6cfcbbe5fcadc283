"""An experiment's settings: defaults, then an `exp.toml`, then command-line flags.

The TOML file holds flat keys named like the flags (`clinics = 16`, `split = "dirichlet"`,
`local-epochs = 5`; `_` and `-` are interchangeable). A key this module does not know is an
error, not silently ignored: a typo in an experiment file must not produce a run with
default settings that looks like the intended one. The resolved settings are written into
the results (`config.toml`, loadable again with `--config`), so every result says exactly
what produced it.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from simulations.partition import SPLITS

DEVICES = ("software", "auto")
INITIAL_HEADS = ("random", "bundle")
SCENARIOS = ("standard", "new-class")  # new-class: simulations.scenario
MAX_ALPHA = 1e4  # Dirichlet concentration: far above this every clinic gets the same class mix (use --split iid)
LEARNINGS = ("gradient", "akida-edge")  # akida-edge: Akida 1.0 on-chip learning (v1 bundle), simulations.edge_baselines


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is allowed."""


# Settings only some runs use, by the setting that makes them count. Given another value while
# they do not count, they would be silently ignored (qana-server refuses the same for its edge
# keys in a gradient run), so `SimConfig.validate` refuses them.
GRADIENT_ONLY = ("strategy", "strategy_options", "local_epochs", "learning_rate", "batch_size", "l2", "smote", "absent_classes")
APPLY_ONLY_WITH: dict[tuple[str, str], tuple[str, ...]] = {
    ("split", "dirichlet"): ("alpha",),
    ("split", "pathological"): ("classes_per_clinic",),
    ("scenario", "new-class"): ("new_class", "new_class_round", "new_class_clinic"),
    ("learning", "gradient"): GRADIENT_ONLY,
}


@dataclass(frozen=True)
class SimConfig:
    """Everything that determines a simulated federation's result."""

    data: str | None = None  # HAM10000-style folder; None = the embedded sample
    bundle: str | None = None  # model bundle; None = the shipped v2 bundle (v1 for learning akida-edge)
    clinics: int | None = None  # None = one per centre (split centre), else 4
    split: str = "centre"
    alpha: float = 0.5  # Dirichlet concentration (split dirichlet)
    classes_per_clinic: int = 2  # k (split pathological)
    eval_fraction: float = 0.2  # each clinic's local test part (by lesion)
    rounds: int = 10
    strategy: str = "fedavg"
    strategy_options: str = ""  # "key=value,..." for the Flower strategy, e.g. "proximal_mu=0.1"
    local_epochs: int = 5
    learning_rate: float = 0.01
    batch_size: int = 64
    l2: float = 1e-4
    smote: bool = True
    absent_classes: str = "keep"  # gradient: keep | train (qana.head.TrainConfig.absent_classes)
    dropout: float = 0.0  # probability that a clinic's training update is lost in a round
    initial_head: str = "random"  # random (all methods start untrained) | bundle (the bundle's head)
    device: str = "software"  # Akida device of the simulated clinics
    learning: str = "gradient"  # gradient | akida-edge
    scenario: str = "standard"  # standard | new-class (simulations.scenario)
    new_class: str = "df"  # new-class scenario: the class that appears ...
    new_class_round: int = 3  # ... in this round ...
    new_class_clinic: str | None = None  # ... at this clinic (None: the one with most training lesions of it)
    seed: int = 0
    out: str = "qana-sim-results"
    keep_work: bool = False  # keep the clinics' folders and caches under OUT/work

    @property
    def num_clinics(self) -> int | None:
        """Clinics to simulate (None: one per centre, decided by the data)."""
        if self.clinics is not None:
            return self.clinics
        return None if self.split == "centre" else 4

    def validate(self) -> SimConfig:
        """Raise ConfigError for the first setting that is out of range; return self."""
        from protocols.messages import MAX_BATCH_SIZE, MAX_LEARNING_RATE, MAX_LOCAL_EPOCHS, MAX_REGULARISATION, MIN_LEARNING_RATE
        from server.strategies import StrategyError, canonical_name, check_options, parse_options

        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not 0 < self.alpha <= MAX_ALPHA:
            raise ConfigError(
                f"alpha={self.alpha}: the Dirichlet concentration must be > 0 and at most {MAX_ALPHA:g} "
                "(larger values split as evenly as --split iid; use that)"
            )
        if self.clinics is not None and self.clinics < 1:
            raise ConfigError(f"clinics={self.clinics}: need at least 1 clinic")
        if self.classes_per_clinic < 1:
            raise ConfigError(f"classes-per-clinic={self.classes_per_clinic}: must be at least 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval-fraction={self.eval_fraction}: must be between 0 and 1")
        if not 1 <= self.rounds <= 10_000:
            raise ConfigError(f"rounds={self.rounds}: must be between 1 and 10000")
        # The coordinator's ranges (protocols.messages): a value it would refuse must fail here,
        # before features, baselines and Ray have taken their minutes.
        if not 1 <= self.local_epochs <= MAX_LOCAL_EPOCHS:
            raise ConfigError(f"local-epochs={self.local_epochs}: must be between 1 and {MAX_LOCAL_EPOCHS}")
        if not MIN_LEARNING_RATE <= self.learning_rate <= MAX_LEARNING_RATE:
            raise ConfigError(f"learning-rate={self.learning_rate}: must be from {MIN_LEARNING_RATE:g} to {MAX_LEARNING_RATE:g}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch-size={self.batch_size}: must be between 1 and {MAX_BATCH_SIZE}")
        if not 0.0 <= self.l2 <= MAX_REGULARISATION:  # also refuses NaN
            raise ConfigError(f"l2={self.l2}: must be a number from 0 to {MAX_REGULARISATION:g}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
        if self.initial_head not in INITIAL_HEADS:
            raise ConfigError(f"initial-head={self.initial_head!r}: use {' or '.join(INITIAL_HEADS)}")
        if self.learning not in LEARNINGS:
            raise ConfigError(f"learning={self.learning!r}: use {' or '.join(LEARNINGS)}")
        if self.learning == "akida-edge" and self.initial_head == "bundle":
            raise ConfigError("initial-head='bundle' does not apply to learning akida-edge (the bundle's head is not edge neurons); use random")
        if self.absent_classes not in ("keep", "train"):
            raise ConfigError(f"absent-classes={self.absent_classes!r}: use keep or train")
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"scenario={self.scenario!r}: use {' or '.join(SCENARIOS)}")
        if self.scenario == "new-class":
            if not 1 <= self.new_class_round <= self.rounds:
                raise ConfigError(f"new-class-round={self.new_class_round}: must be between 1 and rounds ({self.rounds})")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: use {' or '.join(DEVICES)}")
        if not 0 <= self.seed <= 2**31 - 1:
            raise ConfigError(f"seed={self.seed}: must be between 0 and 2147483647")
        try:
            name = canonical_name(self.strategy)
            check_options(name, parse_options(self.strategy_options))
        except StrategyError as exc:
            raise ConfigError(str(exc)) from None
        return replace(self, strategy=name)

    def settings_without_effect(self, varied: tuple[str, ...] = ()) -> list[str]:
        """Settings changed from their defaults that this run would not use (`APPLY_ONLY_WITH`),
        e.g. alpha with split centre or strategy with akida-edge; those that depend on a field
        in `varied` are left out (`qana-sim compare` varies learning and scenario itself)."""
        defaults = SimConfig()
        return [
            name
            for (field, value), names in APPLY_ONLY_WITH.items()
            if field not in varied and getattr(self, field) != value
            for name in names
            if getattr(self, name) != getattr(defaults, name)
        ]

    def describe_without_effect(self, names: list[str]) -> str:
        """'alpha=0.3 applies only to split 'dirichlet' (split is 'centre')', for `names`."""
        parts = []
        for (field, value), group in APPLY_ONLY_WITH.items():
            given = [f"{n.replace('_', '-')}={getattr(self, n)!r}" for n in group if n in names]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                parts.append(f"{', '.join(given)} {verb} only to {field} {value!r} ({field} is {getattr(self, field)!r})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The settings as a TOML file that `--config` reads back (unset values are left out)."""
        lines = ["# qana-sim resolved configuration (qana-sim run --config this-file reproduces the run)"]
        for key, value in asdict(self).items():
            if value is None:
                lines.append(f"# {key.replace('_', '-')} = (default)")
                continue
            lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escaping is valid TOML


FIELD_TYPES: dict[str, tuple[type, ...]] = {
    f.name: {
        "str | None": (str,),
        "int | None": (int,),
        "str": (str,),
        "int": (int,),
        "float": (float, int),
        "bool": (bool,),
    }[str(f.type)]
    for f in fields(SimConfig)
}


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def _checked(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Normalise key spelling and check every key and type; ConfigError names the culprit."""
    out: dict[str, Any] = {}
    unknown = sorted(k for k in values if _key(k) not in FIELD_TYPES)
    if unknown:
        known = ", ".join(k.replace("_", "-") for k in FIELD_TYPES)
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {known}")
    for raw, value in values.items():
        key = _key(raw)
        kinds = FIELD_TYPES[key]
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{source}: {raw} = {value!r} must be {kinds[0].__name__}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{source}: {raw} = {value!r} must be {kinds[0].__name__}")
        out[key] = float(value) if kinds[0] is float else value
    return out


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read an experiment file; ConfigError for a missing file, bad TOML, unknown keys or wrong types."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    nested = sorted(k for k, v in data.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"{path}: tables are not used ({', '.join(nested)}); write the keys at the top level")
    return _checked(data, str(path))


def resolve(config_file: Path | str | None, flags: Mapping[str, Any], varied: tuple[str, ...] = ()) -> SimConfig:
    """Defaults, then the TOML file, then the flags that were given (None = not given); validated.

    A flag this run would not use (`SimConfig.settings_without_effect`, `varied` as there) is a
    ConfigError: it would be silently ignored. The same in a config file is let through (the
    caller says so): files written by qana-sim before session 28 carry such settings, and
    `--config` must still rerun them.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_toml(config_file))
    given = _checked({k: v for k, v in flags.items() if v is not None}, "command line")
    values.update(given)
    cfg = SimConfig(**values).validate()
    from_flags = [name for name in cfg.settings_without_effect(varied) if name in given]
    if from_flags:
        raise ConfigError(f"{cfg.describe_without_effect(from_flags)}: leave them out, or they would be silently ignored")
    return cfg
