"""A half-downloaded or damaged safetensors file is refused with one line naming the file and
saying it looks truncated or damaged, never the safetensors library's bare `SafetensorError`
and a traceback (issue #33): the T5 loader, the Wan VAE loader, vdit's own exports, and the
`vdit eval-ae` / `vdit tokenize --text-encoder` / `vdit sample` commands that read them.

Every safetensors read under vdit/io/ goes through `hf_folder.open_safetensors`; each damage
kind below is one way a file can be broken: cut short (in its data, in its header, to nothing),
a header that is not JSON, a header length larger than the file, a tensor whose offsets lie
past the end, a header whose dtype and shape disagree with its offsets, and bytes after the
last tensor (which the safetensors library finds, and `open_safetensors` names)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vdit.cli import main
from vdit.io.hf_folder import CheckpointFormatError

FIXTURES = Path(__file__).parent / "fixtures"
WAN21 = FIXTURES / "wan" / "wan21"
UMT5 = FIXTURES / "t5" / "umt5"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
UMT5_SHARD = "model-00002-of-00003.safetensors"  # the middle one of three

# damage kind -> what the reason in the message must say
KINDS = {
    "truncated": r"ends at byte [\d,]+ but the file ends at byte [\d,]+",
    "cut_in_header": r"header length says [\d,]+ bytes",
    "empty": r"0 bytes, shorter than",
    "garbage_header": r"header is not JSON",
    "huge_header_length": r"header length says [\d,]+ bytes",
    "offsets_past_end": r"ends at byte [\d,]+ but the file ends at byte [\d,]+",
    "header_disagrees": r"F64 \[.*\] needs [\d,]+ bytes, its offsets hold [\d,]+",
    # found by the safetensors library, not the header check: its error, mapped, with the file
    "trailing_bytes": r"looks truncated or damaged \(.+\)",
}


def _split(raw: bytes) -> tuple[dict, bytes, int]:
    """(JSON header, data after it, header length) of safetensors bytes."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + n]), raw[8 + n:], n


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def damage(path: Path, kind: str) -> None:
    """Break the safetensors file `path` in place, one way of `KINDS`."""
    raw = path.read_bytes()
    header, data, n = _split(raw)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    last = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])
    f32 = next(k for k, v in tensors.items() if v["dtype"] == "F32")
    if kind == "truncated":  # a download stopped half way through the data
        out = raw[: 8 + n + len(data) // 2]
    elif kind == "cut_in_header":
        out = raw[: 8 + n // 2]
    elif kind == "empty":
        out = b""
    elif kind == "garbage_header":
        out = raw[:8] + (b"\xde\xad\xbe\xefGARBAGE" * n)[:n] + data
    elif kind == "huge_header_length":
        out = (1 << 62).to_bytes(8, "little") + raw[8:]
    elif kind == "offsets_past_end":  # the right byte size, but starting where the data ends
        begin, end = tensors[last]["data_offsets"]
        header[last]["data_offsets"] = [len(data), len(data) + end - begin]
        out = _join(header, data)
    elif kind == "header_disagrees":  # twice the bytes its offsets hold
        header[f32]["dtype"] = "F64"
        out = _join(header, data)
    elif kind == "trailing_bytes":  # e.g. two attempts of a download written one after another
        out = raw + raw[:100]
    else:
        raise ValueError(kind)
    path.write_bytes(out)


def _check_message(message: str, file: Path, kind: str) -> None:
    assert str(file) in message, message
    assert "looks truncated or damaged" in message, message
    assert re.search(KINDS[kind], message), f"{KINDS[kind]!r} not in: {message}"


def _broken_copy(tmp_path: Path, fixture: Path, file: str, kind: str) -> tuple[Path, Path]:
    folder = Path(shutil.copytree(fixture, tmp_path / fixture.name))
    damage(folder / file, kind)
    return folder, folder / file


# --- the loaders ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_t5_loader_names_a_damaged_shard(tmp_path, kind):
    from vdit.io.hf_t5 import load_t5

    folder, file = _broken_copy(tmp_path, UMT5, UMT5_SHARD, kind)
    with pytest.raises(CheckpointFormatError) as info:
        load_t5(folder)
    _check_message(str(info.value), file, kind)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wan_vae_loader_names_a_damaged_file(tmp_path, kind):
    from vdit.io.diffusers_wan import load_wan_vae

    folder, file = _broken_copy(tmp_path, WAN21, WAN_WEIGHTS, kind)
    with pytest.raises(CheckpointFormatError) as info:
        load_wan_vae(folder)
    _check_message(str(info.value), file, kind)


def test_open_safetensors_reads_a_sound_file_and_leaves_other_errors_alone():
    from vdit.io.hf_folder import check_safetensors, open_safetensors

    header = check_safetensors(WAN21 / WAN_WEIGHTS)
    with open_safetensors(WAN21 / WAN_WEIGHTS) as f:
        names = list(f.keys())
        first = f.get_tensor(names[0])
    assert set(names) == set(header) - {"__metadata__"}
    assert list(first.shape) == header[names[0]]["shape"]
    with pytest.raises(KeyError), open_safetensors(WAN21 / WAN_WEIGHTS):
        raise KeyError("a caller's own error passes through")
    with pytest.raises(CheckpointFormatError, match="no such file"):
        check_safetensors(WAN21 / "missing.safetensors")


# --- vdit's own exports -----------------------------------------------------------------------

def _export(tmp_path: Path) -> Path:
    from vdit.io.safetensors_io import write_export

    tensors = {"params": {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
                                    "bias": np.zeros(4, np.float32)}},
               "stats": {"mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32)}}
    return write_export(tmp_path / "export", tensors, {"kind": "dit", "config": {}, "step": 1})


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("resealed", [False, True], ids=["as_damaged", "resealed"])
def test_export_reader_names_a_damaged_file(tmp_path, kind, resealed):
    """Damaged after the export (its checksums then disagree too), or before it was sealed (the
    checksums agree): either way the reader says the file looks damaged, its header being
    checked before its checksum. Damage the header check cannot see is the checksum's."""
    from vdit.io.safetensors_io import ExportError, read_export, seal

    export = _export(tmp_path)
    damage(export / "model.safetensors", kind)
    if resealed:
        seal(export)
    with pytest.raises(ExportError) as info:
        read_export(export)
    if kind == "trailing_bytes" and not resealed:
        assert str(info.value).startswith(f"{export / 'model.safetensors'}: SHA-256 ")
        assert "the file is corrupt or altered" in str(info.value)
    else:
        _check_message(str(info.value), export / "model.safetensors", kind)


def test_sample_of_a_truncated_export_prints_one_error_line(tmp_path, capsys):
    export = _export(tmp_path)
    damage(export / "model.safetensors", "truncated")
    assert main(["sample", str(export)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit sample: error:") and "Traceback" not in err
    _check_message(err, export / "model.safetensors", "truncated")


# --- the commands, as a new user runs them ------------------------------------------------------

def _clips(folder: Path) -> Path:
    from real_clips import pan_zoom, photo

    from vdit.data.video_io import write_mp4

    folder.mkdir()
    write_mp4(folder / "pan.mp4", pan_zoom(photo("astronaut"), 5, (32, 32), 0), 8.0)
    return folder


def _vdit(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdit.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, command: str, file: Path,
                    kind: str) -> None:
    assert proc.returncode not in (0, None), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vdit {command}: error:"), proc.stderr
    _check_message(last, file, kind)


def test_eval_ae_of_a_truncated_wan_folder(tmp_path):
    folder, file = _broken_copy(tmp_path, WAN21, WAN_WEIGHTS, "truncated")
    clips = _clips(tmp_path / "clips")
    proc = _vdit("eval-ae", str(folder), "--videos", str(clips), "--frames", "5", cwd=tmp_path)
    _one_error_line(proc, "eval-ae", file, "truncated")


def test_tokenize_with_a_truncated_text_encoder(tmp_path):
    folder, file = _broken_copy(tmp_path, UMT5, UMT5_SHARD, "truncated")
    proc = _vdit("tokenize", str(tmp_path / "out"), "--physics", "2", "--text-encoder",
                 str(folder), cwd=tmp_path)
    _one_error_line(proc, "tokenize", file, "truncated")


@pytest.mark.parametrize("kind", ["garbage_header", "huge_header_length", "header_disagrees"])
def test_eval_ae_and_tokenize_name_other_damage(tmp_path, capsys, kind):
    """The same line from main() in this process, for other kinds (no process start-ups)."""
    wan, wan_file = _broken_copy(tmp_path, WAN21, WAN_WEIGHTS, kind)
    clips = _clips(tmp_path / "clips")
    assert main(["eval-ae", str(wan), "--videos", str(clips), "--frames", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit eval-ae: error:") and "Traceback" not in err
    _check_message(err, wan_file, kind)

    t5, t5_file = _broken_copy(tmp_path, UMT5, UMT5_SHARD, kind)
    assert main(["tokenize", str(tmp_path / "out"), "--physics", "2", "--text-encoder",
                 str(t5)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit tokenize: error:") and "Traceback" not in err
    _check_message(err, t5_file, kind)
