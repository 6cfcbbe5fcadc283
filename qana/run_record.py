"""A `qana train` run directory's records, and the checks that keep them true.

A run directory holds each finished stage's output and a `<stage>.json` record (its marker),
plus `options.json`: the settings every finished stage was made with. Resuming reuses finished
stages, so everything that decides whether a stage may be reused lives here: the settings
themselves (`TrainOptions`), reading the records back (`recorded_options`, for benchmarks that
score a finished run), refusing a resume with other settings (`check_resume_settings`), and
starting a run from another run's finished stages (`stages_to_reuse`, `adopt_stages`).

Kept apart from the stages (qana.train), and free of TensorFlow, so that what only reads a run's
records (qana.distill's teacher checks, benchmarks/seed_spread.py and judge_rule.py) does not
load the training stack.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qana import clinical
from qana.atomic import file_in_the_way, replace_atomic, write_atomic
from qana.bundle import sha256_file
from qana.classes import CLASS_NAMES
from qana.data import DEFAULT_CACHE_DIR
from qana.invocation import invoked_command
from qana.splits import TEST_FRACTION, VAL_FRACTION

if TYPE_CHECKING:
    from qana.convert import QuantSpec
    from qana.model import ModelSpec

STAGES = ("split", "saliency", "pretrain", "float", "quantized", "akida", "head", "clinical", "bundle")
VIEW_STAGES = ("head", "clinical", "bundle")  # stages whose output depends on the number of test-time views
OPTIONAL_STAGES = ("saliency", "pretrain")  # off by default: a stage that did nothing leaves later stages valid
OPTIONS_FILE = "options.json"  # the settings every finished stage of the run was made with


@dataclass
class TrainOptions:
    """Every setting of one `qana train` run, as its options.json records them (`--flag` = field)."""

    data: Path
    run_dir: Path
    target: str = "v2"
    weight_bits: int = 8
    epochs: int = 20
    qat_epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    val_fraction: float = VAL_FRACTION
    test_fraction: float = TEST_FRACTION
    width: int = 32
    feature_dim: int = 256
    attention: str = "both"
    blocks: int = 1
    zoom: float = 0.0  # random-zoom augmentation: crop a random square of (1 - zoom..1) x the side
    affine: bool = False  # random affine warp of training images: any rotation, shear, zoom, shift (qana.augment)
    contrast: str = "per-channel"  # contrast jitter of training images: tf.image's per channel, or "grey" (keeps hue; qana.augment)
    mixup: float = 0.0  # mixup (qana.augment.mix_batch): Beta(mixup, mixup) blends of training images and their labels; 0 = off
    mixup_epochs: int | None = None  # with mixup: blend only in the first N float epochs, the rest and QAT on plain images; None = all
    test_time_views: int = 1  # orientations averaged per image at test time (qana.views), recorded in the bundle
    teachers: tuple[str, ...] = ()  # run directories (same split) whose float models teach this one (qana.distill)
    label_weight: float = 0.5  # with teachers: weight of the true label against the teachers' probabilities
    qat_distill: bool = False  # QAT targets = the float model's probabilities (8 views), not the labels: aim at fidelity
    keep_quantized: str = "validation"  # how the quantized stage picks calibrated vs fine-tuned: "validation" | "agreement"
    weight_ema: float = 0.0  # float stage: validate/keep an exponential moving average of the weights (e.g. 0.995); 0 = off
    pretrain_epochs: int = 0  # self-supervised (VICReg) pretraining of the backbone on the training images (qana.pretrain); 0 = off
    saliency_teacher: str | None = None  # Grad-CAM crops of training images (qana.saliency): model file | resnet50:<weights>
    class_weighting: str = "sqrt"  # "sqrt" | "balanced" | "none"
    loss: str = "ce"  # backbone loss: "ce" (cross-entropy) | "focal" (focal loss, `focal_gamma`)
    focal_gamma: float = 2.0
    head_smote: str = "auto"  # "auto" (keep what helps on validation) | "on" | "off"
    clinical_prior: str = "auto"  # "auto" (fit, weight chosen on validation; 0 = off) | "off" (qana.clinical)
    image_size: int = 64
    colour_constancy: str = "none"  # pixel preprocessing after decoding, recorded in the bundle (qana.preprocess)
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    limit: int = 0  # use only this many images (tests / smoke runs); 0 = all
    resume: bool = True
    stop_after: str | None = None  # a stage name: stop once it is finished (ablations that need only the float model)
    bundle_out: Path | None = None
    reuse_from: Path | None = None  # start from another run's finished stages (`adopt_stages`), e.g. its split
    reuse_through: str = "split"  # the last of that run's stages to reuse: split | saliency | pretrain | float
    command: str = field(default_factory=lambda: invoked_command("qana"))

    def model_spec(self) -> ModelSpec:
        from qana.model import ModelSpec

        return ModelSpec(
            target=self.target,
            input_size=self.image_size,
            num_classes=len(CLASS_NAMES),
            width=self.width,
            feature_dim=self.feature_dim,
            attention=self.attention,
            blocks=self.blocks,
        )

    def quant_spec(self) -> QuantSpec:
        from qana.convert import QuantSpec

        return QuantSpec(self.target, self.weight_bits)


def settings_without_effect(opts: TrainOptions) -> list[str]:
    """One message per setting that the others leave without effect (`qana train` refuses them).

    Accepted, such a setting would be recorded in options.json, and resuming the run without
    the flag that did nothing would then be refused as "other settings".
    """
    default = TrainOptions(data=opts.data, run_dir=opts.run_dir)
    inert = []
    if opts.target == "v1" and (opts.blocks != default.blocks or opts.attention != default.attention):
        inert.append("--blocks and --attention shape the v2 network; the v1 network is sequential and has neither")
    if opts.qat_epochs == 0 and opts.qat_distill:
        inert.append("--qat-distill needs quantization-aware fine-tuning, which --qat-epochs 0 turns off")
    if opts.qat_epochs == 0 and opts.keep_quantized != default.keep_quantized:
        inert.append("--keep-quantized chooses between the calibrated and the fine-tuned model; --qat-epochs 0 fine-tunes none")
    if opts.loss != "focal" and opts.focal_gamma != default.focal_gamma:
        inert.append("--focal-gamma applies only with --loss focal")
    if not opts.teachers and opts.label_weight != default.label_weight:
        inert.append("--label-weight applies only with --teacher")
    if opts.reuse_from is None and opts.reuse_through != default.reuse_through:
        inert.append("--reuse-through applies only with --reuse-from")
    if opts.mixup_epochs is not None and opts.mixup <= 0:
        inert.append("--mixup-epochs says how long mixup lasts; without --mixup there is none")
    return inert


# ----------------------------------------------------------------------------- stage records


def stage_marker(run_dir: Path, stage: str) -> Path:
    """A stage's record, `<stage>.json`: written last, so its presence means the stage finished."""
    return run_dir / f"{stage}.json"


