"""Labelled cell-image datasets: readers, duplicate removal, deterministic (grouped) folds.

Three layouts are read:

* a folder of class sub-folders (``DATA/<class>/*.png``);
* the ALL-IDB naming, ``ImNNN_1.*`` = blast and ``ImNNN_0.*`` = healthy, in one folder;
* a CSV manifest ``path,label[,group[,subclass]]`` (header optional; paths relative to the
  CSV).

Groups are patients (or subjects, slides): a group never straddles a split, so a fold is
scored on patients its model never saw. They come from the manifest's third column, from a
pattern on each image's path (``group_pattern``), or, when every file name follows the C-NMC
2019 naming ``UID_<subject>_<image>_<cell>_<all|hem>.bmp``, from that subject.

Sub-classes are labelled kinds of cell inside a class (the seven cell types inside "other" in
lymphocyte vs the rest): the CSV's fourth column, the first sub-folder level inside each class
folder (``subclass_folders``, opt-in, since sub-folders often hold patients instead), a pattern
on file names (``subclass_pattern``), or the original classes merged by ``binary_positive``.
The model trains on them and reports classes.

Byte-identical files are found by SHA-256 and dropped before splitting (and reported); a file
whose copies carry different labels has no trustworthy label, and every copy is left out. Files
that are not used (images beside the class folders, broken links, hidden or system folders such
as ``.thumbnails`` and ``@eaDir``, non-images) are listed in the dataset's ``skipped``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from leuk_fhir.errors import DatasetError, ImageTooLargeError, InvalidImageError
from leuk_fhir.model.framing import Framing, choose_crop, sample_indices
from leuk_fhir.model.images import IMAGE_EXTENSIONS, decode_image, pad_to_square, square_resize

ALL_IDB_PATTERN = re.compile(r"^Im\d+_([01])\.[A-Za-z0-9]+$", re.IGNORECASE)
ALL_IDB_LABELS = {"1": "blast", "0": "normal"}
#: Unusable images named in the error message (all are counted).
UNREADABLE_SHOWN = 10
#: C-NMC 2019 cell names (UID_11_10_1_all.bmp, UID_H10_43_1_hem.bmp): group 1 is the subject.
CNMC_PATTERN = re.compile(r"^UID_(H?\d+)_\d+_\d+_(?:all|hem)\.[A-Za-z0-9]+$", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    group: str | None = None
    subclass: str | None = None


@dataclass(frozen=True)
class Subclasses:
    """Labelled kinds of cell inside classes: kind ``names[i]`` belongs to class
    ``parents[i]`` (an index into the dataset's ``class_names``); a class without labelled
    kinds is its own single kind."""

    names: tuple[str, ...]
    parents: tuple[int, ...]

    def to_json(self, class_names: tuple[str, ...]) -> dict[str, list[str]]:
        """Class name -> the names of its kinds."""
        out: dict[str, list[str]] = {c: [] for c in class_names}
        for name, parent in zip(self.names, self.parents, strict=True):
            out[class_names[parent]].append(name)
        return out


@dataclass(frozen=True)
class DuplicateReport:
    """Files dropped because their bytes equal an earlier file's with the same label, and
    files left out because byte-identical copies carry different labels."""

    dropped: tuple[tuple[str, str], ...] = ()  # (dropped path, kept path)
    #: each conflicting image's copies as (path, label); every copy is left out
    conflicts: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def count(self) -> int:
        return len(self.dropped)

    def conflict_text(self, limit: int = 3) -> str:
        """The first ``limit`` conflicts as 'a.png (blast) = b.png (normal)'."""
        shown = [" = ".join(f"{p} ({label})" for p, label in c) for c in self.conflicts[:limit]]
        more = len(self.conflicts) - limit
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


#: Why a file or folder in a dataset folder was not used, in the order reports list them.
SKIP_REASONS = (
    "image outside class folders",
    "broken link",
    "hidden or system folder",
    "linked folder already read",
    "unreadable folder",
    "folder beside ALL-IDB images",
    "hidden file",
    "not an image",
)
#: Skipped files and conflicting copies listed in a dataset summary (report.json, the model
#: file); all are counted.
SUMMARY_LISTED = 50


@dataclass(frozen=True)
class Skipped:
    """A file or folder of a dataset folder that was not used, relative to the folder."""

    path: str
    reason: str


def skipped_text(skipped: tuple[Skipped, ...] | list[Skipped], examples: int = 4) -> str:
    """'skipped 3 file(s) or folder(s): 1 broken link, 2 not an image (e.g. a, b, c)'."""
    ordered = sorted(skipped, key=lambda s: SKIP_REASONS.index(s.reason))
    counts = Counter(s.reason for s in ordered)
    names = ", ".join(s.path for s in ordered[:examples]) + (
        ", ..." if len(ordered) > examples else ""
    )
    return (
        f"skipped {len(ordered)} file(s) or folder(s): "
        + ", ".join(f"{n} {reason}" for reason, n in counts.items())
        + f" (e.g. {names})"
    )


@dataclass
class CellDataset:
    """Decoded images (n, size, size, 3) uint8 with labels, optional groups and provenance."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None
    paths: tuple[str, ...]
    fingerprint: str
    source: str
    duplicates: DuplicateReport = field(default_factory=DuplicateReport)
    framing: Framing = field(default_factory=lambda: Framing(1.0, "fixed"))
    #: labelled kinds of cell inside the classes, and each image's (an index into its names)
    subclasses: Subclasses | None = None
    sub_y: np.ndarray | None = None
    #: where ``groups`` came from, in words (None without groups)
    grouping: str | None = None
    #: files and folders of the dataset folder that were not used, and why
    skipped: tuple[Skipped, ...] = ()

    @property
    def y(self) -> np.ndarray:
        """Integer labels indexing ``class_names``."""
        return np.searchsorted(np.array(self.class_names), self.labels)

    def counts(self) -> dict[str, int]:
        return {
            str(c): int(n) for c, n in zip(*np.unique(self.labels, return_counts=True), strict=True)
        }

    def summary(self) -> dict[str, object]:
        return {
            "source": self.source,
            "images": int(len(self.labels)),
            "classes": self.counts(),
            "groups": None if self.groups is None else int(len(set(self.groups.tolist()))),
            "grouping": self.grouping,
            "duplicates_dropped": self.duplicates.count,
            "duplicate_label_conflicts": len(self.duplicates.conflicts),
            "duplicate_conflicts": [
                [{"path": p, "label": label} for p, label in c]
                for c in self.duplicates.conflicts[:SUMMARY_LISTED]
            ],
            "skipped_files": len(self.skipped),
            "skipped": [
                {"path": s.path, "reason": s.reason} for s in self.skipped[:SUMMARY_LISTED]
            ],
            "fingerprint": self.fingerprint,
            "framing": self.framing.to_json(),
            "subclasses": (
                None if self.subclasses is None else self.subclasses.to_json(self.class_names)
            ),
        }


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _is_hidden_folder(name: str) -> bool:
    """Hidden (``.thumbnails``) or system (``@eaDir``, ``__MACOSX``) folders are never data."""
    return name.startswith((".", "@")) or name in ("__MACOSX", "$RECYCLE.BIN")


def _file_reason(path: Path) -> str | None:
    """Why a file in a class folder is not an image to use (None: it is one)."""
    if not path.exists():
        return "broken link"
    if _is_image(path):
        return None
    if path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
        return "hidden file"
    return "not an image"


def list_images(source: Path, subclass_folders: bool = False) -> list[LabelledImage]:
    """Find labelled images in a class-folder tree, an ALL-IDB folder or a CSV manifest
    (:func:`find_images` without the skipped files)."""
    return find_images(source, subclass_folders)[0]


def find_images(
    source: Path, subclass_folders: bool = False
) -> tuple[list[LabelledImage], list[Skipped]]:
    """Labelled images in a class-folder tree, an ALL-IDB folder or a CSV manifest, and the
    files and folders not used (images beside class folders, broken links, hidden or system
    folders, non-images). Linked folders are followed, each real folder read once.

    With ``subclass_folders`` the first sub-folder inside a class folder names the image's
    sub-class (``DATA/other/basophil/x.jpg``); otherwise sub-folders are just searched."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(
                f"{source}: expected a folder or a CSV manifest (path,label[,group[,subclass]])"
            )
        return _read_manifest(source), []
    entries = sorted(source.iterdir())
    hidden = [p for p in entries if p.is_dir() and _is_hidden_folder(p.name)]
    folders = [p for p in entries if p.is_dir() and p not in hidden]
    files = [p for p in entries if not p.is_dir()]
    images = [p for p in files if _is_image(p)]
    loose = set(images)
    skipped = [Skipped(p.name, "hidden or system folder") for p in hidden]
    matches = [ALL_IDB_PATTERN.match(p.name) for p in images]
    if images and all(matches):
        skipped += [Skipped(p.name, "folder beside ALL-IDB images") for p in folders]
        skipped += [Skipped(p.name, r) for p in files if (r := _file_reason(p))]
        return [
            LabelledImage(p, ALL_IDB_LABELS[m.group(1)])
            for p, m in zip(images, matches, strict=True)
            if m is not None
        ], skipped
    if not folders:
        odd = [p.name for p, m in zip(images, matches, strict=True) if m is None]
        if len(odd) < len(images):
            raise DatasetError(
                f"{source}: {len(images) - len(odd)} of {len(images)} images follow the ALL-IDB "
                f"naming (ImNNN_1 = blast, ImNNN_0 = normal) and these do not: "
                + ", ".join(odd[:5])
                + (f" and {len(odd) - 5} more" if len(odd) > 5 else ""),
                hint="rename or remove them",
            )
        raise DatasetError(
            f"{source}: no class sub-folders and no ALL-IDB named images (ImNNN_1.jpg / ImNNN_0.jpg)"
        )
    for p in files:
        reason = "image outside class folders" if p in loose else _file_reason(p)
        if reason is not None:
            skipped.append(Skipped(p.name, reason))
    items: list[LabelledImage] = []
    visited: set[tuple[int, int]] = set()
    for folder in folders:
        found = _walk_images(folder, source, skipped, visited)
        if not found:
            raise DatasetError(
                f"class folder {folder} contains no images", hint="remove it or add images"
            )
        items += [
            LabelledImage(
                p, folder.name, subclass=_first_subfolder(folder, p) if subclass_folders else None
            )
            for p in found
        ]
    return items, skipped


def _walk_images(
    folder: Path, source: Path, skipped: list[Skipped], visited: set[tuple[int, int]]
) -> list[Path]:
    """Images anywhere under ``folder`` (linked folders followed, each real folder once),
    sorted by path; what is not used is added to ``skipped``."""
    found: list[Path] = []

    def skip(path: Path | str, reason: str) -> None:
        skipped.append(Skipped(Path(path).relative_to(source).as_posix(), reason))

    info = folder.stat()
    visited.add((info.st_dev, info.st_ino))
    for root, dirs, names in os.walk(
        folder, followlinks=True, onerror=lambda e: skip(e.filename, "unreadable folder")
    ):
        here = Path(root)
        keep = []
        for name in sorted(dirs):
            sub = here / name
            if _is_hidden_folder(name):
                skip(sub, "hidden or system folder")
                continue
            try:
                info = sub.stat()
            except OSError:
                skip(sub, "unreadable folder")
                continue
            if (info.st_dev, info.st_ino) in visited:
                skip(sub, "linked folder already read")
                continue
            visited.add((info.st_dev, info.st_ino))
            keep.append(name)
        dirs[:] = keep
        for name in names:
            path = here / name
            reason = _file_reason(path)
            if reason is None:
                found.append(path)
            else:
                skip(path, reason)
    return sorted(found)


def _first_subfolder(folder: Path, path: Path) -> str | None:
    parts = path.relative_to(folder).parts
    return parts[0] if len(parts) > 1 else None


def _read_manifest(path: Path) -> list[LabelledImage]:
    """Rows of a UTF-8 CSV manifest (anything else is refused, never guessed: a wrong guess
    would silently misspell file names); errors name the file's line."""
    items: list[LabelledImage] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position "
                f"{exc.start})",
                hint="save it as UTF-8: in Excel, Save As 'CSV UTF-8'",
            ) from None
        except csv.Error as exc:
            raise DatasetError(f"{path}: line {reader.line_num + 1} is not CSV: {exc}") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        rows = rows[1:]
    for number, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(
                f"{path}: line {number} must be path,label[,group[,subclass]], got {row!r}"
            )
        image = Path(row[0].strip())
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DatasetError(f"{path}: line {number}: image {image} does not exist")
        group = row[2].strip() if len(row) > 2 and row[2].strip() else None
        subclass = row[3].strip() if len(row) > 3 and row[3].strip() else None
        items.append(LabelledImage(image, row[1].strip(), group, subclass))
    if not items:
        raise DatasetError(f"{path}: manifest lists no images")
    if any(i.group is None for i in items) and any(i.group is not None for i in items):
        raise DatasetError(f"{path}: give a group for every row or for none")
    return items


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc


