"""`qana`: train, evaluate and inspect QANA model bundles.

    qana train --data DIR --run-dir runs/v2 [--target v2|v1] [--weight-bits 8|4] ...
    qana evaluate --data DIR [--model BUNDLE] [--backend akida|quantized|float] [--json FILE] [--plot PNG] [--no-clinical-prior] [--lesion-fusion]
    qana split --data DIR --out NEW_DIR [--part train|val|test] [--model BUNDLE] [--seed N] [--val-fraction F]
    qana info [BUNDLE]
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from qana.cli_errors import describe_os_error, fail, reported_errors
from qana.imbalance import SEED_LIMIT
from qana.invocation import invoked_command
from qana.splits import VAL_FRACTION, VAL_FRACTION_RANGE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print images and patient metadata
    help="QANA model pipeline: HAM10000 images -> quantized QANA network -> Akida model bundle.",
)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="HAM10000-style folder: HAM10000_metadata.csv (or Dataverse's tab-separated .tab) + ISIC_*.jpg below it.")],
    run_dir: Annotated[Path, typer.Option(help="Where every stage's output goes; rerun to resume (an interrupted training stage continues from its last epoch).")] = Path("runs/qana-v2"),
    target: Annotated[str, typer.Option(help="v2 = Akida 2.0 (full QANA); v1 = Akida 1.0 / AKD1000 (sequential, 1-bit features).")] = "v2",
    weight_bits: Annotated[Optional[int], typer.Option(help="Backbone weight bits: 8 or 4 (v1 needs 4). Default 8; left out on a resumed run: the run's own.")] = None,
    epochs: Annotated[int, typer.Option(help="Float training epochs.")] = 20,
    qat_epochs: Annotated[Optional[int], typer.Option(help="Quantization-aware fine-tuning epochs. Default 3; left out on a resumed run: the run's own.")] = None,
    qat_distill: Annotated[Optional[bool], typer.Option("--qat-distill/--no-qat-distill", help="Quantization-aware fine-tuning learns the float model's probabilities (averaged over 8 orientations) instead of the labels, so the 8-bit model aims at reproducing the float one. Default off; left out on a resumed run: the run's own.")] = None,
    keep_quantized: Annotated[Optional[str], typer.Option(help="Which quantized model the quantized stage keeps, calibrated or fine-tuned: validation (fine-tuned unless it falls more than a point short of float on validation and calibration falls less) | agreement (whichever agrees better with the float model's predictions, as macro-F1, on validation plus 2,048 further training images; a tie keeps calibrated). Default validation; left out on a resumed run: the run's own.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per training step.")] = 64,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate of the float stage (cosine decay; QAT uses 1/20 of it).")] = 2e-3,
    width: Annotated[int, typer.Option(help="Channels of the first stage (later stages double).")] = 32,
    image_size: Annotated[int, typer.Option(help="Input side in pixels (the paper: 64). A multiple of 8 up to 88: the last map (side/8)^2 must stay under Akida's 144-position global-pooling limit.")] = 64,
    colour_constancy: Annotated[str, typer.Option(help="Pixel preprocessing after decoding, recorded in the bundle and applied by every clinic's runtime: none | shades-of-gray (Shades of Gray, p = 6: evens out the illumination of different centres' cameras). v2 only.")] = "none",
    feature_dim: Annotated[int, typer.Option(help="Features before the head.")] = 256,
    attention: Annotated[str, typer.Option(help="v2 attention: both (SECA + SE) | seca | se | none (for the ablation); both-signed | seca-signed | se-signed: the same with a gate that can also lower a channel's rate (qana.blocks).")] = "both",
    blocks: Annotated[int, typer.Option(help="v2: QANA blocks (Ghost + attention + residual) per stage.")] = 1,
    zoom: Annotated[float, typer.Option(help="Random-zoom augmentation: crop a random square of (1-ZOOM..1) x the side, e.g. 0.25.")] = 0.0,
    affine: Annotated[bool, typer.Option("--affine", help="Random affine warp of each training image: any rotation, shear up to 11 degrees, zoom 0.9-1.25, shift up to 10 % (Perez et al. 2018's geometric augmentations, qana.augment).")] = False,
    contrast: Annotated[str, typer.Option(help="Contrast jitter of training images (0.8-1.2; 0.6-1.4 in --pretrain-epochs views): per-channel (tf.image's, each channel about its own mean: moves hue slightly) | grey (about one grey level: keeps each pixel's hue; qana.augment).")] = "per-channel",
    mixup: Annotated[float, typer.Option(help="Mixup: train the backbone (float and QAT stages) on blends of two training images and their labels, blend weight ~ Beta(MIXUP, MIXUP), e.g. 0.2; 0 = off (qana.augment.mix_batch).")] = 0.0,
    mixup_epochs: Annotated[Optional[int], typer.Option(help="With --mixup: blend only in the first MIXUP_EPOCHS float epochs; the later float epochs and the QAT epochs train on plain images, which sharpens the margins before quantization, and the float model kept is the best of the plain epochs (with MIXUP_EPOCHS = --epochs only QAT is plain). Default: mixup in every epoch of both stages.")] = None,
    test_time_views: Annotated[Optional[int], typer.Option(help="Orientations (1, 2, 4 or 8 flips/turns) the backbone sees per image at test time, features averaged; recorded in the bundle. Default: the run's own count when resuming (another count redoes the head, clinical and bundle stages), else 1.")] = None,
    teacher: Annotated[Optional[list[Path]], typer.Option(help="Run directory (same data and seed) whose float model teaches this one; repeat for an ensemble (knowledge distillation).")] = None,
    label_weight: Annotated[float, typer.Option(help="With --teacher: weight of the true label against the teachers' averaged probabilities.")] = 0.5,
    weight_ema: Annotated[float, typer.Option(help="Float stage: validate and keep a moving average of the weights with this momentum, e.g. 0.995 (0 = off).")] = 0.0,
    pretrain_epochs: Annotated[int, typer.Option(help="Self-supervised pretraining (VICReg) of the backbone on the training images, labels unused, before the float stage: epochs, 0 = off (qana.pretrain). Needs no download.")] = 0,
    saliency_teacher: Annotated[Optional[str], typer.Option(help="Add Grad-CAM crops of the training images from a frozen teacher: a local tf_keras model file (e.g. an earlier run's float.h5) or resnet50:<ImageNet weights .h5>. Nothing is downloaded.")] = None,
    class_weighting: Annotated[str, typer.Option(help="Backbone loss class weights: sqrt | balanced | none.")] = "sqrt",
    loss: Annotated[str, typer.Option(help="Backbone loss: ce (cross-entropy) | focal (focal loss; combine with --class-weighting none for focal alone).")] = "ce",
    focal_gamma: Annotated[float, typer.Option(help="With --loss focal: how strongly images already classified well are down-weighted (0 = cross-entropy).")] = 2.0,
    clinical_prior: Annotated[Optional[str], typer.Option(help="Clinical prior from age, sex and body site (qana.clinical), added to the logits on the host: auto (fit it; its weight, 0 = off, is chosen on validation) | off. Default auto; left out on a resumed run: the run's own.")] = None,
    head_smote: Annotated[Optional[str], typer.Option(help="Head: SMOTE on PCA-whitened features: auto (try it; a retrained head is kept only if it beats the converted one in 95 % of validation bootstrap resamples) | on | off. Default auto; left out on a resumed run: the run's own.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the lesion-grouped split and of training (another seed is another split).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of lesions held out for validation (checkpoints, stage choices). The test share stays 15 %, and for one seed the test lesions are the same whatever this is: a smaller value only moves validation lesions into training.")] = VAL_FRACTION,
    limit: Annotated[int, typer.Option(help="Use only N images (smoke tests); 0 = all.")] = 0,
    bundle_out: Annotated[Optional[Path], typer.Option(help="Where to write the bundle (default RUN_DIR/bundle).")] = None,
    reuse_from: Annotated[Optional[Path], typer.Option(help="Start from another run's finished stages instead of redoing them, e.g. to compare two recipes on the same split: a new RUN_DIR gets copies of that run's stages up to --reuse-through. Rerunning the same command resumes.")] = None,
    reuse_through: Annotated[str, typer.Option(help="With --reuse-from: the last stage reused: split | saliency | pretrain | float. A reused stage must have been made with this run's settings for it (the split: any).")] = "split",
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore finished stages in RUN_DIR and redo everything.")] = False,
    stop_after: Annotated[Optional[str], typer.Option(help="Stop once this stage is finished: split | saliency | pretrain | float | quantized | akida | head | clinical | bundle (e.g. float for a training-recipe ablation); rerun without it to go on.")] = None,
) -> None:
    """Train, quantize (QAT), convert to Akida and write an evaluated model bundle."""
    try:
        found = data.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise fail(f"--data {data}: {exc.strerror or exc}") from None
    if not found:  # before TensorFlow loads: a typo should not cost its start-up time
        raise fail(f"data folder not found: {data}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from qana.augment import check_contrast
    from qana.convert import ConversionError
    from qana.data import DataError
    from qana.distill import TeacherError
    from qana.saliency import SaliencyError
    from qana.clinical import ClinicalDataError
    from qana.model import ATTENTION_CHOICES
    from qana.preprocess import COLOUR_CONSTANCY
    from qana.run_record import REUSABLE_STAGES, STAGES, RunRecordError, RunSettingsError, TrainOptions, settings_left_out, settings_without_effect
    from qana.train import CLASS_WEIGHTINGS, CLINICAL_PRIOR_MODES, KEEP_QUANTIZED, LOSSES, MIXUP_EPOCHS_WITH_EMA, run
    from qana.views import VIEW_COUNTS

    # left out on a resumed run: the run's own values (qana.run_record.KEPT_WHEN_LEFT_OUT)
    kept = settings_left_out(run_dir, resume=not fresh, given={
        "weight_bits": weight_bits, "qat_epochs": qat_epochs, "qat_distill": qat_distill, "keep_quantized": keep_quantized,
        "clinical_prior": clinical_prior, "head_smote": head_smote, "test_time_views": test_time_views})
    weight_bits, qat_epochs, qat_distill, keep_quantized = kept["weight_bits"], kept["qat_epochs"], kept["qat_distill"], kept["keep_quantized"]
    clinical_prior, head_smote, test_time_views = kept["clinical_prior"], kept["head_smote"], kept["test_time_views"]
    if target not in ("v2", "v1"):
        raise fail(f"--target must be v2 or v1, not {target!r}")
    if weight_bits not in (4, 8):
        raise fail(f"--weight-bits must be 4 or 8, not {weight_bits}")
    if blocks < 1:
        raise fail(f"--blocks must be at least 1, not {blocks}")
    for flag, value, least in (("--epochs", epochs, 1), ("--qat-epochs", qat_epochs, 0), ("--batch-size", batch_size, 1),
                               ("--width", width, 1), ("--feature-dim", feature_dim, 1), ("--limit", limit, 0), ("--seed", seed, 0)):
        if value < least:
            raise fail(f"{flag} must be at least {least}, not {value}" + (" (0 = all images)" if flag == "--limit" else ""))
    if seed >= SEED_LIMIT:  # numpy's, sklearn's and imblearn's generators take seeds below 2**32
        raise fail(f"--seed must be from 0 to {SEED_LIMIT - 1}, not {seed}")
    if not 0 < learning_rate <= 1:  # also refuses nan and inf; larger rates diverge (and used to be marked finished)
        raise fail(f"--learning-rate must be above 0 and at most 1, not {learning_rate}")
    if target == "v2" and width % 2:
        raise fail(f"--width must be even on v2 (a Ghost module makes half its channels cheaply and concatenates them), not {width}")
    if attention not in ATTENTION_CHOICES:
        raise fail(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if head_smote not in ("auto", "on", "off"):
        raise fail(f"--head-smote must be auto, on or off, not {head_smote!r}")
    try:
        check_contrast(contrast)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if not 0.0 <= zoom < 1.0:
        raise fail(f"--zoom must be in [0, 1), not {zoom}")
    if image_size % 8 or not 16 <= image_size <= 88:
        raise fail(f"--image-size must be a multiple of 8 from 16 to 88 (Akida pools at most 143 positions; the last map is side/8), not {image_size}")
    if target == "v1" and image_size < 24:  # qana.model.check_spec says why; here before TensorFlow loads
        raise fail(f"--image-size must be at least 24 for --target v1 (AKD1000 pools only a last map of 3 rows or more), not {image_size}")
    if test_time_views not in VIEW_COUNTS:
        raise fail(f"--test-time-views must be one of {', '.join(map(str, VIEW_COUNTS))}, not {test_time_views}")
    if not 0.0 <= label_weight <= 1.0:
        raise fail(f"--label-weight must be in [0, 1], not {label_weight}")
    if pretrain_epochs < 0:
        raise fail(f"--pretrain-epochs must be 0 (off) or more, not {pretrain_epochs}")
    if not 0.0 <= mixup <= 10.0:
        raise fail(f"--mixup must be from 0 (off) to 10, not {mixup}")
    if mixup_epochs is not None and not 1 <= mixup_epochs <= epochs:
        raise fail(f"--mixup-epochs must be from 1 to --epochs ({epochs}), not {mixup_epochs}")
    if mixup_epochs is not None and weight_ema > 0:
        raise fail(MIXUP_EPOCHS_WITH_EMA)
    if not 0.0 <= weight_ema < 1.0:
        raise fail(f"--weight-ema must be in [0, 1), not {weight_ema}")
    if not VAL_FRACTION_RANGE[0] <= val_fraction <= VAL_FRACTION_RANGE[1]:
        raise fail(f"--val-fraction must be from {VAL_FRACTION_RANGE[0]:g} to {VAL_FRACTION_RANGE[1]:g} (validation picks checkpoints and heads), not {val_fraction}")
    if class_weighting not in CLASS_WEIGHTINGS:
        raise fail(f"--class-weighting must be {', '.join(CLASS_WEIGHTINGS[:-1])} or {CLASS_WEIGHTINGS[-1]}, not {class_weighting!r}")
    if loss not in LOSSES:
        raise fail(f"--loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if not 0.0 <= focal_gamma <= 10.0:
        raise fail(f"--focal-gamma must be from 0 to 10, not {focal_gamma}")
    if keep_quantized not in KEEP_QUANTIZED:
        raise fail(f"--keep-quantized must be {' or '.join(KEEP_QUANTIZED)}, not {keep_quantized!r}")
    if clinical_prior not in CLINICAL_PRIOR_MODES:
        raise fail(f"--clinical-prior must be {' or '.join(CLINICAL_PRIOR_MODES)}, not {clinical_prior!r}")
    if stop_after is not None and stop_after not in STAGES:
        raise fail(f"--stop-after must be one of {', '.join(STAGES)}, not {stop_after!r}")
    if reuse_through not in REUSABLE_STAGES:
        raise fail(f"--reuse-through must be one of {', '.join(REUSABLE_STAGES)}, not {reuse_through!r}")
    if colour_constancy not in COLOUR_CONSTANCY:
        raise fail(f"--colour-constancy must be one of {', '.join(COLOUR_CONSTANCY)}, not {colour_constancy!r}")
    if colour_constancy != "none" and target != "v2":
        raise fail("--colour-constancy is applied by the Akida 2.0 runtime only; use it with --target v2")
    if target == "v1" and weight_bits != 4:
        raise fail("Akida 1.0 (v1) supports at most 4-bit weights: use --weight-bits 4")
    if target == "v2" and weight_bits == 4 and (stop_after is None or STAGES.index(stop_after) > STAGES.index("quantized")):
        # certain to be refused by the akida stage's hardware mapping check, after hours of training
        raise fail("Akida 2.0 hardware cannot map a 4-bit v2 model (its Add inputs need 8-bit outputs; README, "
                   "'4-bit weights on Akida 2.0'): add --stop-after quantized to train and score the quantized "
                   "Keras model only, or use --target v1 for 4-bit weights on hardware")
    opts = TrainOptions(
        data=data, run_dir=run_dir, target=target, weight_bits=weight_bits, epochs=epochs, qat_epochs=qat_epochs, qat_distill=qat_distill, keep_quantized=keep_quantized,
        batch_size=batch_size, learning_rate=learning_rate, width=width, feature_dim=feature_dim, attention=attention,
        blocks=blocks, zoom=zoom, affine=affine, contrast=contrast, mixup=mixup, mixup_epochs=mixup_epochs, weight_ema=weight_ema, pretrain_epochs=pretrain_epochs, test_time_views=test_time_views, image_size=image_size, colour_constancy=colour_constancy, teachers=tuple(str(t) for t in teacher or ()), label_weight=label_weight, saliency_teacher=saliency_teacher, class_weighting=class_weighting, loss=loss, focal_gamma=focal_gamma, head_smote=head_smote, clinical_prior=clinical_prior, seed=seed, val_fraction=val_fraction, limit=limit, bundle_out=bundle_out,
        reuse_from=reuse_from, reuse_through=reuse_through, resume=not fresh, stop_after=stop_after,
    )
    inert = settings_without_effect(opts)
    if inert:
        raise fail(inert[0])
    try:
        infos = run(opts, progress=lambda msg: typer.echo(msg))
    except DataError as exc:
        raise fail(str(exc)) from None
    except ConversionError as exc:
        raise fail(f"{exc} (finished stages are kept in {run_dir})") from None
    except SaliencyError as exc:
        raise fail(f"--saliency-teacher: {exc}") from None
    except TeacherError as exc:
        raise fail(f"--teacher: {exc}") from None
    except (RunSettingsError, RunRecordError) as exc:
        raise fail(str(exc)) from None
    except ClinicalDataError as exc:
        raise fail(f"{exc} (fix the metadata, or train without the prior: --clinical-prior off)") from None
    except (FileExistsError, NotADirectoryError) as exc:  # e.g. --run-dir names a file
        raise fail(f"--run-dir {run_dir}: {describe_os_error(exc)}") from None
    except OSError as exc:  # a file of the run that cannot be read or written: named, not a traceback
        raise fail(f"{describe_os_error(exc)} (finished stages are kept in {run_dir})") from None
    if "bundle" not in infos:  # --stop-after: no bundle, so no test figures either
        typer.echo(f"finished stages: {', '.join(infos)} (in {run_dir})")
        return
    test = infos["bundle"]["metrics"]["test"]
    keys = ("float", "quantized", "akida_converted_head", "akida", "agreement_quantized_vs_akida", "float_with_clinical_prior", "akida_with_clinical_prior")
    typer.echo(json.dumps({k: test[k] for k in keys if k in test}, indent=2))
    typer.echo(f"bundle: {infos['bundle']['bundle']}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="HAM10000-style folder to evaluate on (every readable image the metadata lists is used; the others are reported).")],
    model: Annotated[Optional[Path], typer.Option(help="Bundle directory; default: the shipped v2 bundle.")] = None,
    backend: Annotated[str, typer.Option(help="akida (the converted model) | quantized | float (Keras models in the bundle).")] = "akida",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Confusion-matrix PNG (default: beside --json, m.json -> m.png, other names with .png added). Needs matplotlib (the \\[train] extra).")] = None,
    clinical_prior: Annotated[bool, typer.Option(help="Use the bundle's clinical prior (age, sex, body site from the metadata) when it has one; --no-clinical-prior scores the images alone.")] = True,
    lesion_fusion: Annotated[bool, typer.Option(help="One decision per lesion: images with the same lesion_id in the metadata share the mean of their logits (qana.fusion). Metrics are still counted per image.")] = False,
) -> None:
    """Top-1, macro-F1, balanced accuracy, per-class P/R/F1 and the confusion matrix."""
    from qana.bundle import BundleError, default_bundle_path, load_bundle, load_default_bundle
    from qana.clinical import ClinicalDataError
    from qana.data import DataError, describe_skipped, load_dataset
    from qana.evaluate import BACKENDS, PLOT_NEEDS, can_plot, clinical_inputs, confusion_png, evaluate_bundle
    from qana.fusion import describe_lesions

    if backend not in BACKENDS:  # before any image is decoded
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if plot and not can_plot():
        raise fail(f"--plot {plot}: {PLOT_NEEDS}")
    bundle_dir = model if model else default_bundle_path("v2")
    _check_outputs(json_out, plot, inputs=(bundle_dir, data))
    no_plot = f"no PNG, {PLOT_NEEDS}"
    if json_out is not None and plot is None and can_plot():
        plot, no_plot = _png_beside(json_out, inputs=(bundle_dir, data))
    # with --json /dev/stdout the JSON alone goes to stdout, so it can be piped; the report goes to stderr
    report = partial(typer.echo, err=json_out is not None and _is_stdout(json_out))
    try:
        bundle = load_bundle(model) if model else load_default_bundle("v2")
        dataset = load_dataset(data, size=bundle.input_shape[0], progress=sys.stderr.isatty())
        _, _, prior_use = clinical_inputs(bundle, dataset, clinical_prior)
        result = evaluate_bundle(bundle, dataset, backend, use_prior=clinical_prior, lesion_fusion=lesion_fusion)
    except ClinicalDataError as exc:
        raise fail(f"{exc} (fix the metadata, or score the images alone: --no-clinical-prior)") from None
    except (BundleError, DataError, ValueError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # an unreadable metadata file or image folder, a failing disk
        raise fail(describe_os_error(exc)) from None
    report(f"{result['n']} images ({describe_skipped(dataset.skipped)}); backend {backend}; {prior_use}")
    fusion_use = f"on ({describe_lesions(dataset.lesion_ids)})" if lesion_fusion else "off (each image decided alone)"
    report(f"lesion fusion: {fusion_use}")
    report(f"top1 {result['top1']:.4f}  macro_f1 {result['macro_f1']:.4f}  balanced_accuracy {result['balanced_accuracy']:.4f}")
    for name, pc in result["per_class"].items():
        report(f"  {name:6s} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  f1 {pc['f1']:.3f}  n {pc['support']}")
    outputs: dict[Path, bytes] = {}
    if json_out is not None:
        outputs[json_out] = (json.dumps(result, indent=2) + "\n").encode()
    if plot is not None:
        outputs[plot] = confusion_png(result["confusion"], bundle.classes, title=f"{bundle.manifest.get('name', 'qana')} ({backend})")
    try:
        _write_outputs(outputs)
    except OSError as exc:
        named = " and ".join(f"{flag} {path}" for flag, path in (("--json", json_out), ("--plot", plot)) if path is not None)
        raise fail(f"{named}: {exc.strerror or exc} (an existing file there is kept whole)") from None
    if json_out is not None:
        report(f"metrics: {json_out}")
    if plot is not None:
        report(f"confusion matrix: {plot}")
    elif json_out is not None:
        report(f"confusion matrix: {no_plot}")


def _check_outputs(json_out: Path | None, plot: Path | None, inputs: tuple[Path, Path]) -> None:
    """Refuse output paths that cannot work before evaluating, not after a long evaluation."""
    if json_out is not None and json_out.suffix.lower() == ".png":
        raise fail(f"--json {json_out} ends in .png: the metrics are JSON (the confusion-matrix PNG is written beside it)")
    if plot is not None and plot.suffix.lower() != ".png":
        raise fail(f"--plot {plot}: the confusion matrix is a PNG; give a path ending in .png")
    if json_out is not None and plot is not None and os.path.realpath(json_out) == os.path.realpath(plot):
        raise fail(f"--json and --plot are the same file ({plot}); one would overwrite the other")
    for flag, path in (("--json", json_out), ("--plot", plot)):
        if path is not None:
            problem = _unwritable(path) or _overwrites_input(path, *inputs)
            if problem:
                raise fail(f"{flag} {path}: {problem}")


def _overwrites_input(path: Path, bundle_dir: Path, data: Path) -> str | None:
    """Why writing `path` would damage what this run reads (None if it would not): anything inside
    the bundle folder (its bundle.json holds every file's sha256), the data folder's metadata file
    or one of its images."""
    from qana.data import METADATA_NAMES

    target = Path(os.path.realpath(path))
    if target.is_relative_to(os.path.realpath(bundle_dir)):
        return f"is inside the bundle folder {bundle_dir}; write the results elsewhere"
    root = Path(os.path.realpath(data))
    if target.is_relative_to(root) and target.is_file():
        if any(target == root / name for name in METADATA_NAMES) or target.suffix.lower() in (".jpg", ".jpeg"):
            return f"is one of the data folder's own files ({target.name}); write the results elsewhere"
    return None


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written (None if it can): a folder in its place, a file where a parent
    folder should be, a link that loops or leads nowhere, or a folder that refuses new files (tried
    by creating one in the nearest folder that exists, so nothing is created for a run that then fails)."""
    try:
        return _why_unwritable(path)
    except OSError as exc:  # e.g. a name longer than the file system allows
        return exc.strerror or str(exc)


def _why_unwritable(path: Path) -> str | None:
    import errno
    import tempfile

    from qana.atomic import file_in_the_way

    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            return exc.strerror
    if path.is_dir():
        return "is a directory; give a file path"
    if path.exists() and not path.is_file():  # a pipe or terminal, e.g. /dev/stdout: written directly
        return None if os.access(path, os.W_OK) else "cannot be written"
    for folder in Path(os.path.abspath(path)).parents:
        if folder.is_symlink() and not folder.exists():
            return f"{folder} is a link to {os.readlink(folder)}, which does not exist"
    target = Path(os.path.realpath(path))
    blocking = file_in_the_way(target.parent)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write to {folder} ({exc.strerror or exc})"
    return None


def _is_stdout(path: Path) -> bool:
    """Whether `path` is this process's standard output (--json /dev/stdout)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):  # no such file, or stdout is not a real file (a test runner's capture)
        return str(path) in ("/dev/stdout", "/proc/self/fd/1")


def _write_outputs(outputs: dict[Path, bytes]) -> None:
    """Write the command's outputs the way a user expects of a command's output, but in one step.

    Regular files are written together (qana.atomic.write_together): a full disk or a failure
    leaves earlier ones whole, and the metrics are never replaced without their plot. They get
    the user's umask; a link is followed and its target replaced. A pipe or terminal (--json
    /dev/stdout) is written directly.
    """
    from qana.atomic import current_umask, write_together

    regular: dict[Path, tuple[bytes, int]] = {}
    for path, data in outputs.items():
        if path.exists() and not path.is_file():
            with open(path, "wb") as handle:
                handle.write(data)
        else:
            regular[path] = (data, 0o666 & ~current_umask())
    write_together(regular)  # follows a link and makes the folder


def _png_beside(json_out: Path, inputs: tuple[Path, Path]) -> tuple[Path | None, str]:
    """The confusion-matrix PNG that goes beside `--json` when no --plot is given, or (None, why
    not). It is a by-product: a path that cannot take it skips the PNG rather than the run.
    `m.json` gets `m.png`; any other name gets `.png` added (`eval.v2` -> `eval.v2.png`), so runs
    told apart by their --json names never share a PNG."""
    if json_out.exists() and not json_out.is_file():
        return None, f"no PNG beside --json {json_out}: it is not a regular file (give --plot for one)"
    png = json_out.with_suffix(".png") if json_out.suffix.lower() == ".json" else json_out.with_name(json_out.name + ".png")
    problem = _unwritable(png) or _overwrites_input(png, *inputs)
    if problem:
        return None, f"no PNG beside --json: {png} {problem}"
    return png, ""


@app.command()
def split(
    data: Annotated[Path, typer.Option(help="The HAM10000-style folder the model was trained on.")],
    out: Annotated[Path, typer.Option(help="New folder to write the part to (must not exist or be empty).")],
    part: Annotated[str, typer.Option(help="train | val | test.")] = "test",
    model: Annotated[Optional[Path], typer.Option(help="Bundle whose split to reproduce: its seed is used and its recorded split sizes are checked.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Split seed, as given to `qana train` (default: the bundle's, else 0).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share, as given to `qana train` (the test part does not depend on it).")] = VAL_FRACTION,
) -> None:
    """Write one part of `qana train`'s lesion-grouped split as its own folder.

    E.g. the test images a bundle never trained on, so that
    `qana evaluate --data OUT --model BUNDLE` can check the bundle's recorded test figures.
    """
    from qana.bundle import BundleError, load_bundle
    from qana.data import DataError, describe_skipped, load_dataset
    from qana.split_export import SplitExportError, check_new_folder, check_seed, check_settings, describe_settings, export_part

    with reported_errors(BundleError, DataError, SplitExportError):
        check_settings(part, val_fraction)
        check_new_folder(out)
        training = None
        if model is not None:
            training = load_bundle(model).manifest.get("training", {})
            recorded_seed = training.get("seed")
            if seed is not None and recorded_seed is not None and seed != recorded_seed:
                raise SplitExportError(f"--seed {seed} differs from the bundle's split seed {recorded_seed}")
            seed = recorded_seed if seed is None else seed
        seed = 0 if seed is None else int(seed)
        check_seed(seed)
        dataset = load_dataset(data, progress=sys.stderr.isatty())
        n = export_part(data, dataset, out, part, seed, val_fraction, invoked_command("qana", "split"), training)
    typer.echo(f"{n} {part} images ({describe_settings(part, seed, val_fraction)}) written to {out}; {describe_skipped(dataset.skipped)}")


@app.command()
def info(bundle_path: Annotated[Optional[Path], typer.Argument(help="Bundle directory (default: the shipped v2 bundle).")] = None) -> None:
    """Print a bundle's manifest after verifying every file's sha256."""
    from qana.bundle import BundleError, load_bundle, load_default_bundle
    from qana.runtime import MIN_OUTPUT_SHIFT, early_saturating_channels, load_akida_model

    try:
        bundle = load_bundle(bundle_path) if bundle_path else load_default_bundle("v2")
        bundle.load_clinical_prior()  # as evaluate and the clinics check it: hashed, readable, the bundle's classes
    except BundleError as exc:
        raise fail(str(exc)) from None
    m = bundle.manifest
    typer.echo(f"bundle     {bundle.path}")
    typer.echo(f"id         {bundle.bundle_id}")
    typer.echo(f"target     Akida {m['target']} ({m.get('ip_version', '?')}), akida {m.get('akida_version', '?')}")
    typer.echo(f"classes    {', '.join(m['classes'])}")
    typer.echo(f"input      {m['input_shape']} {m.get('input_dtype', 'uint8')}; features {m['feature_dim']}")
    views = bundle.test_time_views
    typer.echo(f"views      {views} test-time view(s) per image" + (" (flips/turns, features averaged: qana.views)" if views > 1 else ""))
    typer.echo(f"bits       {json.dumps(m.get('bits', {}))}")
    # in the order a clinic's runtime applies them (colour constancy on the resized image: qana.preprocess)
    steps = {**m.get("preprocessing", {}), "colour_constancy": bundle.colour_constancy}
    order = ["decode", "crop", "resize", "colour_constancy", "scaling"]
    named = sorted(steps, key=lambda k: (order.index(k) if k in order else len(order), k))
    typer.echo("preprocess " + "; ".join(f"{k.replace('_', ' ')} {steps[k]}" for k in named))
    prior = m.get("clinical_prior")
    if prior:
        missing = "" if (bundle.path / prior["file"]).is_file() else " (file not in this copy)"
        typer.echo(f"clinical   prior from {', '.join(prior['inputs'])}, weight {prior['weight']:g}, in {prior['file']}{missing}")
    present = [name for name in m["files"] if (bundle.path / name).is_file()]  # load_bundle checked these
    for name, digest in m["files"].items():
        typer.echo(f"file       {name}  sha256 {digest}" + ("" if name in present else "  (not in this copy)"))
    try:
        cut = early_saturating_channels(load_akida_model(bundle))
    except BundleError as exc:
        raise fail(str(exc)) from None
    if cut:
        where = ", ".join(f"{n} output channel(s) of {layer}" for layer, n in cut.items())
        typer.echo(
            f"akida      {where} rescaled below shift {MIN_OUTPUT_SHIFT}: the chip cuts them early "
            "(converted before session 25's fix; README, pipeline step 6)"
        )
    else:
        typer.echo(f"akida      no output channel rescaled below shift {MIN_OUTPUT_SHIFT} (none cut early by the chip)")
    training = m.get("training", {})
    if training:
        typer.echo(f"trained by {training.get('command', '?')}")
    test = m.get("metrics", {}).get("test", {})
    for backend, label in (("float", "float"), ("quantized", "quantized"), ("akida", "akida"), ("akida_with_clinical_prior", "akida+clinical prior")):
        if backend in test:
            r = test[backend]
            typer.echo(f"test {label:9s} top1 {r['top1']:.4f}  macro_f1 {r['macro_f1']:.4f}  balanced_acc {r['balanced_accuracy']:.4f}  n {r['n']}")
    absent = len(m["files"]) - len(present)
    typer.echo(
        f"verified: the {len(present)} file(s) in this copy match their recorded sha256"
        + (f" ({absent} listed file(s) not in this copy: optional extras, never loaded)" if absent else "")
    )


if __name__ == "__main__":
    app()
