"""The machine-readable "AI-generated" record of a video: mp4 tags, a JSON sidecar, and C2PA.

The record is a plain JSON-able dict. It travels three ways, from weakest to strongest:
mp4 container tags (`mp4_metadata`, lost on any re-encode), a sidecar VIDEO.json
(`write_sidecar`), and an optional signed C2PA manifest embedded in the mp4 (`sign_c2pa`, needs
the optional `c2pa-python` package and a certificate). The invisible watermark
(vdit.provenance.watermark) is what survives when all of these are stripped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vdit.config import ConfigError
from vdit.io import atomic

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
WATERMARK_SCHEME = "vdit-ss-luma-v1"  # names the scheme in vdit.provenance.watermark
WATERMARK_DISABLED = "DISABLED by --no-watermark"
C2PA_ASSERTION = "org.vdit.provenance"  # label of the assertion that carries the whole record
# mp4 tags that PyAV's mp4 muxer writes and reads back (checked: title, artist, album, composer,
# date, comment, genre, copyright, description, synopsis, keywords survive; encoder is replaced
# by the muxer's own, creation_time and custom keys are dropped).
MP4_KEYS = ("comment", "description", "keywords")
_RESERVED = {"ai_generated", "digital_source_type", "generator", "vdit_version", "created",
             "model_hash", "prompt", "seed", "watermark", "watermark_payload"}


def provenance_record(*, model_hash: str, prompt: str, seed: int, watermark: bool,
                      payload: int | None, vdit_version: str,
                      extra: dict | None = None) -> dict[str, Any]:
    """The record for one generated video. `extra` keys are added at the top level and may not
    shadow the standard fields. With watermark=False the "watermark" field says so loudly."""
    if watermark and payload is None:
        raise ValueError("a watermarked video needs its payload (watermark.make_payload)")
    record: dict[str, Any] = {
        "ai_generated": True,
        "digital_source_type": DIGITAL_SOURCE_TYPE,
        "generator": "vdit",
        "vdit_version": vdit_version,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "model_hash": model_hash,
        "prompt": prompt,
        "seed": int(seed),
        "watermark": WATERMARK_SCHEME if watermark else WATERMARK_DISABLED,
        "watermark_payload": f"{payload:#010x}" if watermark else None,
    }
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"extra may not override standard fields: {sorted(clash)}")
    record.update(extra or {})
    return record


def mp4_metadata(record: dict[str, Any], *, max_prompt: int = 200) -> dict[str, str]:
    """Short container tags for `write_mp4(..., metadata=...)`.

    "comment" holds the key fields as compact JSON (the prompt cut to `max_prompt` characters),
    "description" a sentence for people, "keywords" searchable flags.
    """
    prompt = str(record.get("prompt", ""))
    if len(prompt) > max_prompt:
        prompt = prompt[: max_prompt - 3] + "..."
    brief = {k: record[k] for k in ("ai_generated", "digital_source_type", "generator",
                                    "vdit_version", "created", "model_hash", "seed",
                                    "watermark", "watermark_payload") if k in record}
    brief["prompt"] = prompt
    rewrite = record.get("prompt_rewrite") or {}
    if rewrite.get("rewritten"):  # vdit sample --rewrite-prompt: "prompt" is the model's
        user = str(rewrite.get("user_prompt", ""))
        brief["prompt_rewritten"] = True
        brief["user_prompt"] = user if len(user) <= max_prompt else user[: max_prompt - 3] + "..."
        brief["rewrite_model"] = str(rewrite.get("model", ""))
    how = (f"a text prompt rewritten by the language model {rewrite.get('model', '')}"
           if rewrite.get("rewritten") else "a text prompt")
    marked = record.get("watermark") == WATERMARK_SCHEME
    sentence = (f"AI-generated video (synthetic, made by vdit {record.get('vdit_version', '')} "
                f"from {how}). " + ("Carries an invisible watermark; check it with "
                                            "`vdit detect VIDEO`." if marked else
                                            "Invisible watermark: " + str(record.get("watermark"))
                                            + "."))
    return {
        "comment": json.dumps(brief, separators=(",", ":"), ensure_ascii=False),
        "description": sentence,
        "keywords": "AI-generated, synthetic, trainedAlgorithmicMedia, vdit"
                    + (", prompt rewritten" if rewrite.get("rewritten") else ""),
    }


def sidecar_path(video_path: str | Path) -> Path:
    """VIDEO.mp4 -> VIDEO.mp4.json (the full name is kept, so a.mp4 and a.gif don't clash)."""
    p = Path(video_path)
    return p.with_name(p.name + ".json")


def write_sidecar(video_path: str | Path, record: dict[str, Any]) -> Path:
    """Write the record as VIDEO.json next to the video, atomically (temp file + rename), so a
    reader never sees half a file."""
    path = sidecar_path(video_path)
    text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    return atomic.write_text(path, text, fsync=True)


def read_sidecar(video_path: str | Path) -> dict[str, Any] | None:
    """The sidecar record of a video, or None if there is none. Raises ValueError if corrupt."""
    path = sidecar_path(video_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt provenance sidecar: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: provenance sidecar is not a JSON object")
    return record


def c2pa_manifest(record: dict[str, Any], title: str) -> dict[str, Any]:
    """The C2PA manifest definition: a c2pa.created action with the IPTC digital source type
    trainedAlgorithmicMedia, plus the full record as a vdit assertion."""
    version = str(record.get("vdit_version", ""))
    return {
        "claim_generator_info": [{"name": "vdit", "version": version}],
        "title": title,
        "format": "video/mp4",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": {"name": "vdit", "version": version},
            }]}},
            {"label": C2PA_ASSERTION, "data": record},
        ],
    }


