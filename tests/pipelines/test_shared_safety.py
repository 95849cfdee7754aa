"""A shared cluster: data from a list file or from DST/_state never makes ugcsr read, write or delete
outside the job (each attack below was reproduced against the code before the fix)."""

import http.server
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from actors.read import ReadStage
from actors.write import WriteStage
from cluster.source_policy import policy_for
from cluster.storage import StorageConfig, join
from pipelines.paths import IMAGE_EXTENSIONS
from pipelines.upscale import listing as L


@pytest.fixture
def http_server():
    """A loopback HTTP server that counts the requests it gets (the SSRF target)."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            body = b"\x89PNG not really"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.mark.parametrize("part", ["/etc", "../x", "a/../../x", "s3://other/b", "zip://a::file:///x", "~root/x",
                                  "C:/x", "a/..", "..\\x"])
@pytest.mark.parametrize("base", ["/data/dst", "s3://bucket/dst"])
def test_join_refuses_parts_that_leave_the_folder(base, part):
    with pytest.raises(ValueError, match="refusing the path part"):
        join(base, "_state", part)


def test_join_keeps_ordinary_relative_parts():
    assert join("s3://b/dst/", "_state", "todo/run/part-00001.parquet") == "s3://b/dst/_state/todo/run/part-00001.parquet"
    assert join("/data/dst", "a b/c..d.png") == "/data/dst/a b/c..d.png"


def test_an_absolute_listing_id_in_dst_state_deletes_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not yours")
    dst = tmp_path / "dst"
    (dst / "_state").mkdir(parents=True)
    storage = StorageConfig()
    for bad in (str(victim), "../../victim", "0123456789ab/../../victim"):
        (dst / "_state" / "listing.json").write_text(json.dumps({"listing_id": bad, "buckets": 8, "src": "x"}))
        previous = L.read_listing_meta(str(dst), storage)
        assert previous is None, "an out-of-range state file is ignored: the run lists again"
        # Even handed the raw value, committing a new listing removes no folder outside DST/_state/listing.
        L.commit_listing(str(dst), storage, {"listing_id": L.new_listing_id(), "buckets": 8}, {"listing_id": bad})
        assert (victim / "keep.txt").read_text() == "not yours"


@pytest.mark.parametrize("meta,why", [({"listing_id": "0123456789ab", "buckets": 10**9}, "buckets"),
                                      ({"listing_id": "0123456789ab", "buckets": "8"}, "buckets"),
                                      ({"listing_id": "0123456789ab", "buckets": 8, "images": -1}, "images"),
                                      ([1, 2], "object")])
def test_listing_meta_values_are_range_checked(meta, why):
    assert why in L.listing_meta_problem(meta)


def test_listing_meta_as_written_is_accepted():
    assert L.listing_meta_problem({"listing_id": L.new_listing_id(), "buckets": 400, "images": 10, "src": "s3://b/p"}) is None


def test_a_todo_key_that_leaves_dst_is_an_error_row_and_writes_nothing(tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    img = np.zeros((4, 4, 3), np.uint8)
    keys = [str(outside / "evil.png"), "../outside/evil2.png", "fine/ok.png"]
    out = WriteStage(str(dst))({"image_id": ["a", "b", "c"], "dst_key": keys, "sr_image": [img] * 3})
    assert out["status"] == ["error", "error", "ok"]
    assert all("refusing the path part" in m for m in out["error_message"][:2])
    assert not outside.exists() and (dst / "fine" / "ok.png").is_file()


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return path


def test_a_local_list_may_name_images_under_its_folder_only(tmp_path):
    inside, outside = _png(tmp_path / "lists" / "a" / "x.png"), _png(tmp_path / "elsewhere" / "y.png")
    policy = policy_for(str(tmp_path / "lists" / "list.txt"), [], IMAGE_EXTENSIONS)
    assert policy.refusal(f"file://{inside}") is None
    assert "outside the allowed sources" in policy.refusal(f"file://{outside}")
    assert "outside" in policy.refusal(f"file://{tmp_path}/lists/../elsewhere/y.png")
    assert "not an image" in policy.refusal(f"file://{tmp_path}/lists/a/notes.txt")
    assert "not an image" in policy.refusal("file:///etc/passwd")
    allowed = policy_for(str(tmp_path / "lists" / "list.txt"), [str(tmp_path / "elsewhere")], IMAGE_EXTENSIONS)
    assert allowed.refusal(f"file://{outside}") is None


def test_a_remote_list_may_name_its_own_bucket_only():
    policy = policy_for("s3://team-a/lists/today.parquet", [], IMAGE_EXTENSIONS)
    assert policy.refusal("s3://team-a/photos/1.jpg") is None
    assert policy.refusal("s3a://team-a/photos/1.jpg") is None
    assert "outside" in policy.refusal("s3://team-b/photos/1.jpg")
    assert "outside" in policy.refusal("s3://team-a-evil/photos/1.jpg"), "a bucket name prefix is not the bucket"
    assert "outside" in policy.refusal("gs://team-a/photos/1.jpg")
    assert "chained" in policy.refusal("zip://x.png::s3://team-a/a.zip")
    assert "outside" in policy.refusal("file:///data/team-a/1.png")
    assert "outside" in policy.refusal("https://example.com/1.png")
    folder = policy_for("s3://team-a/photos", ["s3://shared/public/"], IMAGE_EXTENSIONS)
    assert folder.refusal("s3://team-a/photos/x/1.png") is None
    assert "outside" in folder.refusal("s3://team-a/photos-other/1.png")
    assert folder.refusal("s3://shared/public/1.png") is None


def test_http_sources_need_an_allowed_root_and_a_public_address(http_server):
    base, hits = http_server
    uri = f"{base}/image.png"
    # Before the policy: a list row made the worker fetch any URL the cluster can reach.
    out = ReadStage()({"image_id": ["a"], "src_uri": [uri]})
    assert hits == ["/image.png"] and out["src_bytes"][0] > 0
    hits.clear()
    for allow in ([], [base + "/"]):  # loopback is refused even when its prefix is allowed
        policy = policy_for("s3://team-a/list.txt", allow, IMAGE_EXTENSIONS)
        out = ReadStage(policy=policy)({"image_id": ["a"], "src_uri": [uri]})
        assert out["error_type"] == ["RefusedSource"] and out["stage"] == ["read"] and out["src_bytes"][0] == 0
        assert uri in out["error_message"][0]
    assert hits == [], "no request reached the server"
    metadata = policy_for("s3://team-a/list.txt", ["http://169.254.169.254/"], IMAGE_EXTENSIONS)
    assert "non-public address" in metadata.refusal("http://169.254.169.254/latest/meta-data/x.png")
    private = policy_for("s3://team-a/list.txt", ["http://10.1.2.3/"], IMAGE_EXTENSIONS)
    assert "non-public address" in private.refusal("http://10.1.2.3/x.png")


def test_refused_rows_are_never_fetched_and_the_others_are(tmp_path):
    inside, outside = _png(tmp_path / "in" / "x.png"), _png(tmp_path / "out" / "y.png")
    policy = policy_for(str(tmp_path / "in" / "list.txt"), [], IMAGE_EXTENSIONS)
    out = ReadStage(policy=policy)({"image_id": ["a", "b"], "src_uri": [f"file://{inside}", f"file://{outside}"]})
    assert out["error_type"] == ["", "RefusedSource"]
    assert out["src_bytes"][0] == os.path.getsize(inside) and out["src_bytes"][1] == 0


def test_credentials_in_uris_are_refused_and_never_recorded(tmp_path):
    from pipelines.upscale.job import UpscaleJob
    from srmodel import get_preset

    secret_uri = "s3://AKIAEXAMPLE:hunter2@bucket/in"
    model = get_preset("tiny").model_dump(mode="json")
    with pytest.raises(ValueError, match="carries credentials") as err:
        UpscaleJob.model_validate({"src": secret_uri, "dst": str(tmp_path), "model": model})
    assert "hunter2" not in err.value.errors()[0]["msg"]
    from typer.testing import CliRunner

    from pipelines.cli.app import app

    out = CliRunner().invoke(app, ["upscale", secret_uri, str(tmp_path / "out"), "--print-config"])
    assert out.exit_code == 2 and "carries credentials" in out.output and "hunter2" not in out.output
    with pytest.raises(ValueError, match="carries credentials"):
        StorageConfig(endpoint_url="http://user:hunter2@127.0.0.1:9000")
    # A list row with user:password@ is recorded redacted, and the read stage refuses it.
    lst = tmp_path / "list.txt"
    lst.write_text("https://user:hunter2@images.example.com/a.png\n")
    ctx = {"storage": {}, "format": "png", "cwd": str(tmp_path)}
    uris, _ = L._rows_of_unit(("text", str(lst)), ctx)
    assert uris == ["https://REDACTED@images.example.com/a.png"]
    policy = policy_for(str(lst), ["https://images.example.com/"], IMAGE_EXTENSIONS)
    assert "credentials" in policy.refusal(uris[0])


@pytest.mark.parametrize("env", ["WANDB_API_KEY=abc", "GITHUB_TOKEN=abc", "DATABASE_URL=postgres://db/x",
                                 "MY_PASSWD=x", "NOTE=AKIAABCDEFGHIJKLMNOP", "HOOK=https://u:p@example.com/x",
                                 "T=ghp_0123456789abcdefghij0123", "PEM=-----BEGIN RSA PRIVATE KEY-----"])
def test_submit_refuses_secret_names_and_values(env):
    from cluster import jobs

    key, value = env.split("=", 1)
    with pytest.raises(ValueError) as err:
        jobs.storage_env({key: value})
    assert value not in str(err.value) or len(value) < 4, "the message never echoes a secret value"


def test_submit_passes_ordinary_settings():
    from cluster import jobs

    assert jobs.storage_env({"OMP_NUM_THREADS": "4", "RAY_DATA_VERBOSE": "1"})["OMP_NUM_THREADS"] == "4"


def test_a_lease_from_another_boot_or_host_is_never_taken_over_by_pid():
    """The initial PID namespace has the same inode on every host: hostname + namespace named another machine."""
    import socket

    from cluster.lease import LeaseRecord, process_space

    here = process_space()
    assert here.count("|") == 2, "host, boot id and PID namespace"
    host, boot, ns = here.split("|")
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    mine = LeaseRecord(owner="me", run_id="r", acquired_at=0, expires_at=0, space=here, pid=dead_pid)
    assert mine.dead_here()
    other_boot = LeaseRecord(owner="twin", run_id="r", acquired_at=0, expires_at=0,
                             space=f"{socket.gethostname()}|{'0' * 36}|{ns}", pid=dead_pid)
    older = LeaseRecord(owner="old", run_id="r", acquired_at=0, expires_at=0, space=f"{host}|{ns}", pid=dead_pid)
    assert not other_boot.dead_here() and not older.dead_here()


def test_bad_values_of_the_new_options_are_clear_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli.app import app

    def run(*args):
        res = CliRunner().invoke(app, list(args))
        return res.exit_code, " ".join(res.output.split())

    code, out = run("upscale", str(tmp_path / "list.txt"), str(tmp_path / "out"), "--allow-src", "zip://a::b",
                    "--print-config")
    assert code == 2 and "allow_src" in out and "not a folder or URI prefix" in out
    code, out = run("upscale", str(tmp_path), str(tmp_path / "out"), "--weights-sha256", str(tmp_path / "nope"),
                    "--print-config")
    assert code == 2 and "--weights-sha256" in out and "object storage" in out, "pins need weights on a store"
    bad = tmp_path / "SUMS"
    bad.write_text("not a digest  file\n")
    from pipelines.cli.upscale import pinned
    from srmodel.config import ModelSource

    src = ModelSource(sd_base="s3://w/sd", seesr="s3://w/ck", sam2_checkpoint="s3://w/sam.pt")
    import typer

    with pytest.raises(typer.BadParameter, match="line 1"):
        pinned(src, "s3://w", bad)
    with pytest.raises(typer.BadParameter, match="nope"):
        pinned(src, "s3://w", tmp_path / "nope")
    code, out = run("train", str(tmp_path), str(tmp_path / "run"), "--max-steps", "2", "--init", "paper",
                    "--seesr-init", str(tmp_path / "missing"), "--print-config")
    assert code == 2 and "--seesr-init" in out and "unet/config.json" in out
    code, out = run("train", str(tmp_path), str(tmp_path / "run"), "--max-steps", "2", "--init", "paper",
                    "--print-config")
    assert code == 2 and "seesr-init" in out, "paper without its starting checkpoint names the option"