def read_stage_record(run_dir: Path, stage: str) -> dict | None:
    """A stage's record in `run_dir`, None if the stage has not finished there."""
    path = stage_marker(run_dir, stage)
    return read_record(path) if path.is_file() else None


def record_options(opts: TrainOptions) -> None:
    """Write the run's settings (atomically); `run` does it once the markers of stages made with
    other settings are gone, so options.json describes every stage marked finished."""
    write_atomic(opts.run_dir / OPTIONS_FILE, json.dumps(recorded_settings(opts), indent=2).encode())


def finished_stage(opts: TrainOptions, stage: str) -> dict | None:
    """This run's record of `stage` when resuming and the stage has finished, else None."""
    return read_stage_record(opts.run_dir, stage) if opts.resume else None


def record_stage(opts: TrainOptions, stage: str, info: dict) -> dict:
    """Mark `stage` finished with `info` (atomically: a crash leaves the old record or none)."""
    write_atomic(stage_marker(opts.run_dir, stage), json.dumps(info, indent=2, sort_keys=True, default=str).encode())
    return info


# ----------------------------------------------------------------------------- settings on resume

# Fields that say how this command runs, not what a stage makes: changing them never refuses a resume.
RUN_CONTROL = ("data", "run_dir", "resume", "stop_after", "command", "bundle_out", "cache_dir", "test_time_views",
               "reuse_from", "reuse_through")