def sign_c2pa(video_path: str | Path, record: dict[str, Any], cert_path: str | Path,
              key_path: str | Path, *, alg: str = "es256", tsa_url: str | None = None) -> Path:
    """Embed a signed C2PA manifest in the mp4, in place (signed to a temp file, then renamed).

    cert_path: PEM chain, signing certificate first (then its intermediates); the certificate
    needs the digitalSignature key usage and an extended key usage such as emailProtection, and
    must be issued by a CA (c2pa refuses self-signed leaves). key_path: its PEM private key.
    alg: es256 | es384 | es512 | ps256 | ps384 | ps512 | ed25519, matching the key. tsa_url: an
    RFC 3161 time-stamp authority, so the signature outlives the certificate. Needs the optional
    package `c2pa-python` (pip install 'vdit[c2pa]').
    """
    video, cert, key = Path(video_path), Path(cert_path), Path(key_path)
    for what, p in (("video", video), ("certificate", cert), ("private key", key)):
        if not p.is_file():
            raise ConfigError(f"C2PA signing: {what} file not found: {p}")
    try:
        import c2pa
    except ImportError:
        raise ImportError("C2PA signing needs the optional package c2pa-python: "
                          "pip install 'vdit[c2pa]' (or pip install c2pa-python)") from None
    info = c2pa.C2paSignerInfo(alg=alg.encode(), sign_cert=cert.read_bytes(),
                               private_key=key.read_bytes(),
                               ta_url=tsa_url.encode() if tsa_url else None)
    # The signed copy is written beside the video, then renamed over it (".mp4": c2pa picks the
    # format from the name).
    with atomic.atomic_path(video, suffix=".c2pa.mp4") as tmp:
        try:
            with (c2pa.Signer.from_info(info) as signer,
                  c2pa.Builder(c2pa_manifest(record, video.name)) as builder):
                builder.sign_file(video, tmp, signer)
        except c2pa.C2paError as e:
            # A user's certificate or key, not a bug: a ConfigError, which `vdit` reports in
            # one line.
            raise ConfigError(f"C2PA signing of {video} failed: {e}. Check that the key "
                              f"matches the certificate, that alg={alg!r} fits the key, and that "
                              f"the certificate is CA-issued (self-signed ones are refused)"
                              ) from None
    return video


def read_c2pa(video_path: str | Path) -> dict[str, Any] | None:
    """The active C2PA manifest of an mp4 as a dict plus "validation_state" (e.g. "Valid";
    "Trusted" only for certificates on the c2pa trust list), or None when it has none."""
    try:
        import c2pa
    except ImportError:
        raise ImportError("reading C2PA needs the optional package c2pa-python: "
                          "pip install 'vdit[c2pa]'") from None
    try:
        with open(video_path, "rb") as f, c2pa.Reader("video/mp4", f) as reader:
            manifest = reader.get_active_manifest()
            state = reader.get_validation_state()
    except c2pa.C2paError:  # ManifestNotFound and its relatives: nothing signed here
        return None
    if manifest is None:
        return None
    return {**manifest, "validation_state": state}