def drop_duplicates(
    items: list[LabelledImage],
) -> tuple[list[LabelledImage], list[str], DuplicateReport]:
    """Keep the first of each set of byte-identical files with one label, and none of a set
    whose labels differ (its label is unknown); return kept items and their SHA-256 digests
    (the bytes are not kept: a folder of large BMP or TIFF files would fill memory)."""
    copies: dict[str, list[LabelledImage]] = {}
    for item in items:
        copies.setdefault(hashlib.sha256(_read(item.path)).hexdigest(), []).append(item)
    kept: list[LabelledImage] = []
    digests: list[str] = []
    dropped: list[tuple[str, str]] = []
    conflicts: list[tuple[tuple[str, str], ...]] = []
    for digest, same in copies.items():  # in the order of each file's first copy
        if len({i.label for i in same}) > 1:
            conflicts.append(tuple((str(i.path), i.label) for i in same))
            continue
        kept.append(same[0])
        digests.append(digest)
        dropped += [(str(i.path), str(same[0].path)) for i in same[1:]]
    return kept, digests, DuplicateReport(tuple(dropped), tuple(conflicts))


def _read_unchanged(item: LabelledImage, digest: str) -> bytes:
    """The file's bytes, read again; DatasetError if they changed since it was first read."""
    raw = _read(item.path)
    if hashlib.sha256(raw).hexdigest() != digest:
        raise DatasetError(f"{item.path} changed while the dataset was being read; run again")
    return raw