class RunSettingsError(ValueError):
    """A run directory is being resumed with settings (or data) other than those its stages were made with."""


class RunRecordError(ValueError):
    """A run directory whose records (options.json, split.npz, a stage's output) are missing or unreadable."""


def _flag(name: str) -> str:
    """The `qana train` flag of a TrainOptions field (`teachers` is given as --teacher, repeated)."""
    return "--teacher" if name == "teachers" else f"--{name.replace('_', '-')}"


def _read_options_json(path: Path) -> dict:
    """A run's options.json as a dict, or a RunRecordError naming what is wrong with it."""
    return read_record(path, "; add --fresh to redo the run, or use another --run-dir")


def read_record(path: Path, remedy: str = "") -> dict:
    """A JSON record of a run (options.json, a stage's record) as a dict, or a RunRecordError."""
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunRecordError(f"{path}: not valid JSON ({exc}){remedy}") from None
    if not isinstance(recorded, dict):
        raise RunRecordError(f"{path}: expected a JSON object{remedy}")
    return recorded


# Settings that only a stage after the float stage reads. Changing one on a resumed run redoes
# that stage and every later one, keeping the float model (the hours of training), instead of
# refusing the command (helper-19's F10: `--clinical-prior off` on a finished run needed --fresh).
LATE_SETTINGS = {"qat_epochs": "quantized", "qat_distill": "quantized", "keep_quantized": "quantized",
                 "weight_bits": "quantized", "head_smote": "head", "clinical_prior": "clinical"}


# Settings a resumed command keeps from its run when their flags are left out: the late ones
# (left out, --qat-epochs would redo the quantized stage onwards with the default) and the
# test-time views (left out, a one-view bundle would replace an 8-view one).
KEPT_WHEN_LEFT_OUT = (*LATE_SETTINGS, "test_time_views")


def settings_left_out(run_dir: Path, resume: bool, given: dict[str, Any]) -> dict[str, Any]:
    """`given` (KEPT_WHEN_LEFT_OUT names -> a flag's value, None when left out) completed with the
    values a resumed run directory's finished stages were made with, else TrainOptions' defaults
    (a new run, --fresh, or a recorded value of the wrong type)."""
    defaults = default_settings()
    recorded: dict[str, Any] = {}
    path = Path(run_dir) / OPTIONS_FILE
    if resume and path.is_file() and any(stage_marker(Path(run_dir), s).is_file() for s in STAGES):
        try:
            recorded = _read_options_json(path)
        except RunRecordError:
            pass  # check_resume_settings names the problem
    kept = {n: recorded[n] for n in KEPT_WHEN_LEFT_OUT if n in recorded and type(recorded[n]) is type(defaults[n])}
    return {n: value if value is not None else kept.get(n, defaults[n]) for n, value in given.items()}


def recorded_settings(opts: TrainOptions) -> dict[str, Any]:
    """`opts` as a run's options.json records them (paths as text, tuples as lists)."""
    return json.loads(json.dumps(asdict(opts), default=str))


def default_settings() -> dict[str, Any]:
    """The settings of a run given no flag, as options.json records them: what a setting an
    older options.json predates counts as (its data and run_dir are placeholders)."""
    return recorded_settings(TrainOptions(data=Path("."), run_dir=Path(".")))


