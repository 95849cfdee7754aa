"""Weights staged from object storage on a shared cluster: hostile object keys, sha256 pins (cluster/weights.py)."""

import hashlib
import os

import pytest

from cluster import weights
from cluster.storage import StorageConfig

BUCKET = "pins"
GOOD = b"weights v1"
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@pytest.fixture
def store(s3, s3_endpoint):
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="ckpt/unet/model.bin", Body=GOOD)
    s3.put_object(Bucket=BUCKET, Key="ckpt/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="single.pt", Body=GOOD)
    return s3, StorageConfig(endpoint_url=s3_endpoint)


def files_outside(tmp_path, root):
    return sorted(str(p) for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents)


# ---------------------------------------------------------------- hostile keys

def test_dot_dot_keys_cannot_write_outside_the_staging_root(store, tmp_path):
    s3, storage = store
    # Keys are kept verbatim by S3 (put_object does not normalise them); this one climbs out of
    # root/<slot>/.part-*/tree into root's parent.
    s3.put_object(Bucket=BUCKET, Key="ckpt/../../../../escape.txt", Body=b"pwned")
    s3.put_object(Bucket=BUCKET, Key="ckpt/../../slot-escape.txt", Body=b"pwned")
    root = tmp_path / "cache" / "staged"
    with pytest.raises(ValueError, match=r"s3://pins/ckpt.*\.\./\.\./"):
        weights.stage_uris({"seesr": f"s3://{BUCKET}/ckpt"}, storage, root)
    assert files_outside(tmp_path, root) == []
    assert not list(root.rglob("*escape.txt")), "nothing lands beside the staged copy either"


@pytest.mark.parametrize("suffix, why", [
    ("/etc/evil", "absolute"),  # key ckpt//etc/evil: an absolute path once the prefix is cut off
    ("a/./b", r"'\.'"),
    ("a//b", "empty"),
    ("a\\b", "backslash"),
])
def test_listing_refuses_unsafe_keys_naming_uri_and_key(store, suffix, why):
    s3, storage = store
    s3.put_object(Bucket=BUCKET, Key=f"ckpt/{suffix}", Body=b"x")
    with pytest.raises(ValueError, match=why) as err:
        weights.listing(f"s3://{BUCKET}/ckpt", storage)
    assert f"s3://{BUCKET}/ckpt" in str(err.value) and repr(suffix) in str(err.value)
    with pytest.raises(ValueError):  # the driver's early check refuses it too
        weights.check_uris({"seesr": f"s3://{BUCKET}/ckpt"}, storage)


def test_key_check_refuses_nul_and_accepts_plain_keys():
    with pytest.raises(ValueError, match="NUL"):
        weights._check_key("s3://b/w", "a\x00b")
    for ok in ("model.bin", "unet/diffusion_pytorch_model.safetensors", "a..b/c.d"):
        weights._check_key("s3://b/w", ok)


def test_directory_markers_are_skipped(store):
    s3, storage = store
    s3.put_object(Bucket=BUCKET, Key="ckpt/", Body=b"")  # what the S3 console's "Create folder" writes
    s3.put_object(Bucket=BUCKET, Key="ckpt/unet/", Body=b"")
    assert sorted(weights.listing(f"s3://{BUCKET}/ckpt", storage)) == ["config.json", "unet/model.bin"]


def test_download_never_writes_outside_its_temp_folder(store, tmp_path):
    _, storage = store
    slot = tmp_path / "root" / "slot"
    slot.mkdir(parents=True)
    # A listing that slipped past listing()'s check (defence in depth).
    files = {"../../../../escape.txt": {"size": len(GOOD), "etag": ""}}
    with pytest.raises(ValueError, match="outside"):
        weights._download(f"s3://{BUCKET}/ckpt", files, storage, slot, slot / "model")
    assert files_outside(tmp_path, slot) == [] and list(slot.iterdir()) == []


# ---------------------------------------------------------------- sha256 pins

PIN = {"unet/model.bin": GOOD_SHA, "config.json": hashlib.sha256(b"{}").hexdigest()}


def test_pinned_prefix_and_object_are_staged_and_reused(store, tmp_path, monkeypatch):
    _, storage = store
    calls = []
    real = weights._download
    monkeypatch.setattr(weights, "_download", lambda uri, *a: (calls.append(uri), real(uri, *a)))
    uris = {"seesr": f"s3://{BUCKET}/ckpt", "sam2": f"s3://{BUCKET}/single.pt"}
    pins = {"seesr": PIN, "sam2": {"": GOOD_SHA.upper()}}  # digests compare case-insensitively
    out = weights.stage_uris(uris, storage, tmp_path, sha256=pins)
    assert open(os.path.join(out["seesr"], "unet", "model.bin"), "rb").read() == GOOD
    assert open(out["sam2"], "rb").read() == GOOD
    assert len(calls) == 2
    assert weights.stage_uris(uris, storage, tmp_path, sha256=pins) == out and len(calls) == 2, "verified copy reused"


def test_pin_mismatch_names_file_and_both_digests(store, tmp_path):
    _, storage = store
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        weights.stage_uri(f"s3://{BUCKET}/ckpt", storage, tmp_path, sha256={**PIN, "unet/model.bin": wrong})
    assert "unet/model.bin" in str(err.value) and wrong in str(err.value) and GOOD_SHA in str(err.value)
    assert not list(tmp_path.rglob("model.bin")), "nothing unverified is left in place"


def test_unpinned_file_is_refused_naming_its_digest(store, tmp_path):
    s3, storage = store
    s3.put_object(Bucket=BUCKET, Key="ckpt/extra.py", Body=b"import os")
    with pytest.raises(ValueError, match="extra.py") as err:
        weights.stage_uri(f"s3://{BUCKET}/ckpt", storage, tmp_path, sha256=PIN)
    assert hashlib.sha256(b"import os").hexdigest() in str(err.value) and "not in the pin" in str(err.value)


def test_pinned_file_missing_from_the_store_is_refused(store, tmp_path):
    _, storage = store
    with pytest.raises(ValueError, match="gone.bin"):
        weights.stage_uri(f"s3://{BUCKET}/ckpt", storage, tmp_path, sha256={**PIN, "gone.bin": GOOD_SHA})


def test_copy_staged_without_or_with_another_pin_is_verified_again(store, tmp_path):
    _, storage = store
    uri = f"s3://{BUCKET}/single.pt"
    weights.stage_uri(uri, storage, tmp_path)  # unpinned cache
    with pytest.raises(ValueError, match="0{64}"):
        weights.stage_uri(uri, storage, tmp_path, sha256={"": "0" * 64})
    assert weights.stage_uri(uri, storage, tmp_path, sha256={"": GOOD_SHA}).read_bytes() == GOOD


def test_stage_uris_needs_a_pin_for_every_remote_entry(store, tmp_path):
    _, storage = store
    uris = {"seesr": f"s3://{BUCKET}/ckpt", "sam2": f"s3://{BUCKET}/single.pt", "local": "/w/sd"}
    with pytest.raises(ValueError, match="sam2"):
        weights.stage_uris(uris, storage, tmp_path, sha256={"seesr": PIN})


def test_bad_pin_digest_is_refused():
    with pytest.raises(ValueError, match="not a sha256"):
        weights.stage_uri("s3://b/w", StorageConfig(), "/nonexistent", sha256={"a": "abc"})


def test_read_sha256_list():
    text = (f"# release 1\n\n{GOOD_SHA}  unet/model.bin\n{GOOD_SHA.upper()} *./single.pt\r\n"
            f"{GOOD_SHA}  name with  spaces.txt\n")
    assert weights.read_sha256_list(text) == {"unet/model.bin": GOOD_SHA, "single.pt": GOOD_SHA,
                                              "name with  spaces.txt": GOOD_SHA}
    for bad in (f"{GOOD_SHA} unet/model.bin", "abc  x", f"{GOOD_SHA}  ", f"{GOOD_SHA}  a\n{'0' * 64}  a"):
        with pytest.raises(ValueError, match="line"):
            weights.read_sha256_list(bad)


def test_a_pinned_model_source_is_staged_and_checked_per_file(store, tmp_path):
    """The wiring users reach through `--weights-sha256`: {file URI: digest} on the ModelSource."""
    from actors.staging import stage_source
    from pipelines.cli.upscale import pinned
    from srmodel.config import ModelSource

    _, storage = store
    source = ModelSource(sd_base=f"s3://{BUCKET}/ckpt", seesr=f"s3://{BUCKET}/ckpt/unet",
                         sam2_checkpoint=f"s3://{BUCKET}/single.pt")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{GOOD_SHA}  ckpt/unet/model.bin\n{hashlib.sha256(b'{}').hexdigest()}  ckpt/config.json\n"
                    f"{GOOD_SHA} *single.pt\n")
    good = pinned(source, f"s3://{BUCKET}", sums)
    staged = stage_source(good, storage, tmp_path / "staged")
    assert open(staged.sam2_checkpoint, "rb").read() == GOOD
    assert open(os.path.join(staged.seesr, "model.bin"), "rb").read() == GOOD
    sums.write_text(f"{'0' * 64}  ckpt/unet/model.bin\n{hashlib.sha256(b'{}').hexdigest()}  ckpt/config.json\n"
                    f"{GOOD_SHA} *single.pt\n")
    with pytest.raises(ValueError, match="model.bin has sha256"):
        stage_source(pinned(source, f"s3://{BUCKET}", sums), storage, tmp_path / "staged2")