def load_dataset(
    source: Path,
    image_size: int,
    max_pixels: int,
    binary_positive: str | None = None,
    progress: bool = False,
    crop: float | None = 1.0,
    subclass_folders: bool = False,
    subclasses: bool = True,
    subclass_pattern: str | None = None,
    group_pattern: str | None = None,
    groups: bool = True,
    min_classes: int = 2,
) -> CellDataset:
    """Read, de-duplicate, decode and resize a dataset once into memory.

    Sub-classes (kinds of cell inside a class) come from a manifest's fourth column, from
    ``subclass_folders``, from ``subclass_pattern`` (a regular expression searched in each
    file name: its first group, or the whole match, names the kind) and from
    ``binary_positive``, which relabels the dataset as ``<name>`` vs ``other`` (e.g.
    lymphocyte vs the rest) and keeps the merged classes as kinds of ``other``. ``subclasses``
    False ignores them all. Groups (patients) come from a manifest's third column, from
    ``group_pattern`` (searched in each image's path relative to ``source``, or to a
    manifest's folder) or from C-NMC file names; ``groups`` False ignores them. ``crop``
    keeps the central fraction of each image (None: measured from a sample of the images,
    :func:`leuk_fhir.model.framing.choose_crop`). Raises :class:`DatasetError` for fewer than
    ``min_classes`` classes (two for training, each of at least two images; one will do to
    score a trained model), class names that differ only in case or spacing, a class every
    image of which is a copy of another class's, or an empty dataset.
    """
    items, skipped = find_images(Path(source), subclass_folders=subclass_folders)
    _refuse_look_alike_classes(items, source)
    if subclass_pattern is not None:
        items = _kinds_from_names(items, subclass_pattern)
    items, grouping = _assign_groups(items, Path(source), group_pattern, groups)
    if binary_positive is not None:
        names = {i.label for i in items}
        # the folder's own spelling of the name, matched as class names are everywhere (case,
        # surrounding spaces, Unicode form); folders that differ only so are refused above
        spelt = [n for n in names if class_key(n) == class_key(binary_positive)]
        if not spelt:
            raise DatasetError(
                f"--binary-positive {binary_positive!r} is not a class of {source} ({sorted(names)})"
            )
        binary_positive = spelt[0]
        items = [
            i
            if i.label == binary_positive
            else replace(
                i,
                label="other",
                subclass=i.label if i.subclass is None else f"{i.label}/{i.subclass}",
            )
            for i in items
        ]
    if not subclasses:
        items = [replace(i, subclass=None) for i in items]
    before = Counter(i.label for i in items)
    items, digests, duplicates = drop_duplicates(items)
    labels = np.array([i.label for i in items])
    counts = Counter(labels.tolist())
    vanished = sorted(set(before) - set(counts))
    if vanished:
        name = vanished[0]
        copies = next(c for c in duplicates.conflicts if name in {label for _, label in c})
        raise DatasetError(
            f"{source}: class {name!r} has no images left: each of its {before[name]} image(s) "
            "has a byte-identical copy labelled otherwise, e.g. "
            + " = ".join(f"{p} ({label})" for p, label in copies),
            hint="fix the labels: copies with different labels are left out of every class",
        )
    class_names = tuple(sorted(counts))
    if len(class_names) < min_classes:
        needs = "training needs at least two classes" if min_classes > 1 else "nothing to score"
        raise DatasetError(
            f"{source}: found {len(items)} image(s) of {len(class_names)} class(es) {list(class_names)}; "
            + needs
        )
    smallest = min(class_names, key=counts.__getitem__)
    if min_classes > 1 and counts[smallest] < 2:
        raise DatasetError(
            f"{source}: class {smallest!r} has {counts[smallest]} image; training needs at "
            "least 2 images per class",
            hint="add images of that class, or remove its folder",
        )
    unreadable: dict[str, str] = {}  # every image that cannot be used, named at once

    def decoded(i: int) -> np.ndarray | None:
        try:
            return decode_image(_read_unchanged(items[i], digests[i]), max_pixels, str(items[i].path))
        except (InvalidImageError, ImageTooLargeError) as exc:
            unreadable[str(items[i].path)] = str(exc)
            return None

    if crop is None:
        framing = choose_crop(
            pad_to_square(image)
            for image in map(decoded, sample_indices(len(items)))
            if image is not None
        )
    else:
        framing = Framing(crop, "fixed")
    images = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    iterator: Iterator[int] = iter(range(len(items)))
    if progress:
        from tqdm import tqdm

        iterator = iter(tqdm(range(len(items)), desc="decoding images", unit="img"))
    for i in iterator:
        image = decoded(i)
        if image is not None:
            images[i] = square_resize(image, image_size, framing.crop)
    if unreadable:
        shown = list(unreadable.values())[:UNREADABLE_SHOWN]
        more = len(unreadable) - len(shown)
        raise DatasetError(
            f"{source}: {len(unreadable)} of {len(items)} image(s) cannot be used: "
            + "; ".join(shown) + (f"; and {more} more" if more > 0 else ""),
            hint="replace or remove these files (all of them are listed in one go)",
        )
    fingerprint = hashlib.sha256()
    for item, digest in sorted(zip(items, digests, strict=True), key=lambda t: str(t[0].path)):
        fingerprint.update(bytes.fromhex(digest) + item.label.encode() + b"\0")
        if item.subclass is not None:
            fingerprint.update(item.subclass.encode() + b"\0")
    group_of = None if items[0].group is None else np.array([i.group for i in items])
    table, sub_y = _subclass_table(items, class_names)
    return CellDataset(
        images=images,
        labels=labels,
        class_names=class_names,
        groups=group_of,
        paths=tuple(str(i.path) for i in items),
        fingerprint=fingerprint.hexdigest(),
        source=str(source),
        duplicates=duplicates,
        framing=framing,
        subclasses=table,
        sub_y=sub_y,
        grouping=None if group_of is None else grouping,
        skipped=tuple(skipped),
    )


