"""A built wheel exposes tokenprune.patches and tokenprune.eval, mapped from the top-level folders."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contains_mapped_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("tokenprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tokenprune/__init__.py",
        "tokenprune/patches/__init__.py",
        "tokenprune/patches/llava.py",
        "tokenprune/eval/__init__.py",
        "tokenprune/cli/__init__.py",
        "tokenprune/cli/serving.py",
        "tokenprune/methods/dart.py",
        "tokenprune/assets/example.png",
        "tokenprune/assets/shapes-vlm/model.safetensors",
        "tokenprune/assets/shapes-vlm/tokenizer.json",
        "tokenprune/assets/video-vlm/model.safetensors",
        "tokenprune/assets/video-vlm/tokenizer.json",
    ):
        assert required in names, f"{required} missing from the wheel"
    # every module of the three mapped folders, subpackages included (each must be listed in pyproject)
    sources = {"tokenprune": "tokenprune", "patches": "tokenprune/patches", "eval": "tokenprune/eval"}
    modules = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in sources.items()
        for path in (ROOT / folder).rglob("*.py")
    }
    assert sorted(modules - names) == []


def test_editable_install_maps_the_same_packages():
    import tokenprune.eval
    import tokenprune.patches

    assert pathlib.Path(tokenprune.patches.__file__).parent == ROOT / "patches"
    assert pathlib.Path(tokenprune.eval.__file__).parent == ROOT / "eval"
