"""Provenance: the invisible watermark (robustness, false positives, keys) and the record
(fields, sidecar, mp4 tags, C2PA). Small clips: 8 frames of 128 x 128 physics scenes."""

from __future__ import annotations

import datetime as dt
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from vdit.data.physics import WorldConfig, simulate
from vdit.data.video_io import read_video, upscale, write_mp4
from vdit.provenance import manifest as mf
from vdit.provenance import watermark as wm

PAYLOAD = wm.make_payload("model-abc", "run-7")


def _clip(seed: int, frames: int = 8, size: int = 64, factor: int = 2) -> np.ndarray:
    return upscale(simulate(WorldConfig(frames=frames, height=size, width=size), seed).frames,
                   factor)


def _resize(video: np.ndarray, factor: float) -> np.ndarray:
    h, w = video.shape[1:3]
    size = (round(w * factor), round(h * factor))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in video])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return _clip(1)


@pytest.fixture(scope="module")
def marked(clean) -> np.ndarray:
    return wm.embed(clean, PAYLOAD)


def _assert_found(video: np.ndarray) -> None:
    d = wm.detect(video, expected=PAYLOAD)
    assert d.present, d.message
    assert d.payload == PAYLOAD and d.bit_accuracy == 1.0
    assert d.score >= wm.Z_THRESHOLD


def test_api_constants():
    assert wm.PAYLOAD_BITS >= 32
    assert wm.DEFAULT_KEY == "vdit-public"
    assert 0 < wm.MIN_FRAME_SIZE <= 256


def test_round_trip_recovers_payload_and_is_invisible(clean, marked):
    assert marked.shape == clean.shape and marked.dtype == np.uint8
    assert _psnr(marked, clean) >= 40.0
    _assert_found(marked)


@pytest.mark.parametrize("crf", [18, 23])
def test_survives_mp4_reencode(tmp_path, marked, crf):
    back, _ = read_video(write_mp4(tmp_path / "m.mp4", marked, fps=8, crf=crf))
    _assert_found(back)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_survives_rescale(marked, factor):
    _assert_found(_resize(marked, factor))


def test_survives_ten_percent_crops(marked):
    h, w = marked.shape[1:3]
    dy, dx = round(0.05 * h), round(0.05 * w)
    _assert_found(marked[:, dy: h - dy, dx: w - dx])
    _assert_found(marked[:, :, round(0.1 * w):])


def test_informed_embedding_handles_busy_content():
    # Random colour blocks (what an untrained model samples) leak into the bits' statistics;
    # informed embedding cancels that, where a plain pattern loses bits.
    rng = np.random.default_rng(0)
    blocks = upscale(rng.gamma(1.0, 30.0, (4, 16, 16, 3)).clip(0, 255).astype(np.uint8), 8)
    marked = wm.embed(blocks, PAYLOAD)
    assert _psnr(marked, blocks) >= 40.0
    _assert_found(marked)


def test_clean_videos_are_not_detected():
    for seed in range(20):
        d = wm.detect(_clip(100 + seed, frames=4, size=64, factor=1))
        assert not d.present and d.payload is None, (seed, d.message)


def test_wrong_key_does_not_decode(marked):
    d = wm.detect(marked, key="someone-else", expected=PAYLOAD)
    assert not d.present and d.payload is None
    mine = wm.embed(_clip(2), PAYLOAD, key="my-private-key")
    assert wm.detect(mine, key="my-private-key").payload == PAYLOAD
    assert not wm.detect(mine).present  # the public key does not see a private mark


@pytest.mark.parametrize("flip, accuracy", [(wm.PAYLOAD_BITS + 5, 1.0),  # a CRC bit
                                            (3, 31 / 32)],  # a payload bit
                         ids=["crc_bit", "payload_bit"])
def test_strong_sync_with_a_wrong_checksum_is_unmarked(monkeypatch, flip, accuracy):
    """The false-positive guarantee is the CRC, not the sync: a mark of the same key, at full
    strength, whose coded word has one bit flipped (so its CRC no longer matches its payload) is
    read bit for bit and still reported unmarked."""
    word = wm._coded_bits(PAYLOAD).copy()
    word[flip] ^= 1
    calls = []
    with monkeypatch.context() as m:  # embed the corrupted word through the module's own path
        m.setattr(wm, "_coded_bits", lambda payload: calls.append(payload) or word)
        bad = wm.embed(_clip(3, frames=4, size=64, factor=1), PAYLOAD)
    assert calls == [PAYLOAD]
    d = wm.detect(bad, expected=PAYLOAD)
    assert d.score >= wm.Z_THRESHOLD, d.message  # the sync is there, strong
    assert d.bit_accuracy == accuracy, d.message  # and every bit reads as written
    assert not d.present and d.payload is None, d.message
    assert "payload checksum fails" in d.message


