"""`leuk-fhir` sub-commands of the model family: train, evaluate, predict, model-card."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leuk_fhir.errors import InputError

if TYPE_CHECKING:
    from leuk_fhir.model.classifier import CellClassifier
    from leuk_fhir.model.dataset import CellDataset
    from leuk_fhir.model.training import TrainingConfig
    from leuk_fhir.settings import Settings

_DEFAULTS = {"epochs": 0, "image_size": 64, "seed": 0, "feature_stages": 1}
DEMO_WARNING = "WARNING: bundled DEMO model (synthetic training data), not for clinical use"


def _fresh_option(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train everything again, discarding the folds and partly trained CNNs an "
        f"interrupted earlier run of this job kept in {where} (by default they are reused)",
    )


@contextmanager
def _kept_folds(keep: Path, fresh: bool) -> Iterator[None]:
    """Around training that keeps its folds and CNN training states in ``keep``: start over
    with ``fresh``; stopped by Ctrl-C or SIGTERM (a batch scheduler's time limit, ``kill``),
    say what is kept and that the same command continues."""
    from leuk_fhir.commands import interrupted_by_stop_signals
    from leuk_fhir.model.fold_store import CHECKPOINT_SUFFIX, clear_folds

    if fresh:
        clear_folds(keep)
    try:
        with interrupted_by_stop_signals():
            yield
    except KeyboardInterrupt:
        finished = len(list(keep.glob("fold-*.npz")))
        training = len(list(keep.glob(f"*{CHECKPOINT_SUFFIX}")))
        kept = [f"{finished} finished fold(s)"] if finished else []
        kept += [f"{training} partly trained CNN(s)"] if training else []
        if kept:
            print(
                f"leuk-fhir: {' and '.join(kept)} kept in {keep}; the same command continues "
                "from there (--fresh starts over)",
                file=sys.stderr,
            )
        raise


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epochs",
        type=int,
        default=_DEFAULTS["epochs"],
        help="CNN training epochs (default: auto, about 2000 optimiser steps: 40 epochs for "
        "3,200 images, between 12 and 200)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=_DEFAULTS["image_size"],
        help="side in pixels cells are resized to (default %(default)s)",
    )
    parser.add_argument(
        "--crop",
        default="auto",
        metavar="auto|F",
        help="central fraction of each image the model looks at (default auto: measured from the "
        "images' stained nuclei, 0.65 on PBC; 1 = whole image for cells that fill their image)",
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS["seed"], help="random seed (default %(default)s)"
    )
    parser.add_argument(
        "--binary-positive",
        metavar="CLASS",
        help="relabel the data as CLASS vs 'other' (e.g. lymphocyte vs the rest); the merged "
        "classes stay known as kinds of cell inside 'other', which the model trains on",
    )
    parser.add_argument(
        "--subclass-folders",
        action="store_true",
        help="the folders inside each class folder are kinds of cell (sub-classes) of that "
        "class: the model trains on them and answers with the class",
    )
    parser.add_argument(
        "--subclass-pattern",
        metavar="REGEX",
        help="a regular expression searched in each file name: its first group (or the whole "
        "match) names the image's kind of cell inside its class, e.g. '^([A-Z]+)_' for PBC's "
        "MMY_123.jpg",
    )
    parser.add_argument(
        "--no-subclasses",
        action="store_true",
        help="train on the classes only, ignoring kinds of cell inside them (from "
        "--binary-positive, --subclass-folders or a manifest's subclass column)",
    )
    parser.add_argument(
        "--group-pattern",
        metavar="REGEX",
        help="a regular expression searched in each image's path relative to DATA: its first "
        "group (or the whole match) names the image's patient, and no patient is on both sides "
        "of a split, e.g. '^[^/]+/([^/]+)/' for DATA/<class>/<patient>/cell.png (default: a "
        "manifest's group column, or the subject in C-NMC names UID_<subject>_...)",
    )
    parser.add_argument(
        "--no-groups",
        action="store_true",
        help="split images one by one, ignoring patient groups (from a manifest, "
        "--group-pattern or C-NMC file names)",
    )
    parser.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda")
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="training arithmetic: auto (default) is bfloat16 where the CPU/GPU has native "
        "support (about 2x faster), else float32",
    )
    parser.add_argument(
        "--feature-stages",
        type=int,
        default=_DEFAULTS["feature_stages"],
        metavar="N",
        help="feature maps of the last N CNN stages feed the classifier (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="cross-validation folds trained at the same time, in separate processes (default "
        "0 = auto: on 4 or more CPU cores one fold per two cores, as memory allows; else 1)",
    )
    parser.add_argument(
        "--augmentation",
        choices=["standard", "scanner"],
        default="standard",
        help="training augmentation: standard (default) or scanner, which also varies "
        "magnification, focus and stain strength as another microscope would",
    )
    parser.add_argument(
        "--dihedral-average",
        action="store_true",
        help="average CNN features over the 8 flips/rotations of each cell (+0.1 to +0.3 points "
        "on PBC, 8x slower inference; stored in the model file)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this family's sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train a CNN + HOSVD model on labelled cell images",
        description="Train on a folder of class sub-folders, ALL-IDB named images, or a CSV "
        "manifest (path,label[,group]) and write one model file.",
    )
    train.add_argument("data", type=Path, help="class-folder tree, ALL-IDB folder, or CSV manifest")
    train.add_argument("--out", type=Path, required=True, help="model file to write (.lfm)")
    _training_options(train)
    train.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        help="also cross-validate with K folds and store the figures",
    )
    _fresh_option(train, "OUT.folds")
    train.add_argument(
        "--name", default="leuk-fhir-cnn-hosvd", help="model name (default %(default)s)"
    )
    train.add_argument(
        "--model-version", default="0.1.0", help="model version (default %(default)s)"
    )
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="k-fold evaluation of the HOSVD, softmax and SVM heads",
        description="Cross-validate all three heads on the same folds; write DIR/report.json, "
        "DIR/report.md and confusion-matrix / ROC plots.",
    )
    evaluate.add_argument(
        "data", type=Path, help="class-folder tree, ALL-IDB folder, or CSV manifest"
    )
    evaluate.add_argument(
        "--folds", type=int, default=5, help="number of folds (default %(default)s)"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="output folder")
    _fresh_option(evaluate, "OUT/folds")
    _training_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    validate = subparsers.add_parser(
        "validate",
        help="external validation: score a trained model on labelled images it never saw",
        description="Run a model file, exactly as predict and the service do, over labelled "
        "images (another site, microscope or stain) and write DIR/report.json, DIR/report.md, "
        "DIR/predictions.csv and confusion-matrix / ROC plots. Nothing is trained.",
    )
    validate.add_argument(
        "data", type=Path, help="class-folder tree, ALL-IDB folder, or CSV manifest"
    )
    validate.add_argument(
        "--model", type=Path, default=None, help="model file (default: the bundled demo model)"
    )
    validate.add_argument("--out", type=Path, required=True, help="output folder")
    validate.add_argument(
        "--binary-positive",
        metavar="NAME",
        default=None,
        help="score a two-class NAME vs other model on a dataset of more classes (the classes "
        "but NAME count as other)",
    )
    validate.add_argument(
        "--group-pattern",
        metavar="REGEX",
        help="a regular expression searched in each image's path relative to DATA whose first "
        "group (or the whole match) names the image's patient, for per-patient figures "
        "(default: a manifest's group column, or the subject in C-NMC names)",
    )
    validate.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda")
    validate.set_defaults(handler=_validate)

    predict = subparsers.add_parser("predict", help="classify single-cell images")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    predict.add_argument(
        "--model", type=Path, default=None, help="model file (default: the bundled demo model)"
    )
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument("--device", default=None)
    predict.set_defaults(handler=_predict)

    card = subparsers.add_parser(
        "model-card", help="print the model card (Markdown) of a model file"
    )
    card.add_argument(
        "--model", type=Path, default=None, help="model file (default: the bundled demo model)"
    )
    card.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    card.set_defaults(handler=_model_card)


def _apply_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _config(args: argparse.Namespace, settings_device: str) -> TrainingConfig:
    from leuk_fhir.model.training import TrainingConfig

    if args.workers < 0:
        raise InputError(f"--workers must be 0 (auto) or more, not {args.workers}")
    stages = len(TrainingConfig.widths)
    if not 1 <= args.feature_stages <= stages:
        raise InputError(
            f"--feature-stages must be between 1 and {stages}, not {args.feature_stages}"
        )
    _crop_request(args)
    for name in ("epochs", "image_size"):
        if getattr(args, name) < (0 if name == "epochs" else 16):
            raise InputError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    return TrainingConfig(
        image_size=args.image_size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device or settings_device,
        precision=args.precision,
        dihedral_average=args.dihedral_average,
        feature_stages=args.feature_stages,
        augmentation=args.augmentation,
    )


def _crop_request(args: argparse.Namespace) -> float | None:
    from leuk_fhir.model.framing import parse_crop

    try:
        return parse_crop(args.crop)
    except ValueError as exc:
        raise InputError(f"--{exc}") from None


def _writable(path: Path, folder: bool) -> None:
    """Refuse, before any work, an ``--out`` that cannot be written: ``folder`` (else a file)
    of the wrong kind, below a file, or in a folder where no file can be created. Nothing is
    created: a failed run leaves no empty folder behind."""
    if path.exists() and path.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder; give a file name inside it"
        raise InputError(f"--out {path} is {kind}")
    where = path if folder else path.parent
    existing = next((p for p in (where, *where.parents) if p.exists()), Path.cwd())
    if not existing.is_dir():
        raise InputError(f"cannot write --out {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"cannot write --out {path}: {exc.strerror or exc} ({existing})") from None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Report a failure to write the results to ``path`` in one line (exit code 3)."""
    try:
        yield
    except OSError as exc:
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from exc


def _say_left_out(dataset: CellDataset) -> None:
    """On stderr: the files not used, the duplicates dropped and the images left out."""
    from leuk_fhir.model.dataset import skipped_text

    if dataset.skipped:
        print(skipped_text(dataset.skipped), file=sys.stderr)
    duplicates = dataset.duplicates
    if duplicates.count:
        print(f"dropped {duplicates.count} byte-identical duplicate image(s)", file=sys.stderr)
    if duplicates.conflicts:
        print(
            f"left out {len(duplicates.conflicts)} image(s) whose byte-identical copies carry "
            f"different labels ({sum(map(len, duplicates.conflicts))} files): "
            + duplicates.conflict_text(),
            file=sys.stderr,
        )


def _load(args: argparse.Namespace, config: TrainingConfig) -> CellDataset:
    """Read the dataset and say how it is framed, what will train it on which machine, and
    what was grouped or dropped (on stderr)."""
    from leuk_fhir.model.cnn import resolve_device, resolve_precision
    from leuk_fhir.model.dataset import load_dataset
    from leuk_fhir.model.machine import describe_machine, training_text
    from leuk_fhir.settings import load_settings

    settings = load_settings(args.config)
    _apply_threads(settings.model.threads)
    dataset = load_dataset(
        args.data,
        image_size=config.image_size,
        max_pixels=settings.image.max_pixels,
        binary_positive=args.binary_positive,
        progress=True,
        crop=_crop_request(args),
        subclass_folders=args.subclass_folders,
        subclass_pattern=args.subclass_pattern,
        subclasses=not args.no_subclasses,
        group_pattern=args.group_pattern,
        groups=not args.no_groups,
    )
    print(f"framing: {dataset.framing.describe()}", file=sys.stderr)
    device = resolve_device(config.device)
    machine = describe_machine(device)
    print(training_text(machine, resolve_precision(config.precision, device)), file=sys.stderr)
    if dataset.groups is not None:
        print(
            f"patients: {len(set(dataset.groups.tolist()))} groups from {dataset.grouping}; "
            "no group is on both sides of a split",
            file=sys.stderr,
        )
    _say_left_out(dataset)
    return dataset


def _train(args: argparse.Namespace) -> int:
    from leuk_fhir.model.workflow import train_and_save
    from leuk_fhir.settings import load_settings

    if args.cv_folds and args.cv_folds < 2:
        raise InputError(f"--cv-folds must be 0 (none) or at least 2, not {args.cv_folds}")
    config = _config(args, load_settings(args.config).model.device)
    _writable(args.out, folder=False)
    dataset = _load(args, config)
    keep = args.out.with_name(args.out.name + ".folds")
    with _kept_folds(keep, args.fresh):
        _, sha, report = train_and_save(
            dataset,
            args.out,
            config,
            name=args.name,
            version=args.model_version,
            cv_folds=args.cv_folds,
            cv_workers=args.workers,
            keep=keep,
            progress=True,
        )
    print(f"wrote {args.out} (sha256 {sha})")
    if report:
        print(" ".join(f"{h}: {100 * s['accuracy_mean']:.2f}%" for h, s in report["heads"].items()))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from leuk_fhir.model.evaluation import cross_validate, write_report
    from leuk_fhir.model.fold_store import clear_folds
    from leuk_fhir.settings import load_settings

    if args.folds < 2:
        raise InputError(f"--folds must be at least 2, not {args.folds}")
    config = _config(args, load_settings(args.config).model.device)
    _writable(args.out, folder=True)
    dataset = _load(args, config)
    keep = args.out / "folds"
    with _kept_folds(keep, args.fresh):
        report = cross_validate(
            dataset, args.folds, config, progress=True, workers=args.workers, keep=keep
        )
    with _writing(args.out):
        path = write_report(report, args.out)
    clear_folds(keep)
    for head, s in report["heads"].items():
        low, high = s["accuracy_ci95"]
        print(
            f"{head:8s} accuracy {100 * s['accuracy_mean']:.2f}% +- {100 * s['accuracy_std']:.2f}"
            f" (all cells {100 * s['accuracy_pooled']:.2f}%, 95% CI {100 * low:.2f}-"
            f"{100 * high:.2f})"
        )
    resumed = report["resumed_folds"]
    reused = f"; fold(s) {', '.join(map(str, resumed))} from an earlier run" if resumed else ""
    print(f"wrote {path} and {args.out / 'report.md'} ({report['seconds_total']:.0f} s{reused})")
    return 0


def _settings_and_classifier(args: argparse.Namespace) -> tuple[Settings, CellClassifier]:
    """The settings (``--config``) and the model (``--model``, else the settings' model, else
    the bundled demo model) on ``--device``, with the settings' thread count applied."""
    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.settings import load_settings

    settings = load_settings(args.config)
    _apply_threads(settings.model.threads)
    clf = load_classifier(
        args.model or settings.model.path,
        device=args.device or settings.model.device,
        batch_size=settings.model.batch_size,
    )
    return settings, clf


def _validate(args: argparse.Namespace) -> int:
    from leuk_fhir.model.dataset import load_dataset
    from leuk_fhir.model.validation import validate_model, write_validation_report

    _writable(args.out, folder=True)
    settings, clf = _settings_and_classifier(args)
    if clf.info.is_demo:
        print(DEMO_WARNING, file=sys.stderr)
    dataset = load_dataset(
        args.data,
        image_size=clf.image_size,
        max_pixels=settings.image.max_pixels,
        binary_positive=args.binary_positive,
        progress=True,
        crop=clf.crop,
        group_pattern=args.group_pattern,
        min_classes=1,
    )
    _say_left_out(dataset)
    report = validate_model(clf, dataset, progress=True)
    with _writing(args.out):
        path = write_validation_report(report, args.out)
    if report["same_data_as_training"]:
        print(
            "WARNING: these are the images the model was trained on: the figures are training "
            "accuracy, not validation",
            file=sys.stderr,
        )
    for head, s in report["heads"].items():
        low, high = s["accuracy_ci95"]
        print(
            f"{head:8s} accuracy {100 * s['accuracy']:.2f}% (95% CI {100 * low:.2f}-"
            f"{100 * high:.2f})"
        )
    answered = report["heads"]["hosvd"]["answered_accuracy"]
    print(
        f"indeterminate {100 * report['indeterminate_rate']:.2f}% of {report['images']} cells"
        + ("" if answered is None else f"; hosvd accuracy on the rest {100 * answered:.2f}%")
    )
    print(f"wrote {path}, {args.out / 'report.md'} and {args.out / 'predictions.csv'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from leuk_fhir.model.images import decode_image

    settings, clf = _settings_and_classifier(args)
    images = [decode_image(p, settings.image.max_pixels) for p in args.images]
    findings = clf.classify(images)
    results: list[dict[str, Any]] = [
        {
            "image": str(path),
            "label": f.label,
            "indeterminate": f.indeterminate,
            "indeterminate_reason": f.indeterminate_reason,
            "confidence": f.confidence,
            "probabilities": f.probabilities,
            "residuals": f.residuals,
        }
        for path, f in zip(args.images, findings, strict=True)
    ]
    model = {
        "name": clf.info.name,
        "version": clf.info.version,
        "sha256": clf.info.sha256,
        "is_demo": clf.info.is_demo,
    }
    if args.json:
        print(json.dumps({"model": model, "results": results}, indent=2))
    else:
        if clf.info.is_demo:
            print(DEMO_WARNING, file=sys.stderr)
        for r in results:
            print(f"{r['image']}: {r['label']} ({100 * r['confidence']:.1f}%)")
    return 0


def _model_card(args: argparse.Namespace) -> int:
    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.settings import load_settings

    if args.out:
        _writable(args.out, folder=False)
    settings = load_settings(args.config)
    clf = load_classifier(args.model or settings.model.path, device="cpu")
    text = clf.info.model_card_markdown or ""
    if args.out:
        with _writing(args.out):
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
