"""The built wheel: model/ and adapters/ install under leuk_fhir, never as bare packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_only_leuk_fhir_at_top_level(tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("leuk_fhir-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"leuk_fhir"}
    for expected in (
        "leuk_fhir/model/hosvd.py",
        "leuk_fhir/adapters/__init__.py",
        "leuk_fhir/data/demo-model.lfm",
        "leuk_fhir/service/static/index.html",
        "leuk_fhir/py.typed",
    ):
        assert expected in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "leuk-fhir = leuk_fhir.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_checkout_package_finds_model_and_adapters_without_an_install_mapping():
    """`python -m leuk_fhir` in the repository root imports the checkout's leuk_fhir/, which
    shadows an installed copy; model/ and adapters/ must still resolve (they sit beside it)."""
    import site

    # -S: no .pth files, so no editable-install finder maps the names; the checkout comes first
    # and site-packages only supplies the third-party libraries.
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; "
        "import leuk_fhir.model.hosvd as h, leuk_fhir.adapters.images as a; "
        "print(h.__file__); print(a.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT), *site.getsitepackages()],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    hosvd_file, adapter_file = done.stdout.split()
    assert Path(hosvd_file) == ROOT / "model" / "hosvd.py"
    assert Path(adapter_file) == ROOT / "adapters" / "images.py"