def check_resume_settings(opts: TrainOptions) -> tuple[str, str] | None:
    """Refuse to resume a run whose finished stages were made with other settings, unless all
    the changed ones are LATE_SETTINGS: then (first stage to redo, the changes) is returned.

    Resuming reuses every finished stage, so `--loss focal` on a directory whose float stage
    was trained with cross-entropy would silently keep the old model (and overwrite the record
    of how it was trained). Settings missing from an older run's options.json count as their
    defaults.
    """
    recorded_path = opts.run_dir / OPTIONS_FILE
    finished = [s for s in STAGES if stage_marker(opts.run_dir, s).is_file()]
    if not (opts.resume and finished):
        return None
    if not recorded_path.is_file():
        raise RunSettingsError(
            f"{opts.run_dir} has finished stages ({', '.join(finished)}) but no options.json, so which settings made "
            "them cannot be told: add --fresh to redo everything, or use another --run-dir (to start from another "
            "run's finished stages, e.g. its split, give a new --run-dir and --reuse-from THAT_RUN rather than copying its files)"
        )
    recorded = _read_options_json(recorded_path)
    current, defaults = recorded_settings(opts), default_settings()
    changed = {
        name: f"{_flag(name)} {recorded.get(name, defaults[name])!r} (now {current[name]!r})"
        for name in current
        if name not in RUN_CONTROL and recorded.get(name, defaults[name]) != current[name]
    }
    if not changed:
        return None
    if any(name not in LATE_SETTINGS for name in changed):
        raise RunSettingsError(
            f"{opts.run_dir} was started with other settings: {'; '.join(changed.values())}. Resuming would reuse stages "
            "made with the old ones: rerun with the same settings, add --fresh to redo everything, or use another "
            "--run-dir (with --reuse-from to keep this run's split or float model)"
        )
    first = min((LATE_SETTINGS[name] for name in changed), key=STAGES.index)
    if not any(s in finished for s in STAGES[STAGES.index(first):]):
        return None  # the stages these settings steer have not run yet: nothing to redo
    if opts.stop_after is not None and STAGES.index(opts.stop_after) < STAGES.index(first):
        # it would unmark the later stages (intact, matching the old settings) and redo none of them
        raise RunSettingsError(
            f"{'; '.join(changed.values())} changes the {first} stage onwards, but --stop-after {opts.stop_after} "
            "stops before it: leave the change out, or stop later"
        )
    return first, "; ".join(changed.values())


# ----------------------------------------------------------------------------- reusing another run's stages

REUSABLE_STAGES = ("split", "saliency", "pretrain", "float")
SHAPE_SETTINGS = ("target", "image_size", "width", "feature_dim", "attention", "blocks")
# The settings each reusable stage's files were made with. A run that reuses a stage must ask for
# the same ones, or its options.json would record settings that stage never ran with; every other
# setting may differ (a run reusing only the split may change the whole recipe: that is the point).
# An optional stage that was off needs only its switch (the first name) to agree.
_PRETRAIN_SETTINGS = ("pretrain_epochs", "colour_constancy", "contrast", "seed", *SHAPE_SETTINGS)
REUSED_STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "split": (),
    "saliency": ("saliency_teacher", "image_size", "colour_constancy"),
    "pretrain": _PRETRAIN_SETTINGS,
    "float": (*_PRETRAIN_SETTINGS, "saliency_teacher", "epochs", "learning_rate", "batch_size", "zoom", "affine",
              "mixup", "mixup_epochs", "teachers", "label_weight", "weight_ema", "class_weighting", "loss", "focal_gamma"),
}