def _refuse_look_alike_classes(items: list[LabelledImage], source: Path) -> None:
    """Class names equal but for case, surrounding spaces or Unicode form (``ALL`` and
    ``all``) would train as two classes of one kind of cell: refused, naming both."""
    seen: dict[str, str] = {}
    for name in sorted({i.label for i in items}):
        other = seen.setdefault(class_key(name), name)
        if other != name:
            raise DatasetError(
                f"{source}: classes {other!r} and {name!r} differ only in case, spacing or "
                "Unicode form; they would train as two classes",
                hint="merge them into one folder or label, or rename one",
            )


def class_key(name: str) -> str:
    """A class name compared without regard to case, surrounding spaces or Unicode form."""
    return unicodedata.normalize("NFC", name).strip().casefold()


def _compile(option: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DatasetError(f"{option} {pattern!r} is not a regular expression: {exc}") from None


def _named_by(regex: re.Pattern[str], text: str) -> str | None:
    """The first group of ``regex`` searched in ``text`` (or the whole match), else None."""
    match = regex.search(text)
    return None if match is None else (match.group(1) if regex.groups else match.group(0))


def _kinds_from_names(items: list[LabelledImage], pattern: str) -> list[LabelledImage]:
    regex = _compile("--subclass-pattern", pattern)
    return [replace(i, subclass=_named_by(regex, i.path.name) or i.subclass) for i in items]


def _assign_groups(
    items: list[LabelledImage], source: Path, pattern: str | None, enabled: bool
) -> tuple[list[LabelledImage], str | None]:
    """Each image's group and where the groups came from (see :func:`load_dataset`)."""
    if not enabled:
        return [replace(i, group=None) for i in items], None
    from_manifest = any(i.group is not None for i in items)
    if pattern is not None:
        if from_manifest:
            raise DatasetError(
                f"{source}: the manifest already names each image's group; "
                "drop --group-pattern or the manifest's group column"
            )
        return _groups_from_paths(items, source, pattern), f"--group-pattern {pattern!r}"
    if from_manifest:
        return items, "the manifest's group column"
    subjects = [CNMC_PATTERN.match(i.path.name) for i in items]
    if items and all(subjects):
        return [
            replace(i, group=m.group(1).upper())
            for i, m in zip(items, subjects, strict=True)
            if m is not None
        ], "the subject in C-NMC file names (UID_<subject>_<image>_<cell>_<class>)"
    return items, None


def _groups_from_paths(
    items: list[LabelledImage], source: Path, pattern: str
) -> list[LabelledImage]:
    regex = _compile("--group-pattern", pattern)
    root = source if source.is_dir() else source.parent
    out, unmatched = [], []
    for item in items:
        try:
            where = item.path.relative_to(root).as_posix()
        except ValueError:
            where = item.path.as_posix()
        group = _named_by(regex, where)
        if not group:
            unmatched.append(where)
        out.append(replace(item, group=group))
    if unmatched:
        raise DatasetError(
            f"--group-pattern {pattern!r} names no group for {len(unmatched)} of {len(items)} "
            f"images, e.g. {', '.join(unmatched[:3])}",
            hint="the pattern is searched in each image's path relative to the data folder "
            "(e.g. 'all/patient07/cell1.png'); every image needs a group",
        )
    return out


def _subclass_table(
    items: list[LabelledImage], class_names: tuple[str, ...]
) -> tuple[Subclasses | None, np.ndarray | None]:
    """Sub-class names and each image's sub-class index; (None, None) when no class has more
    than one kind (an image without a sub-class label is its class's own kind)."""
    kinds = [(i.label, i.subclass or i.label) for i in items]
    table = sorted(set(kinds))
    if len(table) == len(class_names):
        return None, None
    index = {k: n for n, k in enumerate(table)}
    subclasses = Subclasses(
        tuple(kind for _, kind in table), tuple(class_names.index(c) for c, _ in table)
    )
    return subclasses, np.array([index[k] for k in kinds], dtype=np.int64)


def stratified_folds(
    labels: np.ndarray, n_folds: int, seed: int = 0, groups: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic stratified k-fold; with ``groups``, no group is on both sides of a split."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = Counter(labels.tolist())
    if n_folds < 2:
        raise DatasetError(f"cross-validation needs at least 2 folds, not {n_folds}")
    smallest = min(counts, key=counts.__getitem__)
    needed = min_per_class(n_folds)
    if counts[smallest] < needed:
        raise DatasetError(
            f"class {smallest!r} has {counts[smallest]} image(s), fewer than the {needed} that "
            f"{n_folds} folds need (each fold tests at least one and trains on at least "
            f"{MIN_TRAIN_PER_CLASS})",
            hint="use fewer folds, or add images of that class",
        )
    if groups is not None:
        n_groups = len(set(groups.tolist()))
        if n_groups < n_folds:
            raise DatasetError(f"{n_groups} groups cannot fill {n_folds} folds")
        for name in sorted(counts):
            held = sorted(set(groups[labels == name].tolist()))
            if len(held) < 2:
                raise DatasetError(
                    f"class {name!r} comes from one group only ({held[0]!r}): the fold that "
                    "tests it would train without it",
                    hint="add images of that class from more patients, or drop grouping",
                )
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels, groups))
        for number, (train, _) in enumerate(splits, start=1):
            missing = sorted(set(counts) - set(labels[train].tolist()))
            if missing:
                raise DatasetError(
                    f"fold {number} would train without class {missing[0]!r}: all of its "
                    "groups fall in that fold's test part",
                    hint="use fewer folds, or add images of that class from more patients",
                )
    else:
        splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)  # type: ignore[assignment]
        splits = list(splitter.split(np.zeros(len(labels)), labels))
    for number, (train, _) in enumerate(splits, start=1):
        trained = Counter(labels[train].tolist())
        short = min(counts, key=lambda c: trained.get(c, 0))
        if trained.get(short, 0) < MIN_TRAIN_PER_CLASS:
            raise DatasetError(
                f"fold {number} would train on {trained.get(short, 0)} image(s) of class "
                f"{short!r}; the HOSVD head needs at least {MIN_TRAIN_PER_CLASS} per class",
                hint="use fewer folds, or add images of that class (from more patients)",
            )
    return [(np.sort(a), np.sort(b)) for a, b in splits]


#: Images of each class the HOSVD head needs to fit (its inner cross-validation holds one out).
MIN_TRAIN_PER_CLASS = 2


def min_per_class(n_folds: int) -> int:
    """Images a class needs for ``n_folds`` stratified folds: one per test part and
    :data:`MIN_TRAIN_PER_CLASS` in every training part (4 for 2 folds, else ``n_folds``)."""
    return max(n_folds, math.ceil(MIN_TRAIN_PER_CLASS * n_folds / (n_folds - 1)))