def test_payloads_and_inputs():
    assert wm.make_payload("a", "b") == wm.make_payload("a", "b")
    assert wm.make_payload("a", "b") != wm.make_payload("a", "c")
    assert 0 <= wm.make_payload("x", "y") < 2**32
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="payload"):
        wm.embed(frames, 2**32)
    with pytest.raises(ValueError, match="uint8"):
        wm.embed(frames.astype(np.float32), 1)
    blank = wm.detect(np.full((2, 64, 64, 3), 90, np.uint8))
    assert not blank.present and blank.bit_accuracy is None


def test_is_weak():
    m = wm.MIN_FRAME_SIZE
    assert wm.is_weak(m - 2, 4 * m) and wm.is_weak(4 * m, m - 1)
    assert not wm.is_weak(m, m) and not wm.is_weak(2 * m, 3 * m)


def _record(**kw) -> dict:
    args = {"model_hash": "sha256:abcd", "prompt": "a red ball falls", "seed": 3,
            "watermark": True, "payload": PAYLOAD, "vdit_version": "0.1.0"} | kw
    return mf.provenance_record(**args)


def test_record_fields():
    r = _record(extra={"fps": 8})
    assert r["ai_generated"] is True
    assert r["digital_source_type"] == (
        "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia")
    created = dt.datetime.fromisoformat(r["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert r["watermark_payload"] == f"{PAYLOAD:#010x}" and r["fps"] == 8
    json.dumps(r)  # JSON-able
    off = _record(watermark=False, payload=None)
    assert off["watermark"] == "DISABLED by --no-watermark" and off["watermark_payload"] is None
    with pytest.raises(ValueError, match="payload"):
        _record(payload=None)
    with pytest.raises(ValueError, match="ai_generated"):
        _record(extra={"ai_generated": False})


def test_sidecar_round_trip_and_atomic_write(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    assert mf.read_sidecar(video) is None
    path = mf.write_sidecar(video, _record())
    assert path == tmp_path / "clip.mp4.json"
    assert mf.read_sidecar(video) == _record() | {"created": mf.read_sidecar(video)["created"]}

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        mf.write_sidecar(video, _record(seed=99))
    monkeypatch.undo()
    assert mf.read_sidecar(video)["seed"] == 3  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4.json"]  # no temp left
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        mf.read_sidecar(video)


def test_mp4_metadata_survives_write_and_read(tmp_path):
    tags = mf.mp4_metadata(_record(prompt="x" * 1000))
    assert all(isinstance(v, str) for v in tags.values())
    path = write_mp4(tmp_path / "t.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8,
                     metadata=tags)
    with av.open(str(path)) as container:
        back = dict(container.metadata)
    for key, value in tags.items():
        assert back[key] == value
    brief = json.loads(back["comment"])
    assert brief["ai_generated"] is True and len(brief["prompt"]) <= 200
    assert "AI-generated" in back["description"]


def test_c2pa_refuses_missing_files(tmp_path):
    video = write_mp4(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="certificate file not found"):
        mf.sign_c2pa(video, _record(), tmp_path / "none.pem", tmp_path / "none.key")


def _ca_and_leaf(tmp_path) -> tuple:
    """A throwaway test CA and an ES256 signing certificate it issued (EKU emailProtection)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vdit tests")])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                             encipher_only=False, decipher_only=False)

    def cert(subject, issuer, pub, signing_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
             .add_extension(usage(not ca), True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), False))
        if not ca:  # c2pa wants the signer's EKU and the link to its issuer's key
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                 False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     signing_key.public_key()), False))
        return b.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("test CA"), name("test CA"), ca_key.public_key(), ca_key, True)
    leaf = cert(name("test signer"), ca.subject, key.public_key(), ca_key, False)
    pem = serialization.Encoding.PEM
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path = tmp_path / "signer.key"
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_path


def test_c2pa_sign_and_read(tmp_path, marked):
    pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    chain, key = _ca_and_leaf(tmp_path)
    video = write_mp4(tmp_path / "v.mp4", marked, fps=8)
    assert mf.read_c2pa(video) is None
    assert mf.sign_c2pa(video, _record(), chain, key) == video
    m = mf.read_c2pa(video)
    assert m["validation_state"] in ("Valid", "Trusted")  # a test CA is valid, not trusted
    by_label = {a["label"]: a["data"] for a in m["assertions"]}
    (action,) = by_label["c2pa.actions.v2"]["actions"]
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == mf.DIGITAL_SOURCE_TYPE
    assert by_label[mf.C2PA_ASSERTION]["ai_generated"] is True
    _assert_found(read_video(video)[0])  # still plays, still marked
    with pytest.raises(ValueError, match="C2PA signing"):
        mf.sign_c2pa(video, _record(), key, key)  # a key is not a certificate