def stages_to_reuse(opts: TrainOptions) -> tuple[TrainOptions | None, list[str]]:
    """Check `--reuse-from` before anything runs: the other run's options and the stages to copy.

    Comparing two recipes on the same split (or two quantized stages on the same float model)
    used to mean copying that run's files by hand into a new run directory; such a directory
    has stage records but no options.json of its own and is refused (`check_resume_settings`).
    Reusing names the source, copies exactly the files each stage needs, and records in the
    copied stage `reused_from` and the sha256 of each file. Stages this run already reused are
    kept whatever the source has become since (the same command resumes, even after the source
    moved or was redone); a stage whose copy is gone is copied again only if the source's file
    is still the one this run's later stages were made on.
    """
    if opts.reuse_from is None:
        return None, []
    if opts.reuse_through not in REUSABLE_STAGES:
        raise RunSettingsError(f"--reuse-through must be one of {', '.join(REUSABLE_STAGES)}, not {opts.reuse_through!r}")
    source_dir = Path(opts.reuse_from)
    if same_path(source_dir, opts.run_dir):
        raise RunSettingsError(f"--reuse-from {source_dir} is the run directory itself")
    wanted = REUSABLE_STAGES[: REUSABLE_STAGES.index(opts.reuse_through) + 1]
    owns = {stage: finished_stage(opts, stage) for stage in wanted}
    for stage, own in owns.items():
        if own is not None and "reused_from" not in own:
            raise RunSettingsError(
                f"{opts.run_dir} already has a {stage} stage of its own; --reuse-from starts a new run from another "
                "run's stages: use a new --run-dir, or add --fresh to replace this run's stages"
            )
    to_copy = [s for s, own in owns.items() if own is None or not all(p.exists() for p in stage_outputs(opts, s, own))]
    if not to_copy:
        return None, []
    if not source_dir.is_dir():
        raise RunRecordError(f"--reuse-from {source_dir}: no such run directory")
    source = recorded_options(source_dir, opts.data)
    for stage in wanted:
        info = _source_record(source, stage)
        missing = [str(p) for p in stage_outputs(source, stage, info) if not p.exists()]
        if missing:
            raise RunRecordError(f"--reuse-from {source_dir}: its {stage} stage is marked finished but {', '.join(missing)} is missing")
        names = REUSED_STAGE_SETTINGS[stage]
        if stage in OPTIONAL_STAGES and not info.get("enabled"):
            names = names[:1]
        differ = [f"{_flag(n)} {getattr(source, n)!r} there, {getattr(opts, n)!r} here" for n in names if getattr(source, n) != getattr(opts, n)]
        if differ:
            raise RunSettingsError(
                f"--reuse-from {source_dir}: its {stage} stage was made with other settings ({'; '.join(differ)}); "
                "give the same ones, or reuse fewer stages (--reuse-through)"
            )
        recorded = (owns[stage] or {}).get("reused_files")
        if recorded is not None and recorded != _file_digests(source, stage, info):
            raise RunSettingsError(
                f"{source_dir}'s {stage} stage is no longer the one {opts.run_dir} reused (its files changed), and this "
                f"run's later stages were made on the old one: add --fresh to start this run again from {source_dir}"
            )
    return source, to_copy


def _source_record(source: TrainOptions, stage: str) -> dict:
    """A reused run's record of `stage`; an optional stage a run made before it existed
    (no record, but later stages finished) was off."""
    info = read_stage_record(source.run_dir, stage)
    if info is None and stage in OPTIONAL_STAGES and any(stage_marker(source.run_dir, s).is_file() for s in STAGES[STAGES.index(stage) + 1:]):
        return {"enabled": False}
    if info is None:
        raise RunRecordError(f"--reuse-from {source.run_dir}: its {stage} stage is not finished")
    return info


def _file_digests(opts: TrainOptions, stage: str, info: dict) -> dict[str, str]:
    return {p.relative_to(opts.run_dir).as_posix(): sha256_file(p) for p in stage_outputs(opts, stage, info)}


def adopt_stages(opts: TrainOptions, source: TrainOptions, stages: list[str], progress: Callable[[str], None]) -> None:
    """Copy `source`'s finished `stages` (from `stages_to_reuse`) into this run directory.

    Each stage's files are copied under a temporary name and renamed, and its record is written
    last, so an interrupted copy leaves a stage unfinished rather than a record without files.
    """
    for stage in stages:
        info = _source_record(source, stage)
        for path in stage_outputs(source, stage, info):
            target = opts.run_dir / path.relative_to(source.run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.copying")
            shutil.copyfile(path, partial)
            replace_atomic(partial, target)
        reused = {"reused_from": str(source.run_dir.resolve()), "reused_files": _file_digests(source, stage, info)}
        record_stage(opts, stage, {**info, **reused})
        progress(f"[{stage}] reused from {source.run_dir}")
    differ = [f"{_flag(n)} {getattr(source, n)!r}" for n in asdict(source) if n not in RUN_CONTROL and getattr(source, n) != getattr(opts, n)]
    if stages and differ:
        progress(f"note: {source.run_dir} was made with {'; '.join(differ)} (this run: the settings given)")


def recorded_options(run_dir: Path, data: Path) -> TrainOptions:
    """The TrainOptions a finished run was made with, read back from its options.json.

    Benchmarks that score an existing run need its settings (image size, feature width,
    test-time views, ...) exactly as training used them; rebuilding a partial TrainOptions in
    each script let them drift apart. `data` and `run_dir` are this machine's paths (the
    recorded ones may be another machine's); settings missing from an older record count as
    their defaults, as in `check_resume_settings`; settings this version no longer has are
    ignored.
    """
    run_dir, data = Path(run_dir), Path(data)
    path = run_dir / OPTIONS_FILE
    if not path.is_file():
        raise RunRecordError(f"{run_dir}: no options.json (not a `qana train` run directory, or it never started)")
    recorded = _read_options_json(path)
    defaults = TrainOptions(data=data, run_dir=run_dir)
    settings: dict[str, Any] = {}
    for name, default in asdict(defaults).items():
        if name in ("data", "run_dir", "cache_dir", "bundle_out") or name not in recorded:
            continue  # machine-local paths stay this machine's
        value = recorded[name]
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool) or default is None or isinstance(default, str):
            pass
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise RunRecordError(f"{path}: {name} is {value!r}, expected a number")
        else:
            value = type(default)(value)
        settings[name] = value
    return TrainOptions(data=data, run_dir=run_dir, **settings)


def stage_outputs(opts: TrainOptions, stage: str, info: dict) -> list[Path]:
    """The files a finished stage left for later stages: a marker without them (a partial copy
    of a run, a file cleaned up) means the stage is redone rather than failing stages later."""
    run_dir = opts.run_dir
    if stage == "split":
        return [run_dir / "split.npz"]
    if stage == "saliency":
        return [run_dir / "saliency.npz"] if info.get("enabled") else []
    if stage == "pretrain":
        return [run_dir / "pretrain.weights.h5"] if info.get("enabled") else []
    if stage in ("float", "quantized"):
        return [run_dir / f"{stage}.h5"]
    if stage == "akida":
        return [run_dir / "akida" / "model.fbz"]
    if stage == "head":
        return [run_dir / "final" / "model.fbz", run_dir / "final" / "head.npz"]
    if stage == "clinical":
        return [run_dir / "final" / clinical.PRIOR_FILE] if info.get("used") else []
    # where the bundle went, as an absolute path (older records: not checked)
    return [Path(info["bundle_resolved"]) / "bundle.json"] if info.get("bundle_resolved") else []


def same_path(a: Path | str, b: Path | str | None) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_bundle_out(opts: TrainOptions) -> None:
    """Refuse a --bundle-out whose contents writing the bundle would destroy.

    The bundle replaces its folder whole (qana.atomic.replace_directory), which is right for an
    earlier bundle and wrong for anything else: a folder of the user's, a parent of the run or
    of the data. Checked before anything is loaded or written.
    """
    if opts.bundle_out is None:
        return
    out = Path(opts.bundle_out).expanduser().resolve()
    for name, other in (("--run-dir", opts.run_dir), ("--data", opts.data)):
        other = Path(other).expanduser().resolve()
        if out == other or out in other.parents:
            raise RunSettingsError(f"--bundle-out {opts.bundle_out} would replace {name} {other}: give a folder of its own")
    if out.exists() and not out.is_dir():
        raise RunSettingsError(f"--bundle-out {opts.bundle_out} is a file; give a new folder or an earlier bundle's")
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise RunSettingsError(f"--bundle-out {opts.bundle_out} cannot be made: {blocking} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "bundle.json").is_file():
        raise RunSettingsError(
            f"--bundle-out {opts.bundle_out} holds other files and no bundle.json; writing the bundle would delete them: "
            "give a new or empty folder (an earlier bundle's folder is replaced)"
        )
